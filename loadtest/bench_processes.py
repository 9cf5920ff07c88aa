"""The data plane on every core: one router process against several, side by side.

    python -m loadtest.bench_processes [--seconds 5] [--rounds 3] [--processes N] [--model-dir models/ctr]

Starts, in one run on the same machine, two routers, each ``python -m router
serve`` with two spawned workers and the demo model:

* ``1 process``: ``dataplane.processes: 1`` (one process serves everything);
* ``N processes``: ``dataplane.processes: N`` (``--processes``; default one
  per CPU, at least 2): the control plane and N data-plane processes sharing
  the ports.

Both stay up; only the one being measured gets load.  A round is, for each
router in turn: REST at concurrency 64 under ``wrk`` (2 threads, keep-alive,
a one-row Predict body), gRPC at concurrency 64 under ``h2load`` (8
connections with 8 calls in flight on each, the same request framed as gRPC;
its failures at the gRPC level are read from the router's metrics), and gRPC
at concurrency 1 with the official client (latency).  Both load generators are
written in C, as a production client would be measured: the official Python
client at c=64 takes half of this machine's two cores itself, and the
router's processes would compete with it rather than with the load.  ``make
bench-processes`` installs Debian's wrk and nghttp2-client (h2load).  Each step runs 1 s of warm-up, then
``--seconds`` measured, and reads the machine's busy CPU from ``/proc/stat``
over the step.  ``--rounds`` rounds, the routers taking turns.

Prints each step, then the medians over rounds and the ratios (N processes /
1 process): REST req/s and p99, gRPC c=64 req/s, and the c=1 p50 difference,
with the machine's CPU use (cores of 2) in both.  The last line is the
figure.  Exits 1 if any request failed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadtest.bench_rollout import machine_busy_s
from loadtest.bench_router import MODEL_NAME, WARMUP_S, grpc_answer, grpc_phase, median, print_errors
from loadtest.bench_worker import predict_requests
from loadtest.common import (
    RouterProcess,
    bench_parser,
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


def h2load(address: str, request: Any, seconds: float, connections: int = CHANNELS,
           streams: int = 8) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, failed) of gRPC Predict calls from ``h2load`` (a C HTTP/2 client: the
    official Python client would take half a core itself): ``connections`` connections with ``streams``
    calls in flight on each, the one request framed as gRPC.  A call that failed at the gRPC level still
    has HTTP status 200: :func:`grpc_failures` counts those from the router's metrics."""
    raw = request.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "log"
        body.write_bytes(b"\0" + len(raw).to_bytes(4, "big") + raw)
        out = subprocess.run(
            ["h2load", "-D", f"{seconds:g}", "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(body),
             "--log-file", str(log), "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://{address}/tensorflow.serving.PredictionService/Predict"],
            capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
        # per call: start (us since the epoch), HTTP status, microseconds to the end of the response
        times = sorted(int(line.split()[2]) / 1e3 for line in log.read_text().splitlines() if line.strip())
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    assert done is not None, out
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] if times else float("nan")

    return rate, pct(0.50), pct(0.99), sum(int(g) for g in done.groups()[1:])


def grpc_failures(router: RouterProcess) -> float:
    """gRPC calls the router answered with an error, from its metrics (every process's)."""
    return sum(value for name, labels, value in router.metrics()
               if name == "tfs_router_requests_total" and labels.get("protocol") == "grpc"
               and labels.get("code") != "OK")


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
            elif kind == "grpc c=64":
                h2load(router.grpc_address, requests[0], WARMUP_S)
                failed0, busy0, t0 = grpc_failures(router), machine_busy_s(), time.monotonic()
                rate, p50, p99, errors = h2load(router.grpc_address, requests[0], seconds)
                errors += int(grpc_failures(router) - failed0)
            else:
                busy0, t0 = machine_busy_s(), time.monotonic()
                r = await grpc_phase(router.grpc_address, requests, label=label, concurrency=1, seconds=seconds,
                                     cpu_pids={}, expect=expect)
                print_errors([r])
                rate, p50, p99, errors = r.rate, r.p50_ms, r.p99_ms, r.error_count
            cores = (machine_busy_s() - busy0) / (time.monotonic() - t0)
            step = Step(label, kind, rate, p50, p99, cores, errors)
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
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the routers taking turns (default 5)")
    parser.add_argument("--processes", type=int, default=0,
                        help="data-plane processes of the second router (default: one per CPU, at least 2)")
    args = parse_bench_args(parser, argv)
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make bench-processes installs it: apt-get install {package})")
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
