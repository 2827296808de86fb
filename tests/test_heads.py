"""The three heads: AU maps and attention guidance, anchors, occlusion detect-mask-reconstruct; their training,
evaluation metrics and checkpoints, on ViT and Swin."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from fer_bench.data import FaceDataset, create_transform, get_dataset, get_label_space
from fer_bench.data.au_maps import (
    CODEBOOK,
    au_ellipses,
    draw_au_map,
    fit_template,
    five_point,
    template_landmarks,
)
from fer_bench.data.occluders import draw_occluder
from fer_bench.errors import ConfigError
from fer_bench.eval import evaluate
from fer_bench.eval.head_metrics import map_cosine
from fer_bench.models import create_model
from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint
from fer_bench.models.heads import list_heads
from fer_bench.models.heads.anchors import (
    AnchorHead,
    anchor_distribution,
    confidence,
    corrected_distribution,
    separation_loss,
)
from fer_bench.models.heads.au_heatmap import alignment_loss
from fer_bench.models.heads.occlusion import masked_l1, patch_occupancy, substitute_tokens
from fer_bench.train import fit
from fer_bench.train.recipe import recipe_from_dict
from tests.conftest import tiny_recipe_dict

NAMES = get_label_space("all8").names
VIT = ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2})
SWIN = (
    "swin_tiny_patch4_window7_224",
    {"depths": [1, 1, 1, 1], "embed_dim": 32, "num_heads": [1, 2, 4, 8], "window_size": 2},
)
ALL_HEADS = {"au_heatmap": {}, "anchors": {"dim": 16, "warmup": 0.2}, "occlusion": {}}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------------------------------
# AU maps


def test_codebook_follows_the_paper_with_au10_for_disgust():
    assert CODEBOOK["disgust"] == (9, 10, 16, 17, 25, 26)  # the paper's AU10, not the released code's AU5
    assert CODEBOOK["happiness"] == (6, 12, 25) and CODEBOOK["sadness"] == (1, 4, 6, 15, 17)
    assert CODEBOOK["neutral"] == () and CODEBOOK["contempt"] == ()
    assert draw_au_map(template_landmarks(64), CODEBOOK["neutral"], 64) is None


def test_ellipses_sit_on_their_landmarks_with_radii_scaled_to_the_image():
    points = np.zeros((68, 2))
    points[20], points[23] = (70, 60), (150, 60)  # inner brows
    points[51], points[57] = (112, 150), (112, 175)  # lips
    points[48], points[54] = (80, 160), (144, 160)  # mouth corners
    au1 = au_ellipses(points, 1, 224)
    assert [c for c, _ in au1] == [(70.0, 60.0), (150.0, 60.0)] and au1[0][1] == (28.0, 22.4)  # (w/8, h/10)
    assert au_ellipses(points, 12, 112)[0][1] == (10.0, 10.0)  # 20 px at 224 → 10 px at 112
    assert au_ellipses(points, 25, 224) == [((112.0, 150.0), (25.0, 10.0)), ((112.0, 175.0), (25.0, 10.0))]
    ((centre, axes),) = au_ellipses(points, 26, 224)  # one ellipse on the mouth box
    assert centre == (112.0, 162.5) and axes == (32.0, 12.5)  # x48..x54, y51..y57
    with pytest.raises(ValueError, match="AU99"):
        au_ellipses(points, 99, 224)


def test_happiness_map_covers_mouth_and_cheeks_not_brows():
    points = template_landmarks(64)
    heatmap = draw_au_map(points, CODEBOOK["happiness"], 64)
    assert heatmap.shape == (64, 64) and heatmap.min() == 0.0 and heatmap.max() == 1.0
    mouth = points[[48, 54]].round().astype(int)
    assert all(heatmap[y, x] > 0.5 for x, y in mouth)
    brow = points[[19, 24]].round().astype(int)
    assert all(heatmap[y, x] < 0.1 for x, y in brow)


def test_five_point_landmarks_are_fitted_to_the_template():
    template = template_landmarks(100)
    angle = math.radians(12)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = (template - 50) @ rot.T * 1.3 + 60
    assert np.allclose(fit_template(five_point(moved)), moved, atol=1e-6)


def test_au_map_follows_a_rotation_of_the_face():
    points = template_landmarks(96)
    heatmap = draw_au_map(points, CODEBOOK["fear"], 96)
    m = cv2.getRotationMatrix2D((48.0, 48.0), 25, 1.0)
    rotated_points = points @ m[:, :2].T + m[:, 2]
    rotated_map = cv2.warpAffine(heatmap, m, (96, 96))
    drawn = draw_au_map(rotated_points, CODEBOOK["fear"], 96)
    assert _cos(drawn, rotated_map) > 0.95
    assert _cos(drawn, heatmap) < _cos(drawn, rotated_map) - 0.05  # the rotation matters


def _face_rows(n: int = 8, size: int = 48) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with 68 template landmarks (shifted per row) and flat grey images; labels cycle over the 8 classes."""
    rows, images = [], []
    for i in range(n):
        points = template_landmarks(size) + (i % 3 - 1)
        rows.append(
            {
                "image_id": f"f{i}",
                "path": "",
                "split": "train",
                "label": i % 8,
                "array_index": i,
                "landmarks": points.reshape(-1).tolist(),
            }
        )
        images.append(np.full((size, size, 3), 120 + i, np.uint8))
    return pd.DataFrame(rows), np.stack(images)


