"""Worker choice: power of two choices on outstanding work.

Pure policy: candidates, their load and the randomness are passed in, so it
is tested without sockets.  Sampling two and taking the less loaded avoids
both the herd behaviour of "always the least loaded" (every router replica
piles onto the same worker) and the imbalance of uniform random choice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def pick_two(candidates: Sequence[T], load: Callable[[T], int], rng: random.Random) -> T | None:
    """The less loaded of two distinct random candidates (ties: the first drawn)."""
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = candidates[i], candidates[j]
    return b if load(b) < load(a) else a
