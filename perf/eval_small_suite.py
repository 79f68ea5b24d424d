"""Evaluate SmolLM2-135M-Instruct (the GGUF in ../shared) on an evaluation suite (default `small`) and
record the table, with standard errors and wall time, in BENCHMARKS.md.

Run: HARNESS_CACHE=/tmp/hcache PYTHONPATH=. python perf/eval_small_suite.py [--suite small] [--no-write]
On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads made generation
about 10x slower here under load (measured: 48 tokens in 45 s spinning vs 5 s passive).
Per-example results and the full result JSON go to --output (default runs/perf-eval-<suite>/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.errors import HarnessError  # noqa: E402
from harness.records import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    git_commit,
    host_info,
    library_versions,
    peak_memory,
)

DEFAULT_GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## Evaluation: {suite} suite on SmolLM2-135M-Instruct"


def chance_level(rows: list[dict[str, Any]]) -> float | None:
    """Expected accuracy of uniform guessing over the evaluated items (1 / number of choices)."""
    if not rows or not all("loglikelihoods" in row for row in rows):
        return None
    return sum(1 / len(row["loglikelihoods"]) for row in rows) / len(rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def render_section(suite_name: str, result: dict[str, Any], eval_dir: Path) -> str:
    evaluation = result["evaluation"]
    lines = [
        SECTION.format(suite=suite_name),
        "",
        f"`{result['command']}` on {result['date']} (git {result['git_commit']}): SmolLM2-135M-Instruct from "
        f"`{Path(result['weights']).name}` (dequantized to fp32), lm-eval {result['versions'].get('lm_eval')}, "
        f"torch {result['versions'].get('torch')}, {result['host'].get('cpu_count', '?')} CPU cores, "
        f"{result['torch_threads']} torch threads (OMP_WAIT_POLICY={result.get('omp_wait_policy') or 'unset'}), "
        f"batch size {result['batch_size']}.",
        "",
        "| task | items | shots | prompt | metric | value ± stderr | chance | seconds |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for task, entry in evaluation["tasks"].items():
        if "n" not in entry:
            continue
        rows = read_rows(eval_dir / f"samples_{task}.jsonl")
        chance = chance_level(rows)
        how = "chat template" if entry["chat_template"] else "plain"
        if entry.get("gen_kwargs"):
            how += ", " + ", ".join(f"{k}={v}" for k, v in entry["gen_kwargs"].items())
        subset = f"{entry['n']} (random, seed {entry['sample']['seed']})" if entry.get("sample") else str(entry["n"])
        metrics = [(name, value) for name, value in entry.items() if isinstance(value, dict) and "value" in value]
        for index, (metric, value) in enumerate(metrics):
            stderr = f"{value['stderr']:.3f}" if value["stderr"] is not None else "n/a"
            shown_chance = f"{chance:.3f}" if chance is not None and metric in ("acc", "acc_norm") and "mc2" not in task else ""
            first = index == 0
            lines.append(
                f"| {task if first else ''} | {subset if first else ''} | {entry['num_fewshot'] if first else ''} | "
                f"{how if first else ''} | {metric} | {value['value']:.3f} ± {stderr} | {shown_chance} | "
                f"{entry['seconds'] if first else ''} |"
            )
    load = result["load_average"]
    cpu = result.get("cpu_seconds")
    cpu_text = f"; the process used {cpu / 60:.1f} min of CPU time (user + system, both threads)" if cpu else ""
    lines += [
        "",
        f"Wall time {result['wall_seconds'] / 60:.1f} min for the suite (model load {result['load_seconds']:.0f} s "
        f"before it){cpu_text}; peak RSS {result['memory']['peak_rss_gib']:.2f} GiB. System load average (1 min) "
        f"{load['start']:.1f} at the start and {load['end']:.1f} at the end on {result['host'].get('cpu_count', '?')} "
        "cores: other jobs shared the CPU, so the times are upper bounds for an idle machine.",
        "",
        f"Stderr: lm-eval's (sample standard deviation / sqrt(n)); IFEval instruction-level: ratio estimator with "
        f"prompts as clusters. Chance: mean of 1/number of choices over the evaluated items (uniform guessing; "
        f"a model that always picks the majority answer can differ, e.g. BoolQ's \"yes\"). "
        f"{result['verdict']} For scale: on this machine idle, ARC-Easy's first 500 items took 113 s "
        f"(plain prompt, fp32; environment notes).",
        "",
    ]
    return "\n".join(lines)


def update_benchmarks_md(section: str, heading: str) -> None:
    """Replace this section (up to the next '## ' heading) or append it; other sections are left alone."""
    text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(BENCHMARKS_MD, text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="small")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (a quick check; recorded)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--render", type=Path, default=None, help="only re-render the section from a result.json")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text(encoding="utf-8"))
        section = render_section(result["suite"], result, args.render.parent / "eval")
        print(section)
        if not args.no_write:
            update_benchmarks_md(section, SECTION.format(suite=result["suite"]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        run(args)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> None:
    import torch

    from harness.evaluation import load_suite, plan_suite, run_suite
    from harness.models import load_model_and_tokenizer, resolve_model

    if not args.gguf.is_file():
        raise HarnessError(f"SmolLM2 GGUF not found: {args.gguf} (pass --gguf PATH)")
    suite = load_suite(args.suite)
    plan_suite(suite)
    output = args.output or ROOT / "runs" / f"perf-eval-{args.suite}"
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(args.gguf)))
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = run_suite(model, tokenizer, suite, output_dir=output / "eval", limit=args.limit, batch_size=args.batch_size)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime
    arc = evaluation["tasks"].get("local_arc_easy", {}).get("acc")
    verdict = ""
    if arc is not None and arc["stderr"]:
        chance = chance_level(read_rows(output / "eval" / "samples_local_arc_easy.jsonl"))
        z = (arc["value"] - chance) / arc["stderr"]
        verdict = (
            f"ARC-Easy acc {arc['value']:.3f} ± {arc['stderr']:.3f} against chance {chance:.3f}: "
            f"{z:.1f} standard errors above it."
        )
    command = "python perf/eval_small_suite.py" + (f" --suite {args.suite}" if args.suite != "small" else "")
    if args.limit:
        command += f" --limit {args.limit}"
    result = {
        "suite": args.suite,
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "git_commit": git_commit(),
        "weights": str(args.gguf),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_seconds": round(load_seconds, 1),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "evaluation": evaluation,
        "verdict": verdict,
        "memory": peak_memory(),
        "versions": library_versions(),
        "host": host_info(),
    }
    atomic_write_json(output / "result.json", result)
    section = render_section(args.suite, result, output / "eval")
    print(section)
    if not args.no_write:
        update_benchmarks_md(section, SECTION.format(suite=args.suite))


if __name__ == "__main__":
    main()
