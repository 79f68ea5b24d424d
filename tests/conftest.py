"""Shared fixtures: offline hub settings, one harness cache per test session, the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds its own tiny model (a few seconds) unless HARNESS_CACHE is set."""
    if "HARNESS_CACHE" not in os.environ:
        os.environ["HARNESS_CACHE"] = str(tmp_path_factory.mktemp("harness-cache"))
    return Path(os.environ["HARNESS_CACHE"])


@pytest.fixture(scope="session")
def tiny(harness_cache: Path):
    """(model, tokenizer) of the tiny model, fp32; tests that train must deepcopy the model."""
    from harness.models import load_model_and_tokenizer, resolve_model

    return load_model_and_tokenizer(resolve_model("tiny"))


@pytest.fixture(scope="session")
def sample_records():
    from harness.data import load_instruction_data

    return load_instruction_data("alpaca-sample").records


def require_smollm2() -> Path:
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF} (../shared absent)")
    return SMOLLM2_GGUF
