"""Training: the loss goes down, resume reproduces an uninterrupted run, checkpoints are safe, MLflow is optional."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from fer_bench.errors import CheckpointError, ConfigError
from fer_bench.models.checkpoint import load_checkpoint
from fer_bench.train import fit, recipe_from_dict
from tests.conftest import Recorder, tiny_recipe_dict


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_short_training_lowers_the_loss_and_writes_everything(tiny_synthfer, tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 5, "optim.lr": 2e-3, "optim.batch_size": 8})
    )
    result = fit(recipe)
    rows = _summary(result.output_dir / "summary.csv")
    assert len(rows) == 5
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.05, losses
    for name in (
        "last.pt",
        "best.pt",
        "recipe.resolved.yaml",
        "eval/results.json",
        "eval/report.md",
        "eval/confusion_matrix.png",
    ):
        assert (result.output_dir / name).is_file(), name
    state = load_checkpoint(result.output_dir / "last.pt")
    assert state["epoch"] == 4 and state["label_names"][0] == "neutral"
    assert result.test_results["n"] == 48
    resolved = (result.output_dir / "recipe.resolved.yaml").read_text()
    assert "git_sha" in resolved and "torch" in resolved

    import mlflow

    mlflow.set_tracking_uri(recipe.tracking.tracking_uri)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["optim.lr"] == "0.002"
    assert "val_acc" in run.data.metrics and "test/acc" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train_loss")
    assert len(history) == 5
    # the test report lives on the evaluation's own run, a child of the training run
    (child,) = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'", output_format="list", experiment_names=["tests"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "eval")}
    assert "eval/report.md" in artifacts


def test_resume_matches_an_uninterrupted_run(tiny_synthfer, tmp_path):
    full = fit(recipe_from_dict(tiny_recipe_dict(tiny_synthfer, tmp_path / "a", **{"optim.epochs": 3})))
    base = tiny_recipe_dict(tiny_synthfer, tmp_path / "b", **{"optim.epochs": 3})
    # Interrupt after epoch 2 by running a 2-epoch-long prefix of the same schedule: stop early via max_minutes=0+.
    part = recipe_from_dict({**base, "runtime": {**base["runtime"], "max_minutes": 1e-9}})
    first = fit(part)
    assert first.epochs_run == 1
    resumed = fit(recipe_from_dict(base), resume=True)
    assert resumed.epochs_run == 2
    a, b = _summary(full.output_dir / "summary.csv"), _summary(resumed.output_dir / "summary.csv")
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-7), (key, ra, rb)
    wa = load_checkpoint(full.output_dir / "last.pt")["model"]
    wb = load_checkpoint(resumed.output_dir / "last.pt")["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_existing_run_is_not_overwritten(tiny_synthfer, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1}))
    fit(recipe)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        fit(recipe)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


class _Payload:
    """Unpickling this creates the folder ``marker``: a visible stand-in for code a malicious checkpoint would run,
    through ``os.mkdir`` (a module torch's weights-only unpickler blocks) or ``exec`` (a builtin it does not allow)."""

    def __init__(self, marker: Path, via: str) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os":
            return (os.mkdir, (str(self.marker),))
        return (exec, (f"import os; os.mkdir({str(self.marker)!r})",))


@pytest.mark.parametrize("via", ["os", "exec"])
def test_checkpoint_with_pickled_object_is_refused(tmp_path, via):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "payload_ran"
    torch.save({"model": {}, "recipe": {}, "payload": _Payload(marker, via)}, path)
    with pytest.raises(CheckpointError, match="refused — it holds objects that only a full unpickle could load"):
        load_checkpoint(path)
    assert not marker.exists()  # refused without running the payload
    # the payload is live: plain unpickling runs it, which is what load_checkpoint must never do
    pickle.loads(pickle.dumps(_Payload(marker, via)))
    assert marker.is_dir()


def test_unreadable_or_foreign_checkpoints_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "bare.pt").write_bytes(b"\x80\x04garbage")  # a bare pickle header: torch would warn, then fail
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="bare.pt: not a readable checkpoint"):
            load_checkpoint(tmp_path / "bare.pt")
    assert [str(w.message) for w in seen] == []  # the error is the one line the user sees
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fer_bench checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_unreachable_tracking_store_does_not_stop_training(tiny_synthfer, tmp_path):
    recorder = Recorder()
    messages = recorder.messages

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})
    (tmp_path / "afile").write_text("x")
    recipe["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/afile/mlflow.db"
    result = fit(recipe_from_dict(recipe), callbacks=recorder)
    assert (result.output_dir / "best.pt").is_file()
    warnings = [m for m in messages if "MLflow" in m]
    assert len(warnings) == 1 and "continuing without tracking" in warnings[0]


def test_compiled_training_keeps_plain_checkpoint_keys_and_reports_compile_time(tiny_synthfer, tmp_path):
    from fer_bench.models.checkpoint import model_from_checkpoint

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})
    recipe["runtime"] |= {"compile": True, "compile_backend": "eager"}  # eager: tracing without code generation
    recorder = Recorder()
    messages = recorder.messages

    result = fit(recipe_from_dict(recipe), callbacks=recorder)
    state = load_checkpoint(result.output_dir / "best.pt")
    assert not any("_orig_mod" in key for key in state["model"])  # compiled in place: the keys of the module
    model_from_checkpoint(state)  # loads strictly into an uncompiled model
    assert any("runtime.compile: the first step took" in m for m in messages)
    # compiling for a CPU drops torch's "No CUDA runtime is found" line (an nvcc on the PATH, no GPU), nothing else
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    cpp_extension.addHandler(handler)
    try:
        cpp_extension.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        cpp_extension.warning("Error checking compiler version for %s", "c++")
    finally:
        cpp_extension.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Error checking compiler version for c++"]
    import mlflow

    mlflow.set_tracking_uri(recipe["tracking"]["tracking_uri"])
    assert "compile_seconds" in mlflow.get_run(result.run_id).data.metrics


