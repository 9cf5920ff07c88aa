"""router.traffic: header rules, the sticky weighted split, validation (pure)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.traffic import DEFAULT, RULE, SPLIT, RoutingError, bucket, compile_routing, stable_and_canary

LABELS = {"stable": 1, "canary": 2}


def headers(**values: str) -> object:
    lowered = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lowered.get


def routing(**doc: object) -> object:
    return compile_routing(doc, LABELS, known={1, 2, 3})


def never() -> float:
    raise AssertionError("no random draw expected")


@pytest.mark.parametrize(("rule", "value", "hit"), [
    ({"equals": "1"}, "1", True),
    ({"equals": "1"}, "11", False),
    ({"equals": 1}, "1", True),  # YAML numbers compare as their text
    ({"one_of": ["a", "b"]}, "b", True),
    ({"one_of": ["a", "b"]}, "c", False),
    ({"matches": "beta-[0-9]+"}, "beta-42", True),
    ({"matches": "beta-[0-9]+"}, "beta-42x", False),  # the whole value must match
    ({"present": True}, "", True),
    ({"present": True}, None, False),
    ({"equals": "1"}, None, False),
])
def test_rule_kinds(rule: dict[str, object], value: str | None, hit: bool) -> None:
    r = routing(rules=[{"header": "X-Canary", "version": "canary", **rule}])
    got = r.choose((lambda name: value if name == "x-canary" else None), never)  # type: ignore[attr-defined]
    assert got == ((2, RULE) if hit else (None, DEFAULT))


def test_first_matching_rule_decides_then_the_split() -> None:
    r = routing(rules=[{"header": "x-a", "equals": "1", "version": 3},
                       {"header": "x-b", "present": True, "version": "canary"}],
                split={"stable": 100}, sticky_header="X-User")
    assert r.choose(headers(x_a="1", x_b="y"), never) == (3, RULE)  # type: ignore[attr-defined]
    assert r.choose(headers(x_a="2", x_b="y"), never) == (2, RULE)  # type: ignore[attr-defined]
    assert r.choose(headers(x_user="u1"), never) == (1, SPLIT)  # type: ignore[attr-defined]
    assert r.choose(None, lambda: 0.5) == (1, SPLIT)  # type: ignore[attr-defined]


def test_without_sticky_key_the_split_draws() -> None:
    r = routing(split={"stable": 90, "canary": 10}, sticky_header="x-user")
    draws = iter([0.05, 0.95, 0.899, 0.9])
    picks = [r.choose(headers(), lambda: next(draws))[0] for _ in range(4)]  # type: ignore[attr-defined]
    # Ranges in ascending version order: stable [0, 90), canary [90, 100).
    assert picks == [1, 2, 1, 2]


def test_split_lands_near_its_weight_over_many_keys() -> None:
    r = routing(split={"stable": 90, "canary": 10}, sticky_header="x-user")
    picks = [r.choose(headers(x_user=f"user-{i}"), never)[0] for i in range(5000)]  # type: ignore[attr-defined]
    share = picks.count(2) / len(picks)
    assert 0.08 <= share <= 0.12, share
    again = [r.choose(headers(x_user=f"user-{i}"), never)[0] for i in range(5000)]  # type: ignore[attr-defined]
    assert again == picks  # sticky


@settings(max_examples=50, deadline=None)
@given(low=st.integers(0, 100), high=st.integers(0, 100), seed=st.integers(0, 2**32))
def test_raising_the_canary_weight_moves_keys_only_into_the_canary(low: int, high: int, seed: int) -> None:
    low, high = sorted((low, high))
    before = routing(split={"stable": 100 - low, "canary": low}, sticky_header="k")
    after = routing(split={"canary": high, "stable": 100 - high}, sticky_header="k")  # key order is no matter
    rng = random.Random(seed)
    for _ in range(300):
        key = f"{rng.random()}"
        was = before.choose(headers(k=key), never)[0]  # type: ignore[attr-defined]
        now = after.choose(headers(k=key), never)[0]  # type: ignore[attr-defined]
        assert not (was == 2 and now == 1), key  # never out of the canary


def test_bucket_is_stable_and_spread() -> None:
    assert bucket("user-1") == bucket("user-1")
    points = [bucket(f"k{i}") for i in range(2000)]
    assert all(0 <= p < 100 for p in points)
    assert 40 < sum(p < 50 for p in points) / 20 < 60


@pytest.mark.parametrize(("doc", "message"), [
    ({"split": {"stable": 90, "canary": 20}}, "sum to 110"),
    ({"split": {"stable": 90, "beta": 10}}, "unknown label 'beta'"),
    ({"split": {"stable": 90, "7": 10}}, "version 7 is not served"),
    ({"split": {"stable": 90.5, "canary": 9.5}}, "whole percent"),
    ({"split": {"stable": 50, "1": 50}}, "named twice"),
    ({"rules": [{"header": "x", "version": 2}]}, "exactly one of"),
    ({"rules": [{"header": "x", "equals": "1", "present": True, "version": 2}]}, "exactly one of"),
    ({"rules": [{"header": "x", "matches": "(", "version": 2}]}, "not a regular expression"),
    ({"rules": [{"equals": "1", "version": 2}]}, "header name is required"),
    ({"rules": [{"header": "x", "equals": "1"}]}, "label or a version is required"),
    ({"rules": "x"}, "must be a list"),
    ({"weights": {}}, "unknown key"),
    ({"split": {"stable": 50, "canary": 50}, "progressive": {"steps": [50, 25]}}, "rise strictly"),
    ({"progressive": {"steps": [10, 100]}}, "exactly two versions"),
    ({"split": {"stable": 90, "canary": 10}, "progressive": {"steps": [10], "interval_s": 0}}, "greater than 0"),
])
def test_invalid_routing_is_refused_with_its_reason(doc: Mapping[str, object], message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        compile_routing(doc, LABELS, known={1, 2, 3})


def test_document_round_trips_and_roles() -> None:
    doc = {"rules": [{"header": "x-canary", "equals": "1", "version": "canary"}],
           "split": {"stable": 90, "canary": 10}, "sticky_header": "x-user-id"}
    r = compile_routing(doc, LABELS)
    assert r.document == doc and r.weight(2) == 10 and r.weight(3) == 0
    assert r.split is not None and stable_and_canary(r.split) == (1, 2)
    assert compile_routing({}, LABELS).empty
