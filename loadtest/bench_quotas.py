"""Per-tenant quotas under a flood, and a soak with inputs in random order.

    python -m loadtest.bench_quotas [--seconds 5] [--rate 500] [--rounds 3] [--flood-concurrency 256]
                                    [--flood-channels 4] [--soak-requests 200000] [--soak-warmup N]
                                    [--soak-concurrency 16] [--only quotas|soak] [--model-dir models/ctr]

Fast mode: ``--seconds 3 --rounds 2 --soak-requests 20000``.

1. Tenant isolation.  A router (2 spawned workers, the demo model of
   ``make demo``) with this ``quotas`` section::

       quotas:
         tenant_header: x-tenant
         default: {max_inflight: 256}
         tenants:
           flood:  {max_inflight: 8, max_queued: 32, rate_per_s: 200, burst: 50, priority: low}
           steady: {max_inflight: 64, priority: high}

   The well-behaved tenant ("steady", gRPC metadata ``x-tenant: steady``) gets
   open-loop gRPC load (``loadtest.openloop``: batch-1 Predicts at ``--rate``
   req/s on a fixed schedule, latency counted from each request's *scheduled*
   send time) for ``--seconds``, alone, then with a flooding tenant beside it,
   turn about for ``--rounds`` rounds (alone, flood, alone, flood, ...) so that
   drift of the machine hits both alike.  The flood is a closed loop of
   ``--flood-concurrency`` calls in flight over ``--flood-channels`` gRPC
   connections, each sending its next call the moment the previous one
   returns, metadata ``x-tenant: flood``.  It runs in a child process of its
   own (``--flood-child``), so its CPU is not the steady client's event loop:
   the steady latencies are the router's (the client's lateness is shown to
   prove it).  The flood starts 1 s before each "with flood" window and is
   stopped, its calls drained, before each "alone" window.

   Reported: the steady tenant's p50/p99 alone and with the flood (all rounds
   pooled, and the ratio per round), p99(with flood) / p99(alone) against
   the 1.5 target, the steady tenant's errors (target 0), the flooder's calls,
   its accepted rate, its shed fraction (RESOURCE_EXHAUSTED / all its calls),
   and checks that every refusal of the flooder was RESOURCE_EXHAUSTED with
   details naming the tenant "flood" (and how many carried a ``retry-after``
   trailer).  While the last flood runs, a short REST check: the flooder's
   ``:predict`` calls must get 429 with ``Retry-After`` and a body naming
   "flood", the steady tenant's 200.  Cores used in each window by the steady
   client, the flooder, the router, the workers and everything else are shown:
   on a small machine they share the CPUs.

   A router whose config loader does not know ``quotas`` yet exits at start
   with a config error naming it; the run says so and goes on with part 2.

2. Soak (seed 001: TF Serving grew one executor per order in which a client
   listed its inputs, until it ran out of memory).  A fresh router without
   quotas gets ``--soak-warmup`` (default 20,000, at most a fifth of the
   soak) and then ``--soak-requests`` (default 200,000) gRPC Predicts in
   closed loop at ``--soak-concurrency``, each with the six inputs of the
   demo model (user_id, item_id, category, city, device: int64 [1]; dense:
   float32 [1, 20]) in a random order of the 720, on the wire.  The resident
   memory of the router and of each worker (children of the router with
   ``workers`` in their command line) is sampled when the warm-up has drained
   (baseline), every 10% of the soak (under load; progress lines on stderr)
   and when the soak has drained; growth = the end minus the baseline, target
   under 5 MB per process.

   Why on the wire: the protobuf runtime here (upb) keeps a map in its own
   hash order, so filling ``request.inputs`` in a shuffled order serializes
   the same bytes every time.  ``ShuffledRequests`` therefore serializes each
   input as its own map entry and concatenates the entries in the shuffled
   order (a map field is a repeated entry message: any order is the same
   valid message); ``wire_input_order`` reads the order back.

The client needs no TensorFlow (the project's own protos, as in
``bench_rollout``).  Progress goes to stderr; stdout gets the tables and, as
its last line, the figures.  Exits 1 if a part failed, a steady or soak
request failed, or the flooder got a refusal other than RESOURCE_EXHAUSTED
naming it; a router that refuses the ``quotas`` config is reported, not a
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_rollout import (
    DENSE_DIM,
    DENSE_INPUT,
    ID_INPUTS,
    MODEL_NAME,
    WrongAnswer,
    machine_busy_s,
)
from loadtest.common import start_router as common_start_router
from loadtest.common import (
    GRPC_OPTIONS,
    ROOT,
    RouterProcess,
    child_env,
    cpu_seconds,
    error_text,
    latest_version,
    percentile,
    print_table,
    progress,
    run_async,
)
from loadtest.openloop import (
    OK,
    FloatArray,
    OpenLoop,
    OpenLoopResult,
    codes_text,
    fmt_ms,
    pct,
)

WORKERS = 2
TENANT_HEADER = "x-tenant"
STEADY, FLOOD = "steady", "flood"
QUOTAS: dict[str, Any] = {
    "tenant_header": TENANT_HEADER,
    "default": {"max_inflight": 256},
    "tenants": {
        FLOOD: {"max_inflight": 8, "max_queued": 32, "rate_per_s": 200, "burst": 50, "priority": "low"},
        STEADY: {"max_inflight": 64, "priority": "high"},
    },
}
TARGET_RATIO = 1.5  # steady p99 with the flood / alone, at most
TARGET_RSS_MB = 5.0  # growth per process over the soak, under
EXHAUSTED = "RESOURCE_EXHAUSTED"
INPUT_NAMES = (*ID_INPUTS, DENSE_INPUT)
DISTINCT_ROWS = 64  # distinct input values the requests cycle through
REQUEST_DEADLINE_S = 30.0
FLOOD_DEADLINE_S = 10.0
FLOOD_RAMP_S = 1.0  # flood running before a "with flood" window opens
SETTLE_S = 0.5  # quiet after the flood stopped, before an "alone" window
STEADY_WARMUP_S = 1.0  # open-loop load before the first window, not counted
IDLE_SETTLE_S = 1.0  # quiet before the soak's baseline and end samples
ROUTER_READY_TIMEOUT_S = 300.0
# The client's own delay beyond which its latencies are its own (as in bench_rollout).
CLIENT_VOID_SHARE = 0.5
MAX_DETAIL_KINDS = 50


# -- requests ----------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """The top-level ``(field number, wire type, value)`` of a serialized message, in wire order."""
    out = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: Any
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated field")
        out.append((number, wire_type, value))
    return out


PREDICT_INPUTS_FIELD = 2  # PredictRequest.inputs (map<string, TensorProto>)


def wire_input_order(data: bytes) -> list[str]:
    """The names of a serialized PredictRequest's inputs in the order its map entries are on the wire."""
    names = []
    for number, wire_type, value in _fields(data):
        if number == PREDICT_INPUTS_FIELD and wire_type == 2:
            key = [v for n, t, v in _fields(value) if n == 1 and t == 2]  # MapEntry.key
            names.append(key[-1].decode() if key else "")
    return names


