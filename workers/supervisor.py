"""Spawn, pin and restart the worker processes (DESIGN.md, decision 6).

The router process imports this module, so it must never import TensorFlow
(nor ``workers.server`` / ``runtime`` / ``manager``); ``workers.numa`` is pure.

* **Policy**: :func:`worker_specs` turns a placement plan into the exact argv
  and environment of every worker; :func:`find_allocator` turns an allocator
  name into the library Debian installs; :class:`Backoff` decides how long to
  wait before restarting a worker that died. All pure (``worker_specs`` only
  reads sysfs and looks for the allocator's file).
* **Mechanism**: :class:`Supervisor` runs one asyncio task per worker that
  spawns it, waits for its ``tfs-worker listening on ADDRESS`` line, keeps its
  stdout drained, waits for it to exit and restarts it with backoff, reporting
  ``"started"`` / ``"exited"`` events to the router through a callback.
  Workers can be added and removed while the others run (a rollout's surge
  worker).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import stat
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared import frames as frames_lib
from workers import numa as numa_lib

__all__ = [
    "ALLOCATORS",
    "LISTENING_PREFIX",
    "Backoff",
    "Supervisor",
    "WorkerEvent",
    "WorkerSpec",
    "find_allocator",
    "library_dirs",
    "socket_path",
    "worker_specs",
]

log = logging.getLogger("workers.supervisor")

LISTENING_PREFIX = "tfs-worker listening on "
REPO_ROOT = Path(__file__).resolve().parents[1]
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107

WorkerEvent = Literal["started", "exited"]
EventCallback = Callable[[int, WorkerEvent, dict[str, Any]], Awaitable[None] | None]


# --------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to (re)start one worker process."""

    index: int
    address: str  # "unix:/path/w0.sock" or "host:port"
    argv: tuple[str, ...]  # the full command, launch prefix (numactl) included
    env: Mapping[str, str] = field(default_factory=dict)  # the child's full environment
    cpus: tuple[int, ...] = ()  # for logging/metrics only; pinning is in argv


def socket_path(address: str) -> Path | None:
    """The filesystem path of a ``unix:`` address (``unix:PATH`` or ``unix://ABS``), else None."""
    if address.startswith("unix://"):
        return Path(address[len("unix://"):])
    if address.startswith("unix:"):
        return Path(address[len("unix:"):])
    return None


#: Allocator names -> (library files, best first; the Debian packages that install them).
ALLOCATORS: dict[str, tuple[tuple[str, ...], str]] = {
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4 (or libgoogle-perftools4)"),
}


def library_dirs() -> list[Path]:
    """Where distributions put shared libraries, this interpreter's multiarch directories first.

    The multiarch triplet (``x86_64-linux-gnu``) is the interpreter's own, so
    a library of another architecture installed beside it is never preloaded.
    """
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    return [Path(d) for d in (f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/lib64",
                              "/usr/lib", "/lib", "/usr/local/lib")]


def find_allocator(allocator: str, search_dirs: Sequence[Path]) -> Path:
    """The library to preload for ``allocator``: a name of :data:`ALLOCATORS` or a path.

    ValueError when a name's library is in none of ``search_dirs`` (saying
    which Debian package installs it) or a path is not an existing file.
    """
    known = ALLOCATORS.get(allocator)
    if known is None:
        if not os.path.isfile(allocator):
            raise ValueError(f"allocator {allocator!r} is not an existing file "
                             f"nor one of the names {', '.join(sorted(ALLOCATORS))}")
        return Path(allocator)
    files, package = known
    for name in files:
        for directory in search_dirs:
            if (directory / name).is_file():
                return directory / name
    raise ValueError(f"allocator {allocator!r}: none of {', '.join(files)} in "
                     f"{', '.join(map(str, search_dirs))}; install Debian's {package} "
                     f"(apt-get install {package.split()[0]})")


