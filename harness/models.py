"""The model set: a fixed, versioned list of models, and how each is loaded.

`tiny` is built by the harness itself, offline and deterministically (a byte-level BPE tokenizer
trained on the shipped instruction text and a small Llama), and cached. Real models load from the
hub by id, from a local directory, or from a local GGUF file (dequantized to a plain model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from harness.errors import HarnessError, unknown_name, user_path

MODEL_SET_VERSION = "2026.11.1"

Template = Literal["chat", "alpaca"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # hub id, "builtin:tiny", or a local path
    description: str
    template: Template
    context_length: int
    dtype: str  # the dtype the weights are published in
    learning_rate: float  # default full fine-tune learning rate for this model
    params: str = ""

    def as_record(self) -> dict[str, Any]:
        return asdict(self) | {"model_set_version": MODEL_SET_VERSION}


MODEL_SET: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        ModelEntry("tiny", "builtin:tiny", "2-layer Llama built offline by the harness (tests, demo)", "chat", 1024, "float32", 2e-3, "0.6M"),  # noqa: E501
        ModelEntry(
            "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct (Llama arch, ChatML); also loads from a local GGUF via model_path",
            "chat", 8192, "bfloat16", 2e-5, "135M",
        ),
        ModelEntry("llama-2-7b", "meta-llama/Llama-2-7b-hf", "Llama-2-7B base (Phased IFT, Cherry LLM, NEFTune)", "alpaca", 4096, "bfloat16", 2e-5, "7B"),  # noqa: E501
        ModelEntry("llama-2-13b", "meta-llama/Llama-2-13b-hf", "Llama-2-13B base (Phased IFT, Cherry LLM)", "alpaca", 4096, "bfloat16", 2e-5, "13B"),  # noqa: E501
        ModelEntry("llama-2-70b", "meta-llama/Llama-2-70b-hf", "Llama-2-70B base (Phased IFT)", "alpaca", 4096, "bfloat16", 1e-5, "70B"),
        ModelEntry("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "Llama-3-8B base (Phased IFT)", "alpaca", 8192, "bfloat16", 2e-5, "8B"),
        ModelEntry("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "Llama-3-70B base (Phased IFT)", "alpaca", 8192, "bfloat16", 1e-5, "70B"),
        ModelEntry("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "Llama-3.1-8B base (SFTMix)", "alpaca", 131072, "bfloat16", 2e-5, "8B"),
        ModelEntry("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", "Mistral-7B-v0.1 base (Phased IFT, SFTMix)", "alpaca", 8192, "bfloat16", 5e-6, "7B"),  # noqa: E501
        ModelEntry("qwen2.5-7b", "Qwen/Qwen2.5-7B", "Qwen2.5-7B base", "alpaca", 32768, "bfloat16", 1e-5, "7B"),
    ]
}


def cache_dir() -> Path:
    """Where built and converted models live: $HARNESS_CACHE, else ~/.cache/sft-harness."""
    root = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "sft-harness"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` (and `model_path`) resolved to: the set entry and where the weights come from."""

    entry: ModelEntry
    weights: str  # "builtin:tiny", a hub id, a local directory, or a .gguf file

    def as_record(self) -> dict[str, Any]:
        return self.entry.as_record() | {"weights": self.weights}


def resolve_model(name: str, model_path: str | None = None) -> ResolvedModel:
    """Map a model-set name, local path or hub id to an entry; unknown bare names get a suggestion."""
    if name in MODEL_SET:
        entry = MODEL_SET[name]
        weights = model_path or entry.source
        if model_path is not None and not user_path(model_path).exists():
            raise HarnessError(f"model_path not found: {model_path}")
        return ResolvedModel(entry, str(user_path(weights)) if model_path else weights)
    if model_path is not None:
        raise HarnessError(f"model_path is only for model-set entries; '{name}' is not one (see `harness models`)")
    path = user_path(name)
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise HarnessError(f"model '{name}': a file must be a .gguf; otherwise give a model directory")
        if path.is_dir() and not (path / "config.json").is_file():
            raise HarnessError(f"model '{name}': directory {path} has no config.json; give a saved model directory or a .gguf file")
        template: Template = "chat" if _local_has_chat_template(path) else "alpaca"
        entry = ModelEntry(path.name, str(path), "local model", template, 2048, "float32", 2e-5)
        return ResolvedModel(entry, str(path))
    if "/" in name and not name.startswith((".", "/")):
        entry = ModelEntry(name, name, "hub model (not in the model set)", "alpaca", 2048, "bfloat16", 2e-5)
        return ResolvedModel(entry, name)
    raise unknown_name("model", name, MODEL_SET)


