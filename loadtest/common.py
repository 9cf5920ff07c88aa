"""Machinery shared by the benchmarks in ``loadtest``.

* ``WorkerProcess`` / ``start_worker``: a ``python -m workers`` child process
  on a free port, its stderr kept in a log file, stopped with SIGTERM.
* ``RouterProcess``: ``python -m router serve`` (a config dict written to a
  temporary YAML file, and/or quick flags) on free ports, ready once
  ``/readyz`` answers 200; its worker pids and parsed ``/metrics``.
* ``ListeningProcess``: any ``python -m MODULE --port 0`` helper server that
  prints ``listening on PORT`` (``loadtest.fixed_reply``, ``loadtest.inline_rest``);
  ``serve_until_signalled`` is that print and the SIGTERM stop on the server side.
* ``bench_args`` (or ``bench_parser`` + ``parse_bench_args``): the benchmarks'
  ``--seconds`` and ``--model-dir``, checked, with ``latest_version``.
* ``closed_loop`` (asyncio) and ``sync_loop`` (plain calls): closed-loop load
  generators that time every call and return a ``LoadResult`` (rate, rows/s,
  latency percentiles, errors, and the CPU time used by chosen processes
  during the measured window).
  The open-loop generator (fixed schedule, latency from the scheduled send
  time) is ``loadtest.openloop``.
* ``percentile``, ``print_table``, ``progress``, ``run_async`` (uvloop when
  available), ``cpu_seconds``, ``error_text``, ``ratio`` and ``http_get``.

Nothing here imports TensorFlow, so router-side benchmarks can use it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from router.traffic import plain

ROOT = Path(__file__).resolve().parent.parent
LISTEN_PREFIX = "tfs-worker listening on "
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
]

T = TypeVar("T")


# -- output ---------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file: IO[str] | None = None) -> None:
    """A plain aligned table: text columns left-aligned, numbers right-aligned."""
    out = file or sys.stdout
    cells = [[str(h) for h in headers]]
    numeric = [True] * len(headers)
    for row in rows:
        cells.append([_cell(v) for v in row])
        for i, v in enumerate(row):
            if not isinstance(v, (int, float)):
                numeric[i] = False
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)
    out.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- statistics -----------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated; NaN if empty."""
    if not sorted_values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process ``pid`` (default: this one), all threads."""
    if pid is None or pid == os.getpid():
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Field 2 (comm) may contain spaces; the fields after its closing ')' are fixed.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


@dataclass
class LoadResult:
    """What one load run measured.  Latencies are in seconds, sorted."""

    label: str
    concurrency: int
    rows_per_call: int
    seconds: float  # length of the measured window
    latencies: list[float]  # successful calls that completed inside the window
    errors: Counter[str] = field(default_factory=Counter)  # message -> count, warm-up included
    cpu: dict[str, float] = field(default_factory=dict)  # process label -> cores used in the window

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        """Successful calls per second."""
        return self.calls / self.seconds if self.seconds > 0 else float("nan")

    @property
    def rows_per_s(self) -> float:
        return self.rate * self.rows_per_call

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000

    @property
    def p50_ms(self) -> float:
        return self.latency_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms(99)


def error_text(exc: BaseException) -> str:
    """``CODE: details`` for a gRPC error, ``Type: message`` for anything else."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # grpc.RpcError / AioRpcError
        try:
            return f"{code().name}: {details()}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


class _Window:
    """Samples CPU time of some processes at the start and end of the measured window."""

    def __init__(self, cpu_pids: Mapping[str, int | None]) -> None:
        self.cpu_pids = dict(cpu_pids)
        self.start = self.end = 0.0
        self._cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def open(self) -> None:
        self._cpu0 = {k: cpu_seconds(p) for k, p in self.cpu_pids.items()}
        self.start = time.perf_counter()

    def close(self) -> None:
        self.end = time.perf_counter()
        wall = self.end - self.start
        for k, p in self.cpu_pids.items():
            try:
                self.cpu[k] = (cpu_seconds(p) - self._cpu0[k]) / wall
            except (OSError, ValueError):
                self.cpu[k] = float("nan")


