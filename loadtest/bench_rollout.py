"""The latency spike of a hot model update, under open-loop load.

    python -m loadtest.bench_rollout [--seconds 10] [--rate R] [--scenarios staged,in_place,staged+jemalloc,staged+overlap]
                                     [--model-dir DIR] [--vocab 940000] [--keep-going]

Three scenarios, side by side, each on a fresh router (2 spawned workers,
``poll_interval_s: 0.5``, batching at its defaults) serving a ~300 MB CTR
model (``workers.demo_model`` with 5 embedding tables of ``--vocab`` x 16
float32; versions 1 and 2 are built once into ``--model-dir``, default
``models/ctr-large``, and reused):

1. ``staged``: ``rollout.strategy: staged`` (the default, in its default
   ``swap`` mode): drain -> unload old -> load new -> warm -> rejoin, one
   worker at a time, one pool-wide switch;
2. ``in_place``: ``rollout.strategy: in_place``: the old update, workers
   load the new version while serving;
3. ``staged+jemalloc``: staged, with ``workers.allocator: jemalloc``;
4. ``staged+overlap``: staged in ``rollout.mode: overlap`` (every worker
   holds both versions until the switch).

Besides latency it samples the workers' memory (RSS of every worker
process, surge workers included) to show what holding two versions costs.

First the pool's capacity is measured once: closed-loop gRPC at concurrency
64 against a router with scenario 1's config; the load rate ``R`` is half
of it (``--rate`` sets it instead).  Then, per scenario: version 1 is
copied into a fresh temporary base path (and version 2 beside it, under a
name the router ignores), the router started and waited for, and open-loop
gRPC load (``loadtest.openloop``: batch-1 Predicts with the official client,
sent on a fixed schedule at ``R`` req/s, never waiting for earlier answers;
latency counted from each request's *scheduled* time, so a stall shows in
full) runs for ``--seconds`` of steady state.  Then version 2 is renamed
into the base path (the moment "the version appears"); the load goes on
until the rollout has finished (old version unloaded) and 3 s more.

When the rollout is finished (``loadtest.rollout_watch``): from the
router's admin API (``GET /v1/admin/status``, at the URL the router prints
on its ``admin:`` line: the history entry whose ``to`` holds ctr 2 in state
done / rolled_back / failed; its events shade the plot), or, where the
router has no admin API or reports no rollout for the update, from its REST
model status (``GET /v1/models/ctr``: version 1 END, version 2 AVAILABLE;
polled every 0.1 s).  The output says which signal was used.
``TFS_ROUTER_ADMIN_TOKEN``, when set, is passed to the router (inherited)
and sent as a bearer token.

Windows (by scheduled send time): steady = the last 80% of the steady phase
(8 s of the default 10) before the version appears; during = from its
appearance until the old version is unloaded; after = the 3 s after that
(shown, so that effects outlasting the end signal are not lost).  Latency
percentiles cover every answered request, errors at their answer time;
every answer is checked (status OK, a ``probability`` of one row, version 1
or 2).

Prints progress on stderr; on stdout the scenarios' configs, a results table
(steady and during p50/p99/p999, max, errors by status code, requests sent,
the during window's length, ratio = during p999 / steady p999), the client's
lateness (how far behind its schedule it sent: when it could not keep up,
the numbers are void and the output says so), when version 2 took over,
the path of a PNG (``loadtest/results/rollout-<timestamp>.png``, drawn by
``loadtest.rollout_plot``: each request's latency against its scheduled
time, rollout phases shaded; every request's times and status beside it in
``rollout-<timestamp>.npz``), and as its last line the ratios.  Exits 1 if a scenario failed or any request did.

``--drop-key rollout --drop-key admin`` runs against a router whose config
loader does not know those keys yet (the scenario labels then only say what
was asked for, and the last line says which keys were dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import itertools
import os
import shutil
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
    cpu_seconds,
    error_text,
    print_table,
    progress,
    run_async,
)
from loadtest.openloop import LatencyStats, OpenLoop, OpenLoopResult, codes_text, fmt_ms
from loadtest.rollout_plot import fmt_ratio, plot
from loadtest.rollout_watch import RolloutWatch

MODEL_NAME = "ctr"
DEFAULT_VOCAB = 940_000  # 5 tables x vocab x 16 float32 = ~300 MB
WORKERS = 2
# The config of every scenario, then each scenario's own keys on top (merged
# deeply).  Keys the router's config loader does not know yet can be left out
# with --drop-key; adjust here when the control plane's keys change.
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
CAPACITY_SCENARIO = "staged"  # the router whose closed-loop capacity sets the rate
CAPACITY_CONCURRENCY = 64
TARGET_SCENARIO = "staged"
TARGET_RATIO = 1.25  # staged: during p999 / steady p999, at most
STEADY_FRACTION = 0.8  # of the steady phase measured (the start is warm-up)
AFTER_S = 3.0  # load kept on after the rollout finished
REQUEST_DEADLINE_S = 30.0
ROUTER_READY_TIMEOUT_S = 600.0
BUSY_LOAD_AVERAGE = 0.5  # before the run: something else is using the machine
BUSY_OTHERS_CORES = 0.2  # cores used by other processes in a window: its numbers are noisy
RESULTS_DIR = ROOT / "loadtest" / "results"
# The client's own delays against the latencies of a window: void beyond half the p99 (besides
# LatenessStats.saturated); worth a note beyond a quarter of the p999 and a few timer ticks.
CLIENT_VOID_SHARE = 0.5
CLIENT_SHARE_WARN = 0.25
CLIENT_NOTE_MIN_S = 0.005
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


def ensure_model(model_dir: Path, vocab: int) -> None:
    """Versions 1 and 2 of the demo CTR model with ``vocab`` rows per table under ``model_dir``.

    Builds a missing version with ``python -m workers.demo_model`` (a few
    seconds each at ~300 MB; a heartbeat on stderr meanwhile).  An existing
    version built with another vocab is an error, not silently reused.
    """
    for version in (1, 2):
        version_dir = model_dir / str(version)
        if (version_dir / "saved_model.pb").is_file():
            found = built_vocab(version_dir)
            if abs(found - vocab) > 0.01 * vocab + 100:
                raise SystemExit(f"{version_dir} holds a model of vocab ~{found:,}, not {vocab:,}: "
                                 f"pass another --model-dir, or remove it to rebuild")
            progress(f"model v{version}: {version_dir} ({variables_bytes(version_dir) / 1e6:,.0f} MB, "
                     f"vocab {found:,}), reused")
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


def dropped(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``config`` without the dotted ``keys`` (``admin``, ``workers.allocator``); empty sections go too."""
    out = copy.deepcopy(dict(config))
    for key in keys:
        *parents, last = key.split(".")
        node: Any = out
        trail = []
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            trail.append((node, part))
            node = node[part]
        if isinstance(node, dict):
            node.pop(last, None)
            for parent, part in reversed(trail):
                if parent[part] == {}:
                    del parent[part]
    return out


