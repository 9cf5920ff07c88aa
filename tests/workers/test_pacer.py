"""The pacer on real processes: a busy idle-class thread paced gets a fraction of a CPU in short bursts and
runs freely again once pacing ends; other threads are never touched (not even woken); a thread is never
left held, whether its pacer is killed or its process is gone.  No TensorFlow here; the worker's use of it
is tested in test_worker_hot_update."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.pacer import held, parse

ROOT = Path(__file__).resolve().parents[2]

# A process with a pacer and three threads: "burner" (idle-class, busy), "normal" (normal class, busy) and
# "sleeper" (idle-class, asleep); it prints their tids, then obeys lines on its stdin: "pace RUN_S PAUSE_S",
# "run" (end the innermost pacing; answers once it has ended), "exit".
BUSY = textwrap.dedent("""
    import asyncio, contextlib, os, sys, threading
    sys.path.insert(0, sys.argv[1])
    from workers.pacer import Pacer
    pacer = Pacer.start()
    tids = {}
    def named(name, idle, work):
        def run():
            with open("/proc/thread-self/comm", "w") as f:
                f.write(name)
            if idle:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            tids[name] = threading.get_native_id()
            work()
        threading.Thread(target=run, daemon=True).start()
    import numpy as np
    def burn():
        # Mostly outside the GIL, like TF's own work on a load thread.
        values = np.random.default_rng(0).random(200_000)
        while True:
            np.sort(values)
    wake = threading.Event()
    named("burner", True, burn)
    named("normal", False, burn)
    named("sleeper", True, wake.wait)
    while len(tids) < 3:
        pass
    print("ready", pacer.pid, tids["burner"], tids["normal"], tids["sleeper"], flush=True)

    async def main():
        loop = asyncio.get_running_loop()
        stack = []
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            word, *args = line.split() or ["exit"]
            if word == "pace":
                cm = pacer.pacing(float(args[0]), float(args[1]))
                await cm.__aenter__()
                stack.append(cm)
            elif word == "run":
                await stack.pop().__aexit__(None, None, None)
            elif word == "sleep":
                await asyncio.sleep(float(args[0]))
            else:
                break
            print("ok", flush=True)
    asyncio.run(main())
    pacer.close()
""")


class Busy:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        word, *ids = self.proc.stdout.readline().split()
        assert word == "ready"
        self.pacer_pid, self.burner, self.normal, self.sleeper = map(int, ids)

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def _task(self, tid: int, name: str) -> str:
        return Path(f"/proc/{self.proc.pid}/task/{tid}/{name}").read_text()

    def cpu(self, tid: int) -> float:
        return int(self._task(tid, "schedstat").split()[0]) / 1e9

    def share(self, tid: int, seconds: float = 0.6) -> float:
        """CPU seconds per wall second of one thread over ``seconds``."""
        c0, t0 = self.cpu(tid), time.monotonic()
        time.sleep(seconds)
        return (self.cpu(tid) - c0) / (time.monotonic() - t0)

    def switches(self, tid: int) -> int:
        status = dict(line.split(":\t") for line in self._task(tid, "status").splitlines() if ":\t" in line)
        return int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])

    def seen_held(self, tid: int, seconds: float = 0.3) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if held(self.proc.pid, tid):
                return True
            time.sleep(0.0002)
        return False


@pytest.fixture
def busy() -> Iterator[Busy]:
    b = Busy()
    yield b
    if b.proc.poll() is None:
        b.proc.kill()
    b.proc.wait()
    for stream in (b.proc.stdin, b.proc.stdout):
        if stream is not None:
            stream.close()


def test_parse_takes_run_and_pause_in_ms_and_refuses_anything_else() -> None:
    assert parse("1/3") == (0.001, 0.003)
    assert parse("0.5/1.5") == (0.0005, 0.0015)
    for bad in ("", "1", "1/0", "0/3", "-1/3", "a/b", "1/3/5", "5000/1"):
        assert parse(bad) is None, bad


def test_a_paced_idle_thread_runs_in_short_bursts_and_freely_once_pacing_ends(busy: Busy) -> None:
    free = busy.share(busy.burner)
    busy.say("pace 0.001 0.003")
    paced = busy.share(busy.burner)
    assert busy.seen_held(busy.burner)
    busy.say("run")
    assert not busy.seen_held(busy.burner)  # let go for good: never inside the handler again
    again = busy.share(busy.burner)
    # Beside a normal-class busy thread the idle one gets whatever CPU is left; paced, a quarter of it.
    assert paced < 0.6 * free and paced < 0.6 * again, (free, paced, again)


def test_only_busy_idle_class_threads_are_held(busy: Busy) -> None:
    before = busy.switches(busy.sleeper)
    busy.say("pace 0.001 0.003")
    assert busy.seen_held(busy.burner)
    assert not busy.seen_held(busy.normal)  # the serving kind of thread is never touched
    busy.say("sleep 0.5")
    assert busy.switches(busy.sleeper) == before  # an idle-class thread asleep is not even woken
    busy.say("run")


def test_nested_pacing_ends_with_the_outermost(busy: Busy) -> None:
    busy.say("pace 0.001 0.003")
    busy.say("pace 0.001 0.003")
    busy.say("run")
    assert busy.seen_held(busy.burner)
    busy.say("run")
    assert not busy.seen_held(busy.burner)


def test_a_pacer_killed_while_holding_a_thread_does_not_leave_it_held(busy: Busy) -> None:
    busy.say("pace 0.05 0.9")  # long holds: the kill almost surely lands inside one
    assert busy.seen_held(busy.burner, seconds=2.0)
    os.kill(busy.pacer_pid, signal.SIGKILL)
    busy.say("sleep 0.6")  # the worker's watch notices within 0.2 s and lets its threads go
    assert not busy.seen_held(busy.burner)
    assert busy.share(busy.burner) > 0.05
    busy.say("run")  # pacing ends without a pacer: nothing to wait for
    busy.say("pace 0.001 0.003")  # and a new request is ignored (logged once)
    assert not busy.seen_held(busy.burner)
    assert busy.proc.poll() is None


def test_the_pacer_leaves_with_its_process(busy: Busy) -> None:
    busy.say("pace 0.001 0.003")
    busy.proc.kill()
    busy.proc.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(busy.pacer_pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(busy.pacer_pid, os.WNOHANG)  # not our child: reaped by init once it exits
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise AssertionError("the pacer outlived its process")
