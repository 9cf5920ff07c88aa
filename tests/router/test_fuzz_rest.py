"""The REST front under schemathesis: the published OpenAPI document against a real router.

The document (``router/frontends/openapi.json``) is read from the router at
``GET /v1/openapi.json`` (from the file while a router does not serve it yet)
and checked with ``openapi-spec-validator``; then every operation in it is
fuzzed with schemathesis's generated requests, positive and negative, part of
them steered at the served model (its name, versions, label, and bodies shaped
like its signatures) so that requests reach a worker and not only the 404
path.  Every answer must be one the document describes (status, content type,
headers, body schema), never a 5xx (``:classify`` and ``:regress`` answer 501
by design), every error ``{"error": "..."}``, and afterwards the router and
its worker are the same processes and still answer a normal predict.

Bounded: a fixed number of examples per operation, no example database.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import core as hypothesis_core
from hypothesis import strategies as st
from hypothesis.vendor import pretty as hypothesis_pretty
from openapi_spec_validator import validate as validate_openapi
from schemathesis import GenerationMode
from schemathesis.schemas import APIOperation, BaseSchema

from tests.support import ROOT, RouterProcess
from tests.router.fuzz_router import LABEL, MODEL, SERVED_VERSION, router, workers_at_start  # noqa: F401 (fixtures)

# Importing schemathesis (its pytest plugin does, at start-up) patches hypothesis
# once per process, for speed: among others, the printer of falsifying
# examples becomes one that prints nothing, so every property test in the run
# would report its failing example blank.  Put hypothesis's own printer back;
# schemathesis never patches twice.
hypothesis_core.RepresentationPrinter = hypothesis_pretty.RepresentationPrinter  # type: ignore[attr-defined]

SPEC_FILE = ROOT / "router" / "frontends" / "openapi.json"
SPEC_URL = "/v1/openapi.json"

# Examples per operation and generation mode.  ~20 operations x (30 + 15)
# requests plus the router's start stay well inside the file's time budget.
POSITIVE_EXAMPLES = 30
NEGATIVE_EXAMPLES = 15

ID_INPUTS = ("user_id", "item_id", "category", "city", "device")
DENSE_DIM = 20
# The demo model's signatures: input -> the shape of one example (ids are int64 scalars).
SIGNATURES: dict[str, dict[str, tuple[int, ...]]] = {
    "serving_default": {**{name: () for name in ID_INPUTS}, "dense": (DENSE_DIM,)},
    "user_embedding": {"user_id": ()},
    "score_pairs": {"user_id": (), "item_id": ()},
}

# What a fuzzed request may never get; :classify and :regress answer 501 by design.
UNIMPLEMENTED_VERBS = (":classify", ":regress")

# Every operation of the document, read at collection time so each is its own test.
OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in json.loads(SPEC_FILE.read_text())["paths"].items()
    for method in item
    if method in ("get", "post", "put", "delete", "patch", "head", "options")
)

# The routes http_server.py serves, as the document must name them.
EXPECTED_OPERATIONS = sorted(
    [("POST", f"/v1/models/{{model}}{prefix}:{verb}")
     for prefix in ("", "/versions/{version}", "/labels/{label}")
     for verb in ("predict", "classify", "regress")]
    + [("GET", f"/v1/models/{{model}}{prefix}{suffix}")
       for prefix in ("", "/versions/{version}", "/labels/{label}")
       for suffix in ("", "/metadata")]
    + [("GET", path) for path in ("/v1/models", "/healthz", "/readyz", "/metrics", "/monitoring/prometheus/metrics",
                                  SPEC_URL)]
)


def _served(router: RouterProcess) -> tuple[bool, bytes, dict[str, str]]:
    """Whether the router serves the document (the route may not exist yet: 404), and what it sent."""
    status, body, headers = router.get(SPEC_URL)
    assert status in (200, 404), (status, body[:500])
    return status == 200, body, headers


@pytest.fixture(scope="module")
def document(router: RouterProcess) -> dict[str, Any]:
    """The document as the router serves it, or the file it is to serve while the route is missing."""
    served, body, headers = _served(router)
    if not served:
        loaded: dict[str, Any] = json.loads(SPEC_FILE.read_text())
        return loaded
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    doc: dict[str, Any] = orjson.loads(body)
    return doc


@pytest.fixture(scope="module")
def api(router: RouterProcess) -> BaseSchema:
    """The document loaded by schemathesis, from the router's URL (from the file while it is not served)."""
    if not _served(router)[0]:
        return schemathesis.openapi.from_path(SPEC_FILE)
    return schemathesis.openapi.from_url(router.url + SPEC_URL, timeout=10)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# -- the document ---------------------------------------------------------------


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate_openapi(document)  # raises with the offending path when it is not
    assert document["openapi"].startswith("3.")


