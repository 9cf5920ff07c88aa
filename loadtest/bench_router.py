"""What the router adds to a request, against calling the worker directly.

    python -m loadtest.bench_router [--seconds 5] [--model-dir models/ctr]

Starts, in one run on the same machine:

* the router as a pure proxy: ``python -m router serve --workers 1
  --no-batching`` (one spawned worker, reached over a Unix socket, no
  coalescing), and
* one worker called directly (``python -m workers`` on 127.0.0.1), started
  with the CPU pinning and thread flags the router gave its own worker, so
  both targets have the same single-worker capacity.

Both stay up; only the one being measured gets load (an idle process costs
nothing).  Each step drives one target with the official client (the
``PredictionServiceStub`` on a grpc.aio channel, PredictRequests of one row
built ahead of time), a 1 s warm-up and then ``--seconds`` measured, in
closed loop at concurrency 1, 16 and 64; direct and router steps alternate,
so background noise hits both alike.  Before each step one request is
checked (output names, shapes, and the router's probability against the
direct worker's).

Prints a table (p50/p99 latency, req/s, cores used by client, router and
worker during the measured window), the added latency (router - direct) at
concurrency 1 and 16 and the throughput ratio at 64, and as its last line
the headline.  Progress goes to stderr.  Exits 1 if any request failed.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.bench_worker import predict_requests
from loadtest.common import (
    GRPC_OPTIONS,
    LoadResult,
    RouterProcess,
    bench_args,
    closed_loop,
    error_text,
    print_table,
    process_cmdline,
    progress,
    ratio,
    run_async,
    start_worker,
)

MODEL_NAME = "ctr"
OUTPUTS = ("logit", "probability")
WARMUP_S = 1.0
CONCURRENCIES = (1, 16, 64)
TARGET_P50_MS = 0.5
# Worker flags copied from the router's own worker to the direct one.
MATCHED_WORKER_FLAGS = ("--cpus", "--intra-op-threads", "--inter-op-threads", "--predict-threads")


# -- gRPC client helpers (bench_batching uses them too) ----------------------------


def check_grpc_response(resp: Any, rows: int = 1, expect: Any = None) -> Any:
    """The probabilities of a PredictResponse after checking its output names and shapes.

    With ``expect`` (an array), also that they match it (float tolerance:
    batched and single-row calls may round differently).
    """
    import numpy as np
    import tensorflow as tf

    names = sorted(resp.outputs)
    if names != sorted(OUTPUTS):
        raise RuntimeError(f"wrong answer: outputs {names}, expected {sorted(OUTPUTS)}")
    for name in OUTPUTS:
        shape = [d.size for d in resp.outputs[name].tensor_shape.dim]
        if shape != [rows]:
            raise RuntimeError(f"wrong answer: {name} shape {shape}, expected [{rows}]")
    prob = tf.make_ndarray(resp.outputs["probability"])
    if expect is not None and not np.allclose(prob, expect, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"wrong answer: probability {prob.tolist()}, expected {np.asarray(expect).tolist()}")
    return prob


async def grpc_answer(address: str, request: Any) -> Any:
    """The checked probabilities of one Predict call (to compare other targets with)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return check_grpc_response(await stub.Predict(request, timeout=30))


