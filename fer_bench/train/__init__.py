"""Training: recipes, the loop, checkpoints and MLflow tracking."""

from fer_bench.train.fit import Callbacks, FitResult, fit, timing_free
from fer_bench.train.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

__all__ = [
    "Callbacks",
    "FitResult",
    "Recipe",
    "apply_overrides",
    "fit",
    "load_recipe",
    "recipe_from_dict",
    "timing_free",
]
