"""The data plane on every core: one router process against several, side by side.

    python -m loadtest.bench_processes [--seconds 5] [--rounds 3] [--processes N] [--model-dir models/ctr]

Starts, in one run on the same machine, two routers, each ``python -m router
serve`` with two spawned workers and the demo model:

* ``1 process``: ``dataplane.processes: 1`` (one process serves everything);
* ``N processes``: ``dataplane.processes: N`` (``--processes``; default one
  per CPU, at least 2): the control plane and N data-plane processes sharing
  the ports.

Both stay up; only the one being measured gets load.  A round is, for each
router in turn: REST at concurrency 64 under ``wrk`` (``make bench-processes``
installs Debian's wrk; 2 threads, keep-alive, a one-row Predict body), gRPC
at concurrency 64 over 8 channels (the official client on grpc.aio, each
channel its own connection: one connection stays on one process), and gRPC
at concurrency 1 (latency).  Each step runs 1 s of warm-up, then
``--seconds`` measured, and reads the machine's busy CPU from ``/proc/stat``
over the step.  ``--rounds`` rounds, the routers taking turns.

Prints each step, then the medians over rounds and the ratios (N processes /
1 process): REST req/s and p99, gRPC c=64 req/s, and the c=1 p50 difference,
with the machine's CPU use (cores of 2) in both.  The last line is the
figure.  Exits 1 if any request failed.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import orjson

from loadtest.bench_rollout import machine_busy_s
from loadtest.bench_router import MODEL_NAME, WARMUP_S, grpc_answer, grpc_phase, median, print_errors
from loadtest.bench_worker import predict_requests
from loadtest.common import (
    GRPC_OPTIONS,
    LoadResult,
    RouterProcess,
    bench_parser,
    closed_loop,
    parse_bench_args,
    print_table,
    progress,
    ratio,
    run_async,
    start_router,
)

TARGETS = {"rest_rate": 1.4, "grpc_rate": 1.3, "c1_p50_added_ms": 0.05}
CHANNELS = 8


class Step:
    """One measured step: req/s, p50/p99 ms, the machine's cores in use, errors."""

    def __init__(self, label: str, kind: str, rate: float, p50: float, p99: float, cores: float,
                 errors: int, detail: str = "") -> None:
        self.label, self.kind, self.rate, self.p50, self.p99 = label, kind, rate, p50, p99
        self.cores, self.errors, self.detail = cores, errors, detail


def _wrk_ms(text: str) -> float:
    value, unit = float(text[:-2] if text.endswith(("ms", "us")) else text[:-1]), text.lstrip("0123456789.")
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, body: bytes, seconds: float, connections: int = 64) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, non-2xx + socket errors) of a ``wrk`` POST run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {orjson.dumps(body.decode()).decode()}\n'
                'wrk.headers["Content-Type"] = "application/json"\n')
        script = f.name
    try:
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", script, url],
                             capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(script)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _wrk_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _wrk_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return rate, p50, p99, errors