class ShuffledRequests:
    """Serialized batch-1 PredictRequests for the demo model, inputs on the wire in a random order.

    The six map entries of each of ``rows`` distinct input rows are
    serialized once, apart; ``build()`` picks a row and one of the 720 orders
    at random and concatenates the model spec and the entries in that order.
    """

    def __init__(self, seed: int = 0, rows: int = DISTINCT_ROWS) -> None:
        from protos import predict_pb2
        from shared.tensor import fill

        self.rng = random.Random(seed)
        values = np.random.default_rng(seed)
        self.rows: list[dict[str, Any]] = []
        self.entries: list[dict[str, bytes]] = []
        for _ in range(rows):
            row: dict[str, Any] = {name: values.integers(0, 1_000_000, size=1, dtype=np.int64) for name in ID_INPUTS}
            row[DENSE_INPUT] = values.standard_normal((1, DENSE_DIM)).astype(np.float32)
            entries = {}
            for name in INPUT_NAMES:
                one = predict_pb2.PredictRequest()
                fill(one.inputs[name], row[name])
                entries[name] = one.SerializeToString()
            self.rows.append(row)
            self.entries.append(entries)
        spec = predict_pb2.PredictRequest()
        spec.model_spec.name = MODEL_NAME
        self.prefix = spec.SerializeToString()
        self.orders: Counter[tuple[str, ...]] = Counter()  # every order built so far

    def build_order(self, row: int, order: Sequence[str]) -> bytes:
        """Row ``row`` with its inputs on the wire in ``order`` (a permutation of the six names)."""
        if sorted(order) != sorted(INPUT_NAMES):
            raise ValueError(f"not an order of the inputs {INPUT_NAMES}: {order}")
        entries = self.entries[row]
        return bytes(self.prefix + b"".join(entries[name] for name in order))

    def build(self) -> bytes:
        """A random row in a random order (counted in ``orders``)."""
        order = list(INPUT_NAMES)
        self.rng.shuffle(order)
        self.orders[tuple(order)] += 1
        return self.build_order(self.rng.randrange(len(self.entries)), order)

    def reference(self, row: int) -> Any:
        """Row ``row`` as a PredictRequest built the ordinary way (to compare contents with)."""
        from protos import predict_pb2
        from shared.tensor import fill

        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL_NAME
        for name in INPUT_NAMES:
            fill(req.inputs[name], self.rows[row][name])
        return req


def predict_bytes(channel: Any) -> Any:
    """TF Serving's Predict taking an already serialized request, answering a PredictResponse."""
    from protos import predict_pb2

    return channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                               request_serializer=None,
                               response_deserializer=predict_pb2.PredictResponse.FromString)


def check_answer(resp: Any) -> None:
    if "probability" not in resp.outputs:
        raise WrongAnswer(f"outputs {sorted(resp.outputs)} lack probability")
    dims = [d.size for d in resp.outputs["probability"].tensor_shape.dim]
    if dims != [1]:
        raise WrongAnswer(f"probability shape {dims}, expected [1]")


def fixed_requests(seed: int, count: int = 16) -> list[bytes]:
    """``count`` distinct serialized batch-1 requests, inputs in the usual (sorted) order."""
    feed = ShuffledRequests(seed, rows=count)
    return [feed.build_order(i, sorted(INPUT_NAMES)) for i in range(count)]


# -- configs -----------------------------------------------------------------------


def quota_config(model_dir: Path) -> dict[str, Any]:
    return {"models": [{"name": MODEL_NAME, "base_path": str(model_dir)}], "workers": {"count": WORKERS},
            "quotas": QUOTAS}


def soak_config(model_dir: Path) -> dict[str, Any]:
    return {"models": [{"name": MODEL_NAME, "base_path": str(model_dir)}], "workers": {"count": WORKERS}}


def quotas_refused(log_text: str) -> str | None:
    """The router's config error about ``quotas`` in its start-up output, if that is why it stopped."""
    for line in log_text.splitlines():
        if "config error" in line and "quotas" in line:
            return line.strip()
    return None


def start_router(config: Mapping[str, Any], label: str) -> RouterProcess:
    return common_start_router(config, label, workers=WORKERS, timeout=ROUTER_READY_TIMEOUT_S)


# -- the flood: a child process ---------------------------------------------------------


def detail_kind(details: str) -> str:
    """Details with their numbers blanked, so that refusals of one kind count together."""
    return re.sub(r"\d+(?:\.\d+)?", "N", details)[:200]


