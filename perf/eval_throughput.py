"""Evaluation throughput: lm-eval's HFLM against the harness's engine model (harness/lm_engine.py) on the
`small` suite's log-likelihood tasks, SmolLM2-135M-Instruct from the GGUF in ../shared, in one run.

    OMP_WAIT_POLICY=PASSIVE python perf/eval_throughput.py [--limit 8] [--tasks local_arc_easy,...]

Configurations, each in its own process (so each has its own peak memory): HFLM fp32, engine fp32,
engine bf16. Every task is evaluated on its first --limit documents (MMLU: per subject). Reports per
configuration and task: wall seconds (lm-eval's whole task, including building its documents),
seconds inside the model's loglikelihood (what the engine replaces), requests/s, the tokens that went through the
model (its input embedding, padding included), and against HFLM fp32 the maximum per-request
log-likelihood difference and the metric differences. Prints a JSON summary and a markdown table
(paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = {"hflm-fp32": ("hflm", "fp32"), "engine-fp32": ("engine", "fp32"), "engine-bf16": ("engine", "bf16")}


def log_likelihood_tasks() -> list[dict[str, Any]]:
    """The small suite's tasks that lm-eval answers with log-likelihoods (all but IFEval)."""
    from harness.evaluation import load_suite, plan_suite

    suite = load_suite("small")
    return [plan.entry.model_dump() for plan in plan_suite(suite) if not plan.generative]


def run_config(name: str, tasks: list[dict[str, Any]], limit: int, output: Path) -> dict[str, Any]:
    """One configuration in this process: per task seconds, requests, metrics and per-request log-likelihoods."""
    import resource

    import torch
    from lm_eval.models.huggingface import HFLM

    from harness.evaluation import Suite, run_lm_eval
    from harness.models import load_model_and_tokenizer, resolve_model

    model_class, precision = CONFIGS[name]
    in_model: dict[str, float] = {}  # task -> seconds inside loglikelihood (the part the engine replaces)
    original = HFLM.loglikelihood

    def timed(self: Any, requests: Any, disable_tqdm: bool = False) -> Any:
        started = time.perf_counter()
        try:
            return original(self, requests, disable_tqdm=disable_tqdm)
        finally:
            in_model[self.current_task] = in_model.get(self.current_task, 0.0) + time.perf_counter() - started

    HFLM.loglikelihood = timed
    model, tokenizer = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(GGUF)), dtype=torch.float32)
    fed: dict[str, int] = {}  # task -> tokens through the model's embedding (padding included); copies keep the hook
    current = {"task": ""}
    original_loglikelihood = HFLM.loglikelihood

    def tracked(self: Any, requests: Any, disable_tqdm: bool = False) -> Any:
        current["task"] = self.current_task
        return original_loglikelihood(self, requests, disable_tqdm=disable_tqdm)

    HFLM.loglikelihood = tracked

    def count(module: Any, args: Any, output: Any) -> None:
        fed[current["task"]] = fed.get(current["task"], 0) + args[0].numel()

    model.get_input_embeddings().register_forward_hook(count)
    suite = Suite.model_validate({"name": "small-loglikelihood", "description": "bench", "tasks": tasks})
    started = time.perf_counter()
    result = run_lm_eval(model, tokenizer, suite, output_dir=output, limit=limit, model_class=model_class, precision=precision)
    wall = time.perf_counter() - started
    per_task = {}
    for task, entry in result["tasks"].items():
        rows = [json.loads(line) for line in (output / f"samples_{task}.jsonl").read_text().splitlines() if line.strip()]
        lls = [ll for row in sorted(rows, key=lambda r: (r["task"], r["doc_id"])) for ll in row["loglikelihoods"]]
        metrics = {k: v["value"] for k, v in entry.items() if isinstance(v, dict) and "value" in v}
        per_task[task] = {"seconds": entry["seconds"], "model_seconds": round(in_model.get(task, 0.0), 2), "requests": len(lls),
                          "tokens_through_model": fed.get(task, 0),
                          "loglikelihoods": lls, "metrics": metrics,
                          "model_class": entry["model_class"], "precision": entry["precision"]}
    return {"config": name, "wall_seconds": wall, "tasks": per_task, "torch_threads": torch.get_num_threads(),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=8, help="first N documents per task (MMLU: per subject)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the small suite's tasks")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = log_likelihood_tasks()
    if args.tasks:
        wanted = args.tasks.split(",")
        tasks = [t for t in tasks if t["task"] in wanted]
    if args.child:
        print(json.dumps(run_config(args.child, tasks, args.limit, args.output)))
        return
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.configs.split(","):
            command = [sys.executable, __file__, "--child", name, "--limit", str(args.limit),
                       "--output", str(Path(scratch) / name)] + (["--tasks", args.tasks] if args.tasks else [])
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results.get("hflm-fp32")
    summary: dict[str, Any] = {"limit": args.limit, "load_average_before": round(load_before, 2),
                               "load_average_after": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
                               "configs": {}}
    for name, result in results.items():
        entry = {"wall_seconds": round(result["wall_seconds"], 2), "peak_rss_gib": result["peak_rss_gib"],
                 "torch_threads": result["torch_threads"], "tasks": {}}
        for task, measured in result["tasks"].items():
            row = {"seconds": measured["seconds"], "model_seconds": measured["model_seconds"], "requests": measured["requests"],
                   "requests_per_s": round(measured["requests"] / measured["seconds"], 2),
                   "tokens_through_model": measured["tokens_through_model"],
                   "model_class": measured["model_class"], "metrics": measured["metrics"]}
            if reference is not None and name != "hflm-fp32":
                theirs = reference["tasks"][task]
                row["max_abs_ll_diff"] = max(abs(a - b) for a, b in zip(measured["loglikelihoods"], theirs["loglikelihoods"], strict=True))
                row["metric_diffs"] = {m: measured["metrics"][m] - theirs["metrics"][m] for m in measured["metrics"]}
                row["speedup"] = round(theirs["seconds"] / measured["seconds"], 2)
                row["model_speedup"] = round(theirs["model_seconds"] / measured["model_seconds"], 2)
            entry["tasks"][task] = row
        if reference is not None and name != "hflm-fp32":
            entry["speedup_total"] = round(sum(t["seconds"] for t in reference["tasks"].values())
                                           / sum(t["seconds"] for t in result["tasks"].values()), 2)
            entry["model_speedup_total"] = round(sum(t["model_seconds"] for t in reference["tasks"].values())
                                                 / sum(t["model_seconds"] for t in result["tasks"].values()), 2)
        summary["configs"][name] = entry
    print(json.dumps(summary, indent=1))
    print(markdown(summary))


