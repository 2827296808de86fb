"""Study files (``studies/NAME.yaml``): many arms of one base recipe, each over several seeds, compared in pairs.

A study names a base recipe (a file or a shipped name), its arms as lists of ``--set`` overrides, the seeds, extra
evaluation sets (other datasets, test-time perturbations), the metric to compare and the pairs to test. It is
validated like a recipe: unknown keys with the nearest ones, and every arm × seed resolved into a full recipe up front,
so a bad override fails before anything trains.

Each run is one ``ferbench train BASE --set ...`` command (:func:`train_command`), the same whether ``ferbench study
run`` starts it on this machine or a scheduler starts what ``ferbench study commands`` prints. A run is identified by
the hash of its resolved recipe (:func:`run_key`): a finished run is found again by that key (its folder's
``done.json``, or a finished MLflow run tagged with it), an interrupted one is continued with ``--resume``, and
changing any setting makes a new run in a new folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from fer_bench.errors import ConfigError
from fer_bench.registry import did_you_mean
from fer_bench.train.fit import read_done
from fer_bench.train.recipe import Recipe, format_errors, load_recipe, read_yaml_mapping, resolve_recipe

#: Metrics a study can compare. acc, mean_class_acc and macro_f1 come from each run's confusion matrix; att_cos is
#: the per-image cosine between the model's attention and the AU regions (SynthFER, ``au_heatmap`` probe).
STUDY_METRICS: tuple[str, ...] = ("acc", "mean_class_acc", "macro_f1", "att_cos")
#: The evaluation set every run has: the test split of its own training dataset.
TEST_SET = "test"
#: Recipe keys left out of a run's identity: names, where it writes and logs, what else it is scored on, and
#: settings that change how fast it runs but not what it learns.
IDENTITY_FREE: tuple[str, ...] = (
    "name",
    "output_dir",
    "tracking",
    "extra_evals",
    "eval_after",
    "runtime.device",
    "runtime.threads",
    "runtime.workers",
    "runtime.log_every",
    "runtime.checkpoint_every",
)
#: Recipe keys the study sets for every run, which an arm's (or the pretraining run's) ``--set`` must not: the seed
#: comes from ``seeds``, the folder and MLflow names from the study, the extra evaluations from ``datasets`` and
#: ``perturbations``; where runs are tracked is the base recipe's, the same for every run (``study report`` reads them
#: from one store).
STUDY_OWNED: dict[str, str] = {
    "runtime.seed": "the study's seeds",
    "output_dir": "the study's output_dir",
    "extra_evals": "the study's datasets and perturbations",
    "tracking.run_name": "the study",
    "tracking.tags": "the study",
    "tracking.parent_run_id": "the study",
    "tracking.tracking_uri": "the base recipe (one store for every run)",
    "tracking.experiment": "the base recipe (one store for every run)",
    "tracking.enabled": "the base recipe (one store for every run)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairSpec(_Strict):
    """One tested pair: does arm ``a`` beat arm ``b`` on ``metric`` (default: the study's), scored on ``on``?"""

    a: str
    b: str
    metric: str | None = None
    on: str = TEST_SET  # "test", a datasets entry's name, or a perturbation

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        return None if value is None else _check_metric(value)


class EvalSetSpec(_Strict):
    """An extra evaluation set of every run: another protocol, or a copy of the data (SynthFER parameters)."""

    name: str | None = None  # default: the dataset name
    dataset: str
    root: str | None = None  # default: the run's data.root
    options: dict[str, Any] = {}
    synth: dict[str, Any] | None = None  # SynthFER parameters: generated at root when missing
    split: str = "test"


class PretrainSpec(_Strict):
    """A run trained once before the arms; its best checkpoint's backbone starts every arm (``model.pretrained``)."""

    recipe: str | None = None  # default: the base recipe
    set: list[str] = []
    seed: StrictInt = 0


class StudySpec(_Strict):
    """The contents of a study file."""

    name: str  # a folder name and an MLflow tag value: letters, digits, _ - . (not first)
    base: str  # recipe file (beside the study file or the working folder) or shipped recipe name
    arms: dict[str, list[str]] = Field(min_length=1)  # arm name -> --set overrides
    seeds: list[StrictInt] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)  # `true` is no seed
    metric: str = "acc"
    pairs: list[PairSpec] = []
    datasets: list[EvalSetSpec] = []  # extra evaluation sets of every run
    perturbations: list[str] = []  # the test split again under each (fer_bench.data.perturb.PERTURBATIONS)
    pretrain: PretrainSpec | None = None
    alpha: float = Field(0.05, gt=0, lt=1)
    output_dir: str = "runs/studies/{name}"

    @field_validator("name")
    @classmethod
    def _study_name(cls, value: str) -> str:
        if not value or value[0] == "." or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in value):
            raise ValueError(
                f"a study name is letters, digits, _ - and . (not first): it names a folder and MLflow tags; "
                f"got {value!r}"
            )
        return value

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for arm in value:
            if not arm or not all(c.isalnum() or c in "_-." for c in arm) or arm == "pretrain":
                raise ValueError(f"arm names are letters, digits, _ - . (and not 'pretrain'), got {arm!r}")
        return value

    @field_validator("pairs", mode="before")
    @classmethod
    def _pair_lists(cls, value: Any) -> Any:
        """``[A, B]`` is ``{a: A, b: B}``; YAML 1.1 reads a bare ``on:`` key as the boolean true."""
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, list | tuple) and len(item) == 2:
                item = {"a": item[0], "b": item[1]}
            elif isinstance(item, dict) and True in item:
                item = {("on" if key is True else key): v for key, v in item.items()}
            out.append(item)
        return out

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [{"dataset": item} if isinstance(item, str) else item for item in value]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return _check_metric(value)

    @field_validator("perturbations")
    @classmethod
    def _known_perturbations(cls, value: list[str]) -> list[str]:
        from fer_bench.data.perturb import PERTURBATIONS

        for kind in value:
            if kind not in PERTURBATIONS:
                raise ValueError(
                    f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}."
                    + did_you_mean(kind, PERTURBATIONS)
                )
        return value

    @model_validator(mode="after")
    def _eval_set_names(self) -> StudySpec:
        names = [TEST_SET] + [entry.name or entry.dataset for entry in self.datasets] + list(self.perturbations)
        for name in names:
            if not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"evaluation set names are letters, digits, _ and -, got {name!r}")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"two evaluation sets named {duplicated[0]!r}: give the datasets entries a name")
        return self

    def eval_sets(self) -> list[str]:
        """Every run's evaluation sets: ``test``, then the datasets entries, then the perturbations."""
        return [TEST_SET] + [entry.name or entry.dataset for entry in self.datasets] + list(self.perturbations)

    def pair_metric(self, pair: PairSpec) -> str:
        return pair.metric or self.metric