async def grpc_phase(
    address: str,
    requests: Sequence[Any],
    *,
    label: str,
    concurrency: int,
    seconds: float,
    cpu_pids: Mapping[str, int | None],
    expect: Any = None,
) -> LoadResult:
    """One checked request, then a closed loop of batch-1 Predicts on one grpc.aio channel."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # A wrong answer must not pass as throughput.
        try:
            check_grpc_response(await stub.Predict(requests[0], timeout=30), expect=expect)
        except (grpc.RpcError, RuntimeError) as exc:
            progress(f"  check failed: {error_text(exc)}")
            return failed(label, concurrency, exc)
        feeds = itertools.cycle(requests)

        async def call() -> None:
            await stub.Predict(next(feeds), timeout=30)

        return await closed_loop(call, concurrency=concurrency, seconds=seconds, warmup=WARMUP_S,
                                 label=label, cpu_pids=cpu_pids)


def failed(label: str, concurrency: int, exc: BaseException) -> LoadResult:
    """The result of a step whose check failed: no calls, one error."""
    return LoadResult(label=label, concurrency=concurrency, rows_per_call=1, seconds=0.0, latencies=[],
                      errors=Counter({f"check: {error_text(exc)}": 1}))


def cpu_columns(r: LoadResult) -> list[float]:
    """Cores used by client, router, backend (workers summed) and all of them."""
    nan = float("nan")
    client = r.cpu.get("client", nan)
    router = r.cpu.get("router", nan)
    backend = [v for k, v in r.cpu.items() if k not in ("client", "router")]
    backend_sum = sum(backend) if backend else nan
    total = sum(v for v in (client, router, backend_sum) if v == v)
    return [client, router, backend_sum, total if r.cpu else nan]


def print_errors(results: Sequence[LoadResult]) -> None:
    for r in results:
        for message, count in r.errors.most_common():
            print(f"ERROR {r.label} c={r.concurrency}: {count}x {message}")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def signed_ms(value: float) -> str:
    return f"{value:+.2f} ms" if value == value else "n/a"


def times(value: float) -> str:
    return f"{value:.2f}x" if value == value else "n/a"


# -- the benchmark ----------------------------------------------------------------


def matched_flags(cmdline: Sequence[str]) -> list[str]:
    """The pinning/thread flags of a worker command line, to start an equal worker."""
    flags: list[str] = []
    for i, arg in enumerate(cmdline[:-1]):
        if arg in MATCHED_WORKER_FLAGS:
            flags += [arg, cmdline[i + 1]]
    return flags


async def measure(router: RouterProcess, router_worker: int, direct_address: str, direct_pid: int,
                  seconds: float) -> list[LoadResult]:
    requests = predict_requests(1)
    expect = await grpc_answer(direct_address, requests[0])
    targets = [
        ("direct", direct_address, {"client": None, "worker": direct_pid}),
        ("router", router.grpc_address, {"client": None, "router": router.pid, "worker": router_worker}),
    ]
    steps = len(CONCURRENCIES) * len(targets)
    results = []
    step = 0
    for concurrency in CONCURRENCIES:
        for label, address, cpu_pids in targets:
            step += 1
            progress(f"[{step}/{steps}] {label} concurrency {concurrency} ({WARMUP_S:g}s warm-up + {seconds:g}s) ...")
            r = await grpc_phase(address, requests, label=label, concurrency=concurrency, seconds=seconds,
                                 cpu_pids=cpu_pids, expect=expect)
            progress(f"  {r.rate:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {r.error_count} errors")
            results.append(r)
    return results


def report(results: Sequence[LoadResult], worker_flags: Sequence[str], seconds: float) -> str:
    print(f"model {MODEL_NAME}; {os.cpu_count()} CPUs; {seconds:g}s per step after {WARMUP_S:g}s warm-up; "
          f"official grpc.aio client on {loop_name()}, batch 1")
    print(f"router: --workers 1 --no-batching; both workers: {' '.join(worker_flags) or 'default flags'}")
    headers = ["target", "conc", "calls", "req/s", "p50 ms", "p99 ms", "errors",
               "client cpu", "router cpu", "worker cpu", "total cpu"]
    print_table(headers, [[r.label, r.concurrency, r.calls, r.rate, r.p50_ms, r.p99_ms, r.error_count,
                           *cpu_columns(r)] for r in results])
    print("(cpu columns: cores used during the measured window)")
    print_errors(results)
    by = {(r.label, r.concurrency): r for r in results}
    print("added by the router (router - direct):")
    for c in CONCURRENCIES[:-1]:
        d, r = by["direct", c], by["router", c]
        print(f"  c={c}: p50 {signed_ms(r.p50_ms - d.p50_ms)}, p99 {signed_ms(r.p99_ms - d.p99_ms)}")
    c = CONCURRENCIES[-1]
    d, r = by["direct", c], by["router", c]
    tput = ratio(r.rate, d.rate)
    print(f"  c={c}: throughput {times(tput)} ({r.rate:,.0f} req/s via router, {d.rate:,.0f} direct)")
    d1, r1 = by["direct", 1], by["router", 1]
    return (f"router added latency at c=1: p50 {signed_ms(r1.p50_ms - d1.p50_ms)}, "
            f"p99 {signed_ms(r1.p99_ms - d1.p99_ms)} (target: p50 +{TARGET_P50_MS} ms or less); "
            f"throughput at c={c}: {times(tput)} direct")


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_args("python -m loadtest.bench_router", __doc__, argv)  # fails early without `make demo`
    model_dir = args.model_dir

    progress("starting router (--workers 1 --no-batching) ...")
    router = RouterProcess(args=["--model-name", MODEL_NAME, "--model-base-path", str(model_dir),
                                 "--workers", "1", "--no-batching"])
    direct = None
    try:
        import tensorflow  # noqa: F401  (loads while the router's worker does)

        ready = router.wait_ready(workers=1)
        (router_worker,) = router.worker_pids()
        flags = matched_flags(process_cmdline(router_worker))
        progress(f"router pid {router.pid} on {router.grpc_address} ready ({ready:.1f}s); "
                 f"its worker pid {router_worker}: {' '.join(flags)}")
        progress("starting direct worker with the same flags ...")
        direct = start_worker({MODEL_NAME: model_dir}, *flags)
        ready = direct.wait_serving()
        progress(f"direct worker pid {direct.pid} on {direct.address} SERVING ({ready:.1f}s)")
        results = run_async(measure(router, router_worker, direct.address, direct.pid, args.seconds))
    finally:
        progress(router.stop())
        if direct is not None:
            progress(direct.stop("direct worker"))

    headline = report(results, flags, args.seconds)
    print(headline)
    return 1 if any(r.error_count for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
