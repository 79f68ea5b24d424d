"""One-off IFT: the baseline every other recipe is compared with.

Standard SFT on the whole instruction set, shuffled, loss on response tokens only (prompt tokens get
label -100), EOS appended to the response (recipes.md section 1). Everything else (template,
learning rate, epochs, packing, precision) comes from the shared training settings, so the other
recipes differ from this one only by what they add.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from harness.runner import RecipeOutput, RunContext

NAME = "one-off"
DESCRIPTION = "plain SFT on the whole instruction set (the baseline)"


class Params(BaseModel):
    """One-off has no parameters of its own: the training settings are the shared protocol."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def run(ctx: RunContext[Params]) -> RecipeOutput:
    model, tokenizer = ctx.base_model()
    trained, result = ctx.train(model, tokenizer, ctx.data.records, stage="sft")
    return RecipeOutput(model=trained, tokenizer=tokenizer, details={"stages": ["sft"]})
