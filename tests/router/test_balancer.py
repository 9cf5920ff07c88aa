"""router.balancer.pick_two: the power-of-two-choices policy, with randomness passed in."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from router.balancer import pick_two


def by_load(loads: dict[str, int]) -> Callable[[str], int]:
    return lambda name: loads[name]


def test_empty_gives_none() -> None:
    assert pick_two([], lambda x: 0, random.Random(0)) is None


def test_one_candidate_is_chosen_without_drawing() -> None:
    rng = random.Random(0)
    state = rng.getstate()
    assert pick_two(["only"], lambda x: 99, rng) == "only"
    assert rng.getstate() == state


def test_two_candidates_always_the_less_loaded() -> None:
    rng = random.Random(1)
    loads = {"busy": 5, "idle": 1}
    picks = Counter(pick_two(["busy", "idle"], by_load(loads), rng) for _ in range(200))
    assert picks == {"idle": 200}


def test_never_the_more_loaded_of_the_two_sampled() -> None:
    # Replay the draws the policy makes to know which pair it sampled.
    candidates = [f"w{i}" for i in range(6)]
    loads = {c: i * 3 % 7 for i, c in enumerate(candidates)}
    for seed in range(300):
        chosen = pick_two(candidates, by_load(loads), random.Random(seed))
        replay = random.Random(seed)
        i = replay.randrange(len(candidates))
        j = replay.randrange(len(candidates) - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        assert chosen in (a, b)
        assert loads[chosen] == min(loads[a], loads[b])
        if loads[a] == loads[b]:
            assert chosen == a  # ties go to the first drawn


def test_same_seed_same_choice() -> None:
    candidates = list(range(10))
    picks = [pick_two(candidates, lambda c: c % 3, random.Random(42)) for _ in range(5)]
    assert len(set(picks)) == 1


@settings(max_examples=300, deadline=None)
@given(loads=st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=12), seed=st.integers(0, 2**32))
def test_never_the_unique_maximum(loads: list[int], seed: int) -> None:
    candidates = list(range(len(loads)))
    chosen = pick_two(candidates, lambda c: loads[c], random.Random(seed))
    assert chosen is not None
    assert any(loads[chosen] <= loads[other] for other in candidates if other != chosen)


def test_equal_loads_spread_uniformly() -> None:
    # Ties go to the first drawn, which is uniform: no candidate is favoured.
    rng = random.Random(3)
    picks = Counter(pick_two(list(range(5)), lambda c: 0, rng) for _ in range(5000))
    assert set(picks) == set(range(5))
    assert max(picks.values()) < 1.15 * min(picks.values())


Policy = Callable[[list[int], list[int], random.Random], int]


def simulate(policy: Policy, seed: int, *, workers: int = 8, outstanding: int = 80,
             steps: int = 10_000) -> tuple[float, float, Counter[int]]:
    """Mean (max - min) and mean max/min of per-worker load after warm-up, and picks per worker.

    Each step one request arrives on the chosen worker; once ``outstanding``
    requests are in flight, a uniformly random in-flight request completes.
    """
    rng = random.Random(seed)
    names = list(range(workers))
    load = [0] * workers
    served: Counter[int] = Counter()
    spread = ratio = 0.0
    measured = 0
    for step in range(steps):
        w = policy(names, load, rng)
        load[w] += 1
        served[w] += 1
        if sum(load) > outstanding:
            k = rng.randrange(sum(load))
            for c in names:
                if k < load[c]:
                    load[c] -= 1
                    break
                k -= load[c]
        if step >= steps // 10:
            spread += max(load) - min(load)
            ratio += max(load) / max(1, min(load))
            measured += 1
    return spread / measured, ratio / measured, served


def two_choices(names: list[int], load: list[int], rng: random.Random) -> int:
    w = pick_two(names, lambda c: load[c], rng)
    assert w is not None
    return w


def uniform(names: list[int], load: list[int], rng: random.Random) -> int:
    return rng.choice(names)


def test_balances_outstanding_work_in_simulation() -> None:
    spread, ratio, served = simulate(two_choices, seed=7)
    assert ratio < 1.8  # ~1.5 in practice, with ~10 requests per worker
    assert spread < 5
    assert min(served.values()) > 0.9 * 10_000 / 8  # every worker gets its share
    # And clearly better than choosing uniformly at random (spread ~9, ratio ~2.8).
    random_spread, random_ratio, _ = simulate(uniform, seed=7)
    assert spread < random_spread / 2
    assert ratio < random_ratio
