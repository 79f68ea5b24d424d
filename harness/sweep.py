"""`harness sweep`: a grid of runs (recipes x models x seeds x `--grid` variants), each run exactly as
`harness run --config <its spec> --output DIR` would run it, on this machine or as Ray tasks on a cluster.

Every point is validated and resolved to its run id before anything starts, so a bad point stops the whole
sweep in one line. Finished run ids are skipped. A Ray task whose worker or node dies is retried
(`max_retries`) and the retried `harness run` resumes from the run's last checkpoint in the output
directory, which every node must see (NFS, a mounted bucket), like the artifact cache (HARNESS_CACHE).

The sweep's own files live in DIR/.sweeps/<sweep id>/ (hidden from the leaderboard): per point its spec
(<run id>.yaml, what the task runs), its state (<run id>.json, written by the task: node, attempt) and its
log (<run id>.log, the run's terminal output). Ray is imported only by the Ray engine.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from harness.errors import HarnessError, shown
from harness.io import atomic_write_json, atomic_write_text

RAY_INSTALL_HINT = 'the Ray engine needs Ray: pip install "sft-recipe-harness[ray]" (or pip install ray)'
SWEEP_ID_ENV = "HARNESS_SWEEP_ID"  # tells the run (its tracker tags) which sweep it belongs to
# Settings a task passes on to its run; secrets (tracker and judge keys) are set on the nodes themselves.
FORWARDED_ENV = re.compile(r"^(HARNESS_\w+|HF_HUB_OFFLINE|HF_DATASETS_OFFLINE|TRANSFORMERS_OFFLINE|HF_HOME)$")


class RunInterrupted(Exception):
    """The run's process was killed or stopped (SIGTERM from a spot reclaim): Ray retries the task, which resumes."""


@dataclass(frozen=True)
class GridPoint:
    run_id: str
    recipe: str
    model: str
    seed: int
    variant: str  # the point's --grid entry, or "" without --grid
    config: dict[str, Any]  # the spec `harness run --config` gets (its own `auto` values resolve on the worker)


# ----------------------------------------------------------------------------- the grid


def parse_seeds(text: str | None) -> list[int | None]:
    """'0,1,2' -> [0, 1, 2]; a single number N -> 0..N-1; None -> [None] (the spec's seed)."""
    if text is None:
        return [None]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise HarnessError(f"--seeds '{shown(text)}': expected a count (3 -> 0,1,2) or a list like 0,1,2")
    if len(parts) == 1 and "," not in text:
        count = int(parts[0])
        if count < 1:
            raise HarnessError("--seeds 0: give at least one seed (a count N means seeds 0..N-1)")
        return list(range(count))
    return [int(part) for part in dict.fromkeys(parts)]


