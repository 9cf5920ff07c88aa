"""What the shared state costs: an admin write reaching every replica, and the request path beside it.

    python -m loadtest.bench_state [--writes 100] [--replicas 3] [--seconds 3] [--model-dir models/ctr]

Starts a real etcd member (Debian's ``etcd-server``; ``make bench-state``
installs it) and ``--replicas`` routers on it (``state.backend: etcd``, one
spawned worker each, the demo model's versions split 90/10 by a sticky
header), plus one router with ``state.backend: none`` for comparison.

1. Propagation: ``--writes`` canary weights set through replica 0's admin
   API, one after another (each a different weight); for each, the time from
   sending the write until every other replica's status shows it (polled
   back to back).  p50, p99 and max.
2. The request path: the routing state is read from memory, never from the
   store, per request; measured anyway: gRPC concurrency 1 against replica 0
   and against the ``none`` router, turn about, three rounds of
   ``--seconds``; p50 of each and the difference.

The last line is the figure.  Exits 1 if a write failed or never arrived.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench_router import MODEL_NAME, grpc_phase, median
from loadtest.bench_worker import predict_requests
from loadtest.common import RouterProcess, bench_parser, parse_bench_args, percentile, progress, run_async, start_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_etcd(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = free_port(), free_port()
    endpoint = f"127.0.0.1:{client}"
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(data), "--name", "b", "--listen-client-urls", f"http://{endpoint}",
         "--advertise-client-urls", f"http://{endpoint}", "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}", "--initial-cluster",
         f"b=http://127.0.0.1:{peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", client), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("etcd did not start")


def admin(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else
                                 (b"" if method == "POST" else None), method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def weights(base: str) -> dict[str, int]:
    _, status = admin(base + "/v1/admin/status")
    result: dict[str, int] = status["models"][0]["routing"]["weights"]
    return result


def propagation(bases: Sequence[str], writes: int) -> tuple[list[float], int]:
    """Seconds from each write through bases[0] until every other replica shows it; failed writes."""
    times, failed = [], 0
    for i in range(writes):
        weight = 11 + (i * 37) % 78  # a different weight every time
        t0 = time.perf_counter()
        code, body = admin(bases[0] + f"/v1/admin/models/{MODEL_NAME}/canary", "POST", {"weight": weight})
        if code != 200:
            failed += 1
            progress(f"  write {i}: {code} {body}")
            continue
        want = weights(bases[0])
        pending = list(bases[1:])
        deadline = t0 + 30
        while pending and time.perf_counter() < deadline:
            pending = [b for b in pending if weights(b) != want]
        if pending:
            failed += 1
            progress(f"  write {i}: never reached {pending}")
            continue
        times.append(time.perf_counter() - t0)
        if (i + 1) % 20 == 0:
            progress(f"  {i + 1}/{writes} writes, last {times[-1] * 1000:.1f} ms")
    return times, failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("python -m loadtest.bench_state", __doc__)
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=3)
    args = parse_bench_args(parser, argv)
    if shutil.which("etcd") is None:
        parser.error("etcd is not installed (make bench-state installs Debian's etcd-server)")
    data = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
    etcd, endpoint = start_etcd(data)
    model = {"name": MODEL_NAME, "base_path": str(args.model_dir), "version_policy": "all",
             "routing": {"split": {"1": 90, "2": 10}, "sticky_header": "x-user"}}
    base: dict[str, Any] = {"models": [model], "workers": {"count": 1}, "admin": {"port": 0}}
    routers: list[RouterProcess] = []
    try:
        for i in range(args.replicas):
            routers.append(start_router({**base, "state": {"backend": "etcd", "endpoints": [endpoint],
                                                           "prefix": "/bench/"}}, f"replica {i}", workers=1,
                                        timeout=180))
        plain = start_router({**base, "state": {"backend": "none"}}, "state none", workers=1, timeout=180)
        routers.append(plain)
        bases = []
        for r in routers[:args.replicas]:
            url = r.admin_url()
            assert url is not None
            bases.append(url.rsplit("/v1/", 1)[0])
        progress(f"[propagation] {args.writes} writes through replica 0, {args.replicas - 1} others watching ...")
        times, failed = propagation(bases, args.writes)
        requests = predict_requests(1)

        async def request_path() -> tuple[list[float], list[float]]:
            etcd_p50, none_p50 = [], []
            for rnd in range(3):
                for label, r, out in (("etcd", routers[0], etcd_p50), ("none", plain, none_p50)):
                    res = await grpc_phase(r.grpc_address, requests, label=label, concurrency=1,
                                           seconds=args.seconds, cpu_pids={})
                    out.append(res.p50_ms)
                    progress(f"  round {rnd + 1}: state {label}: p50 {res.p50_ms:.3f} ms")
            return etcd_p50, none_p50

        progress("[request path] gRPC c=1, the etcd replica against the router without a store ...")
        etcd_p50, none_p50 = run_async(request_path())
    finally:
        for r in routers:
            progress(f"{r.stop()}")
        etcd.terminate()
        etcd.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    ordered = sorted(times)
    ms = [t * 1000 for t in ordered]
    print(f"propagation over {len(times)} writes to {args.replicas} replicas: p50 {percentile(ms, 50):.1f} ms, "
          f"p99 {percentile(ms, 99):.1f} ms, max {ms[-1] if ms else float('nan'):.1f} ms; {failed} failed")
    print(f"request path c=1 p50: etcd replica {median(etcd_p50):.3f} ms, no store {median(none_p50):.3f} ms")
    print(f"state store: an admin write reaches every replica in p50 {percentile(ms, 50):.1f} ms / p99 "
          f"{percentile(ms, 99):.1f} ms; request path {median(etcd_p50) - median(none_p50):+.3f} ms p50")
    return 0 if not failed and times else 1


if __name__ == "__main__":
    sys.exit(main())