def _local_has_chat_template(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True  # GGUF files from instruct models carry tokenizer.chat_template
    config = path / "tokenizer_config.json"
    return (path / "chat_template.jinja").exists() or (config.exists() and "chat_template" in config.read_text())


# ----------------------------------------------------------------------------- loading


def load_tokenizer(resolved: ResolvedModel) -> Any:
    """The model's tokenizer alone (seconds, no weights): what checks before training need."""
    from transformers import AutoTokenizer

    directory = _weights_directory(resolved.weights)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HarnessError(f"model '{resolved.entry.name}': could not load the tokenizer from '{directory}' ({reason})") from None


def _weights_directory(weights: str) -> Any:
    if weights == "builtin:tiny":
        return build_tiny_model()
    if weights.endswith(".gguf"):
        return convert_gguf(Path(weights))
    return weights


def load_model_and_tokenizer(resolved: ResolvedModel, dtype: Any = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) for training/evaluation. dtype: a torch dtype (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    directory = _weights_directory(resolved.weights)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as error:  # missing files, or a config/weights file that is not what it claims
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HarnessError(f"model '{resolved.entry.name}': could not load weights from '{directory}' ({reason})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    from harness import accelerator, distributed

    if distributed.backend() != "fsdp":  # FSDP shards from the host copy; every other pass runs where the process's GPU is
        model = accelerator.to_process_device(model)  # the CPU: unchanged
    return model, tokenizer


def _atomic_directory(target: Path, build) -> Path:
    """Build into a temporary sibling directory and rename it into place (safe under concurrent builds)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors model directory in the cache.

    transformers refuses to save_pretrained a gguf-loaded model, so we rebuild a clean model from its
    config (minus quantization_config), load the state dict, and save that; later loads take ~2 s."""
    if not path.is_file():
        raise HarnessError(f"GGUF file not found: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(loaded.state_dict())
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _atomic_directory(target, build)


# ----------------------------------------------------------------------------- the tiny model

TINY_VERSION = "tiny-v1"
TINY_SPEC = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "seed": 0,
}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _tiny_training_text() -> list[str]:
    from harness.data import SHIPPED_DATA, parse_rows, read_rows

    path = SHIPPED_DATA["alpaca-sample"][0]
    records, _, _ = parse_rows(read_rows(path), str(path))
    return [f"{r.instruction}\n{r.input}\n{r.output}" for r in records]


def build_tiny_model() -> Path:
    """Build (once) the deterministic tiny model + tokenizer; cached by a hash of its spec and training text."""
    texts = _tiny_training_text()
    digest = hashlib.sha256(json.dumps([TINY_VERSION, TINY_SPEC, texts]).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{TINY_VERSION}-{digest}"

    def build(staging: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_SPEC["vocab_size"],
            special_tokens=TINY_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|endoftext|>",
            eos_token="<|im_end|>",
            pad_token="<|pad|>",
            model_max_length=TINY_SPEC["max_position_embeddings"],
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_SPEC["hidden_size"],
            intermediate_size=TINY_SPEC["intermediate_size"],
            num_hidden_layers=TINY_SPEC["num_hidden_layers"],
            num_attention_heads=TINY_SPEC["num_attention_heads"],
            num_key_value_heads=TINY_SPEC["num_key_value_heads"],
            max_position_embeddings=TINY_SPEC["max_position_embeddings"],
            tie_word_embeddings=TINY_SPEC["tie_word_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(TINY_SPEC["seed"])
        model = LlamaForCausalLM(config)
        torch.random.set_rng_state(generator_state)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _atomic_directory(target, build)