def read_grid(path: Path) -> list[list[str]]:
    """A YAML list of variants; each a mapping of spec keys to values ({training.learning_rate: 1e-4}) or a
    list of `--set` strings; every variant becomes its own points."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise HarnessError(f"--grid {path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise HarnessError(f"--grid {path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise HarnessError(f"--grid {path}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if isinstance(loaded, dict) and "variants" in loaded:
        loaded = loaded["variants"]
    if not isinstance(loaded, list) or not loaded:
        raise HarnessError(f"--grid {path}: expected a non-empty YAML list of variants, e.g. - training.learning_rate: 1e-4")
    variants = []
    for number, entry in enumerate(loaded):
        if isinstance(entry, dict):
            variants.append([f"{key}={json.dumps(value)}" for key, value in entry.items()])
        elif isinstance(entry, list) and all(isinstance(item, str) for item in entry):
            variants.append(list(entry))
        elif isinstance(entry, str):
            variants.append([entry])
        else:
            raise HarnessError(f"--grid {path}: variant {number} is a {type(entry).__name__}; use a mapping of spec keys")
    return variants


def expand_grid(
    *,
    recipes: tuple[str, ...],
    models: tuple[str, ...],
    seeds: list[int | None],
    variants: list[list[str]],
    config_file: Path | None,
    overrides: tuple[str, ...],
    flags: dict[str, Any],
) -> list[GridPoint]:
    """Every point validated and resolved to its run id (as `harness run` would name it), before any compute;
    the first bad point stops the sweep in one line naming it."""
    from harness.runner import prepare_run
    from harness.spec import build_spec

    points: dict[str, GridPoint] = {}
    for recipe in recipes or (None,):
        for model in models or (None,):
            for seed in seeds:
                for variant in variants or [[]]:
                    label = " ".join(f"{name} {value}" for name, value in
                                     (("recipe", recipe), ("model", model), ("seed", seed), ("grid", " ".join(variant)))
                                     if value not in (None, ""))  # fmt: skip
                    try:
                        spec = build_spec(
                            config_file=config_file,
                            overrides=[*overrides, *variant],
                            flags={**flags, "recipe": recipe, "model": model, "seed": seed},
                        )
                        for point_spec in _recipe_specs(spec):
                            prepared = prepare_run(point_spec)
                            config = point_spec.model_dump(mode="json")
                            if point_spec.training.report_to != "none":  # not part of the run id: added by hand
                                config["training"]["report_to"] = point_spec.training.report_to
                            points.setdefault(prepared.run_id, GridPoint(
                                prepared.run_id, point_spec.recipe, prepared.model_info.entry.name, point_spec.seed,
                                " ".join(variant), config,
                            ))  # fmt: skip
                    except HarnessError as error:
                        raise HarnessError(f"grid point ({label or 'defaults'}): {error}") from None
    return list(points.values())


def _recipe_specs(spec: Any) -> list[Any]:
    """`--recipe all` is every recipe, with `params.<recipe>.<key>` as in `harness run --recipe all`."""
    if spec.recipe != "all":
        return [spec]
    from harness.compare import specs_for_all

    return specs_for_all(spec)


def sweep_id(points: list[GridPoint]) -> str:
    """The same grid gives the same sweep id (so a rerun finds its own files)."""
    return "sweep-" + hashlib.sha256("\n".join(sorted(point.run_id for point in points)).encode()).hexdigest()[:10]


def is_done(output: Path, run_id: str) -> bool:
    from harness.runner import find_record

    try:
        return find_record(output / run_id, run_id) is not None
    except HarnessError:
        return False  # another run's directory: the task reports it


# ----------------------------------------------------------------------------- one run (the task)


def run_point(point: GridPoint, output: str, state_dir: str, run_args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one grid point as `harness run --config <spec> --output DIR [run_args]` in a child process and
    return {run_id, status, error, node, attempt}. In a Ray task the child dies with the task's worker, so a
    retried task never meets a stale run lock; a killed or stopped child raises RunInterrupted (Ray retries)."""
    state_path = Path(state_dir) / f"{point.run_id}.json"
    previous = _read_json(state_path)
    attempt = int(previous.get("attempt", 0)) + 1
    node = _node_name()
    started = time.time()
    atomic_write_json(state_path, {"state": "running", "node": node, "attempt": attempt, "started": started})
    argv = [sys.executable, "-m", "harness.cli", "run", "--config", str(Path(state_dir) / f"{point.run_id}.yaml"),
            "--output", output, *run_args]  # fmt: skip
    gpus = _ray_gpu_ids()
    if "--docker" in run_args and gpus is not None:  # in a Ray task: the GPUs Ray gave it
        argv += ["--gpus", ",".join(gpus) if gpus else "none"]
    child_env = {**os.environ, **env, SWEEP_ID_ENV: Path(state_dir).name}
    with open(Path(state_dir) / f"{point.run_id}.log", "a", encoding="utf-8") as log:
        log.write(f"--- attempt {attempt} on {node}: {' '.join(argv)}\n")
        log.flush()
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env, preexec_fn=_die_with_parent).returncode
    log_text = (Path(state_dir) / f"{point.run_id}.log").read_text(encoding="utf-8", errors="replace")
    ran = log_text.rsplit(f"--- attempt {attempt} on", 1)[-1]
    seconds = round(time.time() - started, 1)
    if status < 0 or status == 75:  # a signal, or EXIT_TERMINATED (SIGTERM: saved and stopped)
        atomic_write_json(state_path, {"state": "interrupted", "node": node, "attempt": attempt, "started": started})
        raise RunInterrupted(f"run {point.run_id} on {node} stopped ({_status_text(status)}); resuming on retry")
    errors = [line.strip() for line in ran.splitlines() if line.startswith("error: ")]
    result = {
        "run_id": _actual_run_id(ran) or point.run_id,
        "status": "done" if status == 0 else "failed",
        "error": errors[-1][len("error: "):] if errors else (None if status == 0 else f"exited with {status}"),
        "node": node,
        "attempt": attempt,
        "seconds": seconds,
    }
    atomic_write_json(state_path, {"state": result["status"], "node": node, "attempt": attempt, "started": started,
                                   "seconds": seconds, "error": result["error"], "run_id": result["run_id"]})
    return result


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the process that started it dies (a lost Ray worker)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _status_text(status: int) -> str:
    return f"signal {signal.Signals(-status).name}" if status < 0 else "SIGTERM; checkpoint saved"


def _actual_run_id(log: str) -> str | None:
    """The run id the run printed: it differs from the sweep's when an `auto` setting (precision) resolves
    differently on the worker than here."""
    found = re.search(r"^run (\S+?)(?::| is already complete)", log, re.MULTILINE)
    return found.group(1) if found else None