def markdown(summary: dict[str, Any]) -> str:
    names = list(summary["configs"])
    tasks = list(summary["configs"][names[0]]["tasks"])
    lines = ["| task | requests | " + " | ".join(f"{n}: wall s / in-model s (speed-up)" for n in names)
             + " | tokens through the model: " + " / ".join(names) + " | max LL diff fp32 / bf16 | metric diffs bf16 |",
             "|---|---:|" + "---:|" * len(names) + "---:|---|---|"]
    for task in tasks:
        cells = []
        for name in names:
            row = summary["configs"][name]["tasks"][task]
            speed = f" ({row['speedup']}× / {row['model_speedup']}×)" if "speedup" in row else ""
            cells.append(f"{row['seconds']:.1f} / {row['model_seconds']:.1f}{speed}")
        fp32 = summary["configs"].get("engine-fp32", {}).get("tasks", {}).get(task, {})
        bf16 = summary["configs"].get("engine-bf16", {}).get("tasks", {}).get(task, {})
        diffs = f"{fp32.get('max_abs_ll_diff', float('nan')):.1e} / {bf16.get('max_abs_ll_diff', float('nan')):.2f}"
        metric = ", ".join(f"{m} {d:+.3f}" for m, d in bf16.get("metric_diffs", {}).items())
        requests = summary["configs"][names[0]]["tasks"][task]["requests"]
        tokens = " / ".join(f"{summary['configs'][name]['tasks'][task]['tokens_through_model']:,}" for name in names)
        lines.append(f"| {task} | {requests} | " + " | ".join(cells) + f" | {tokens} | {diffs} | {metric} |")
    totals = []
    for name in names:
        config = summary["configs"][name]
        seconds = sum(t["seconds"] for t in config["tasks"].values())
        in_model = sum(t["model_seconds"] for t in config["tasks"].values())
        requests = sum(t["requests"] for t in config["tasks"].values())
        speed = f" ({config['speedup_total']}× / {config['model_speedup_total']}×)" if "speedup_total" in config else ""
        totals.append(f"{seconds:.1f} / {in_model:.1f}{speed}; {requests / seconds:.1f} req/s; peak RSS {config['peak_rss_gib']} GiB")
    tokens = " / ".join(f"{sum(t['tokens_through_model'] for t in summary['configs'][name]['tasks'].values()):,}" for name in names)
    lines.append("| all | | " + " | ".join(totals) + f" | {tokens} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
