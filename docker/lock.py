"""Write the image's lock files from an environment where the stack was installed and tested (the
project venv): docker/requirements.lock (the harness's runtime dependencies) and docker/torch.lock
(torch and its own dependencies).

Why a lock: an image built next month must resolve the same packages as the one verified today.
requirements.lock leaves torch and what only torch needs out on purpose: on a GPU host they come
from the CUDA base image (pytorch/pytorch:...). torch.lock is installed only with the build argument
INSTALL_TORCH=1 (a base image without torch, such as the local CPU test image).

Usage: .venv/bin/python docker/lock.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "requirements.lock"
TORCH_LOCK = ROOT / "docker" / "torch.lock"
# Not descended into: the base image (or the TORCH_REQUIREMENT build argument) provides them.
FROM_BASE_IMAGE = {"torch"}


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    environment = dict(default_environment())
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))


def closure(roots: list[Requirement], stop: set[str]) -> dict[str, str]:
    """name -> installed version for every package reachable from roots (not descending into `stop`)."""
    pinned: dict[str, str] = {}
    seen_extras: dict[str, set[str]] = {}
    queue = list(roots)
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        if name in stop:
            continue
        extras = set(requirement.extras)
        if name in seen_extras and extras <= seen_extras[name]:
            continue
        seen_extras[name] = seen_extras.get(name, set()) | extras
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"error: {requirement.name} is not installed in {sys.prefix}; install the project first")
        if not requirement.specifier.contains(distribution.version, prereleases=True):
            sys.exit(f"error: installed {name}=={distribution.version} does not satisfy {requirement}")
        pinned[name] = distribution.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0: either build satisfies it
        for line in distribution.requires or []:
            child = Requirement(line)
            if applies(child, seen_extras[name]):
                queue.append(child)
    return pinned


def render(pinned: dict[str, str], what: str) -> str:
    environment = default_environment()
    header = [
        f"# {what} (written by docker/lock.py from a tested environment; do not edit by hand).",
        f"# Resolved for Python {environment['python_version']} on {environment['sys_platform']}"
        f" {environment['platform_machine']}.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(pinned.items())]) + "\n"


def lock_texts() -> dict[Path, str]:
    return {
        LOCK: render(
            closure(direct_requirements(), stop=FROM_BASE_IMAGE),
            "Exact runtime dependencies of the harness image, torch excluded (it comes from the base image)",
        ),
        TORCH_LOCK: render(
            closure([Requirement("torch")], stop=set()),
            "torch and its dependencies, installed only with --build-arg INSTALL_TORCH=1",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the lock differs from this environment")
    args = parser.parse_args()
    for path, text in lock_texts().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                sys.exit(f"error: {path} is out of date; run: python docker/lock.py")
            continue
        path.write_text(text)
        print(f"wrote {path} ({text.count(chr(10)) - 2} packages)")


if __name__ == "__main__":
    main()
