"""IFD-selected data, "Cherry LLM" (Li et al., arXiv 2308.12032; code tianyi-lab/Cherry_LLM), docs/recipes.md "ifd".

1. Optional "brief experience" (Cherry's cherry_seletion/data_by_cluster.py, run as in
   scripts/pre_experience_selection.sh): embed every instruction prompt with the RAW base model (mean of the
   last hidden state), K-means into 100 clusters; a cluster of fewer than 10 members is kept whole; in a larger
   one keep the members between the 25th and 75th percentile of instruction perplexity (all of them if fewer
   than 10) or else 10 of them, taken with a stride of len // 10 in dataset order. Train the base model 1 epoch
   on those (<= 1,000) samples: the method's overhead, recorded apart from the target training. Off by
   default: the authors' V2 (Llama-2) skips it and scores with the base model, and the paper reports random
   choice works about as well.
2. Score IFD = s(A|Q) / s(A) with the experienced model (or the base model) - harness.scoring, over-length
   examples truncated at `scoring_max_length` as Cherry does (or skipped: `scoring_overlength=skip`).
3. Drop IFD > 1 (the instruction does not help: a misaligned pair), sort the rest by IFD descending and
   keep the top `rate` of that filtered set (default 10%; the paper's G.2 calls 5-15% safe).
4. Train the base model on the selection with the shared training settings.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from harness.artifacts import content_key
from harness.controls import Control, same_size_random_subset
from harness.data import InstructionRecord
from harness.runner import Overhead, RecipeOutput, RunContext
from harness.scoring import embeddings_and_perplexity, ifd_range
from harness.templates import tokenize_prompts

NAME = "ifd"
DESCRIPTION = "IFD data selection (Cherry LLM): train on the top-IFD fraction, IFD <= 1 (Li et al. 2024)"
# The parameters that name the variant on the leaderboard, e.g. ifd[rate=0.1, brief_experience=false]
VARIANT_PARAMS = ("rate", "brief_experience", "control")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rate: float = Field(0.10, gt=0, le=1, description="fraction of the IFD <= 1 set to keep")
    drop_above_one: bool = True
    brief_experience: bool = False
    experience_clusters: int = Field(100, gt=0)
    experience_per_cluster: int = Field(10, gt=0)
    scoring_max_length: int = Field(512, gt=8, description="token limit of the scored texts (Cherry: 512)")
    scoring_overlength: Literal["truncate", "skip"] = Field(
        "truncate", description="over-length examples: truncated as Cherry LLM does, or skipped")
    control: Control = Field(None, description="random: train on as many records as IFD selects, drawn at random")


def select_top_ifd(ifd: np.ndarray, rate: float, drop_above_one: bool = True) -> list[int]:
    """Indices of the top `rate` fraction by IFD (descending) among scored records with IFD <= 1."""
    candidates = [i for i, value in enumerate(ifd) if not np.isnan(value) and (value <= 1.0 or not drop_above_one)]
    candidates.sort(key=lambda i: (-ifd[i], i))
    keep = max(1, int(len(candidates) * rate)) if candidates else 0
    return sorted(candidates[:keep])


# Cherry's scripts/pre_experience_selection.sh passes --low_th 25 --up_th 75 to data_by_cluster.py
EXPERIENCE_PERCENTILES = (25.0, 75.0)


def middle_confidence_samples(labels: np.ndarray, perplexities: np.ndarray, per_cluster: int) -> list[int]:
    """Cherry's sample_middle_confidence_data (cherry_seletion/data_by_cluster.py), cluster by cluster: a
    cluster of fewer than `per_cluster` members is kept whole; otherwise its members (in dataset order) with
    perplexity within the 25th-75th percentile band of the cluster are kept whole if fewer than
    `per_cluster`, else `per_cluster` of them are taken with stride len // per_cluster from the first."""
    chosen: list[int] = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)  # ascending: dataset order
        if len(members) < per_cluster:
            chosen.extend(int(i) for i in members)
            continue
        values = perplexities[members]
        low, high = (np.percentile(values, q) for q in EXPERIENCE_PERCENTILES)
        middle = members[(values >= low) & (values <= high)]
        if len(middle) < per_cluster:
            chosen.extend(int(i) for i in middle)
        else:
            chosen.extend(int(i) for i in middle[:: len(middle) // per_cluster][:per_cluster])
    return sorted(chosen)


def experience_samples(
    model: Any, tokenizer: Any, records: list[InstructionRecord], template: str, params: Params, seed: int
) -> tuple[list[int], int]:
    """(chosen record indices, tokens of the forward pass): Cherry's pre-experience selection, the "pre" pass
    of data_analysis.py (each instruction prompt, truncated at max_length: its perplexity and mean last hidden
    state), K-means on the embeddings, then middle_confidence_samples."""
    from sklearn.cluster import KMeans

    examples = tokenize_prompts(records, tokenizer, template, params.scoring_max_length)
    embeddings, perplexities = embeddings_and_perplexity(model, examples, pad_token_id=tokenizer.pad_token_id)
    clusters = min(params.experience_clusters, len(records))
    labels = KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit_predict(embeddings)
    tokens = sum(len(example.input_ids) for example in examples)
    return middle_confidence_samples(labels, perplexities, params.experience_per_cluster), tokens


def run(ctx: RunContext[Params]) -> RecipeOutput:
    params = ctx.params
    records = ctx.data.records
    model, tokenizer = ctx.base_model()
    scorer, scorer_key, experience, experience_tokens = model, ctx.base_model_key, [], 0
    if params.brief_experience:
        with ctx.stage("experience_selection"):
            experience, experience_tokens = experience_samples(model, tokenizer, records, ctx.spec.training.template, params, ctx.spec.seed)
        scorer, _ = ctx.train(
            model, tokenizer, [records[i] for i in experience], stage="experience",
            overrides={"epochs": 1.0, "max_steps": -1}, overhead=True,
        )
        scorer_key = content_key(
            base=ctx.base_model_key, experience=[records[i].id for i in experience],
            training=ctx.training_key(ctx.spec.training), seed=ctx.spec.seed,
        )
        model, tokenizer = ctx.base_model()  # the selection trains the RAW base model
    scores = ctx.ifd(scorer, tokenizer, records, model_key=scorer_key, max_length=params.scoring_max_length,
                     overlength=params.scoring_overlength)
    ifd = scores.ifd
    selected = select_top_ifd(ifd, params.rate, params.drop_above_one)
    if params.control == "random":
        selected = same_size_random_subset(len(records), len(selected), ctx.spec.seed)
    trained, _ = ctx.train(model, tokenizer, [records[i] for i in selected], stage="sft")
    valid = ifd[~np.isnan(ifd)]
    overhead = Overhead(scoring_tokens=experience_tokens)  # the experience selection's forward pass
    details = {
        "scorer": "experienced-model" if params.brief_experience else "base-model",
        "control": params.control,
        "experience_samples": len(experience),
        "extra_scoring_tokens": overhead.scoring_tokens,
        "scored": int(len(valid)),
        "skipped": len(scores.skipped),
        "truncated": len(scores.truncated),
        "above_one": int((valid > 1).sum()),
        "selected": len(selected),
        "selected_fraction_of_pool": round(len(selected) / len(records), 4),
        "selected_ifd_range": ifd_range(ifd, selected),
        "selected_ids_sha256": content_key(ids=[records[i].id for i in selected]),
        "ifd_quantiles": {q: float(np.quantile(valid, q)) for q in (0.1, 0.5, 0.9)} if len(valid) else {},
    }
    return RecipeOutput(model=trained, tokenizer=tokenizer, details=details, overhead=overhead)
