"""The `harness` command line. User errors print one line and exit 2; never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from harness import __version__
from harness.compat import quiet_elastic_launcher, quiet_libraries
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.record import RunRecord

console = Console(stderr=True)


def stdout_console() -> Console:
    """Tables go to stdout; when piped (CI, logs) use a wide fixed width so rows are not wrapped."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
def cli() -> None:
    """Compare instruction-tuning recipes (one-off SFT, Phased IFT, IFD, SFTMix, UNIFIT) under one protocol."""


@cli.command()
@click.option("--recipe", "-r", default=None, help="one-off, phased, ifd, ... or all (see `harness recipes`)")
@click.option("--model", "-m", default=None, help="model-set name, local dir/.gguf, or hub id (default: tiny)")
@click.option("--data", "-d", default=None, help="shipped data name, file path, or hub dataset id")
@click.option("--suite", "-s", default=None, help="evaluation suite (see `harness suites`)")
@click.option("--config", "-c", "config_file", type=click.Path(path_type=Path), default=None, help="YAML run spec")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec key, e.g. training.epochs=2")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--seed", type=int, default=None, help="random seed (default 0)")
@click.option("--seeds", "seeds_text", default=None, metavar="LIST|N",
              help="train each recipe once per seed: 0,1,2 or a count (3 = 0,1,2); evaluation items and prompts stay fixed")
