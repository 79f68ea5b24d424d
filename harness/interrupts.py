"""SIGTERM (what spot instances and `docker stop` send): stop cleanly so that rerunning the same command
resumes. Inside training the current optimizer step finishes, a checkpoint is saved, and the run exits;
elsewhere (scoring, evaluation) the run exits at once - finished scoring chunks are already cached."""

from __future__ import annotations

import os
import signal
from typing import Any

EXIT_TERMINATED = 75  # EX_TEMPFAIL: "try again later" - distinct from user errors (2) and crashes (1)


class RunTerminated(Exception):
    """Raised when a run stops on SIGTERM; the CLI exits with EXIT_TERMINATED."""


class _State:
    in_training = False
    requested = False


def _on_sigterm(signum: int, frame: Any) -> None:
    _State.requested = True
    if not _State.in_training:
        raise RunTerminated("stopped by SIGTERM; rerun the same command to resume")


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def set_in_training(active: bool) -> None:
    """Inside training, SIGTERM only sets a flag: training.StopOnSigterm saves a checkpoint and stops
    after the current optimizer step. (This module stays free of heavy imports: the CLI loads it first.)"""
    _State.in_training = active


def termination_requested() -> bool:
    return _State.requested


def raise_if_terminated(step: int) -> None:
    if _State.requested:
        raise RunTerminated(f"stopped by SIGTERM after step {step} (checkpoint saved); rerun the same command to resume")


KILL_AT_ENV = "HARNESS_TEST_KILL_AT"


def kill_point_for_tests(stage: str, unit: int) -> None:
    """Test-only fault injection for tests/test_resume.py: with HARNESS_TEST_KILL_AT=<stage>:<unit> the
    process SIGKILLs itself right after finishing that unit of work (stage `scoring`: the n-th chunk
    computed; `train/<stage>`: the checkpoint at step n; `eval/<task>`: the n-th request computed), so a
    test can kill at an exact point instead of racing a loaded machine. Unset in normal use: no effect."""
    target = os.environ.get(KILL_AT_ENV)
    if target and target == f"{stage}:{unit}":
        os.kill(os.getpid(), signal.SIGKILL)