def _env_for(base_env: Mapping[str, str] | None, allocator: str, search_dirs: Sequence[Path]) -> dict[str, str]:
    env = dict(os.environ if base_env is None else base_env)
    root = str(REPO_ROOT)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *(p for p in parts if p != root)])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if allocator:
        library = str(find_allocator(allocator, search_dirs))
        existing = env.get("LD_PRELOAD", "").strip()
        env["LD_PRELOAD"] = f"{library}:{existing}" if existing else library
    return env


def worker_specs(
    count: int,
    socket_dir: Path,
    *,
    numa: bool,
    sysfs_root: str = numa_lib.DEFAULT_SYSFS_NODE_ROOT,
    cpus_per_worker: int = 0,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    predict_threads: int = 0,
    allocator: str = "",
    python: str = sys.executable,
    base_env: Mapping[str, str] | None = None,
    allowed: Iterable[int] | None = None,
    use_numactl: bool = True,
    extra_args: Sequence[str] = (),
    allocator_dirs: Sequence[Path] | None = None,
    frames: bool = False,
) -> list[WorkerSpec]:
    """The specs of ``count`` workers listening on ``<socket_dir>/w<i>.sock``.

    With ``numa=True`` the workers are placed with ``numa.plan`` over the
    topology under ``sysfs_root`` (restricted to ``allowed``, default: this
    process's affinity); ``cpus_per_worker > 0`` gives each worker its own
    slice of that many CPUs, ``<= 0`` lets the workers of a node share all of
    its CPUs (``plan(share_node=True)``). Each worker is launched under ``numactl`` (CPU and memory binding)
    when it is installed and ``use_numactl``; otherwise ``--cpus`` makes the
    worker pin itself before importing TensorFlow. TF thread counts come from
    the placement unless the given value is > 0. With ``numa=False`` there is
    no pinning and thread counts are 0 (TF's default) unless given.
    ``predict_threads <= 0`` keeps the worker's own default.

    The environment (``base_env``, default ``os.environ``) gets the repo root
    prepended to PYTHONPATH, TF_CPP_MIN_LOG_LEVEL defaulting to "2", and the
    allocator's library in LD_PRELOAD when one is given: "jemalloc",
    "tcmalloc" or a path (:func:`find_allocator`, searching ``allocator_dirs``,
    default :func:`library_dirs`). ``extra_args`` are appended to every
    worker's argv.  ``frames``: each worker also serves Predict over the
    router's framed protocol on ``<socket_dir>/w<i>.frames.sock``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    env = _env_for(base_env, allocator, library_dirs() if allocator_dirs is None else allocator_dirs)
    socket_dir = Path(socket_dir).absolute()

    placements: Sequence[numa_lib.Placement | None]
    if numa:
        topology = numa_lib.read_topology(sysfs_root, allowed)
        # No explicit slice size: the workers of a node share its CPUs.
        placements = numa_lib.plan(topology, count, cpus_per_worker if cpus_per_worker > 0 else None,
                                   share_node=cpus_per_worker <= 0)
    else:
        placements = [None] * count

    specs: list[WorkerSpec] = []
    for index, placement in enumerate(placements):
        path = socket_dir / f"w{index}.sock"
        if len(os.fsencode(str(path))) > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path too long ({len(os.fsencode(str(path)))} > {_MAX_UNIX_PATH} bytes): {path}")
        address = f"unix:{path}"
        prefix: list[str] = []
        pin: list[str] = []
        cpus: tuple[int, ...] = ()
        intra, inter = max(intra_op_threads, 0), max(inter_op_threads, 0)
        if placement is not None:
            cpus = placement.cpus
            prefix = numa_lib.launch_prefix(placement, use_numactl)
            if not prefix:
                # No numactl: the worker pins its CPUs and binds its memory itself.
                pin = ["--cpus", numa_lib.format_cpulist(cpus), "--mem-node", str(placement.node)]
            intra = intra_op_threads if intra_op_threads > 0 else placement.intra_op_threads
            inter = inter_op_threads if inter_op_threads > 0 else placement.inter_op_threads
        argv = [
            *prefix,
            python, "-m", "workers",
            "--listen", address,
            *pin,
            "--intra-op-threads", str(intra),
            "--inter-op-threads", str(inter),
        ]
        if predict_threads > 0:
            argv += ["--predict-threads", str(predict_threads)]
        if frames:
            argv += ["--frames-listen", str(frames_lib.socket_for(address))]
        argv += list(extra_args)
        specs.append(WorkerSpec(index, address, tuple(argv), dict(env), cpus))
    return specs


class Backoff:
    """Restart delay for one worker: doubles per consecutive quick failure.

    The first failure waits ``initial``, the next quick one twice that, and so
    on up to ``maximum``. A process that lived at least ``reset_after``
    seconds counts as healthy: its restart waits ``initial`` again and the
    doubling starts over from there.
    """

    def __init__(self, initial: float, maximum: float, reset_after: float = 30.0) -> None:
        if initial <= 0:
            raise ValueError(f"initial backoff must be > 0, got {initial}")
        if maximum < initial:
            raise ValueError(f"maximum backoff {maximum} < initial {initial}")
        if reset_after < 0:
            raise ValueError(f"reset_after must be >= 0, got {reset_after}")
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after
        self._next = initial

    def next_delay(self, lived_for: float) -> float:
        if lived_for >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(delay * 2, self.maximum)
        return delay


# --------------------------------------------------------------------------
# Mechanism
# --------------------------------------------------------------------------


@dataclass
class _Worker:
    spec: WorkerSpec
    backoff: Backoff
    started_once: asyncio.Event = field(default_factory=asyncio.Event)
    halt: asyncio.Event = field(default_factory=asyncio.Event)  # set by stop() or remove(): never spawn again
    removing: bool = False
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    spawns: int = 0


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


class Supervisor:
    """Keeps one process per :class:`WorkerSpec` running until :meth:`stop`.

    ``on_event(index, "started", {"address", "pid"})`` is called once a worker
    printed its listening line (the printed address, which differs from the
    spec's for ``host:0``); ``on_event(index, "exited", {"returncode", "pid",
    "lived_for"})`` once it was reaped, including exits during start-up (a
    worker that doesn't print the line within ``startup_timeout`` is killed)
    and exits caused by :meth:`stop` or :meth:`remove`. The callback may be
    sync or async; its exceptions are logged and otherwise ignored. ``clock``
    only measures how long a process lived (for :class:`Backoff`).

    Everything runs on one event loop, so :meth:`add` and :meth:`remove` are
    safe while other workers run and while :meth:`stop` is in progress: each
    worker has its own task and its own halt flag.
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        on_event: EventCallback,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        startup_timeout: float = 180.0,
        stderr: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_reset_after: float = 30.0,
    ) -> None:
        indexes = [spec.index for spec in specs]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"duplicate worker indexes: {indexes}")
        self._backoff = (backoff_initial, backoff_max, backoff_reset_after)
        self._workers = {spec.index: _Worker(spec, Backoff(*self._backoff)) for spec in specs}
        self._on_event = on_event
        self._startup_timeout = startup_timeout
        self._stderr = stderr
        self._clock = clock
        self._drains: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False

    # ---------------------------------------------------------------- public

    @property
    def specs(self) -> list[WorkerSpec]:
        return [w.spec for w in self._workers.values()]

    async def start(self) -> None:
        """Start one supervising task per worker; returns at once."""
        if self._stopping:
            raise RuntimeError("supervisor is stopped")
        if self._started:
            raise RuntimeError("supervisor already started")
        self._started = True
        for worker in self._workers.values():
            self._launch(worker)

    async def add(self, spec: WorkerSpec) -> None:
        """Supervise one more worker (a rollout's surge worker), with the same events and backoff.

        Spawned at once when the supervisor runs, by :meth:`start` otherwise.
        ValueError when the index is taken (a worker being removed holds it
        until :meth:`remove` returns); RuntimeError once :meth:`stop` began.
        """
        if self._stopping:
            raise RuntimeError("supervisor is stopped")
        if spec.index in self._workers:
            raise ValueError(f"duplicate worker index: {spec.index}")
        worker = self._workers[spec.index] = _Worker(spec, Backoff(*self._backoff))
        if self._started:
            self._launch(worker)

    async def remove(self, index: int, timeout: float = 10.0) -> None:
        """Stop one worker for good: SIGTERM, SIGKILL after ``timeout``, no restart.

        Its "exited" event is still emitted (when it had a process); once this
        returns, the index is gone from :attr:`specs` and free for :meth:`add`.
        ValueError for an unknown index or one already being removed.
        """
        worker = self._workers.get(index)
        if worker is None or worker.removing:
            raise ValueError(f"no worker with index {index} to remove")
        worker.removing = True
        worker.halt.set()
        worker.started_once.set()  # wait_started() waits only for the workers that stay
        try:
            await self._terminate([worker], timeout)
        finally:
            task = worker.task
            if task is None or task.done():
                del self._workers[index]
            else:  # remove() itself was cancelled: forget the worker once its task ends
                task.add_done_callback(lambda _: self._forget(worker))

    async def wait_started(self, timeout: float) -> bool:
        """True once every worker has printed its listening line at least once."""
        try:
            async with asyncio.timeout(timeout):
                while waiting := [w for w in self._workers.values() if not w.started_once.is_set()]:
                    await waiting[0].started_once.wait()
        except TimeoutError:
            return False
        return True

    def pid(self, index: int) -> int | None:
        """The pid of the worker's current process, None while it isn't running."""
        proc = self._workers[index].proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def restarts(self, index: int) -> int:
        """How many times the worker was respawned after its first start."""
        return max(self._workers[index].spawns - 1, 0)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker, SIGKILL those still alive after ``timeout``.

        No worker is restarted once this begins. Returns when every process
        has been reaped (or, in the pathological case of an unkillable one,
        a few seconds after SIGKILL) and the supervising tasks are finished.
        """
        self._stopping = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.halt.set()
        await self._terminate(workers, timeout)
        for drain in list(self._drains):
            drain.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    # -------------------------------------------------------------- internals

    def _launch(self, worker: _Worker) -> None:
        index = worker.spec.index
        worker.task = asyncio.create_task(self._supervise(worker), name=f"worker-supervisor-{index}")

    def _forget(self, worker: _Worker) -> None:
        if self._workers.get(worker.spec.index) is worker:
            del self._workers[worker.spec.index]

    async def _terminate(self, workers: Sequence[_Worker], timeout: float) -> None:
        """SIGTERM the (halted) ``workers``, SIGKILL those alive after ``timeout``; wait for their tasks."""
        tasks = [w.task for w in workers if w.task is not None and not w.task.done()]
        for worker in workers:
            if worker.proc is not None:
                _signal(worker.proc, signal.SIGTERM)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            for worker in workers:
                if worker.proc is not None and worker.proc.returncode is None:
                    log.warning("worker %d (pid %s) ignored SIGTERM for %.1fs; killing it",
                                worker.spec.index, worker.proc.pid, timeout)
                    _signal(worker.proc, signal.SIGKILL)
            _, pending = await asyncio.wait(pending, timeout=5.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _emit(self, index: int, event: WorkerEvent, info: dict[str, Any]) -> None:
        try:
            result = self._on_event(index, event, info)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("worker %d: %s event callback failed", index, event)

    def _prepare_socket(self, spec: WorkerSpec) -> None:
        path = socket_path(spec.address)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(mode):
            log.info("worker %d: removing stale socket %s", spec.index, path)
            path.unlink(missing_ok=True)
        else:
            log.warning("worker %d: %s exists and is not a socket; leaving it", spec.index, path)

    async def _sleep_unless_halted(self, worker: _Worker, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await worker.halt.wait()
        except TimeoutError:
            pass

    async def _supervise(self, worker: _Worker) -> None:
        index = worker.spec.index
        while not worker.halt.is_set():
            try:
                lived_for = await self._run_once(worker)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %d: supervising failed", index)
                lived_for = 0.0
            if worker.halt.is_set():
                break
            delay = worker.backoff.next_delay(lived_for)
            log.info("worker %d: restarting in %.2fs", index, delay)
            await self._sleep_unless_halted(worker, delay)

    async def _run_once(self, worker: _Worker) -> float:
        """Spawn the worker once and return how long it lived (seconds)."""
        spec = worker.spec
        index = spec.index
        self._prepare_socket(spec)
        worker.spawns += 1
        spawned_at = self._clock()
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=dict(spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=self._stderr,
                start_new_session=False,
            )
        except OSError as exc:
            log.error("worker %d: cannot spawn %s: %s", index, spec.argv[0] if spec.argv else "?", exc)
            return self._clock() - spawned_at
        worker.proc = proc
        if worker.halt.is_set():  # stop() or remove() began while we were spawning: they didn't see this process
            _signal(proc, signal.SIGTERM)
        log.info("worker %d: spawned pid %s (cpus %s)", index, proc.pid,
                 numa_lib.format_cpulist(spec.cpus) or "any")
        drain: asyncio.Task[None] | None = None
        try:
            address = await self._await_listening(worker, proc)
            drain = asyncio.create_task(self._drain(index, proc), name=f"worker-stdout-{index}")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
            if address is not None:
                worker.started_once.set()
                log.info("worker %d: pid %s listening on %s", index, proc.pid, address)
                await self._emit(index, "started", {"address": address, "pid": proc.pid})
            returncode = await proc.wait()
            lived_for = self._clock() - spawned_at
            if worker.halt.is_set():
                log.info("worker %d: pid %s exited with %s", index, proc.pid, _describe(returncode))
            else:
                log.warning("worker %d: pid %s exited with %s after %.1fs",
                            index, proc.pid, _describe(returncode), lived_for)
            await self._finish_drain(drain)
            drain = None
            await self._emit(index, "exited", {"returncode": returncode, "pid": proc.pid, "lived_for": lived_for})
            return lived_for
        except asyncio.CancelledError:
            # Cancelled from outside stop() (e.g. the loop shutting down): don't orphan the child.
            _signal(proc, signal.SIGKILL)
            if drain is not None:
                drain.cancel()
            raise
        finally:
            if worker.proc is proc and proc.returncode is not None:
                worker.proc = None

    async def _await_listening(self, worker: _Worker, proc: asyncio.subprocess.Process) -> str | None:
        """The address from the listening line, or None (EOF or startup timeout: then the process is killed)."""
        assert proc.stdout is not None
        index = worker.spec.index
        try:
            async with asyncio.timeout(self._startup_timeout):
                while True:
                    try:
                        line = await proc.stdout.readline()
                    except ValueError:  # a line over the stream limit: skip it
                        continue
                    if not line:
                        return None
                    text = line.decode(errors="replace").rstrip()
                    if text.startswith(LISTENING_PREFIX):
                        return text[len(LISTENING_PREFIX):].strip()
                    if text:
                        log.info("worker %d: %s", index, text)
        except TimeoutError:
            log.error("worker %d: pid %s did not print its listening line within %.1fs; killing it",
                      index, proc.pid, self._startup_timeout)
            _signal(proc, signal.SIGKILL)
            return None

    async def _drain(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Read stdout to EOF so the pipe never fills and the transport closes."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                log.info("worker %d: %s", index, text)

    async def _finish_drain(self, drain: asyncio.Task[None]) -> None:
        """Wait briefly for EOF after exit; a grandchild may still hold the pipe open."""
        done, _ = await asyncio.wait([drain], timeout=2.0)
        if not done:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

