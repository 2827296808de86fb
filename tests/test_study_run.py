"""Studies end to end on tiny SynthFER: run (real subprocesses, a real MLflow store), skip on rerun, a new run when a
setting changes, resume after kill -9, commands for a scheduler, and the report (also gathered from MLflow alone)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.train.study import load_study, read_done, run_study
from tests.conftest import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[1]


def _mlflow_runs(db: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["tests"], output_format="pandas")


def _study(
    tmp_path: Path, root: Path, *, seeds=(0, 1), arms=None, pairs=(("b", "a"),), extra: str = "", epochs: int = 1
) -> Path:
    base = tiny_recipe_dict(root, tmp_path, **{"optim.epochs": epochs})
    base["model"]["backbone_kwargs"]["depth"] = 1
    base["runtime"]["threads"] = 1
    base["data"]["cache"] = "off"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "name": "tiny",
        "base": "base.yaml",
        "seeds": list(seeds),
        "arms": arms or {"a": [], "b": ["optim.lr=0.003"]},
        "pairs": [list(pair) for pair in pairs],
        "output_dir": str(tmp_path / "study"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False) + extra)
    return path


def test_a_two_arm_two_seed_study_runs_skips_and_reports(tmp_path, tiny_synthfer):
    path = _study(tmp_path, tiny_synthfer, extra="perturbations: [blur]\n")
    runner = CliRunner()
    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 0, result.output
    assert "4 trained" in result.output
    study = load_study(path)
    for run in study.runs:
        done = read_done(run.out)
        assert done is not None and set(done["evals"]) >= {"eval", "eval-blur"}
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    parent = runs[runs["tags.kind"] == "study"]
    assert len(parent) == 1 and parent["status"].iloc[0] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert set(children["tags.kind"]) == {"train"}  # each run's evaluations are children of the run
    assert sorted(zip(children["tags.arm"], children["tags.seed"], strict=True)) == [
        ("a", "0"),
        ("a", "1"),
        ("b", "0"),
        ("b", "1"),
    ]
    assert set(children["tags.run_key"]) == {run.key for run in study.runs}

    # a second run finds every run finished by its key: nothing trains, no new MLflow run
    again = runner.invoke(app, ["study", "run", str(path)])
    assert again.exit_code == 0 and "4 skipped" in again.output and "trained" not in again.output.split("\n")[-3]
    assert len(_mlflow_runs(tmp_path / "mlflow.db")) == len(runs)

    report = runner.invoke(app, ["study", "report", str(path), "--bootstrap", "200"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "study" / "report.md").read_text()
    assert "| b | a | test | acc |" in text and "no verdict (fewer than 3 seeds)" in text  # 2 seeds: no verdict
    assert "## Arms on `blur`" in text and "runs found: 4 of 4" in text
    table = pd.read_csv(tmp_path / "study" / "results.csv")
    assert len(table) == 8 and set(table["eval_set"]) == {"test", "blur"}
    accs = {
        (r.arm, r.seed): json.loads((study.run(r.arm, r.seed).out / "eval" / "results.json").read_text())["metrics"][
            "acc"
        ]
        for r in table[table["eval_set"] == "test"].itertuples()
    }
    assert all(
        abs(row.acc - accs[(row.arm, row.seed)]) < 1e-12 for row in table[table["eval_set"] == "test"].itertuples()
    )
    assert (tmp_path / "study" / "arms.png").stat().st_size > 1000 and (tmp_path / "study" / "pairs.png").exists()

    # changing a setting of one arm makes new runs of that arm only
    changed = path.read_text().replace("optim.lr=0.003", "optim.lr=0.002")
    path.write_text(changed)
    outcomes = run_study(load_study(path), message=lambda m: None)
    assert sorted((o.run.arm, o.action) for o in outcomes) == [
        ("a", "skipped"),
        ("a", "skipped"),
        ("b", "trained"),
        ("b", "trained"),
    ]

    # the report needs nothing but the MLflow store: with the run folders gone it gathers from there
    for run in load_study(path).runs:
        os.rename(run.out, run.out.with_name(run.out.name + ".moved"))
    report = runner.invoke(app, ["study", "report", str(path), "--bootstrap", "200"])
    assert report.exit_code == 0, report.output
    assert "MLflow run" in (tmp_path / "study" / "report.md").read_text()


def test_a_killed_study_resumes_its_interrupted_run(tmp_path, tiny_synthfer):
    path = _study(
        tmp_path,
        tiny_synthfer,
        seeds=(0,),
        arms={"a": ["runtime.checkpoint_every=2"]},
        pairs=(),
        epochs=40,
    )
    study = load_study(path)
    run = study.runs[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer_bench", "study", "run", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (run.out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study runner and its training run, mid-run
    proc.wait()
    assert (run.out / "last.pt").exists() and read_done(run.out) is None
    outcomes = run_study(load_study(path), message=lambda m: None)
    assert [o.action for o in outcomes] == ["resumed"]
    assert read_done(run.out) is not None
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    trained = runs[(runs["tags.arm"] == "a") & (runs["tags.kind"] == "train")]
    assert len(trained) == 1 and trained["status"].iloc[0] == "FINISHED"  # the same MLflow run, continued


def test_commands_print_one_self_contained_line_per_pending_run(tmp_path, tiny_synthfer):
    path = _study(tmp_path, tiny_synthfer)
    runner = CliRunner()
    result = runner.invoke(app, ["study", "commands", str(path)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 4 and all(" && ferbench train " in line for line in lines)
    # a scheduler runs one of them (here with this interpreter in place of the ferbench script)
    line = lines[0].replace(" && ferbench ", f" && {shlex.quote(sys.executable)} -m fer_bench ")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", "-c", line], check=True, env=env, capture_output=True)
    after = runner.invoke(app, ["study", "commands", str(path)])
    assert len([line for line in after.stdout.splitlines() if line.strip()]) == 3
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    parent = runs[runs["tags.kind"] == "study"]["run_id"]
    assert len(parent) == 1 and (runs["tags.mlflow.parentRunId"] == parent.iloc[0]).sum() == 1


def test_study_cli_errors_are_one_line(tmp_path, tiny_synthfer):
    path = _study(tmp_path, tiny_synthfer)
    runner = CliRunner()
    bad = runner.invoke(app, ["study", "run", str(path), "--only", "c"])
    assert bad.exit_code == 2 and "no arm 'c'" in bad.output
    missing = runner.invoke(app, ["study", "report", str(path)])
    assert missing.exit_code == 2 and "no finished run" in missing.output and "Traceback" not in missing.output
    typo = tmp_path / "typo.yaml"
    typo.write_text(path.read_text().replace("seeds:", "seedz:"))
    result = runner.invoke(app, ["study", "commands", str(typo)])
    assert result.exit_code == 2 and "seedz: unknown key. Did you mean 'seeds'?" in result.output


def test_a_failing_run_names_its_log_the_others_go_on_and_a_rerun_retries_it(tmp_path, tiny_synthfer):
    """With no tracking server answering: the study still trains (without a parent run), prints its commands and
    reports from the run folders; a run that fails in training is named with its log, and retried by a rerun."""
    missing = tmp_path / "missing.pt"
    path = _study(
        tmp_path, tiny_synthfer, seeds=(0,), arms={"a": [], "c": [f"model.pretrained={missing}"]}, pairs=(("c", "a"),)
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["tracking"]["tracking_uri"] = "http://127.0.0.1:9"  # nothing listens there
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    runner = CliRunner()
    (tmp_path / "afile").write_text("")
    unwritable = runner.invoke(app, ["study", "run", str(path), "--out", str(tmp_path / "afile" / "study")])
    assert unwritable.exit_code == 2 and "the study's runs cannot be written there" in unwritable.output
    assert "Traceback" not in unwritable.output

    started = time.monotonic()
    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 1, result.output
    study = load_study(path)
    log = study.run("c", 0).out.parent / f"{study.run('c', 0).out.name}.log"
    assert "c/seed0: failed (exit status 2) after" in result.output and f"; see {log}" in result.output
    assert "model.pretrained" in log.read_text()  # the run's own error, kept in its log
    assert "no parent study run (ConnectionError: no server answers at 127.0.0.1:9" in result.output
    assert read_done(study.run("a", 0).out) is not None and "1 trained, 1 failed" in result.output
    assert "Traceback" not in result.output and time.monotonic() - started < 300  # no minutes of MLflow retries

    again = runner.invoke(app, ["study", "run", str(path)])
    assert again.exit_code == 1 and "1 skipped, 1 failed" in again.output and "c/seed0: training in" in again.output
    commands = runner.invoke(app, ["study", "commands", str(path)])
    assert commands.exit_code == 0, commands.output
    lines = [line for line in commands.stdout.splitlines() if " && ferbench train " in line]
    assert len(lines) == 1 and "tracking.run_name=tiny-c-seed0" in lines[0]
    report = runner.invoke(app, ["study", "report", str(path), "--bootstrap", "100"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "study" / "report.md").read_text()
    assert "runs found: 1 of 2 (missing: c/seed0)" in text and "| c | a | test | acc | — |" in text


def test_two_study_processes_at_once_train_each_run_once(tmp_path, tiny_synthfer):
    path = _study(tmp_path, tiny_synthfer, seeds=(0,))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fer_bench", "study", "run", str(path)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    for label in ("a/seed0", "b/seed0"):
        assert both.count(f"{label}: training in") == 1, both  # each run trained by one of them
    assert "another process is training it now" in both
    assert "Traceback" not in both and "CREATE TABLE" not in both  # MLflow's store set up by one process at a time
    assert [o.action for o in run_study(load_study(path), message=lambda m: None)] == ["skipped", "skipped"]


def test_a_run_finished_or_taken_by_another_process_meanwhile_is_left_to_it(tmp_path, tiny_synthfer):
    """Between the states said at the start and a run's turn, another process may finish a run (not trained again)
    or start one (left to it; the parent study run is not closed while it trains)."""
    import fcntl
    import json as json_module

    from fer_bench.train.study import _lock_path

    path = _study(tmp_path, tiny_synthfer, seeds=(0,), arms={"a": [], "b": ["optim.lr=0.003"], "c": ["optim.lr=0.01"]})
    study = load_study(path)
    launched: list[str] = []
    held = []

    def finish(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").write_text(json_module.dumps({"run_id": None, "evals": ["eval"]}))

    def launch(command: list[str], log: Path | None, env: dict[str, str]) -> int:
        out = Path(next(a.split("=", 1)[1] for a in command if a.startswith("output_dir=")))
        launched.append(out.name)
        finish(out)  # this run trains
        finish(study.run("b", 0).out)  # meanwhile another process finishes b ...
        handle = open(_lock_path(study.run("c", 0).out), "a")  # noqa: SIM115  ... and starts c
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(handle)
        return 0

    messages: list[str] = []
    outcomes = run_study(study, launch=launch, message=messages.append)
    for handle in held:
        handle.close()
    assert [(o.run.arm, o.action) for o in outcomes] == [("a", "trained"), ("b", "skipped"), ("c", "busy")]
    assert launched == [study.run("a", 0).out.name]
    assert "b/seed0: finished by another process meanwhile; skipped" in messages
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert runs[runs["tags.kind"] == "study"]["status"].tolist() == ["RUNNING"]  # c is not finished yet


# ---------------------------------------------------------------------------------------------------------------------
# The report's statistics on injected predictions: a known effect is found, a null one flagged at most α of the time


def _injected_study(tmp_path: Path, root: Path, seeds: int):
    path = _study(tmp_path, root, seeds=tuple(range(seeds)))
    return load_study(path)


def _scored(y_true, y_pred, ids):
    from fer_bench.train.study_report import Scored

    k = 7
    cm = np.zeros((k, k))
    np.add.at(cm, (y_true, y_pred), 1)
    acc = float((y_true == y_pred).mean())
    results = {
        "metrics": {"acc": acc, "mean_class_acc": acc, "macro_f1": acc},
        "label_space": {"names": [str(i) for i in range(k)]},
        "fairness": {},
        "n": len(y_true),
    }
    return Scored(results, pd.DataFrame({"image_id": ids, "y_true": y_true, "y_pred": y_pred}))


def test_injected_predictions_detect_an_effect_and_keep_the_false_positive_rate(tmp_path, tiny_synthfer):
    from fer_bench.train.study import TEST_SET
    from fer_bench.train.study_report import Gathered, analyse

    study = _injected_study(tmp_path, tiny_synthfer, seeds=3)
    rng = np.random.default_rng(0)
    n = 2000
    ids = np.array([f"img{i}" for i in range(n)])
    y = rng.integers(0, 7, n)

    def verdicts(effect: float, repetitions: int) -> list[str]:
        out = []
        for _ in range(repetitions):
            difficulty = rng.normal(0, 1.5, n)  # shared by both arms: the test-set source
            gathered = Gathered()
            for arm, shift in (("a", 0.0), ("b", effect)):
                for seed in range(3):
                    logit = 0.8 + difficulty + shift + rng.normal(0, 0.05)  # + the seed's own draw
                    right = rng.random(n) < 1 / (1 + np.exp(-(logit + rng.normal(0, 0.6, n))))
                    pred = np.where(right, y, (y + 1 + rng.integers(0, 6, n)) % 7)
                    gathered.scored[(arm, seed)] = {TEST_SET: _scored(y, pred, ids)}
                    gathered.source[(arm, seed)] = "injected"
            analysis = analyse(study, gathered, n_resamples=20)
            out.append(analysis["pairs"][0]["verdict"])
        return out

    null = verdicts(0.0, 500)
    rate = sum(v != "no detectable difference" for v in null) / len(null)
    assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / len(null))
    found = verdicts(0.3, 20)
    assert sum(v == "b better" for v in found) >= 16
