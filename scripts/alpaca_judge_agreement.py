"""Measure a local judge against the official AlpacaEval judge on shipped annotations.

Judges alpaca-7b against the baseline (gpt4_1106_preview for --version 2, text_davinci_003 for 1) in
both orders with the local judge, and compares its decisions with the official annotator's
preferences from ../shared/data/alpaca_eval/annotated. Writes a summary JSON (and per-example
probabilities as JSONL) under benchmarks/alpaca_eval/judge_agreement/.

Usage: python scripts/alpaca_judge_agreement.py [--limit 200] [--version 2] [--judge local:smollm2-135m-instruct]
       [--model-path ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--rescore]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.alpaca import VERSIONS, compute_metrics, fixed_subset  # noqa: E402
from harness.io import atomic_write_json, atomic_write_text  # noqa: E402
from harness.judge import JudgeOptions, make_judge, position_bias  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "alpaca_eval" / "judge_agreement"


def rate(flags: np.ndarray) -> dict[str, float]:
    return {"value": float(flags.mean()), "stderr": float(flags.std(ddof=1) / math.sqrt(len(flags)))}


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    observed = float((a == b).mean())
    expected = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--judge", default="local:smollm2-135m-instruct")
    parser.add_argument("--model-path", default=None, help="weights for a model-set judge (default: the shared GGUF)")
    parser.add_argument("--model", default="alpaca-7b", help="annotated model in shared/data/alpaca_eval/annotated")
    parser.add_argument("--version", default="2", choices=sorted(VERSIONS))
    parser.add_argument("--limit", type=int, default=200, help="fixed seeded subset size (None: all 805)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rescore", action="store_true", help="recompute the summary from the saved per-example file")
    args = parser.parse_args()

    info = VERSIONS[args.version]
    path = args.shared / "data" / "alpaca_eval" / "annotated" / args.model / f"{info.annotator}_annotations.json"
    official = json.loads(path.read_text(encoding="utf-8"))
    indices = fixed_subset(args.limit, args.seed, len(official))
    rows = [
        {k: official[i][k] for k in ("instruction", "output_1", "output_2", "generator_1", "generator_2")} | {"index": i}
        for i in indices
    ]
    stem = f"{args.judge.replace(':', '_').replace('/', '_')}_{args.model}_v{args.version}_n{len(indices)}"
    if args.rescore:  # recompute the summary from saved per-example probabilities, without judging again
        previous = json.loads((OUT_DIR / f"{stem}.json").read_text(encoding="utf-8"))
        saved = [json.loads(line) for line in (OUT_DIR / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()]
        if [s["index"] for s in saved] != indices:
            raise SystemExit(f"{stem}.jsonl does not hold this subset")
        keys = ("p_model_baseline_first", "p_model_model_first")
        local = [row | {"preference": s["local_preference"]} | {k: s[k] for k in keys} for row, s in zip(rows, saved, strict=True)]
        description, seconds = previous["judge"], previous["seconds"]
    else:
        model_path = args.model_path
        if model_path is None and args.judge == "local:smollm2-135m-instruct":
            model_path = str(args.shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
        judge = make_judge(args.judge, JudgeOptions(model_path=model_path, batch_size=args.batch_size))
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            print(f"{done}/{total} judgments, {time.perf_counter() - started:.0f} s", flush=True)

        local = judge.annotate_alpaca(rows, progress=progress)
        seconds = time.perf_counter() - started
        description = judge.describe()

    official_pref = np.array([float(official[i]["preference"]) for i in indices])
    draw = np.isin(official_pref, (0.0, 1.5))  # alpaca_eval encodes a draw as 1.5 (0 in older files)
    keep = ~np.isnan(official_pref) & ~draw
    official_model = (official_pref > 1.5)[keep]
    p_combined = np.array([a["preference"] - 1 for a in local])[keep]
    p_baseline_first = np.array([a["p_model_baseline_first"] for a in local])[keep]
    p_model_first = np.array([a["p_model_model_first"] for a in local])[keep]
    local_model = p_combined > 0.5

    summary = {
        "judge": description,
        "official_annotator": info.annotator,
        "pair": f"{args.model} vs {info.reference}",
        "subset": {"limit": args.limit, "seed": args.seed, "indices": indices},
        "n": len(indices),
        "n_compared": int(keep.sum()),
        "official_draws_excluded": int((~keep).sum()),
        "official_model_wins": int(official_model.sum()),
        "agreement_both_orders": rate((local_model == official_model).astype(float)),
        "agreement_baseline_first_only": rate(((p_baseline_first > 0.5) == official_model).astype(float)),
        "agreement_model_first_only": rate(((p_model_first > 0.5) == official_model).astype(float)),
        "agreement_always_baseline": rate((~official_model).astype(float)),
        "cohen_kappa_both_orders": cohen_kappa(local_model.astype(float), official_model.astype(float)),
        "pearson_soft_preference": float(np.corrcoef(p_combined, (official_pref[keep] - 1))[0, 1])
        if p_combined.std() > 0 and official_pref[keep].std() > 0
        else None,
        "position_bias": position_bias(local),
        "local_metrics": compute_metrics(local, lc=False),
        "official_metrics_same_subset": compute_metrics([official[i] for i in indices], lc=False),
        "seconds": round(seconds, 1),
        "seconds_per_judgment": round(seconds / (2 * len(indices)), 3),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT_DIR / f"{stem}.json", summary)
    lines = [
        json.dumps(
            {
                "index": a["index"],
                "official_preference": float(official[a["index"]]["preference"]),
                "local_preference": a["preference"],
                "p_model_baseline_first": a["p_model_baseline_first"],
                "p_model_model_first": a["p_model_model_first"],
            }
        )
        for a in local
    ]
    atomic_write_text(OUT_DIR / f"{stem}.jsonl", "\n".join(lines) + "\n")
    printable = {k: v for k, v in summary.items() if k != "subset"}
    print(json.dumps(printable, indent=2))


if __name__ == "__main__":
    main()