@click.option("--limit", type=int, default=None, help="evaluation items per task (overrides the suite)")
@click.option("--online", is_flag=True, default=None, help="evaluate with lm-eval's own hub-backed tasks (needs hub access)")
@click.option("--docker", "in_docker", is_flag=True, help="run inside the harness image (built when missing)")
@click.option("--image", default=None, help="with --docker: image tag (default: the image of this checkout)")
@click.option("--gpus", default=None, help="with --docker: all | N | 0,1 | none (default: all if the host has GPUs)")
@click.option(
    "--distributed",
    type=click.Choice(["ddp", "fsdp", "zero3"]),
    default="ddp",
    show_default=True,
    help="with several processes (--docker on several GPUs, or --nproc): DDP (replicated) or FSDP (FSDP2, sharded); "
    "ZeRO-3 is refused for now",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="data-parallel processes on this machine (one per GPU; gloo processes on CPU) under accelerate launch",
)
@click.option("--docker-network", default=None, help="with --docker: container network, e.g. none (offline) or host")
@click.option("--dry-run", is_flag=True, help="print the resolved spec (YAML) and stop: loads no model, data or judge")
def run(
    recipe: str | None,
    model: str | None,
    data: str | None,
    suite: str | None,
    config_file: Path | None,
    overrides: tuple[str, ...],
    output: Path,
    seed: int | None,
    seeds_text: str | None,
    limit: int | None,
    online: bool | None,
    in_docker: bool,
    image: str | None,
    gpus: str | None,
    distributed: str,
    nproc: int | None,
    docker_network: str | None,
    dry_run: bool,
) -> None:
    """Train with a recipe, evaluate, write a run record and print the results.

    --config takes a YAML run spec, or the name of a shipped paper config (`harness recipes --configs`)."""
    from harness.spec import build_spec, config_path

    if not in_docker and (image or gpus or docker_network):
        raise HarnessError("--image, --gpus and --docker-network need --docker")
    if in_docker and nproc is not None:
        raise HarnessError("--nproc is for runs on this machine; with --docker, --gpus sets the processes (one per GPU)")
    if distributed != "ddp" and not (in_docker or (nproc or 1) > 1):
        raise HarnessError(f"--distributed {distributed} needs several processes: --nproc N, or --docker with several GPUs")
    if distributed == "zero3" and (nproc or 1) > 1:
        from harness.distributed import unsupported_message

        raise HarnessError(unsupported_message(distributed))
    seeds = None
    if seeds_text is not None:
        from harness.spec import parse_seeds

        if seed is not None:
            raise HarnessError("give --seed or --seeds, not both")
        try:
            seeds = parse_seeds(seeds_text)
        except ValueError as error:
            raise HarnessError(f"--seeds {error}") from None
        if len(seeds) > 1 and (in_docker or (nproc or 1) > 1):
            raise HarnessError("--seeds with several seeds runs on this machine in one process; with --docker or "
                               "--nproc give one --seed per command (or use harness sweep)")
        seed = seeds[0] if len(seeds) == 1 else None

    flags: dict[str, Any] = {
        "recipe": recipe,
        "model": model,
        "data.name": data,
        "eval.suite": suite,
        "seed": seed,
        "eval.limit": limit,
        "eval.online": online,
    }
    if config_file is not None:
        config_file = config_path(config_file)
    spec = build_spec(config_file=config_file, overrides=list(overrides), flags=flags)
    seeded = [spec] if seeds is None or len(seeds) == 1 else [spec.model_copy(update={"seed": s}) for s in seeds]
    if dry_run:
        print_resolved_specs(seeded)
        return
    if distributed == "fsdp" and spec.training.lora is not None:
        from harness.distributed import FSDP_LORA_UNSUPPORTED

        raise HarnessError(FSDP_LORA_UNSUPPORTED)
    if in_docker:
        from harness.container import connect

        client = connect()  # no daemon: a one-line error before anything heavy
    quiet_libraries()
    from harness.runner import execute_run, prepare_run

    if spec.recipe == "all":
        from harness.compare import specs_for_all

        prepared_runs = [prepare_run(sub_spec) for one in seeded for sub_spec in specs_for_all(one)]
    else:
        prepared_runs = [prepare_run(one) for one in seeded]  # with --docker too: bad input never starts a container
    if in_docker or ((nproc or 1) > 1 and "WORLD_SIZE" not in os.environ):
        from harness.spec import rerun_argv, write_spec_file

        spec_file = write_spec_file(spec, output)  # the processes started below run exactly this spec
    if in_docker:
        from harness.container import CONTAINER_RUNS, run_docker

        status = run_docker(
            client,
            spec=spec.model_dump(mode="json"),
            run_id=prepared_runs[0].run_id if len(prepared_runs) == 1 else f"all-{spec.content_hash()[:10]}",
            argv=rerun_argv(f"{CONTAINER_RUNS}/{spec_file.relative_to(output).as_posix()}", CONTAINER_RUNS),
            output=output,
            image_tag=image,
            gpus_value=gpus,
            distributed=distributed,
            network=docker_network,
            console=console,
        )
        if status != 0:
            sys.exit(status)
        return
    if (nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:  # launch the processes; each runs the spec file
        sys.exit(launch_processes(nproc or 1, rerun_argv(str(spec_file), str(output)), distributed))
    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # one process speaks for the job
    records = [execute_run(prepared, output, console) for prepared in prepared_runs]
    if console.quiet:
        return
    if len(records) > 1:
        from harness.compare import comparison_table

        stdout_console().print(comparison_table(records))
    else:
        print_record_summary(records[0])


def print_resolved_specs(seeded: list[Any]) -> None:
    """The dry run: each spec as the run would use it (recipe params and the model set's defaults filled
    in) as YAML on stdout, one document per recipe (--recipe all) and seed (--seeds). Reads the suite
    file; loads nothing."""
    import yaml

    from harness.compare import specs_for_all
    from harness.evaluation import load_suite
    from harness.runner import resolve_spec

    load_suite(seeded[0].eval.suite)  # an unknown suite is an error here too
    specs = [sub for spec in seeded for sub in (specs_for_all(spec) if spec.recipe == "all" else [spec])]
    documents = []
    for sub_spec in specs:
        resolved, _, _, model_info = resolve_spec(sub_spec)
        training = resolved.training
        console.print(
            f"dry run: {resolved.recipe} on {model_info.entry.name} ({model_info.weights}); examples per optimizer step "
            f"{training.batch_size * training.gradient_accumulation_steps} per process"
            + ("" if not training.packing else " (rows: packed examples)"),
            soft_wrap=True,
        )
        documents.append(resolved.model_dump(mode="json"))
    click.echo(yaml.safe_dump_all(documents, sort_keys=False), nl=False)


def launch_processes(nproc: int, argv: list[str], distributed: str = "ddp") -> int:
    """`harness <argv>` in `nproc` processes under accelerate launch (DDP, or FSDP2 with the settings of
    docker/accelerate/fsdp.yaml; NCCL on GPUs, gloo on CPU), and the exit status: the first failed
    process's (a user error in it is its one line, said by rank 0).

    The launcher runs in this process so that a failed process gives its status, not the launcher's
    traceback; the processes find each other on a free local port."""
    import socket

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from harness.distributed import FSDP_LAUNCH_SETTINGS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if distributed == "fsdp":  # also torch's elastic launcher; the processes read the FSDP_* variables it sets
        engine = ["--use_fsdp", *[part for key, value in FSDP_LAUNCH_SETTINGS.items() for part in (f"--{key}", value)]]
    else:
        engine = ["--multi_gpu"]  # torch's elastic launcher, also on CPU (gloo); accelerate's --cpu would start one process
    args = launch_command_parser().parse_args([
        "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *engine,
        "-m", "harness.cli", *argv,
    ])  # fmt: skip
    console.print(
        f"[bold]{nproc} processes ({distributed})[/]: accelerate launch -m harness.cli {' '.join(argv)}", soft_wrap=True
    )
    try:
        with quiet_elastic_launcher():  # the failure is reported below
            launch_command(args)
    except ChildFailedError as failed:
        first = min(failed.failures.values(), key=lambda failure: failure.timestamp)
        status = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # killed by a signal: 128 + signal
        if status != 2:  # 2: a user error, already said in one line by the process
            console.print(f"error: the {nproc}-process run failed: process {first.local_rank} exited with {status}")
        return status
    except SignalException as stopped:
        console.print(f"error: stopped by {stopped.sigval.name}; rerun the same command to resume")
        return 128 + int(stopped.sigval)
    return 0


def print_record_summary(record: RunRecord) -> None:
    from harness.compare import recipe_label

    table = Table(title=f"{record.run_id}  ({recipe_label(record)} on {record.model.name})")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    table.add_column("n", justify="right")
    for task, entry in record.metrics.items():
        for metric, value in entry.items():
            if isinstance(value, dict) and "value" in value:
                shown, stderr = value["value"], value.get("stderr")  # None: not computed (e.g. LC win rate on few items)
                table.add_row(
                    task,
                    metric,
                    f"{shown:.4f}" if shown is not None else "n/a",
                    f"{stderr:.4f}" if stderr is not None else "n/a",
                    str(value.get("n", entry.get("n"))),
                )
    out = stdout_console()
    out.print(table)
    cost = record.cost
    stages = list(record.training.values())
    if stages and stages[-1].final_loss is not None:
        loss = f"final train loss {stages[-1].final_loss:.4f}"
    elif stages and stages[-1].mean_loss is not None:  # fewer steps than logging_steps
        loss = f"mean train loss {stages[-1].mean_loss:.4f}"
    else:
        loss = "train loss n/a"
    overhead = ""
    if cost.overhead_train_tokens or cost.scoring_tokens:
        overhead = f" (+ method overhead: {cost.overhead_train_tokens:,} reference training, {cost.scoring_tokens:,} scoring tokens)"
    judge_cost = f" | judge ${cost.judge_cost_usd:.4f}" if cost.judge_cost_usd else ""
    out.print(
        f"trained tokens {cost.train_tokens:,}{overhead} | {loss} | wall {cost.wall_seconds:.1f} s | "
        f"peak RSS {record.memory.peak_rss_gib:.2f} GiB{judge_cost}"
    )


@cli.command()
def models() -> None:
    """List the model set."""
    from harness.models import MODEL_SET, MODEL_SET_VERSION

    table = Table(title=f"model set {MODEL_SET_VERSION}")
    for column in ("name", "source", "params", "template", "context", "description"):
        table.add_column(column)
    for entry in MODEL_SET.values():
        table.add_row(entry.name, entry.source, entry.params, entry.template, str(entry.context_length), entry.description)
    stdout_console().print(table)


@cli.command()
@click.option("--configs", "show_configs", is_flag=True, help="list the shipped paper configs and their sources instead")
def recipes(show_configs: bool) -> None:
    """List the recipes (or, with --configs, the shipped paper configurations)."""
    if show_configs:
        print_paper_configs()
        return
    from recipes import list_recipes

    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for name, description in list_recipes().items():
        table.add_row(name, description)
    stdout_console().print(table)


def print_paper_configs() -> None:
    """recipes/configs/*.yaml: what each runs and the paper and code files its values come from."""
    from harness.spec import config_source, paper_configs, read_yaml_config

    table = Table(title="paper configs (harness run --config NAME)", show_lines=True)
    for column in ("name", "recipe", "model", "template", "paper", "code"):
        table.add_column(column, overflow="fold")
    for name, path in paper_configs().items():
        raw, source = read_yaml_config(path), config_source(path)
        training = raw.get("training") or {}
        code = source.get("code") or []
        table.add_row(
            name,
            str(raw.get("recipe", "one-off")),
            str(raw.get("model", "tiny")),
            str(training.get("template", "auto")),
            str(source.get("paper", "")),
            "\n".join(code) if isinstance(code, list) else str(code),
        )
    stdout_console().print(table)


@cli.command()
def suites() -> None:
    """List the evaluation suites."""
    from harness.evaluation import list_suites

    table = Table(title="suites")
    table.add_column("name")
    table.add_column("description")
    for name, description in list_suites().items():
        table.add_row(name, description)
    stdout_console().print(table)


@cli.command()
@click.option("--suite", "suite_name", default="small", show_default=True, help="the evaluation suite to size")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="items per task (default: the suite's)")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="training seeds per recipe")
@click.option("--discordance", type=click.FloatRange(0.0, 1.0), default=0.15, show_default=True,
              help="share of items on which two checkpoints' scores differ")
