"""Training: recipes, the loop, checkpoints and MLflow tracking."""

from fer_bench.train.fit import DONE, Callbacks, FitResult, fit, read_done, timing_free
from fer_bench.train.recipe import (
    Recipe,
    ShippedRecipe,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    resolve_recipe,
    shipped_recipes,
)

__all__ = [
    "DONE",
    "Callbacks",
    "FitResult",
    "Recipe",
    "ShippedRecipe",
    "apply_overrides",
    "fit",
    "load_recipe",
    "read_done",
    "recipe_from_dict",
    "resolve_recipe",
    "shipped_recipes",
    "timing_free",
]
