"""Study files (``studies/NAME.yaml``): many arms of one base recipe, each over several seeds, compared in pairs.

A study names a base recipe (a file or a shipped name), its arms as lists of ``--set`` overrides, the seeds, the
metric to compare and the pairs to test. It is validated like a recipe: unknown keys with the nearest ones, and
every arm × seed resolved into a full recipe up front, so a bad override fails before anything trains. Each run is
identified by the hash of its resolved recipe (:func:`run_key`): a finished run is found again by that key, and
changing any setting makes a new run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fer_bench.errors import ConfigError
from fer_bench.registry import did_you_mean
from fer_bench.train.recipe import Recipe, format_errors, load_recipe, read_yaml_mapping, resolve_recipe

#: Metrics a study can compare (headline metrics of the evaluator's results).
STUDY_METRICS: tuple[str, ...] = ("acc", "mean_class_acc", "macro_f1")


class StudySpec(BaseModel):
    """The contents of a study file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: str  # recipe file or shipped recipe name
    arms: dict[str, list[str]] = Field(min_length=1)  # arm name -> --set overrides
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    metric: str = "acc"
    pairs: list[tuple[str, str]] = []  # (A, B): "does A beat B?"
    datasets: list[str] = []  # extra protocols to evaluate every run on
    perturbations: list[str] = []

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in STUDY_METRICS:
            hint = did_you_mean(value, STUDY_METRICS)
            raise ValueError(f"unknown metric {value!r}; expected one of {', '.join(STUDY_METRICS)}.{hint}")
        return value


def run_key(recipe: Recipe) -> str:
    """A run's identity: SHA-256 (16 hex digits) of its resolved recipe, keys sorted; the run name is left out, so
    renaming an arm does not retrain it.

    Example:
        >>> a = Recipe.model_validate({"name": "x"}); b = Recipe.model_validate({"name": "y"})
        >>> run_key(a) == run_key(b), run_key(a) == run_key(Recipe.model_validate({"name": "x", "optim": {"lr": 0.01}}))
        (True, False)
    """
    data = recipe.model_dump(mode="json")
    data.pop("name", None)
    data.get("tracking", {}).pop("run_name", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_study(path: str | os.PathLike) -> tuple[StudySpec, dict[tuple[str, int], Recipe]]:
    """Read and validate a study file; returns it with every (arm, seed) resolved into its recipe.

    Raises:
        ConfigError: missing, empty or unreadable file, bad YAML, unknown keys (with the nearest), pairs naming no arm,
            an arm's override that its recipe rejects (named with the arm).
    """
    path = Path(path)
    data = read_yaml_mapping(path, kind="study")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path), StudySpec)) from None
    for a, b in spec.pairs:
        for arm in (a, b):
            if arm not in spec.arms:
                raise ConfigError(f"{path}: pairs: no arm {arm!r}.{did_you_mean(arm, spec.arms)}")
        if a == b:
            raise ConfigError(f"{path}: pairs: ({a}, {b}) compares an arm with itself")
    base = _base_recipe(spec.base, path)
    recipes: dict[tuple[str, int], Recipe] = {}
    for arm, overrides in spec.arms.items():
        for seed in spec.seeds:
            try:
                recipes[(arm, seed)] = load_recipe(
                    base, [*overrides, f"runtime.seed={seed}", f"tracking.run_name={spec.name}-{arm}-seed{seed}"]
                )
            except ConfigError as exc:
                raise ConfigError(f"{path}: arm {arm!r}: {exc}") from None
    return spec, recipes


def _base_recipe(base: str, study_path: Path) -> Path:
    """The base recipe: a path relative to the study file or the working folder, or a shipped recipe name."""
    beside = study_path.parent / base
    if beside.is_file():
        return beside
    try:
        return resolve_recipe(base)
    except ConfigError as exc:
        raise ConfigError(f"{study_path}: base: {exc}") from None


def describe_runs(recipes: dict[tuple[str, int], Recipe]) -> list[dict[str, Any]]:
    """One row per (arm, seed): its run key and run name, in the study's order."""
    return [
        {"arm": arm, "seed": seed, "run_key": run_key(recipe), "run_name": recipe.tracking.run_name}
        for (arm, seed), recipe in recipes.items()
    ]