def scenario_config(name: str, base_path: Path, drop: Sequence[str]) -> dict[str, Any]:
    config = merged(BASE_CONFIG, SCENARIOS[name])
    config = {"models": [{"name": MODEL_NAME, "base_path": str(base_path)}], **config}
    return dropped(config, drop)


def config_text(config: Mapping[str, Any]) -> str:
    """A config on one line, flow-style YAML, without the per-run base path."""
    import yaml

    shown = {k: v for k, v in config.items() if k != "models"}
    return yaml.safe_dump(shown, default_flow_style=True, sort_keys=False, width=10_000).strip()


def make_base_path(model_dir: Path) -> Path:
    """A fresh base path holding version 1, and version 2 beside it under a name the router ignores."""
    base = Path(tempfile.mkdtemp(prefix="tfs-rollout-"))
    shutil.copytree(model_dir / "1", base / "1")
    shutil.copytree(model_dir / "2", staging_dir(base))
    return base


def staging_dir(base: Path) -> Path:
    return base / ".2.staging"  # not an integer: no version until renamed


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


def predict_caller(stub: Any, feed: Any) -> Any:
    """An async ``call()`` doing one checked Predict; returns the version that answered."""

    async def call() -> int:
        resp = await stub.Predict(next(feed), timeout=REQUEST_DEADLINE_S)
        version = resp.model_spec.version.value
        if "probability" not in resp.outputs:
            raise WrongAnswer(f"outputs {sorted(resp.outputs)} lack probability")
        dims = [d.size for d in resp.outputs["probability"].tensor_shape.dim]
        if dims != [1] or version not in (1, 2):
            raise WrongAnswer(f"probability shape {dims}, version {version}")
        return version

    return call


