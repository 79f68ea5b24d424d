"""docker/lock.py: the venv the tests run in is the locked stack, a fresh resolution against the lock
gets exactly its pins whatever the registry's newest releases are, and a drift is one named line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("docker_lock", ROOT / "docker" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

LOCK_FILES = [lock.LOCK, lock.TORCH_LOCK, lock.DEV_LOCK]


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for path in LOCK_FILES:
        for name, version in lock.read_lock(path).items():
            assert pins.setdefault(name, version) == version, f"{name} pinned twice with different versions"
    return pins


def test_the_venv_running_these_tests_is_the_locked_stack():
    assert lock.check() == []
    pins = locked()
    from importlib import metadata

    for name in ("transformers", "accelerate", "torch", "lm-eval", "datasets", "pytest"):
        assert lock.base_version(metadata.version(name)) == pins[name]


def test_every_project_requirement_is_pinned_within_its_range():
    """The image installs requirements.lock over a base that brings torch; the venv adds the other two."""
    assert "torch" not in lock.read_lock(lock.LOCK) and "torch" in lock.read_lock(lock.TORCH_LOCK)
    pins = locked()
    for requirement in lock.project_requirements() + lock.project_requirements("dev"):
        name = lock.canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in the lock; run: make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {requirement}"


def test_a_drift_names_each_package():
    pins = {path: lock.read_lock(path) for path in LOCK_FILES}
    pins[lock.LOCK] = {**pins[lock.LOCK], "transformers": "0.0.1"}
    del pins[lock.DEV_LOCK]["pytest"]
    found = lock.check(pins)
    assert any(line.startswith("transformers ") and "0.0.1 locked" in line for line in found), found
    assert any(line.startswith("pytest ") and line.endswith("not locked") for line in found), found
    assert len(found) == 2


def test_check_command_fails_in_one_line_naming_the_package(tmp_path: Path):
    """The same script `make test` runs first, on a copy of the repository whose lock pins an old accelerate."""
    (tmp_path / "docker").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for path in [ROOT / "docker" / "lock.py", *LOCK_FILES]:
        shutil.copy(path, tmp_path / "docker")
    stale = tmp_path / "docker" / "requirements.lock"
    stale.write_text("".join(
        "accelerate==0.0.1\n" if line.startswith("accelerate==") else line + "\n" for line in stale.read_text().splitlines()))
    result = subprocess.run([sys.executable, str(tmp_path / "docker" / "lock.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "accelerate" in result.stderr and "0.0.1 locked" in result.stderr and "make lock" in result.stderr
    assert "Traceback" not in result.stderr
    ok = subprocess.run([sys.executable, str(ROOT / "docker" / "lock.py"), "--check"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr


def resolve(tmp_path: Path, *args: str) -> dict[str, str]:
    """name -> version pip would install for ARGS on an empty environment, from the live registry."""
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    if result.returncode != 0:
        if "Could not fetch" in result.stderr or "NewConnectionError" in result.stderr or "No matching" in result.stderr:
            pytest.skip(f"the package registry cannot be reached: {result.stderr.strip().splitlines()[-1]}")
        raise AssertionError(result.stderr)
    return {lock.canonicalize_name(item["metadata"]["name"]): lock.base_version(item["metadata"]["version"])
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.e2e
def test_a_fresh_resolution_against_the_lock_gets_exactly_the_pins(tmp_path: Path):
    """What `make setup` does on a fresh machine, resolved from the registry as it is today: every locked
    package comes out at its pin even when the registry serves newer releases (printed for the record)."""
    constraints = [arg for path in ["constraints/cpu.txt", *LOCK_FILES] for arg in ("-c", str(path))]
    resolved = resolve(tmp_path, *constraints, "--no-build-isolation", "-e", ".[dev]")  # the venv's setuptools builds
    pins = locked()
    assert {name: resolved[name] for name in resolved if name in pins} == {name: pins[name] for name in resolved
                                                                           if name in pins}
    unlocked = {name for name in set(resolved) - set(pins) - {"sft-recipe-harness"}
                if not name.startswith(("nvidia-", "cuda-", "triton"))}  # a CUDA torch's own, platform-specific
    assert not unlocked, f"resolved packages missing from the lock: {sorted(unlocked)}; run: make lock"
    for name in ("transformers", "accelerate"):  # for the log: what an unpinned install would get today
        listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                                 text=True, timeout=120).stdout.splitlines()
        print(f"registry today: {listing[0] if listing else name + ' (no listing)'}; locked: {pins[name]}")
