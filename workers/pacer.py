"""Pacing a worker's own conversion: its loading threads run in short bursts, so the serving workers keep their CPU.

A drained worker converting to a new version (unload, load, warm) does a
second or more of CPU work: a full garbage collection, restoring the
variables, tracing, the warm-up, all on its load thread (and the threads TF
starts from it), which run at SCHED_IDLE.  That is enough against a serving
thread at nice 0 but not against one at nice 19 (the workers' default, so
that the router's loop always comes first): the kernel gives a nice-19
thread only about five times an idle thread's weight, and a busy idle-class
thread holds it back by up to a scheduler slice, again and again, while the
serving worker is the pool's only one.  Measured here, a nice-19 thread
answering pings: p99 0.36 ms alone, 2.8 ms beside two idle-class spinners,
0.41 ms beside the same spinners running 1 ms in every 4.

So while the router asks for it (``x-tfs-router-pace: RUN_MS/PAUSE_MS`` on a
ReloadConfig or warm-up call: the worker is out of rotation), the worker's
idle-class threads that are running are held for PAUSE_MS after every
RUN_MS.  Only those threads: stopping the whole process (SIGSTOP) wakes
every one of its threads twice a cycle (5,000 context switches a second for
11 threads, in a test), noise the serving workers then pay for.  A thread
is held by SIGUSR1, whose handler is libc's ``sleep()`` (called with the
signal's number: at most 10 s), and let go by SIGUSR2, whose handler does
nothing (``getpid()``) but interrupt that sleep: both C functions,
installed with ``sigaction`` through ctypes, so neither needs the GIL,
which a held thread may own (the converting worker is drained: its event
loop only answers the router's control calls, a few ms late).  A thread
nobody lets go (its pacer killed mid-hold) resumes by itself after 10 s.

The cycle is kept by the pacer, a small process forked at the worker's
start (before TF or any thread exists, and before the worker lowers its
priority: its timing must not wait behind the router).  The worker tells
it what to do over a pipe; when told to stop, it lets every held thread go,
checks from ``/proc`` (each thread's blocked and pending signals) that none
is still inside the handler or about to enter it, and answers on a second
pipe.  If the pacer dies, the worker notices within ``WATCH_S`` and lets its
threads go itself; it serves on, unpaced (logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import time
from typing import Any

log = logging.getLogger("workers.pacer")

# HOLD's handler is libc's sleep(HOLD): a held thread sleeps until LET_GO's handler (which does
# nothing) interrupts it, or at most SIGUSR1 = 10 seconds if nobody ever lets it go.
HOLD = signal.SIGUSR1
LET_GO = signal.SIGUSR2
MAX_PACE_S = 600.0  # pacing that nobody ended after this long is ended by the pacer itself
REFRESH_CYCLES = 10  # the threads to pace are read again from /proc every this many cycles
RELEASE_TIMEOUT_S = 1.0
WATCH_S = 0.2
SA_RESTART = 0x10000000  # interrupted system calls resume where they were

_libc = ctypes.CDLL(None, use_errno=True)


class _SigAction(ctypes.Structure):
    """glibc's struct sigaction on 64-bit Linux."""

    _fields_ = [("sa_handler", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16), ("sa_flags", ctypes.c_int),
                ("sa_restorer", ctypes.c_void_p)]


def parse(value: str) -> tuple[float, float] | None:
    """``"1/3"`` -> (0.001, 0.003) seconds of running and of pause; None when malformed or off."""
    try:
        run, pause = (float(x) for x in value.split("/"))
    except ValueError:
        return None
    if not (0 < run <= 1000 and 0 < pause <= 1000):
        return None
    return run / 1000, pause / 1000