@click.option("--seed-sd", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="seed-to-seed SD of a checkpoint's task score (0-1 units) that more items cannot shrink")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.05,
              show_default=True, help="two-sided test level")
@click.option("--power", "power_level", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.8,
              show_default=True, help="probability of detecting an effect of the MDE's size")
def power(suite_name: str, limit: int | None, seeds: int, discordance: float, seed_sd: float, alpha: float,
          power_level: float) -> None:
    """Minimum detectable effect per task and for the headline, before any compute is spent."""
    from harness.evaluation import load_suite
    from harness.power import study_power

    study = study_power(load_suite(suite_name), limit=limit, seeds=seeds, discordance=discordance, seed_sd=seed_sd,
                        alpha=alpha, power=power_level)
    table = Table(title=f"minimum detectable effect: suite {suite_name}, {seeds} seed(s) per recipe, "
                        f"discordance {discordance:g}, seed SD {seed_sd:g}, alpha {alpha:g}, power {power_level:g}")
    for column in ("task", "primary metric", "items", "chance", "SE of Δ (points)", "MDE (points)",
                   "MDE (normalised points)"):
        table.add_column(column, justify="left" if column in ("task", "primary metric") else "right")
    for row in study.tasks:
        table.add_row(row.task, row.metric or "-", str(row.items), f"{row.chance:g}", f"{100 * row.stderr:.2f}",
                      f"{100 * row.mde:.1f}", f"{100 * row.normalised_mde:.1f}")
    table.add_row("[bold]headline[/]", "mean normalised primary", "", "", f"{100 * study.headline_stderr:.2f}",
                  "", f"[bold]{100 * study.headline_mde:.1f}[/]")
    table.caption = ("A true difference smaller than the MDE is missed more often than not at this size; a study "
                     "finding 'no difference' below it is underpowered, not evidence of equivalence.")
    stdout_console().print(table)


