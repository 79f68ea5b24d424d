"""What a run record says about where it ran: library versions, git commit, host, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_SCHEMA_VERSION = 1
TRACKED_PACKAGES = ["torch", "transformers", "datasets", "accelerate", "peft", "lm_eval", "alpaca_eval", "tokenizers"]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def git_commit() -> str:
    """The harness's own git commit (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HARNESS_GIT_COMMIT", "unknown")  # in the Docker image: the commit it was built from


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GiB), and peak GPU memory when CUDA is in use."""
    peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    try:
        import torch

        if torch.cuda.is_available():
            peak["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except ImportError:
        pass
    return peak


# What `harness run --docker` passes into the container (harness/container.py sets them), for the record.
CONTAINER_ENV = {
    "HARNESS_IMAGE_ID": "image_id",
    "HARNESS_IMAGE_TAG": "image_tag",
    "HARNESS_IMAGE_DIGEST": "image_digest",
    "HARNESS_IMAGE_BASE": "base_image",
    "HARNESS_HOST_GPUS": "host_gpus",
    "HARNESS_HOST_GPU_DRIVER": "host_gpu_driver",
    "HARNESS_GPU_REQUEST": "gpu_request",
    "HARNESS_NPROC": "processes_per_node",
}


def container_info() -> dict[str, str] | None:
    """The container facts the launcher passed in, for the run record; None outside a container."""
    if "HARNESS_IMAGE_ID" not in os.environ:
        return None
    return {key: os.environ[name] for name, key in CONTAINER_ENV.items() if os.environ.get(name)}


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    container = container_info()  # image id, tag, base, host GPU model: passed in by `harness run --docker`
    if container is not None:
        info["container"] = container
    return info
