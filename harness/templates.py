"""Prompt templates and tokenization into (input_ids, labels) with loss on response tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.data import InstructionRecord
from harness.errors import HarnessError

# The Stanford Alpaca prompt, verbatim from tatsu-lab/stanford_alpaca train.py (PROMPT_DICT, commit 761dc5b)
# and tianyi-lab/Cherry_LLM cherry_seletion/data_analysis.py (the same PROMPT_DICT): it ends "### Response:"
# with NO newline, and the response follows directly (Stanford's target is f"{output}{eos_token}").
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_RESPONSE_TAG = "### Response:"  # Cherry LLM's direct text is "### Response:" + output: the prompts' own ending


# ----------------------------------------------------------------------------- Phased IFT's template
# xubuvd/PhasedSFT xllm/xllm_dataset.py, PromptIterableDataset.tokenize_example (used by xllm/pretrain.py for
# Llama and xllm/mistral_pretrain.py for Mistral): the first user turn is BOS + "User: " + text + EOS, each
# assistant turn "\nAssistant: " (no loss) then text + EOS (the loss), each later user turn "\nUser: " +
# text + EOS; an Alpaca input follows the instruction after "\n" (generation/generation_v2.py). Its
# generation prompt ends "Assistant:" without the space; prompts here end as in training.
USER_ASSISTANT = "user-assistant"
PLAIN_TEMPLATES = ("alpaca", USER_ASSISTANT)  # plain text: the tokenizer adds BOS, as for Alpaca


def adds_bos(template: str) -> bool:
    """Plain-text templates get the tokenizer's BOS; chat templates carry their own special tokens."""
    return template in PLAIN_TEMPLATES


def render_user_assistant(record: InstructionRecord, eos: str) -> str:
    """`User: {instruction}[\n{input}]</s>\nAssistant: ` after any earlier turns (BOS comes from the tokenizer)."""
    turns = [f"User: {user}{eos}\nAssistant: {assistant}{eos}" for user, assistant in record.history]
    message = f"{record.instruction}\n{record.input}" if record.input.strip() else record.instruction
    return "\n".join([*turns, f"User: {message}{eos}\nAssistant: "])


# -----------------------------------------------------------------------------


def user_message(record: InstructionRecord) -> str:
    return f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction


def render_prompt(record: InstructionRecord, template: str, tokenizer: Any) -> str:
    """Everything the model sees before the response it is trained (or scored) on."""
    if template == USER_ASSISTANT:
        return render_user_assistant(record, tokenizer.eos_token)
    if template == "alpaca":
        prefix = ""
        for user, assistant in record.history:
            prefix += ALPACA_PROMPT_NO_INPUT.format(instruction=user) + assistant + "\n\n"
        if record.input.strip():
            return prefix + ALPACA_PROMPT_WITH_INPUT.format(instruction=record.instruction, input=record.input)
        return prefix + ALPACA_PROMPT_NO_INPUT.format(instruction=record.instruction)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HarnessError("template 'chat': the tokenizer has no chat template; use --set training.template=alpaca")
        messages = []
        for user, assistant in record.history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": user_message(record)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise HarnessError(f"unknown template '{template}' (valid: chat, alpaca, {USER_ASSISTANT})")


def response_tag(template: str, tokenizer: Any) -> str:
    """The text just before a response, the ending every prompt of the template shares: Cherry LLM's
    'direct' IFD pass conditions on this alone, so the answer follows the same text in both passes."""
    if template == "alpaca":
        return ALPACA_RESPONSE_TAG
    if template == USER_ASSISTANT:
        return "Assistant: "
    empty = render_prompt(InstructionRecord(instruction="", output=""), template, tokenizer)
    marker = "<|im_start|>assistant\n"
    return marker if marker in empty else empty


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens

    @property
    def response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped_prompt_too_long: int = 0

    def as_record(self) -> dict[str, int]:
        return dict(vars(self))


def tokenize_example(prompt: str, response: str, tokenizer: Any, template: str) -> TokenizedExample:
    """Prompt + response as the template's own training code tokenizes them, labels -100 on the prompt.

    Alpaca and chat: Stanford Alpaca's tokenization (train.py `preprocess`), which Cherry LLM's scoring
    repeats: the whole text is tokenized at once and the first len(tokenize(prompt)) tokens are the
    prompt, so the tokens are what a tokenizer makes of the text the model reads at generation time,
    even where it merges across the boundary. User/Assistant: PhasedSFT's `tokenize_example`
    (xllm/xllm_dataset.py) tokenizes the turns apart, so the response's ids follow the prompt's as they
    are. Plain-text templates get the tokenizer's BOS (chat templates carry their own special tokens)."""
    add_bos = adds_bos(template)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_bos).input_ids
    if template == USER_ASSISTANT:
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
        return TokenizedExample(prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids)
    full_ids = tokenizer(prompt + response, add_special_tokens=add_bos).input_ids
    boundary = min(len(prompt_ids), len(full_ids))
    return TokenizedExample(full_ids, [-100] * boundary + full_ids[boundary:])


def tokenize_for_training(
    records: list[InstructionRecord], tokenizer: Any, template: str, max_length: int
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Prompt + response + EOS, labels -100 on the prompt; over-long responses are truncated (counted)."""
    stats = TokenizeStats()
    examples = []
    for record in records:
        prompt = render_prompt(record, template, tokenizer)
        example = tokenize_example(prompt, record.output + tokenizer.eos_token, tokenizer, template)
        prompt_length = len(example.input_ids) - example.response_tokens
        if prompt_length >= max_length - 1:
            stats.dropped_prompt_too_long += 1
            continue
        if len(example.input_ids) > max_length:
            stats.truncated += 1
            example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
        examples.append(example)
    stats.examples = len(examples)
    if not examples:
        raise HarnessError(f"no example fits training.max_length={max_length}; raise it")
    return examples, stats


def tokenize_prompts(
    records: list[InstructionRecord], tokenizer: Any, template: str, max_length: int | None = None
) -> list[TokenizedExample]:
    """Each record's rendered prompt alone as a language-modelling text (every token but the first is a
    label), for passes over the instructions (Cherry LLM's pre-experience embeddings and perplexities,
    UNIFIT's concept tree). BOS as in training (plain-text templates); cut at `max_length` if given."""
    add_bos = adds_bos(template)
    examples = []
    for record in records:
        ids = tokenizer(render_prompt(record, template, tokenizer), add_special_tokens=add_bos).input_ids[:max_length]
        examples.append(TokenizedExample(ids, [-100] + ids[1:]))
    return examples