def test_dataset_heatmap_follows_a_flip():
    rows, images = _face_rows()
    common = dict(root=Path("."), transform=create_transform(train=False, img_size=48), image_array=images)
    plain = FaceDataset(rows, heatmaps="codebook", label_names=NAMES, **common)
    flipped = FaceDataset(rows, heatmaps="codebook", label_names=NAMES, hflip=1.0, **common)
    for i in range(1, 8):
        if NAMES[i % 8] in ("neutral", "contempt"):
            continue
        a, b = plain[i]["heatmap"].numpy(), flipped[i]["heatmap"].numpy()
        assert _cos(a[:, ::-1], b) > 0.97, NAMES[i % 8]


def test_dataset_heatmap_is_drawn_from_the_augmented_landmarks():
    rows, images = _face_rows()
    transform = A.Compose(
        [A.Affine(rotate=(20, 20), p=1.0), A.Normalize(), ToTensorV2()],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )
    data = FaceDataset(
        rows,
        root=Path("."),
        transform=transform,
        image_array=images,
        heatmaps="codebook",
        label_names=NAMES,
        return_landmarks=True,
    )
    item = data[2]  # surprise
    assert int(item["heatmap_source"]) == 1  # landmarks68
    moved = item["landmarks"].numpy()
    assert not np.allclose(moved, template_landmarks(48) + 1 - 2, atol=1)  # really rotated
    expected = draw_au_map(moved, CODEBOOK[NAMES[2]], 48)
    assert np.allclose(item["heatmap"].numpy(), expected, atol=1e-5)


def test_neutral_and_contempt_have_no_map_and_rows_without_landmarks_use_the_template():
    rows, images = _face_rows()
    data = FaceDataset(
        rows.drop(columns=["landmarks"]),
        root=Path("."),
        transform=create_transform(train=False, img_size=48),
        image_array=images,
        heatmaps="codebook",
        label_names=NAMES,
    )
    for i in range(8):
        item = data[i]
        has_map = NAMES[i] not in ("neutral", "contempt")
        assert bool(item["heatmap_valid"]) is has_map
        assert int(item["heatmap_source"]) == (3 if has_map else 0)  # template
        assert (float(item["heatmap"].max()) > 0) is has_map


