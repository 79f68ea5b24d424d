"""`harness docker build` and `harness run --docker` against a real Docker daemon.

The module starts its own dockerd (Debian's docker.io; root needed) with its data under a stable
cache directory, so the local base image and the image's dependency layers are reused from one
session to the next; it stops the daemon at the end. No registry is reachable here, so the base image
is built locally (debootstrap Debian bookworm + python3-venv, the host's CA bundle for pip) and the
harness image is built FROM it with the CPU torch wheel from the host's pip find-links. Then a
containerized run with --network none must reproduce a local run of the same spec: same run id,
metrics, per-example results, token counts and bit-identical weights. Skips with the reason where no
daemon can run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from harness.artifacts import file_digest
from harness.container import LABEL_RUN
from harness.records import git_commit
from tests.cli_helpers import load_run, run_cli, without

pytestmark = pytest.mark.docker

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HARNESS_DOCKER_TEST_CACHE") or Path.home() / ".cache" / "sft-harness-docker-test")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("HARNESS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
FAST = ["--recipe", "one-off", "--set", "data.limit=160", "--set", "training.logging_steps=1", "--limit", "40"]
CANARIES = {"OPENAI_API_KEY": "canary-openai-4f1d9a7c3e", "HF_TOKEN": "canary-hf-8b2e6d0a51"}
IMAGE = "harness-it:latest"  # stable tag: keeps the build cache's layer chain alive between sessions


def skip(reason: str) -> None:
    pytest.skip(f"Docker integration skipped: {reason}")


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    """A dockerd of our own on a private socket, stopped (by its pid) when the module is done."""
    if os.environ.get("HARNESS_SKIP_DOCKER") == "1":
        skip("HARNESS_SKIP_DOCKER=1")
    if os.geteuid() != 0:
        skip("starting dockerd needs root (CI runs as root)")
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if dockerd is None:
        skip("dockerd not installed (apt-get install docker.io; .ci/run does this)")
    import docker

    CACHE.mkdir(parents=True, exist_ok=True)
    lock = (CACHE / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        skip(f"another test session is using the daemon data in {CACHE}")
    exec_root = Path(tempfile.mkdtemp(prefix="hdk-", dir="/tmp"))  # short: unix socket paths are limited
    socket = exec_root / "docker.sock"
    log_path = CACHE / "dockerd.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                dockerd,
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=overlay2",
                f"--data-root={CACHE / 'data'}",
                f"--exec-root={exec_root}",
                f"--pidfile={exec_root / 'docker.pid'}",
                "-H",
                f"unix://{socket}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = None
    try:
        deadline = time.monotonic() + 60
        while client is None:
            if process.poll() is not None or time.monotonic() > deadline:
                lines = [line for line in log_path.read_text().splitlines() if line.strip()]
                skip(f"dockerd could not start here: {lines[-1][:300] if lines else 'no output'}")
            with contextlib.suppress(Exception):
                candidate = docker.DockerClient(base_url=f"unix://{socket}")
                candidate.ping()
                client = candidate
            time.sleep(0.5)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DOCKER_HOST", f"unix://{socket}")
            yield client
    finally:
        if client is not None:
            for container in client.containers.list(all=True):
                container.remove(force=True)
            with contextlib.suppress(Exception):
                client.images.prune(filters={"dangling": True})  # old final images; the layer chain stays
            client.close()
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        unmount_under(exec_root)  # dockerd leaves its network namespace mounted there
        shutil.rmtree(exec_root, ignore_errors=True)
        lock.close()


def unmount_under(root: Path) -> None:
    mount_points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount_point in sorted((m for m in mount_points if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", mount_point], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def base_image(daemon: Any) -> str:
    """Debian bookworm (debootstrap minbase + python3-venv) with the host's CA bundle, imported once."""
    from docker.errors import ImageNotFound

    bundle = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b""
    tag = f"harness-test-base:bookworm-{hashlib.sha256(bundle).hexdigest()[:12]}"
    with contextlib.suppress(ImageNotFound):
        daemon.images.get(tag)
        return tag
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if debootstrap is None:
        skip("debootstrap not installed (apt-get install debootstrap; .ci/run does this)")
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    rootfs = work / "rootfs"
    try:
        result = subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3-venv", "bookworm", str(rootfs), DEBIAN_MIRROR],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, f"debootstrap failed: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        if bundle:  # pip inside the build trusts what the host trusts (e.g. an egress proxy's CA)
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(bundle)
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / leftovers, ignore_errors=True)
        archive = work / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(archive), "."], check=True, timeout=600)
        repository, name = tag.split(":")
        daemon.api.import_image(
            src=str(archive),
            repository=repository,
            tag=name,
            changes=["ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", 'CMD ["/bin/bash"]'],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tag


def torch_wheel_dir() -> str | None:
    """A local directory holding the CPU torch wheel of this environment (pip's find-links here)."""
    version = metadata.version("torch").split("+")[0]
    candidates = [os.environ.get("HARNESS_TEST_TORCH_WHEELS", ""), *os.environ.get("PIP_FIND_LINKS", "").split()]
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    for line in listing.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            candidates += value.strip("'\"").split()
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and list(Path(candidate).glob(f"torch-{version}*.whl")):
            return candidate
    return None


@pytest.fixture(scope="module")
def build_env(daemon: Any, base_image: str) -> Iterator[dict[str, str]]:
    """How both `harness docker build` and the auto-build of `run --docker` build the CPU test image;
    the canary secrets are set throughout, to prove they never reach an image or a run directory."""
    wheels = torch_wheel_dir()
    if wheels is None:
        skip(f"no local torch {metadata.version('torch')} wheel for the CPU image (set HARNESS_TEST_TORCH_WHEELS)")
    env = {
        "HARNESS_DOCKER_BASE": base_image,
        "HARNESS_DOCKER_FIND_LINKS": wheels,
        "HARNESS_DOCKER_BUILD_NETWORK": "host",
        **CANARIES,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def image(daemon: Any, build_env: dict[str, str]) -> Any:
    """The harness image, built with the `harness docker build` command (from the cache when unchanged)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "docker", "build", "--tag", IMAGE],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built = daemon.images.get(IMAGE)
    assert result.stdout.split() == [IMAGE, built.id]
    assert "docker build" in result.stderr and "step 1/" in result.stderr  # the progress display ran
    print(f"\nharness docker build: {time.perf_counter() - started:.1f} s ({built.attrs['Size'] / 2**30:.2f} GiB)")
    return built


def test_run_in_docker_reproduces_a_local_run(daemon, image, build_env, tmp_path: Path, monkeypatch, capsys):
    # An image tag that does not exist yet: `run --docker` builds it (every layer from the cache).
    missing = f"harness-it:missing-{uuid.uuid4().hex[:8]}"
    session_cache = os.environ["HARNESS_CACHE"]
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "container-cache"))  # the container builds tiny itself
    started = time.perf_counter()
    try:
        code, out, err = run_cli(
            ["run", *FAST, "--output", str(tmp_path / "docker"), "--docker", "--image", missing, "--docker-network", "none"],
            capsys,
        )
        docker_seconds = time.perf_counter() - started
        assert code == 0, err[-3000:]
        said = " ".join(err.split())
        assert f"image {missing} not found locally; building it" in said and f"built {missing}" in said
        assert daemon.images.get(missing).id == image.id  # same context, same options: the cached image
        launch = re.search(r"container \w+ from harness-it:missing-\w+: gpus none, network none, env ([^()]*) \(values not shown\)", said)
        assert launch and "HF_TOKEN" in launch[1] and "OPENAI_API_KEY" in launch[1]
        assert "local_arc_easy" in out and "acc_norm" in out  # the container's results table, on stdout
    finally:
        with contextlib.suppress(Exception):
            daemon.images.remove(missing, noprune=True)
    assert not daemon.containers.list(all=True, filters={"label": LABEL_RUN})  # removed after the run

    monkeypatch.setenv("HARNESS_CACHE", session_cache)
    started = time.perf_counter()
    code, _, err = run_cli(["run", *FAST, "--output", str(tmp_path / "local")], capsys)
    local_seconds = time.perf_counter() - started
    assert code == 0, err[-3000:]
    print(f"\nrun --docker {docker_seconds:.1f} s (incl. cached build), local run {local_seconds:.1f} s")

    docker_dir, in_docker = load_run(tmp_path / "docker")
    local_dir, local = load_run(tmp_path / "local")
    assert docker_dir.name == local_dir.name == in_docker["run_id"] == local["run_id"]
    for key in ("spec_hash", "spec", "model", "data", "recipe", "tokenization", "suite", "seed", "git_commit"):
        assert in_docker[key] == local[key], key
    for task, metrics in local["metrics"].items():
        assert without(in_docker["metrics"][task], "seconds") == without(metrics, "seconds")
    assert in_docker["metrics"]["local_arc_easy"]["acc"]["stderr"] > 0
    for stage, result in local["training"].items():
        assert without(in_docker["training"][stage], "wall_seconds") == without(result, "wall_seconds")
    assert len(local["training"]["sft"]["loss_curve"]) == local["training"]["sft"]["steps"] > 0
    clock = ("wall_seconds", "device_hours", "training_device_hours", "phase_seconds")  # timings differ, nothing else
    assert without(in_docker["cost"], *clock) == without(local["cost"], *clock)
    assert in_docker["versions"] == {**local["versions"], "python": in_docker["versions"]["python"]}
    for name in ("model/model.safetensors", "model/tokenizer.json", "eval/samples_local_arc_easy.jsonl"):
        assert file_digest(docker_dir / name) == file_digest(local_dir / name), name
    # The record says where it ran; the files belong to the host user.
    container = in_docker["host"]["container"]
    assert container["image_id"] == image.id and container["image_tag"] == missing
    assert container["base_image"] == build_env["HARNESS_DOCKER_BASE"]
    assert container["host_gpus"] == "none" and container["gpu_request"] == "none"
    assert "container" not in local["host"]
    assert image.labels["org.opencontainers.image.revision"] == git_commit() == in_docker["git_commit"]
    assert all(path.stat().st_uid == os.getuid() for path in docker_dir.rglob("*"))
    assert image.attrs["Config"]["User"] == "1000:1000"  # non-root unless the launcher maps the host user

    # Canaries: in no layer's history, the image config, the build log, or any file of the run.
    history = json.dumps(daemon.api.history(image.id)) + json.dumps(image.attrs)
    build_logs = "".join(path.read_text() for path in (tmp_path / "container-cache" / "docker").glob("*.log"))
    run_files = b"".join(path.read_bytes() for path in docker_dir.rglob("*") if path.is_file())
    for canary in CANARIES.values():
        assert canary not in history and canary not in build_logs and canary.encode() not in run_files
        assert canary not in out + err


def test_ctrl_c_stops_and_removes_the_container(daemon, image, tmp_path: Path):
    """In a terminal (a pseudo-terminal here) the container gets a TTY and its output is passed through
    as it comes; Ctrl-C (SIGINT) stops and removes it and exits 130."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        # 50 epochs: training outlasts the Ctrl-C below by far (FAST alone finishes in about 3 s on a quiet machine)
        [sys.executable, "-m", "harness.cli", "run", *FAST, "--set", "training.epochs=50", "--output", str(tmp_path / "runs"),
         "--docker", "--image", IMAGE, "--docker-network", "none"],
        stdin=slave, stdout=slave, stderr=slave, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        # as in a terminal: a background job of a non-interactive shell (nohup ... &) starts with SIGINT ignored,
        # which the child would inherit, and Ctrl-C would then do nothing
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the child side is closed
            while data := os.read(master, 65536):
                chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not (running := daemon.containers.list(filters={"label": LABEL_RUN, "status": "running"})):
            assert process.poll() is None, b"".join(chunks).decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.5)
        assert running[0].attrs["Config"]["Tty"] is True
        while b"train sft" not in b"".join(chunks):  # Ctrl-C while it trains
            assert process.poll() is None, b"".join(chunks).decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=10)
        os.close(master)
    said = " ".join(b"".join(chunks).decode(errors="replace").split())
    assert process.returncode == 130, said[-2000:]
    assert "stopping container" in said and "stopped; rerun the same command to resume" in said
    assert not daemon.containers.list(all=True, filters={"label": LABEL_RUN})


