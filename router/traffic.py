"""Traffic policy: which version answers a request that names none (pure).

A model's routing has header rules, tried in order (the first that matches
decides), then a weighted split for the requests no rule took, sticky by a
header: the header's value hashes to a fixed point in [0, 100), and each
target of the split owns a range of points, laid out in ascending version
order.  With two targets only the boundary moves when the weights change, so
raising the canary's weight moves keys into the canary and never out of it.
Requests without the sticky header draw a point at random.

Precedence, for the caller (``Registry.resolve``): a version or label named
in the request > the first matching rule > the split > the default version.

``compile_routing`` validates a routing block (from the config file or the
admin API's JSON) against the model's labels and versions; every problem is
a ``RoutingError`` naming it.  ``Routing.choose`` is the per-request call:
headers in (a lookup by lower-case name), a version or None (the default) out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

Headers = Callable[[str], "str | None"]  # lower-case name -> value, or None when absent

RULE, SPLIT, DEFAULT = "rule", "split", "default"
RULE_KINDS = ("equals", "one_of", "matches", "present")


class RoutingError(ValueError):
    """A routing block that cannot be used; the message says why."""


def bucket(key: str) -> float:
    """A fixed point in [0, 100) for a sticky key (the same on every router, every run)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100.0 / 2**64


@dataclass(frozen=True)
class Rule:
    header: str  # lower case
    version: int
    equals: str | None = None
    one_of: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None
    present: bool = False

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.present:
            return True
        if self.equals is not None:
            return value == self.equals
        if self.one_of is not None:
            return value in self.one_of
        return self.pattern is not None and self.pattern.fullmatch(value) is not None


@dataclass(frozen=True)
class Split:
    bounds: tuple[tuple[float, int], ...]  # (upper bound of the range, version), ascending
    weights: Mapping[int, int]  # version -> percent

    def pick(self, point: float) -> int:
        for upper, version in self.bounds:
            if point < upper:
                return version
        return self.bounds[-1][1]  # point == 100.0 cannot happen; float rounding of the sum can


@dataclass(frozen=True)
class Routing:
    rules: tuple[Rule, ...]
    split: Split | None
    sticky_header: str  # lower case; "" when none
    document: dict[str, Any]  # the routing block as given (JSON form), for GET

    @property
    def empty(self) -> bool:
        return not self.rules and self.split is None

    def choose(self, headers: Headers | None, draw: Callable[[], float]) -> tuple[int | None, str]:
        """(version, why): the version the rules or the split give, or (None, DEFAULT)."""
        if headers is not None:
            for rule in self.rules:
                if rule.matches(headers(rule.header)):
                    return rule.version, RULE
        if self.split is None:
            return None, DEFAULT
        key = headers(self.sticky_header) if headers is not None and self.sticky_header else None
        point = bucket(key) if key is not None else draw() * 100.0
        return self.split.pick(point), SPLIT

    def weight(self, version: int) -> int:
        return self.split.weights.get(version, 0) if self.split is not None else 0


def resolve_ref(ref: object, labels: Mapping[str, int], known: Collection[int] | None, where: str) -> int:
    """A label or a version number, as a version number."""
    if isinstance(ref, bool):
        raise RoutingError(f"{where}: {ref!r} is neither a label nor a version")
    if isinstance(ref, int):
        version = ref
    elif isinstance(ref, str) and ref.isdigit():
        version = int(ref)
    elif isinstance(ref, str) and ref in labels:
        return labels[ref]
    elif isinstance(ref, str):
        known_labels = ", ".join(sorted(labels)) or "none"
        raise RoutingError(f"{where}: unknown label {ref!r} (labels: {known_labels})")
    else:
        raise RoutingError(f"{where}: {ref!r} is neither a label nor a version")
    if known is not None and version not in known:
        raise RoutingError(f"{where}: version {version} is not served (versions: {sorted(known)})")
    return version


def compile_routing(document: Mapping[str, Any], labels: Mapping[str, int],
                    known: Collection[int] | None = None) -> Routing:
    """Validate a routing block (the JSON form) and build its policy.

    ``known``: the versions a version number may name (None: any).
    """
    if not isinstance(document, Mapping):
        raise RoutingError("routing must be an object")
    unknown = set(document) - {"rules", "split", "sticky_header", "progressive"}
    if unknown:
        raise RoutingError(f"unknown key(s) {sorted(unknown)} (known: progressive, rules, split, sticky_header)")
    raw_rules = document.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RoutingError("rules must be a list")
    rules = tuple(_rule(r, labels, known, f"rules[{i}]") for i, r in enumerate(raw_rules))
    split = _split(document.get("split") or {}, labels, known)
    sticky = document.get("sticky_header") or ""
    if not isinstance(sticky, str):
        raise RoutingError("sticky_header must be a header name")
    progressive = document.get("progressive") or {}
    check_progressive(progressive, split)
    return Routing(rules, split, sticky.lower(), plain(document))


