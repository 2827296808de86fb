"""How `study run` shares a machine out: K runs at once, each with its GPUs (a DDP job when it has several) or its
share of the CPU threads. The launcher is run_study's injection point: here it records what would be started and
finishes the run the way `ferbench train` does (done.json), so no GPU is needed to check the plan."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml

from fer_bench.train.study import load_study, run_study
from tests.conftest import tiny_recipe_dict


def _study(tmp_path: Path, root: Path) -> Path:
    base = tiny_recipe_dict(root, tmp_path)
    base["tracking"]["enabled"] = False
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "name": "slots",
        "base": "base.yaml",
        "seeds": [0, 1],
        "arms": {"a": [], "b": ["optim.lr=0.002"]},
        "output_dir": str(tmp_path / "study"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _recorder(calls: list, running: list, peak: list):
    lock = threading.Lock()

    def launch(command: list[str], log: Path | None, env: dict[str, str]) -> int:
        with lock:
            running.append(1)
            peak.append(len(running))
        settings = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
        out = Path(next(s.split("=", 1)[1] for s in settings if s.startswith("output_dir=")))
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").write_text(json.dumps({"run_id": None, "evals": ["eval"], "best_step": 1}))
        with lock:
            calls.append((command, log, env))
            running.pop()
        return 0

    return launch


def test_gpus_are_shared_out_and_a_run_with_several_is_a_ddp_job(tmp_path, tiny_synthfer, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # the plan for a 4-GPU machine; nothing runs on them
    study = load_study(_study(tmp_path, tiny_synthfer))
    calls, running, peak = [], [], []
    outcomes = run_study(study, parallel=2, gpus=4, launch=_recorder(calls, running, peak), message=lambda m: None)
    assert [o.action for o in outcomes] == ["trained"] * 4
    assert sorted({env["CUDA_VISIBLE_DEVICES"] for _, _, env in calls}) == ["0,1", "2,3"] and max(peak) <= 2
    for command, log, _ in calls:
        assert command[command.index("--gpus") + 1] == "2"  # train --gpus 2: torchrun with 2 processes
        assert log is not None and log.name.endswith(".log")  # two at once: each writes its own log


def test_parallel_runs_on_a_cpu_split_the_threads(tmp_path, tiny_synthfer, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    study = load_study(_study(tmp_path, tiny_synthfer))
    calls, running, peak = [], [], []
    run_study(study, parallel=4, launch=_recorder(calls, running, peak), message=lambda m: None)
    assert len(calls) == 4
    for command, _, env in calls:
        assert "runtime.threads=2" in command and "--gpus" not in command and "CUDA_VISIBLE_DEVICES" not in env
    calls.clear()
    one = load_study(_study(tmp_path, tiny_synthfer), output_dir=str(tmp_path / "other"))
    run_study(one, launch=_recorder(calls, running, peak), message=lambda m: None)
    assert len(calls) == 4 and not any(a.startswith("runtime.threads") for c, _, _ in calls for a in c)