def _check_metric(value: str) -> str:
    if value not in STUDY_METRICS:
        raise ValueError(
            f"unknown metric {value!r}; expected one of {', '.join(STUDY_METRICS)}.{did_you_mean(value, STUDY_METRICS)}"
        )
    return value


def run_key(recipe: Recipe) -> str:
    """A run's identity: SHA-256 (16 hex digits) of its resolved recipe, keys sorted, without the keys of
    :data:`IDENTITY_FREE`: renaming an arm, moving the study's folder or adding an evaluation set does not retrain it.

    Example:
        >>> a = Recipe.model_validate({"name": "x"}); b = Recipe.model_validate({"name": "y"})
        >>> run_key(a) == run_key(b), run_key(a) == run_key(Recipe.model_validate({"name": "x", "optim": {"lr": 0.01}}))
        (True, False)
    """
    data = recipe.model_dump(mode="json")
    for key in IDENTITY_FREE:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of a study: an arm (or the pretraining run) at one seed, as ``ferbench train base --set ...``."""

    arm: str
    seed: int
    base: Path  # the recipe file the command starts from
    overrides: tuple[str, ...]  # every --set, output_dir included
    recipe: Recipe
    key: str

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def label(self) -> str:
        return self.arm if self.arm == "pretrain" else f"{self.arm}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
    """A validated study file: its spec, the folder its runs write to, and every run (the pretraining run first)."""

    spec: StudySpec
    path: Path
    out: Path
    runs: tuple[StudyRun, ...]

    @property
    def pretrain(self) -> StudyRun | None:
        return next((run for run in self.runs if run.arm == "pretrain"), None)

    @property
    def arm_runs(self) -> list[StudyRun]:
        return [run for run in self.runs if run.arm != "pretrain"]

    def run(self, arm: str, seed: int) -> StudyRun:
        return next(run for run in self.runs if (run.arm, run.seed) == (arm, seed))

    @property
    def tracking_uri(self) -> str:
        return self.runs[0].recipe.tracking.tracking_uri

    @property
    def experiment(self) -> str:
        return self.runs[0].recipe.tracking.experiment


def load_study(path: str | os.PathLike, *, output_dir: str | None = None) -> Study:
    """Read and validate a study file; every (arm, seed) is resolved into its recipe and run folder.

    Args:
        path: The study file.
        output_dir: Where the runs go (default: the study's ``output_dir``, ``runs/studies/{name}``).

    Raises:
        ConfigError: missing, empty or unreadable file, bad YAML, unknown keys (with the nearest), pairs naming no arm
            or no evaluation set, an arm's override that its recipe rejects (named with the arm).
    """
    path = Path(path)
    data = _read_study_file(path)
    missing = [key for key in ("name", "base", "arms") if key not in data]
    if missing and {"data", "model", "optim"} & set(data):
        raise ConfigError(
            f"{path}: a recipe, not a study (ferbench train runs it); a study names a recipe as base: and lists "
            "arms: (see studies/heads_synthfer_short.yaml)"
        )
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}; a study has name, base and arms")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path), StudySpec)) from None
    for arm, overrides in spec.arms.items():
        _check_owned(path, f"arms.{arm}", overrides)
    if spec.pretrain is not None:
        _check_owned(path, "pretrain.set", spec.pretrain.set)
    for pair in spec.pairs:
        for arm in (pair.a, pair.b):
            if arm not in spec.arms:
                raise ConfigError(f"{path}: pairs: no arm {arm!r}.{did_you_mean(arm, spec.arms)}")
        if pair.a == pair.b:
            raise ConfigError(f"{path}: pairs: ({pair.a}, {pair.b}) compares an arm with itself")
        if pair.on not in spec.eval_sets():
            raise ConfigError(
                f"{path}: pairs: ({pair.a}, {pair.b}) on {pair.on!r}: no such evaluation set; the study has "
                f"{', '.join(spec.eval_sets())}.{did_you_mean(pair.on, spec.eval_sets())}"
            )
    out = Path((output_dir or spec.output_dir).replace("{name}", spec.name))
    base = _recipe_file(spec.base, path, key="base")
    _check_base(path, base, key="base")
    extra = _extra_evals(spec)
    runs: list[StudyRun] = []
    shared: list[str] = []
    if spec.pretrain is not None:
        pre_base = _recipe_file(spec.pretrain.recipe, path, key="pretrain.recipe") if spec.pretrain.recipe else base
        if pre_base is not base:
            _check_base(path, pre_base, key="pretrain.recipe")
        pretrain = _resolve(
            path, "pretrain", spec.pretrain.seed, pre_base, [*spec.pretrain.set], out=out, study=spec.name, extra=""
        )
        runs.append(pretrain)
        shared = [f"model.pretrained={pretrain.out / 'best.pt'}"]
    for arm, overrides in spec.arms.items():
        for seed in spec.seeds:
            runs.append(_resolve(path, arm, seed, base, [*shared, *overrides], out=out, study=spec.name, extra=extra))
    _check_distinct_arms(path, runs)
    return Study(spec=spec, path=path, out=out, runs=tuple(runs))


def _read_study_file(path: Path) -> dict[str, Any]:
    """The study file as a mapping (:func:`read_yaml_mapping`), refusing a folder, an empty file with a pointer to
    the shipped studies, and a key given twice in one mapping (YAML keeps the last silently: an arm would vanish)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a study file (studies/NAME.yaml)")
    try:
        data = read_yaml_mapping(path, kind="study")
    except ConfigError as exc:
        if "the study is empty" not in str(exc):
            raise
        raise ConfigError(
            f"{path}: the study is empty; see studies/heads_synthfer_short.yaml for one to start from"
        ) from None
    duplicate = _duplicate_key(path.read_text(encoding="utf-8"))
    if duplicate:
        key, line = duplicate
        raise ConfigError(f"{path}:{line}: {key!r} given twice in one mapping (YAML would keep only the last)")
    return data


def _duplicate_key(text: str) -> tuple[str, int] | None:
    """The first key repeated within one YAML mapping of ``text`` and its line, or None (the node tree of
    ``yaml.compose`` with the safe loader: nothing is constructed)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop(0)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        return key.value, key.start_mark.line + 1
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def _check_owned(path: Path, where: str, overrides: list[str]) -> None:
    """An override of a key the study sets for every run (:data:`STUDY_OWNED`) would be silently replaced: refused."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for owned, by in STUDY_OWNED.items():
            if key == owned or owned.startswith(key + "."):
                raise ConfigError(f"{path}: {where}: --set {key!r}: set by {by}, not per arm; remove it from {where}")


def _check_base(path: Path, base: Path, *, key: str) -> None:
    """A base recipe valid on its own, so that its mistakes are named as the base's, not as the first arm's."""
    if base.resolve() == path.resolve():
        raise ConfigError(f"{path}: {key}: names the study file itself; give a recipe (a file or a shipped name)")
    try:
        load_recipe(base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {key}: {exc}") from None


def _check_distinct_arms(path: Path, runs: list[StudyRun]) -> None:
    """Two arms that resolve to the same recipe at a seed would train the same run twice and compare it with itself."""
    seen: dict[str, StudyRun] = {}
    for run in runs:
        other = seen.setdefault(run.key, run)
        if other is not run:
            raise ConfigError(
                f"{path}: arms {other.arm!r} and {run.arm!r} resolve to the same recipe (run key {run.key}); "
                "an arm must change at least one setting that changes what is learned"
            )


def _extra_evals(spec: StudySpec) -> str:
    """The recipe's ``extra_evals`` for the study's datasets and perturbations, as one JSON (= YAML flow) value."""
    entries: list[dict[str, Any]] = []
    for entry in spec.datasets:
        item = {"name": entry.name or entry.dataset, "dataset": entry.dataset, "split": entry.split}
        item |= {key: value for key, value in (("root", entry.root), ("synth", entry.synth)) if value is not None}
        item |= {"options": entry.options} if entry.options else {}
        entries.append(item)
    entries += [{"name": kind, "perturb": kind} for kind in spec.perturbations]
    return json.dumps(entries, separators=(",", ":")) if entries else ""


def _resolve(
    path: Path, arm: str, seed: int, base: Path, overrides: list[str], *, out: Path, study: str, extra: str
) -> StudyRun:
    settings = [*overrides, f"runtime.seed={seed}"] + ([f"extra_evals={extra}"] if extra else [])
    try:
        recipe = load_recipe(base, settings)
    except ConfigError as exc:
        raise ConfigError(f"{path}: arm {arm!r}: {exc}") from None
    key = run_key(recipe)
    folder = out / (f"pretrain-{key[:10]}" if arm == "pretrain" else f"{arm}-seed{seed}-{key[:10]}")
    name = f"{study}-pretrain" if arm == "pretrain" else f"{study}-{arm}-seed{seed}"
    settings += [f"output_dir={folder}", f"tracking.run_name={name}"]
    recipe = load_recipe(base, settings)
    return StudyRun(arm=arm, seed=seed, base=base, overrides=tuple(settings), recipe=recipe, key=key)


def _recipe_file(recipe: str, study_path: Path, *, key: str) -> Path:
    """A recipe named by a study: a path relative to the study file or the working folder, or a shipped name."""
    beside = study_path.parent / recipe
    if beside.is_file():
        return beside
    try:
        return resolve_recipe(recipe)
    except ConfigError as exc:
        raise ConfigError(f"{study_path}: {key}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# State of each run: finished (done.json, or a finished MLflow run with its key), interrupted (last.pt), pending.

RunState = Literal["finished", "interrupted", "pending", "running"]


def run_state(run: StudyRun, *, eval_sets: list[str], remote_finished: set[str] | None = None) -> RunState:
    """``finished`` (its ``done.json`` lists every evaluation set, or MLflow holds it finished), ``interrupted``
    (``last.pt`` without a complete ``done.json``: continued with ``--resume``), ``running`` (another process holds
    its lock) or ``pending``."""
    if finished_here(run, eval_sets=eval_sets):
        return "finished"
    if run_locked(run.out):
        return "running"
    if (run.out / "last.pt").exists():
        return "interrupted"
    if remote_finished and run.key in remote_finished:
        return "finished"
    return "pending"


def finished_here(run: StudyRun, *, eval_sets: list[str]) -> bool:
    """Whether the run's folder holds a ``done.json`` that lists every evaluation set of the study."""
    done = read_done(run.out)
    if done is None:
        return False
    wanted = {"eval" if name == TEST_SET else f"eval-{name}" for name in eval_sets} if run.arm != "pretrain" else set()
    return wanted <= set(done.get("evals", [])) | ({"eval"} if run.arm == "pretrain" else set())


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def run_locked(out: Path) -> bool:
    """Whether another process holds the run's lock (it is training it now)."""
    import fcntl

    path = _lock_path(out)
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def hold_run(out: Path) -> Iterator[bool]:
    """The run's lock, held for the block; yields False (without waiting) when another process holds it."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(out), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------------
# Commands


def run_tags(study: Study, run: StudyRun) -> dict[str, str]:
    """The MLflow tags of a study run: the study, arm, seed and run key (``study report`` finds runs by them)."""
    return {"study": study.spec.name, "arm": run.arm, "seed": str(run.seed), "run_key": run.key}


def train_command(
    study: Study,
    run: StudyRun,
    *,
    parent_run_id: str | None = None,
    resume: bool = False,
    gpus: int | None = None,
    program: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The one command that trains ``run``: ``ferbench train BASE --set ...`` with its tags and parent study run.

    ``program`` replaces ``ferbench`` (``[sys.executable, "-m", "fer_bench"]`` when run from here); ``gpus`` > 1
    makes it a torchrun DDP job (``train --gpus N``); ``extra`` adds settings that do not change the run's identity
    (``runtime.threads``)."""
    tags = json.dumps(run_tags(study, run), separators=(",", ":"))
    settings = [*run.overrides, f"tracking.tags={tags}", *(extra or [])]
    if parent_run_id:
        settings.append(f"tracking.parent_run_id={parent_run_id}")
    args = [*(program or ["ferbench"]), "train", str(run.base)]
    for item in settings:
        args += ["--set", item]
    if resume:
        args.append("--resume")
    if gpus and gpus > 1:
        args += ["--gpus", str(gpus)]
    return args


def shell_line(args: list[str], *, cwd: Path | None = None) -> str:
    """``args`` as one shell line (quoted), run from ``cwd`` when given."""
    line = " ".join(shlex.quote(a) for a in args)
    return f"cd {shlex.quote(str(cwd))} && {line}" if cwd else line


def describe_runs(study: Study) -> list[dict[str, Any]]:
    """One row per run: arm, seed, run key and folder, in the study's order (the pretraining run first)."""
    return [{"arm": run.arm, "seed": run.seed, "run_key": run.key, "output_dir": str(run.out)} for run in study.runs]


# ---------------------------------------------------------------------------------------------------------------------
# MLflow: the parent study run, and the finished runs of this study it holds


def _client(tracking_uri: str):
    from fer_bench.train.tracking import _mlflow_quietly, unreachable

    problem = unreachable(tracking_uri)
    if problem:
        raise ConnectionError(problem)
    mlflow = _mlflow_quietly()
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def study_parent_run(study: Study, *, message: Callable[[str], None]) -> str | None:
    """The MLflow run that holds this study's runs as children: found by its tags, or created (None, with one line
    said, when tracking is off or the store cannot be reached: the runs then train without a parent)."""
    recipe = study.runs[0].recipe
    if not recipe.tracking.enabled:
        return None
    from fer_bench.train.tracking import _store_lock

    try:
        with _store_lock(study.tracking_uri):
            client = _client(study.tracking_uri)
            experiment = client.get_experiment_by_name(study.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(study.experiment)
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.kind = 'study' and tags.study = '{study.spec.name}'"
            )
            if found:
                run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                return run_id
            run = client.create_run(
                experiment_id,
                run_name=f"study-{study.spec.name}",
                tags={"kind": "study", "study": study.spec.name, "study_file": str(study.path)},
            )
            client.log_param(run.info.run_id, "arms", ",".join(study.spec.arms))
            client.log_param(run.info.run_id, "seeds", ",".join(map(str, study.spec.seeds)))
            client.log_param(run.info.run_id, "metric", study.spec.metric)
            return run.info.run_id
    except Exception as exc:  # a study trains without its parent run rather than not at all
        from fer_bench.train.tracking import _reason

        message(f"MLflow at {study.tracking_uri!r}: no parent study run ({_reason(exc)}); runs go on")
        return None


def finish_parent_run(study: Study, run_id: str | None, *, complete: bool) -> None:
    """End the parent study run: FINISHED when every run is finished, else left as it is for the next ``run``."""
    if not run_id or not complete:
        return
    with contextlib.suppress(Exception):
        _client(study.tracking_uri).set_terminated(run_id, "FINISHED")


def remote_runs(study: Study, *, message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Finished MLflow runs of this study, by run key (the newest per key); empty (with one line said to
    ``message``) when the store cannot be read."""
    if not study.runs[0].recipe.tracking.enabled:
        return {}
    from fer_bench.train.tracking import _reason, _store_lock

    try:
        with _store_lock(study.tracking_uri):  # a new sqlite store is created by one process at a time
            client = _client(study.tracking_uri)
            experiment = client.get_experiment_by_name(study.experiment)
            if experiment is None:
                return {}
            found = client.search_runs(
                [experiment.experiment_id],
                filter_string=(
                    f"tags.study = '{study.spec.name}' and tags.kind = 'train' and attributes.status = 'FINISHED'"
                ),
                order_by=["attributes.start_time DESC"],
            )
    except Exception as exc:
        if message is not None:
            message(f"MLflow at {study.tracking_uri!r} cannot be read ({_reason(exc)}): only the run folders count")
        return {}
    out: dict[str, Any] = {}
    for run in found:
        key = run.data.tags.get("run_key")
        if key and key not in out and run.data.tags.get("kind") == "train":  # not its eval runs, which share the tags
            out[key] = run
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running a study on this machine


@dataclasses.dataclass
class RunOutcome:
    run: StudyRun
    action: Literal["skipped", "trained", "resumed", "failed", "busy"]
    seconds: float = 0.0
    log: Path | None = None
    returncode: int = 0


def prepare_data(study: Study, runs: list[StudyRun], *, message: Callable[[str], None]) -> None:
    """Generate the SynthFER trees the runs need (training data and extra evaluation sets) before any run starts,
    one after another: parallel runs must not generate the same folder at once."""
    from fer_bench.train.data_setup import load_dataset

    seen: set[str] = set()
    for run in runs:
        data = run.recipe.data
        wanted = [(data.dataset, data.root, data.synth)]
        wanted += [
            (entry.dataset or data.dataset, entry.root or data.root, entry.synth)
            for entry in getattr(run.recipe, "extra_evals", [])
            if getattr(entry, "synth", None) is not None
        ]
        for dataset, root, synth in wanted:
            if dataset != "synthfer" or root in seen:
                continue
            seen.add(root)
            load_dataset(dataset="synthfer", root=root, options={}, synth=synth, message=message)


def run_study(
    study: Study,
    *,
    parallel: int = 1,
    gpus: int = 0,
    only: list[str] | None = None,
    message: Callable[[str], None] = print,
    launch: Callable[[list[str], Path | None, dict[str, str]], int] | None = None,
) -> list[RunOutcome]:
    """Train every run of ``study`` that is not finished: the pretraining run first, then the arms, ``parallel`` at
    a time; interrupted runs continue with ``--resume``.

    Args:
        parallel: Runs at once on this machine. On a CPU each gets ``cores // parallel`` threads.
        gpus: GPUs of this machine; each of the ``parallel`` runs gets ``gpus // parallel`` of them
            (``CUDA_VISIBLE_DEVICES``), and a run with more than one is a torchrun DDP job.
        only: Arms to run (default: all).
        launch: Runs one command with its log file (``<run folder>.log``) and extra environment; returns its exit
            status (default: a subprocess whose output goes to the log, and to stderr too when ``parallel`` is 1).

    Returns:
        What happened to each run, in the study's order.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel: expected at least 1, got {parallel}")
    if gpus and gpus < parallel:
        raise ConfigError(f"--gpus {gpus} --parallel {parallel}: each parallel run needs at least one GPU")
    if gpus:
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            fix = f"give --gpus {have} or less" if have else "leave --gpus out to train on the CPU (--parallel N)"
            raise ConfigError(f"--gpus {gpus}: this machine has {have} CUDA device(s); {fix}")
    if only:
        for arm in only:
            if arm not in study.spec.arms:
                raise ConfigError(f"--only: no arm {arm!r} in {study.path}.{did_you_mean(arm, study.spec.arms)}")
    if launch is None:
        launch = functools.partial(_subprocess_launch, echo=parallel == 1)
    eval_sets = study.spec.eval_sets()
    remote = set(remote_runs(study, message=message))
    selected = [run for run in study.runs if run.arm == "pretrain" or not only or run.arm in only]
    states = {run.key + run.label: run_state(run, eval_sets=eval_sets, remote_finished=remote) for run in selected}
    todo = [run for run in selected if states[run.key + run.label] in ("interrupted", "pending")]
    counts = {state: sum(1 for s in states.values() if s == state) for state in ("finished", "interrupted", "pending")}
    message(
        f"study {study.spec.name}: {len(selected)} runs — {counts['finished']} finished (skipped), "
        f"{counts['interrupted']} to resume, {counts['pending']} to train; folder {study.out}"
    )
    outcomes = {run.label: RunOutcome(run, "skipped") for run in selected if run not in todo}
    for run in selected:
        if states[run.key + run.label] == "running":
            outcomes[run.label] = RunOutcome(run, "busy")
            message(f"{run.label}: another process is training it now; left to that process")
    if not todo:
        return [outcomes[run.label] for run in selected]
    _check_writable(study.out)
    prepare_data(study, todo, message=message)
    parent = study_parent_run(study, message=message)
    slots = _slots(parallel=parallel, gpus=gpus)
    phases = [[r for r in todo if r.arm == "pretrain"], [r for r in todo if r.arm != "pretrain"]]
    for phase in phases:
        for outcome in _run_phase(
            study, phase, slots=slots, parent=parent, launch=launch, message=message, eval_sets=eval_sets
        ):
            outcomes[outcome.run.label] = outcome
        if any(outcomes[r.label].action == "failed" for r in phase if r.arm == "pretrain"):
            message("the pretraining run failed: the arms need its checkpoint, so they were not started")
            break
    ordered = [outcomes.get(run.label) or RunOutcome(run, "failed", returncode=-1) for run in selected]
    done = all(o.action in ("skipped", "trained", "resumed") for o in ordered)  # not while another process trains
    finish_parent_run(study, parent, complete=done and not only)
    return ordered


def _check_writable(folder: Path) -> None:
    """The study's folder exists and takes files, before anything is generated or started."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{folder}: the study's runs cannot be written there ({exc.strerror or type(exc).__name__}); "
            "give --out DIR, a folder you can write"
        ) from None


def _slots(*, parallel: int, gpus: int) -> list[dict[str, Any]]:
    """What each parallel slot gets: its GPUs (CUDA_VISIBLE_DEVICES) or its share of the CPU threads."""
    if gpus:
        per = gpus // parallel
        return [{"gpus": list(range(i * per, (i + 1) * per))} for i in range(parallel)]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return [{"threads": threads if parallel > 1 else None} for _ in range(parallel)]


def _run_phase(study, runs, *, slots, parent, launch, message, eval_sets) -> list[RunOutcome]:
    import queue
    import threading
    import time

    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)
    results: list[RunOutcome] = []
    lock = threading.Lock()

    def one(run: StudyRun) -> None:
        slot = free.get()
        try:
            with hold_run(run.out) as held:
                if not held:
                    outcome = RunOutcome(run, "busy")
                    message(f"{run.label}: another process is training it now; left to that process")
                elif finished_here(run, eval_sets=eval_sets):  # another process finished it since the states
                    outcome = RunOutcome(run, "skipped")
                    message(f"{run.label}: finished by another process meanwhile; skipped")
                else:
                    outcome = _train_one(
                        study,
                        run,
                        slot=slot,
                        parent=parent,
                        launch=launch,
                        message=message,
                        clock=time.monotonic,
                    )
        except Exception as exc:  # one run's trouble (a folder it cannot create) must not end the others silently
            outcome = RunOutcome(run, "failed", returncode=1)
            message(f"{run.label}: failed before training ({type(exc).__name__}: {exc})")
        finally:
            free.put(slot)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(run,), daemon=True) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _train_one(study, run, *, slot, parent, launch, message, clock) -> RunOutcome:
    resume = (run.out / "last.pt").exists()
    extra = [f"runtime.threads={slot['threads']}"] if slot.get("threads") else []
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slot["gpus"]))} if slot.get("gpus") else {}
    gpus = len(slot.get("gpus", [])) or None
    command = train_command(
        study,
        run,
        parent_run_id=parent,
        resume=resume,
        gpus=gpus,
        program=[sys.executable, "-m", "fer_bench"],
        extra=extra,
    )
    log = run.out.parent / f"{run.out.name}.log"
    message(f"{run.label}: {'resuming' if resume else 'training'} in {run.out} (log {log})")
    started = clock()
    code = launch(command, log, env)
    seconds = clock() - started
    if code != 0 or read_done(run.out) is None:
        message(f"{run.label}: failed (exit status {code}) after {seconds:.0f} s; see {log}")
        return RunOutcome(run, "failed", seconds, log, code or 1)
    message(f"{run.label}: finished in {seconds:.0f} s")
    return RunOutcome(run, "resumed" if resume else "trained", seconds, log)


def _subprocess_launch(command: list[str], log: Path | None, env: dict[str, str], *, echo: bool = False) -> int:
    """Run ``command`` with its output (stdout and stderr) appended to ``log``; with ``echo``, also shown on stderr
    as it comes (one run at a time). Without a log the output goes to the terminal."""
    import codecs
    import subprocess

    environment = {**os.environ, **env}
    if log is None:
        return subprocess.call(command, env=environment)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        if not echo:
            return subprocess.call(command, env=environment, stdout=handle, stderr=subprocess.STDOUT)
        process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        assert process.stdout is not None
        while chunk := process.stdout.read1(1 << 16):
            handle.write(chunk)
            handle.flush()
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        return process.wait()
