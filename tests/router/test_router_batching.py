"""Request coalescing through a real router: same answers, isolation, limits."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, WorkerProcess, outputs_of, predict_request
from workers.demo_model import example_inputs


def metric(router: RouterProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    _, body, _ = router.get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module")
def router(model_root: Path, checked_model: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    batching = {"max_batch_size": 64, "max_inflight_batches": 1}
    config = {
        "models": [
            {"name": "ctr", "base_path": str(model_root / "ctr"), "batching": batching},
            {"name": "checked", "base_path": str(checked_model), "batching": batching},
            {"name": "small", "base_path": str(model_root / "ctr"),
             "batching": {"max_batch_size": 2, "max_enqueued": 2, "max_inflight_batches": 1}},
        ],
        "workers": {"count": 2, "max_inflight": 2},
    }
    r = RouterProcess(config, log_dir=logs_dir)
    r.wait_ready()
    yield r
    assert r.terminate() == 0, r.log()


@pytest.fixture(scope="module")
def direct(model_root: Path, logs_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", log_dir=logs_dir)
    w.wait_serving()
    yield w
    w.terminate()


def test_mixed_rest_and_grpc_equal_unbatched_answers(router: RouterProcess, direct: WorkerProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    batches_before = metric(router, "tfs_router_batch_size_requests_count", model="ctr")
    requests_before = metric(router, "tfs_router_batch_size_requests_sum", model="ctr")
    rng = random.Random(7)
    cases = [(i, rng.randint(1, 5), rng.random() < 0.3) for i in range(240)]

    def call(case: tuple[int, int, bool]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        seed, rows, rest = case
        x = example_inputs(rows, seed=seed, vocab=TEST_VOCAB)
        if rest:
            instances = [{k: v[i].tolist() for k, v in x.items()} for i in range(rows)]
            status, body, headers = router.post("/v1/models/ctr:predict", {"instances": instances})
            assert status == 200, body
            preds = orjson.loads(body)["predictions"]
            got = {k: np.array([p[k] for p in preds], dtype=np.float32) for k in ("logit", "probability")}
        else:
            got = outputs_of(stub.Predict(predict_request("ctr", x), timeout=60))
        return x, got

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, cases))
    direct_stub = prediction_service_pb2_grpc.PredictionServiceStub(direct.channel)
    for x, got in results:
        want = outputs_of(direct_stub.Predict(predict_request("ctr", x), timeout=60))
        for name in ("logit", "probability"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    batches = metric(router, "tfs_router_batch_size_requests_count", model="ctr") - batches_before
    merged = metric(router, "tfs_router_batch_size_requests_sum", model="ctr") - requests_before
    assert merged == len(cases)
    assert batches < merged, "no two requests were ever coalesced"


def test_one_bad_request_never_fails_another(router: RouterProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    good = np.ones((2, 4), np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    for _ in range(30):
        errors: list[Any] = []
        ok: list[np.ndarray] = []
        barrier = threading.Barrier(12)

        def send(x: np.ndarray) -> None:
            barrier.wait()
            try:
                ok.append(outputs_of(stub.Predict(predict_request("checked", {"x": x}), timeout=60))["y"])
            except grpc.RpcError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(bad if i == 5 else good,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(ok) == 11 and all(np.array_equal(y, good * 2) for y in ok)
        if metric(router, "tfs_router_retries_total", model="checked", reason="batch_invalid_argument"):
            return  # the bad request was coalesced with good ones, and only it failed
    pytest.fail("the bad request was never coalesced with good ones in 30 rounds")


def test_non_batchable_signature_is_never_coalesced(router: RouterProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    before = metric(router, "tfs_router_batches_total", model="ctr")

    def pairs(n: int) -> None:
        ids = {"user_id": np.arange(n, dtype=np.int64), "item_id": np.arange(n + 1, dtype=np.int64)}
        out = outputs_of(stub.Predict(predict_request("ctr", ids, signature_name="score_pairs"), timeout=60))
        assert out["scores"].shape == (n, n + 1)
        np.testing.assert_allclose(out["total"], out["scores"].sum(), rtol=1e-4)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(pairs, [1, 2, 3, 4] * 10))
    assert metric(router, "tfs_router_batches_total", model="ctr") == before


def test_inputs_disagreeing_on_dimension_0_are_invalid(router: RouterProcess) -> None:
    x = example_inputs(3, vocab=TEST_VOCAB)
    x["dense"] = x["dense"][:2]
    with pytest.raises(grpc.RpcError) as err:
        prediction_service_pb2_grpc.PredictionServiceStub(router.channel).Predict(predict_request("ctr", x))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension 0" in err.value.details()


def test_full_queue_is_refused_with_429_and_retry_after(router: RouterProcess) -> None:
    body = {"instances": [{k: v[0].tolist() for k, v in example_inputs(1, vocab=TEST_VOCAB).items()}] * 2}

    def send(_: int) -> tuple[int, dict[str, str]]:
        status, _, headers = router.post("/v1/models/small:predict", body)
        return status, headers

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(send, range(200)))
    codes = {status for status, _ in results}
    assert codes <= {200, 429}
    refused = [headers for status, headers in results if status == 429]
    assert refused, "the queue bound never refused anything"
    assert all(int(h["Retry-After"]) >= 1 for h in refused)
    assert metric(router, "tfs_router_shed_total", model="small", reason="queue_full") >= len(refused)
