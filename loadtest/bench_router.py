"""What the router's hop costs: latency and CPU per request, against calling the worker directly.

    python -m loadtest.bench_router [--seconds 5] [--rounds 3] [--model-dir models/ctr]

Starts, in one run on the same machine:

* ``router``: ``python -m router serve --workers 1`` with its defaults
  (coalescing on, ``workers.transport: auto``: the router sends Predict to its
  spawned worker over the lean framed protocol on a Unix socket);
* ``router/grpc``: the same with ``workers.transport: grpc`` (TF Serving's gRPC
  API to the worker, as before frames), to show what the transport alone buys;
* ``fixed-reply``: ``loadtest.fixed_reply``, a grpc.aio server answering
  every Predict with the same bytes, unparsed: the CPU floor of any front
  built on grpc.aio (its CPU shows in the router columns);
* ``direct``: one worker called directly (``python -m workers`` on
  127.0.0.1), started with the CPU pinning and thread flags the router gave
  its own worker.

All stay up; only the one being measured gets load (an idle process costs
next to nothing).  Each step drives one target in closed loop with the
official client (``PredictionServiceStub`` on a grpc.aio channel, one-row
PredictRequests built ahead of time), a 1 s warm-up and then ``--seconds``
measured, and reads the CPU time every process used in the window from
``/proc``.  A round is: concurrency 1 and 8 on each of the three targets,
then concurrency 64 on each router over gRPC and over REST (aiohttp, keep-
alive); ``--rounds`` rounds, targets taking turns, so background noise hits
them alike.  Every step checks one answer first against the direct worker's.

Prints a table per step, then the medians over rounds: latency, req/s, and
CPU per request (ms of CPU of the router process, and of the worker process,
divided by the requests answered; at concurrency 1 a worker call is one
request).  The figures: the router's added p50 at c=1 (router - direct, the
median of each round's difference), the router's CPU per request at c=1 and
at c=64 (REST and gRPC), and the worker's CPU per batch-1 call over frames
and over gRPC.  Exits 1 if any request failed.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.bench_worker import predict_requests
from loadtest.common import (
    GRPC_OPTIONS,
    ListeningProcess,
    LoadResult,
    RouterProcess,
    bench_parser,
    parse_bench_args,
    start_router,
    closed_loop,
    error_text,
    print_table,
    process_cmdline,
    progress,
    run_async,
    start_worker,
)

MODEL_NAME = "ctr"
OUTPUTS = ("logit", "probability")
WARMUP_S = 1.0
LOW = (1, 8)  # every target, gRPC
HIGH = 64  # the routers, gRPC and REST
TARGETS = {"p50_added_ms": 0.3, "router_cpu_c1_ms": 0.3, "router_cpu_rest_ms": 0.2, "router_cpu_grpc_ms": 0.22,
           "worker_cpu_ms": 0.6}
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
    open_channel: Callable[[], Any] | None = None,
    fresh_channel: Callable[[], Any] | None = None,
) -> LoadResult:
    """One checked request, then a closed loop of batch-1 Predicts on one grpc.aio channel
    (``open_channel()``, default plaintext to ``address``), or with ``fresh_channel`` each call on
    a new channel it opens (a connection and, over TLS, a handshake per call)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    opener = open_channel or (lambda: grpc.aio.insecure_channel(address, options=GRPC_OPTIONS))
    async with opener() as channel:
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

        async def connect_and_call() -> None:
            assert fresh_channel is not None
            async with fresh_channel() as fresh:
                await prediction_service_pb2_grpc.PredictionServiceStub(fresh).Predict(next(feeds), timeout=30)

        return await closed_loop(call if fresh_channel is None else connect_and_call, concurrency=concurrency,
                                 seconds=seconds, warmup=WARMUP_S,
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


@dataclass
class Target:
    label: str
    grpc: str
    pids: dict[str, int | None]
    rest: str = ""
    checked: bool = True  # its answers are the model's (the fixed-reply server's are not)


async def measure(targets: Sequence[Target], rounds: int, seconds: float) -> list[tuple[int, LoadResult]]:
    """(round, result) of every step."""
    from loadtest.bench_batching import rest_bodies, rest_phase

    requests = predict_requests(1)
    bodies = rest_bodies()
    expect = await grpc_answer(targets[0].grpc, requests[0])
    plan: list[tuple[str, Target, int]] = []
    for c in LOW:
        plan += [("grpc", t, c) for t in targets if t.checked]
    plan += [(proto, t, HIGH) for t in targets if t.rest for proto in ("grpc", "rest")]
    plan += [("grpc", t, c) for t in targets if not t.checked for c in (1, HIGH)]
    results = []
    step = 0
    for rnd in range(1, rounds + 1):
        for proto, t, c in plan:
            step += 1
            name = t.label + (" REST" if proto == "rest" else "")
            progress(f"[{step}/{rounds * len(plan)}] round {rnd}: {name} c={c} "
                     f"({WARMUP_S:g}s warm-up + {seconds:g}s) ...")
            if proto == "rest":
                r = await rest_phase(f"{t.rest}/v1/models/{MODEL_NAME}:predict", bodies, label=name, concurrency=c,
                                     seconds=seconds, cpu_pids=t.pids, expect=expect)
            else:
                r = await grpc_phase(t.grpc, requests, label=name, concurrency=c, seconds=seconds,
                                     cpu_pids=t.pids, expect=expect if t.checked else None)
            progress(f"  {r.rate:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                     f"router {cpu_ms(r, 'router'):.3f} ms CPU/request, {r.error_count} errors")
            results.append((rnd, r))
    return results


def cpu_ms(r: LoadResult, process: str) -> float:
    """ms of CPU ``process`` used per request answered in the window."""
    cores = r.cpu.get(process, float("nan"))
    return cores / r.rate * 1000 if r.rate and r.rate == r.rate else float("nan")


def median(values: Sequence[float]) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def report(results: Sequence[tuple[int, LoadResult]], worker_flags: Sequence[str], seconds: float,
           rounds: int) -> str:
    print(f"model {MODEL_NAME}; {os.cpu_count()} CPUs; {rounds} rounds, {seconds:g}s per step after {WARMUP_S:g}s "
          f"warm-up; official grpc.aio client on {loop_name()} (REST: aiohttp), batch 1, closed loop")
    print(f"router: --workers 1 (coalescing on), worker transport frames (router) or gRPC (router/grpc); "
          f"workers: {' '.join(worker_flags) or 'default flags'}")
    headers = ["round", "target", "conc", "calls", "req/s", "p50 ms", "p99 ms", "errors",
               "client cpu", "router cpu", "worker cpu", "router ms/req", "worker ms/req"]
    print_table(headers, [[rnd, r.label, r.concurrency, r.calls, r.rate, r.p50_ms, r.p99_ms, r.error_count,
                           *cpu_columns(r)[:3], cpu_ms(r, "router"), cpu_ms(r, "worker")]
                          for rnd, r in results])
    print("(cpu: cores used in the measured window; ms/req: ms of that process's CPU per request answered)")
    print_errors([r for _, r in results])
    by: dict[tuple[str, int], list[LoadResult]] = {}
    for _, r in results:
        by.setdefault((r.label, r.concurrency), []).append(r)
    rows = []
    for (label, c), rs in by.items():
        rows.append([label, c, median([r.rate for r in rs]), median([r.p50_ms for r in rs]),
                     median([r.p99_ms for r in rs]), median([cpu_ms(r, "router") for r in rs]),
                     median([cpu_ms(r, "worker") for r in rs])])
    print(f"medians over {rounds} rounds:")
    print_table(["target", "conc", "req/s", "p50 ms", "p99 ms", "router ms/req", "worker ms/req"], rows)

    def added(label: str, c: int) -> float:
        pairs = zip(by[label, c], by["direct", c])
        return median([r.p50_ms - d.p50_ms for r, d in pairs])

    def cpu(label: str, c: int, process: str) -> float:
        return median([cpu_ms(r, process) for r in by[label, c]])

    print("added by the router (router - direct, median of the rounds' differences):")
    for label in ("router", "router/grpc"):
        for c in LOW:
            pairs = list(zip(by[label, c], by["direct", c]))
            print(f"  {label} c={c}: p50 {signed_ms(median([r.p50_ms - d.p50_ms for r, d in pairs]))}, "
                  f"p99 {signed_ms(median([r.p99_ms - d.p99_ms for r, d in pairs]))}")
    figures = {
        "p50_added_ms": added("router", 1),
        "router_cpu_c1_ms": cpu("router", 1, "router"),
        "router_cpu_rest_ms": cpu("router REST", HIGH, "router"),
        "router_cpu_grpc_ms": cpu("router", HIGH, "router"),
        "worker_cpu_ms": cpu("router", 1, "worker"),
    }
    met = [k for k, v in figures.items() if v <= TARGETS[k]]
    print(f"floor: a grpc.aio server answering every Predict with fixed bytes (loadtest.fixed_reply, no parsing) "
          f"uses {cpu('fixed-reply', 1, 'router'):.3f} ms of CPU per request at c=1, "
          f"{cpu('fixed-reply', HIGH, 'router'):.3f} ms at c={HIGH}")
    print(f"over gRPC to the worker instead (workers.transport: grpc): added p50 at c=1 "
          f"{signed_ms(added('router/grpc', 1))}, router CPU/request c=1 {cpu('router/grpc', 1, 'router'):.3f} ms, "
          f"c={HIGH} REST {cpu('router/grpc REST', HIGH, 'router'):.3f} ms, gRPC {cpu('router/grpc', HIGH, 'router'):.3f} ms, "
          f"worker CPU per call {cpu('router/grpc', 1, 'worker'):.3f} ms; direct worker CPU per call "
          f"{cpu('direct', 1, 'worker'):.3f} ms")
    return (f"router hop: added p50 at c=1 {signed_ms(figures['p50_added_ms'])} (target <= +0.3); router CPU per "
            f"request c=1 {figures['router_cpu_c1_ms']:.3f} ms (<= 0.3), c={HIGH} REST "
            f"{figures['router_cpu_rest_ms']:.3f} ms (<= 0.2), gRPC {figures['router_cpu_grpc_ms']:.3f} ms (<= 0.22); "
            f"worker CPU per batch-1 call over frames {figures['worker_cpu_ms']:.3f} ms (<= 0.6); "
            f"{len(met)} of {len(figures)} targets met")


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("python -m loadtest.bench_router", __doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, targets taking turns (default 3)")
    args = parse_bench_args(parser, argv)  # fails early without `make demo`
    model_dir = args.model_dir
    base = {"models": [{"name": MODEL_NAME, "base_path": str(model_dir)}], "workers": {"count": 1}}
    routers: list[tuple[str, RouterProcess]] = []
    direct = fixed = None
    try:
        import tensorflow  # noqa: F401  (loads while the routers' workers do)

        for label, transport in (("router", "auto"), ("router/grpc", "grpc")):
            config = {**base, "workers": {"count": 1, "transport": transport}}
            routers.append((label, start_router(config, label, workers=1, timeout=180)))
        (router_worker,) = routers[0][1].worker_pids()
        flags = matched_flags(process_cmdline(router_worker))
        progress("starting the direct worker with the same flags ...")
        direct = start_worker({MODEL_NAME: model_dir}, *flags)
        ready = direct.wait_serving()
        progress(f"direct worker pid {direct.pid} on {direct.address} SERVING ({ready:.1f}s)")
        targets = [Target("direct", direct.address, {"client": None, "worker": direct.pid})]
        for label, router in routers:
            (worker,) = router.worker_pids()
            targets.append(Target(label, router.grpc_address, {"client": None, "router": router.pid,
                                                               "worker": worker}, router.rest_url))
        progress("starting the fixed-reply gRPC server (the floor of a grpc.aio front) ...")
        fixed = ListeningProcess("loadtest.fixed_reply")
        targets.append(Target("fixed-reply", fixed.address, {"client": None, "router": fixed.pid}, checked=False))
        results = run_async(measure(targets, args.rounds, args.seconds))
    finally:
        if fixed is not None:
            progress(fixed.stop("fixed-reply server"))
        for label, router in routers:
            progress(f"[{label}] {router.stop()}")
        if direct is not None:
            progress(direct.stop("direct worker"))

    headline = report(results, flags, args.seconds, args.rounds)
    print(headline)
    return 1 if any(r.error_count for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