# -- load generators ------------------------------------------------------------


async def closed_loop(
    call: Callable[[], Awaitable[Any]],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
    rows_per_call: int = 1,
    label: str = "",
    cpu_pids: Mapping[str, int | None] | None = None,
) -> LoadResult:
    """Keep ``concurrency`` calls of ``call()`` in flight for ``warmup + seconds``.

    Each of ``concurrency`` tasks issues its next call as soon as the previous
    one returns (closed loop: offered load adapts to the server).  Only calls
    that complete inside the measured window (after ``warmup``) count towards
    rate and latency; errors are counted over the whole run, warm-up included.  ``cpu_pids``
    maps a label to a pid (``None``: this process) whose CPU use, in cores,
    is sampled over the measured window.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    window = _Window(cpu_pids or {})
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    t0 = clock()
    measure_from = t0 + warmup
    stop_at = measure_from + seconds

    async def opener() -> None:
        await asyncio.sleep(max(0.0, measure_from - clock()))
        window.open()
        await asyncio.sleep(max(0.0, stop_at - clock()))
        window.close()

    async def client() -> None:
        while True:
            start = clock()
            if start >= stop_at:
                return
            try:
                await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                errors[error_text(exc)] += 1
                continue
            end = clock()
            # Count completions inside the window (the unbiased throughput
            # estimate in steady state), whenever the call started.
            if measure_from <= end <= stop_at:
                latencies.append(end - start)

    await asyncio.gather(opener(), *(client() for _ in range(concurrency)))
    latencies.sort()
    return LoadResult(
        label=label,
        concurrency=concurrency,
        rows_per_call=rows_per_call,
        seconds=window.end - window.start,
        latencies=latencies,
        errors=errors,
        cpu=window.cpu,
    )


def sync_loop(
    call: Callable[[], Any],
    *,
    seconds: float,
    warmup: float = 0.0,
    rows_per_call: int = 1,
    label: str = "",
    cpu_pids: Mapping[str, int | None] | None = None,
) -> LoadResult:
    """Call ``call()`` back to back in this thread (concurrency 1) for ``warmup + seconds``."""
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    warm_until = clock() + warmup
    while clock() < warm_until:
        try:
            call()
        except Exception as exc:
            errors[error_text(exc)] += 1
    window = _Window(cpu_pids or {})
    latencies: list[float] = []
    window.open()
    stop_at = window.start + seconds
    end = window.start
    while end < stop_at:
        start = clock()
        try:
            call()
        except Exception as exc:
            errors[error_text(exc)] += 1
            end = clock()
            continue
        end = clock()
        latencies.append(end - start)
    window.close()
    latencies.sort()
    return LoadResult(
        label=label,
        concurrency=1,
        rows_per_call=rows_per_call,
        seconds=window.end - window.start,
        latencies=latencies,
        errors=errors,
        cpu=window.cpu,
    )


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# -- benchmark command lines ----------------------------------------------------


def latest_version(model_dir: Path) -> Path:
    """The highest numbered SavedModel version under ``model_dir``; SystemExit if there is none."""
    versions = [
        int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()
    ] if model_dir.is_dir() else []
    if not versions:
        raise SystemExit(f"no SavedModel versions under {model_dir}; run `make demo` first")
    return model_dir / str(max(versions))


def bench_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags all of them take: ``--seconds`` and ``--model-dir``."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per step (default 5)")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "ctr",
                   help="model base directory (default models/ctr)")
    return p


def parse_bench_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a ``bench_parser`` command line and set up the run.

    Checks ``--seconds``, quiets TF's C++ logs (before this process imports
    TensorFlow; TF 2.21 still prints its few absl start-up lines to stderr
    whatever the level), resolves ``.model_dir`` and sets ``.version_dir`` to
    its latest version (SystemExit without ``make demo``).
    """
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.model_dir = args.model_dir.resolve()
    args.version_dir = latest_version(args.model_dir)
    return args