def test_alignment_loss_masks_samples_without_maps():
    attention = torch.rand(3, 4, 4, requires_grad=True)
    heatmap = torch.rand(3, 16, 16)
    valid = torch.tensor([True, False, True])
    loss = alignment_loss(attention, heatmap, valid)
    changed = attention.detach().clone()
    changed[1] = 100 * torch.rand(4, 4)  # the invalid sample's attention does not matter
    assert torch.isclose(loss, alignment_loss(changed, heatmap, valid))
    loss.backward()
    assert attention.grad[1].abs().sum() == 0 and attention.grad[0].abs().sum() > 0
    none = alignment_loss(attention, heatmap, torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad
    aligned = torch.zeros(1, 4, 4)
    aligned[0, :2, :2] = 1
    target = torch.zeros(1, 16, 16)
    target[0, :8, :8] = 1
    assert float(alignment_loss(aligned, target, torch.tensor([True]))) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Attention extraction


@pytest.mark.parametrize("backbone", [VIT, SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("kind", ["channel_mean", "token_norm", "cls_attention"])
def test_attention_shapes(backbone, kind):
    name, kwargs = backbone
    heads = {"au_heatmap": {"attention": kind}}
    if kind == "cls_attention" and "swin" in name:
        with pytest.raises(ConfigError, match="class token"):
            create_model(name, num_classes=8, img_size=64, heads=heads, **kwargs)
        return
    model = create_model(name, num_classes=8, img_size=64, heads=heads, **kwargs).eval()
    out = model(torch.randn(2, 3, 64, 64))
    grid = (8, 8) if "vit" in name else (4, 4)  # ViT patch 8; Swin stage 2 of 4 (64/4/2/2)
    assert tuple(out["attention"].shape) == (2, *grid)
    assert out["cam"].shape[:2] == (2, 8)
    if kind == "cls_attention":  # softmax weights over patches (the class token's own share is left out)
        assert torch.all(out["attention"] >= 0) and torch.all(out["attention"].sum((1, 2)) <= 1 + 1e-5)
    plain = create_model(name, num_classes=8, img_size=64, **kwargs).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(plain(torch.ones(1, 3, 64, 64))["logits"], model(torch.ones(1, 3, 64, 64))["logits"])


def test_map_cosine_matches_the_definition():
    attention = torch.tensor([[[-1.0, 1.0], [-1.0, -1.0]]])
    target = torch.zeros(1, 2, 2)
    target[0, 0, 1] = 1
    assert float(map_cosine(attention, target)) == pytest.approx(1.0)  # shifted to [0, 2]: only one cell non-zero
    assert float(map_cosine(torch.ones(1, 2, 2), target, normalise="minmax")) == 0.0  # constant CAM → 0, not NaN


# ---------------------------------------------------------------------------------------------------------------------
# Anchors


def test_confidence_distribution_and_correction_by_hand():
    assert confidence(torch.tensor([[0.25, 0.25, 0.25, 0.25]])).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    c = 1 - (-(p * p.log()).sum() / math.log(3))
    assert confidence(p).item() == pytest.approx(c.item())
    distances = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # C=2, K=2
    weights = torch.softmax(-torch.tensor([0.0, 1.0, 2.0, 3.0]) / 0.5, 0)
    g = anchor_distribution(distances, 0.5)
    assert torch.allclose(g, torch.tensor([[weights[0] + weights[1], weights[2] + weights[3]]]))
    q = torch.tensor([[0.6, 0.4]])
    cq = confidence(q)
    assert torch.allclose(corrected_distribution(q, g), cq * q + (1 - cq) * g)
    assert torch.allclose(corrected_distribution(q, g).sum(), torch.tensor(1.0))


def test_anchors_start_at_class_means_after_warmup():
    from fer_bench.models.heads import HeadContext

    context = HeadContext("vit", 3, 4, 32, (4,), ((2, 2),))
    head = AnchorHead(context, warmup=0.5)
    embeddings = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 4.0, 0]])
    labels = torch.tensor([0, 0, 1, 2])
    head.train()
    head.set_progress(0.0)
    out = head(embeddings, torch.zeros(4, 3))
    assert torch.allclose(out["train_logits"].exp(), torch.full((4, 3), 1 / 3))  # τ = 0 before the anchors exist
    head.losses(out, {"label": labels})
    head.set_progress(0.4)
    assert not bool(head.initialised)
    head.set_progress(0.5)
    assert bool(head.initialised) and head.trust == 0.0
    assert torch.allclose(head.anchors[:, 0], torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 4.0, 0]]))
    head.set_progress(0.75)
    assert head.trust == pytest.approx(0.5)


def test_separation_term_is_bounded_and_arbex_term_is_not():
    torch.manual_seed(0)
    for scale in (0.0, 0.01, 1.0, 100.0):
        value = float(separation_loss(torch.randn(7, 3, 16) * scale, margin=1.0))
        assert 0.0 <= value <= 1.0
    assert float(separation_loss(torch.zeros(7, 3, 16), margin=1.0)) == 1.0
    assert float(separation_loss(torch.randn(7, 3, 16) * 100, margin=1.0)) == 0.0
    from fer_bench.models.heads import HeadContext

    head = AnchorHead(HeadContext("vit", 3, 4, 32, (4,), ((2, 2),)), mode="arbex")
    with torch.no_grad():
        head.anchors.copy_(torch.randn_like(head.anchors) * 1000)
    head.set_progress(0.5)
    out = head(torch.randn(4, 4), torch.randn(4, 3))
    assert float(head.losses(out, {"label": torch.tensor([0, 1, 2, 0])})["anchor_separation"].detach()) < -1e5


