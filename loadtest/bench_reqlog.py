"""What request logging costs: the same router with no log, 1% and 100% of requests logged, side by side.

    python -m loadtest.bench_reqlog [--seconds 5] [--rounds 3] [--model-dir models/ctr]

Starts, in one run on the same machine, three routers, each ``python -m router
serve`` with one spawned worker and the demo model: ``none`` (no logging),
``1%`` and ``100%`` (``models[].logging`` with that ``sampling_rate``, files
under a temporary directory removed at the end).  Only the one being
measured gets load: gRPC Predict at concurrency 64 under ``h2load`` (a C
client: 8 connections, 8 calls in flight on each; see bench_processes), 1 s
of warm-up then ``--seconds`` measured; ``--rounds`` rounds, the routers
taking turns.  Failures at the gRPC level are read from the router's
metrics, and so are the records each log wrote and dropped.

Prints each step, the medians over rounds, and the ratios to ``none`` (req/s
and p99).  The last line is the figure; the target (issue 21) is at most 3%
fewer req/s at 1%.  Exits 1 if any request failed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from loadtest.bench_processes import grpc_failures, h2load
from loadtest.bench_rollout import machine_busy_s
from loadtest.bench_router import MODEL_NAME, WARMUP_S, median
from loadtest.bench_worker import predict_requests
from loadtest.common import RouterProcess, bench_parser, parse_bench_args, print_table, progress, ratio, start_router

RATES = {"none": 0.0, "1%": 0.01, "100%": 1.0}
TARGET_1PCT = 0.97  # req/s at 1% over req/s with no log


def logged(router: RouterProcess) -> tuple[float, float]:
    """(records written, records dropped) by the router's request logs."""
    written = dropped = 0.0
    for name, _, value in router.metrics():
        if name == "tfs_router_request_log_records_total":
            written += value
        elif name == "tfs_router_request_log_dropped_total":
            dropped += value
    return written, dropped


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("python -m loadtest.bench_reqlog", __doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the routers taking turns (default 3)")
    args = parse_bench_args(parser, argv)
    if shutil.which("h2load") is None:
        parser.error("h2load is not installed (make bench-reqlog installs it: apt-get install nghttp2-client)")
    logs = Path(tempfile.mkdtemp(prefix="tfs-reqlog-"))
    routers: dict[str, RouterProcess] = {}
    rows: list[tuple[str, float, float, float, float, int]] = []  # label, req/s, p50, p99, cores, errors
    try:
        for label, rate in RATES.items():
            model = {"name": MODEL_NAME, "base_path": str(args.model_dir)}
            if rate:
                model["logging"] = {"sampling_rate": rate, "filename_prefix": str(logs / label.rstrip("%") / "ctr")}
            routers[label] = start_router({"models": [model], "workers": {"count": 1}}, label, workers=1,
                                          timeout=180)
        request = predict_requests(1)[0]
        n = 0
        for rnd in range(1, args.rounds + 1):
            for label, router in routers.items():
                n += 1
                progress(f"[{n}/{args.rounds * len(routers)}] round {rnd}: {label} grpc c=64 "
                         f"({WARMUP_S:g}s warm-up + {args.seconds:g}s) ...")
                h2load(router.grpc_address, request, WARMUP_S)
                failed0, busy0, t0 = grpc_failures(router), machine_busy_s(), time.monotonic()
                rate_s, p50, p99, errors = h2load(router.grpc_address, request, args.seconds)
                cores = (machine_busy_s() - busy0) / (time.monotonic() - t0)
                errors += int(grpc_failures(router) - failed0)
                rows.append((label, rate_s, p50, p99, cores, errors))
                progress(f"  {rate_s:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, machine {cores:.2f} cores, "
                         f"{errors} errors")
        written = {label: logged(r) for label, r in routers.items()}
    finally:
        for label, r in routers.items():
            progress(f"[{label}] {r.stop()}")
        shutil.rmtree(logs, ignore_errors=True)

    def med(label: str, i: int) -> float:
        return median([row[i] for row in rows if row[0] == label])

    print("medians over rounds:")
    print_table(["logging", "req/s", "p50 ms", "p99 ms", "machine cores", "records written", "dropped"],
                [[label, f"{med(label, 1):,.0f}", f"{med(label, 2):.2f}", f"{med(label, 3):.2f}",
                  f"{med(label, 4):.2f}", f"{written[label][0]:,.0f}", f"{written[label][1]:,.0f}"]
                 for label in RATES])
    one, every = (ratio(med(x, 1), med("none", 1)) for x in ("1%", "100%"))
    p99_one, p99_every = (ratio(med(x, 3), med("none", 3)) for x in ("1%", "100%"))
    print(f"target: logging 1% costs at most {1 - TARGET_1PCT:.0%} of req/s")
    print(f"request logging / none (gRPC c=64): 1% req/s {one:.3f}x (p99 {p99_one:.2f}x), 100% req/s {every:.3f}x "
          f"(p99 {p99_every:.2f}x); 1% target {'met' if one >= TARGET_1PCT else 'missed'}")
    return 0 if not any(row[5] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