async def flood_child(address: str, concurrency: int, channels: int, tenant: str) -> None:
    """The flooder: answers commands on stdin (``run``, ``pause``, ``mark``, ``quit``) with a JSON snapshot.

    While running, ``concurrency`` calls are in flight over ``channels``
    connections, each followed at once by the next.  A snapshot holds the
    counts by status code, how many RESOURCE_EXHAUSTED details named the
    tenant and carried a retry-after trailer, and the kinds of details seen.
    """
    import grpc

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]  # a connection each
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    calls = [c.unary_unary("/tensorflow.serving.PredictionService/Predict", request_serializer=None,
                           response_deserializer=None) for c in chans]
    requests = fixed_requests(seed=7)
    metadata = ((TENANT_HEADER, tenant),)
    counts: Counter[str] = Counter()
    named = retry_after = 0
    kinds: dict[str, Counter[str]] = {}
    running = asyncio.Event()
    inflight = 0
    idle = asyncio.Event()
    idle.set()

    def record(code: str, details: str, trailers: Any) -> None:
        nonlocal named, retry_after
        counts[code] += 1
        if code == EXHAUSTED:
            named += tenant in details
            retry_after += any(k == "retry-after" for k, _ in (trailers or ()))
        seen = kinds.setdefault(code, Counter())
        kind = detail_kind(details)
        if kind in seen or len(seen) < MAX_DETAIL_KINDS:
            seen[kind] += 1

    async def sender(i: int) -> None:
        nonlocal inflight
        call = calls[i % len(calls)]
        n = i
        while True:
            await running.wait()
            inflight += 1
            idle.clear()
            try:
                await call(requests[n % len(requests)], metadata=metadata, timeout=FLOOD_DEADLINE_S)
                counts[OK] += 1
            except grpc.aio.AioRpcError as exc:
                try:
                    trailers = exc.trailing_metadata()
                except Exception:  # noqa: BLE001 - the count matters more than the trailer
                    trailers = ()
                record(exc.code().name, exc.details() or "", trailers)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                record(type(exc).__name__, str(exc), ())
            finally:
                inflight -= 1
                if inflight == 0:
                    idle.set()
            n += concurrency

    def snapshot(**extra: Any) -> None:
        out = {"time": time.time(), "counts": dict(counts), "named": named, "retry_after": retry_after,
               "inflight": inflight, "kinds": {c: dict(k.most_common(5)) for c, k in kinds.items()}, **extra}
        print(json.dumps(out), flush=True)

    for c in chans:
        await asyncio.wait_for(c.channel_ready(), timeout=30)
    tasks = [asyncio.create_task(sender(i)) for i in range(concurrency)]
    snapshot(ready=True)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if line in ("", "quit"):
                break
            if line == "run":
                running.set()
            elif line == "pause":
                running.clear()
                try:
                    await asyncio.wait_for(idle.wait(), timeout=FLOOD_DEADLINE_S + 5)
                except TimeoutError:
                    pass
            elif line != "mark":
                snapshot(error=f"unknown command {line!r}")
                continue
            snapshot()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in chans:
            await c.close()


class Flooder:
    """The parent's side of ``flood_child``: start it, send commands, read snapshots."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path

    @classmethod
    async def start(cls, address: str, concurrency: int, channels: int, tenant: str = FLOOD) -> Flooder:
        fd, name = tempfile.mkstemp(prefix="tfs-flood-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest.bench_quotas", "--flood-child", address,
                "--flood-concurrency", str(concurrency), "--flood-channels", str(channels),
                "--flood-tenant", tenant,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env=child_env(), cwd=ROOT)
        flooder = cls(proc, Path(name))
        await flooder._read(timeout=60)
        return flooder

    async def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"the flooder did not answer within {timeout:g}s:\n{self.log_tail()}") from None
        if not line:
            await self.proc.wait()
            raise RuntimeError(f"the flooder exited with {self.proc.returncode}:\n{self.log_tail()}")
        return dict(json.loads(line))

    async def command(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd}\n".encode())
        await self.proc.stdin.drain()
        return await self._read(timeout=FLOOD_DEADLINE_S + 30)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 15)
            except (TimeoutError, OSError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)


@dataclass
class FloodWindow:
    """What the flooder got between two snapshots."""

    seconds: float
    counts: Counter[str]
    named: int  # RESOURCE_EXHAUSTED whose details named the tenant
    retry_after: int  # RESOURCE_EXHAUSTED with a retry-after trailer
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> int:
        return self.counts.get(OK, 0)

    @property
    def exhausted(self) -> int:
        return self.counts.get(EXHAUSTED, 0)

    @property
    def other(self) -> int:
        """Refusals that were not RESOURCE_EXHAUSTED (timeouts, UNAVAILABLE, ...)."""
        return self.calls - self.ok - self.exhausted

    @property
    def shed(self) -> float:
        return self.exhausted / self.calls if self.calls else float("nan")

    @property
    def accepted_rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else float("nan")

    @property
    def call_rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else float("nan")

    def __add__(self, other: FloodWindow) -> FloodWindow:
        kinds = {c: dict(Counter(self.kinds.get(c, {})) + Counter(other.kinds.get(c, {})))
                 for c in {*self.kinds, *other.kinds}}
        return FloodWindow(self.seconds + other.seconds, self.counts + other.counts, self.named + other.named,
                           self.retry_after + other.retry_after, kinds)


def flood_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> FloodWindow:
    """The flooder's window between snapshots ``before`` and ``after`` (of ``flood_child``)."""
    counts = Counter({k: int(v) - int(before["counts"].get(k, 0)) for k, v in after["counts"].items()})
    counts = Counter({k: v for k, v in counts.items() if v})
    kinds: dict[str, dict[str, int]] = {}
    for code, seen in after.get("kinds", {}).items():
        earlier = before.get("kinds", {}).get(code, {})
        grew = {k: int(v) - int(earlier.get(k, 0)) for k, v in seen.items()}
        grew = {k: v for k, v in grew.items() if v > 0}
        if grew:
            kinds[code] = grew
    return FloodWindow(seconds=float(after["time"]) - float(before["time"]), counts=counts,
                       named=int(after["named"]) - int(before["named"]),
                       retry_after=int(after["retry_after"]) - int(before["retry_after"]), kinds=kinds)


