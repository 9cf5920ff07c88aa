"""Where the CPU goes, thread by thread: a sampler of ``/proc`` for the processes of a benchmark.

Every ``interval`` seconds, for each traced process and each of its threads,
it reads ``/proc/PID/task/TID/schedstat`` (nanoseconds on a CPU, nanoseconds
runnable but waiting for one: the run-queue delay that CPU contention adds
to a thread) and ``/proc/PID/task/TID/stat`` (minor and major page faults,
user and kernel ticks).  Threads are grouped by role: ``main`` (the thread
whose id is the process id: the event loop, and in a worker the inline TF
calls), ``load`` (a worker's idle-class load thread), and otherwise the
thread's kernel name with digits dropped (TF's Eigen pool threads are named
after the process, gRPC's own ``grpc_global_tim`` and ``default-executo``).

``ProcTrace.between(t0, t1)`` sums what every (process, role) used in a
window: CPU seconds, run-queue wait seconds, page faults; the benchmark
uses it to say which process, and which of its threads, a phase of a
rollout costs.  Sampling runs on a plain thread (reading ``/proc`` does not
wait on the benchmark's event loop) and costs about 0.1 ms per thread per
sample.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Usage:
    """What one (process, thread role) used over a window."""

    cpu_s: float = 0.0  # on a CPU
    wait_s: float = 0.0  # runnable, waiting for a CPU
    user_s: float = 0.0  # of cpu_s, in user mode (tick resolution)
    system_s: float = 0.0  # of cpu_s, in the kernel (tick resolution)
    minor_faults: int = 0
    major_faults: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.cpu_s + other.cpu_s, self.wait_s + other.wait_s, self.user_s + other.user_s,
                     self.system_s + other.system_s, self.minor_faults + other.minor_faults,
                     self.major_faults + other.major_faults)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu_s - other.cpu_s, self.wait_s - other.wait_s, self.user_s - other.user_s,
                     self.system_s - other.system_s, self.minor_faults - other.minor_faults,
                     self.major_faults - other.major_faults)


_TICK = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def role_of(pid: int, tid: int, comm: str) -> str:
    if tid == pid:
        return "main"
    name = _DIGITS.sub("", comm).strip("-_ ") or "thread"
    return "load" if name == "load" else name


def read_thread(pid: int, tid: int) -> tuple[str, Usage] | None:
    """(role, cumulative usage) of one thread; None once it is gone."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/schedstat", encoding="ascii") as f:
            run_ns, wait_ns, _ = f.read().split()
        with open(f"{base}/stat", encoding="ascii") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    # The name is in parentheses and may hold spaces: the fields follow its last ")".
    close = stat.rfind(")")
    comm = stat[stat.find("(") + 1:close]
    fields = stat[close + 2:].split()
    # fields[0] is field 3 (state): minflt is field 10, majflt 12, utime 14, stime 15.
    usage = Usage(int(run_ns) / 1e9, int(wait_ns) / 1e9, int(fields[11]) * _TICK, int(fields[12]) * _TICK,
                  int(fields[7]), int(fields[9]))
    return role_of(pid, tid, comm), usage


def read_process(pid: int) -> dict[int, tuple[str, Usage]]:
    """tid -> (role, cumulative usage) for every live thread of ``pid``.

    Threads that ran and exited between two samples are invisible here; their
    CPU is in the process's own total (``process_ticks``), which ``ProcTrace``
    compares with the sum of the live threads' under the role ``exited``.
    """
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    out = {}
    for tid in tids:
        found = read_thread(pid, tid)
        if found is not None:
            out[tid] = found
    return out


def process_ticks(pid: int) -> float:
    """User + system CPU seconds of ``pid`` with its exited threads (``/proc/PID/stat``); NaN if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return math.nan
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * _TICK


def resident_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``/proc/PID/statm``); 0 if gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def others_ticks(exclude: set[int]) -> float:
    """User + system CPU seconds of every process of the machine but ``exclude`` (kernel threads too)."""
    total = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        value = process_ticks(int(name))
        if value == value:
            total += value
    return total


Sample = tuple[float, dict[str, dict[int, tuple[str, Usage]]]]  # (monotonic, process label -> tid -> ...)
OTHERS_EVERY = 10
MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def read_machine() -> tuple[float, ...]:
    """Seconds every CPU of the machine spent in each of ``MACHINE_FIELDS`` since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:1 + len(MACHINE_FIELDS)]
    return tuple(int(x) * _TICK for x in fields)