def test_ema_weights_are_validated_and_kept_in_best(tiny_synthfer, tmp_path):
    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 2, "optim.ema_decay": 0.9})
    result = fit(recipe_from_dict(recipe))
    last = load_checkpoint(result.output_dir / "last.pt")
    best = load_checkpoint(result.output_dir / "best.pt")
    assert last["ema"] is not None
    name = "backbone.head.weight"
    assert not torch.equal(last["ema"][name], last["model"][name])  # the average lags the weights
    if best["global_step"] == last["global_step"]:
        assert torch.equal(best["model"][name], last["ema"][name])  # best.pt holds what was validated


@pytest.mark.parametrize(
    ("cache", "loader"), [("auto", "albumentations"), ("off", "albumentations"), ("auto", "device")]
)
def test_the_recipe_chooses_the_loader_and_the_run_records_it(tiny_synthfer, tmp_path, cache, loader):
    import yaml

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})
    recipe["data"] |= {"cache": cache, "loader": loader}
    recipe["tracking"]["enabled"] = False
    result = fit(recipe_from_dict(recipe))
    resolved = yaml.safe_load((result.output_dir / "recipe.resolved.yaml").read_text())["_resolved"]
    assert resolved["loader"] == loader and (resolved["cache"] == "off") == (cache == "off")
    assert result.test_results["n"] == 48


def test_device_loader_without_a_cache_is_a_config_error(tiny_synthfer, tmp_path):
    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path)
    recipe["data"] |= {"cache": False, "loader": "device"}  # YAML's bare `off` arrives as False
    with pytest.raises(ConfigError, match="data.loader=device needs the prepared cache"):
        fit(recipe_from_dict(recipe))


def test_a_second_training_into_a_busy_folder_stops_and_a_failed_start_leaves_no_folder(tiny_synthfer, tmp_path):
    import fcntl
    import stat

    recipe = tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})
    busy = tmp_path / "run"
    busy.mkdir()
    with open(busy / ".run.lock", "a+") as held:  # what a training in progress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another training is writing there"):
            fit(recipe_from_dict(recipe))
    assert sorted(p.name for p in busy.iterdir()) == [".run.lock"]  # nothing written by the refused run
    result = fit(recipe_from_dict(recipe))  # the lock is free again
    from fer_bench._io import _umask

    for name in ("summary.csv", "last.pt", "eval/results.json"):  # atomic writes get the user's usual permissions
        mode = stat.S_IMODE((result.output_dir / name).stat().st_mode)
        assert mode == 0o666 & ~_umask(), (name, oct(mode))
    bad = tiny_recipe_dict(tiny_synthfer, tmp_path / "b", **{"optim.batch_size": 10_000})
    with pytest.raises(ConfigError, match="optim.batch_size"):
        fit(recipe_from_dict(bad))
    assert not (tmp_path / "b" / "run").exists()  # no empty run folder left behind