def test_the_container_exit_status_is_the_commands(daemon, image, tmp_path: Path, capsys):
    # The host validates this spec (a hub id is a valid model name); inside, offline, the model
    # cannot be loaded: the container's error is shown and its non-zero status is ours.
    code, _, err = run_cli(
        ["run", "--model", "nobody/no-such-model", "--set", "data.limit=16", "--output", str(tmp_path / "runs"),
         "--docker", "--image", IMAGE, "--docker-network", "none"],
        capsys,
    )  # fmt: skip
    assert code != 0 and "nobody/no-such-model" in err
    assert not daemon.containers.list(all=True, filters={"label": LABEL_RUN})


def test_a_failed_build_is_one_line_naming_the_step_and_the_log(daemon, build_env, tmp_path: Path, capsys):
    code, _, err = run_cli(["docker", "build", "--base", "no-such-base:1", "--tag", "harness-it:never"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: docker build failed at Step 2/") and "FROM ${BASE_IMAGE}" in last
    assert "no-such-base" in last and "(full log: " in last and "Traceback" not in err
    assert "harness-it:never" not in [tag for image in daemon.images.list() for tag in image.tags]


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_train_under_accelerate_launch(daemon, image, tmp_path: Path, backend: str):
    """HARNESS_NPROC=2 makes the entry point run `harness run` under `accelerate launch` (DDP by default,
    FSDP2 with the shipped fsdp.yaml, as `--docker --gpus N --distributed fsdp` sets it; gloo on CPU):
    one record, whose token counts cover the whole epoch, not one process's share (32 unpacked rows, 4
    per process per step: 4 steps, no row repeated). tests/harness/test_distributed.py checks the
    training itself against one process, outside Docker."""
    output = tmp_path / "runs"
    output.mkdir()
    config = f"/opt/harness/docker/accelerate/{backend}.yaml"
    container = daemon.containers.run(
        image.id,
        ["run", "--set", "data.limit=32", "--set", "training.packing=false", "--set", "training.batch_size=4",
         "--limit", "8", "--output", "/runs"],
        environment={"HARNESS_NPROC": "2", **({"HARNESS_ACCELERATE_CONFIG": config} if backend == "fsdp" else {})},
        mounts=[docker_mount("/runs", output)],
        user=f"{os.getuid()}:{os.getgid()}",
        network_mode="none",
        detach=True,
    )
    try:
        status = container.wait(timeout=600)["StatusCode"]
        logs = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    assert f"accelerate launch --config_file {config} --num_processes 2" in logs
    assert status == 0, logs[-3000:]
    _, record = load_run(output)
    sft = record["training"]["sft"]
    assert sft["real_tokens"] == sft["epoch_tokens"] == record["cost"]["train_tokens"]
    assert sft["processes"] == record["cost"]["device_count"] == 2 and sft["steps"] == 4
    assert (sft["distributed"], sft["parameter_share"]) == (backend, 0.5 if backend == "fsdp" else 1.0)


def docker_mount(target: str, source: Path) -> Any:
    from docker.types import Mount

    return Mount(target, str(source), type="bind")