class ProcTrace:
    """Samples the threads of named processes until stopped.

    ``processes`` is called at every sample and returns label -> pid (so a
    restarted or added worker is followed); a process missing from one
    sample to the next contributes nothing for that interval.
    """

    def __init__(self, processes: Callable[[], Mapping[str, int]], interval: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.processes = processes
        self.interval = interval
        self.clock = clock
        self.samples: list[Sample] = []
        self.machine: list[tuple[float, ...]] = []  # read_machine() at each sample
        self.totals: list[dict[str, tuple[int, float]]] = []  # per sample: label -> (pid, process CPU s)
        self.rss: list[dict[str, int]] = []  # per sample: label -> resident bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now = self.clock()
        processes = dict(self.processes())
        self.samples.append((now, {label: read_process(pid) for label, pid in processes.items()}))
        self.machine.append(read_machine())
        # process label -> (pid, CPU s of the whole process); "others": the rest of the machine
        totals = {label: (pid, process_ticks(pid)) for label, pid in processes.items()}
        # Every process of the machine is a few ms of reading: only every OTHERS_EVERY-th sample.
        if len(self.samples) % OTHERS_EVERY == 1 or not self.totals:
            totals["others"] = (0, others_ticks(set(processes.values())))
        self.totals.append(totals)
        self.rss.append({label: resident_bytes(pid) for label, pid in processes.items()})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="proctrace", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _at(self, t: float) -> int:
        """Index of the last sample at or before ``t`` (0 if none)."""
        lo, hi = 0, len(self.samples) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.samples[mid][0] <= t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def between(self, t0: float, t1: float) -> dict[tuple[str, str], Usage]:
        """(process label, thread role) -> usage between the samples nearest ``t0`` and ``t1``.

        Per thread: the difference of its cumulative counters between the two
        samples, or its whole count at ``t1`` when it was born in between.
        """
        if not self.samples:
            return {}
        _, first = self.samples[self._at(t0)]
        _, last = self.samples[self._at(t1)]
        out: dict[tuple[str, str], Usage] = {}
        for label, threads in last.items():
            before = first.get(label, {})
            for tid, (role, usage) in threads.items():
                prior = before.get(tid)
                delta = usage - prior[1] if prior is not None else usage
                key = (label, role)
                out[key] = out.get(key, Usage()) + delta
        return out

    def totals_between(self, t0: float, t1: float) -> dict[str, float]:
        """label -> CPU seconds of the whole process (exited threads included) between the samples
        nearest t0 and t1; ``others``: every other process of the machine.  A process whose pid
        changed in between (restarted) is left out."""
        i, j = self._at(t0), self._at(t1)
        out = {}
        for label, (pid, end) in self.totals[j].items():
            start = self.totals[i].get(label)
            if start is not None and start[0] == pid and end == end and start[1] == start[1]:
                out[label] = end - start[1]
        # "others" is read every OTHERS_EVERY samples: the nearest readings at or before each end.
        a = next((k for k in range(i, -1, -1) if "others" in self.totals[k]), None)
        b = next((k for k in range(j, -1, -1) if "others" in self.totals[k]), None)
        if a is not None and b is not None and b > a:
            wall = self.samples[b][0] - self.samples[a][0]
            span = self.samples[j][0] - self.samples[i][0]
            out["others"] = (self.totals[b]["others"][1] - self.totals[a]["others"][1]) * (span / wall)
        return out

    def machine_between(self, t0: float, t1: float) -> dict[str, float]:
        """Cores of the whole machine in each ``MACHINE_FIELDS`` state between the samples nearest t0 and t1."""
        i, j = self._at(t0), self._at(t1)
        wall = self.samples[j][0] - self.samples[i][0]
        if wall <= 0:
            return {}
        return {name: (b - a) / wall for name, a, b in zip(MACHINE_FIELDS, self.machine[i], self.machine[j])}

    def dump(self) -> dict[str, Any]:
        """Every sample as arrays, for a closer look later: ``time`` (end of each interval), and per
        ``label/role``: ``cpu``, ``wait``, ``sys`` (seconds in the interval), ``faults``; per machine
        state (``machine/idle`` ...) and process total (``total/LABEL``) likewise; ``rss/LABEL``:
        resident bytes at each sample."""
        import numpy as np

        keys = sorted({(label, role) for _, procs in self.samples for label, threads in procs.items()
                       for role, _ in threads.values()})
        out: dict[str, Any] = {"time": np.array([t for t, _ in self.samples[1:]])}
        for label, role in keys:
            rows = [u for _, u in self.series(label, role)]
            out[f"{label}/{role}/cpu"] = np.array([u.cpu_s for u in rows])
            out[f"{label}/{role}/wait"] = np.array([u.wait_s for u in rows])
            out[f"{label}/{role}/sys"] = np.array([u.system_s for u in rows])
            out[f"{label}/{role}/faults"] = np.array([u.minor_faults + u.major_faults for u in rows])
        for k, name in enumerate(MACHINE_FIELDS):
            out[f"machine/{name}"] = np.diff(np.array([m[k] for m in self.machine]))
        for label in sorted({label for r in self.rss for label in r}):
            out[f"rss/{label}"] = np.array([r.get(label, 0) for r in self.rss[1:]], dtype=np.int64)
        labels = sorted({label for t in self.totals for label in t})
        for label in labels:
            values = [t.get(label, (0, math.nan)) for t in self.totals]
            out[f"total/{label}"] = np.array([b[1] - a[1] if a[0] == b[0] else math.nan
                                              for a, b in zip(values, values[1:])])
        return out

    def series(self, label: str, role: str) -> list[tuple[float, Usage]]:
        """(time, usage since the previous sample) of one (process, role), sample by sample."""
        out = []
        for (t0, a), (t1, b) in zip(self.samples, self.samples[1:]):
            total = Usage()
            before = a.get(label, {})
            for tid, (r, usage) in b.get(label, {}).items():
                if r != role or tid not in before:
                    continue
                total = total + (usage - before[tid][1])
            out.append((t1, total))
        return out
