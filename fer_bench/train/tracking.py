"""MLflow tracking: the only module that imports mlflow. An unreachable store is reported once and training goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


class Tracker:
    """A thin MLflow run wrapper. Every call is a no-op once tracking is off or has failed.

    Args:
        enabled: Track at all.
        tracking_uri: e.g. ``sqlite:///mlflow.db`` (relative to the working directory).
        experiment: Experiment name.
        run_name: Run name.
        warn: Callable for the one-line warning (default: logging).
    """

    def __init__(
        self, *, enabled: bool, tracking_uri: str, experiment: str, run_name: str | None = None, warn=None
    ) -> None:
        self.active = False
        self.run_id: str | None = None
        self._warn = warn or log.warning
        if not enabled:
            return
        try:
            os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
            import mlflow

            # mlflow sets its loggers to INFO on import; its table-creation chatter is not for the user.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            self.active = True
        except Exception as exc:  # an unreachable or broken store must not stop training
            self._fail(
                f"MLflow tracking at {tracking_uri!r} is unavailable ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); continuing without tracking"
            )

    def _fail(self, message: str) -> None:
        self.active = False
        self._warn(message)

    def _call(self, fn_name: str, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            getattr(self._mlflow, fn_name)(*args, **kwargs)
        except Exception as exc:
            self._fail(f"MLflow {fn_name} failed ({type(exc).__name__}: {str(exc)[:200]}); continuing without tracking")

    def log_params(self, params: dict[str, Any]) -> None:
        flat: dict[str, str] = {}
        _flatten("", params, flat)
        self._call("log_params", flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", str(path), artifact_path=artifact_path)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` was logged in this run (empty when tracking is off or failing)."""
        if not self.active:
            return set()
        try:
            history = self._mlflow.MlflowClient().get_metric_history(self.run_id, key)
        except Exception as exc:
            self._fail(f"MLflow metric history unavailable ({type(exc).__name__}); continuing without tracking")
            return set()
        return {int(m.step) for m in history}

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", status=status)
        self.active = False


def resume_tracker(*, tracking_uri: str, run_id: str, warn=None) -> Tracker:
    """Re-open an existing run (for eval after train, or ``--resume``)."""
    tracker = Tracker(enabled=False, tracking_uri=tracking_uri, experiment="", warn=warn)
    try:
        import mlflow

        tracker._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id)
        tracker.run_id = run_id
        tracker.active = True
    except Exception as exc:
        tracker._fail(
            f"MLflow run {run_id} at {tracking_uri!r} cannot be reopened ({type(exc).__name__}); "
            "continuing without tracking"
        )
    return tracker
