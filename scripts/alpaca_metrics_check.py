"""Recompute AlpacaEval metrics from the official annotations in ../shared and compare with the
official leaderboard values (win rate, standard error; LC win rate with its measured gap).

With --replay, the AlpacaEval 2 annotations are also re-derived end to end: a local server on
127.0.0.1 (tests/harness/openai_server.py) answers each judge request with the official judge's
recorded completion, and the harness's openai judge runs alpaca_eval's annotator against it.

LC variants: the package's GLM with (a) the shipped local difficulty estimate (in-sample for the
three models it was built from), (b) a leave-one-out estimate built from the OTHER annotated models
only (the honest figure for a new model), (c) no difficulty term (length_controlled_minimal).

Usage: python scripts/alpaca_metrics_check.py [--shared ../shared] [--bootstrap 200] [--replay]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.alpaca import VERSIONS, compute_metrics, estimate_difficulty, load_difficulty  # noqa: E402
from harness.io import atomic_write_json  # noqa: E402

# Official values: shared/README.md, from alpaca_eval 0.6.6's leaderboards/data_AlpacaEval*/ CSVs.
OFFICIAL = {
    ("alpaca-7b", "2"): {"win_rate": 2.5915, "standard_error": 0.4871, "lc": 5.8755},
    ("falcon-7b-instruct", "2"): {"win_rate": 2.1466, "standard_error": 0.4542, "lc": 4.0369},
    ("text_davinci_003", "2"): {},
    ("alpaca-7b", "1"): {"win_rate": 26.4596, "standard_error": 1.5357},
    ("alpaca-7b-neft", "1"): {"win_rate": 61.6438, "standard_error": 1.7170},
}


def load(shared: Path, model: str, version: str) -> list[dict]:
    annotator = VERSIONS[version].annotator
    rows = json.loads((shared / "data/alpaca_eval/annotated" / model / f"{annotator}_annotations.json").read_text())
    return [r | {"index": i} for i, r in enumerate(rows)]


def replay(annotations: list[dict]) -> dict:
    """Judge the official outputs again through the openai judge, the server replaying recorded completions."""
    import os
    import tempfile

    from harness.alpaca import judge_outputs
    from harness.judge import JudgeOptions, make_judge
    from tests.harness.openai_server import OpenAIServer

    os.environ.setdefault("OPENAI_API_KEY", "replay")  # the local server ignores it
    recorded = {r["instruction"]: r["raw_completion"] for r in annotations if r.get("raw_completion")}
    outputs = [
        {"index": r["index"], "instruction": r["instruction"], "output": r["output_2"], "generator": r["generator_2"]}
        for r in annotations
    ]
    with OpenAIServer(replay=recorded) as server, tempfile.TemporaryDirectory() as scratch:
        judge = make_judge("openai:gpt-4-1106-preview", JudgeOptions(base_url=server.base_url))
        result = judge_outputs(outputs, judge=judge, output_dir=Path(scratch), lc_bootstrap=0)
        replayed = json.loads((Path(scratch) / "annotations.json").read_text())
    differences = [abs(float(a["preference"]) - float(r["preference"])) for a, r in zip(replayed, annotations, strict=True)]
    official_price = sum(float(r.get("price_per_example") or 0) for r in annotations)
    return {
        "win_rate": result["win_rate"],
        "max_preference_difference": max(differences),
        "cost_usd": result["cost"]["cost_usd"],
        "official_cost_usd": round(official_price, 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/alpaca_eval/metrics_check.json")
    parser.add_argument("--replay", action="store_true", help="also re-derive AlpacaEval 2 annotations via a local server")
    args = parser.parse_args()
    results = []
    ae2_models = [m for (m, v) in OFFICIAL if v == "2"]
    ae2 = {m: load(args.shared, m, "2") for m in ae2_models}
    for (model, version), official in OFFICIAL.items():
        annotations = ae2[model] if version == "2" else load(args.shared, model, version)
        entry: dict = {"model": model, "version": version, "official": official}
        if version == "2":
            others = [[float(r["preference"]) for r in ae2[m]] for m in ae2_models if m != model]
            variants = {
                "shipped_difficulty": load_difficulty(),
                "leave_one_out_difficulty": estimate_difficulty(others),
                "no_difficulty": None,
            }
            metrics = compute_metrics(annotations, lc=False)
            for name, difficulty in variants.items():
                lc = compute_metrics(annotations, difficulty=difficulty, lc_bootstrap=args.bootstrap)
                entry[f"lc_{name}"] = lc["length_controlled_win_rate"]
        else:
            metrics = compute_metrics(annotations, difficulty=None, lc_bootstrap=args.bootstrap)
            entry["lc_no_difficulty"] = metrics.pop("length_controlled_win_rate")
        entry["metrics"] = metrics
        if args.replay and version == "2":
            entry["replay"] = replay(annotations)
        results.append(entry)
    atomic_write_json(args.output, results)

    print("| model | version | win rate (ours) | official | std. error (ours) | official | LC leave-one-out ± se | LC shipped difficulty | LC no difficulty | official LC |")  # noqa: E501
    print("|---|---|---|---|---|---|---|---|---|---|")
    def lc(entry: dict, key: str) -> str:
        v = entry.get(key)
        return f"{v['value']:.2f} ± {v['stderr']:.2f}" if v else "—"

    for e in results:
        if "replay" in e:
            r = e["replay"]
            print(
                f"replay {e['model']}: win rate {r['win_rate']['value']:.4f} ± {r['win_rate']['stderr']:.4f}, "
                f"max |preference difference| {r['max_preference_difference']:.2e}, "
                f"cost ${r['cost_usd']} (official ${r['official_cost_usd']})"
            )
    for e in results:
        m, o = e["metrics"], e["official"]
        print(
            f"| {e['model']} | {e['version']} | {m['win_rate']['value']:.4f} | {o.get('win_rate', '—')} | "
            f"{m['win_rate']['stderr']:.4f} | {o.get('standard_error', '—')} | {lc(e, 'lc_leave_one_out_difficulty')} | "
            f"{lc(e, 'lc_shipped_difficulty')} | {lc(e, 'lc_no_difficulty')} | {o.get('lc', '—')} |"
        )


if __name__ == "__main__":
    main()