# -- part 1: tenant isolation ----------------------------------------------------------


class Cores:
    """Cores used between ``start()`` and ``stop()`` by labelled processes, and by all the others."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = dict(pids)
        self._t0 = self._busy0 = 0.0
        self._cpu0: dict[str, float] = {}
        self.cores: dict[str, float] = {}

    def _cpu(self, pid: int | None) -> float:
        try:
            return cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            return float("nan")

    def start(self) -> None:
        self._t0, self._busy0 = time.monotonic(), machine_busy_s()
        self._cpu0 = {k: self._cpu(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        busy = (machine_busy_s() - self._busy0) / wall
        self.cores = {k: (self._cpu(p) - self._cpu0[k]) / wall for k, p in self.pids.items()}
        ours = sum(v for v in self.cores.values() if not math.isnan(v))
        self.cores["others"] = max(0.0, busy - ours)
        return self.cores


@dataclass
class Phase:
    """One window of steady load: alone or beside the flood."""

    round: int
    flooded: bool
    load: OpenLoopResult[None]
    flood: FloodWindow | None
    cores: dict[str, float]

    @property
    def name(self) -> str:
        return "with flood" if self.flooded else "alone"

    def client_void(self) -> bool:
        late, lat = self.load.lateness_stats(), self.load.latency_stats()
        return late.saturated or late.p99 > CLIENT_VOID_SHARE * lat.p99


@dataclass
class RestCheck:
    flood_status: Counter[int] = field(default_factory=Counter)
    flood_retry_after: int = 0  # 429s with a Retry-After header
    flood_named: int = 0  # 429s whose body names the tenant
    steady_status: Counter[int] = field(default_factory=Counter)
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [f"REST check failed: {self.error}"]
        out = []
        refused = self.flood_status.get(429, 0)
        if not refused:
            out.append(f"REST: the flooder got no 429 ({dict(self.flood_status)})")
        else:
            if self.flood_retry_after < refused:
                out.append(f"REST: {refused - self.flood_retry_after} of {refused} 429s lack Retry-After")
            if self.flood_named < refused:
                out.append(f"REST: {refused - self.flood_named} of {refused} 429s do not name {FLOOD!r}")
        bad = {s: n for s, n in self.flood_status.items() if s not in (200, 429)}
        if bad:
            out.append(f"REST: the flooder got statuses other than 200/429: {bad}")
        if set(self.steady_status) - {200}:
            out.append(f"REST: the steady tenant got {dict(self.steady_status)}")
        return out


@dataclass
class QuotaSummary:
    """The figures of part 1 (latencies in seconds)."""

    alone_p50: float
    alone_p99: float
    flood_p50: float
    flood_p99: float
    steady_requests: int
    steady_errors: int
    flood: FloodWindow
    round_ratios: list[float] = field(default_factory=list)
    client_void: bool = False

    @property
    def ratio(self) -> float:
        return self.flood_p99 / self.alone_p99 if self.alone_p99 > 0 else float("nan")

    def refusal_problems(self) -> list[str]:
        """What is wrong with the flooder's refusals (empty: all RESOURCE_EXHAUSTED naming it)."""
        out = []
        if self.flood.calls and not self.flood.exhausted:
            out.append("the flooder was never refused (quotas not enforced?)")
        if self.flood.other:
            codes = {c: n for c, n in self.flood.counts.items() if c not in (OK, EXHAUSTED)}
            out.append(f"the flooder got refusals other than {EXHAUSTED}: {codes_text(codes)}")
        if self.flood.named < self.flood.exhausted:
            out.append(f"{self.flood.exhausted - self.flood.named:,} of {self.flood.exhausted:,} "
                       f"{EXHAUSTED} details do not name {FLOOD!r}")
        return out


@dataclass
class QuotaOutcome:
    state: str = "measured"  # measured | refused (no quotas in this router) | failed | skipped
    message: str = ""  # the config error, or why it failed
    config: dict[str, Any] = field(default_factory=dict)
    rate: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    rest: RestCheck | None = None

    def summary(self) -> QuotaSummary:
        alone = [p for p in self.phases if not p.flooded]
        flooded = [p for p in self.phases if p.flooded]
        if not alone or not flooded:
            raise ValueError("no complete round was measured")

        def latencies(phases: Sequence[Phase]) -> FloatArray:
            lat: FloatArray = np.concatenate([p.load.latency for p in phases])
            return lat[~np.isnan(lat)]

        def p99(phases: Sequence[Phase]) -> float:
            return pct(latencies(phases), 99)

        rounds = sorted({p.round for p in self.phases})
        ratios = []
        for r in rounds:
            a = [p for p in alone if p.round == r]
            f = [p for p in flooded if p.round == r]
            if a and f and p99(a) > 0:
                ratios.append(p99(f) / p99(a))
        flood = flooded[0].flood or FloodWindow(0.0, Counter(), 0, 0)
        for p in flooded[1:]:
            if p.flood is not None:
                flood = flood + p.flood
        la, lf = latencies(alone), latencies(flooded)
        return QuotaSummary(
            alone_p50=pct(la, 50), alone_p99=pct(la, 99), flood_p50=pct(lf, 50), flood_p99=pct(lf, 99),
            steady_requests=sum(len(p.load) for p in self.phases),
            steady_errors=sum(p.load.latency_stats().errors for p in self.phases),
            flood=flood, round_ratios=ratios, client_void=any(p.client_void() for p in self.phases))


