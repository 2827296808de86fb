"""Training: recipes, the loop, checkpoints and MLflow tracking."""

from fer_bench.train.fit import Callbacks, FitResult, fit, timing_free
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
    "Callbacks",
    "FitResult",
    "Recipe",
    "ShippedRecipe",
    "apply_overrides",
    "fit",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe",
    "shipped_recipes",
    "timing_free",
]