@cli.group("alpaca-eval")
def alpaca_eval_group() -> None:
    """AlpacaEval utilities."""


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """An AlpacaEval annotations file (official format: a JSON list of objects with `preference`)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such file; pass an AlpacaEval annotations JSON file") from None
    except UnicodeDecodeError as error:
        raise HarnessError(f"{path}: not UTF-8 text (byte {error.start}); pass an AlpacaEval annotations JSON file") from None
    except json.JSONDecodeError as error:
        raise HarnessError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise HarnessError(f"{path}: expected a non-empty JSON list of annotations (objects with a 'preference' key)")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or "preference" not in row:
            raise HarnessError(f"{path}: entry {number} has no 'preference' key; is this an annotations file?")
    return rows


@alpaca_eval_group.command("metrics")
@click.argument("annotations_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="bootstrap resamples for the LC win rate's standard error (0: none)")
def alpaca_eval_metrics(annotations_file: Path, as_json: bool, bootstrap: int) -> None:
    """Win rate, standard error, discrete and length-controlled win rate from an annotations file.

    Rows keep their order as the instruction index; with all 805 rows against gpt4_1106_preview the
    LC GLM uses the shipped local instruction-difficulty estimate, otherwise the GLM without it."""
    from harness.alpaca import N_INSTRUCTIONS, compute_metrics, load_difficulty

    rows = read_annotations(annotations_file)
    rows = [{"index": number, **row} for number, row in enumerate(rows)]
    full_ae2 = len(rows) == N_INSTRUCTIONS and all(row.get("generator_1") == "gpt4_1106_preview" for row in rows)
    metrics = compute_metrics(rows, difficulty=load_difficulty() if full_ae2 else None, lc_bootstrap=bootstrap)
    lc = metrics["length_controlled_win_rate"]
    summary = {
        "win_rate": metrics["win_rate"]["value"],
        "standard_error": metrics["win_rate"]["stderr"],
        "discrete_win_rate": metrics["discrete_win_rate"]["value"],
        "length_controlled_winrate": lc.get("value"),
        "length_controlled_winrate_stderr": lc.get("stderr"),
        "n_total": metrics["n_total"],
        "n_failed": metrics["n_failed"],
        "lc_note": lc.get("note"),
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    table = Table(title=f"AlpacaEval metrics: {annotations_file}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    table.add_row("win rate", number(summary["win_rate"]), number(summary["standard_error"]))
    table.add_row("discrete win rate", number(summary["discrete_win_rate"]), number(metrics["discrete_win_rate"]["stderr"]))
    table.add_row("LC win rate", number(summary["length_controlled_winrate"]), number(summary["length_controlled_winrate_stderr"]))
    table.add_row("examples (failed)", f"{summary['n_total']} ({summary['n_failed']})", "")
    out = stdout_console()
    out.print(table)
    if summary["lc_note"]:
        out.print(f"LC: {summary['lc_note']}")


@cli.command()
@click.option("--runs", "runs_dirs", multiple=True, type=click.Path(path_type=Path),
              help="folder of run directories, or one run directory (repeatable; default: results/)")
@click.option("--format", "-f", "fmt", type=click.Choice(["rich", "md", "html", "csv", "json"]), default="rich",
              show_default=True, help="output format when printing or writing one file")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="write the chosen format to this file (html also writes plots/ next to it)")
@click.option("--write", "write_all", is_flag=True, help="write every format and the plots into --dir")
@click.option("--check", is_flag=True, help="exit 1 when --dir differs from a fresh rendering of the runs")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("leaderboard"), show_default=True,
              help="the leaderboard folder for --write and --check")
@click.option("--baseline", default="one-off", show_default=True, help="the recipe variant the verdicts compare with")
@click.option("--correction", type=click.Choice(["holm", "bh", "none"]), default="holm", show_default=True,
              help="multiple-comparison adjustment of the main family (per-benchmark cells: BH unless none)")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.05, show_default=True)
@click.option("--margin", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="equivalence margin in points (a CI inside ±margin is 'equivalent')")
@click.option("--min-seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="fewer seeds on a side: the verdict is conditional on the checkpoints trained")
def leaderboard(runs_dirs: tuple[Path, ...], fmt: str, out: Path | None, write_all: bool, check: bool,
                directory: Path, baseline: str, correction: str, alpha: float, margin: float, min_seeds: int) -> None:
    """Compare runs: per (model, suite) the verdicts (headline Δ vs the baseline, CI, adjusted p, MDE) and
    every metric with paired bootstrap CIs, cost, plots."""
    from harness.leaderboard import leaderboard_command
    from harness.report.summary import VerdictOptions

    verdicts = VerdictOptions(baseline=baseline, correction=correction, alpha=alpha, margin=margin / 100,
                              min_seeds=min_seeds)
    leaderboard_command(list(runs_dirs), fmt, out, write_all=write_all, check=check, directory=directory,
                        console=console, stdout=stdout_console(), verdicts=verdicts)


@cli.command("record-schema")
def record_schema() -> None:
    """Print the JSON Schema of record.json (the run record; committed as docs/record.schema.json)."""
    from harness.record import schema_text

    click.echo(schema_text(), nl=False)


@cli.group("docker")
def docker_group() -> None:
    """The harness's Docker image (`harness run --docker` runs in it)."""


