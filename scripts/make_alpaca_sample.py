"""Build harness/shipped_data/alpaca_sample.jsonl: a fixed random sample of real Alpaca records.

Source: ../shared/data/instructions/alpaca_random_9k.json (the random Alpaca sample published with
AlpaGasus, CC BY-NC 4.0). Run: python scripts/make_alpaca_sample.py [--n 1500]
"""

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "instructions" / "alpaca_random_9k.json"
TARGET = ROOT / "harness" / "shipped_data" / "alpaca_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = json.loads(SOURCE.read_text())
    seen, unique = set(), []
    for record in records:
        key = (record["instruction"], record.get("input", ""), record["output"])
        if key not in seen and record["output"].strip():
            seen.add(key)
            unique.append(record)
    sample = random.Random(args.seed).sample(unique, args.n)
    with TARGET.open("w", encoding="utf-8") as handle:
        for record in sample:
            row = {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(sample)} records to {TARGET}")


if __name__ == "__main__":
    main()