def test_document_is_the_file(document: dict[str, Any]) -> None:
    assert document == json.loads(SPEC_FILE.read_text())


def test_document_names_every_route(document: dict[str, Any]) -> None:
    assert OPERATIONS == EXPECTED_OPERATIONS
    for path, item in document["paths"].items():
        for operation in item.values():
            declared = {p["$ref"].rsplit("/", 1)[-1].lower() for p in operation.get("parameters", [])}
            templated = {name for name in ("model", "version", "label") if "{" + name + "}" in path}
            assert declared == templated, path


# -- fuzzing ----------------------------------------------------------------------


def _tensor(shape: tuple[int, ...], element: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists of ``shape`` filled from ``element``."""
    strategy = element
    for size in reversed(shape):
        strategy = st.lists(strategy, min_size=size, max_size=size)
    return strategy


_INT64 = st.integers(-(2**63), 2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=32)
# Anything JSON: what a confused or hostile client puts where a tensor belongs.
_JUNK_SCALAR = st.one_of(
    st.integers(min_value=2**63, max_value=2**70), st.integers(min_value=-(2**70), max_value=-(2**63) - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(), st.text(max_size=4),
    st.sampled_from([{"b64": "AAE="}, {"b64": "!"}, {"b64": 1}, {}]), _INT64,
)
_JUNK = st.recursive(_JUNK_SCALAR, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)


def _example(name: str, tail: tuple[int, ...]) -> st.SearchStrategy[Any]:
    return _tensor(tail, _FLOAT if name == "dense" else _INT64)


@st.composite
def model_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Predict bodies shaped like the served model's signatures, some of them subtly wrong."""
    sig_name = draw(st.sampled_from([*SIGNATURES, None, "", "nope", "__saved_model_init_op"]))
    inputs = dict(SIGNATURES.get(sig_name or "serving_default", SIGNATURES["serving_default"]))
    if draw(st.integers(0, 4)) == 0:  # another signature's inputs
        inputs = dict(SIGNATURES[draw(st.sampled_from(sorted(SIGNATURES)))])
    rows = draw(st.integers(1, 3))
    body: dict[str, Any] = {} if sig_name is None else {"signature_name": sig_name}
    columns = {name: draw(st.lists(_example(name, tail), min_size=rows, max_size=rows)) for name, tail in inputs.items()}
    mutation = draw(st.sampled_from(["none", "none", "junk", "drop", "extra", "ragged"]))
    victim = draw(st.sampled_from(sorted(columns)))
    if mutation == "junk":
        columns[victim][draw(st.integers(0, rows - 1))] = draw(_JUNK)
    elif mutation == "drop" and len(columns) > 1:
        del columns[victim]
    elif mutation == "extra":
        columns[draw(st.text(min_size=1, max_size=6))] = [draw(_JUNK) for _ in range(rows)]
    elif mutation == "ragged":
        columns[victim] = columns[victim][:-1] or [[]]
    if draw(st.booleans()):
        n = min(len(c) for c in columns.values())
        if len(columns) == 1 and draw(st.booleans()):
            body["instances"] = next(iter(columns.values()))  # bare values, single input
        else:
            body["instances"] = [{name: col[i] for name, col in columns.items()} for i in range(n)]
    elif len(columns) == 1 and draw(st.booleans()):
        body["inputs"] = next(iter(columns.values()))
    else:
        body["inputs"] = columns
    return body


def _steer(data: st.DataObject, case: Any) -> None:
    """Point part of the generated requests at what the router serves."""
    params = case.path_parameters
    if params is not None and "model" in params and data.draw(st.integers(0, 2), label="served model"):
        params["model"] = MODEL
        if "version" in params:
            params["version"] = data.draw(st.sampled_from([SERVED_VERSION, SERVED_VERSION, 1, 3, 0]), label="version")
        if "label" in params:
            params["label"] = data.draw(st.sampled_from([LABEL, LABEL, "canary"]), label="label")
        if case.operation.path.endswith(":predict") and data.draw(st.integers(0, 3), label="model body"):
            case.body = data.draw(model_bodies(), label="body")


def _is_strict_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _header(response: Any, name: str) -> str:
    """One header of a schemathesis Response (lower-case names, lists of values)."""
    values = response.headers.get(name.lower()) or [""]
    return str(values[0])


def _check(case: Any, response: Any, base_url: str) -> None:
    """No 5xx, JSON errors, and an answer the document describes."""
    status = response.status_code
    where = f"{case.as_curl_command(base_url=base_url)}\n-> {status} {response.text[:2000]!r}"
    if status >= 500:
        assert status == 501 and case.operation.path.endswith(UNIMPLEMENTED_VERBS), f"server error:\n{where}"
    if status >= 400:
        assert _header(response, "Content-Type").startswith("application/json"), where
        body = response.json()
        assert isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], str), where
        assert body["error"], where
        if status == 429:
            assert int(_header(response, "Retry-After")) >= 1, where
    checks = [schemathesis.checks.status_code_conformance, schemathesis.checks.content_type_conformance,
              schemathesis.checks.response_headers_conformance]
    # Outputs holding NaN/Infinity are written as those bare tokens, as TF Serving writes them: not JSON.
    if _is_strict_json(response.text) or not _header(response, "Content-Type").startswith("application/json"):
        checks.append(schemathesis.checks.response_schema_conformance)
    case.validate_response(response, checks=checks)


