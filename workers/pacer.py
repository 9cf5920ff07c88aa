"""Pacing a worker's own conversion: short bursts of running, so that the workers serving beside it keep their CPU.

A drained worker converting to a new version (unload, load, warm) does a
second or more of CPU work: a full garbage collection, restoring the
variables, tracing, the warm-up.  Its load thread runs at SCHED_IDLE,
which is enough against a serving thread at nice 0 but not against one at
nice 19 (the workers' default, so that the router's loop always comes
first): the kernel gives a nice-19 thread only about five times an idle
thread's weight, and a CPU-bound idle thread holds it back by up to a
scheduler slice, again and again, while the serving worker is the pool's
only one.  Measured here, a nice-19 thread answering pings: p99 0.36 ms
alone, 2.8 ms beside two idle-class spinners, 0.41 ms beside the same
spinners running 1 ms in every 4.

So while the router asks for it (``x-tfs-router-pace: RUN_MS/PAUSE_MS`` on
a ReloadConfig or warm-up call: the worker is out of rotation), the worker's
pacer stops the whole worker process (SIGSTOP) for PAUSE_MS and lets it go
(SIGCONT) for RUN_MS, in turn: the conversion runs only in bursts too short
to hold a serving thread back, on at most RUN / (RUN + PAUSE) of a CPU.

The pacer is a small process forked at the worker's start, before TF or any
thread exists, and before the worker lowers its own priority (its timing
must not wait behind the router).  The worker tells it what to do over a
pipe; it paces only its own parent, leaves it running whenever it is told to
stop, is told nothing for ``MAX_PACE_S``, or its parent is gone, and a
worker whose pacer died only loses the pacing (the write fails, logged once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Iterator

log = logging.getLogger("workers.pacer")

METADATA_KEY = "x-tfs-router-pace"
MAX_PACE_S = 600.0  # pacing that nobody ended after this long is ended by the pacer itself


def parse(value: str) -> tuple[float, float] | None:
    """``"1/3"`` -> (0.001, 0.003) seconds of running and of pause; None when malformed or off."""
    try:
        run, pause = (float(x) for x in value.split("/"))
    except ValueError:
        return None
    if not (0 < run <= 1000 and 0 < pause <= 1000):
        return None
    return run / 1000, pause / 1000


def _serve(fd: int, parent: int) -> None:
    """The pacer process: pace ``parent`` while told to, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the worker, which ends us
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as f:
            f.write("tfs-pacer")  # its name in top and ps -o comm (its argv is still the worker's)
    except OSError:
        pass
    cycle: tuple[float, float] | None = None
    since = 0.0
    stopped = False
    try:
        while True:
            if cycle is not None and time.monotonic() - since > MAX_PACE_S:
                cycle = None
            timeout = None if cycle is None else cycle[1]
            if cycle is not None:
                os.kill(parent, signal.SIGSTOP)
                stopped = True
            ready, _, _ = select.select([fd], [], [], timeout)  # the pause doubles as the wait for a command
            if stopped:
                os.kill(parent, signal.SIGCONT)
                stopped = False
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    return  # the worker is gone
                last = data.decode("ascii", "replace").strip().splitlines()[-1:]
                command = last[0] if last else ""
                cycle = parse(command) if command != "run" else None
                since = time.monotonic()
            elif cycle is not None:
                time.sleep(cycle[0])
            if os.getppid() != parent:
                return
    except ProcessLookupError:
        return
    finally:
        if stopped:
            try:
                os.kill(parent, signal.SIGCONT)
            except ProcessLookupError:
                pass


class Pacer:
    """The worker's handle on its pacer process (``start`` forks it)."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self._depth = 0
        self._broken = False

    @classmethod
    def start(cls) -> Pacer:
        """Fork the pacer.  Call before any thread exists (a fork copies only the calling thread)."""
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; tested through its effects
            os.close(write)
            try:
                _serve(read, parent)
            finally:
                os._exit(0)
        os.close(read)
        os.set_blocking(write, False)
        return cls(pid, write)

    def _send(self, command: str) -> None:
        if self._broken:
            return
        try:
            os.write(self._fd, f"{command}\n".encode("ascii"))
        except OSError as exc:  # the pacer died: serve on, unpaced
            self._broken = True
            log.warning("the pacer (pid %d) is gone; conversions run unpaced: %s", self.pid, exc)

    @contextlib.contextmanager
    def pacing(self, run_s: float, pause_s: float) -> Iterator[None]:
        """Paced while inside (nested uses share one pacing; the outermost ends it)."""
        self._depth += 1
        if self._depth == 1:
            self._send(f"{run_s * 1000:g}/{pause_s * 1000:g}")
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._send("run")

    def close(self) -> None:
        """End the pacer (the worker left running)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)
