"""Recipes: YAML files validated by a pydantic schema. Unknown keys and bad values are rejected with the key's
dotted path; ``--set key.path=value`` overrides any field. The recipe is unpacked once, in ``fit``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fer_bench.errors import ConfigError
from fer_bench.options import parse_scalar


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    """Training augmentation probabilities and ranges (see ``fer_bench.data.AugmentOptions``)."""

    hflip: float = Field(0.5, ge=0, le=1)
    affine: float = Field(0.7, ge=0, le=1)
    rotate: float = Field(10.0, ge=0, le=45)
    scale: float = Field(0.1, ge=0, lt=1)
    translate: float = Field(0.06, ge=0, le=0.5)
    color: float = Field(0.5, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1)
    erasing: float = Field(0.0, ge=0, le=1)
    occluders: float = Field(
        0.0, ge=0, le=1
    )  # synthetic occluders (fer_bench.data.occluders); the occlusion head's own


class AlignConfig(_Section):
    """Faces aligned onto a template before training (``ferbench data prepare`` does the same from the CLI)."""

    template: str  # arcface112 | arcface224 | rafdb_like | ffhq512 (fer_bench.faces.list_templates())
    landmarks: Literal["detector", "dataset"] = "detector"  # dataset: the landmarks the dataset ships
    detector: str = "mtcnn"  # a registered face detector (fer_bench.faces.list_detectors()): mtcnn | retinaface
    detector_weights: str | None = None  # a local weights file; None: the usual places (README, "Faces")
    select: Literal["largest", "confident", "drop"] = "largest"  # an image with several faces

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from fer_bench.faces import list_templates

        if value not in list_templates():
            raise ValueError(f"unknown template {value!r}; expected one of {', '.join(list_templates())}")
        return value

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, value: str) -> str:
        from fer_bench.faces import list_detectors

        if value not in list_detectors():
            raise ValueError(f"unknown face detector {value!r}; expected one of {', '.join(list_detectors())}")
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
    augment: AugmentConfig = AugmentConfig()
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
    pretrained: bool | str = False
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


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
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
        raise ConfigError(_format_errors(exc, source)) from None
    try:
        check_dataset_options(recipe.data.dataset, recipe.data.options)
    except FerBenchError as exc:
        raise ConfigError(f"{source}: data: {exc}") from None
    try:
        check_head_options(recipe.model.heads)
    except FerBenchError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``), apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: missing file, invalid YAML (with line), unknown keys or bad values (with their dotted path).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the recipe as UTF-8"
        ) from None
    if not text.strip() or all(not s.strip() or s.lstrip().startswith("#") for s in text.splitlines()):
        raise ConfigError(f"{path}: the recipe is empty; see recipes/quickstart.yaml for one to start from")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return recipe_from_dict(apply_overrides(data, overrides or []), source=str(path))