# -- capacity ----------------------------------------------------------------------


async def measure_capacity(address: str, seconds: float) -> float:
    import grpc

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = predict_stub(channel)
        call = predict_caller(stub, request_feed())
        await call()
        result = await closed_loop(call, concurrency=CAPACITY_CONCURRENCY, seconds=seconds, warmup=1.0,
                                   label="capacity")
    if result.error_count:
        progress(f"  capacity run errors: {dict(result.errors)}")
    progress(f"  capacity {result.rate:,.0f} req/s (closed loop c={CAPACITY_CONCURRENCY}, p50 "
             f"{result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, {result.error_count} errors)")
    if not result.calls:
        raise RuntimeError(f"capacity run got no answer: {dict(result.errors)}")
    return result.rate


def capacity(model_dir: Path, drop: Sequence[str], seconds: float) -> float:
    base = make_base_path(model_dir)
    router = None
    try:
        router = start_router(scenario_config(CAPACITY_SCENARIO, base, drop), "capacity")
        progress(f"[capacity] closed loop c={CAPACITY_CONCURRENCY}, 1s warm-up + {seconds:g}s ...")
        return run_async(measure_capacity(router.grpc_address, seconds))
    finally:
        if router is not None:
            progress(f"[capacity] {router.stop()}")
        shutil.rmtree(base, ignore_errors=True)


# -- one scenario ------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario measured (times: ``appeared_*`` on both clocks, the rest relative to it)."""

    name: str
    config: dict[str, Any]
    load: OpenLoopResult[int] | None = None
    appeared: float = 0.0  # perf_counter when version 2 was renamed in
    appeared_wall: float = 0.0
    during_s: float = float("nan")  # appearance -> old version unloaded
    signal: str = ""
    rollout: dict[str, Any] | None = None  # the admin API's entry for the update, if any
    steady_s: float = 0.0  # length of the steady window
    error: str = ""  # why the scenario failed, if it did
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)  # window -> (our cores, others' cores)
    # (perf_counter, summed RSS of the router's worker processes, largest single worker's RSS), bytes
    rss: list[tuple[float, int, int]] = field(default_factory=list)

    def rss_in(self, start: float, end: float) -> tuple[float, float, float]:
        """(workers' total RSS at the window's start, peak total, peak single worker) in MB."""
        inside = [r for r in self.rss if start <= r[0] - self.appeared <= end]
        if not inside:
            return float("nan"), float("nan"), float("nan")
        return inside[0][1] / 2**20, max(r[1] for r in inside) / 2**20, max(r[2] for r in inside) / 2**20

    @property
    def ok(self) -> bool:
        return not self.error and self.load is not None

    def _load(self) -> OpenLoopResult[int]:
        if self.load is None:
            raise ValueError(f"scenario {self.name} produced no load")
        return self.load

    def steady_mask(self) -> Any:
        """Requests scheduled in the last ``steady_s`` before the version appeared."""
        return self._load().window(self.appeared - self.steady_s, self.appeared)

    def during_mask(self) -> Any:
        """Requests scheduled from the appearance until the old version was unloaded."""
        return self._load().window(self.appeared, self.appeared + self.during_s)

    def after_mask(self) -> Any:
        """Requests scheduled after the end signal (the ``AFTER_S`` of load kept on)."""
        return self._load().window(self.appeared + self.during_s)

    def steady_stats(self) -> LatencyStats:
        return self._load().latency_stats(self.steady_mask())

    def during_stats(self) -> LatencyStats:
        return self._load().latency_stats(self.during_mask())

    def after_stats(self) -> LatencyStats:
        return self._load().latency_stats(self.after_mask())

    def ratio(self) -> float:
        """during p999 / steady p999 (NaN without load)."""
        if not self.ok:
            return float("nan")
        steady = self.steady_stats().p999
        return self.during_stats().p999 / steady if steady > 0 else float("nan")

    def errors(self) -> int:
        return self._load().latency_stats().errors if self.ok else 0

    def client_void(self) -> bool:
        """The client could not keep its schedule in the steady or during window, or its own delays
        make up much of the tail there: those latencies are the client's, not the router's."""
        if not self.ok:
            return False
        load = self._load()
        for mask in (self.steady_mask(), self.during_mask()):
            late, lat = load.lateness_stats(mask), load.latency_stats(mask)
            if late.saturated or late.p99 > CLIENT_VOID_SHARE * lat.p99:
                return True
        return False

    def rollout_state(self) -> str:
        return str((self.rollout or {}).get("state") or "")


