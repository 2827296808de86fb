"""Every head trains under bf16 autocast on ViT and on Swin, forced on the CPU whatever its instruction set (a GPU and
an AVX-512 BF16 CPU both turn bf16 on for the shipped recipes), and the heads' forward has no graph break."""

from __future__ import annotations

import pytest
import torch

from fer_bench.data import AugmentOptions, get_dataset
from fer_bench.data.cache import cached_dataset
from fer_bench.data.device_loader import DeviceLoader
from fer_bench.models import create_model
from fer_bench.runtime import DistContext, autocast_dtype
from fer_bench.train.data_setup import head_data_options
from fer_bench.train.fit import build_optimizer
from fer_bench.train.loop import EpochTally, train_steps, validate

VIT = ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2})
SWIN = (
    "swin_tiny_patch4_window7_224",
    {"depths": [1, 1, 1, 1], "embed_dim": 32, "num_heads": [1, 2, 4, 8], "window_size": 2},
)
HEADS = {"au_heatmap": {}, "anchors": {"dim": 16, "warmup": 0.3, "class_weighted": True}, "occlusion": {}}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(tiny_synthfer, tmp_path_factory):
    info = get_dataset("synthfer", tiny_synthfer)
    return cached_dataset(info, cache=str(tmp_path_factory.mktemp("c") / "cache"), size=32, message=lambda m: None)


def test_forced_autocast_dtype_is_bf16_on_any_cpu():
    assert autocast_dtype("bf16", CPU, force=True) is torch.bfloat16
    assert autocast_dtype("fp32", CPU, force=True) is None


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_trains_under_bf16_autocast(cached, family, head):
    name, kwargs = VIT if family == "vit" else SWIN
    torch.manual_seed(0)
    model = create_model(name, num_classes=8, img_size=32, heads={head: HEADS[head]}, **kwargs)
    data = head_data_options(model, cached, AugmentOptions())
    loader = DeviceLoader(cached, "train", device=CPU, img_size=32, batch_size=16, seed=0, **data)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=None, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    tally = EpochTally(CPU)
    train_steps(
        model,
        loader,
        start_step=0,
        tally=tally,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        device=CPU,
        amp_dtype=autocast_dtype("bf16", CPU, force=True),
        label_smoothing=0.1,
        grad_clip=1.0,
        target_kind="label",
        class_weights=None,
        seed=0,
        rank=0,
        total_steps=len(loader),
        max_steps=None,
        log_every=2,
        step_done=lambda loss: None,
    )
    row = tally.row(DistContext())
    assert tally.steps == len(loader) == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values()), row
    expected = {"au_heatmap": "loss_au_align", "anchors": "loss_anchor_center", "occlusion": "loss_occ_recon"}[head]
    assert row[expected] > 0, row
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith(f"heads.{head}") for k in moved) or head == "au_heatmap"  # au_heatmap has no weights
    assert any(k.startswith("backbone.") for k in moved)
    if head == "anchors":
        assert model.head("anchors")._initialised and bool(model.head("anchors").initialised)
    val = DeviceLoader(cached, "val", device=CPU, img_size=32, batch_size=16, train=False)
    figures = validate(model, val, device=CPU, amp_dtype=torch.bfloat16, num_classes=8)
    assert 0 <= figures["val_acc"] <= 1 and figures["val_loss"] == figures["val_loss"]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_heads_forward_compiles_without_a_graph_break(family):
    """fullgraph=True fails on a host sync (.item(), a Python branch on a tensor) in the forward; backend="eager" is
    how timm checks traceability cheaply on a CPU."""
    name, kwargs = VIT if family == "vit" else SWIN
    model = create_model(name, num_classes=8, img_size=32, heads=HEADS, **kwargs).train()
    anchors = model.head("anchors")
    anchors.mean_counts.fill_(1.0)
    anchors.set_progress(0.5)  # past its warm-up: the trained path
    assert anchors._initialised
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    mask = torch.zeros(4, 32, 32)
    mask[:, :8, :8] = 1
    out = compiled(x, occlusion_mask=mask)
    assert out["logits"].shape == (4, 8) and "train_logits" in out and "reconstruction" in out
