"""MLflow tracking: the only module that writes to MLflow. An unreachable store is reported once and training goes on.

Experiments are marked as model-training experiments, every run records the dataset splits it used as MLflow dataset
inputs (name, the evaluator's dataset hash, the manifest's columns; no image data), and the evaluation of a training
run is a child run of it. :func:`flat_metrics` names an evaluator result's figures for MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from fer_bench.eval.results import FAIRNESS_KEYS

log = logging.getLogger(__name__)

#: The experiment tag MLflow's UI reads for an experiment's kind, and the value it uses for model training
#: (mlflow 3.17's UI: ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"``, labelled "Machine
#: learning"; ``genai_development`` is the GenAI kind, whose experiments open on traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: MLflow stores a dataset digest in at most 36 characters; the evaluator's SHA-256 is cut to the 16 hex digits its
#: report prints (the whole hash is in the dataset's profile).
DIGEST_CHARS = 16


# A tracking server that does not answer must cost seconds, not MLflow's default 7 retries of 120 s.
HTTP_TIMEOUT_S = "5"
HTTP_RETRIES = "0"


def _mlflow_quietly():
    """mlflow, imported with bounded HTTP waits and without its INFO chatter or urllib3's retry warnings."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
    import mlflow

    # mlflow sets its loggers to INFO on import; its table-creation chatter and its logged tracebacks are not for
    # the user (a failure is reported once, in one line). --verbose (a DEBUG root logger) keeps them all.
    if logging.getLogger().level > logging.DEBUG:
        for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return mlflow


def unreachable(tracking_uri: str, timeout: float = 3.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (one phrase), or None (also for local stores).

    One TCP connection with a short timeout: answers in seconds where MLflow's own client would retry for minutes.
    """
    from urllib.parse import urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return None
    import socket

    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no server answers at {parsed.hostname}:{port}: {exc.strerror or type(exc).__name__}"


def _reason(exc: BaseException) -> str:
    """One phrase for a store failure, naming the cause MLflow buries (a read-only database, a locked one)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain).lower()
    for needle, phrase in (
        ("readonly", "the store is read-only"),
        ("read-only", "the store is read-only"),
        ("database is locked", "the sqlite store is locked by another process"),
        ("unable to open database", "the sqlite file cannot be opened (missing folder or permissions)"),
    ):
        if needle in text:
            return phrase
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def _quietly(fn, *args) -> None:
    """Call ``fn`` and log (at debug level) rather than raise: for extras that must not turn tracking off."""
    try:
        fn(*args)
    except Exception as exc:
        log.debug("MLflow %s failed: %s", getattr(fn, "__name__", fn), exc)


def _store_lock(tracking_uri: str):
    """An exclusive file lock beside a sqlite store while runs are created (else a no-op context)."""
    if not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    database = Path(tracking_uri.removeprefix("sqlite:///"))

    @contextlib.contextmanager
    def locked():
        lock_path = database.parent / f".{database.name}.lock"
        try:
            handle = open(lock_path, "a")  # noqa: SIM115  (held for the with-block below)
        except OSError:  # an unwritable folder: MLflow's own error will say so
            yield
            return
        with handle:
            try:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX)
            except ImportError:
                pass
            yield

    return locked()