async def steady_call_factory(channel: Any) -> Any:
    stub = predict_bytes(channel)
    requests = fixed_requests(seed=1)
    metadata = ((TENANT_HEADER, STEADY),)
    n = 0

    async def call() -> None:
        nonlocal n
        n += 1
        check_answer(await stub(requests[n % len(requests)], metadata=metadata, timeout=REQUEST_DEADLINE_S))

    return call


async def rest_check(rest_url: str, seconds: float = 1.0, concurrency: int = 32) -> RestCheck:
    """While the gRPC flood runs: the flooder's REST calls get 429 + Retry-After naming it; steady's 200."""
    import aiohttp

    out = RestCheck()
    url = f"{rest_url}/v1/models/{MODEL_NAME}:predict"
    body = json.dumps({"instances": [{**{n: 1 for n in ID_INPUTS}, DENSE_INPUT: [0.5] * DENSE_DIM}]})
    stop_at = time.monotonic() + seconds

    async def flood_one(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            async with session.post(url, data=body, headers={TENANT_HEADER: FLOOD}) as resp:
                text = await resp.text()
                out.flood_status[resp.status] += 1
                if resp.status == 429:
                    out.flood_retry_after += "Retry-After" in resp.headers
                    out.flood_named += FLOOD in text

    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_DEADLINE_S)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:
            await asyncio.gather(*(flood_one(session) for _ in range(concurrency)))
            for _ in range(20):
                async with session.post(url, data=body, headers={TENANT_HEADER: STEADY}) as resp:
                    await resp.read()
                    out.steady_status[resp.status] += 1
    except Exception as exc:  # noqa: BLE001 - reported as the check's failure
        out.error = error_text(exc)
    return out


async def measure_quotas(out: QuotaOutcome, router: RouterProcess, args: argparse.Namespace) -> None:
    import grpc

    workers = router.worker_pids()
    flooder = await Flooder.start(router.grpc_address, args.flood_concurrency, args.flood_channels)
    progress(f"[quotas] flooder pid {flooder.pid}: {args.flood_concurrency} calls in flight over "
             f"{args.flood_channels} connections when running")
    try:
        async with grpc.aio.insecure_channel(router.grpc_address, options=GRPC_OPTIONS) as channel:
            call = await steady_call_factory(channel)
            await call()
            progress(f"[quotas] steady warm-up: {STEADY_WARMUP_S:g}s at {args.rate:,.0f} req/s ...")
            warm = await OpenLoop(call, args.rate).run(duration=STEADY_WARMUP_S, drain_timeout=REQUEST_DEADLINE_S)
            if warm.latency_stats().errors:
                progress(f"[quotas] warm-up errors: {dict(warm.errors)}")
            pids: dict[str, int | None] = {"client": None, "flooder": flooder.pid, "router": router.pid}
            pids.update({f"w{i}": p for i, p in enumerate(workers)})
            for r in range(args.rounds):
                for flooded in (False, True):
                    if flooded:
                        await flooder.command("run")
                        await asyncio.sleep(FLOOD_RAMP_S)
                    before = await flooder.command("mark")
                    cores = Cores(pids)
                    cores.start()
                    load = await OpenLoop(call, args.rate).run(duration=args.seconds,
                                                               drain_timeout=REQUEST_DEADLINE_S + 5)
                    used = cores.stop()
                    after = await flooder.command("mark")
                    window = flood_delta(before, after)
                    if flooded and r == args.rounds - 1:
                        progress("[quotas] REST check while the flood runs ...")
                        out.rest = await rest_check(router.rest_url)
                    if flooded:
                        paused = await flooder.command("pause")
                        if paused.get("inflight"):
                            progress(f"[quotas] the flooder still had {paused['inflight']} calls in flight")
                        await asyncio.sleep(SETTLE_S)
                    elif window.calls:
                        progress(f"[quotas] note: the flooder made {window.calls} calls in an alone window")
                    phase = Phase(round=r + 1, flooded=flooded, load=load, flood=window if flooded else None,
                                  cores=used)
                    out.phases.append(phase)
                    stats, late = load.latency_stats(), load.lateness_stats()
                    extra = ""
                    if flooded:
                        extra = (f"; flood {window.call_rate:,.0f} calls/s, accepted {window.accepted_rate:,.0f}/s, "
                                 f"shed {window.shed:.0%}")
                    progress(f"[quotas] round {r + 1} {phase.name}: p50 {fmt_ms(stats.p50)} ms, p99 "
                             f"{fmt_ms(stats.p99)} ms, errors {stats.errors}, client lateness p99 "
                             f"{fmt_ms(late.p99)} ms{extra}")
    finally:
        await flooder.close()


def run_quotas(args: argparse.Namespace) -> QuotaOutcome:
    out = QuotaOutcome(config=quota_config(args.model_dir), rate=args.rate)
    router = None
    try:
        try:
            router = start_router(out.config, "quotas")
        except RuntimeError as exc:
            refused = quotas_refused(str(exc))
            if refused is None:
                raise
            out.state, out.message = "refused", refused
            progress(f"[quotas] the router refuses the quotas config, not measured: {refused}")
            return out
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            run_async(measure_quotas(out, router, args))
        finally:
            gc.enable()
        if not out.phases:
            raise RuntimeError("no window was measured")
    except Exception as exc:  # noqa: BLE001 - reported in the results
        out.state, out.message = "failed", error_text(exc)
        progress(f"[quotas] FAILED: {out.message}")
        if not isinstance(exc, RuntimeError):
            progress(traceback.format_exc())
    finally:
        if router is not None:
            progress(f"[quotas] {router.stop()}")
    return out


# -- part 2: soak ------------------------------------------------------------------------


