"""A concept tree over an instruction pool, and selection that stays diverse across its leaves.

UNIFIT's abstract names a "Concept Tree" for diversity but publishes nothing more, so this is our
reconstruction: a two-level tree from instruction embeddings (K-means into topics, then K-means
inside each topic into leaves; K-means rather than agglomerative linkage because linkage needs
O(N^2) memory, 10 GB at Alpaca's 52k), and a selection that gives every leaf with enough examples
a share of the budget proportional to its size before the rest goes to the best scores overall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ConceptTree:
    topic: np.ndarray  # [N] top-level cluster of each example
    leaf: np.ndarray  # [N] leaf id (unique across topics)

    @property
    def leaves(self) -> list[int]:
        return sorted(set(self.leaf.tolist()))

    def leaf_sizes(self) -> dict[int, int]:
        values, counts = np.unique(self.leaf, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist(), strict=True))

    def as_record(self) -> dict[str, object]:
        sizes = self.leaf_sizes()
        return {
            "topics": int(len(set(self.topic.tolist()))),
            "leaves": len(sizes),
            "leaf_size_min": min(sizes.values()),
            "leaf_size_median": float(np.median(list(sizes.values()))),
            "leaf_size_max": max(sizes.values()),
        }


def build_concept_tree(embeddings: np.ndarray, topics: int, leaves_per_topic: int, seed: int) -> ConceptTree:
    """Two-level K-means tree; cluster counts shrink so that no cluster is asked for fewer than 2 points."""
    from sklearn.cluster import KMeans

    n = len(embeddings)
    topics = max(1, min(topics, n // 2))
    top = KMeans(n_clusters=topics, random_state=seed, n_init=4).fit_predict(embeddings) if topics > 1 else np.zeros(n, int)
    leaf = np.zeros(n, dtype=int)
    next_leaf = 0
    for topic in range(topics):
        members = np.flatnonzero(top == topic)
        k = max(1, min(leaves_per_topic, len(members) // 2))
        labels = (
            KMeans(n_clusters=k, random_state=seed, n_init=4).fit_predict(embeddings[members]) if k > 1 else np.zeros(len(members), int)
        )
        leaf[members] = labels + next_leaf
        next_leaf += k
    return ConceptTree(topic=top, leaf=leaf)


def select_with_coverage(
    scores: np.ndarray, tree: ConceptTree, budget: int, min_leaf_size: int, eligible: np.ndarray
) -> list[int]:
    """`budget` indices: every leaf of at least `min_leaf_size` examples that has an eligible example gets
    max(1, floor(budget * leaf_share)) of its best-scored eligible examples; the rest of the budget goes
    to the best remaining eligible examples overall (higher score = better)."""
    candidates = np.flatnonzero(eligible)
    budget = min(budget, len(candidates))
    sizes = tree.leaf_sizes()
    total = len(scores)
    leaf_best: list[int] = []  # each covered leaf's best example
    leaf_extra: list[int] = []  # the rest of each leaf's quota
    for leaf, size in sizes.items():
        if size < min_leaf_size:
            continue
        members = [i for i in candidates if tree.leaf[i] == leaf]
        if not members:
            continue
        quota = max(1, math.floor(budget * size / total))
        members.sort(key=lambda i: (-scores[i], i))
        leaf_best.append(members[0])
        leaf_extra.extend(members[1:quota])
    by_score = lambda items: sorted(items, key=lambda i: (-scores[i], i))  # noqa: E731
    chosen = by_score(leaf_best)[:budget]  # with more leaves than budget, the best leaves win
    chosen += by_score(leaf_extra)[: budget - len(chosen)]
    taken = set(chosen)
    rest = sorted((i for i in candidates if i not in taken), key=lambda i: (-scores[i], i))
    chosen.extend(rest[: budget - len(chosen)])
    return sorted(int(i) for i in chosen)