def bench_args(prog: str, doc: str | None, argv: Sequence[str] | None) -> argparse.Namespace:
    """``--seconds`` and ``--model-dir`` parsed and checked (see ``parse_bench_args``)."""
    return parse_bench_args(bench_parser(prog, doc), argv)


# -- child and worker processes -----------------------------------------------------------


def child_env(**overrides: str) -> dict[str, str]:
    """Environment of a child process: quiet TF logs and the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(overrides)
    return env


class _ChildProcess:
    """A ``python ...`` child: stderr to a log file, stdout lines collected, SIGTERM to stop.

    Subclasses wait in ``__init__`` for the lines that say where the child
    listens (``_wait_up``).  A log in the temp directory is removed after a
    clean exit; one in a chosen ``log_dir``, or of a child that failed, is kept.
    """

    kind = "child"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._remove_clean_log = log_dir is None
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"tfs-{self.kind}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.argv = list(argv)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(env) if env is not None else child_env(),
            cwd=ROOT,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        # Keeps draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=self._read_stdout, name=f"{self.kind}-{self.pid}-stdout", daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _wait_line(self, predicate: Callable[[str], T | None], timeout: float) -> T:
        """The first non-None ``predicate(line)`` of stdout; RuntimeError on exit or timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = predicate(line)
                    if found is not None:
                        return found
                seen = len(self.lines)
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        if self.proc.poll() is None and not self._eof:
            raise RuntimeError(f"{self.kind} said nothing usable within {timeout}s:\n{self.log_tail()}")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before it was up:\n{self.log_tail()}")

    def _wait_up(self, predicate: Callable[[str], T | None], timeout: float, stop_timeout: float = 5.0) -> T:
        """``_wait_line``; if it fails, ``terminate(stop_timeout)`` the child before raising."""
        try:
            return self._wait_line(predicate, timeout)
        except BaseException:
            self.terminate(timeout=stop_timeout)
            raise

    def log_tail(self, chars: int = 5000) -> str:
        """The end of the child's stderr (works after ``terminate()`` too)."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""  # removed after a clean exit

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code.  Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
            if self._remove_clean_log and self.proc.returncode == 0:
                self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def stop(self, name: str | None = None) -> str:
        """``terminate()`` and a one-line account of how it ended (with the log's end if it died).

        ``name`` is how the account calls the child (default ``KIND pid PID``).
        """
        name = name or f"{self.kind} pid {self.pid}"
        died = not self.alive()
        code = self.terminate()
        if died or code != 0:
            return f"{name} ended with exit code {code}; its log ends:\n{self.log_tail(3000)}"
        return f"{name} stopped (exit code {code})"

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class WorkerProcess(_ChildProcess):
    """A ``python -m workers`` child process.

    ``WorkerProcess(args)`` starts it with ``--listen`` (default
    ``127.0.0.1:0``) plus ``args`` and returns once the worker printed its
    address (``.address``, e.g. ``127.0.0.1:40123`` or ``unix:/path``);
    ``wait_serving()`` then waits until grpc.health says SERVING.  Its stderr
    goes to ``.log_path`` (``log_tail()`` for error messages; removed after
    a clean exit unless ``log_dir`` was given).  Use as a
    context manager, or call ``terminate()`` (SIGTERM, then SIGKILL after
    ``timeout``) in a ``finally``.
    """

    kind = "worker"

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        listen: str = "127.0.0.1:0",
        log_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.args = ["--listen", listen, *args]
        super().__init__([sys.executable, "-m", "workers", *self.args], log_dir=log_dir, env=env)
        self.address = self._wait_up(self._address_of, start_timeout)

    @staticmethod
    def _address_of(line: str) -> str | None:
        line = line.strip()
        if line.startswith(LISTEN_PREFIX):
            return line[len(LISTEN_PREFIX) :].strip()
        return None

    def wait_serving(self, timeout: float = 120.0, service: str = "") -> float:
        """Block until grpc.health reports SERVING; returns seconds since the process started."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        started = time.monotonic()
        deadline = started + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - self.started_at
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"worker not SERVING after {timeout}s:\n{self.log_tail()}")