def test_test_time_correction_is_optional():
    from fer_bench.models.heads import HeadContext

    context = HeadContext("vit", 2, 2, 32, (2,), ((1, 1),))
    off, on = AnchorHead(context), AnchorHead(context, test_correction=True)
    for head in (off, on):
        head.eval()
        with torch.no_grad():
            head.anchors.copy_(torch.tensor([[[0.0, 0.0]], [[5.0, 5.0]]]))
    logits = torch.tensor([[0.0, 0.0]])  # unsure classifier, embedding at anchor 0
    assert "logits" not in off(torch.zeros(1, 2), logits)
    corrected = on(torch.zeros(1, 2), logits)["logits"].exp()
    assert corrected[0, 0] > 0.9


# ---------------------------------------------------------------------------------------------------------------------
# Occlusion


def test_patch_occupancy_substitution_and_masked_reconstruction_loss():
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :2] = 1  # half of patch (0, 0) of a 2 x 2 grid
    assert patch_occupancy(mask, (2, 2)).tolist() == [[[0.5, 0.0], [0.0, 0.0]]]
    tokens = torch.randn(2, 3, 2, 2)
    flags = torch.zeros(2, 2, 2, dtype=torch.bool)
    flags[1, 1, 0] = True
    token = torch.tensor([7.0, 8.0, 9.0])
    out = substitute_tokens(tokens, flags, token)
    assert out[1, :, 1, 0].tolist() == [7.0, 8.0, 9.0] and torch.equal(out[0], tokens[0])
    recon, target = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    pixel_mask = torch.zeros(1, 8, 8)
    pixel_mask[0, :4, :4] = 1
    target[0, :, 4:, 4:] = 50.0  # outside the masked patch
    assert float(masked_l1(recon, target, pixel_mask)) == 0.0
    target[0, :, 0, 0] = 16.0
    assert float(masked_l1(recon, target, pixel_mask)) == pytest.approx(16.0 / 16)


