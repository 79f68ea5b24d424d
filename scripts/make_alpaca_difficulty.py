"""Build benchmarks/alpaca_eval/instruction_difficulty_local.csv from shared AlpacaEval 2 annotations.

The official length-controlled GLM has an instruction-difficulty term that it downloads from the hub
(instruction_difficulty.csv, fitted on the whole leaderboard). Offline we estimate it from the models
annotated by weighted_alpaca_eval_gpt4_turbo against gpt4_1106_preview in ../shared
(harness.alpaca.estimate_difficulty).

Usage: python scripts/make_alpaca_difficulty.py [--shared ../shared] [--exclude MODEL]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.alpaca import DIFFICULTY_FILE, estimate_difficulty, load_reference  # noqa: E402

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def load_preferences(annotation_files: list[Path], instructions: list[str]) -> list[list[float]]:
    preferences = []
    for path in annotation_files:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if [r["instruction"] for r in rows] != instructions:
            raise SystemExit(f"{path}: instructions are not in the official order")
        preferences.append([float(r["preference"]) for r in rows])
    return preferences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--exclude", action="append", default=[], help="a model to leave out")
    parser.add_argument("--output", type=Path, default=DIFFICULTY_FILE)
    args = parser.parse_args()
    reference = load_reference("gpt4_1106_preview")
    instructions = [r["instruction"] for r in reference]
    files = sorted((args.shared / "data" / "alpaca_eval" / "annotated").glob(f"*/{ANNOTATOR}_annotations.json"))
    files = [f for f in files if f.parent.name not in args.exclude]
    if not files:
        raise SystemExit(f"no {ANNOTATOR} annotations under {args.shared}")
    difficulty = estimate_difficulty(load_preferences(files, instructions))
    frame = pd.DataFrame({"index": range(len(instructions)), "instruction": instructions, "instruction_difficulty": difficulty})
    frame.to_csv(args.output, index=False, float_format="%.6f")
    print(f"wrote {args.output} from {', '.join(f.parent.name for f in files)}")


if __name__ == "__main__":
    main()