def runs_page_url(experiment_id: str | None, *, host: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs table in MLflow's UI (``mlflow ui`` on its default port).

    MLflow 3.17's UI opens experiments by its sidebar switch "GenAI apps & agents" / "Machine learning" (kept in the
    browser, GenAI by default: an experiment then opens on its GenAI overview of traces), not by the experiment's
    ``mlflow.experimentKind`` tag; ``workflowType=machine_learning`` in the address selects the runs view.

    Example:
        >>> runs_page_url("3")
        'http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning'
    """
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{host.rstrip('/')}/#/{page}?workflowType=machine_learning"


def mark_model_training(mlflow, experiment_id: str) -> bool:
    """Tag an experiment as a model-training one unless it already says what it is; True when the tag was set.

    Idempotent: an experiment that carries ``mlflow.experimentKind`` (ours, or a kind its owner chose) is left as is.
    """
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG in client.get_experiment(experiment_id).tags:
        return False
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return True


def _column_type(series: pd.Series) -> str:
    """The MLflow schema type of a manifest column, from its dtype (and, for objects, its first value)."""
    import pandas as pd

    kind = series.dtype.kind
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    if kind == "f":
        return "double"
    if kind == "M":
        return "datetime"
    first = series.dropna().head(1).tolist()
    if first and not isinstance(first[0], str | bytes) and pd.api.types.is_list_like(first[0]):
        return "array"
    return "string"


@dataclass(frozen=True)
class SplitInput:
    """One dataset split a run used, as MLflow records it (see :func:`split_input`).

    Attributes:
        name: The dataset's name in MLflow: the protocol's name (``affectnet7``, ``synthfer``).
        context: ``train``, ``val`` or ``test``.
        dataset_hash: The evaluator's SHA-256 of the split's ordered (image_id, label) rows.
        rows: Number of rows.
        columns: Manifest column -> MLflow schema type (``long``, ``double``, ``boolean``, ``string``, ``array``).
        source: Where the data lives (the dataset's folder).
        split: The manifest split the rows come from.
    """

    name: str
    context: str
    dataset_hash: str
    rows: int
    columns: dict[str, str] = field(default_factory=dict)
    source: str = ""
    split: str = ""

    @property
    def digest(self) -> str:
        return self.dataset_hash[:DIGEST_CHARS]


def split_input(
    *, name: str, context: str, rows: pd.DataFrame, source: str | os.PathLike, dataset_hash: str | None = None
) -> SplitInput:
    """A :class:`SplitInput` for ``rows`` (a manifest slice): its hash (unless given) and its columns' types.

    The hash is :func:`fer_bench.data.dataset_hash` of (image_id, label), the one the evaluator writes to
    ``results.json``; one pass over the two columns, so cheap for 100k rows. No image is read.
    """
    if dataset_hash is None:
        from fer_bench.data.manifest import dataset_hash as hash_rows

        dataset_hash = hash_rows(rows["image_id"].astype(str).tolist(), rows["label"])
    split = str(rows["split"].iloc[0]) if "split" in rows.columns and len(rows) else context
    return SplitInput(
        name=name,
        context=context,
        dataset_hash=dataset_hash,
        rows=len(rows),
        columns={str(c): _column_type(rows[c]) for c in rows.columns},
        source=str(source),
        split=split,
    )


def _mlflow_dataset(mlflow, item: SplitInput):
    """A metadata-only MLflow dataset for ``item``: explicit schema, the digest, a profile with the full hash."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    class _SplitDataset(MetaDataset):
        def to_dict(self) -> dict[str, str]:
            config = super().to_dict()
            config["profile"] = json.dumps(
                {"num_rows": item.rows, "split": item.split, "dataset_hash": item.dataset_hash}
            )
            return config

    specs = [
        ColSpec(Array(DataType.double) if kind == "array" else DataType[kind], name=column)
        for column, kind in item.columns.items()
    ]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources that are the same
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(item.source or ".")
    return _SplitDataset(source, name=item.name, digest=item.digest, schema=Schema(specs) if specs else None)


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
        parent_run_id: An existing run of the store (made by any process, not active here) to nest this run under
            (tag ``mlflow.parentRunId``); one that does not exist (or was deleted) is reported and the run starts at
            the top level.
        tags: Tags the run is created with (values stringified).
    """

    def __init__(
        self,
        *,
        enabled: bool,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        warn=None,
        parent_run_id: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.active = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._warn = warn or log.warning
        if not enabled:
            return
        try:
            self._mlflow = _mlflow_quietly()
            problem = unreachable(tracking_uri)
            if problem:
                self._fail(
                    f"MLflow tracking at {tracking_uri!r} is unavailable ({problem}); continuing without tracking"
                )
                return
            with _store_lock(tracking_uri):  # a new sqlite store's schema migration is not safe to race
                self._mlflow.set_tracking_uri(tracking_uri)
                found = self._mlflow.set_experiment(experiment)
                _quietly(mark_model_training, self._mlflow, found.experiment_id)
                parent = self._parent(parent_run_id, found.experiment_id) if parent_run_id else None
                run = self._mlflow.start_run(
                    run_name=run_name, parent_run_id=parent, tags={k: str(v) for k, v in (tags or {}).items()}
                )
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            self.active = True
        except Exception as exc:  # an unreachable or broken store must not stop training
            self._fail(
                f"MLflow tracking at {tracking_uri!r} is unavailable ({_reason(exc)}); continuing without tracking"
            )

    def _parent(self, run_id: str, experiment_id: str) -> str | None:
        """``run_id`` when that run exists (and is not deleted) in the store, else None with one message; a parent in
        another experiment is kept, with a note that MLflow's UI nests runs only within one experiment."""
        from mlflow.exceptions import MlflowException

        try:
            parent = self._mlflow.MlflowClient().get_run(run_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            self._warn(f"tracking.parent_run_id {run_id}: no such run in this store; the run is not nested under it")
            return None
        if parent.info.lifecycle_stage == "deleted":
            self._warn(f"tracking.parent_run_id {run_id}: that run was deleted; the run is not nested under it")
            return None
        if parent.info.experiment_id != experiment_id:
            self._warn(
                f"tracking.parent_run_id {run_id}: the parent is in experiment {parent.info.experiment_id}, this run "
                f"in {experiment_id}; MLflow's UI shows the nesting only within one experiment"
            )
        return run_id

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

    def log_inputs(self, inputs: Sequence[SplitInput]) -> None:
        """Record dataset splits as the run's MLflow dataset inputs (the runs table's Dataset column), one batch."""
        if not self.active or not inputs:
            return
        try:
            self._mlflow.log_inputs(
                [_mlflow_dataset(self._mlflow, item) for item in inputs],
                contexts=[item.context for item in inputs],
                tags_list=[None] * len(inputs),
            )
        except Exception as exc:  # the run goes on with its other records; a store that is down fails them too
            self._warn(f"MLflow dataset inputs not recorded ({type(exc).__name__}: {str(exc)[:200]})")

    @contextlib.contextmanager
    def child(self, *, run_name: str, tags: dict[str, Any]) -> Iterator[Tracker]:
        """A nested run under this one (``mlflow.parentRunId``), ended when the block ends; this run is the active
        one again afterwards. Inactive (every call a no-op) when this run is."""
        child = Tracker(enabled=False, tracking_uri="", experiment="", warn=self._warn)
        if self.active:
            try:
                run = self._mlflow.start_run(
                    experiment_id=self.experiment_id,
                    run_name=run_name,
                    nested=True,
                    parent_run_id=self.run_id,
                    tags={k: str(v) for k, v in tags.items()},
                )
                child._mlflow, child.active = self._mlflow, True
                child.run_id, child.experiment_id = run.info.run_id, run.info.experiment_id
            except Exception as exc:
                self._fail(f"MLflow child run failed ({_reason(exc)}); continuing without tracking")
        status = "FAILED"
        try:
            yield child
            status = "FINISHED"
        finally:
            if child.run_id is not None:
                child.active = False
                with contextlib.suppress(Exception):
                    active = self._mlflow.active_run()
                    if active is not None and active.info.run_id == child.run_id:
                        self._mlflow.end_run(status=status)

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
        mlflow = _mlflow_quietly()
        tracker._mlflow = mlflow
        problem = unreachable(tracking_uri)
        if problem:
            tracker._fail(f"MLflow run {run_id} at {tracking_uri!r} cannot be reopened ({problem}); continuing without")
            return tracker
        mlflow.set_tracking_uri(tracking_uri)
        run = mlflow.start_run(run_id=run_id)
        tracker.run_id, tracker.experiment_id = run_id, run.info.experiment_id
        tracker.active = True
        _quietly(mark_model_training, mlflow, run.info.experiment_id)
    except Exception as exc:
        tracker._fail(
            f"MLflow run {run_id} at {tracking_uri!r} cannot be reopened ({type(exc).__name__}); "
            "continuing without tracking"
        )
    return tracker


# ---------------------------------------------------------------------------------------------------------------------
# MLflow names


_METRIC_NAME = re.compile(r"[^\w\-. :/]")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def flat_metrics(results: dict[str, Any], prefix: str | None = None) -> dict[str, float]:
    """Flat MLflow metric names: ``test/acc``, ``test/acc_ci_low``, ``test/group/race:asian/acc``,
    ``test/fair/race/eq_opp_gap`` (plug-in) with ``_corrected``, ``_ci_low``/``_ci_high``, ``_chance`` (median gap
    under permutation) and ``_chance_p`` beside it (MLflow allows no ``=`` in names, so ``:`` joins column and
    value)."""
    prefix = prefix or results.get("split", "test")
    out: dict[str, float] = {}
    for key, value in results["metrics"].items():
        out[f"{prefix}/{key}"] = value
    for key, (low, high) in (results.get("ci") or {}).items():
        out[f"{prefix}/{key}_ci_low"], out[f"{prefix}/{key}_ci_high"] = low, high
    for column, table in results.get("groups", {}).items():
        for value, row in table.items():
            out[f"{prefix}/group/{column}:{value}/acc"] = row["acc"]
    for column, gaps in results.get("fairness", {}).items():
        for key in FAIRNESS_KEYS:
            gap, name = gaps[key], f"{prefix}/fair/{column}/{key}"
            out[name] = gap["value"]
            if gap.get("corrected") is not None:
                out[f"{name}_corrected"] = gap["corrected"]
            if gap.get("ci"):
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = gap["ci"]
            if gap.get("chance"):
                out[f"{name}_chance"], out[f"{name}_chance_p"] = gap["chance"]["median"], gap["chance"]["p_value"]
    for name, values in (results.get("heads") or {}).items():
        for key, value in values.items():
            out[f"{prefix}/heads/{name}/{key}"] = value
    for key, value in (results.get("robustness") or {}).get("drop", {}).items():
        out[f"{prefix}/robustness/{key}_drop"] = value
    return {_METRIC_NAME.sub("_", k): float(v) for k, v in out.items() if _finite(v)}