# -- CPU: ours and everybody else's ---------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used between samples by this run's processes (client, router, workers) and by all others.

    Other processes on the machine (a test suite, a build) steal the CPUs
    the router and its workers share; their share says how far the tails
    can be trusted.
    """

    def __init__(self, pids: Sequence[int | None]) -> None:
        self.pids = list(pids)
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, machine busy s, ours s)

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                pass  # a process gone (a worker restarted): its share counts as others'
        return total

    def sample(self) -> None:
        self.samples.append((time.monotonic(), machine_busy_s(), self._ours()))

    def cores(self, i: int, j: int) -> tuple[float, float]:
        """``(ours, others)``: cores used between samples ``i`` and ``j``."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self.samples[i], self.samples[j]
        wall = t1 - t0
        if wall <= 0:
            return float("nan"), float("nan")
        ours = (ours1 - ours0) / wall
        return ours, max(0.0, (busy1 - busy0) / wall - ours)


async def run_load(out: Outcome, router: RouterProcess, admin_url: str | None, base: Path, rate: float,
                   seconds: float, rollout_timeout: float) -> None:
    import aiohttp
    import grpc

    label = out.name
    async with grpc.aio.insecure_channel(router.grpc_address, options=GRPC_OPTIONS) as channel, \
            aiohttp.ClientSession() as session:
        stub = predict_stub(channel)
        call = predict_caller(stub, request_feed())
        first = await call()
        if first != 1:
            raise RuntimeError(f"the router answered with version {first} before the update, expected 1")
        loop = OpenLoop(call, rate)
        stop = asyncio.Event()
        meter = CpuMeter([None, router.pid, *router.worker_pids()])
        rss_task = asyncio.create_task(sample_rss(out, router.pid))
        progress(f"[{label}] steady open-loop load at {rate:,.0f} req/s for {seconds:g}s ...")
        load_task = asyncio.create_task(loop.run(stop=stop, drain_timeout=REQUEST_DEADLINE_S + 5))
        try:
            await asyncio.sleep(seconds - out.steady_s)
            meter.sample()
            await asyncio.sleep(out.steady_s)
            if load_task.done():
                load_task.result()
            os.rename(staging_dir(base), base / "2")
            out.appeared = time.perf_counter()
            out.appeared_wall = time.time()
            meter.sample()
            out.cpu["steady"] = meter.cores(0, 1)
            progress(f"[{label}] version 2 appeared (sent {loop.sent_count:,}, in flight {loop.inflight})")
            watch = RolloutWatch(session, admin_url, router.rest_url, model=MODEL_NAME, old=1, new=2,
                                 label=label, appeared=out.appeared_wall)
            try:
                end_wall, out.signal = await watch.wait_finished(rollout_timeout)
            finally:
                out.rollout = watch.entry
            meter.sample()
            out.cpu["during"] = meter.cores(1, 2)
            out.during_s = end_wall - out.appeared_wall
            state = f", rollout {watch.entry.get('state')}" if watch.entry else ""
            if watch.entry and watch.entry.get("error"):
                state += f" ({watch.entry['error']})"
            progress(f"[{label}] rollout finished {out.during_s:.2f}s after the version appeared "
                     f"(signal: {out.signal}{state}); {AFTER_S:g}s more load ...")
            await asyncio.sleep(AFTER_S)
            if admin_url is not None and watch.admin_ok:
                await watch.poll_admin()  # the complete event list
                out.rollout = watch.entry
        finally:
            stop.set()
            rss_task.cancel()
            out.load = await load_task
        progress(f"[{label}] done: {len(out.load):,} requests sent, {out.load.latency_stats().errors} errors, "
                 f"at most {out.load.max_inflight} in flight")


async def sample_rss(out: Outcome, router_pid: int, interval: float = 0.05) -> None:
    """The workers' resident memory over time (surge workers included: children are re-listed each time)."""
    import psutil

    router = psutil.Process(router_pid)
    while True:
        sizes = []
        for child in router.children(recursive=True):
            try:
                if "workers" in " ".join(child.cmdline()):
                    sizes.append(child.memory_info().rss)
            except psutil.Error:
                continue  # exited while we looked
        if sizes:
            out.rss.append((time.perf_counter(), sum(sizes), max(sizes)))
        await asyncio.sleep(interval)


