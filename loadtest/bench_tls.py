"""What TLS costs on the router's gRPC listener: the same router with and without it, side by side.

    python -m loadtest.bench_tls [--seconds 5] [--rounds 3] [--model-dir models/ctr]

Starts, in one run on the same machine, two routers, each ``python -m router
serve`` with one spawned worker (``workers: {count: 1}``) and its defaults:

* ``plaintext``: as is;
* ``TLS``: with the top-level ``tls`` block (server TLS on the gRPC, REST and
  admin listeners, no client certificates) from a certificate for
  ``localhost`` and ``127.0.0.1`` that ``trustme`` makes in a temporary
  directory for this run.

Both stay up; only the one being measured gets load.  A round is, for
each router in turn: concurrency 1 and concurrency 64 on one channel
(the official client: ``PredictionServiceStub`` on a grpc.aio channel,
insecure or with ``ssl_channel_credentials`` trusting the run's CA; one-row
PredictRequests built ahead of time; as ``bench_router``'s gRPC steps), then
``connect``: one call at a time, each on a new channel (its own TCP
connection, and for TLS its own full handshake), to show what a handshake
costs.  Each step checks one answer first (against the plaintext router's),
then runs a closed loop: 1 s of warm-up and ``--seconds`` measured, with the
CPU time the client, router and worker processes used in the window read
from ``/proc``.  ``--rounds`` rounds, the two routers taking turns, so
background noise hits them alike.

Prints a table per step, then the medians over rounds (req/s, p50, p99, ms of
CPU per request of the router, client and worker processes) and the ratios
TLS / plaintext (the median of each round's ratio).  The last line is the
figure: TLS's p50 at c=1, req/s at c=64 and router CPU per request at c=64,
as ratios to plaintext, and what a new connection adds.  Exits 1 if any
request failed.

Where the cost goes (two runs of this benchmark on 2 cores, and ``perf
record`` of each router at c=1 and c=64): the handshake happens once per
connection, so on a persistent channel what is left is record encryption and
decryption (AES-GCM, hardware accelerated) inside grpc's C core, and the
router's CPU per request shows it: +0.005 to +0.013 ms (0.64 ms at c=1, 0.21
ms at c=64: 1-4%, the size of the round-to-round spread); p50 at c=1 moved by
0-3%.  A one-row request is ~260 bytes and its answer 84, so there is little
to encrypt: in the profile, the AES-GCM code (the two blocks of AES and
carry-less-multiply instructions in the stripped ``cygrpc`` library) was
0.1-0.2% of the TLS router's samples, and ``cygrpc`` as a whole held the
same share (17-18%) with and without TLS; the rest is the kernel (~38%:
sockets, epoll, wake-ups) and the interpreter (~30%), alike in both.  At
c=64 the machine is saturated (client, router and worker share the 2
cores), so req/s falls by what both ends of the connection add: the client
+0.01 ms per request as well, together ~5% of the ~0.33 ms of CPU a request
costs all three processes, against 4-6% fewer req/s.  What TLS does cost is
a new connection: TCP, the handshake (an ECDSA certificate) and the first
call took +0.9 to +1.0 ms p50, +0.4 to +0.5 ms of router CPU and +0.6 to
+0.7 ms of client CPU over plaintext's (``connect``): a client that
reconnects per call pays that on every call, a long-lived channel once.
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.bench_router import (
    MODEL_NAME,
    WARMUP_S,
    cpu_ms,
    grpc_answer,
    grpc_phase,
    loop_name,
    median,
    print_errors,
    times,
)
from loadtest.bench_worker import predict_requests
from loadtest.common import (
    GRPC_OPTIONS,
    LoadResult,
    RouterProcess,
    bench_parser,
    parse_bench_args,
    print_table,
    progress,
    ratio,
    run_async,
    start_router,
)

PLAIN, TLS = "plaintext", "TLS"
CONCURRENCY = (1, 64)  # calls in flight on one channel (as bench_router's gRPC steps)
CONNECT = "connect"  # the step whose every call opens a new channel
PROCESSES = ("router", "client", "worker")
# Each connect-step channel its own connection: grpc shares a connection between channels with the
# same target and arguments through its global subchannel pool.
CONNECT_OPTIONS = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Target:
    label: str
    address: str
    root_ca: bytes | None  # PEM: TLS, trusting this CA; None: plaintext
    pids: dict[str, int | None]

    def channel(self, options: Sequence[tuple[str, Any]] = GRPC_OPTIONS) -> Any:
        import grpc

        if self.root_ca is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_ca)
        return grpc.aio.secure_channel(self.address, credentials, options=options)


def make_certificates(directory: Path) -> tuple[dict[str, str], bytes]:
    """A server certificate for localhost and 127.0.0.1: (the router's ``tls`` block, the CA's PEM)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"cert_file": str(cert_file), "key_file": str(key_file)}, ca.cert_pem.bytes()


