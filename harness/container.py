"""The Docker runtime: build the harness image and run `harness run` inside it (on GPUs), with the
same spec and the same run record as a local run.

The host validates the spec first (bad input never starts a container), then runs the same
arguments in the image as the host user, with the runs directory, the harness and Hugging Face
caches, and every local file the spec names mounted. Only named environment variables reach the
container (secrets among them, never logged); the record written inside gets the image id, the
source commit and the host's GPU model through HARNESS_* variables (see container_info()).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from harness import __version__
from harness.errors import HarnessError
from harness.records import git_commit

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"  # keep equal to docker/Dockerfile's: the lock's Python and Debian
IMAGE_REPOSITORY = "sft-recipe-harness"
DOCKERFILE = "docker/Dockerfile"
# What the image is built from (the Dockerfile's COPY sources); nothing else leaves the host.
CONTEXT_PATHS = ("pyproject.toml", "README.md", "harness", "recipes", "benchmarks", "docker")
CONTEXT_EXCLUDE = ("__pycache__", ".pyc", ".egg-info", ".DS_Store")
# Environment variables passed through to the container when set on the host: secrets (values are
# never printed) and settings. Add names with HARNESS_DOCKER_ENV=NAME1,NAME2.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "WANDB_API_KEY")
SETTING_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "OPENAI_BASE_URL",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
)
# Set by the launcher, read by the harness inside the container (records.host_info()).
CONTAINER_HOME = "/home/harness"
CONTAINER_RUNS = "/runs"
CONTAINER_HARNESS_CACHE = "/cache/harness"
CONTAINER_HF_CACHE = "/cache/huggingface"
DISTRIBUTED_CONFIGS = {
    "ddp": "/opt/harness/docker/accelerate/ddp.yaml",
    "fsdp": "/opt/harness/docker/accelerate/fsdp.yaml",
    "zero3": "/opt/harness/docker/accelerate/zero3.yaml",
}
WHEEL_SERVER_PORT = 47615  # fixed, so the FIND_LINKS build argument (part of the layer cache key) is stable
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_BASE = "org.opencontainers.image.base.name"
LABEL_RUN = "sft-recipe-harness.run"


def repo_root() -> Path:
    """The checkout the harness runs from; the image is built from it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / DOCKERFILE).is_file():
        raise HarnessError(f"{DOCKERFILE} not found in {root}; build images from a git checkout of sft-recipe-harness")
    return root


def connect() -> Any:
    """A client for the Docker daemon named by DOCKER_HOST (default: the local socket), or a one-line error."""
    import docker
    from docker.errors import DockerException

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
        return client
    except DockerException as error:
        text = str(error)
        if "PermissionError" in text or "Permission denied" in text:
            hint = "permission denied; add yourself to the docker group (sudo usermod -aG docker $USER, then log in again)"
        else:
            reason = "no daemon socket" if "FileNotFoundError" in text or "No such file" in text else "not responding"
            hint = (
                f"{reason}; start it with `sudo systemctl start docker` (install Docker Engine first if needed), "
                "or set DOCKER_HOST to a running daemon"
            )
        raise HarnessError(f"cannot reach a Docker daemon at {host}: {hint}") from None


