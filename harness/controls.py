"""Controls for selection recipes: train on as many records as the recipe selected, drawn uniformly
from the whole pool. If IFD (or UNIFIT) beats one-off but its random control does too, the gain came
from training on fewer examples (fewer steps), not from which examples were chosen."""

from __future__ import annotations

from typing import Literal

import numpy as np

Control = Literal["random"] | None
CONTROL_SALT = 0x5E1EC7  # the control's draw is its own stream, apart from everything else the seed drives


def same_size_random_subset(total: int, size: int, seed: int) -> list[int]:
    """`size` distinct positions out of `total`, uniformly at random (deterministic for a seed), sorted."""
    if not 0 <= size <= total:
        raise ValueError(f"cannot draw {size} of {total} records")
    rng = np.random.default_rng([seed, CONTROL_SALT])
    return sorted(int(i) for i in rng.choice(total, size=size, replace=False))
