"""Per-sequence NEFTune (Jain et al., arXiv 2310.05914; code neelsjain/NEFTune).

X' = X + (alpha / sqrt(L * d)) * eps, eps ~ Uniform(-1, 1), added to the input embeddings in training
only, with L the number of real tokens of EACH sequence and d the hidden size, and no noise on padding.

Why not transformers' built-in `neftune_noise_alpha` hook: it scales by the padded row length
(input_ids.size(1)), so under padding-free packing, where one row holds several sequences, every
sequence gets the noise of a much longer one (too little noise), and padding gets noise too. The
official code uses each sequence's own non-pad length, which is what this module does, also inside
packed rows (sequences are told apart by the batch's seq_ids).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.losses import causal_lm_parts


def neftune_scale(seq_ids: torch.Tensor, hidden_size: int, alpha: float) -> torch.Tensor:
    """Per-token noise magnitude alpha / sqrt(L * d), L = real tokens of the token's sequence; 0 on padding."""
    real = seq_ids >= 0
    flat = seq_ids[real]
    lengths = torch.bincount(flat, minlength=int(flat.max()) + 1 if flat.numel() else 0).to(torch.float32)
    scale = torch.zeros(seq_ids.shape, dtype=torch.float32, device=seq_ids.device)
    scale[real] = alpha / torch.sqrt(lengths[flat] * hidden_size)
    return scale


def noisy_input_embeddings(model: Any, batch: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """The batch's input embeddings with per-sequence NEFTune noise (call only while training)."""
    decoder, _ = causal_lm_parts(model)
    embeddings = decoder.get_input_embeddings()(batch["input_ids"])
    scale = neftune_scale(batch["seq_ids"], embeddings.shape[-1], alpha).to(embeddings.dtype)
    noise = torch.empty_like(embeddings).uniform_(-1.0, 1.0)
    return embeddings + noise * scale.unsqueeze(-1)
