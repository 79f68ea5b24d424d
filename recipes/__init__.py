"""The recipes: one module each, exposing NAME, DESCRIPTION, a pydantic `Params` and
`run(ctx: RunContext[Params]) -> RecipeOutput` (harness.runner). The context loads models (ctx.load_model,
timed), trains (ctx.train), scores (ctx.ifd) and evaluates; what it cannot count itself the recipe
reports in RecipeOutput.overhead, and its own report in RecipeOutput.details (the record's recipe section)."""

from __future__ import annotations

import importlib
from types import ModuleType

from harness.errors import unknown_name

RECIPE_MODULES = {
    "base": "recipes.base",
    "one-off": "recipes.one_off",
    "phased": "recipes.phased",
    "ifd": "recipes.ifd",
    "sftmix": "recipes.sftmix",
    "unifit": "recipes.unifit",
}
# What `--recipe all` runs: every training recipe (base, the untrained reference, is asked for by name).
ALL_RECIPES = [name for name in RECIPE_MODULES if name != "base"]


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPE_MODULES:
        raise unknown_name("recipe", name, RECIPE_MODULES)
    return importlib.import_module(RECIPE_MODULES[name])


def list_recipes() -> dict[str, str]:
    return {name: get_recipe(name).DESCRIPTION for name in RECIPE_MODULES}
