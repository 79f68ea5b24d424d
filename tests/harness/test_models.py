import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.errors import HarnessError
from harness.models import MODEL_SET, build_tiny_model, resolve_model


def weights_digest(directory: Path) -> str:
    tensors = load_file(str(directory / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def test_tiny_model_builds_deterministically(tmp_path, monkeypatch, harness_cache):
    first = build_tiny_model()
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    second = build_tiny_model()
    assert first != second
    assert weights_digest(first) == weights_digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert build_tiny_model() == second  # cached


def test_model_set_covers_the_papers_models():
    for name in ["tiny", "smollm2-135m-instruct", "llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b-v0.1", "qwen2.5-7b"]:
        entry = MODEL_SET[name]
        assert entry.context_length > 0 and entry.template in ("chat", "alpaca")


def test_resolution_of_names_paths_and_hub_ids(tmp_path):
    assert resolve_model("tiny").weights == "builtin:tiny"
    assert resolve_model("meta-llama/Llama-2-7b-hf").entry.template == "alpaca"
    (tmp_path / "m").mkdir()
    with pytest.raises(HarnessError, match="has no config.json"):  # not a model: refused before any run
        resolve_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m")).weights == str(tmp_path / "m")
    with pytest.raises(HarnessError, match="did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m")
    with pytest.raises(HarnessError, match="model_path not found"):
        resolve_model("smollm2-135m-instruct", str(tmp_path / "missing.gguf"))
