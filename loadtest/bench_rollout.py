"""The latency spike of a hot model update, in paired rounds under open-loop load.

    python -m loadtest.bench_rollout [--rounds 5] [--seconds 30] [--load 0.5 | --rate R]
                                     [--scenario staged|in_place|staged+jemalloc|staged+overlap]
                                     [--model-dir DIR] [--vocab 940000] [--set KEY=VALUE ...]
                                     [--drain-only SECONDS] [--perf-sched DIR]

One router (2 spawned workers, ``poll_interval_s: 0.5``, batching at its
defaults) serves a ~300 MB CTR model (``workers.demo_model``, 5 embedding
tables of ``--vocab`` x 16 float32; versions 1 .. rounds+1 are built once
into ``--model-dir``, default ``models/ctr-large``, and reused).  Open-loop
gRPC load (``loadtest.openloop``: batch-1 Predicts with the project's
wire-compatible messages under the official method path, sent on a fixed
schedule, never waiting for earlier answers; latency counted from each
request's *scheduled* time, so a stall shows in full) runs without a break
for the whole session, at ``--load`` (default 0.5) of the pool's capacity,
measured first (closed loop, c=64, against the same config), or ``--rate``.

After a few seconds of warm-up, each round is two runs of ``--seconds``
each, back to back under the same load:

* **control**: nothing changes;
* **update**: ``--appear-at`` seconds in, the next version (v2, then v3,
  v4 ...) is renamed into the base path; the rollout must finish inside the
  run (the run fails otherwise).

then ``--settle`` seconds of load that no run measures, so that what an
update leaves behind does not land in the next control run.  Both runs of a
round are measured over their whole length, so their percentiles compare
like with like; the rollout's watch (admin API and REST model status,
polled every 0.1 s) polls through control runs too.  The figures: the median
over rounds of each run's p999 (and p99), updating against control.  On
these machines the p999 of two quiet 20 s windows can differ several times,
which is why a single pair proves nothing and the medians are the figure.

Where the excess goes (``loadtest.rollout_phases``): each update run is cut
at the rollout's events (from the admin API) into segments (A drain, A
unload, A load, A warm, switch, B drain ...; A is the worker converted
first), and for each segment the report shows its requests' excess latency
(ms above the round's control p99, summed) and how many exceeded the
control p999, beside the CPU every process used in it (``loadtest.proctrace``:
per thread, from ``/proc``), against what the same process used in the
control run, and how long the serving worker's and the router's event-loop
threads waited for a CPU.

Two diagnostics: ``--drain-only S`` makes every "update" run take a worker
out of rotation for S seconds through the admin API and put it back, with
no version change (what a pool one worker short costs, apart from the
conversion); ``--perf-sched DIR`` records the whole machine's scheduler
(``perf sched record``) during each update run, for ``perf sched latency``.
``--set rollout.pace_run_ms=0`` turns the pacing of conversions off (the
"before" of the README's attribution).

Prints progress on stderr; on stdout the config, a table per round, the
segment table, the client's lateness, the path of a PNG
(``loadtest/results/rollout-<timestamp>.png``: every run, latency against
time, the rollout's phases shaded) and of the data (``.npz``: every request,
the rollout entries, the segment rows), and as its last line the figure.
Exits 1 if a run failed or any request did.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.common import start_router as common_start_router
from loadtest.common import (
    GRPC_OPTIONS,
    ROOT,
    RouterProcess,
    child_env,
    closed_loop,
    error_text,
    print_table,
    progress,
    run_async,
)
from loadtest.openloop import LatencyStats, OpenLoop, OpenLoopResult, codes_text, fmt_ms
from loadtest.proctrace import ProcTrace
from loadtest.rollout_phases import SegmentRow, attribute, combine, machine_text, roles_text, segments
from loadtest.rollout_plot import fmt_ratio, plot
from loadtest.rollout_watch import RolloutWatch

MODEL_NAME = "ctr"
DEFAULT_VOCAB = 940_000  # 5 tables x vocab x 16 float32 = ~300 MB
WORKERS = 2
# The config of every scenario, then the scenario's own keys on top (merged deeply).
BASE_CONFIG: dict[str, Any] = {
    "workers": {"count": WORKERS},
    "poll_interval_s": 0.5,
    "admin": {"port": 0},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "staged": {"rollout": {"strategy": "staged"}},
    "in_place": {"rollout": {"strategy": "in_place"}},
    "staged+jemalloc": {"rollout": {"strategy": "staged"}, "workers": {"allocator": "jemalloc"}},
    "staged+overlap": {"rollout": {"strategy": "staged", "mode": "overlap"}},
}
CAPACITY_CONCURRENCY = 64
CAPACITY_RUNS = 3
TARGET_P999 = 1.25  # median updating p999 / median control p999, at most
TARGET_P99 = 1.10
WARM_S = 5.0  # load before the first run
REQUEST_DEADLINE_S = 30.0
ROUTER_READY_TIMEOUT_S = 600.0
WATCH_POLL_S = 0.1
BUSY_LOAD_AVERAGE = 0.5  # before the run: something else is using the machine
BUSY_OTHERS_CORES = 0.2  # cores used by other processes in a run: its numbers are noisy
RESULTS_DIR = ROOT / "loadtest" / "results"
CLIENT_VOID_SHARE = 0.5  # the client's own p99 delay beyond this share of the latency p99: void
# The dense layers of the demo model, to tell a model dir's vocab from its size:
# kernels 100x256, 256x128, 128x1 and their biases, float32.
_DENSE_BYTES = 4 * (100 * 256 + 256 + 256 * 128 + 128 + 128 + 1)
_TABLE_ROW_BYTES = 5 * 16 * 4


# -- the model ---------------------------------------------------------------------


def default_model_dir(vocab: int) -> Path:
    return ROOT / "models" / ("ctr-large" if vocab == DEFAULT_VOCAB else f"ctr-vocab{vocab}")


def variables_bytes(version_dir: Path) -> int:
    return sum(p.stat().st_size for p in (version_dir / "variables").glob("variables.data-*"))


def built_vocab(version_dir: Path) -> int:
    """The embedding vocab a demo model version was built with, from the size of its variables."""
    return round((variables_bytes(version_dir) - _DENSE_BYTES) / _TABLE_ROW_BYTES)


def ensure_model(model_dir: Path, vocab: int, versions: Sequence[int]) -> None:
    """``versions`` of the demo CTR model with ``vocab`` rows per table under ``model_dir``.

    Builds a missing version with ``python -m workers.demo_model`` (a few
    seconds each at ~300 MB; a heartbeat on stderr meanwhile).  An existing
    version built with another vocab is an error, not silently reused.
    """
    for version in versions:
        version_dir = model_dir / str(version)
        if (version_dir / "saved_model.pb").is_file():
            found = built_vocab(version_dir)
            if abs(found - vocab) > 0.01 * vocab + 100:
                raise SystemExit(f"{version_dir} holds a model of vocab ~{found:,}, not {vocab:,}: "
                                 f"pass another --model-dir, or remove it to rebuild")
            continue
        size_mb = (vocab * _TABLE_ROW_BYTES + _DENSE_BYTES) / 1e6
        progress(f"building model v{version} (vocab {vocab:,}, ~{size_mb:,.0f} MB) into {version_dir} ...")
        argv = [sys.executable, "-m", "workers.demo_model", "--out", str(model_dir), "--versions",
                str(version), "--vocab", str(vocab)]
        started = time.monotonic()
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
            while True:
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    progress(f"  building v{version}: {time.monotonic() - started:.0f}s ...")
            log.seek(0)
            output = log.read().decode(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"building v{version} failed (exit {proc.returncode}):\n{output[-3000:]}")
        progress(f"  built v{version} in {time.monotonic() - started:.1f}s "
                 f"({variables_bytes(version_dir) / 1e6:,.0f} MB)")
    sizes = {variables_bytes(model_dir / str(v)) / 1e6 for v in versions}
    progress(f"model versions {list(versions)} in {model_dir} ({max(sizes):,.0f} MB each)")


# -- configs -----------------------------------------------------------------------


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, mappings deeply, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def setting(text: str) -> dict[str, Any]:
    """``rollout.mode=overlap`` -> ``{"rollout": {"mode": "overlap"}}`` (the value read as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (dotted key), got {text!r}")
    out: dict[str, Any] = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
    return out


def scenario_config(name: str, base_path: Path, extra: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    config = merged(BASE_CONFIG, SCENARIOS[name])
    for more in extra:
        config = merged(config, more)
    return {"models": [{"name": MODEL_NAME, "base_path": str(base_path)}], **config}


def config_text(config: Mapping[str, Any]) -> str:
    """A config on one line, flow-style YAML, without the per-run base path."""
    import yaml

    shown = {k: v for k, v in config.items() if k != "models"}
    return yaml.safe_dump(shown, default_flow_style=True, sort_keys=False, width=10_000).strip()


def staging_dir(base: Path, version: int) -> Path:
    return base / f".{version}.staging"  # not an integer: no version until renamed


def make_base_path(model_dir: Path, versions: Sequence[int]) -> Path:
    """A fresh base path holding the first version, and the others beside it under names the router ignores."""
    base = Path(tempfile.mkdtemp(prefix="tfs-rollout-"))
    first, *rest = versions
    shutil.copytree(model_dir / str(first), base / str(first))
    for version in rest:
        shutil.copytree(model_dir / str(version), staging_dir(base, version))
    return base


def start_router(config: Mapping[str, Any], label: str) -> RouterProcess:
    return common_start_router(config, label, workers=WORKERS, timeout=ROUTER_READY_TIMEOUT_S)


# -- gRPC client -------------------------------------------------------------------


class WrongAnswer(Exception):
    def code(self) -> Any:
        return _Code("WRONG_ANSWER")

    def details(self) -> str:
        return str(self)


@dataclass(frozen=True)
class _Code:
    name: str


# The demo CTR model's inputs (workers.demo_model), written out here so the
# client process needs no TensorFlow: a lighter client (no 500 MB heap for
# its garbage collector to walk) keeps its own pauses out of the tails.
ID_INPUTS = ("user_id", "item_id", "category", "city", "device")
DENSE_INPUT, DENSE_DIM = "dense", 20
DISTINCT_REQUESTS = 16


def request_feed(seed: int = 0) -> Any:
    """An endless cycle of distinct batch-1 PredictRequests (the project's wire-compatible messages)."""
    import numpy as np

    from protos import predict_pb2
    from shared.tensor import fill

    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(DISTINCT_REQUESTS):
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL_NAME
        for name in ID_INPUTS:
            fill(req.inputs[name], rng.integers(0, 1_000_000, size=1, dtype=np.int64))
        fill(req.inputs[DENSE_INPUT], rng.standard_normal((1, DENSE_DIM)).astype(np.float32))
        requests.append(req)
    return itertools.cycle(requests)


def predict_stub(channel: Any) -> Any:
    """TF Serving's Predict under its official method path, with the project's messages."""
    from protos import predict_pb2

    class Stub:
        Predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                      request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                      response_deserializer=predict_pb2.PredictResponse.FromString)

    return Stub()


def predict_caller(stub: Any, feed: Any, versions: Sequence[int]) -> Any:
    """An async ``call()`` doing one checked Predict; returns the version that answered."""
    known = frozenset(versions)

    async def call() -> int:
        resp = await stub.Predict(next(feed), timeout=REQUEST_DEADLINE_S)
        version = resp.model_spec.version.value
        if "probability" not in resp.outputs:
            raise WrongAnswer(f"outputs {sorted(resp.outputs)} lack probability")
        dims = [d.size for d in resp.outputs["probability"].tensor_shape.dim]
        if dims != [1] or version not in known:
            raise WrongAnswer(f"probability shape {dims}, version {version}")
        return int(version)

    return call


# -- capacity ----------------------------------------------------------------------


async def measure_capacity(address: str, seconds: float, runs: int = CAPACITY_RUNS) -> float:
    """The median of ``runs`` closed-loop runs: one run's figure moved 4.1-5.2k req/s between sessions."""
    import grpc

    rates = []
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        call = predict_caller(predict_stub(channel), request_feed(), [1])
        await call()
        for i in range(runs):
            result = await closed_loop(call, concurrency=CAPACITY_CONCURRENCY, seconds=seconds, warmup=1.0,
                                       label="capacity")
            if result.error_count:
                progress(f"  capacity run errors: {dict(result.errors)}")
            if not result.calls:
                raise RuntimeError(f"capacity run got no answer: {dict(result.errors)}")
            progress(f"  capacity run {i + 1}/{runs}: {result.rate:,.0f} req/s (closed loop c={CAPACITY_CONCURRENCY}, "
                     f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, {result.error_count} errors)")
            rates.append(result.rate)
    return statistics.median(rates)


# -- the session -------------------------------------------------------------------


@dataclass
class Run:
    """One measured run: ``start`` and ``end`` on the load's clock (``perf_counter``)."""

    round: int
    kind: str  # "control" or "update"
    start: float
    end: float = float("nan")
    old: int = 0  # the version served before (update runs) / throughout (control runs)
    new: int = 0
    appeared: float = float("nan")  # when the new version was renamed in (load clock)
    finished: float = float("nan")  # when the rollout ended (load clock)
    signal: str = ""
    rollout: dict[str, Any] | None = None
    error: str = ""
    cpu_others: float = float("nan")  # cores used by processes outside this benchmark

    @property
    def label(self) -> str:
        return f"round {self.round} {self.kind}" + (f" v{self.old}->v{self.new}" if self.kind == "update" else "")


@dataclass
class Session:
    scenario: str
    config: dict[str, Any]
    rate: float
    rate_note: str
    seconds: float
    load: OpenLoopResult[int] | None = None
    runs: list[Run] = field(default_factory=list)
    trace: ProcTrace | None = None
    pids: dict[str, int] = field(default_factory=dict)
    error: str = ""
    drain_s: float = 0.0  # --drain-only: update runs drain a worker this long instead of updating
    perf_dir: Path | None = None  # --perf-sched: where each update run's scheduler trace goes

    def stats(self, run: Run) -> LatencyStats:
        assert self.load is not None
        return self.load.latency_stats(self.load.window(run.start, run.end))

    def pairs(self) -> list[tuple[Run, Run]]:
        """(control, update) of every round whose runs both completed."""
        by_round: dict[int, dict[str, Run]] = {}
        for run in self.runs:
            by_round.setdefault(run.round, {})[run.kind] = run
        return [(r["control"], r["update"]) for _, r in sorted(by_round.items())
                if "control" in r and "update" in r and not r["control"].error and not r["update"].error
                and r["update"].end == r["update"].end]


def machine_busy_s() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cores(trace: ProcTrace, t0: float, t1: float, busy0: float, busy1: float) -> float:
    """Cores used between t0 and t1 by processes the trace does not follow."""
    ours = sum(u.cpu_s for u in trace.between(t0, t1).values())
    return max(0.0, (busy1 - busy0 - ours) / (t1 - t0))


async def watch_nothing(session_http: Any, router: RouterProcess, admin_url: str | None, seconds: float) -> None:
    """A control run's polls: the same two endpoints an update run's watch polls, as often."""
    from loadtest.rollout_watch import admin_headers

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        urls = [(f"{router.rest_url}/v1/models/{MODEL_NAME}", {})]
        if admin_url is not None:
            urls.append((admin_url, admin_headers()))
        for url, headers in urls:
            try:
                async with session_http.get(url, headers=headers) as resp:
                    await resp.read()
            except Exception:  # noqa: BLE001 - only the load matters here
                pass
        await asyncio.sleep(WATCH_POLL_S)


async def drive(s: Session, router: RouterProcess, admin_url: str | None, base: Path, versions: Sequence[int],
                appear_at: float, settle: float, rollout_timeout: float) -> None:
    import aiohttp
    import grpc

    async with grpc.aio.insecure_channel(router.grpc_address, options=GRPC_OPTIONS) as channel, \
            aiohttp.ClientSession() as http:
        call = predict_caller(predict_stub(channel), request_feed(), versions)
        first = await call()
        if first != versions[0]:
            raise RuntimeError(f"the router answered with version {first} before any update, "
                               f"expected {versions[0]}")
        loop = OpenLoop(call, s.rate)
        stop = asyncio.Event()
        clock = loop.clock
        progress(f"[{s.scenario}] open-loop load at {s.rate:,.0f} req/s: {WARM_S:g}s warm-up, then "
                 f"{len(versions) - 1} rounds of control + update runs of {s.seconds:g}s")
        load_task = asyncio.create_task(loop.run(stop=stop, drain_timeout=REQUEST_DEADLINE_S + 5))
        try:
            await asyncio.sleep(WARM_S)
            for i, (old, new) in enumerate(zip(versions, versions[1:]), start=1):
                for kind in ("control", "update"):
                    if load_task.done():
                        load_task.result()
                    if s.drain_s:  # nothing changes version
                        old = new = versions[0]
                    run = Run(round=i, kind=kind, start=clock(), old=old, new=new if kind == "update" else old)
                    s.runs.append(run)
                    busy0 = machine_busy_s()
                    try:
                        if kind == "control":
                            await watch_nothing(http, router, admin_url, s.seconds)
                        else:
                            await update_run(s, run, http, router, admin_url, base, appear_at, rollout_timeout,
                                             clock)
                    except Exception as exc:  # noqa: BLE001 - reported per run
                        run.error = error_text(exc)
                        progress(f"[{run.label}] FAILED: {run.error}")
                    await asyncio.sleep(max(0.0, run.start + s.seconds - clock()))
                    run.end = run.start + s.seconds
                    if s.trace is not None:
                        run.cpu_others = others_cores(s.trace, run.start, run.end, busy0, machine_busy_s())
                    # Only counts here: percentiles over the run so far would stall this
                    # loop for tens of ms, and the requests due meanwhile would carry it.
                    progress(f"[{run.label}] done: {loop.sent_count:,} requests sent so far, {loop.inflight} in "
                             f"flight, {loop.error_count} errors")
                    if run.error:
                        raise RuntimeError(f"{run.label}: {run.error}")
                await asyncio.sleep(settle)
        finally:
            stop.set()
            s.load = await load_task
        progress(f"[{s.scenario}] load done: {len(s.load):,} requests sent, {s.load.latency_stats().errors} errors, "
                 f"at most {s.load.max_inflight} in flight")


async def drain_run(s: Session, run: Run, http: Any, router: RouterProcess, admin_url: str | None,
                    appear_at: float, clock: Any) -> None:
    """The disturbance without an update: worker w0 out of rotation for ``s.drain_s`` (the pool one short)."""
    from loadtest.rollout_watch import admin_headers

    if admin_url is None:
        raise RuntimeError("--drain-only needs the router's admin API")
    base_url = admin_url.rsplit("/v1/admin/", 1)[0]

    async def post(action: str) -> None:
        async with http.post(f"{base_url}/v1/admin/workers/w0/{action}", headers=admin_headers()) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"{action} w0: HTTP {resp.status} {(await resp.read())[:200]!r}")

    await watch_nothing(http, router, admin_url, appear_at)
    run.appeared = clock()
    await post("drain")
    drained = time.time()
    await watch_nothing(http, router, admin_url, s.drain_s)
    await post("undrain")
    run.finished = clock()
    run.signal = "drain only"
    run.rollout = {"events": [{"time": drained, "worker": "w0", "phase": "drained", "message": ""},
                              {"time": time.time(), "worker": "w0", "phase": "join", "message": ""},
                              {"time": time.time(), "worker": None, "phase": "done", "message": ""}]}
    progress(f"[{run.label}] w0 drained for {run.finished - run.appeared:.2f}s")