def process_rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def worker_processes(router_pid: int) -> list[int]:
    """The router's worker processes: its children with ``workers`` in their command line, by pid."""
    import psutil

    found = []
    for child in psutil.Process(router_pid).children(recursive=True):
        try:
            if "workers" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return sorted(found)


@dataclass
class RssSample:
    label: str
    done: int  # soak requests answered when taken
    rss: dict[str, int | None]  # process name -> bytes (None: gone)


@dataclass
class SoakOutcome:
    requests: int
    warmup: int = 0
    concurrency: int = 0
    state: str = "measured"  # measured | failed | skipped
    message: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # router, w0, w1 -> pid
    samples: list[RssSample] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # sorted, seconds
    errors: Counter[str] = field(default_factory=Counter)  # warm-up included
    orders: int = 0  # distinct input orders sent
    restarted: list[str] = field(default_factory=list)  # workers whose pid changed

    @property
    def names(self) -> list[str]:
        return list(self.pids)

    def growth_mb(self, name: str, label: str = "end") -> float:
        """RSS of ``name`` at sample ``label`` minus at the baseline, MB (NaN if either is missing)."""
        base = self.sample("baseline").rss.get(name)
        then = self.sample(label).rss.get(name)
        return (then - base) / 2**20 if base is not None and then is not None else float("nan")

    def peak_growth_mb(self, name: str) -> float:
        base = self.sample("baseline").rss.get(name)
        after = self.samples[self.samples.index(self.sample("baseline")):]
        values = [v for v in (s.rss.get(name) for s in after) if v is not None]
        return (max(values) - base) / 2**20 if base is not None and values else float("nan")

    def sample(self, label: str) -> RssSample:
        for s in self.samples:
            if s.label == label:
                return s
        raise KeyError(label)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def within_target(self) -> bool:
        return all(self.growth_mb(n) < TARGET_RSS_MB for n in self.names)


def take_sample(out: SoakOutcome, label: str, done: int) -> RssSample:
    sample = RssSample(label, done, {name: process_rss(pid) for name, pid in out.pids.items()})
    out.samples.append(sample)
    return sample


def rss_text(sample: RssSample) -> str:
    return ", ".join(f"{n} {v / 2**20:,.1f} MB" if v is not None else f"{n} gone" for n, v in sample.rss.items())


async def soak_load(out: SoakOutcome, router: RouterProcess, seed: int) -> None:
    import grpc

    feed = ShuffledRequests(seed)
    async with grpc.aio.insecure_channel(router.grpc_address, options=GRPC_OPTIONS) as channel:
        stub = predict_bytes(channel)
        check_answer(await stub(feed.build(), timeout=REQUEST_DEADLINE_S))

        async def run(total: int, label: str, milestones: int) -> tuple[float, list[float]]:
            """``total`` calls in closed loop; an RSS sample and a progress line at each 1/milestones."""
            issued = done = 0
            latencies: list[float] = []
            started = time.perf_counter()
            step = max(1, total // milestones)
            clock = time.perf_counter

            async def client() -> None:
                nonlocal issued, done
                while issued < total:
                    issued += 1
                    data = feed.build()
                    t0 = clock()
                    try:
                        check_answer(await stub(data, timeout=REQUEST_DEADLINE_S))
                        latencies.append(clock() - t0)
                    except Exception as exc:  # noqa: BLE001 - counted
                        out.errors[error_text(exc)] += 1
                    done += 1
                    if done % step == 0 and done < total:
                        elapsed = clock() - started
                        sample = take_sample(out, f"{label} {done * 100 // total}%", done)
                        progress(f"[soak] {label} {done:,}/{total:,} ({done * 100 // total}%), "
                                 f"{done / elapsed:,.0f} req/s, {out.error_count} errors; RSS {rss_text(sample)}")

            await asyncio.gather(*(client() for _ in range(out.concurrency)))
            return clock() - started, latencies

        progress(f"[soak] warm-up: {out.warmup:,} requests at concurrency {out.concurrency} ...")
        await run(out.warmup, "warm-up", 2)
        await asyncio.sleep(IDLE_SETTLE_S)
        base = take_sample(out, "baseline", 0)
        progress(f"[soak] baseline after the warm-up: RSS {rss_text(base)}")
        progress(f"[soak] {out.requests:,} requests, inputs in random order, concurrency {out.concurrency} ...")
        out.seconds, latencies = await run(out.requests, "soak", 10)
        out.latencies = sorted(latencies)
        await asyncio.sleep(IDLE_SETTLE_S)
        end = take_sample(out, "end", out.requests)
        out.orders = len(feed.orders)
        progress(f"[soak] done in {out.seconds:.1f}s ({out.requests / out.seconds:,.0f} req/s), "
                 f"{out.error_count} errors, {out.orders} distinct input orders; RSS {rss_text(end)}")


def run_soak(args: argparse.Namespace) -> SoakOutcome:
    out = SoakOutcome(requests=args.soak_requests, warmup=args.soak_warmup, concurrency=args.soak_concurrency)
    router = None
    try:
        router = start_router(soak_config(args.model_dir), "soak")
        workers = worker_processes(router.pid)
        if len(workers) != WORKERS:
            raise RuntimeError(f"found {len(workers)} worker processes under the router, expected {WORKERS}")
        out.pids = {"router": router.pid, **{f"w{i}": p for i, p in enumerate(workers)}}
        run_async(soak_load(out, router, args.seed))
        now = worker_processes(router.pid)
        out.restarted = [n for n, p in out.pids.items() if n != "router" and p not in now]
    except Exception as exc:  # noqa: BLE001 - reported in the results
        out.state, out.message = "failed", error_text(exc)
        progress(f"[soak] FAILED: {out.message}")
        if not isinstance(exc, RuntimeError):
            progress(traceback.format_exc())
    finally:
        if router is not None:
            progress(f"[soak] {router.stop()}")
    return out


# -- report ------------------------------------------------------------------------------


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def mb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+,.1f} MB"