# --- building the image ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """How the image is built; defaults come from HARNESS_DOCKER_* variables so that `harness run
    --docker` builds a missing image the same way `harness docker build` would."""

    base: str = DEFAULT_BASE_IMAGE
    find_links: str | None = None  # a directory or URL of extra wheels (e.g. a local CPU torch wheel)
    deepspeed: bool = False
    network: str | None = None  # network of the build's RUN steps, e.g. "host"
    no_cache: bool = False
    vllm: str | None = None  # a vLLM version for eval.backend vllm, installed in a venv of its own (/opt/vllm)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> BuildOptions:
        env = os.environ if environ is None else environ

        def flag(name: str) -> bool:  # as click reads a boolean flag's environment variable
            return env.get(name, "").strip().lower() in ("1", "true", "yes", "on", "t", "y")

        return cls(
            base=env.get("HARNESS_DOCKER_BASE") or DEFAULT_BASE_IMAGE,
            find_links=env.get("HARNESS_DOCKER_FIND_LINKS") or None,
            deepspeed=flag("HARNESS_DOCKER_DEEPSPEED"),
            network=env.get("HARNESS_DOCKER_BUILD_NETWORK") or None,
            vllm=env.get("HARNESS_DOCKER_VLLM") or None,
        )

    def key(self) -> str:
        """What changes the built image (not no_cache or network)."""
        key = f"base={self.base} links={self.find_links} deepspeed={int(self.deepspeed)}"
        return key + (f" vllm={self.vllm}" if self.vllm else "")  # images built without vLLM keep their tags


def _included(relative: Path) -> bool:
    return not any(part.endswith(CONTEXT_EXCLUDE) or part in CONTEXT_EXCLUDE for part in relative.parts)


def context_files(root: Path) -> list[Path]:
    """The files of the build context, relative to root, sorted."""
    files: list[Path] = []
    for name in CONTEXT_PATHS:
        path = root / name
        if path.is_file():
            files.append(Path(name))
        elif path.is_dir():
            files.extend(p.relative_to(root) for p in path.rglob("*") if p.is_file() and _included(p.relative_to(root)))
    return sorted(set(files))


def build_context(root: Path) -> tuple[bytes, str]:
    """A reproducible tar of the build context (fixed owners, times and modes) and its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relative in context_files(root):
            data = (root / relative).read_bytes()
            info = tarfile.TarInfo(relative.as_posix())
            info.size = len(data)
            info.mode = 0o755 if os.access(root / relative, os.X_OK) else 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    payload = buffer.getvalue()
    return payload, hashlib.sha256(payload).hexdigest()


def default_tag(context_digest: str, options: BuildOptions) -> str:
    """Tag named by the content it was built from: a changed source or option means a new image."""
    digest = hashlib.sha256(f"{context_digest} {options.key()}".encode()).hexdigest()[:12]
    return f"{IMAGE_REPOSITORY}:{__version__}-{digest}"


@contextlib.contextmanager
def serve_wheels(find_links: str | None, network: str | None) -> Iterator[str]:
    """The FIND_LINKS build argument: a URL as given, or a local directory served over HTTP on the
    host's loopback (reachable from RUN steps only with --network host) for the build's duration."""
    if not find_links:
        yield ""
        return
    if find_links.startswith(("http://", "https://")):
        yield find_links
        return
    directory = Path(find_links).expanduser()
    if not directory.is_dir():
        raise HarnessError(f"--find-links {find_links}: not a directory or an http(s) URL")
    if network != "host":
        raise HarnessError(f"--find-links {find_links}: a local wheel directory needs --network host for the build")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_SERVER_PORT), handler)
    except OSError:  # port taken: still works, but the dependency layers are not reused from the cache
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build_log_path(tag: str) -> Path:
    from harness.models import cache_dir

    directory = cache_dir() / "docker"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"build-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}.log"


def build_image(client: Any, options: BuildOptions, tag: str | None, console: Console) -> Any:
    """Build the image from this checkout with a live progress display of the build log; returns it."""
    from harness.io import atomic_write_text

    root = repo_root()
    context, digest = build_context(root)
    tag = tag or default_tag(digest, options)
    log_path = build_log_path(tag)
    lines: list[str] = []
    image_id = None
    with serve_wheels(options.find_links, options.network) as find_links:
        buildargs = {
            "BASE_IMAGE": options.base,
            "FIND_LINKS": find_links,
            "DEEPSPEED": "1" if options.deepspeed else "0",
            "VLLM": options.vllm or "",
            "HARNESS_GIT_COMMIT": git_commit(),
        }
        console.print(f"[bold]building image {tag}[/] from {root} (base {options.base}); log: {log_path}", soft_wrap=True)
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]docker build"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[step]}", style="cyan"),
            TextColumn("{task.fields[last]}", style="dim"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        step_pattern = re.compile(r"^Step (\d+)/(\d+) : (.*)")
        error = None
        with progress:
            task = progress.add_task("build", total=None, step="sending context", last="")
            stream = client.api.build(
                fileobj=io.BytesIO(context),
                custom_context=True,
                dockerfile=DOCKERFILE,
                tag=tag,
                buildargs=buildargs,
                network_mode=options.network,
                nocache=options.no_cache,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    error = str(chunk["error"]).strip()
                    lines.append(f"ERROR: {error}")
                    break
                if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                text = chunk.get("stream") or chunk.get("status") or ""
                for line in text.splitlines():
                    if not line.strip():
                        continue
                    lines.append(line)
                    match = step_pattern.match(line)
                    if match:
                        number, total, instruction = int(match[1]), int(match[2]), match[3]
                        progress.update(task, total=total, completed=number - 1, step=instruction[:40], last="")
                        if not console.is_terminal:
                            console.print(f"  step {number}/{total}: {instruction[:100]}", highlight=False, soft_wrap=True)
                    elif not line.startswith(" ---> "):
                        progress.update(task, last=line.strip()[:50])
            if error is None:
                progress.update(task, completed=progress.tasks[0].total or 0, step="done", last="")
    atomic_write_text(log_path, "\n".join(lines) + "\n")
    if error is not None:
        steps = [line for line in lines if step_pattern.match(line)]
        where = f" at {steps[-1][:80]}" if steps else ""
        if steps and ": FROM " in steps[-1]:
            where += f" (base image {options.base}: pull it, or pass --base)"
        output = [line.strip() for line in lines[:-1] if not step_pattern.match(line) and not line.startswith(" ---> ")]
        last = f"; last output: {output[-1][:200]}" if steps and output and not steps[-1].endswith(output[-1]) else ""
        raise HarnessError(f"docker build failed{where}: {error.splitlines()[-1][:300]}{last} (full log: {log_path})")
    image = client.images.get(image_id or tag)
    console.print(f"[green]built {tag}[/] ({image.id[:19]}, {image.attrs['Size'] / 2**30:.2f} GiB)", soft_wrap=True)
    return image


def ensure_image(client: Any, tag: str | None, options: BuildOptions, console: Console) -> tuple[Any, str]:
    """The image named by tag (default: the one for this checkout's content), built when missing;
    returns it and its tag."""
    from docker.errors import ImageNotFound

    if tag is None:
        _, digest = build_context(repo_root())
        tag = default_tag(digest, options)
    try:
        return client.images.get(tag), tag
    except ImageNotFound:
        console.print(f"image {tag} not found locally; building it", soft_wrap=True)
        return build_image(client, options, tag, console), tag


# --- running a container --------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRequest:
    """What --gpus asked for: Docker device requests and the number of processes per node."""

    label: str  # as recorded: "none", "all", "2", "device=0,1"
    device_requests: list[Any] = field(default_factory=list)
    nproc: str = "1"  # "auto" (all GPUs: counted inside the container) or a number


def host_gpus() -> list[tuple[str, str]]:
    """(model, driver version) of each NVIDIA GPU on this host, from nvidia-smi; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[part.strip() for part in line.split(",")] for line in output.splitlines() if line.strip()]
    return [(row[0], row[1] if len(row) > 1 else "") for row in rows]


def parse_gpus(value: str | None, available: int) -> GpuRequest:
    """--gpus: all | N (a count) | 0,1 or device=0,1 (device ids) | none; default: all when the host
    has NVIDIA GPUs, else none."""
    from docker.types import DeviceRequest

    text = (value or ("all" if available else "none")).strip().lower()
    if text in ("none", "cpu"):
        return GpuRequest("none")
    if text == "all":
        return GpuRequest("all", [DeviceRequest(count=-1, capabilities=[["gpu"]])], str(available) if available else "auto")
    ids_text = text.removeprefix("device=")
    if text.isdigit():
        count = int(text)
        if count == 0:
            raise HarnessError("--gpus 0 is ambiguous: use --gpus none for CPU, or --gpus device=0 for GPU 0")
        return GpuRequest(text, [DeviceRequest(count=count, capabilities=[["gpu"]])], str(count))
    ids = [part.strip() for part in ids_text.split(",") if part.strip()]
    if ids and ("," in ids_text or text.startswith("device=")) and all(re.fullmatch(r"[0-9]+|GPU-[0-9a-f-]+", i) for i in ids):
        return GpuRequest(f"device={','.join(ids)}", [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])], str(len(ids)))
    raise HarnessError(f"--gpus '{value}': expected all, a count (2), device ids (0,1 or device=3), or none")


def image_facts(image: Any, tag: str) -> dict[str, str]:
    """What the run record keeps about the image: id, tag, registry digest, base, source commit."""
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    digests = image.attrs.get("RepoDigests") or []
    return {
        "HARNESS_IMAGE_ID": image.id,
        "HARNESS_IMAGE_TAG": tag,
        "HARNESS_IMAGE_DIGEST": digests[0] if digests else "",
        "HARNESS_IMAGE_BASE": labels.get(LABEL_BASE, ""),
        "HARNESS_GIT_COMMIT": labels.get(LABEL_REVISION, "unknown"),
    }


def container_environment(
    environ: dict[str, str], facts: dict[str, str], gpus: GpuRequest, distributed: str, host: list[tuple[str, str]]
) -> dict[str, str]:
    """The container's environment: named host variables only, plus the facts for the run record."""
    extra = [name.strip() for name in environ.get("HARNESS_DOCKER_ENV", "").split(",") if name.strip()]
    env = {name: environ[name] for name in (*SECRET_ENV, *SETTING_ENV, *extra) if name in environ}
    selected = _selected_gpus(gpus, host)
    env.update(facts)
    env.update(
        {
            "HARNESS_HOST_GPUS": ", ".join(name for name, _ in selected) or "none",
            "HARNESS_HOST_GPU_DRIVER": selected[0][1] if selected else "",
            "HARNESS_GPU_REQUEST": gpus.label,
            "HARNESS_NPROC": gpus.nproc,
        }
    )
    if distributed != "ddp":
        env["HARNESS_ACCELERATE_CONFIG"] = DISTRIBUTED_CONFIGS[distributed]
    return env


def _selected_gpus(gpus: GpuRequest, host: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if gpus.label == "none":
        return []
    if gpus.label.startswith("device="):
        indices = [int(i) for i in gpus.label.removeprefix("device=").split(",") if i.isdigit()]
        return [host[i] for i in indices if i < len(host)]
    return host if gpus.label == "all" else host[: int(gpus.label)]


@dataclass(frozen=True)
class Mount:
    source: Path  # on the host
    target: str  # in the container
    read_only: bool = True


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def plan_mounts(spec: dict[str, Any], output: Path, cwd: Path, environ: dict[str, str]) -> list[Mount]:
    """Mounts for a containerized run. The container's working directory is the host's cwd, and every
    local path the spec names is mounted read-only where that path resolves in the container, so the
    arguments (and so the spec and its hash) stay exactly as given."""
    from harness.models import cache_dir

    hf_home = Path(environ.get("HF_HOME") or Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    mounts = [
        Mount(output.resolve(), CONTAINER_RUNS, read_only=False),
        Mount(cache_dir().resolve(), CONTAINER_HARNESS_CACHE, read_only=False),
        Mount(hf_home.expanduser().resolve(), CONTAINER_HF_CACHE, read_only=False),
    ]
    found: dict[str, Path] = {}  # container path -> host path
    for text in _strings(spec):
        if not text or "\n" in text:
            continue
        host = Path(text).expanduser()
        host = host if host.is_absolute() else cwd / host
        if not os.path.exists(host):  # False, not an error, for names that are no valid path at all
            continue
        if text == "~" or text.startswith("~/"):
            target = os.path.normpath(CONTAINER_HOME + text[1:])
        else:
            target = os.path.normpath(os.path.join(cwd, text))
        if target not in ("/", CONTAINER_HOME):
            found[target] = host.resolve()
    for target in sorted(found):  # a parent sorts before its children: skip what it already covers
        if not any(target.startswith(parent.rstrip("/") + "/") for parent in found if parent != target):
            mounts.append(Mount(found[target], target))
    return mounts


def run_in_container(
    client: Any,
    image: Any,
    tag: str,
    argv: list[str],
    *,
    mounts: list[Mount],
    environment: dict[str, str],
    gpus: GpuRequest,
    network: str | None,
    working_dir: str,
    run_id: str,
    console: Console,
) -> int:
    """Run the image's entry point with argv; stream its output live; return its exit status. Ctrl-C
    stops and removes the container (the run resumes from its last checkpoint when rerun)."""
    from docker.types import Mount as DockerMount
    from docker.types import Ulimit

    for mount in mounts:
        if not mount.read_only:
            mount.source.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty() and sys.stderr.isatty()
    if tty:
        size = shutil.get_terminal_size()
        environment = {**environment, "COLUMNS": str(size.columns), "LINES": str(size.lines)}
    ulimits = [Ulimit(name="memlock", soft=-1, hard=-1), Ulimit(name="stack", soft=67108864, hard=67108864)]
    container = client.containers.create(
        image.id,
        command=argv,
        environment=environment,
        mounts=[DockerMount(m.target, str(m.source), type="bind", read_only=m.read_only) for m in mounts],
        working_dir=working_dir,
        user=f"{os.getuid()}:{os.getgid()}",
        device_requests=gpus.device_requests or None,
        network_mode=network,
        shm_size="16g",
        ulimits=ulimits if gpus.device_requests else None,
        init=True,
        tty=tty,
        labels={LABEL_RUN: run_id},
        detach=True,
    )
    passed = sorted(name for name in environment if not name.startswith("HARNESS_") and name not in ("COLUMNS", "LINES"))
    console.print(
        f"[bold]container {container.short_id}[/] from {tag}: gpus {gpus.label}, "
        f"network {network or 'default'}, env {', '.join(passed) or 'none'} (values not shown)",
        highlight=False,
        soft_wrap=True,
    )
    try:
        container.start()
        if tty:
            for chunk in container.logs(stream=True, follow=True):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        else:
            for out, err in client.api.attach(container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True):
                for data, target in ((out, sys.stdout), (err, sys.stderr)):
                    if data:
                        target.write(data.decode("utf-8", errors="replace"))
                        target.flush()
        status = container.wait()
        return int(status.get("StatusCode", 1))
    except KeyboardInterrupt:
        console.print(f"\nstopping container {container.short_id} ...", soft_wrap=True)
        with contextlib.suppress(Exception):
            container.stop(timeout=10)
        console.print("stopped; rerun the same command to resume from the last checkpoint", soft_wrap=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


def run_docker(
    client: Any,
    *,
    spec: dict[str, Any],
    run_id: str,
    argv: list[str],
    output: Path,
    image_tag: str | None,
    gpus_value: str | None,
    distributed: str,
    network: str | None,
    console: Console,
) -> int:
    """`harness run --docker`: validate on the host (done by the caller), ensure the image, run it."""
    host = host_gpus()
    gpus = parse_gpus(gpus_value, len(host))
    if gpus.nproc == "1" and distributed != "ddp":
        console.print(f"[yellow]--distributed {distributed} has no effect with one process[/]")
    elif distributed == "zero3":  # refused on the host too, before an image is built (harness.distributed)
        from harness.distributed import unsupported_message

        raise HarnessError(unsupported_message(distributed))
    image, tag = ensure_image(client, image_tag, BuildOptions.from_env(), console)
    cwd = Path.cwd()
    mounts = plan_mounts(spec, output, cwd, dict(os.environ))
    environment = container_environment(dict(os.environ), image_facts(image, tag), gpus, distributed, host)
    return run_in_container(
        client,
        image,
        tag,
        argv,
        mounts=mounts,
        environment=environment,
        gpus=gpus,
        network=network,
        working_dir=str(cwd),
        run_id=run_id,
        console=console,
    )
