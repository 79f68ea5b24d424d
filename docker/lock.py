"""The project's one resolved stack: write the lock files from a freshly resolved environment, or check
that an environment (the project venv) is exactly the locked one.

Three files, all written here, all used as pip constraints by the Makefile's venv and (the first two)
by the image, so a laptop run, CI and a container run the same library versions on any day:
- docker/requirements.lock: the harness's runtime dependencies, torch excluded;
- docker/torch.lock: torch and its own dependencies (the image installs them first: from PyPI the CUDA
  build, or a CPU wheel through FIND_LINKS; the venv uses them as constraints, so CPU and GPU machines
  get the same torch release);
- docker/dev.lock: what only the tests and tools need (pytest, ruff, trl, ...), less what the two
  files above already pin.

pyproject.toml keeps open ranges for library users; the lock is moved on purpose with `make lock`
(a fresh venv resolved without constraints, then this script), never by the registry's newest release.

Usage: python docker/lock.py            write the three files from this environment
       python docker/lock.py --check    exit 1 with one line naming every package whose installed
                                        version differs from the lock (what `make test` runs first)
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
DEV_LOCK = ROOT / "docker" / "dev.lock"
# Not descended into for the runtime lock: the base image (or the TORCH_REQUIREMENT build argument) provides them.
FROM_BASE_IMAGE = {"torch"}


class NotInstalled(Exception):
    pass


def project_requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


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
            raise NotInstalled(f"{requirement.name} is not installed in {sys.prefix}") from None
        if not requirement.specifier.contains(distribution.version, prereleases=True):
            raise NotInstalled(f"installed {name}=={distribution.version} does not satisfy {requirement}")
        pinned[name] = base_version(distribution.version)
        for line in distribution.requires or []:
            child = Requirement(line)
            if applies(child, seen_extras[name]):
                queue.append(child)
    return pinned


def base_version(version: str) -> str:
    return version.split("+")[0]  # 2.13.0+cpu -> 2.13.0: the CPU and the CUDA build satisfy the same pin


def environment_pins() -> dict[Path, dict[str, str]]:
    """What this environment would lock: runtime, torch and dev pins (dev less what the others pin)."""
    runtime = closure(project_requirements(), stop=FROM_BASE_IMAGE)
    torch = closure([Requirement("torch")], stop=set())
    dev = closure(project_requirements("dev"), stop=set())
    return {
        LOCK: runtime,
        TORCH_LOCK: torch,
        DEV_LOCK: {name: version for name, version in dev.items() if name not in runtime and name not in torch},
    }


HEADERS = {
    LOCK: "Exact runtime dependencies of the harness (image and venv), torch excluded (see torch.lock)",
    TORCH_LOCK: "torch and its dependencies (the venv's constraints; the image installs them first)",
    DEV_LOCK: "Test and tool dependencies of the venv (make setup), beyond the two other lock files",
}


def render(pinned: dict[str, str], what: str) -> str:
    environment = default_environment()
    header = [
        f"# {what} (written by docker/lock.py from a fresh resolution: make lock; do not edit by hand).",
        f"# Resolved for Python {environment['python_version']} on {environment['sys_platform']}"
        f" {environment['platform_machine']}.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(pinned.items())]) + "\n"


def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version of one lock file (only `name==version` lines)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"{path}:{number}: '{line}' is not an exact pin (name==version)")
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def differences(locks: dict[Path, dict[str, str]], installed: dict[Path, dict[str, str]]) -> list[str]:
    """Every way the installed environment differs from the lock files, one short phrase each.

    Packages reachable only through torch may differ by platform (the CUDA build brings nvidia-*), so
    for torch.lock only the pinned packages are compared."""
    found = []
    for path, pins in locks.items():
        have = installed.get(path, {})
        for name, version in sorted(pins.items()):
            if name in have and have[name] != version:
                found.append(f"{name} {have[name]} installed, {version} locked")
        if path != TORCH_LOCK:
            found += [f"{name} {have[name]} not locked" for name in sorted(set(have) - set(pins))]
    return found


def check(locks: dict[Path, dict[str, str]] | None = None) -> list[str]:
    """Differences between this environment and the lock files (empty: the venv is the locked stack)."""
    if locks is None:
        locks = {path: read_lock(path) for path in HEADERS}
    try:
        installed = environment_pins()
    except NotInstalled as error:
        return [str(error)]
    return differences(locks, installed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if this environment differs from the lock")
    args = parser.parse_args()
    if args.check:
        found = check()
        if found:
            sys.exit(f"error: the venv ({sys.prefix}) is not the locked stack: {'; '.join(found)}. "
                     "Rebuild it with `rm -rf .venv && make setup`, or move the lock on purpose with `make lock`")
        print(f"venv matches the lock ({sum(len(read_lock(p)) for p in HEADERS)} pinned packages)")
        return
    try:
        pins = environment_pins()
    except NotInstalled as error:
        sys.exit(f"error: {error}; install the project first")
    for path, pinned in pins.items():
        path.write_text(render(pinned, HEADERS[path]))
        print(f"wrote {path.relative_to(ROOT)} ({len(pinned)} packages)")


if __name__ == "__main__":
    main()
