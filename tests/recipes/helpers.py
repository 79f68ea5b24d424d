"""Helpers to run a recipe in-process on the tiny model and watch what it trains on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.runner import RunContext, execute_run, prepare_run
from harness.spec import build_spec


def run_recipe(recipe: str, output: Path, overrides: list[str], data: str | None = None) -> dict[str, Any]:
    flags = {"recipe": recipe, "data.name": data, "eval.limit": 10}
    spec = build_spec(config_file=None, overrides=["training.save_steps=0", *overrides], flags=flags)
    return execute_run(prepare_run(spec), output, Console(stderr=True, quiet=True), save_model=False).to_dict()


class TrainCalls:
    """Wraps RunContext.train to record, per call, the stage name and the records it trained on."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, list]] = []
        original = RunContext.train

        def recording(ctx, model, tokenizer, records, *, stage, **kwargs):
            self.calls.append((stage, list(records)))
            return original(ctx, model, tokenizer, records, stage=stage, **kwargs)

        monkeypatch.setattr(RunContext, "train", recording)


def write_phased_file(path: Path, records, scores) -> Path:
    with path.open("w") as handle:
        for index, (record, score) in enumerate(zip(records, scores, strict=True)):
            prompt = record.instruction + ("\n" + record.input if record.input else "")
            handle.write(json.dumps({"id": str(index), "score": str(score), "data": [prompt, record.output]}) + "\n")
    return path
