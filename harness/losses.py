"""Response-token losses on packed or padded batches, shared by the training core and the scorers.

A batch is a dict of (rows, tokens) tensors: input_ids, labels (-100 where no loss), position_ids
(restarting at 0 for every example, so transformers masks attention block-diagonally), and seq_ids
(the example index of each token within the batch, -1 on padding). The LM head is applied only at
positions whose next token carries a label: at 49k-token vocabularies it is a large share of the FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack, LM head) of a causal LM, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.get_output_embeddings()


def final_hidden_states(model: Any, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    decoder, _ = causal_lm_parts(model)
    if inputs_embeds is not None:
        output = decoder(inputs_embeds=inputs_embeds, position_ids=batch["position_ids"], use_cache=False)
    else:
        output = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return output.last_hidden_state


def response_token_losses(
    model: Any, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy at every labelled position, and the batch-local example index of each.

    Returns (losses [N] float32, seq_index [N]) for the N labelled target tokens of the batch."""
    if hidden is None:
        hidden = final_hidden_states(model, batch)
    _, head = causal_lm_parts(model)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    selected = hidden[:, :-1][mask]
    logits = head(selected).float()
    losses = F.cross_entropy(logits, targets[mask], reduction="none")
    return losses, batch["seq_ids"][:, 1:][mask]


def per_example_mean_losses(model: Any, batch: dict[str, torch.Tensor], num_examples: int) -> torch.Tensor:
    """Mean response-token loss of each example in the batch (float32, [num_examples])."""
    losses, seq_index = response_token_losses(model, batch)
    totals = torch.zeros(num_examples, dtype=torch.float32, device=losses.device).index_add_(0, seq_index, losses)
    counts = torch.zeros(num_examples, dtype=torch.float32, device=losses.device).index_add_(
        0, seq_index, torch.ones_like(losses)
    )
    return totals / counts.clamp(min=1)