async def grpc_spread(address: str, requests: Sequence[Any], seconds: float, concurrency: int = 64) -> LoadResult:
    """Closed loop of ``concurrency`` calls over ``CHANNELS`` channels, each its own connection."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS)]
    try:
        stubs = itertools.cycle([prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels])
        feeds = itertools.cycle(requests)

        async def call() -> None:
            await next(stubs).Predict(next(feeds), timeout=30)

        return await closed_loop(call, concurrency=concurrency, seconds=seconds, warmup=WARMUP_S,
                                 label=f"grpc c={concurrency}")
    finally:
        for c in channels:
            await c.close()


def rest_body() -> bytes:
    from loadtest.bench_worker import input_sets

    row = {k: v[0].tolist() for k, v in input_sets(1)[0].items()}
    return orjson.dumps({"instances": [row]})


async def measure(routers: Sequence[tuple[str, RouterProcess]], rounds: int, seconds: float) -> list[Step]:
    requests = predict_requests(1)
    body = rest_body()
    expect = await grpc_answer(routers[0][1].grpc_address, requests[0])
    steps: list[Step] = []
    plan = [(kind, label, r) for kind in ("rest c=64", "grpc c=64", "grpc c=1") for label, r in routers]
    n = 0
    for rnd in range(1, rounds + 1):
        for kind, label, router in plan:
            n += 1
            progress(f"[{n}/{rounds * len(plan)}] round {rnd}: {label} {kind} ({WARMUP_S:g}s warm-up + {seconds:g}s) ...")
            url = f"{router.rest_url}/v1/models/{MODEL_NAME}:predict"
            if kind == "rest c=64":
                wrk(url, body, WARMUP_S)
                busy0, t0 = machine_busy_s(), time.monotonic()
                rate, p50, p99, errors = wrk(url, body, seconds)
                cores = (machine_busy_s() - busy0) / (time.monotonic() - t0)
                step = Step(label, kind, rate, p50, p99, cores, errors)
            else:
                busy0, t0 = machine_busy_s(), time.monotonic()
                if kind == "grpc c=64":
                    r = await grpc_spread(router.grpc_address, requests, seconds)
                else:
                    r = await grpc_phase(router.grpc_address, requests, label=label, concurrency=1, seconds=seconds,
                                         cpu_pids={}, expect=expect)
                cores = (machine_busy_s() - busy0) / (time.monotonic() - t0)
                print_errors([r])
                step = Step(label, kind, r.rate, r.p50_ms, r.p99_ms, cores, r.error_count)
            progress(f"  {step.rate:,.0f} req/s, p50 {step.p50:.2f} ms, p99 {step.p99:.2f} ms, machine "
                     f"{step.cores:.2f} cores, {step.errors} errors")
            steps.append(step)
    return steps


def report(steps: Sequence[Step], labels: Sequence[str]) -> tuple[str, bool]:
    kinds = ("rest c=64", "grpc c=64", "grpc c=1")

    def med(label: str, kind: str, attr: str) -> float:
        return median([getattr(s, attr) for s in steps if s.label == label and s.kind == kind])

    print("medians over rounds:")
    print_table(["step", "router", "req/s", "p50 ms", "p99 ms", "machine cores"],
                [[k, label, f"{med(label, k, 'rate'):,.0f}", f"{med(label, k, 'p50'):.2f}",
                  f"{med(label, k, 'p99'):.2f}", f"{med(label, k, 'cores'):.2f}"] for k in kinds for label in labels])
    one, many = labels
    rest_rate = ratio(med(many, "rest c=64", "rate"), med(one, "rest c=64", "rate"))
    rest_p99 = ratio(med(many, "rest c=64", "p99"), med(one, "rest c=64", "p99"))
    grpc_rate = ratio(med(many, "grpc c=64", "rate"), med(one, "grpc c=64", "rate"))
    c1_added = med(many, "grpc c=1", "p50") - med(one, "grpc c=1", "p50")
    met = [rest_rate >= TARGETS["rest_rate"] and rest_p99 <= 1.0, grpc_rate >= TARGETS["grpc_rate"],
           c1_added <= TARGETS["c1_p50_added_ms"]]
    print(f"targets: REST c=64 req/s >= {TARGETS['rest_rate']}x with p99 no worse; gRPC c=64 req/s >= "
          f"{TARGETS['grpc_rate']}x; c=1 p50 at most +{TARGETS['c1_p50_added_ms']} ms")
    line = (f"{many} / {one}: REST c=64 {rest_rate:.2f}x req/s (p99 {rest_p99:.2f}x), gRPC c=64 {grpc_rate:.2f}x, "
            f"c=1 p50 {c1_added:+.3f} ms; machine {med(one, 'rest c=64', 'cores'):.2f} -> "
            f"{med(many, 'rest c=64', 'cores'):.2f} cores (REST); {sum(met)} of 3 targets met")
    return line, not any(s.errors for s in steps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("python -m loadtest.bench_processes", __doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the routers taking turns (default 3)")
    parser.add_argument("--processes", type=int, default=0,
                        help="data-plane processes of the second router (default: one per CPU, at least 2)")
    args = parse_bench_args(parser, argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (make bench-processes installs it: apt-get install wrk)")
    from router.procs import resolve_count

    count = args.processes or max(2, resolve_count(0))  # at least 2: a comparison

    base = {"models": [{"name": MODEL_NAME, "base_path": str(args.model_dir)}], "workers": {"count": 2}}
    labels = ("1 process", f"{count} processes")
    routers: list[tuple[str, RouterProcess]] = []
    try:
        for label, n in zip(labels, (1, count)):
            routers.append((label, start_router({**base, "dataplane": {"processes": n}}, label, workers=2,
                                                timeout=180)))
        steps = run_async(measure(routers, args.rounds, args.seconds))
    finally:
        for label, r in routers:
            progress(f"[{label}] {r.stop()}")
    line, ok = report(steps, labels)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