async def step(target: Target, requests: Sequence[Any], concurrency: int | str, seconds: float,
               expect: Any) -> LoadResult:
    """One checked call, then a closed loop: ``concurrency`` calls in flight on one channel, or
    (``CONNECT``) one call at a time, each on a new channel."""
    connect = concurrency == CONNECT
    return await grpc_phase(target.address, requests, label=f"{target.label} {CONNECT}" if connect else target.label,
                            concurrency=1 if connect else int(concurrency), seconds=seconds, cpu_pids=target.pids,
                            expect=expect, open_channel=target.channel,
                            fresh_channel=(lambda: target.channel(CONNECT_OPTIONS)) if connect else None)


async def measure(targets: Sequence[Target], rounds: int, seconds: float) -> list[tuple[int, LoadResult]]:
    """(round, result) of every step; the first target is the plaintext one, whose answer is the reference."""
    requests = predict_requests(1)
    expect = await grpc_answer(targets[0].address, requests[0])
    plan = [(t, c) for c in (*CONCURRENCY, CONNECT) for t in targets]
    results = []
    n = 0
    for rnd in range(1, rounds + 1):
        for t, c in plan:
            n += 1
            progress(f"[{n}/{rounds * len(plan)}] round {rnd}: {t.label} {c if c == CONNECT else f'c={c}'} "
                     f"({WARMUP_S:g}s warm-up + {seconds:g}s) ...")
            r = await step(t, requests, c, seconds, expect)
            progress(f"  {r.rate:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                     f"router {cpu_ms(r, 'router'):.3f} ms CPU/request, {r.error_count} errors")
            results.append((rnd, r))
    return results


def kind(r: LoadResult) -> str:
    """The step of a result: ``c=1``, ``c=64`` or ``connect``."""
    return CONNECT if r.label.endswith(CONNECT) else f"c={r.concurrency}"


def report(results: Sequence[tuple[int, LoadResult]], seconds: float, rounds: int) -> str:
    print(f"model {MODEL_NAME}; {os.cpu_count()} CPUs; {rounds} rounds, {seconds:g}s per step after {WARMUP_S:g}s "
          f"warm-up; official grpc.aio client on {loop_name()}, batch 1, closed loop, one channel per step "
          f"({CONNECT}: a new channel per call)")
    print("routers: workers.count 1 (spawned worker, frames on a Unix socket), defaults; "
          "TLS: top-level tls block (cert_file, key_file; no client certificates)")
    print_table(["round", "target", "step", "calls", "req/s", "p50 ms", "p99 ms", "errors",
                 "router cpu", "router ms/req", "client ms/req", "worker ms/req"],
                [[rnd, r.label.split()[0], kind(r), r.calls, r.rate, r.p50_ms, r.p99_ms, r.error_count,
                  r.cpu.get("router", float("nan")), *(cpu_ms(r, p) for p in PROCESSES)]
                 for rnd, r in results])
    print("(router cpu: cores used in the measured window; ms/req: ms of that process's CPU per request answered)")
    print_errors([r for _, r in results])

    by: dict[tuple[str, str], list[LoadResult]] = {}
    for _, r in results:
        by.setdefault((r.label.split()[0], kind(r)), []).append(r)
    steps = list(dict.fromkeys(kind(r) for _, r in results))
    print(f"medians over {rounds} rounds:")
    print_table(["step", "target", "req/s", "p50 ms", "p99 ms", "router ms/req", "client ms/req", "worker ms/req"],
                [[s, label, median([r.rate for r in rs]), median([r.p50_ms for r in rs]),
                  median([r.p99_ms for r in rs]), *(median([cpu_ms(r, p) for r in rs]) for p in PROCESSES)]
                 for s in steps for label in (PLAIN, TLS) if (rs := by.get((label, s)))])

    def rel(s: str, value: Any) -> float:
        """The median over rounds of TLS's value / plaintext's in the same round."""
        return median([ratio(value(t), value(p)) for p, t in zip(by.get((PLAIN, s), []), by.get((TLS, s), []))])

    def added(s: str, value: Any) -> float:
        """The median over rounds of TLS's value - plaintext's in the same round."""
        return median([value(t) - value(p) for p, t in zip(by.get((PLAIN, s), []), by.get((TLS, s), []))])

    print("TLS / plaintext (median of the rounds' ratios):")
    print_table(["step", "req/s", "p50", "p99", "router CPU/req", "client CPU/req"],
                [[s, times(rel(s, lambda r: r.rate)), times(rel(s, lambda r: r.p50_ms)),
                  times(rel(s, lambda r: r.p99_ms)), times(rel(s, lambda r: cpu_ms(r, "router"))),
                  times(rel(s, lambda r: cpu_ms(r, "client")))] for s in steps])
    c1, c64 = (f"c={c}" for c in CONCURRENCY)
    print(f"added by TLS (TLS - plaintext, median of the rounds' differences): router CPU/request "
          f"c=1 {added(c1, lambda r: cpu_ms(r, 'router')):+.3f} ms, c=64 {added(c64, lambda r: cpu_ms(r, 'router')):+.3f} ms; "
          f"a new connection (TCP + handshake + first call): p50 {added(CONNECT, lambda r: r.p50_ms):+.2f} ms, "
          f"router CPU {added(CONNECT, lambda r: cpu_ms(r, 'router')):+.3f} ms, "
          f"client CPU {added(CONNECT, lambda r: cpu_ms(r, 'client')):+.3f} ms")
    return (f"TLS cost: c=1 p50 x{rel(c1, lambda r: r.p50_ms):.2f}, c=64 req/s x{rel(c64, lambda r: r.rate):.2f}, "
            f"router CPU/request x{rel(c64, lambda r: cpu_ms(r, 'router')):.2f} (c=64); "
            f"a new connection +{added(CONNECT, lambda r: r.p50_ms):.2f} ms p50")


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("python -m loadtest.bench_tls", __doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the routers taking turns (default 3)")
    args = parse_bench_args(parser, argv)  # fails early without `make demo`
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    base = {"models": [{"name": MODEL_NAME, "base_path": str(args.model_dir)}], "workers": {"count": 1}}
    routers: list[tuple[str, RouterProcess]] = []
    with tempfile.TemporaryDirectory(prefix="tfs-bench-tls-") as tmp:
        tls, ca_pem = make_certificates(Path(tmp))
        try:
            import tensorflow  # noqa: F401  (loads while the routers' workers do)

            routers.append((PLAIN, start_router(base, PLAIN, workers=1, timeout=180)))
            routers.append((TLS, start_router({**base, "tls": tls}, TLS, workers=1, timeout=180,
                                              ssl_context=ssl.create_default_context(cadata=ca_pem.decode()))))
            targets = []
            for label, router in routers:
                (worker,) = router.worker_pids()
                targets.append(Target(label, router.grpc_address, ca_pem if label == TLS else None,
                                      {"client": None, "router": router.pid, "worker": worker}))
            results = run_async(measure(targets, args.rounds, args.seconds))
        finally:
            for label, router in routers:
                progress(f"[{label}] {router.stop()}")

    headline = report(results, args.seconds, args.rounds)
    print(headline)
    return 1 if any(r.error_count for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