def _fuzz(operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode, examples: int, base_url: str,
          session: requests.Session) -> None:
    strategy = operation.as_strategy(mode)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy, label="case")
        _steer(data, case)
        response = case.call(base_url=base_url, session=session, timeout=30)
        _check(case, response, base_url)

    run()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(router: RouterProcess, api: BaseSchema, session: requests.Session,
                        method: str, path: str) -> None:
    operation = api[path][method]
    _fuzz(operation, GenerationMode.POSITIVE, POSITIVE_EXAMPLES, router.url, session)
    if "{" in path or method == "POST":  # something to negate (no parameters and no body: nothing)
        _fuzz(operation, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, router.url, session)


# -- hostile bodies schemathesis does not generate ------------------------------------


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not utf-8": b"\xff\xfe{\"instances\": [1]}",
    "truncated": b'{"instances": [{"user_id": 1',
    "not an object": b"[1, 2, 3]",
    "huge number": b'{"signature_name": "user_embedding", "instances": [1e400]}',
    "int beyond uint64": b'{"signature_name": "user_embedding", "instances": [18446744073709551616]}',
    "nan tokens": (b'{"instances": [{"user_id": 1, "item_id": 2, "category": 3, "city": 4, "device": 5, '
                   b'"dense": [NaN, Infinity, -Infinity' + b", 0" * 17 + b"]}]}"),
    "bad b64": b'{"signature_name": "user_embedding", "instances": [{"b64": "!!"}]}',
    "rank 33": ('{"signature_name": "user_embedding", "inputs": ' + _deep(33) + "}").encode(),
    "nested 300 in an ignored key": ('{"instances": [], "z": ' + _deep(300) + "}").encode(),
    # A value nested ~1000 deep (orjson parses up to 1024) anywhere the error
    # message quotes the whole document.
    "nested 1000 as the body": _deep(1000).encode(),
    "nested 1000 as signature_name": ('{"signature_name": ' + _deep(1000) + "}").encode(),
    "nested 1000 in an ignored key": ('{"instances": [], "z": ' + _deep(1000) + "}").encode(),
    "nested 1000 beside both formats": ('{"instances": [1], "inputs": 1, "z": ' + _deep(1000) + "}").encode(),
    "nested 1000 as instances": ('{"signature_name": "user_embedding", "instances": ' + '{"a": ' + _deep(1000)
                                 + "}}").encode(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_body_is_a_client_error(router: RouterProcess, name: str) -> None:
    status, body, headers = router.post(f"/v1/models/{MODEL}:predict", HOSTILE_BODIES[name])
    assert status < 500, f"{status} {body[:300]!r}"
    if status >= 400:
        doc = orjson.loads(body)
        assert list(doc) == ["error"] and isinstance(doc["error"], str), body[:300]


# -- afterwards -------------------------------------------------------------------------


def test_router_and_worker_survive(router: RouterProcess, workers_at_start: list[int]) -> None:
    """Runs last in this file: the same processes, still serving."""
    assert router.proc.poll() is None, router.log()
    assert router.worker_pids() == workers_at_start, router.log()
    rng = np.random.default_rng(0)
    rows = [{**{name: int(rng.integers(0, 1000)) for name in ID_INPUTS},
             "dense": rng.standard_normal(DENSE_DIM).astype(np.float32).tolist()} for _ in range(3)]
    status, body, headers = router.post(f"/v1/models/{MODEL}:predict", {"instances": rows})
    assert status == 200, body
    assert headers["x-model-version"] == str(SERVED_VERSION)
    predictions = orjson.loads(body)["predictions"]
    assert len(predictions) == 3 and all(0.0 <= p["probability"] <= 1.0 and math.isfinite(p["logit"])
                                         for p in predictions)
    status, _, _ = router.get("/readyz")
    assert status == 200
