"""Training throughput of the harness core against TRL's SFTTrainer and a pad-to-max-length Trainer.

Every configuration trains the same model on the same tokenized examples (chat template, loss on
response tokens only) for the same number of optimizer steps, each in its own subprocess so that
each peak RSS is its own. Reported per configuration: real (non-pad) tokens per second over the
training steps with its standard error, wall time, peak RSS, and the per-step loss curve; the core's
pure-bf16 loss curve is compared with its fp32 one.

    python perf/train_throughput.py                  # the five default configurations, ~10-15 min
    python perf/train_throughput.py --steps 5 --configs core-bf16,trl-packing
    python perf/train_throughput.py --model tiny --data alpaca-sample --records 32 --steps 2   # smoke

Configurations (baselines use bf16 autocast on fp32 weights, as TRL users on CPU do):
  core-bf16    harness.training.train_sft, precision=bf16 (pure bf16 weights, fp32 master), packing
  core-fp32    the same in fp32
  trl-packing  TRL SFTTrainer, packing_strategy="bfd" (padding-free position_ids), completion-only loss
  trl-padding  TRL SFTTrainer without packing: each batch padded to its longest example
  pad512       transformers Trainer padding every example to max_length (as the Phased IFT code does)
Packed configurations take --packed-rows rows of up to max_length tokens per step (2 rows of 512
hold about 9.5 of these examples); padded ones take --batch-examples examples per step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's harness

from harness.errors import HarnessError  # noqa: E402
from harness.io import atomic_write_json  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_MODEL_PATH = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = SHARED / "data" / "instructions" / "alpaca_random_9k.json"
CONFIGS = {
    "core-bf16": "harness core, pure bf16 weights + fp32 master, padding-free packing",
    "core-fp32": "harness core, fp32, padding-free packing",
    "trl-packing": "TRL SFTTrainer, bfd packing (padding-free), bf16 autocast",
    "trl-padding": "TRL SFTTrainer, pad to longest in batch, bf16 autocast",
    "pad512": "Trainer, every example padded to max_length, bf16 autocast",
}
DEFAULT_CONFIGS = ",".join(CONFIGS)
REFERENCE = "trl-packing"


# ----------------------------------------------------------------------------- measurement helpers


class StepMeter:
    """Per-step wall time and real tokens, from a forward pre-hook on the decoder stack.

    Each optimizer step runs exactly one decoder forward here (no gradient accumulation), so step i
    lasts from forward i's start to forward i+1's start (the last one to the end of training). Real
    tokens: the attention mask's sum when there is one, else every token (padding-free inputs)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.tokens: list[int] = []
        self.end = 0.0

    def hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            count = int(mask.sum())
        elif ids is not None:
            count = int(ids.numel())
        else:
            count = int(kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1])
        self.starts.append(time.perf_counter())
        self.tokens.append(count)

    def step_seconds(self) -> list[float]:
        bounds = self.starts + [self.end]
        return [later - earlier for earlier, later in zip(bounds[:-1], bounds[1:], strict=True)]


