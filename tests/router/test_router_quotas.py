"""Quotas, priorities and bounds with a real router, real workers and real clients."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path


import aiohttp
import grpc
import orjson
import psutil
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, predict_request
from workers.demo_model import example_inputs

INPUTS = example_inputs(1, vocab=TEST_VOCAB)
ROW = {name: value.tolist()[0] for name, value in INPUTS.items()}
ALLOWED_GRPC = {"OK", "RESOURCE_EXHAUSTED"}


def threads(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def grpc_burst(address: str, n: int, channels: int) -> list[str]:
    request = predict_request("ctr", INPUTS).SerializeToString()
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        calls = [c.unary_unary("/tensorflow.serving.PredictionService/Predict") for c in chans]

        async def one(i: int) -> str:
            try:
                await calls[i % channels](request, timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for c in chans:
            await c.close()


async def rest_burst(url: str, n: int, connections: int) -> list[str]:
    body = orjson.dumps({"instances": [ROW]})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> str:
            try:
                async with session.post(f"{url}/v1/models/ctr:predict", data=body) as resp:
                    await resp.read()
                    if resp.status == 429:
                        assert int(resp.headers["Retry-After"]) >= 1
                    return str(resp.status)
            except aiohttp.ClientError as exc:
                return f"client error {type(exc).__name__}"

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_a_burst_of_5000_is_answered_ok_or_429_with_bounded_threads_and_memory(model_root: Path,
                                                                               logs_dir: Path) -> None:
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                            "workers": {"count": 2}}, log_dir=logs_dir)
    try:
        router.wait_ready()
        workers = router.worker_pids()
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        for _ in range(20):  # warm: every lazily created thread and buffer exists before the baseline
            stub.Predict(predict_request("ctr", INPUTS), timeout=30)
        base_threads = {pid: threads(pid) for pid in (router.proc.pid, *workers)}
        base_rss = {pid: rss_mb(pid) for pid in (router.proc.pid, *workers)}
        peak_threads = dict(base_threads)
        peak_rss = dict(base_rss)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for pid in peak_threads:
                    try:
                        peak_threads[pid] = max(peak_threads[pid], threads(pid))
                        peak_rss[pid] = max(peak_rss[pid], rss_mb(pid))
                    except psutil.Error:
                        pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()

        async def burst() -> tuple[list[str], list[str]]:
            g, r = await asyncio.gather(grpc_burst(f"127.0.0.1:{router.grpc_port}", 3000, channels=50),
                                        rest_burst(router.url, 2000, connections=200))
            return g, r

        try:
            grpc_codes, rest_codes = asyncio.run(burst())
        finally:
            stop.set()
            sampler.join()
        assert set(grpc_codes) <= ALLOWED_GRPC, {c: grpc_codes.count(c) for c in set(grpc_codes)}
        assert set(rest_codes) <= {"200", "429"}, {c: rest_codes.count(c) for c in set(rest_codes)}
        assert grpc_codes.count("OK") > 0 and rest_codes.count("200") > 0
        # Bounded: no thread per request, anywhere; memory within what the queues may hold.
        for pid, base in base_threads.items():
            assert peak_threads[pid] <= base + 8, (pid, base, peak_threads[pid])
        assert peak_rss[router.proc.pid] - base_rss[router.proc.pid] < 300, (base_rss, peak_rss)
        for pid in workers:
            assert peak_rss[pid] - base_rss[pid] < 200, (base_rss, peak_rss)
        assert router.worker_pids() == workers and router.proc.poll() is None  # nobody died
        # And normal requests succeed right after.
        assert stub.Predict(predict_request("ctr", INPUTS), timeout=30).model_spec.version.value == 2
        metrics = router.get("/metrics")[1].decode()
        assert "tfs_router_admitted_total" in metrics
    finally:
        assert router.terminate() == 0, router.log()


def test_a_flooding_tenant_is_refused_by_name_and_a_high_tenant_keeps_its_latency(model_root: Path,
                                                                                   logs_dir: Path) -> None:
    quotas = {"tenants": {"flood": {"max_inflight": 4, "max_queued": 8, "priority": "low"},
                          "steady": {"max_inflight": 32, "priority": "high"}}}
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                            "workers": {"count": 2}, "quotas": quotas}, log_dir=logs_dir)
    try:
        router.wait_ready()
        request = predict_request("ctr", INPUTS)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)

        def steady_latencies(n: int) -> tuple[list[float], list[str]]:
            out, errors = [], []
            for _ in range(n):
                start = time.perf_counter()
                try:
                    stub.Predict(request, metadata=(("x-tenant", "steady"),), timeout=30)
                    out.append(time.perf_counter() - start)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
            return out, errors

        steady_latencies(50)
        alone, alone_errors = steady_latencies(300)

        flood_codes: list[str] = []
        flood_details: list[str] = []
        stop = threading.Event()

        def flood() -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}")
            flooder = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                futures = [flooder.Predict.future(request, metadata=(("x-tenant", "flood"),), timeout=30)
                           for _ in range(32)]
                for f in futures:
                    try:
                        f.result()
                        flood_codes.append("OK")
                    except grpc.RpcError as exc:
                        flood_codes.append(exc.code().name)
                        flood_details.append(exc.details() or "")
            channel.close()

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        for t in flooders:
            t.start()
        try:
            time.sleep(0.5)
            flooded, flooded_errors = steady_latencies(300)
        finally:
            stop.set()
            for t in flooders:
                t.join()
        assert not alone_errors and not flooded_errors, (alone_errors + flooded_errors)[:3]
        assert set(flood_codes) == {"OK", "RESOURCE_EXHAUSTED"}, set(flood_codes)
        assert all("tenant flood quota max_inflight" in d for d in flood_details), flood_details[:3]
        # The high tenant keeps its latency: its median under the flood stays within a small factor.
        ratio = statistics.median(flooded) / statistics.median(alone)
        assert ratio < 4, ratio
        metrics = router.get("/metrics")[1].decode()
        assert 'tfs_router_quota_shed_total{model="ctr",reason="tenant_inflight",tenant="flood"}' in metrics
        assert 'tfs_router_tenant_inflight{tenant="steady"}' in metrics
    finally:
        assert router.terminate() == 0, router.log()


