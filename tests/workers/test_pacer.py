"""The pacer on real processes: a busy process paced gets a fraction of a CPU in short bursts, runs freely
again once told, and is never left stopped (its pacer killed, or itself gone).  No TensorFlow here; the
worker's use of it is tested in test_worker_hot_update."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.pacer import parse

ROOT = Path(__file__).resolve().parents[2]

# A process that burns CPU, with a pacer of its own, driven by lines on its stdin:
# "pace RUN_S PAUSE_S" / "run" / "exit"; it prints "ready PACER_PID" once started.
BUSY = textwrap.dedent("""
    import os, sys, threading
    sys.path.insert(0, sys.argv[1])
    from workers.pacer import Pacer
    pacer = Pacer.start()
    def burn():
        while True:
            sum(range(10000))
    threading.Thread(target=burn, daemon=True).start()
    print("ready", pacer.pid, flush=True)
    contexts = []
    for line in sys.stdin:
        word, *args = line.split()
        if word == "pace":
            contexts.append(pacer.pacing(float(args[0]), float(args[1])))
            contexts[-1].__enter__()
        elif word == "run":
            contexts.pop().__exit__(None, None, None)
        elif word == "exit":
            break
        print("ok", flush=True)
    pacer.close()
""")


class Busy:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        word, pid = self.proc.stdout.readline().split()
        assert word == "ready"
        self.pacer_pid = int(pid)

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def cpu_share(self, seconds: float = 0.6) -> float:
        """CPU seconds per wall second over ``seconds`` (from /proc, all threads)."""
        def cpu() -> float:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        return (cpu() - c0) / (time.monotonic() - t0)

    def states(self, seconds: float = 0.3) -> set[str]:
        seen = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            seen.add(stat[stat.rfind(")") + 2])
            time.sleep(0.0005)
        return seen


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


def test_a_paced_process_runs_in_short_bursts_and_freely_once_released(busy: Busy) -> None:
    free = busy.cpu_share()
    busy.say("pace 0.001 0.003")
    paced = busy.cpu_share()
    assert "T" in busy.states()  # stopped between bursts
    busy.say("run")
    assert "T" not in busy.states()
    again = busy.cpu_share()
    assert paced < 0.6 * free and paced < 0.6 * again, (free, paced, again)


def test_nested_pacing_ends_with_the_outermost(busy: Busy) -> None:
    busy.say("pace 0.001 0.003")
    busy.say("pace 0.001 0.003")
    busy.say("run")
    assert "T" in busy.states()
    busy.say("run")
    assert "T" not in busy.states()


def test_a_killed_pacer_leaves_the_process_running_and_pacing_off(busy: Busy) -> None:
    os.kill(busy.pacer_pid, 15)  # SIGTERM: it ends its cycle with the process running
    time.sleep(0.2)
    assert "T" not in busy.states()
    busy.say("pace 0.001 0.003")  # the write finds no reader: logged, ignored
    assert "T" not in busy.states()
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
        # A pacer whose parent is gone is reparented; it notices at its next cycle.
        try:
            os.waitpid(busy.pacer_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise AssertionError("the pacer outlived its process")
