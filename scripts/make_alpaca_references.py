"""Build the compressed AlpacaEval baseline outputs shipped in benchmarks/alpaca_eval/references/.

- gpt4_1106_preview (AlpacaEval 2): shared/data/alpaca_eval/references/gpt4_1106_preview.json as is.
- text_davinci_003 (AlpacaEval 1): the baseline outputs the official alpaca_eval_gpt4 annotations were
  made against (their output_1), taken from shared/data/alpaca_eval/annotated/*/alpaca_eval_gpt4_annotations.json.
  shared/.../references/text_davinci_003.json is a different set of text_davinci_003 outputs (the
  AlpacaEval 2 leaderboard entry): only 20 of its 805 outputs equal the AlpacaEval 1 baseline, so
  win rates against it would not be AlpacaEval 1 numbers.

Usage: python scripts/make_alpaca_references.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "benchmarks" / "alpaca_eval" / "references"
FIELDS = ("dataset", "instruction", "output", "generator")


def write(name: str, rows: list[dict]) -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([{k: r[k] for k in FIELDS} for r in rows], ensure_ascii=False, indent=1).encode()
    with open(TARGET / f"{name}.json.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as stream:
        stream.write(payload)
    print(f"wrote {TARGET / name}.json.gz ({len(rows)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = parser.parse_args()
    data = args.shared / "data" / "alpaca_eval"
    gpt4 = json.loads((data / "references" / "gpt4_1106_preview.json").read_text(encoding="utf-8"))
    write("gpt4_1106_preview", gpt4)
    baselines = None
    for path in sorted((data / "annotated").glob("*/alpaca_eval_gpt4_annotations.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))
        current = [
            {"dataset": r["dataset"], "instruction": r["instruction"], "output": r["output_1"], "generator": r["generator_1"]}
            for r in rows
        ]
        if baselines is not None and current != baselines:
            raise SystemExit(f"{path}: baseline outputs differ from the other AlpacaEval 1 annotations")
        baselines = current
    if baselines is None:
        raise SystemExit("no alpaca_eval_gpt4 annotations found")
    if [r["instruction"] for r in baselines] != [r["instruction"] for r in gpt4]:
        raise SystemExit("AlpacaEval 1 and 2 instructions are not in the same order")
    write("text_davinci_003", baselines)


if __name__ == "__main__":
    main()