def quota_headline(out: QuotaOutcome) -> str:
    if out.state == "skipped":
        return "quotas: not run (--only soak)"
    if out.state == "refused":
        reason = out.message.split("quotas:", 1)[-1].split("(", 1)[0].strip() or "config error"
        return f"quotas: not measured, this router refuses the quotas config ({reason})"
    if out.state != "measured":
        return f"quotas: FAILED ({out.message[:120]})"
    s = out.summary()
    text = (f"quotas: steady p99 with flood / alone {fmt_ratio(s.ratio)} (target <= {TARGET_RATIO:g}), "
            f"flood shed {s.flood.shed:.0%} ({s.steady_errors:,} steady error{'' if s.steady_errors == 1 else 's'})")
    notes = []
    if s.refusal_problems():
        notes.append("flood refusals NOT all RESOURCE_EXHAUSTED naming flood")
    if out.rest is not None and out.rest.problems():
        notes.append("REST check failed")
    if s.client_void:
        notes.append("client behind schedule: void")
    return text + (f" [{'; '.join(notes)}]" if notes else "")


def soak_headline(out: SoakOutcome) -> str:
    if out.state == "skipped":
        return "soak: not run (--only quotas)"
    if out.state != "measured":
        return f"soak: FAILED ({out.message[:120]})"
    growth = ", ".join(f"{n} {mb(out.growth_mb(n))}" for n in out.names)
    errors = f", {out.error_count:,} errors" if out.error_count else ""
    restarted = f", restarted: {', '.join(out.restarted)}" if out.restarted else ""
    return (f"soak {out.requests:,} requests: RSS growth {growth} (target < {TARGET_RSS_MB:g} MB)"
            f"{errors}{restarted}")


def headline(quotas: QuotaOutcome, soak: SoakOutcome) -> str:
    return f"{quota_headline(quotas)}; {soak_headline(soak)}"


def mean_cores(phases: Sequence[Phase], flooded: bool, name: str) -> float:
    values = [p.cores[name] for p in phases if p.flooded == flooded and name in p.cores]
    return sum(values) / len(values) if values else float("nan")


def print_quotas(out: QuotaOutcome, args: argparse.Namespace) -> None:
    import yaml

    print(f"1. tenant isolation: router with {WORKERS} workers, {os.cpu_count()} CPUs; quotas: "
          f"{yaml.safe_dump(QUOTAS, default_flow_style=True, sort_keys=False, width=10_000).strip()}")
    if out.state == "skipped":
        print("   not run (--only soak)")
        return
    if out.state == "refused":
        print(f"   NOT MEASURED: the router refuses the config ({out.message}); the quota feature has not "
              f"landed in this tree")
        return
    if out.state == "failed" and not out.phases:
        print(f"   FAILED: {out.message}")
        return
    print(f"   steady tenant: open-loop gRPC at {out.rate:,.0f} req/s, batch-1 Predicts, metadata "
          f"{TENANT_HEADER}: {STEADY}, {args.seconds:g}s per window; flood: closed loop, {args.flood_concurrency} "
          f"in flight over {args.flood_channels} connections, {TENANT_HEADER}: {FLOOD}; "
          f"{args.rounds} rounds turn about")
    procs = [k for k in (out.phases[0].cores if out.phases else {}) if k != "others"]
    rows = []
    for p in out.phases:
        st, late = p.load.latency_stats(), p.load.lateness_stats()
        f = p.flood
        rows.append([p.round, p.name, len(p.load), fmt_ms(st.p50), fmt_ms(st.p99), fmt_ms(st.p999), fmt_ms(st.max),
                     codes_text(st.error_codes()), fmt_ms(late.p99),
                     f"{f.call_rate:,.0f}" if f else "-", f"{f.accepted_rate:,.0f}" if f else "-",
                     f"{f.shed:.1%}" if f else "-",
                     *(f"{p.cores.get(k, float('nan')):.2f}" for k in procs), f"{p.cores.get('others', 0):.2f}"])
    print_table(["round", "steady", "sent", "p50", "p99", "p999", "max", "errors", "late p99",
                 "flood calls/s", "accepted/s", "shed", *(f"cores {k}" for k in procs), "others"], rows)
    print("   (ms from each request's scheduled send; late = how far behind schedule the client sent; "
          "cores used in the window by each process)")
    if out.state == "failed":
        print(f"   FAILED after {len(out.phases)} windows: {out.message}")
    try:
        s = out.summary()
    except ValueError:
        return
    ratios = ", ".join(fmt_ratio(r) for r in s.round_ratios)
    router_alone = mean_cores(out.phases, False, "router")
    router_flood = mean_cores(out.phases, True, "router")
    print_table(["steady tenant", "p50 ms", "p99 ms"],
                [["alone", fmt_ms(s.alone_p50), fmt_ms(s.alone_p99)],
                 ["with flood", fmt_ms(s.flood_p50), fmt_ms(s.flood_p99)]])
    print(f"   p99 with flood / alone: {fmt_ratio(s.ratio)} pooled (per round: {ratios}; target <= "
          f"{TARGET_RATIO:g}); steady errors: {s.steady_errors:,} of {s.steady_requests:,} (target 0)")
    fl = s.flood
    print(f"   flooder: {fl.calls:,} calls in {fl.seconds:.1f}s ({fl.call_rate:,.0f}/s), accepted {fl.ok:,} "
          f"({fl.accepted_rate:,.0f}/s), {EXHAUSTED} {fl.exhausted:,} (shed {fl.shed:.1%}), other "
          f"{fl.other:,}; {EXHAUSTED} naming {FLOOD!r}: {fl.named:,}, with a retry-after trailer: "
          f"{fl.retry_after:,}")
    for code, kinds in sorted(fl.kinds.items()):
        for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:3]:
            print(f"     {code} x{n:,}: {kind}")
    per_call = (router_flood - router_alone) / fl.call_rate * 1e6 if fl.call_rate > 0 else float("nan")
    print(f"   router CPU: {router_alone:.2f} cores alone, {router_flood:.2f} with the flood (one event loop: 1.0 is "
          f"its ceiling); the flood's calls cost it ~{per_call:,.0f} us of CPU each, refusals included")
    for problem in s.refusal_problems():
        print(f"   PROBLEM: {problem}")
    if out.rest is not None:
        r = out.rest
        print(f"   REST while flooding: flooder {dict(sorted(r.flood_status.items()))} (429 with Retry-After "
              f"{r.flood_retry_after:,}, naming {FLOOD!r} {r.flood_named:,}); steady "
              f"{dict(sorted(r.steady_status.items()))}")
        for problem in r.problems():
            print(f"   PROBLEM: {problem}")
    if s.client_void:
        print("   VOID: in some window the steady client fell behind its schedule, or its own delay made up "
              "half its p99: those latencies are not the router's")
    for p in out.phases:
        for message, n in p.load.errors.most_common(3):
            print(f"   ERROR steady round {p.round} {p.name}: {n}x {message}")


