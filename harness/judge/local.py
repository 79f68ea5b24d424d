"""The in-process judge on a local Hugging Face model.

`label_probabilities` is the one model-forward loop of the local judges: the distribution over a few
label tokens right after each prompt. Phased IFT's `local-judge` difficulty scorer (harness.difficulty)
takes its expected value over the labels 1..5; LocalJudge's AlpacaEval annotation takes
P(first) / (P(first) + P(second)) of the official prompt's two labels. LocalJudge also reads pairwise
1-10 scores by greedy decoding restricted to the grammar "<1-10> <1-10>".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.judge.base import (
    LOCAL_ALPACA_LABELS,
    LOCAL_ALPACA_PROMPT,
    JudgeOptions,
    Review,
    alpaca_eval_configs_dir,
    parse_score_pair,
)
from harness.judge.prompts import load_pairwise_prompt


def label_probabilities(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    rows_per_batch: int = 4,
    max_length: int | None = None,
    deal_out: bool = False,
    advance: Callable[[int], None] | None = None,
) -> list[list[float] | None]:
    """For each prompt (token ids), the softmax over `label_ids` of the model's next-token logits right after
    it (float64); None for a prompt longer than `max_length`.

    Prompts are batched by length, right-padded, and run padding-free where the model allows
    (harness.losses.final_hidden_states); only the last position goes through the output head. With
    `deal_out`, in a job of several processes (harness.distributed), the batches are dealt out across the
    processes and every process gets every result: every process must call it with the same prompts, so
    only callers that run on all processes (Phased IFT's scoring) set it. `advance(n)` reports n more
    prompts done (also those another process did)."""
    import torch

    from harness import distributed
    from harness.batching import collate_rows, on_device
    from harness.losses import final_hidden_states
    from harness.templates import TokenizedExample

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: list[list[float] | None] = [None] * len(prompts)
    usable = [i for i, ids in enumerate(prompts) if max_length is None or len(ids) <= max_length]
    usable.sort(key=lambda i: len(prompts[i]))
    batches = [usable[start : start + rows_per_batch] for start in range(0, len(usable), rows_per_batch)]
    processes, rank = (distributed.world_size(), distributed.rank()) if deal_out else (1, 0)
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    labels = list(label_ids)
    mine: dict[int, list[list[float]]] = {}  # batch number -> distributions
    with torch.no_grad():
        for number in range(rank, len(batches), processes):
            chunk = batches[number]
            examples = [TokenizedExample(list(prompts[i]), [-100] * len(prompts[i])) for i in chunk]
            batch = on_device(collate_rows([[e] for e in examples], pad_id), device)
            hidden = final_hidden_states(model, batch)
            last = torch.tensor([len(prompts[i]) - 1 for i in chunk], device=device)
            logits = head(hidden[torch.arange(len(chunk), device=device), last]).float()
            mine[number] = torch.softmax(logits[:, labels].double(), dim=-1).cpu().tolist()
            if advance is not None:
                advance(len(chunk))
    shares = distributed.gather(mine) if deal_out else [mine]  # [mine] with one process
    for share in shares:
        for number, distributions in share.items():
            for index, distribution in zip(batches[number], distributions, strict=True):
                result[index] = distribution
            if number not in mine and advance is not None:
                advance(len(distributions))
    return result


class LocalJudge:
    """An in-process judge: label probabilities for AlpacaEval, constrained score decoding for pairwise."""

    def __init__(self, name: str, model: Any, tokenizer: Any, options: JudgeOptions | None = None) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or JudgeOptions()
        self.label_ids = [self._single_token(label) for label in LOCAL_ALPACA_LABELS]
        if self.label_ids[0] == self.label_ids[1]:
            raise HarnessError(f"judge '{name}': labels {LOCAL_ALPACA_LABELS} share their first token")
        self.answers_truncated = 0

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "kind": "local",
            "alpaca_prompt": f"alpaca_eval {LOCAL_ALPACA_PROMPT}",
            "labels": list(LOCAL_ALPACA_LABELS),
            "orders": "both (baseline first, then model first); preference = mean P(model better)",
            "pairwise": "scores read by greedy decoding restricted to the grammar '<1-10> <1-10>'",
            "max_answer_tokens": self.options.max_answer_tokens,
            "answers_truncated": self.answers_truncated,
        }

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise HarnessError(f"judge '{self.name}': label {text!r} encodes to no token")
        return ids[0]

    def _cut(self, answer: str) -> str:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) <= self.options.max_answer_tokens:
            return answer
        self.answers_truncated += 1
        return self.tokenizer.decode(ids[: self.options.max_answer_tokens])

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def alpaca_prompts(self, rows: list[dict[str, Any]]) -> list[str]:
        """The official AlpacaEval 2 judge prompt for each (instruction, output_1, output_2), as chat text."""
        from harness.compat import import_alpaca_eval

        import_alpaca_eval()
        import pandas as pd
        from alpaca_eval import utils

        template = (alpaca_eval_configs_dir() / LOCAL_ALPACA_PROMPT).read_text(encoding="utf-8")
        frame = pd.DataFrame(
            [{"instruction": r["instruction"], "output_1": self._cut(r["output_1"]), "output_2": self._cut(r["output_2"])} for r in rows]
        )
        prompts, _ = utils.make_prompts(frame, template)
        return [self._render(utils.prompt_to_chatml(p)) for p in prompts]

    def label_probabilities(self, prompts: list[str], progress: Any = None) -> list[float]:
        """P(first label) / (P(first) + P(second)) for the token after each prompt (the shared
        `label_probabilities` over the two labels); `progress(done, total)` after each batch."""
        encoded = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        done = [0]

        def advance(count: int) -> None:
            done[0] += count
            if progress is not None:
                progress(done[0], len(encoded))

        distributions = label_probabilities(
            self.model, self.tokenizer, encoded, self.label_ids, rows_per_batch=self.options.batch_size, advance=advance
        )
        return [math.nan if d is None else d[0] for d in distributions]

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path | None = None, progress: Any = None) -> list[dict[str, Any]]:
        """Judge each pair in both orders; preference = 1 + mean P(model better); identical outputs tie (1.5)."""
        swapped = [r | {"output_1": r["output_2"], "output_2": r["output_1"]} for r in rows]
        prompts = self.alpaca_prompts(rows) + self.alpaca_prompts(swapped)
        first = self.label_probabilities(prompts, progress)
        out = []
        n = len(rows)
        for i, row in enumerate(rows):
            p_first_baseline_first = first[i]  # order 1: baseline shown first
            p_first_model_first = first[n + i]  # order 2: model shown first
            p_model = 0.5 * ((1 - p_first_baseline_first) + p_first_model_first)
            same = row["output_1"] == row["output_2"]
            out.append(
                row
                | {
                    "preference": 1.5 if same else 1.0 + p_model,
                    "annotator": self.name,
                    "p_model_baseline_first": 1 - p_first_baseline_first,
                    "p_model_model_first": p_first_model_first,
                }
            )
        return out

    def _exact_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise HarnessError(f"judge '{self.name}': {text!r} is not one token in its tokenizer; it cannot read scores")
        return ids[0]

    def score_grammar(self) -> Callable[[list[int]], list[int]]:
        """Next allowed tokens so that the reply's first line is '<1..10> <1..10>' then newline or EOS."""
        digits = {self._exact_token(str(d)): str(d) for d in range(10)}
        space, newline = self._exact_token(" "), self._exact_token("\n")
        ends = [newline] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        by_char = {char: token for token, char in digits.items()}
        nonzero = [by_char[str(d)] for d in range(1, 10)]
        text_of = digits | {space: " ", newline: "\n"}

        def allowed(new_ids: list[int]) -> list[int]:
            text = "".join(text_of.get(token, "") for token in new_ids)
            if "\n" in text:
                return ends[-1:]
            parts = text.split(" ")
            current, separator = parts[-1], ([space] if len(parts) == 1 else ends)
            if current == "":
                return nonzero
            if current == "1":
                return [by_char["0"], *separator]
            return separator

        return allowed

    def review_pairs(self, items: list[tuple[str, str, str]], progress: Any = None) -> list[Review]:
        """Read 'score_1 score_2' by greedy decoding restricted to the grammar of two scores in 1..10."""
        from harness.generation import generate_from_prompts

        prompt = load_pairwise_prompt(self.options.pairwise_prompt)
        prompts = [
            self._render(
                [
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.render(q, self._cut(a1), self._cut(a2))},
                ]
            )
            for q, a1, a2 in items
        ]
        generations = generate_from_prompts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=6,  # "10 10\n"
            batch_size=self.options.batch_size,
            max_prompt_tokens=8192,
            allowed_tokens=self.score_grammar(),
            progress=progress,
        )
        return [Review(parse_score_pair(g.text), g.text, None) for g in generations]