async def update_run(s: Session, run: Run, http: Any, router: RouterProcess, admin_url: str | None, base: Path,
                     appear_at: float, rollout_timeout: float, clock: Any) -> None:
    if s.drain_s:
        await drain_run(s, run, http, router, admin_url, appear_at, clock)
        return
    await watch_nothing(http, router, admin_url, max(0.0, appear_at - 0.5))
    perf = await start_perf(s, run)
    await watch_nothing(http, router, admin_url, min(0.5, appear_at))
    try:
        await rename_and_watch(s, run, http, router, admin_url, base, rollout_timeout, clock)
        await asyncio.sleep(1.0)
    finally:
        await stop_perf(perf)


async def start_perf(s: Session, run: Run) -> Any:
    """``perf sched record`` of the whole machine (``--perf-sched DIR``), or None."""
    if s.perf_dir is None:
        return None
    s.perf_dir.mkdir(parents=True, exist_ok=True)
    out = s.perf_dir / f"round{run.round}.data"
    proc = await asyncio.create_subprocess_exec("perf", "sched", "record", "-a", "-o", str(out),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    progress(f"[{run.label}] perf sched record -> {out}")
    return proc


async def stop_perf(proc: Any) -> None:
    if proc is None:
        return
    import signal

    proc.send_signal(signal.SIGINT)
    await proc.wait()


async def rename_and_watch(s: Session, run: Run, http: Any, router: RouterProcess, admin_url: str | None,
                           base: Path, rollout_timeout: float, clock: Any) -> None:
    os.rename(staging_dir(base, run.new), base / str(run.new))
    run.appeared = clock()
    appeared_wall = time.time()
    progress(f"[{run.label}] version {run.new} appeared {run.appeared - run.start:.1f}s into the run")
    watch = RolloutWatch(http, admin_url, router.rest_url, model=MODEL_NAME, old=run.old, new=run.new,
                         label=run.label, appeared=appeared_wall, poll_s=WATCH_POLL_S)
    try:
        end_wall, run.signal = await watch.wait_finished(rollout_timeout)
    finally:
        run.rollout = watch.entry
    run.finished = run.appeared + (end_wall - appeared_wall)
    if admin_url is not None and watch.admin_ok:
        await watch.poll_admin()  # the complete event list
        run.rollout = watch.entry
    state = (run.rollout or {}).get("state")
    progress(f"[{run.label}] rollout finished {run.finished - run.appeared:.2f}s after the version appeared "
             f"(signal: {run.signal}{f', rollout {state}' if state else ''})")
    if state not in (None, "done"):
        raise RuntimeError(f"rollout {state}: {(run.rollout or {}).get('error')}")
    if run.finished > run.start + s.seconds - 1.0:
        raise RuntimeError(f"the rollout outlasted the run (finished {run.finished - run.start:.1f}s into a "
                           f"{s.seconds:g}s run): use a longer --seconds")


def run_session(s: Session, model_dir: Path, versions: Sequence[int], appear_at: float, settle: float,
                rollout_timeout: float) -> None:
    base = make_base_path(model_dir, versions)
    s.config["models"][0]["base_path"] = str(base)
    router = None
    try:
        router = start_router(s.config, s.scenario)
        admin_url = router.admin_url()
        progress(f"[{s.scenario}] admin API: {admin_url or 'none printed (REST model status will tell the end)'}")
        router_pid = router.pid

        def processes() -> dict[str, int]:
            found = {"client": os.getpid(), "router": router_pid}
            for pid in router.worker_pids():
                name = worker_name(pid)
                if name:
                    found[name] = pid
            return found

        s.pids = processes()
        s.trace = ProcTrace(processes, interval=0.05, clock=time.perf_counter)
        # The client's own collector must not pause it mid-measurement: what
        # start-up built is frozen, and collection is off while the load runs
        # (a session's garbage is a few hundred MB at most).
        gc.collect()
        gc.freeze()
        gc.disable()
        s.trace.start()
        try:
            run_async(drive(s, router, admin_url, base, versions, appear_at, settle, rollout_timeout))
        finally:
            s.trace.stop()
            gc.enable()
    except Exception as exc:  # noqa: BLE001 - reported in the output
        s.error = error_text(exc)
        progress(f"[{s.scenario}] FAILED: {s.error}")
        if not isinstance(exc, (TimeoutError, RuntimeError)):
            progress(traceback.format_exc())
    finally:
        if router is not None:
            progress(f"[{s.scenario}] {router.stop()}")
        shutil.rmtree(base, ignore_errors=True)


def worker_name(pid: int) -> str | None:
    """``w0`` for a worker process listening on ``.../w0.sock`` (from its command line)."""
    from loadtest.common import process_cmdline

    for arg in process_cmdline(pid):
        if arg.endswith(".sock"):
            return Path(arg).stem
    return None


# -- figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    control_p999: float
    update_p999: float
    control_p99: float
    update_p99: float
    rounds: int

    @property
    def p999_ratio(self) -> float:
        return self.update_p999 / self.control_p999 if self.control_p999 > 0 else float("nan")

    @property
    def p99_ratio(self) -> float:
        return self.update_p99 / self.control_p99 if self.control_p99 > 0 else float("nan")


def figures(s: Session) -> Figures | None:
    pairs = s.pairs()
    if not pairs:
        return None
    ctl = [s.stats(c) for c, _ in pairs]
    upd = [s.stats(u) for _, u in pairs]
    return Figures(statistics.median(x.p999 for x in ctl), statistics.median(x.p999 for x in upd),
                   statistics.median(x.p99 for x in ctl), statistics.median(x.p99 for x in upd), len(pairs))


def segment_rows(s: Session) -> dict[int, list[SegmentRow]]:
    """Round -> the attribution rows of its update run."""
    assert s.load is not None and s.trace is not None
    out = {}
    for control, update in s.pairs():
        segs = segments(update.rollout or {}, update.start, update.end, update.appeared, s.load.wall_offset)
        out[update.round] = attribute(s.load, segs, s.stats(control), s.trace, control.start, control.end)
    return out


# -- report ------------------------------------------------------------------------


def report(s: Session, load_average: float, plot_path: Path | None, data_path: Path | None) -> str:
    """Prints the tables on stdout; returns the headline (the last line)."""
    print(f"hot update of model {MODEL_NAME} under open-loop gRPC load: {s.rate:,.0f} req/s ({s.rate_note}), "
          f"batch-1 Predicts; {os.cpu_count()} CPUs (load average {load_average:.2f} before the run), "
          f"{WORKERS} workers; paired runs of {s.seconds:g}s, each measured whole")
    print(f"  {s.scenario}: {config_text(s.config)}")
    rows = []
    for run in s.runs:
        if run.end != run.end:
            continue
        st = s.stats(run)
        took = f"{run.finished - run.appeared:.2f}" if run.finished == run.finished else "-"
        rows.append([run.round, run.kind, f"v{run.old}->v{run.new}" if run.kind == "update" else f"v{run.old}",
                     f"{st.requests:,}", fmt_ms(st.p50), fmt_ms(st.p99), fmt_ms(st.p999), fmt_ms(st.max), took,
                     f"{run.cpu_others:.2f}", codes_text(st.error_codes()), run.error[:80] or "ok"])
    print_table(["round", "run", "versions", "requests", "p50", "p99", "p999", "max", "rollout s",
                 "others' cores", "errors", "state"], rows)
    print("(ms from each request's scheduled send time, over the whole run; rollout s: from the version's "
          f"appearance to the old one unloaded; others' cores: CPU used by processes outside this benchmark, "
          f"beyond {BUSY_OTHERS_CORES:g} the tails are theirs too)")
    pairs = s.pairs()
    ratio_rows = []
    for control, update in pairs:
        c, u = s.stats(control), s.stats(update)
        ratio_rows.append([control.round, f"{fmt_ms(u.p999)} / {fmt_ms(c.p999)}", fmt_ratio(u.p999 / c.p999),
                           f"{fmt_ms(u.p99)} / {fmt_ms(c.p99)}", fmt_ratio(u.p99 / c.p99)])
    fig = figures(s)
    if fig is not None:
        ratio_rows.append(["median", f"{fmt_ms(fig.update_p999)} / {fmt_ms(fig.control_p999)}",
                           fmt_ratio(fig.p999_ratio), f"{fmt_ms(fig.update_p99)} / {fmt_ms(fig.control_p99)}",
                           fmt_ratio(fig.p99_ratio)])
        print_table(["round", "p999 updating / control (ms)", "ratio", "p99 updating / control (ms)", "ratio"],
                    ratio_rows)
    if pairs and s.trace is not None and s.load is not None:
        by_round = segment_rows(s)
        print("where the excess goes (update runs cut at the rollout's events, summed over rounds; A: the worker "
              "converted first, B: second; excess: ms above the round's control p99, summed over requests, "
              "beside what the control run had of it in as many seconds; share: of the excess beyond that; cores: CPU used in the segment, and its change from the control run; wait: ms per second the "
              "thread waited for a CPU):")
        print_table(*combine(list(by_round.values())))
        print("threads of each process in the longer segments (time-weighted; per thread role: cores on a CPU / "
              "of them in the kernel / s per s waiting for a CPU; machine: cores idle, in the kernel, stolen):")
        labels = [row[0] for row in combine(list(by_round.values()))[1] if float(row[1]) >= 0.5]
        thread_rows = []
        for label in labels:
            rows_of = [r for rows in by_round.values() for r in rows if r.label == label]
            thread_rows.append([label, machine_text(rows_of), *(roles_text(rows_of, p) for p in ("router", "A", "B"))])
        print_table(["segment", "machine", "router", "A", "B"], thread_rows)
    if s.load is not None:
        late = s.load.lateness_stats()
        lat = s.load.latency_stats()
        void = late.saturated or late.p99 > CLIENT_VOID_SHARE * lat.p99
        print(f"client lateness over the session: p50 {fmt_ms(late.p50)} p99 {fmt_ms(late.p99)} max "
              f"{fmt_ms(late.max)} ms (max {s.load.max_inflight} in flight){' VOID: the client fell behind' if void else ''}")
    if plot_path is not None:
        print(f"plot: {plot_path}")
    if data_path is not None:
        print(f"data: {data_path}")
    errors = s.load.latency_stats().errors if s.load is not None else 0
    if fig is None:
        return f"rollout, paired: no complete round ({s.error or 'every run failed'}) [{s.scenario}]"
    failed = sum(1 for r in s.runs if r.error)
    notes = f"{errors} errors" + (f", {failed} runs failed" if failed else "")
    return (f"rollout {s.scenario}, paired ({fig.rounds} rounds of {s.seconds:g}s runs, {s.rate:,.0f} req/s = "
            f"{s.rate_note}): p999 updating/control {fmt_ratio(fig.p999_ratio)} (median {fmt_ms(fig.update_p999)} / "
            f"{fmt_ms(fig.control_p999)} ms), p99 {fmt_ratio(fig.p99_ratio)}, {notes} "
            f"[target p999 <= {TARGET_P999:g}x, p99 <= {TARGET_P99:g}x]")


def save_data(s: Session, path: Path) -> Path | None:
    """Every request of the session and what was measured, for a closer look later (``numpy.load``).

    Arrays ``scheduled|sent|done|version`` (seconds on the load's clock;
    version 0 for an error), ``code`` (strings), ``trace/...`` (the CPU
    trace, ``ProcTrace.dump``), and ``meta`` (JSON: runs with their windows
    and rollout entries, the segment rows per round).
    """
    import numpy as np

    if s.load is None:
        return None
    load = s.load
    rows = segment_rows(s) if s.pairs() and s.trace is not None else {}
    meta = {
        "scenario": s.scenario, "config": s.config, "rate": s.rate, "seconds": s.seconds,
        "wall_offset": load.wall_offset, "pids": s.pids,
        "runs": [{"round": r.round, "kind": r.kind, "start": r.start, "end": r.end, "old": r.old, "new": r.new,
                  "appeared": r.appeared, "finished": r.finished, "signal": r.signal, "error": r.error,
                  "rollout": r.rollout} for r in s.runs],
        "segments": {str(k): [row.to_json() for row in v] for k, v in rows.items()},
    }
    trace = {f"trace/{k}": v for k, v in s.trace.dump().items()} if s.trace is not None else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.array(json.dumps(meta, default=str)), scheduled=load.scheduled,
                        sent=load.sent, done=load.done,
                        version=np.array([v or 0 for v in load.values], dtype=np.int32), code=np.array(load.codes),
                        **trace)
    return path