def _rule(raw: Any, labels: Mapping[str, int], known: Collection[int] | None, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise RoutingError(f"{where}: a rule must be an object")
    unknown = set(raw) - {"header", "version", *RULE_KINDS}
    if unknown:
        raise RoutingError(f"{where}: unknown key(s) {sorted(unknown)}")
    header = raw.get("header")
    if not isinstance(header, str) or not header:
        raise RoutingError(f"{where}.header: a header name is required")
    if "version" not in raw:
        raise RoutingError(f"{where}.version: a label or a version is required")
    version = resolve_ref(raw["version"], labels, known, f"{where}.version")
    given = [k for k in RULE_KINDS if raw.get(k) not in (None, "", (), [], False)]
    if len(given) != 1:
        raise RoutingError(f"{where}: exactly one of equals, one_of, matches, present is required "
                           f"(got {', '.join(given) or 'none'})")
    kind = given[0]
    value = raw[kind]
    if kind == "equals":
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise RoutingError(f"{where}.equals: a string")
        return Rule(header.lower(), version, equals=str(value))
    if kind == "one_of":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
            raise RoutingError(f"{where}.one_of: a list of strings")
        return Rule(header.lower(), version, one_of=frozenset(str(v) for v in value))
    if kind == "matches":
        if not isinstance(value, str):
            raise RoutingError(f"{where}.matches: a regular expression")
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise RoutingError(f"{where}.matches: not a regular expression: {exc}") from None
        return Rule(header.lower(), version, pattern=pattern)
    if value is not True:
        raise RoutingError(f"{where}.present: true or absent")
    return Rule(header.lower(), version, present=True)


def _split(raw: Any, labels: Mapping[str, int], known: Collection[int] | None) -> Split | None:
    if not isinstance(raw, Mapping):
        raise RoutingError("split must be an object of label or version -> percent")
    if not raw:
        return None
    weights: dict[int, int] = {}
    for ref, weight in raw.items():
        version = resolve_ref(ref, labels, known, f"split.{ref}")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
            raise RoutingError(f"split.{ref}: a weight is a whole percent from 0 to 100, got {weight!r}")
        if version in weights:
            raise RoutingError(f"split.{ref}: version {version} is named twice")
        weights[version] = weight
    total = sum(weights.values())
    if total != 100:
        raise RoutingError(f"split: weights must sum to 100, they sum to {total}")
    bounds = []
    upper = 0.0
    for version in sorted(weights):
        upper += weights[version]
        bounds.append((upper, version))
    return Split(tuple(bounds), weights)


def check_progressive(raw: Any, split: Split | None) -> None:
    if not isinstance(raw, Mapping):
        raise RoutingError("progressive must be an object")
    unknown = set(raw) - {"steps", "interval_s", "min_requests", "max_error_rate_delta", "max_p99_ratio"}
    if unknown:
        raise RoutingError(f"progressive: unknown key(s) {sorted(unknown)}")
    steps = raw.get("steps") or []
    if not steps:
        return
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                       for s in steps):
        raise RoutingError("progressive.steps: a list of whole percents")
    if list(steps) != sorted(set(steps)) or steps[0] <= 0 or steps[-1] > 100:
        raise RoutingError("progressive.steps: must rise strictly, within 1..100")
    if split is None or len(split.weights) != 2:
        raise RoutingError("progressive: needs a split between exactly two versions (stable and canary)")
    for key, low in (("interval_s", 0.0), ("max_p99_ratio", 0.0)):
        value = raw.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= low):
            raise RoutingError(f"progressive.{key}: a number greater than {low:g}")
    for key in ("min_requests",):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RoutingError(f"progressive.{key}: a whole number of at least 1")
    value = raw.get("max_error_rate_delta")
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
        raise RoutingError("progressive.max_error_rate_delta: a number of at least 0")


def stable_and_canary(split: Split) -> tuple[int, int]:
    """In a two-version split: (stable, canary), the canary being the newer version."""
    older, newer = sorted(split.weights)
    return older, newer


def plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts (string keys) and lists: JSON's and YAML's shapes."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