def ratio_with_stderr(tokens: list[int], seconds: list[float]) -> tuple[float, float]:
    """Total tokens / total seconds, and its standard error over steps (ratio estimator, delta method)."""
    n = len(tokens)
    rate = sum(tokens) / sum(seconds)
    if n < 2:
        return rate, float("nan")
    mean_seconds = sum(seconds) / n
    residual = sum((t - rate * s) ** 2 for t, s in zip(tokens, seconds, strict=True)) / (n - 1)
    return rate, math.sqrt(residual / n) / mean_seconds


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    values = [int(value) for value in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(flag for flag in flags if flag.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


# ----------------------------------------------------------------------------- the worker (one configuration)


def load_inputs(options: dict[str, Any], dtype: Any) -> tuple[Any, Any, list[Any], str]:
    from harness.data import load_instruction_data
    from harness.models import load_model_and_tokenizer, resolve_model
    from harness.templates import tokenize_for_training

    resolved = resolve_model(options["model"], options["model_path"])
    model, tokenizer = load_model_and_tokenizer(resolved, dtype=dtype)
    records = load_instruction_data(options["data"], limit=options["records"]).records
    examples, _ = tokenize_for_training(records, tokenizer, resolved.entry.template, options["max_length"])
    return model, tokenizer, examples, resolved.entry.template


def run_core(name: str, options: dict[str, Any], meter: StepMeter) -> dict[str, Any]:
    from rich.console import Console

    from harness.losses import causal_lm_parts
    from harness.spec import TrainingSpec
    from harness.training import train_sft, weight_dtype

    precision = "bf16" if name == "core-bf16" else "fp32"
    model, tokenizer, examples, _ = load_inputs(options, weight_dtype(precision))
    causal_lm_parts(model)[0].register_forward_pre_hook(meter.hook, with_kwargs=True)
    settings = TrainingSpec(
        learning_rate=options["learning_rate"], max_steps=options["steps"], batch_size=options["packed_rows"],
        max_length=options["max_length"], packing=True, precision=precision, warmup_ratio=0.1,
        save_steps=0, logging_steps=1,
    )
    with tempfile.TemporaryDirectory() as directory:
        _, result = train_sft(
            model, tokenizer, examples, settings, Path(directory), seed=options["seed"],
            console=Console(stderr=True), description=name,
        )
    meter.end = time.perf_counter()
    assert sum(meter.tokens) == result.real_tokens, (sum(meter.tokens), result.real_tokens)
    return {"loss_curve": [loss for _, loss in result.loss_curve], "train_wall_s": result.wall_seconds,
            "examples_in_data": len(examples)}


def _baseline_arguments(options: dict[str, Any], directory: str, batch_size: int) -> dict[str, Any]:
    return dict(
        output_dir=directory, max_steps=options["steps"], per_device_train_batch_size=batch_size,
        learning_rate=options["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=int(0.1 * options["steps"]), weight_decay=0.0, max_grad_norm=1.0,
        bf16=True, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=options["seed"],
        data_seed=options["seed"], disable_tqdm=True, dataloader_num_workers=0,
    )


def run_trl(name: str, options: dict[str, Any], meter: StepMeter) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from harness.losses import causal_lm_parts

    model, tokenizer, examples, _ = load_inputs(options, torch.float32)
    causal_lm_parts(model)[0].register_forward_pre_hook(meter.hook, with_kwargs=True)
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    packing = name == "trl-packing"
    with tempfile.TemporaryDirectory() as directory:
        arguments = _baseline_arguments(options, directory, options["packed_rows"] if packing else options["batch_examples"])
        config = SFTConfig(
            **arguments, max_length=options["max_length"], packing=packing, packing_strategy="bfd",
            completion_only_loss=True, dataset_num_proc=None,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        meter.end = time.perf_counter()
    curve = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"loss_curve": curve, "train_wall_s": meter.end - started, "examples_in_data": len(examples)}


def run_pad_to_max(name: str, options: dict[str, Any], meter: StepMeter) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from harness.losses import causal_lm_parts

    model, tokenizer, examples, _ = load_inputs(options, torch.float32)
    causal_lm_parts(model)[0].register_forward_pre_hook(meter.hook, with_kwargs=True)
    width, pad = options["max_length"], tokenizer.pad_token_id

    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        """Pad every example to max_length (Stanford Alpaca / Phased IFT style), loss on the response."""
        return {
            "input_ids": torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch]),
            "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]),
            "labels": torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch]),
        }

    with tempfile.TemporaryDirectory() as directory:
        arguments = TrainingArguments(**_baseline_arguments(options, directory, options["batch_examples"]),
                                      remove_unused_columns=False)
        trainer = Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collate)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        meter.end = time.perf_counter()
    curve = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"loss_curve": curve, "train_wall_s": meter.end - started, "examples_in_data": len(examples)}