@docker_group.command("build")
@click.option("--base", envvar="HARNESS_DOCKER_BASE", default=None, help="base image (default: python:3.11-slim-bookworm)")
@click.option("--tag", "-t", default=None, help="image tag (default: sft-recipe-harness:<version>-<content hash>)")
@click.option("--find-links", envvar="HARNESS_DOCKER_FIND_LINKS", default=None, help="extra wheels: a directory or URL")
@click.option("--deepspeed", is_flag=True, envvar="HARNESS_DOCKER_DEEPSPEED", help="add DeepSpeed (for --distributed zero3)")
@click.option("--network", envvar="HARNESS_DOCKER_BUILD_NETWORK", default=None, help="network for RUN steps, e.g. host")
@click.option("--no-cache", is_flag=True, help="rebuild every layer")
@click.option("--vllm", "vllm_version", envvar="HARNESS_DOCKER_VLLM", default=None, metavar="VERSION",
              help="add vLLM VERSION (e.g. 0.34.0) in a venv of its own, for eval.backend vllm")
def docker_build(
    base: str | None,
    tag: str | None,
    find_links: str | None,
    deepspeed: bool,
    network: str | None,
    no_cache: bool,
    vllm_version: str | None,
) -> None:
    """Build the harness image from this checkout, showing the build's progress."""
    from harness.container import DEFAULT_BASE_IMAGE, BuildOptions, build_image, connect

    options = BuildOptions(base or DEFAULT_BASE_IMAGE, find_links, deepspeed, network, no_cache, vllm=vllm_version)
    image = build_image(connect(), options, tag, console)
    stdout_console().print(f"{(image.tags or [image.id])[0]} {image.id}")