# -- command line ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="paired rounds, one version each (default 5)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of every run (default 30)")
    p.add_argument("--appear-at", type=float, default=5.0,
                   help="seconds into an update run at which the next version appears (default 5)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="unmeasured seconds of load after each round (default 5)")
    p.add_argument("--load", type=float, default=0.5, help="fraction of the measured capacity to send (default 0.5)")
    p.add_argument("--rate", type=float, help="open-loop rate in req/s (instead of --load)")
    p.add_argument("--scenario", default="staged", choices=sorted(SCENARIOS), help="the router's config (default staged)")
    p.add_argument("--set", dest="extra", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="one more config key on top of the scenario's (dotted key, YAML value); repeatable")
    p.add_argument("--model-dir", type=Path,
                   help="where the versions are built and reused (default models/ctr-large; "
                        "models/ctr-vocabN for another --vocab)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help=f"rows per embedding table (default {DEFAULT_VOCAB:,}: ~300 MB)")
    p.add_argument("--capacity-seconds", type=float, default=4.0, help="measured seconds of the capacity run")
    p.add_argument("--drain-only", type=float, default=0.0, metavar="SECONDS",
                   help="instead of an update, take worker w0 out of rotation for SECONDS (the cost of "
                        "being one worker short, without any conversion)")
    p.add_argument("--perf-sched", type=Path, metavar="DIR",
                   help="record every update run's scheduler events (perf sched record -a, from 0.5 s before "
                        "the version appears to 1 s after the rollout) into DIR/roundN.data")
    p.add_argument("--rollout-timeout", type=float, default=120.0,
                   help="seconds a rollout may take before its run fails (default 120)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.seconds <= 0 or not 0 < args.appear_at < args.seconds:
        p.error("--seconds must be > 0 and --appear-at inside it")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if not 0 < args.load <= 1.5:
        p.error("--load must be in (0, 1.5]")
    if args.vocab < 1:
        p.error("--vocab must be >= 1")
    args.model_dir = (args.model_dir or default_model_dir(args.vocab)).resolve()
    return args


def capacity(model_dir: Path, config: Mapping[str, Any], seconds: float) -> float:
    base = make_base_path(model_dir, [1])
    router = None
    try:
        router = start_router({**config, "models": [{"name": MODEL_NAME, "base_path": str(base)}]}, "capacity")
        progress(f"[capacity] closed loop c={CAPACITY_CONCURRENCY}, {CAPACITY_RUNS} runs of 1s warm-up + "
                 f"{seconds:g}s ...")
        return run_async(measure_capacity(router.grpc_address, seconds))
    finally:
        if router is not None:
            progress(f"[capacity] {router.stop()}")
        shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_average = os.getloadavg()[0]
    if load_average > BUSY_LOAD_AVERAGE:
        progress(f"note: load average {load_average:.2f} before the run: other processes share these "
                 f"{os.cpu_count()} CPUs, expect noisy tails")
    versions = list(range(1, args.rounds + 2))
    ensure_model(args.model_dir, args.vocab, versions)
    config = scenario_config(args.scenario, Path("."), args.extra)
    if args.rate is not None:
        rate, rate_note = args.rate, "--rate"
    else:
        progress(f"measuring capacity against a router with the {args.scenario} config ...")
        cap = capacity(args.model_dir, config, args.capacity_seconds)
        rate = cap * args.load
        rate_note = f"{args.load:.0%} of the measured capacity of {cap:,.0f} req/s (median of {CAPACITY_RUNS})"
    progress(f"open-loop rate: {rate:,.0f} req/s ({rate_note})")
    s = Session(args.scenario, config, rate, rate_note, args.seconds, drain_s=args.drain_only,
                perf_dir=args.perf_sched)
    run_session(s, args.model_dir, versions, args.appear_at, args.settle, args.rollout_timeout)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plot_path = data_path = None
    try:
        plot_path = plot(s, RESULTS_DIR / f"rollout-{stamp}.png",
                         f"Hot update, paired rounds ({s.scenario}, {rate:,.0f} req/s open-loop batch-1 gRPC)")
    except Exception as exc:  # noqa: BLE001 - the numbers still count without the picture
        progress(f"plot failed: {error_text(exc)}\n{traceback.format_exc()}")
    try:
        data_path = save_data(s, RESULTS_DIR / f"rollout-{stamp}.npz")
    except Exception as exc:  # noqa: BLE001 - as for the plot
        progress(f"saving the data failed: {error_text(exc)}\n{traceback.format_exc()}")
    headline = report(s, load_average, plot_path, data_path)
    print(headline, flush=True)
    errors = s.load.latency_stats().errors if s.load is not None else 1
    return 1 if s.error or errors or any(r.error for r in s.runs) or not s.pairs() else 0


if __name__ == "__main__":
    sys.exit(main())
