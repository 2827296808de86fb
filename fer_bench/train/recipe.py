"""Recipes: YAML files validated by a pydantic schema. Unknown keys and bad values are rejected with the key's
dotted path; ``--set key.path=value`` overrides any field. The recipe is unpacked once, in ``fit``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fer_bench.data.transforms import AugmentOptions
from fer_bench.errors import ConfigError
from fer_bench.options import parse_scalar
from fer_bench.registry import did_you_mean
from fer_bench.shipped import shipped_dir


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AlignConfig(_Section):
    """Faces aligned onto a template before training (``ferbench data prepare`` does the same from the CLI)."""

    template: str  # arcface112 | arcface224 | rafdb_like | ffhq512 (fer_bench.faces.list_templates())
    landmarks: Literal["detector", "dataset"] = "detector"  # dataset: the landmarks the dataset ships
    detector: str = "mtcnn"  # a registered face detector (fer_bench.faces.list_detectors()): mtcnn | retinaface
    detector_weights: str | None = None  # a local weights file; None: the usual places (README, "Faces")
    select: Literal["largest", "confident", "drop"] = "largest"  # an image with several faces

    @field_validator("template", "detector")
    @classmethod
    def _registered(cls, value: str, info) -> str:
        from fer_bench.faces import list_detectors, list_templates

        kind, names = (
            ("template", list_templates()) if info.field_name == "template" else ("face detector", list_detectors())
        )
        if value not in names:
            raise ValueError(
                f"unknown {kind} {value!r}; expected one of {', '.join(names)}.{did_you_mean(value, names)}"
            )
        return value


class DataConfig(_Section):
    dataset: str = "synthfer"
    root: str = "data/synthfer"
    options: dict[str, Any] = {}  # adapter options, e.g. {classes: 7} for affectnet, {mode: crossentropy} for ferplus
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carved (stratified, seeded) from train when the dataset has no val
    sampler: Literal["random", "class_balanced"] = "random"  # class_balanced: each class equally likely per draw
    label_space: Literal["basic7", "all8"] | None = None  # None: the dataset's own
    img_size: int = Field(112, ge=16, le=1024)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    augment: AugmentOptions = AugmentOptions()  # the data layer's own type (fer_bench.data.AugmentOptions)
    # Prepared uint8 cache (fer_bench.data.cache): auto (built once under $FER_BENCH_CACHE_DIR or ~/.cache/fer_bench,
    # reused while the dataset is unchanged), off (decode the files every epoch), or a cache folder's path.
    cache: str = "auto"
    cache_size: int | None = Field(None, ge=16, le=1024)  # side of the cached images; None: img_size
    # device: batches gathered from the cache and augmented in torch on the device (default with a cache);
    # albumentations: the per-sample CPU pipeline in DataLoader workers (without a cache, or for custom pipelines).
    loader: Literal["auto", "device", "albumentations"] = "auto"
    residency: Literal["auto", "device", "mmap"] = "auto"  # device loader: the cache on the device, or memory-mapped
    cache_images: bool = True  # albumentations loader: keep decoded images in memory after the first epoch
    synth: dict[str, Any] | None = None  # SynthFER parameters used when root does not exist yet
    # Align every face onto a template (an aligned prepared cache; needs data.cache). A bare name is the template:
    # ``align: arcface224``. None: the dataset's own crops (or the alignment of the cache folder data.cache names).
    align: AlignConfig | None = None

    @field_validator("align", mode="before")
    @classmethod
    def _align_value(cls, value: Any) -> Any:
        return {"template": value} if isinstance(value, str) else value

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_value(cls, value: Any) -> str:
        if isinstance(value, bool):  # YAML reads a bare off/no as False and on/yes as True
            return "auto" if value else "off"
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected auto, off or a cache folder, got {value!r}")
        return value


class ModelConfig(_Section):
    backbone: str = "vit_tiny_patch16_224"
    stem: Literal["patch", "conv"] = "patch"
    pretrained: bool | str = False  # true (hub), a timm weights file, or a fer_bench checkpoint (its backbone)
    heads: dict[str, dict[str, Any] | None] = {}  # au_heatmap / anchors / occlusion → options (fer_bench.models.heads)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    backbone_kwargs: dict[str, Any] = {}


class OptimConfig(_Section):
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    # Exponential moving average of the weights (timm's ModelEmaV3, updated every step): validation, best.pt and the
    # test evaluation use the averaged weights. null: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 0
    workers: int | Literal["auto"] = "auto"
    threads: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)  # stop at an epoch end once this much time has passed
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimiser steps (smoke tests of real recipes)
    channels_last: bool = False  # NHWC tensors: ~25 % faster conv stems on CPUs (oneDNN); no gain for patchify ViTs
    compile: bool = False  # torch.compile the model in place (before any DDP wrap); its time is reported apart
    compile_backend: str = "inductor"  # "eager" traces without generating code (how the tests check compile cheaply)
    # SDPA fused attention: auto = on GPUs (cuDNN/flash kernels), off on CPUs, where timm's plain attention was 11 %
    # faster per quickstart step (fused SDPA's CPU backward costs ~6 ms per block at 17 tokens).
    fused_attention: Literal["auto"] | bool = "auto"
    # A mid-epoch checkpoint (last.pt) every N optimiser steps (500, "500 steps") or minutes ("10 min"); the
    # checkpoint at every epoch end stays. --resume continues from the exact step.
    checkpoint_every: int | str | None = None
    log_every: int = Field(25, ge=1)  # read the loss from the device (a host sync) every N steps for the progress bar

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_interval(value)
        return value


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "fer_bench"
    tracking_uri: str = "sqlite:///mlflow.db"
    run_name: str | None = None
    # An existing MLflow run (of this store, created by any process) the training run is nested under
    # (``mlflow.parentRunId``), e.g. a study's run; None: a top-level run.
    parent_run_id: str | None = None
    # Tags set on the training run and its evaluation runs (values stringified): ``{study: s, arm: a, seed: 0}``.
    tags: dict[str, str] = {}

    @field_validator("parent_run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-zA-Z][\w\-]{0,255}", value):
            raise ValueError(f"expected an MLflow run id (letters, digits, _ and -), got {value!r}")
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of tag names to values, got {value!r}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"tag names must be non-empty text, got {key!r}")
            if key.startswith("mlflow."):
                raise ValueError(
                    f"tag {key!r}: mlflow.* tags are MLflow's own (use tracking.run_name / tracking.parent_run_id)"
                )
            if isinstance(item, dict | list):
                raise ValueError(f"tag {key!r}: expected a single value, got {item!r}")
            out[key] = "" if item is None else str(item).lower() if isinstance(item, bool) else str(item)
        return out


#: What an extra evaluation's name may hold: its report folder is ``eval-<name>``.
_EVAL_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ExtraEval(_Section):
    """One more evaluation of the best checkpoint after training (``extra_evals``): another protocol, another copy of
    the data (e.g. a SynthFER generated with other parameters), another split or a perturbation. Its report lands in
    ``<output_dir>/eval-<name>/`` and is logged as an evaluation child run named ``eval-<name>``."""

    name: str  # letters, digits, _ and -; unique among the extra evaluations; not "eval"
    dataset: str | None = None  # a protocol or dataset name as ``ferbench eval --dataset`` takes; None: the training's
    root: str | None = None  # the data folder; None: data.root
    options: dict[str, Any] = {}  # adapter options (None dataset: added to data.options)
    synth: dict[str, Any] | None = None  # SynthFER parameters: generated at root when root does not exist yet
    split: str = "test"
    perturb: str | None = None  # fer_bench.data.perturb.PERTURBATIONS: occlusion | blur | noise | jpeg

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _EVAL_NAME.fullmatch(value):
            raise ValueError(f"expected letters, digits, _ and - (it names the folder eval-<name>), got {value!r}")
        if value == "eval":
            raise ValueError("got 'eval', the test evaluation's own folder; choose another name")
        return value

    @model_validator(mode="after")
    def _synth_root(self) -> ExtraEval:
        if self.synth is not None and self.root is None:
            raise ValueError("synth: give the generated copy its own root, apart from the training data (got no root)")
        return self

    @field_validator("perturb")
    @classmethod
    def _perturb(cls, value: str | None) -> str | None:
        from fer_bench.data.perturb import PERTURBATIONS

        if value is not None and value not in PERTURBATIONS:
            raise ValueError(
                f"unknown perturbation {value!r}; expected one of {', '.join(PERTURBATIONS)}."
                f"{did_you_mean(value, PERTURBATIONS)}"
            )
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str | None) -> str | None:
        from fer_bench.data import list_datasets
        from fer_bench.eval.protocols import list_protocols

        if value is None:
            return value
        choices = sorted(set(list_protocols()) | set(list_datasets()))
        if value not in choices:
            raise ValueError(
                f"unknown protocol or dataset {value!r}.{did_you_mean(value, choices)} Available: {', '.join(choices)}"
            )
        return value


class Recipe(_Section):
    """A training recipe: data, model, optim, runtime, tracking and the output folder."""

    name: str = "recipe"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/{name}"
    eval_after: bool = True  # evaluate the best checkpoint on the test split when training ends
    # More evaluations of the best checkpoint after the test one (only with eval_after), each in eval-<name>/
    extra_evals: list[ExtraEval] = []

    @field_validator("extra_evals")
    @classmethod
    def _distinct_names(cls, value: list[ExtraEval]) -> list[ExtraEval]:
        names = [item.name for item in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"every extra evaluation needs its own name; {', '.join(map(repr, twice))} repeated")
        return value

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def resolved_output_dir(self) -> Path:
        """``output_dir`` with ``{name}`` and ``{time}`` (local YYYYmmdd-HHMMSS) filled in."""
        import time

        try:
            return Path(self.output_dir.format(name=self.name, time=time.strftime("%Y%m%d-%H%M%S")))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"output_dir {self.output_dir!r}: only {{name}} and {{time}} can be filled in ({exc})"
            ) from None


def parse_interval(value: int | str) -> tuple[str, float]:
    """``runtime.checkpoint_every`` as (``steps``, N) or (``minutes``, M).

    Example:
        >>> parse_interval(500), parse_interval("200 steps"), parse_interval("10 min"), parse_interval("1.5m")
        (('steps', 500), ('steps', 200), ('minutes', 10.0), ('minutes', 1.5))
    """
    import re

    if isinstance(value, bool):
        raise ValueError(f"expected a number of steps or minutes, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"expected at least 1 step, got {value}")
        return "steps", value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(steps?|m|min|mins|minutes?)?\s*", str(value))
    if not match:
        raise ValueError(f"expected N (steps), 'N steps' or 'N min', got {value!r}")
    amount, unit = float(match.group(1)), match.group(2) or "steps"
    if unit.startswith("step"):
        if amount != int(amount) or amount < 1:
            raise ValueError(f"expected a whole number of steps >= 1, got {value!r}")
        return "steps", int(amount)
    if amount <= 0:
        raise ValueError(f"expected a positive number of minutes, got {value!r}")
    return "minutes", amount


def _known_keys(loc: tuple, root: Any = None) -> list[str]:
    """The keys the section at ``loc`` (a pydantic error location, without the bad key) of ``root`` (default: the
    recipe) accepts."""
    from typing import get_args, get_origin

    model: Any = root or Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list section (extra_evals.0.name)
            if get_origin(model) is not list:
                return []
            model = get_args(model)[0]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def format_errors(exc: ValidationError, source: str, root: Any = None) -> str:
    """One line naming every bad key of a ``root`` model (default: the recipe) with what was wrong."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key." + did_you_mean(str(err["loc"][-1]), _known_keys(err["loc"][:-1], root))
        # our own validators already name the value they got
        said = err["type"] == "extra_forbidden" or "got " in msg
        found = "" if said else f" (got {err.get('input')!r})"
        parts.append(f"{key}: {msg}{found}")
    return f"{source}: " + "; ".join(parts)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` strings to a nested dict (copied)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_scalar(value)
    return out


def recipe_from_dict(data: dict, *, source: str = "recipe") -> Recipe:
    """Validate a recipe dict, including the dataset name and its adapter options."""
    from fer_bench.data import check_dataset_options
    from fer_bench.errors import FerBenchError
    from fer_bench.models.heads import check_head_options

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None
    try:
        check_dataset_options(recipe.data.dataset, recipe.data.options)
    except FerBenchError as exc:
        raise ConfigError(f"{source}: data: {exc}") from None
    try:
        check_head_options(recipe.model.heads)
    except FerBenchError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for index, extra in enumerate(recipe.extra_evals):
        check_extra_evaluation(extra, recipe.data, where=f"{source}: extra_evals.{index} ({extra.name})")
    return recipe


def extra_eval_protocol(extra: ExtraEval, data: DataConfig, info: Any = None) -> tuple[Any, dict[str, Any]]:
    """The protocol an extra evaluation scores and the adapter options it reads the data with.

    Without ``extra.dataset`` it is the training dataset's protocol (with ``data.options`` under the item's own
    options; ``info``, the data as read, adds the options its adapter resolved itself); a ``split`` other than the
    protocol's makes it an ad-hoc protocol (version 0).
    """
    from dataclasses import replace

    from fer_bench.eval.protocols import get_protocol, protocol_for, protocol_of

    if extra.dataset is None:
        options = {**data.options, **extra.options}
        if info is not None:
            return protocol_of(info, options, split=extra.split), options
        return protocol_for(data.dataset, options, split=extra.split), options
    options = dict(extra.options)
    protocol = get_protocol(extra.dataset)
    if extra.split != protocol.split:
        protocol = replace(
            protocol,
            split=extra.split,
            version=0,
            description=f"{protocol.description or protocol.name}; {extra.split} split (ad hoc, not a benchmark)",
        )
    return protocol, options


def check_extra_evaluation(extra: ExtraEval, data: DataConfig, *, where: str) -> None:
    """Check an extra evaluation against the recipe's data: the adapter options its dataset accepts (and that agree
    with the protocol's), and SynthFER parameters only for SynthFER.

    Raises:
        ConfigError: naming ``where`` (the recipe and the item).
    """
    import dataclasses

    from fer_bench.data import SynthFERConfig, check_dataset_options
    from fer_bench.errors import FerBenchError

    protocol, options = extra_eval_protocol(extra, data)
    for key, value in protocol.options.items():
        if key in options and options[key] != value:
            raise ConfigError(f"{where}: options.{key}={options[key]!r}: protocol {protocol.name!r} fixes {value!r}")
    try:
        check_dataset_options(protocol.dataset, {**options, **protocol.options})
    except FerBenchError as exc:
        raise ConfigError(f"{where}: options: {exc}") from None
    if extra.synth is not None:
        if protocol.dataset != "synthfer":
            raise ConfigError(f"{where}: synth: SynthFER parameters, but the evaluation reads {protocol.dataset!r}")
        known = [f.name for f in dataclasses.fields(SynthFERConfig)]
        for key in extra.synth:
            if key not in known:
                raise ConfigError(f"{where}: synth.{key}: unknown SynthFER parameter.{did_you_mean(key, known)}")
        try:
            SynthFERConfig(**extra.synth)
        except FerBenchError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def read_yaml_mapping(path: Path, *, kind: str) -> dict:
    """A YAML file of ``kind`` ("recipe", "study") read with ``yaml.safe_load`` into a mapping.

    Raises:
        ConfigError: missing file, not UTF-8 (with line and byte), empty, invalid YAML (with line), not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the {kind} as UTF-8"
        ) from None
    if not text.strip() or all(not s.strip() or s.lstrip().startswith("#") for s in text.splitlines()):
        raise ConfigError(f"{path}: the {kind} is empty; see recipes/quickstart.yaml for one to start from")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {kind} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``), apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: missing file, invalid YAML (with line), unknown keys or bad values (with their dotted path).
    """
    path = Path(path)
    data = read_yaml_mapping(path, kind="recipe")
    data.setdefault("name", path.stem)
    return recipe_from_dict(apply_overrides(data, overrides or []), source=str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Shipped recipes: ``recipes/`` of the repository, carried by the wheel; a recipe is named by its file's stem.


@dataclass(frozen=True)
class ShippedRecipe:
    """A recipe fer_bench ships: its name (the file stem), file, description and what it needs to run."""

    name: str
    path: Path
    description: str
    needs: tuple[str, ...]


def shipped_recipe_paths() -> dict[str, Path]:
    """Shipped recipe name → file, sorted by name."""
    return {path.stem: path for path in sorted(shipped_dir("recipes").glob("*.yaml"))}


def _leading_comment(text: str) -> str:
    """The first paragraph of the comment block a recipe starts with, on one line."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if not body:
            if lines:
                break
            continue
        lines.append(body)
    return " ".join(lines)


def recipe_needs(recipe: Recipe) -> tuple[str, ...]:
    """What running ``recipe`` needs beyond fer_bench: the dataset (SynthFER is generated), a GPU (224-px and larger
    inputs: hours per epoch on a CPU) and pretrained weights (from the hub or a local file)."""
    dataset = recipe.data.dataset
    needs = ["no dataset (SynthFER)" if dataset == "synthfer" else f"{dataset} data"]
    needs.append("GPU" if recipe.data.img_size >= 224 else "CPU ok")
    if recipe.model.pretrained:
        needs.append("pretrained weights")
    return tuple(needs)


def shipped_recipes() -> list[ShippedRecipe]:
    """The shipped recipes, by name, each with the first paragraph of its leading comment as the description.

    Raises:
        ConfigError: a shipped recipe that is not valid YAML or not a valid recipe (named with its file).
    """
    out = []
    for name, path in shipped_recipe_paths().items():
        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        try:
            recipe = Recipe.model_validate({"name": name, **data})
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, str(path))) from None
        out.append(ShippedRecipe(name, path, _leading_comment(text), recipe_needs(recipe)))
    return out


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """The recipe file for ``recipe``: an existing file first, else the shipped recipe of that name
    (``quickstart`` or ``quickstart.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped recipe, with the nearest shipped names.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipe_paths()
    text = os.fspath(recipe)
    bare = "/" not in text and os.sep not in text
    key = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if bare and key in shipped:
        return shipped[key]
    listing = " (`ferbench recipes` lists the shipped ones)"
    if bare:
        hint = did_you_mean(key, shipped)
        raise ConfigError(f"recipe {text!r}: no such file and no shipped recipe of that name.{hint}{listing}")
    hint = f" Did you mean the shipped recipe {path.stem!r}?" if path.stem in shipped else did_you_mean(key, shipped)
    raise ConfigError(f"{path}: recipe file not found.{hint}{listing}")