def run_worker(name: str, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    meter = StepMeter()
    runner = run_core if name.startswith("core-") else run_trl if name.startswith("trl-") else run_pad_to_max
    outcome = runner(name, options, meter)
    seconds = meter.step_seconds()
    rate, stderr = ratio_with_stderr(meter.tokens, seconds)
    steady_rate, steady_stderr = ratio_with_stderr(meter.tokens[1:], seconds[1:])
    return {
        "config": name,
        "description": CONFIGS[name],
        "steps": len(seconds),
        "real_tokens": sum(meter.tokens),
        "step_tokens": meter.tokens,
        "step_seconds": [round(value, 4) for value in seconds],
        "steps_wall_s": sum(seconds),
        "tokens_per_s": rate,
        "tokens_per_s_stderr": stderr,
        "steady_tokens_per_s": steady_rate,  # without the first step (one-off kernel and optimizer set-up)
        "steady_tokens_per_s_stderr": steady_stderr,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": torch.get_num_threads(),
        **outcome,
    }


# ----------------------------------------------------------------------------- the driver


def run_config(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess; measure what else the machine was doing meanwhile."""
    with tempfile.TemporaryDirectory() as directory:
        result_path = Path(directory) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-result", str(result_path),
                   "--worker-options", json.dumps(options)]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        load_before = os.getloadavg()
        busy_before = cpu_busy_seconds()
        child_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        completed = subprocess.run(command, env=environment, cwd=REPO, check=False)
        wall = time.perf_counter() - started
        child_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if completed.returncode != 0:
            raise HarnessError(f"configuration '{name}' failed (exit {completed.returncode}); its output is above")
        result = json.loads(result_path.read_text())
    own = (child_after.ru_utime - child_before.ru_utime) + (child_after.ru_stime - child_before.ru_stime)
    others = max(cpu_busy_seconds() - busy_before - own, 0.0)
    result.update({
        "process_wall_s": wall,
        "loadavg_before": [round(value, 2) for value in load_before],
        "loadavg_after": [round(value, 2) for value in os.getloadavg()],
        # CPU seconds other processes used per second of this run: 0 = undisturbed, 1 = one core taken
        "other_load_cores": others / wall,
    })
    return result


def summarize(runs: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Pool repeats per configuration (steps are the units of the standard error); ratios and loss check."""
    summary: dict[str, Any] = {"configs": {}}
    for name in dict.fromkeys(run["config"] for run in runs):
        mine = [run for run in runs if run["config"] == name]
        tokens = [t for run in mine for t in run["step_tokens"]]
        seconds = [s for run in mine for s in run["step_seconds"]]
        rate, stderr = ratio_with_stderr(tokens, seconds)
        summary["configs"][name] = {
            "tokens_per_s": rate, "tokens_per_s_stderr": stderr, "runs": len(mine),
            "steady_tokens_per_s": sum(r["steady_tokens_per_s"] for r in mine) / len(mine),
            "steps_wall_s": sum(r["steps_wall_s"] for r in mine) / len(mine),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in mine),
            "real_tokens_per_run": sum(r["real_tokens"] for r in mine) / len(mine),
            "other_load_cores": max(r["other_load_cores"] for r in mine),
            "first_loss": mine[0]["loss_curve"][0], "last_loss": mine[0]["loss_curve"][-1],
        }
    configs = summary["configs"]
    if REFERENCE in configs:
        base = configs[REFERENCE]
        for entry in configs.values():
            ratio = entry["tokens_per_s"] / base["tokens_per_s"]
            relative = math.hypot(entry["tokens_per_s_stderr"] / entry["tokens_per_s"],
                                  base["tokens_per_s_stderr"] / base["tokens_per_s"])
            entry["vs_trl_packing"] = ratio
            entry["vs_trl_packing_stderr"] = ratio * relative
    if "core-bf16" in configs and "core-fp32" in configs:
        bf16 = next(run for run in runs if run["config"] == "core-bf16")["loss_curve"]
        fp32 = next(run for run in runs if run["config"] == "core-fp32")["loss_curve"]
        differences = [abs(a - b) for a, b in zip(bf16, fp32, strict=True)]
        summary["loss_curve_check"] = {
            "max_abs_difference": max(differences), "mean_abs_difference": sum(differences) / len(differences),
            "tolerance": tolerance, "within_tolerance": max(differences) <= tolerance,
            "core_bf16": bf16, "core_fp32": fp32,
        }
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| configuration | real tokens/s | x TRL packing | steps wall (s) | peak RSS (GiB) | loss step 1 -> last | other load (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["configs"].items():
        ratio = (f"{entry['vs_trl_packing']:.2f} ± {entry['vs_trl_packing_stderr']:.2f}"
                 if "vs_trl_packing" in entry else "-")
        lines.append(
            f"| {name} | {entry['tokens_per_s']:.1f} ± {entry['tokens_per_s_stderr']:.1f} | {ratio} | "
            f"{entry['steps_wall_s']:.1f} | {entry['peak_rss_gib']:.2f} | "
            f"{entry['first_loss']:.4f} -> {entry['last_loss']:.4f} | {entry['other_load_cores']:.2f} |"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(), "uptime": uptime,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--steps", default=15, show_default=True, help="optimizer steps per configuration")
@click.option("--records", default=256, show_default=True, help="first N records of the data")
@click.option("--max-length", default=512, show_default=True, help="tokens per example and per packed row")
@click.option("--batch-examples", default=8, show_default=True, help="examples per step (unpacked configurations)")
@click.option("--packed-rows", default=2, show_default=True, help="packed rows per step (packed configurations)")
@click.option("--learning-rate", default=2e-5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--configs", default=DEFAULT_CONFIGS, show_default=True, help="comma-separated, run in this order")
@click.option("--repeat", default=1, show_default=True, help="run the list this many times, interleaved")
@click.option("--model", default="smollm2-135m-instruct", show_default=True, help="model-set name")
@click.option("--model-path", default=str(DEFAULT_MODEL_PATH), show_default=True, help="local weights ('' for none)")
@click.option("--data", default=str(DEFAULT_DATA), show_default=True, help="instruction data (name or file)")
@click.option("--loss-tolerance", default=0.05, show_default=True,
              help="max |loss_bf16 - loss_fp32| per step for the core's bf16 curve to count as matching")
@click.option("--output", default=str(REPO / "perf" / "results" / "train_throughput.json"), show_default=True)
@click.option("--worker", default=None, hidden=True)
@click.option("--worker-result", default=None, hidden=True)
@click.option("--worker-options", default=None, hidden=True)
def main(steps: int, records: int, max_length: int, batch_examples: int, packed_rows: int, learning_rate: float,
         seed: int, configs: str, repeat: int, model: str, model_path: str, data: str, loss_tolerance: float,
         output: str, worker: str | None, worker_result: str | None, worker_options: str | None) -> None:
    """Measure training throughput of the harness core against TRL and a pad-to-max-length Trainer."""
    if worker is not None:
        result = run_worker(worker, json.loads(worker_options or "{}"))
        Path(worker_result).write_text(json.dumps(result))
        return
    try:
        names = [name.strip() for name in configs.split(",") if name.strip()]
        unknown = [name for name in names if name not in CONFIGS]
        if unknown or not names:
            raise HarnessError(f"--configs: unknown '{','.join(unknown)}' (valid: {', '.join(CONFIGS)})")
        path = model_path or None
        if path is not None and not Path(path).exists():
            raise HarnessError(f"--model-path {path} not found (the SmolLM2 GGUF lives in ../shared/models)")
        if not Path(data).exists() and "/" in data:
            raise HarnessError(f"--data {data} not found (the Alpaca subsets live in ../shared/data/instructions)")
        options = {"steps": steps, "records": records, "max_length": max_length, "batch_examples": batch_examples,
                   "packed_rows": packed_rows, "learning_rate": learning_rate, "seed": seed, "model": model,
                   "model_path": path, "data": data}
        if path is not None and path.endswith(".gguf"):
            from harness.models import convert_gguf

            convert_gguf(Path(path))  # once, outside every measurement
        info = machine_info()
        click.echo(f"machine: {info['cpu']}, {info['cores']} cores, {' '.join(info['cpu_flags'])}; torch "
                   f"{info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, trl {info['trl']}")
        click.echo(f"load before: {info['uptime']}")
        runs = []
        for round_number in range(repeat):
            for name in names:
                click.echo(f"[{round_number + 1}/{repeat}] {name}: {CONFIGS[name]}", err=True)
                run = run_config(name, options)
                runs.append(run)
                click.echo(f"    {run['tokens_per_s']:.1f} ± {run['tokens_per_s_stderr']:.1f} real tokens/s over "
                           f"{run['steps']} steps ({run['real_tokens']} tokens, {run['steps_wall_s']:.1f} s), peak RSS "
                           f"{run['peak_rss_gib']:.2f} GiB, other load {run['other_load_cores']:.2f} cores", err=True)
                if run["other_load_cores"] > 0.25:
                    click.echo("    warning: other processes used the CPU during this run; repeat (--repeat) "
                               "or rerun on a quiet machine", err=True)
        info["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        summary = summarize(runs, loss_tolerance)
        command = "python perf/train_throughput.py " + " ".join(sys.argv[1:])
        atomic_write_json(Path(output), {"command": command.strip(), "options": options, "machine": info,
                                         "summary": summary, "runs": runs})
        click.echo(markdown_table(summary))
        check = summary.get("loss_curve_check")
        if check:
            verdict = "within" if check["within_tolerance"] else "OUTSIDE"
            click.echo(f"core bf16 vs fp32 loss curve: max |difference| {check['max_abs_difference']:.4f} "
                       f"(mean {check['mean_abs_difference']:.4f}) over {len(check['core_bf16'])} steps, "
                       f"{verdict} the tolerance {check['tolerance']}")
        click.echo(f"load after: {info['uptime_after']}")
        click.echo(f"results: {output}")
    except HarnessError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