def start_worker(
    models: Mapping[str, Path | str],
    *extra_args: str,
    listen: str = "127.0.0.1:0",
    log_dir: Path | str | None = None,
) -> WorkerProcess:
    """Start a worker serving ``{name: base_path}`` with ``extra_args`` (e.g. ``--predict-threads 4``)."""
    args: list[str] = []
    for name, path in models.items():
        args += ["--model", f"{name}={Path(path).resolve()}"]
    return WorkerProcess([*args, *extra_args], listen=listen, log_dir=log_dir)


# -- other child processes ------------------------------------------------------


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is not positive or either is NaN."""
    return a / b if b > 0 else float("nan")


def http_get(url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of a GET, HTTP errors included, never through a proxy.

    ``context``: for an https URL, the context its certificate is checked by.
    """
    import urllib.error
    import urllib.request

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def process_cmdline(pid: int) -> list[str]:
    """The argv of process ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def child_pids(pid: int) -> list[int]:
    """Live direct children of process ``pid``, sorted."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[1]) == pid:  # state, ppid
            found.append(int(entry))
    return sorted(found)


class ListeningProcess(_ChildProcess):
    """``python -m MODULE --port 0 ARGS``: a helper server that prints ``listening on PORT``.

    Returns once the line is printed; ``.port`` and ``.address``
    (``127.0.0.1:PORT``) say where it listens.
    """

    PREFIX = "listening on "

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        *,
        log_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.kind = module.rsplit(".", 1)[-1]
        super().__init__([sys.executable, "-m", module, "--port", "0", *args], log_dir=log_dir, env=env)
        self.port = self._wait_up(self._port_of, start_timeout)
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"

    def _port_of(self, line: str) -> int | None:
        if line.startswith(self.PREFIX):
            return int(line[len(self.PREFIX) :].strip().rsplit(":", 1)[-1])
        return None