def _node_name() -> str:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    return socket.gethostname()


def _ray_gpu_ids() -> list[str] | None:
    """The GPUs Ray assigned to this task; None outside a Ray task."""
    ray = sys.modules.get("ray")
    return [str(gpu) for gpu in ray.get_gpu_ids()] if ray is not None and ray.is_initialized() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


# ----------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """One line per run, from the state files the tasks write and the results they return."""

    points: list[GridPoint]
    state_dir: Path
    console: Console
    started: float = field(default_factory=time.time)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)

    def state(self, point: GridPoint) -> dict[str, Any]:
        if point.run_id in self.results:
            return {**_read_json(self.state_dir / f"{point.run_id}.json"), **self.results[point.run_id],
                    "state": self.results[point.run_id]["status"]}  # fmt: skip
        return _read_json(self.state_dir / f"{point.run_id}.json") or {"state": "queued"}

    def line(self, point: GridPoint) -> str:
        state = self.state(point)
        name, attempt = state.get("state", "queued"), int(state.get("attempt") or 0)
        text = {"running": f"running on {state.get('node')}", "interrupted": f"interrupted on {state.get('node')}",
                "done": f"done on {state.get('node')}", "failed": f"failed: {state.get('error')}"}.get(name, name)  # fmt: skip
        if attempt > 1 and name in ("running", "done"):
            text += f" (retried: attempt {attempt})"
        if name in ("done", "failed") and state.get("seconds") is not None:
            text += f" in {_clock(state['seconds'])}"
        return text

    def elapsed(self, point: GridPoint) -> float | None:
        state = self.state(point)
        if "seconds" in state:
            return float(state["seconds"])
        return time.time() - float(state["started"]) if "started" in state else None

    def mean_seconds(self) -> float | None:
        finished = [result["seconds"] for result in self.results.values() if result["status"] == "done"]
        return sum(finished) / len(finished) if finished else None

    def eta(self, point: GridPoint | None = None) -> float | None:
        """A run's: the finished runs' mean time minus its elapsed time. The sweep's: that mean x the runs
        left / the runs running now. None (shown ?) until a run has finished."""
        mean = self.mean_seconds()
        if point is not None:
            if point.run_id in self.results:
                return 0.0
            elapsed = self.elapsed(point)
            return None if mean is None else max(mean - (elapsed or 0.0), 0.0)
        left = [point for point in self.points if point.run_id not in self.results]
        if not left:
            return 0.0
        running = sum(1 for point in left if self.state(point).get("state") == "running")
        return None if mean is None else mean * len(left) / max(running, 1)

    def table(self) -> Table:
        table = Table(title=f"sweep {self.state_dir.name}: {len(self.results)}/{len(self.points)} finished, "
                      f"{_clock(time.time() - self.started)} elapsed, ETA {_clock(self.eta())}")  # fmt: skip
        for column in ("run", "recipe", "model", "seed", "grid", "state", "elapsed", "ETA"):
            table.add_column(column)
        for point in self.points:
            table.add_row(point.run_id, point.recipe, point.model, str(point.seed), point.variant, self.line(point),
                          _clock(self.elapsed(point)), _clock(self.eta(point)))  # fmt: skip
        return table

    def say_changes(self) -> None:
        """Without a terminal (CI, logs): one printed line per change of a run's state."""
        for point in self.points:
            line = self.line(point)
            if self.said.get(point.run_id) != line:
                self.said[point.run_id] = line
                self.console.print(f"{point.run_id}: {line}", markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------- engines


def run_local(todo: list[GridPoint], call: Any, progress: Progress, watch: Any) -> None:
    """One run after another on this machine (a thread, so the progress keeps moving)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        futures = {pool.submit(call, point): point for point in todo}
        while futures:
            finished, _ = concurrent.futures.wait(futures, timeout=0.5)
            for future in finished:
                point = futures.pop(future)
                try:
                    progress.results[point.run_id] = future.result()
                except RunInterrupted as stopped:
                    progress.results[point.run_id] = _failure(point, str(stopped))
            watch()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HarnessError(RAY_INSTALL_HINT) from None
    return ray


def run_ray(todo: list[GridPoint], call: Any, progress: Progress, watch: Any, *, address: str | None,
            gpus_per_run: float, cpus_per_run: float, max_retries: int) -> None:
    """Each point one Ray task; Ray retries one whose worker or node died, or whose run was interrupted."""
    ray = import_ray()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise HarnessError(f"--address {address}: cannot connect to the Ray cluster ({' '.join(str(error).split())[:200]})") from None
    try:
        task = ray.remote(call).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                                        retry_exceptions=[RunInterrupted])  # fmt: skip
        pending = {task.remote(point): point for point in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                point = pending.pop(ref)
                try:
                    progress.results[point.run_id] = ray.get(ref)
                except ray.exceptions.RayError as error:  # retries spent: the worker, node or run kept failing
                    cause = getattr(error, "cause", None) or error
                    progress.results[point.run_id] = _failure(point, " ".join(str(cause).split())[:300])
            watch()
    finally:
        ray.shutdown()


def _failure(point: GridPoint, error: str) -> dict[str, Any]:
    return {"run_id": point.run_id, "status": "failed", "error": error, "node": None, "attempt": None, "seconds": None}


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class SweepOptions:
    engine: str
    address: str | None
    gpus_per_run: float
    cpus_per_run: float
    max_retries: int
    run_args: list[str]  # passed on to every `harness run` (--docker, --image, --nproc, --distributed)


def sweep(points: list[GridPoint], output: Path, options: SweepOptions, console: Console, stdout: Console) -> int:
    """Run the grid's unfinished points, show their progress, then the summary and the sweep's leaderboard.
    Returns the exit status: 0 when every run is done, 1 when any failed."""
    sid = sweep_id(points)
    state_dir = output / ".sweeps" / sid
    manifest = _read_json(state_dir / "sweep.json").get("runs", {})  # a point's run id on its worker
    done = {point.run_id for point in points if is_done(output, manifest.get(point.run_id, point.run_id))}
    todo = [point for point in points if point.run_id not in done]
    if not todo:
        console.print(f"sweep {sid}: every run is done ({len(points)} runs in {output}); no task started", markup=False, soft_wrap=True)
    else:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HarnessError(f"--output {output}: cannot create {state_dir} ({error.strerror})") from None
        for point in todo:
            atomic_write_text(state_dir / f"{point.run_id}.yaml", yaml.safe_dump(point.config, sort_keys=False))
            (state_dir / f"{point.run_id}.json").unlink(missing_ok=True)
        console.print(
            f"sweep {sid}: {len(todo)} runs to do" + (f", {len(done)} already done" if done else "")
            + f" ({options.engine} engine; files in {state_dir})", markup=False, soft_wrap=True,
        )  # fmt: skip
        env = {name: value for name, value in os.environ.items() if FORWARDED_ENV.match(name)}
        output_text = str(output.resolve())

        def call(point: GridPoint) -> dict[str, Any]:
            return run_point(point, output_text, str(state_dir.resolve()), options.run_args, env)

        progress = Progress(todo, state_dir, console)
        live = Live(progress.table(), console=console, refresh_per_second=2) if console.is_terminal else None

        def watch() -> None:
            if live is not None:
                live.update(progress.table())
            else:
                progress.say_changes()

        if live is not None:
            live.start()
        try:
            if options.engine == "ray":
                run_ray(todo, call, progress, watch, address=options.address, gpus_per_run=options.gpus_per_run,
                        cpus_per_run=options.cpus_per_run, max_retries=options.max_retries)  # fmt: skip
            else:
                run_local(todo, call, progress, watch)
        finally:
            if live is not None:
                live.stop()
        manifest |= {run_id: result["run_id"] for run_id, result in progress.results.items()}
        atomic_write_json(state_dir / "sweep.json", {"sweep_id": sid, "runs": manifest})
        failed = {run_id: result for run_id, result in progress.results.items() if result["status"] != "done"}
        retried = sum(1 for result in progress.results.values() if (result.get("attempt") or 1) > 1)
        console.print(
            f"sweep {sid}: {len(progress.results) - len(failed)} done, {len(failed)} failed, {len(done)} skipped "
            f"(already done), {retried} retried, in {_clock(time.time() - progress.started)}", markup=False, soft_wrap=True,
        )  # fmt: skip
        for run_id, result in failed.items():
            console.print(f"failed: {run_id}: {result['error']} (log: {state_dir / run_id}.log)", markup=False, soft_wrap=True)
    show_leaderboard([output / manifest.get(point.run_id, point.run_id) for point in points], console, stdout)
    return 1 if todo and any(not is_done(output, manifest.get(p.run_id, p.run_id)) for p in todo) else 0


def show_leaderboard(run_dirs: list[Path], console: Console, stdout: Console) -> None:
    """The sweep's runs through the same renderer as `harness leaderboard`."""
    from harness.leaderboard import build_groups, load_runs, render_rich

    finished = [run_dir for run_dir in run_dirs if (run_dir / "record.json").is_file()]
    runs = load_runs(finished, lambda message: console.print(f"warning: {message}", markup=False, highlight=False))
    for table in render_rich(build_groups(runs)):
        stdout.print(table)