def print_soak(out: SoakOutcome) -> None:
    if out.state == "skipped":
        print("2. soak: not run (--only quotas)")
        return
    print(f"2. soak: {out.requests:,} gRPC Predicts with the inputs in random order on the wire, closed loop at "
          f"concurrency {out.concurrency}, after a warm-up of {out.warmup:,}")
    if out.state == "failed":
        print(f"   FAILED: {out.message}")
        if not out.samples:
            return
    if out.seconds:
        print(f"   {out.requests / out.seconds:,.0f} req/s over {out.seconds:.1f}s, p50 "
              f"{percentile(out.latencies, 50) * 1000:.2f} ms, p99 {percentile(out.latencies, 99) * 1000:.2f} ms, "
              f"{out.orders} of {math.factorial(len(INPUT_NAMES))} input orders sent, {out.error_count:,} errors")
    names = out.names
    rows = []
    for s in out.samples:
        rows.append([s.label, s.done, *(f"{v / 2**20:,.1f}" if v is not None else "gone"
                                         for v in (s.rss.get(n) for n in names))])
    print_table(["RSS sample", "answered", *(f"{n} MB" for n in names)], rows)
    if any(s.label == "end" for s in out.samples):
        print_table(["process", "pid", "growth", "peak growth"],
                    [[n, out.pids[n], mb(out.growth_mb(n)), mb(out.peak_growth_mb(n))] for n in names])
        verdict = "within" if out.within_target() else "OVER"
        print(f"   growth = end - baseline (both sampled {IDLE_SETTLE_S:g}s after the load drained); "
              f"{verdict} the target of < {TARGET_RSS_MB:g} MB per process")
    if out.restarted:
        print(f"   PROBLEM: workers restarted during the soak: {', '.join(out.restarted)}")
    for message, n in out.errors.most_common(5):
        print(f"   ERROR soak: {n}x {message}")


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_quotas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per steady window (default 5)")
    p.add_argument("--rate", type=float, default=500.0, help="steady tenant's open-loop rate, req/s (default 500)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (alone, with flood) windows (default 3)")
    p.add_argument("--flood-concurrency", type=int, default=256, help="flooder's calls in flight (default 256)")
    p.add_argument("--flood-channels", type=int, default=4, help="flooder's gRPC connections (default 4)")
    p.add_argument("--soak-requests", type=int, default=200_000, help="soak requests after the warm-up "
                                                                        "(default 200,000)")
    p.add_argument("--soak-warmup", type=int, help="soak warm-up requests (default 20,000, at most a fifth of "
                                                   "--soak-requests)")
    p.add_argument("--soak-concurrency", type=int, default=16, help="soak calls in flight (default 16)")
    p.add_argument("--seed", type=int, default=1, help="seed of the soak's input orders and values")
    p.add_argument("--only", choices=("quotas", "soak"), help="run one part only")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "ctr",
                   help="the demo model's base directory (default models/ctr, built by `make demo`)")
    # The flooder child process (started by the benchmark itself).
    p.add_argument("--flood-child", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--flood-tenant", default=FLOOD, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flood_child:
        return args
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    if args.rate <= 0:
        p.error("--rate must be > 0")
    for name in ("rounds", "flood_concurrency", "flood_channels", "soak_requests", "soak_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.soak_warmup is None:
        args.soak_warmup = min(20_000, args.soak_requests // 5)
    if args.soak_warmup < 0:
        p.error("--soak-warmup must be >= 0")
    args.model_dir = args.model_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flood_child:
        gc.disable()
        run_async(flood_child(args.flood_child, args.flood_concurrency, args.flood_channels, args.flood_tenant))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    latest_version(args.model_dir)  # SystemExit without `make demo`
    load_average = os.getloadavg()[0]
    if load_average > 0.5:
        progress(f"note: load average {load_average:.2f} before the run: other processes share these "
                 f"{os.cpu_count()} CPUs, expect noisy tails")
    quotas = run_quotas(args) if args.only != "soak" else QuotaOutcome(state="skipped")
    soak = run_soak(args) if args.only != "quotas" else SoakOutcome(requests=args.soak_requests, state="skipped")
    print_quotas(quotas, args)
    print_soak(soak)
    print(headline(quotas, soak), flush=True)
    failed = quotas.state == "failed" or soak.state == "failed" or soak.error_count > 0 or bool(soak.restarted)
    if quotas.state == "measured":
        s = quotas.summary()
        failed = failed or s.steady_errors > 0 or bool(s.refusal_problems())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
