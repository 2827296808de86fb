"""Distributed training: two gloo processes on a CPU end with the validation figures of one process with the same
global batch; each rank takes a strided slice of one shared order; only rank 0 writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_bench.data.sampling import epoch_order, local_batch_size, rank_batch
from fer_bench.errors import ConfigError
from fer_bench.models.checkpoint import load_checkpoint
from tests.conftest import tiny_recipe_dict

REPO = Path(__file__).resolve().parents[1]


def test_ranks_take_disjoint_strided_slices_of_one_order():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    for sampler in ("random", "class_balanced"):
        order = epoch_order(100, seed=7, epoch=2, sampler=sampler, labels=labels)
        again = epoch_order(100, seed=7, epoch=2, sampler=sampler, labels=labels)  # what another rank computes
        assert (order == again).all()
        for step in range(100 // 24):
            parts = [rank_batch(order, step=step, global_batch=24, rank=r, world_size=3) for r in range(3)]
            assert [len(p) for p in parts] == [8, 8, 8]
            assert sorted(np.concatenate(parts).tolist()) == sorted(order[step * 24 : (step + 1) * 24].tolist())
    with pytest.raises(ConfigError, match="global batch"):
        local_batch_size(64, 3)


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def _run(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_two_gloo_processes_end_with_the_figures_of_one(tiny_synthfer, tmp_path):
    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 2, "optim.batch_size": 16})
    recipe["model"]["heads"] = {"au_heatmap": {}, "anchors": {"dim": 16, "warmup": 0.2}, "occlusion": {}}
    recipe["runtime"]["device"] = "cpu"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    train = ["-m", "fer_bench", "train", str(path)]
    one = tmp_path / "one"
    _run([sys.executable, *train, "--set", f"output_dir={one}"], env)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*launch, *train, "--set", f"output_dir={two}"], env)
    a, b = _summary(one), _summary(two)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert ra["val_acc"] == rb["val_acc"], (ra, rb)  # torchmetrics gathered the ranks' shares exactly
        for key in ("val_loss", "train_loss", "train_acc", "loss_au_align", "loss_occ_recon"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=2e-4, abs=1e-6), (key, ra, rb)
    state = load_checkpoint(two / "last.pt")
    assert state["world_size"] == 2 and state["global_step"] == 12
    resolved = yaml.safe_load((two / "recipe.resolved.yaml").read_text())["_resolved"]
    assert resolved["world_size"] == "2" and resolved["loader"] == "device"
    import mlflow

    mlflow.set_tracking_uri(recipe["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert (runs["tags.kind"] == "train").sum() == 2  # one per training, never one per rank
    assert not list(two.glob(".*.tmp"))

    # stopped inside the first epoch (runtime.max_steps), before the anchors start, then resumed: the epoch's sums
    # and the anchors' class means, gathered over both ranks when saved, are counted once
    stopped = tmp_path / "stopped"
    _run([*launch, *train, "--set", f"output_dir={stopped}", "--set", "runtime.max_steps=2"], env)
    position = load_checkpoint(stopped / "last.pt")["position"]
    assert position == {"epoch": 0, "step": 2}
    _run([*launch, *train, "--set", f"output_dir={stopped}", "--resume"], env)
    c = _summary(stopped)
    assert [r["epoch"] for r in c] == ["0", "1"]
    for rb, rc in zip(b, c, strict=True):
        assert rb["val_acc"] == rc["val_acc"], (rb, rc)
        for key in ("val_loss", "train_loss", "train_acc", "loss_anchor_center"):
            assert float(rb[key]) == pytest.approx(float(rc[key]), rel=1e-5, abs=1e-7), (key, rb, rc)