def install() -> bool:
    """Install the hold and let-go handlers in this process; False (and nothing changed) if anything
    else already handles those signals."""
    for signum in (HOLD, LET_GO):
        current = _SigAction()
        if _libc.sigaction(signum, None, ctypes.byref(current)) != 0 or current.sa_handler not in (None, 0) \
                or signal.getsignal(signum) not in (signal.SIG_DFL, None):
            log.warning("signal %d is in use: conversions run unpaced", signum)
            return False
    for signum, function in ((HOLD, _libc.sleep), (LET_GO, _libc.getpid)):
        action = _SigAction()
        action.sa_handler = ctypes.cast(function, ctypes.c_void_p).value
        action.sa_flags = SA_RESTART
        if _libc.sigaction(signum, ctypes.byref(action), None) != 0:
            log.warning("sigaction(%d) failed (errno %d): conversions run unpaced", signum, ctypes.get_errno())
            return False
    return True


def _tgkill(pid: int, tid: int, signum: int) -> bool:
    """Signal one thread; False when it is gone."""
    return bool(_libc.tgkill(pid, tid, signum) == 0)


def _status(pid: int, tid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
            return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        return {}


def _bit(mask: str, signum: int) -> bool:
    return bool(int(mask or "0", 16) >> (signum - 1) & 1)


def pacable(pid: int) -> list[int]:
    """The threads of ``pid`` to pace: its idle-class ones (the load thread and what it started) that
    can be let go."""
    found = []
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                stat = f.read()
        except OSError:
            continue
        policy = int(stat[stat.rfind(")") + 2:].split()[41 - 3])  # proc(5): field 41
        if policy != os.SCHED_IDLE:
            continue
        # One that blocks LET_GO could never be let go (HOLD is blocked only while it is held).
        if not _bit(_status(pid, tid).get("SigBlk", "0"), LET_GO):
            found.append(tid)
    return found


def running(pid: int, tid: int) -> bool:
    """Whether the thread is on a CPU or waiting for one (state R): a sleeping thread uses no CPU,
    and holding it would only wake it."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] == "R"


def held(pid: int, tid: int) -> bool:
    """Whether the thread is inside the hold handler (HOLD, and only HOLD of the two, is blocked while
    it runs) or has a HOLD pending.  A thread that blocks both (TF starts some like that) is never held."""
    status = _status(pid, tid)
    blocked = status.get("SigBlk", "0")
    if _bit(blocked, LET_GO):
        return False
    return _bit(blocked, HOLD) or _bit(status.get("SigPnd", "0"), HOLD)


def release(pid: int, tids: list[int], timeout: float = RELEASE_TIMEOUT_S) -> bool:
    """Let every thread of ``tids`` go and make sure none stays held; False if one still is at ``timeout``."""
    end = time.monotonic() + timeout
    waiting = list(tids)
    while waiting:
        waiting = [t for t in waiting if _tgkill(pid, t, LET_GO) and held(pid, t)]
        if not waiting:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.0002)
    return True


def _serve(commands: int, answers: int, parent: int) -> None:
    """The pacer process: pace ``parent`` while told to, until the pipe closes; whatever ends it lets
    every thread go first."""
    try:
        _cycle(commands, answers, parent)
    finally:
        release(parent, pacable(parent))


def _cycle(commands: int, answers: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the worker, which ends us
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # through the release in _serve
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as f:
            f.write("tfs-pacer")  # its name in top and ps -o comm (its argv is still the worker's)
    except OSError:
        pass
    cycle: tuple[float, float] | None = None
    since = 0.0
    targets: list[int] = []
    cycles = 0
    while os.getppid() == parent:
        if cycle is not None and time.monotonic() - since > MAX_PACE_S:
            cycle = None
        holding: list[int] = []
        if cycle is not None:
            if cycles % REFRESH_CYCLES == 0:
                targets = pacable(parent)
            cycles += 1
            holding = [tid for tid in targets if running(parent, tid) and _tgkill(parent, tid, HOLD)]
        # The pause doubles as the wait for a command.
        ready, _, _ = select.select([commands], [], [], None if cycle is None else cycle[1])
        # Every thread inside the handler is let go, not only the ones held just now: a thread that
        # took both signals at once (it was waiting for a CPU all along) ran LET_GO's handler first
        # (the kernel stacks the handlers) and sleeps in HOLD's until the next LET_GO.
        for tid in targets:
            if tid in holding or held(parent, tid):
                _tgkill(parent, tid, LET_GO)
        if ready:
            data = os.read(commands, 4096)
            if not data:
                return  # the worker is gone
            lines = data.decode("ascii", "replace").split()
            command = lines[-1] if lines else ""
            if command == "run":
                released = release(parent, pacable(parent))
                cycle, cycles = None, 0
                os.write(answers, b"y" if released else b"n")
            else:
                cycle = parse(command)
                since = time.monotonic()
        elif cycle is not None:
            time.sleep(cycle[0])


class Pacer:
    """The worker's handle on its pacer process (``start`` forks it)."""

    def __init__(self, pid: int, commands: int, answers: int) -> None:
        self.pid = pid
        self._commands = commands
        self._answers = answers
        self._depth = 0
        self.broken = False

    @classmethod
    def start(cls) -> Pacer | None:
        """Install the handlers and fork the pacer (before any thread exists: a fork copies only the
        calling thread); None when the handlers cannot be installed."""
        if not install():
            return None
        commands_r, commands_w = os.pipe()
        answers_r, answers_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; tested through its effects
            os.close(commands_w)
            os.close(answers_r)
            try:
                _serve(commands_r, answers_w, parent)
            finally:
                os._exit(0)
        os.close(commands_r)
        os.close(answers_w)
        os.set_blocking(commands_w, False)
        os.set_blocking(answers_r, False)
        return cls(pid, commands_w, answers_r)

    def _send(self, command: str) -> bool:
        if self.broken:
            return False
        try:
            os.write(self._commands, f"{command}\n".encode("ascii"))
            return True
        except OSError as exc:
            self._gone(f"cannot reach it: {exc}")
            return False

    def _gone(self, why: str) -> None:
        if not self.broken:
            self.broken = True
            log.warning("the pacer (pid %d) is gone (%s); conversions run unpaced from now on", self.pid, why)
        if not release(os.getpid(), pacable(os.getpid())):
            log.error("a thread of this worker is still held after its pacer left")

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    @contextlib.asynccontextmanager
    async def pacing(self, run_s: float, pause_s: float) -> Any:
        """Paced while inside (nested uses share one pacing; the outermost ends it, and returns only
        once no thread is held any more)."""
        self._depth += 1
        watch = None
        if self._depth == 1 and self._send(f"{run_s * 1000:g}/{pause_s * 1000:g}"):
            watch = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            self._depth -= 1
            if watch is not None:
                watch.cancel()
            if self._depth == 0 and self._send("run"):
                await self._settled()

    async def _watch(self) -> None:
        while not self.broken:
            await asyncio.sleep(WATCH_S)
            if not self.alive():
                self._gone("it exited")

    async def _settled(self) -> None:
        """Wait for the pacer to say every thread runs (it answers once it has checked)."""
        end = time.monotonic() + RELEASE_TIMEOUT_S + 1.0
        while time.monotonic() < end:
            try:
                answer = os.read(self._answers, 16)
            except BlockingIOError:
                if not self.alive():
                    break
                await asyncio.sleep(0.001)
                continue
            if answer.endswith(b"y"):
                return
            break
        if self.alive():  # it answered that a thread is still held, or not in time: let them go ourselves
            log.warning("the pacer could not confirm that every thread runs again; letting them go")
            if not release(os.getpid(), pacable(os.getpid())):
                log.error("a thread of this worker is still held after pacing ended")
        else:
            self._gone("it exited")

    def close(self) -> None:
        """End the pacer (the worker left running)."""
        for fd in (self._commands, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)
