"""Base: the model as it is, evaluated without any training.

Not a recipe to compare against one-off but the reference row under every comparison: if one-off
does not beat its own starting point, no recipe-versus-one-off difference says much ("did tuning help
at all"). It takes the run's data and suite like any recipe, so its record sits in the same table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from harness.runner import RecipeOutput, RunContext

NAME = "base"
DESCRIPTION = "the untrained model, evaluated as it is (the 'did tuning help at all' reference)"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def run(ctx: RunContext[Params]) -> RecipeOutput:
    model, tokenizer = ctx.base_model()
    return RecipeOutput(model=model, tokenizer=tokenizer, details={"stages": []})