@cli.command()
@click.option("--recipe", "-r", "recipes", multiple=True, help="a recipe, or all (repeatable; default: the spec's)")
@click.option("--model", "-m", "models", multiple=True, help="a model (repeatable; default: the spec's)")
@click.option("--seeds", default=None, help="seeds: 0,1,2, or a count (3 = 0,1,2); default: the spec's seed")
@click.option("--grid", "grid_file", type=click.Path(path_type=Path), default=None,
              help="YAML list of variants, each a mapping of spec keys (like --set), e.g. - training.learning_rate: 1e-4")
@click.option("--data", "-d", default=None, help="shipped data name, file path, or hub dataset id")
@click.option("--suite", "-s", default=None, help="evaluation suite (see `harness suites`)")
@click.option("--config", "-c", "config_file", type=click.Path(path_type=Path), default=None, help="YAML run spec")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec key for every run")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="run directories; on a cluster a folder every node sees (NFS, a mounted bucket)")
@click.option("--limit", type=int, default=None, help="evaluation items per task (overrides the suite)")
@click.option("--online", is_flag=True, default=None, help="evaluate with lm-eval's own hub-backed tasks")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one run after another here; ray: one Ray task per run")
@click.option("--address", default=None, help="with --engine ray: the cluster's address (default: start Ray here)")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=0, show_default=True,
              help="with --engine ray: GPUs per task (more than 1: --nproc processes in the task)")
