"""Resume to the step: a training subprocess killed with SIGKILL at any moment, then ``--resume``, ends with the summary
rows and test metrics of an uninterrupted run, in the same MLflow run; the checkpoint set repairs itself; settings a
resume cannot honour are named; a finished run resumed logs nothing twice."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fer_bench.errors import CheckpointError
from fer_bench.models.checkpoint import load_checkpoint
from fer_bench.train import fit, recipe_from_dict, timing_free
from tests.conftest import Recorder, tiny_recipe_dict

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv") as f:
        return timing_free(list(csv.DictReader(f)))


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "eval" / "results.json").read_text())["metrics"]


def _train(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fer_bench", "train", str(recipe), "--set", f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV)


def _finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def _kill_when(proc: subprocess.Popen, out: Path, *, epoch: int, step: int) -> dict:
    """SIGKILL the run as soon as its last.pt is at or past (epoch, step); returns that checkpoint's position."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            position = load_checkpoint(out / "last.pt")["position"]
        except Exception:  # not written yet (or a half-read race on a slow disk): look again
            position = None
        if position and (position["epoch"], position["step"]) >= (epoch, step):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return position
        time.sleep(0.01)
    raise AssertionError(f"the run ended (rc {proc.poll()}) before reaching epoch {epoch} step {step}")


def test_kill_9_at_any_moment_then_resume_reproduces_the_uninterrupted_run(tiny_synthfer, tmp_path):
    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 3, "optim.batch_size": 8})
    recipe["runtime"]["checkpoint_every"] = 1  # a last.pt after every step: the kill can land anywhere
    recipe["model"]["drop_path_rate"] = 0.1  # randomness inside the step must replay too
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole = tmp_path / "whole"
    _finish(_train(path, whole))

    killed = tmp_path / "killed"
    proc = _train(path, killed)
    first = _kill_when(proc, killed, epoch=0, step=4)
    assert proc.returncode == -signal.SIGKILL and not (killed / "eval").exists()
    proc = _train(path, killed, "--resume")
    second = _kill_when(proc, killed, epoch=1, step=7)  # killed again, further on
    assert (second["epoch"], second["step"]) > (first["epoch"], first["step"])
    log = _finish(_train(path, killed, "--resume"))
    assert "resumed from" in log

    assert _summary(killed) == _summary(whole)  # the same rows, to the last digit
    assert _metrics(killed) == _metrics(whole)
    assert not list(killed.glob(".*.tmp"))
    import mlflow

    mlflow.set_tracking_uri(recipe["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert (runs["tags.kind"] == "train").sum() == 2  # the killed run was continued, not duplicated
    assert (runs["tags.kind"] == "eval").sum() == 2  # and evaluated once
    run_id = load_checkpoint(killed / "last.pt")["mlflow_run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_acc")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def _fit(recipe: dict, *, resume: bool = False):
    recorder = Recorder()
    said = recorder.messages

    return fit(recipe_from_dict(recipe), resume=resume, callbacks=recorder), said


def test_stale_best_checkpoint_is_repaired_and_finished_runs_log_once(tiny_synthfer, tmp_path):
    base = tiny_recipe_dict(tiny_synthfer, tmp_path / "a", **{"optim.epochs": 3, "optim.lr": 3e-3})
    whole, _ = _fit(base)
    rows = whole.summary
    steps = 6  # 96 images / 16
    best_so_far, improved = -1.0, []
    for r in rows:
        improved.append(r["val_acc"] > best_so_far)
        best_so_far = max(best_so_far, r["val_acc"])
    epoch = next((e for e in (1, 2) if improved[e]), 0)

    run = {**tiny_recipe_dict(tiny_synthfer, tmp_path / "b", **{"optim.epochs": 3, "optim.lr": 3e-3})}
    folder = Path(run["output_dir"])
    stale = None
    if epoch:
        _fit({**run, "runtime": {**run["runtime"], "max_steps": epoch * steps}})
        stale = (folder / "best.pt").read_bytes()
    _fit({**run, "runtime": {**run["runtime"], "max_steps": (epoch + 1) * steps}}, resume=bool(epoch))
    # the state a kill between writing last.pt and best.pt leaves: last.pt names this epoch best, best.pt is older
    if stale is None:
        (folder / "best.pt").unlink()
    else:
        (folder / "best.pt").write_bytes(stale)
    (folder / ".last.pt.k3j2h1.tmp").write_bytes(b"half a checkpoint")
    changed = {**run, "optim": {**run["optim"], "lr": 0.5}, "data": {**run["data"], "img_size": 48}}
    resumed, said = _fit(changed, resume=True)
    assert any("best.pt rewritten from it" in m for m in said), said
    assert any("removed .last.pt.k3j2h1.tmp" in m for m in said), said
    ignored = [m for m in said if "is ignored" in m]
    assert any("optim.lr=0.5" in m for m in ignored) and any("data.img_size=48" in m for m in ignored), said
    assert timing_free(resumed.summary) == timing_free(whole.summary)
    assert resumed.test_results["metrics"] == whole.test_results["metrics"]

    import mlflow

    mlflow.set_tracking_uri(run["tracking"]["tracking_uri"])
    client = mlflow.MlflowClient()
    before = client.get_metric_history(resumed.run_id, "test/acc")
    again, said = _fit(run, resume=True)  # a finished run: nothing to train, nothing logged twice
    assert again.epochs_run == 0 and any("evaluated already" in m for m in said)
    after = client.get_metric_history(resumed.run_id, "test/acc")
    assert len(after) == len(before) and again.run_id == resumed.run_id
    assert after[-1].value == resumed.test_results["metrics"]["acc"]
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "val_acc")) == [0, 1, 2]


def test_a_best_checkpoint_that_cannot_be_restored_is_refused(tiny_synthfer, tmp_path):
    run = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 3})
    _fit({**run, "runtime": {**run["runtime"], "max_steps": 6}})
    folder = Path(run["output_dir"])
    state = load_checkpoint(folder / "last.pt")
    state["best"] = {**state["best"], "global_step": 3}  # a best step last.pt does not hold
    from fer_bench.models.checkpoint import save_checkpoint

    save_checkpoint(folder / "last.pt", state)
    with pytest.raises(CheckpointError, match="cannot restore them"):
        _fit(run, resume=True)


def test_resume_without_a_checkpoint_and_gpus_without_gpus_are_one_line_errors(tiny_synthfer, tmp_path):
    from typer.testing import CliRunner

    from fer_bench.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path)))
    result = CliRunner().invoke(app, ["train", str(path), "--resume"])
    assert result.exit_code == 2 and "last.pt" in result.output and "Traceback" not in result.output
    import torch

    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["train", str(path), "--gpus", "2"])
        assert result.exit_code == 2 and "--gpus 2" in result.output and "torchrun" in result.output