def test_synthetic_occluders_have_exact_masks():
    image = np.full((64, 64, 3), 77, np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, mask = draw_occluder(image, rng)
        assert 0.02 < mask.mean() < 0.6
        assert (out[mask == 0] == 77).all()


def test_occlusion_head_flags_after_training_only_with_the_mask_token():
    model = create_model(VIT[0], num_classes=8, img_size=32, heads={"occlusion": {}}, **VIT[1])
    model.train()
    mask = torch.zeros(2, 32, 32)
    mask[:, :16, :16] = 1  # the top-left 2 x 2 patches of the 4 x 4 grid
    out = model(torch.randn(2, 3, 32, 32), occlusion_mask=mask)
    assert out["occlusion_masked"][:, :2, :2].all() and out["occlusion_masked"].sum() == 8  # teacher forcing
    assert out["reconstruction"].shape == (2, 3, 32, 32)
    model.eval()
    assert "reconstruction" not in model(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------------
# Training: each head on ViT and Swin


def _batch(tiny_synthfer: Path, *, heatmaps: bool, occlusion: bool) -> dict[str, torch.Tensor]:
    info = get_dataset("synthfer", tiny_synthfer)
    data = FaceDataset.from_info(
        info,
        "train",
        transform=create_transform(train=True, img_size=32, with_clean=occlusion),
        train=True,
        heatmaps="codebook" if heatmaps else None,
        occlusion_augment=1.0 if occlusion else 0.0,
        occlusion_masks=occlusion,
    )
    items = [data[i] for i in range(16)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@pytest.mark.parametrize("backbone", [VIT, SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("head", list_heads())
def test_each_head_trains_and_its_losses_decrease(tiny_synthfer, backbone, head):
    torch.manual_seed(0)
    name, kwargs = backbone
    options = {"anchors": {"warmup": 0.0, "dim": 16}}.get(head, {})
    model = create_model(name, num_classes=8, img_size=32, heads={head: options}, **kwargs)
    batch = _batch(tiny_synthfer, heatmaps=head == "au_heatmap", occlusion=head == "occlusion")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for step in range(12):
        model.set_progress(1.0 if step else 0.0)  # anchors: accumulate the means at step 0, then full trust
        clean = None
        if head == "occlusion":
            with torch.no_grad():
                clean = model(batch["clean_image"], reconstruct=False)
        outputs = model(batch["image"], occlusion_mask=batch.get("occlusion"))
        terms = model.losses(outputs, batch, clean)
        terms["ce"] = torch.nn.functional.cross_entropy(outputs.get("train_logits", outputs["logits"]), batch["label"])
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
        if head == "anchors":  # the centre term is confidence-weighted: the distance itself must shrink
            nearest = outputs["anchor_distances"][torch.arange(16), batch["label"]].amin(dim=1).mean()
            history[-1]["nearest_true_anchor"] = float(nearest.detach())
    decreasing = {
        "au_heatmap": ["au_align", "ce"],
        "anchors": ["nearest_true_anchor", "ce"],
        "occlusion": ["occ_detect", "occ_recon", "ce"],
    }
    assert head in decreasing, f"head {head!r} is registered: name the loss terms its training must lower"
    expected = decreasing[head]
    for term in expected:
        assert history[-1][term] < history[1][term], (term, [h[term] for h in history])


@pytest.mark.parametrize("backbone", [VIT, SWIN], ids=["vit", "swin"])
def test_all_heads_train_through_a_recipe_and_round_trip_a_checkpoint(tiny_synthfer, tmp_path, backbone):
    assert set(ALL_HEADS) == set(list_heads())  # every registered head, together
    name, kwargs = backbone
    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"tracking.enabled": False})
    recipe["model"] = {"backbone": name, "backbone_kwargs": kwargs, "heads": ALL_HEADS}
    result = fit(recipe_from_dict(recipe))
    row = result.summary[-1]
    for term in (
        "loss_ce",
        "loss_au_align",
        "loss_anchor_center",
        "loss_anchor_separation",
        "loss_occ_detect",
        "loss_occ_recon",
        "loss_occ_consistency",
    ):
        assert term in row and math.isfinite(row[term])
    heads = result.test_results["heads"]
    assert 0.0 <= heads["au_attention"]["att_cos"] <= 1.0 and heads["au_attention"]["n_maps"] > 0
    assert heads["occlusion_detection"]["patches"] > 0
    assert result.test_results["config"]["heads"]["anchors"]["test_correction"] is False
    report = (result.output_dir / "eval" / "report.md").read_text()
    assert "Head metrics: au_attention" in report and "att_cos" in report and "occlusion_detection" in report

    state = load_checkpoint(result.output_dir / "last.pt")
    restored = model_from_checkpoint(state).eval()
    assert set(restored.heads) == set(ALL_HEADS)
    assert bool(restored.heads["anchors"].initialised)
    x = torch.randn(2, 3, 32, 32)
    original = create_model(name, num_classes=8, img_size=32, heads=ALL_HEADS, **kwargs).eval()
    original.load_state_dict(state["model"])
    assert torch.allclose(restored(x)["logits"], original(x)["logits"])


def test_recipe_head_errors_name_the_key(tiny_synthfer, tmp_path):
    base = tiny_recipe_dict(tiny_synthfer, tmp_path)
    base["model"]["heads"] = {"anchor": {}}
    with pytest.raises(ConfigError, match="unknown head 'anchor'.*Did you mean 'anchors'"):
        recipe_from_dict(base)
    base["model"]["heads"] = {"occlusion": {"treshold": 0.3}}
    with pytest.raises(ConfigError, match=r"model.heads.occlusion: unknown option 'treshold'.*'threshold'"):
        recipe_from_dict(base)
    base["model"]["heads"] = {"au_heatmap": {"attention": "gradcam"}}
    recipe = recipe_from_dict(base)  # values are checked when the model is built
    with pytest.raises(ConfigError, match="model.heads.au_heatmap.attention"):
        fit(recipe)


def test_cli_bad_head_option_is_one_line_exit_2(tiny_synthfer, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from fer_bench.cli import app

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path)
    recipe["model"]["heads"] = {"occlusion": {"layer": 7}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "model.heads.occlusion.layer=7" in result.output and "Traceback" not in result.output


def test_arbex_mode_uses_batch_attention_and_class_weights():
    from fer_bench.models.heads import HeadContext

    head = AnchorHead(HeadContext("vit", 3, 8, 32, (8,), ((2, 2),)), mode="arbex")
    assert head.attention is not None and head.class_weighted and bool(head.initialised)
    head.set_class_weights(torch.tensor([10, 5, 1]))
    assert torch.allclose(head.class_weights, torch.tensor([16 / 30, 16 / 15, 16 / 3]))
    head.train()
    head.set_progress(0.5)
    out = head(torch.randn(6, 8), torch.randn(6, 3))
    assert torch.allclose(out["train_logits"].exp().sum(1), torch.ones(6), atol=1e-5)
    # the correction of sample 0 depends on the other samples of the batch (ARBEx's batch attention)
    a = head(torch.cat([torch.ones(1, 8), torch.zeros(5, 8)]), torch.zeros(6, 3))["train_logits"][0]
    b = head(torch.cat([torch.ones(1, 8), 5 * torch.ones(5, 8)]), torch.zeros(6, 3))["train_logits"][0]
    assert not torch.allclose(a, b)


def test_one_class_detector_flags_tokens_unlike_the_clean_ones():
    model = create_model(VIT[0], num_classes=8, img_size=32, heads={"occlusion": {"detector": "one_class"}}, **VIT[1])
    head = model.heads["occlusion"]
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert float(head.clean_seen) == 0 and not out["occlusion_flags"].any()  # never fitted: flags nothing
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(8, 3, 32, 32) * 0.1, reconstruct=False)  # clean images: statistics only
    assert math.isfinite(float(head.score_threshold)) and float(head.clean_seen) == 40
    model.eval()
    clean = torch.randn(4, 3, 32, 32) * 0.1
    occluded = clean.clone()
    occluded[:, :, :16, :16] = 8.0  # a bright block over the top-left 2 x 2 patches
    flags_clean = model(clean)["occlusion_flags"]
    flags_occluded = model(occluded)["occlusion_flags"]
    assert flags_occluded[:, :2, :2].float().mean() > 0.9
    assert flags_clean.float().mean() < 0.2


def test_occluder_augmentation_without_the_head_and_cli_eval_prints_head_metrics(tiny_synthfer, tmp_path):
    from typer.testing import CliRunner

    from fer_bench.cli import app

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"tracking.enabled": False, "optim.epochs": 1})
    recipe["data"]["augment"] = {"occluders": 1.0}
    recipe["model"]["heads"] = {"anchors": {"test_correction": True}}
    result = fit(recipe_from_dict(recipe))
    assert result.test_results["config"]["heads"]["anchors"]["test_correction"] is True
    report = (result.output_dir / "eval" / "report.md").read_text()
    assert "- head anchors: mode fer_bench" in report and "test_correction True" in report
    checkpoint = result.output_dir / "best.pt"
    args = f"eval --dataset synthfer --root {tiny_synthfer} --checkpoint {checkpoint} --bootstrap 0 --no-tracking"
    cli = CliRunner().invoke(app, args.split(), env={"COLUMNS": "200"})
    assert cli.exit_code == 0, cli.output
    # any model on SynthFER is probed against the rendered AU regions, by default as the head would attend
    assert "AU attention (channel_mean, layer 1): ATT-COS" in cli.output and "truth AU maps" in cli.output
    # a probe chosen by the caller is kept (to compare a plain model with a head trained on another attention)
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    info = get_dataset("synthfer", tiny_synthfer)
    names = tuple(info.label_space.names)
    scores = {}
    for probe in (None, ("token_norm", 0)):
        model.attention_probe = probe
        scored = evaluate(model, info, split="test", img_size=32, label_names=names, n_bootstrap=0)
        scores[probe] = scored["heads"]["au_attention"]
        assert model.attention_probe == probe  # restored after evaluation
    assert (scores[None]["attention"], scores[None]["layer"]) == ("channel_mean", 1)
    assert (scores[("token_norm", 0)]["attention"], scores[("token_norm", 0)]["layer"]) == ("token_norm", 0)
    assert scores[None]["att_cos"] != scores[("token_norm", 0)]["att_cos"]


def test_detached_confidence_cannot_be_lowered_to_hand_samples_to_the_anchors():
    p_logits = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    g = torch.tensor([[0.0, 1.0, 0.0]])  # the anchors say class 1; the (sure) classifier says class 0
    label = torch.tensor([1])
    grads = {}
    for detach in (True, False):
        p = torch.softmax(p_logits, dim=1)
        loss = torch.nn.functional.nll_loss(torch.log(corrected_distribution(p, g, detach_confidence=detach)), label)
        grads[detach] = torch.autograd.grad(loss, p_logits)[0]
    # Only through the confidence does flattening p (lowering logit 0 *and* raising logit 2, the wrong class) pay.
    assert grads[True][0, 2] > 0 and grads[False][0, 2] < 0