def run_scenario(name: str, model_dir: Path, drop: Sequence[str], rate: float, seconds: float,
                 rollout_timeout: float) -> Outcome:
    base = make_base_path(model_dir)
    config = scenario_config(name, base, drop)
    out = Outcome(name=name, config=config, steady_s=seconds * STEADY_FRACTION)
    router = None
    try:
        router = start_router(config, name)
        admin_url = router.admin_url()
        progress(f"[{name}] admin API: {admin_url or 'none printed (REST model status will tell the end)'}")
        # The client's own collector must not pause it mid-measurement: what
        # start-up built is frozen, and collection is off while the load runs
        # (a run's garbage is a few hundred MB at most).
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            run_async(run_load(out, router, admin_url, base, rate, seconds, rollout_timeout))
        finally:
            gc.enable()
    except Exception as exc:  # noqa: BLE001 - reported per scenario
        out.error = error_text(exc)
        progress(f"[{name}] FAILED: {out.error}")
        if not isinstance(exc, (TimeoutError, RuntimeError)):
            progress(traceback.format_exc())
    finally:
        if router is not None:
            progress(f"[{name}] {router.stop()}")
        shutil.rmtree(base, ignore_errors=True)
    return out


# -- report ------------------------------------------------------------------------


def report(outcomes: Sequence[Outcome], rate: float, rate_note: str, seconds: float, drop: Sequence[str],
           plot_path: Path | None, load_average: float) -> str:
    """Prints the tables on stdout; returns the headline (the last line)."""
    print(f"hot update of model {MODEL_NAME} under open-loop gRPC load: {rate:,.0f} req/s ({rate_note}), "
          f"batch-1 Predicts; {os.cpu_count()} CPUs (load average {load_average:.2f} before the run), "
          f"{WORKERS} workers; steady: the last "
          f"{seconds * STEADY_FRACTION:g}s of {seconds:g}s before version 2 appears; during: from its appearance "
          f"until version 1 is unloaded; after: the {AFTER_S:g}s of load after that")
    for out in outcomes:
        print(f"  {out.name}: {config_text(out.config)}")
    if drop:
        print(f"  (config keys dropped for this router: {', '.join(drop)}; the scenario names say what was asked)")
    rows = []
    for out in outcomes:
        if not out.ok:
            rows.append([out.name, "FAILED", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         out.error[:100]])
            continue
        load = out._load()
        steady, during, after = out.steady_stats(), out.during_stats(), out.after_stats()
        rows.append([out.name, out.signal, len(load), fmt_ms(steady.p50), fmt_ms(steady.p99), fmt_ms(steady.p999),
                     fmt_ms(during.p50), fmt_ms(during.p99), fmt_ms(during.p999),
                     fmt_ms(load.latency_stats().max), fmt_ms(after.p999), f"{out.during_s:.2f}",
                     fmt_ratio(out.ratio()), codes_text(load.latency_stats().error_codes())])
    print_table(["scenario", "end signal", "sent", "steady p50", "p99", "p999", "during p50", "p99", "p999",
                 "max", "after p999", "during s", "ratio", "errors"], rows)
    print("(ms from each request's scheduled send time, over all answered requests; max over the whole run; "
          "ratio = during p999 / steady p999; errors over the whole run, by status code)")

    mem_rows = []
    for out in outcomes:
        if not out.ok:
            continue
        before, peak, single = out.rss_in(-1.0, out.during_s)
        mem_rows.append([out.name, f"{before:,.0f}", f"{peak:,.0f}", f"{peak - before:+,.0f}", f"{single:,.0f}"])
    print("worker memory during the update (RSS of every worker process, surge workers included; MB):")
    print_table(["scenario", "before", "peak during", "growth", "largest worker"], mem_rows)
    print("client lateness (ms its sends went out behind schedule; void when in the steady or during window its "
          "p50 passed 5 ms, its max 500 ms, or its p99 half the latency p99):")
    late_rows = []
    for out in outcomes:
        if not out.ok:
            continue
        load = out._load()
        cells: list[Any] = [out.name]
        for mask in (out.steady_mask(), out.during_mask(), None):
            late = load.lateness_stats(mask)
            cells += [fmt_ms(late.p50), fmt_ms(late.p99), fmt_ms(late.max)]
        cells += [load.max_inflight, "VOID: behind schedule" if out.client_void() else "kept up"]
        for window in ("steady", "during"):
            ours, others = out.cpu.get(window, (float("nan"), float("nan")))
            cells += [f"{ours:.2f}", f"{others:.2f}"]
        late_rows.append(cells)
    print_table(["scenario", "steady p50", "p99", "max", "during p50", "p99", "max", "all p50", "p99", "max",
                 "max in flight", "client", "steady cores: ours", "others", "during: ours", "others"], late_rows)
    print("(cores: CPU used in the window by this run's client, router and workers, and by every other process "
          f"of the machine; others beyond {BUSY_OTHERS_CORES:g} make the tails noise)")

    print("version switch (scheduled send times relative to the appearance, s):")
    switch_rows = []
    for out in outcomes:
        if not out.ok:
            continue
        load = out._load()
        rel = load.scheduled - out.appeared
        v1 = [t for t, v in zip(rel, load.values) if v == 1]
        v2 = [t for t, v in zip(rel, load.values) if v == 2]
        first_v2 = min(v2) if v2 else float("inf")
        back = sum(1 for t in v1 if t > first_v2)
        rollout = out.rollout or {}
        switch_rows.append([out.name, f"{max(v1):+.2f}" if v1 else "-", f"{first_v2:+.2f}" if v2 else "-", back,
                            str(rollout.get("strategy") or "-"), out.rollout_state() or "-"])
    print_table(["scenario", "last v1", "first v2", "v1 after first v2", "rollout strategy", "state"],
                switch_rows)

    for out in outcomes:
        if out.rollout and out.rollout.get("error"):
            print(f"  {out.name}: rollout error: {out.rollout['error']}")
        asked = (out.config.get("rollout") or {}).get("strategy")
        ran = (out.rollout or {}).get("strategy")
        if asked and ran and asked != ran:
            print(f"note: {out.name}: asked for strategy {asked}, the router reports {ran}")
        if not out.ok:
            print(f"FAILED {out.name}: {out.error}")
            continue
        load = out._load()
        for message, count in load.errors.most_common(5):
            print(f"ERROR {out.name}: {count}x {message}")
        steady, after = out.steady_stats(), out.after_stats()
        if after.p999 > 2 * steady.p999:
            print(f"note: {out.name}: p999 after the end signal is {fmt_ratio(after.p999 / steady.p999)} the steady "
                  f"one: the update's effects outlast the end signal ({out.signal})")
        for window, mask, lat in (("steady", out.steady_mask(), steady), ("during", out.during_mask(),
                                                                          out.during_stats())):
            late = load.lateness_stats(mask)
            if late.max > max(CLIENT_NOTE_MIN_S, CLIENT_SHARE_WARN * lat.p999) and not out.client_void():
                print(f"note: {out.name}: the client's own delay reached {fmt_ms(late.max)} ms in the {window} "
                      f"window, against a p999 latency of {fmt_ms(lat.p999)} ms: part of that tail is the client's")
        for window, (_, others) in out.cpu.items():
            if others > BUSY_OTHERS_CORES:
                print(f"note: {out.name}: other processes used {others:.2f} of {os.cpu_count()} cores in the {window} "
                      f"window: its tail latencies are theirs too; rerun on a quiet machine")
        if out.client_void():
            print(f"VOID {out.name}: the client fell behind its schedule, or its own delays make up much of the "
                  f"tail: these latencies are not the router's")
    if plot_path is not None:
        print(f"plot: {plot_path}")

    parts = []
    for out in outcomes:
        if not out.ok:
            parts.append(f"{out.name} failed")
            continue
        notes = [f"{out.errors()} errors"]
        if out.rollout_state() not in ("", "done"):
            notes.append(f"rollout {out.rollout_state()}")
        if out.client_void():
            notes.append("client behind schedule: void")
        parts.append(f"{out.name} {fmt_ratio(out.ratio())} ({', '.join(notes)})")
    suffix = f" [config keys dropped: {', '.join(drop)}]" if drop else ""
    return (f"rollout p999 during/steady: {', '.join(parts)} "
            f"[target {TARGET_SCENARIO} <= {TARGET_RATIO:g}x]{suffix}")