async def serve_until_signalled(port: int | str, stop_server: Callable[[], Awaitable[Any]]) -> None:
    """The end of a ``ListeningProcess`` helper's start-up: say where it listens, run until stopped.

    Prints ``listening on PORT``, waits for SIGTERM or SIGINT, then awaits
    ``stop_server()``.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{ListeningProcess.PREFIX}{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await stop_server()


class RouterProcess(_ChildProcess):
    """A ``python -m router serve`` child process on free ports.

    ``RouterProcess(config)`` writes the config dict to a temporary YAML file
    (removed by ``terminate()``) and serves it; ``RouterProcess(args=[...])``
    uses quick flags only (``--model-name ctr --model-base-path models/ctr
    --workers 2 --no-batching``); both may be combined (flags override the
    file).  Unless the config or the flags name ports, ``--grpc-port 0
    --rest-port 0 --admin-port 0`` pick free ones (several routers may run
    at once).  Returns once the router printed its
    addresses (``.grpc_port``, ``.rest_port``, ``.grpc_address``,
    ``.rest_url``); ``wait_ready()`` then waits for ``/readyz`` 200 (and,
    optionally, for N workers in state ready).  A router whose REST listener
    serves TLS takes ``ssl_context`` (the context its certificate is checked
    by): ``.rest_url`` is then https.  Use as a context manager or
    call ``terminate()`` (SIGTERM: the router stops its workers) in a
    ``finally``.
    """

    kind = "router"
    GRPC_LINE = "gRPC (TF Serving API):"
    REST_LINE = "REST (TF Serving API):"
    ADMIN_LINE = "admin:"

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        *,
        log_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "router", "serve"]
        self.ssl_context = ssl_context
        # A benchmark's router starts from its config: runtime state (router/state.py) of its own.
        env = {"TFS_ROUTER_STATE_DIR": tempfile.mkdtemp(prefix="tfs-router-state-"), **(env or {})}
        self.config_path: Path | None = None
        if config is not None:
            import yaml

            fd, name = tempfile.mkstemp(prefix="tfs-router-", suffix=".yaml", dir=log_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(plain(config), f, sort_keys=False)
            self.config_path = Path(name)
            argv += ["--config", str(self.config_path)]
        args = list(args)
        for section in ("grpc", "rest", "admin"):
            flag = f"--{section}-port"
            if flag not in args and "port" not in dict((config or {}).get(section) or {}):
                args += [flag, "0"]
        argv += args
        try:
            super().__init__(argv, log_dir=log_dir, env=env)
        except BaseException:
            self._remove_config()
            raise
        self.grpc_port = self._wait_up(self._grpc_port_of, start_timeout, stop_timeout=10)
        self.rest_port = self._wait_up(self._rest_port_of, 5.0, stop_timeout=10)
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.rest_url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{self.rest_port}"

    def _grpc_port_of(self, line: str) -> int | None:
        if self.GRPC_LINE in line:
            return int(line.rsplit(":", 1)[1])
        return None

    def _rest_port_of(self, line: str) -> int | None:
        if self.REST_LINE in line:
            host_port = line.split("://", 1)[1].split("/", 1)[0]
            return int(host_port.rsplit(":", 1)[1])
        return None

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """``(status, body)`` of a GET on the router's REST port."""
        return http_get(self.rest_url + path, timeout, self.ssl_context)

    def admin_url(self, timeout: float = 2.0) -> str | None:
        """The admin status URL the router printed (``  admin:   http://127.0.0.1:PORT/...``), or None.

        The router prints its addresses in one block before ``tfs-router
        ready``; a router without an admin API prints no such line, so this
        stops looking at the ready line (or after ``timeout``).
        """

        def found(line: str) -> str | None | bool:
            text = line.strip()
            if text.startswith(self.ADMIN_LINE):
                # The URL is the first word that is one; words after it (a hint) are not part of it.
                for word in text[len(self.ADMIN_LINE) :].split():
                    if "://" in word:
                        return word
            return False if text.startswith("tfs-router ready") else None

        try:
            url = self._wait_line(found, timeout)
        except RuntimeError:
            return None
        return url if isinstance(url, str) else None

    def wait_ready(self, timeout: float = 180.0, workers: int = 0) -> float:
        """Block until ``/readyz`` is 200 and ``workers`` workers are ready; seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.get("/readyz", timeout=2)
                if status == 200 and (workers <= 0 or self.ready_workers() >= workers):
                    return time.monotonic() - self.started_at
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"router not ready after {timeout}s:\n{self.log_tail()}")

    def metrics(self, timeout: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
        """The ``/metrics`` samples as ``(name, labels, value)``."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics", timeout)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        ]

    def ready_workers(self) -> int:
        return sum(
            1 for name, labels, value in self.metrics()
            if name == "tfs_router_worker_state" and labels.get("state") == "ready" and value == 1
        )

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes the router spawned (live ones), sorted."""
        return [p for p in child_pids(self.pid) if "workers" in process_cmdline(p)]

    def _remove_config(self) -> None:
        if self.config_path is not None:
            self.config_path.unlink(missing_ok=True)

    def terminate(self, timeout: float = 60.0) -> int | None:
        try:
            return super().terminate(timeout)
        finally:
            self._remove_config()




def start_router(config: Mapping[str, Any], label: str, *, workers: int, timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> RouterProcess:
    """A router on ``config``, waited for until ready with ``workers`` workers; progress on stderr.

    ``ssl_context``: see ``RouterProcess``."""
    progress(f"[{label}] starting router ...")
    router = RouterProcess(config, ssl_context=ssl_context)
    try:
        ready = router.wait_ready(timeout=timeout, workers=workers)
    except BaseException:
        progress(f"[{label}] {router.stop()}")
        raise
    progress(f"[{label}] router pid {router.pid} on {router.grpc_address} ready after {ready:.1f}s, "
             f"workers {router.worker_pids()}")
    return router