@click.option("--cpus-per-run", type=click.FloatRange(min=0), default=1, show_default=True, help="with --engine ray: CPUs per task")
@click.option("--max-retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="with --engine ray: retries of a task whose worker or node died (each resumes the run)")
@click.option("--docker", "in_docker", is_flag=True, help="each run inside the harness image on its worker")
@click.option("--image", default=None, help="with --docker: image tag (default: the image of this checkout)")
@click.option("--distributed", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="runs with several GPUs: DDP or FSDP")
def sweep(
    recipes: tuple[str, ...],
    models: tuple[str, ...],
    seeds: str | None,
    grid_file: Path | None,
    data: str | None,
    suite: str | None,
    config_file: Path | None,
    overrides: tuple[str, ...],
    output: Path,
    limit: int | None,
    online: bool | None,
    engine: str,
    address: str | None,
    gpus_per_run: float,
    cpus_per_run: float,
    max_retries: int,
    in_docker: bool,
    image: str | None,
    distributed: str,
) -> None:
    """Run a grid (recipes x models x seeds x --grid variants), each point as `harness run` would, here or on
    a Ray cluster; finished runs are skipped, then the sweep's leaderboard."""
    from harness.sweep import SweepOptions, expand_grid, import_ray, parse_seeds, read_grid
    from harness.sweep import sweep as run_sweep

    if engine != "ray" and (address or gpus_per_run):
        raise HarnessError("--address and --gpus-per-run need --engine ray")
    if image and not in_docker:
        raise HarnessError("--image needs --docker")
    if engine == "ray":
        import_ray()  # not installed: its one line before anything else
    seed_list = parse_seeds(seeds)
    variants = read_grid(grid_file) if grid_file is not None else []
    flags = {"data.name": data, "eval.suite": suite, "eval.limit": limit, "eval.online": online}
    quiet_libraries()
    points = expand_grid(recipes=recipes, models=models, seeds=seed_list, variants=variants, config_file=config_file,
                         overrides=overrides, flags=flags)  # fmt: skip
    run_args = ["--docker", *(["--image", image] if image else [])] if in_docker else []
    if gpus_per_run > 1 and not in_docker:
        run_args += ["--nproc", str(int(gpus_per_run))]
    if distributed != "ddp":
        run_args += ["--distributed", distributed]
    options = SweepOptions(engine, address, gpus_per_run, cpus_per_run, max_retries, run_args)
    status = run_sweep(points, output, options, console, stdout_console())
    if status:
        sys.exit(status)


def one_line(message: object) -> str:
    """An error message on one line: names and values quoted from the input may hold line breaks."""
    return " ".join(str(message).splitlines()) or "unknown error"


def main(argv: list[str] | None = None) -> None:
    """Entry point: click without its own exception handling, so every user error is one line."""
    from harness.interrupts import install_sigterm_handler

    install_sigterm_handler()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        try:
            _main(argv)
        finally:
            leave_process_group()
        return
    # One process of several: everything the run writes is written and flushed synchronously before
    # _main returns, so skip interpreter shutdown. Left to it, the C++ threads of gloo and FSDP can abort
    # the process ("terminate called without an active exception", exit 134), and the launcher's SIGTERM
    # to the other processes then lands in finalizers.
    status: int | str | None = 0
    try:
        _main(argv)
    except SystemExit as stop:
        status = stop.code
    finally:
        leave_process_group()
    if isinstance(status, str):
        say(status)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


def _main(argv: list[str] | None) -> None:
    from harness.interrupts import EXIT_TERMINATED, RunTerminated

    try:
        cli.main(args=argv, prog_name="harness", standalone_mode=False)
    except RunTerminated as stopped:
        say(f"error: {one_line(stopped)}")
        sys.exit(EXIT_TERMINATED)
    except HarnessError as error:
        say(f"error: {one_line(error)}")
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        say("error: aborted")
        sys.exit(130)
    except click.ClickException as error:
        say(f"error: {one_line(error.format_message())}")
        sys.exit(2)
    except KeyboardInterrupt:
        say("error: interrupted; rerun the same command to resume")
        sys.exit(130)


def leave_process_group() -> None:
    """In a job of several processes, close the process group before exiting: left to interpreter
    shutdown, gloo's threads can abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def say(line: str) -> None:
    """One line on stderr; in a job of several processes each meets the same error, so only rank 0 says it."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(line, err=True)


if __name__ == "__main__":
    main()