def save_data(outcomes: Sequence[Outcome], path: Path) -> Path | None:
    """Every request of every scenario that ran, for a closer look later (``numpy.load``).

    Arrays ``<scenario>/scheduled|sent|done|version`` (seconds relative to the
    version's appearance; version 0 for an error), ``<scenario>/code``
    (strings), and ``meta`` (JSON: windows, end signal, the admin API's
    rollout entry).
    """
    import json

    import numpy as np

    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for out in outcomes:
        if not out.ok:
            continue
        load = out._load()
        arrays[f"{out.name}/scheduled"] = load.scheduled - out.appeared
        arrays[f"{out.name}/sent"] = load.sent - out.appeared
        arrays[f"{out.name}/done"] = load.done - out.appeared
        arrays[f"{out.name}/version"] = np.array([v or 0 for v in load.values], dtype=np.int32)
        arrays[f"{out.name}/code"] = np.array(load.codes)
        meta[out.name] = {"config": out.config, "rate": load.rate, "appeared_wall": out.appeared_wall,
                          "steady_s": out.steady_s, "during_s": out.during_s, "signal": out.signal,
                          "rollout": out.rollout, "errors": dict(load.errors)}
    if not arrays:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.array(json.dumps(meta, default=str)), **arrays)
    return path


# -- command line ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="steady load before the update (default 10)")
    p.add_argument("--rate", type=float, help="open-loop rate in req/s (default: half the measured capacity)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all, in that order)")
    p.add_argument("--model-dir", type=Path,
                   help="where versions 1 and 2 are built and reused (default models/ctr-large; "
                        "models/ctr-vocabN for another --vocab)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help=f"rows per embedding table (default {DEFAULT_VOCAB:,}: ~300 MB)")
    p.add_argument("--keep-going", action="store_true", help="go on with the next scenario after one fails")
    p.add_argument("--capacity-seconds", type=float, default=4.0, help="measured seconds of the capacity run")
    p.add_argument("--rollout-timeout", type=float, default=300.0,
                   help="seconds the rollout may take before the scenario fails (default 300)")
    p.add_argument("--drop-key", action="append", default=[], metavar="KEY",
                   help="leave this (dotted) config key out, for a router that does not know it yet "
                        "(e.g. rollout, admin, workers.allocator); repeatable")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if args.vocab < 1:
        p.error("--vocab must be >= 1")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"--scenarios: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}")
    args.model_dir = (args.model_dir or default_model_dir(args.vocab)).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_average = os.getloadavg()[0]
    if load_average > BUSY_LOAD_AVERAGE:
        progress(f"note: load average {load_average:.2f} before the run: other processes share these "
                 f"{os.cpu_count()} CPUs, expect noisy tails")
    ensure_model(args.model_dir, args.vocab)
    if args.rate is not None:
        rate, rate_note = args.rate, "--rate"
    else:
        progress(f"measuring capacity against a router with the {CAPACITY_SCENARIO} config ...")
        cap = capacity(args.model_dir, args.drop_key, args.capacity_seconds)
        rate, rate_note = cap / 2, f"half the measured capacity of {cap:,.0f} req/s"
    progress(f"open-loop rate: {rate:,.0f} req/s ({rate_note})")
    outcomes: list[Outcome] = []
    for name in args.scenarios:
        out = run_scenario(name, args.model_dir, args.drop_key, rate, args.seconds, args.rollout_timeout)
        outcomes.append(out)
        if not out.ok and not args.keep_going:
            progress(f"stopping after the failed scenario {name} (--keep-going goes on)")
            break
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plot_path = None
    try:
        plot_path = plot(outcomes, RESULTS_DIR / f"rollout-{stamp}.png",
                         f"Hot update under open-loop load ({rate:,.0f} req/s, batch-1 gRPC Predicts)")
    except Exception as exc:  # noqa: BLE001 - the numbers still count without the picture
        progress(f"plot failed: {error_text(exc)}\n{traceback.format_exc()}")
    try:
        data_path = save_data(outcomes, RESULTS_DIR / f"rollout-{stamp}.npz")
        if data_path is not None:
            progress(f"every request's times and codes: {data_path}")
    except Exception as exc:  # noqa: BLE001 - as for the plot
        progress(f"saving the data failed: {error_text(exc)}")
    headline = report(outcomes, rate, rate_note, args.seconds, args.drop_key, plot_path, load_average)
    print(headline, flush=True)
    failed = len(outcomes) < len(args.scenarios) or any(not o.ok for o in outcomes)
    return 1 if failed or any(o.errors() for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
