"""MLflow stores that fail: an unreachable server costs seconds and one line; two trainings creating one new sqlite
store at once both keep their runs (issue 12, "Reliability findings")."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from fer_bench.train.tracking import Tracker, unreachable


def _closed_port() -> int:
    with socket.socket() as s:  # bind then close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_costs_seconds_and_one_line():
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert "no server answers at 127.0.0.1" in unreachable(uri)
    assert unreachable("sqlite:///x.db") is None
    warnings: list[str] = []
    started = time.perf_counter()
    tracker = Tracker(enabled=True, tracking_uri=uri, experiment="e", run_name="r", warn=warnings.append)
    assert time.perf_counter() - started < 10
    assert not tracker.active and len(warnings) == 1 and "continuing without tracking" in warnings[0]
    tracker.log_metrics({"a": 1.0})  # a no-op, not an error


def test_two_processes_creating_one_sqlite_store_both_keep_their_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from fer_bench.train.tracking import Tracker; "
        f"t = Tracker(enabled=True, tracking_uri={uri!r}, experiment='race', run_name=sys.argv[1]); "
        "assert t.active, 'no run'; t.log_metrics({'x': 1.0}); t.end()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, f"run{k}"]) for k in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("race")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"x": 1.0} for r in runs)
