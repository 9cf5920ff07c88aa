"""Cutting an update run at the rollout's events, and saying what each piece cost.

``segments`` turns the admin API's rollout entry (events with wall times,
a worker and a phase) into consecutive segments of the run on the load's
clock: ``before`` (until the version appears), ``detect`` (until the
rollout starts), then one per event (``A drain``, ``A unload``, ``A load``,
``A warm``, ``A join``, ``switch``, ``B drain`` ...; workers lettered in the
order they are converted), ``after`` (from the end of the rollout to the end
of the run).  ``attribute`` then says, per segment, how much latency its
requests had beyond the round's control run and what every process used
(``ProcTrace``), beside what the same process used in the control run.
``combine`` sums the rounds into one table.  Pure but for the trace it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.openloop import LatencyStats, OpenLoopResult, fmt_ms, pct
from loadtest.proctrace import ProcTrace, Usage

# Shown per segment: the router, the client, each worker by letter.
SHOWN = ("router", "A", "B", "client")
# CPU is sampled every 50 ms: a shorter segment's share of it says nothing.
MIN_CPU_SECONDS = 0.15


@dataclass(frozen=True)
class Segment:
    label: str
    start: float  # load clock
    end: float
    workers: tuple[tuple[str, str], ...] = ()  # (letter, worker name) of the run


def segments(rollout: Mapping[str, Any], run_start: float, run_end: float, appeared: float,
             wall_offset: float) -> list[Segment]:
    """The run cut at ``rollout``'s events; only ``before`` and ``after`` when it has none."""
    events = []
    for event in rollout.get("events") or []:
        try:
            events.append((float(event["time"]) - wall_offset, event.get("worker"), str(event.get("phase"))))
        except (KeyError, TypeError, ValueError):
            continue
    events.sort(key=lambda e: e[0])
    letters: dict[str, str] = {}
    for _, worker, _ in events:
        if worker and worker not in letters:
            letters[worker] = chr(ord("A") + len(letters))
    marks: list[tuple[float, str]] = [(run_start, "before"), (appeared, "detect" if events else "after")]
    for at, worker, phase in events:
        if worker:
            label = f"{letters[worker]} {phase}"
        else:
            label = {"load": "start", "done": "after"}.get(phase, phase)
        marks.append((min(max(at, appeared), run_end), label))
    workers = tuple((letter, name) for name, letter in letters.items())
    out: list[Segment] = []
    for i, (at, label) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else run_end
        if out and out[-1].label == label:
            out[-1] = Segment(label, out[-1].start, end, workers)
        else:
            out.append(Segment(label, at, end, workers))
    return out


@dataclass
class SegmentRow:
    label: str
    seconds: float
    requests: int
    over_p999: int  # requests above the control run's p999
    excess_ms: float  # summed latency above the control run's p99
    expected_ms: float  # what the control run had of that in as many seconds
    p999: float
    cores: dict[str, float] = field(default_factory=dict)  # process (router, A, B, client) -> cores used
    control_cores: dict[str, float] = field(default_factory=dict)  # the same process in the control run
    wait: dict[str, float] = field(default_factory=dict)  # process -> its main thread's run-queue wait, s per s
    roles: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> thread role -> cores
    # process -> thread role -> {cpu, sys (cores), wait (s per s), faults (per s)}
    detail: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)  # /proc/stat states, cores

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "seconds": self.seconds, "requests": self.requests,
                "over_p999": self.over_p999, "excess_ms": self.excess_ms, "expected_ms": self.expected_ms,
                "p999": self.p999,
                "cores": self.cores, "control_cores": self.control_cores, "wait": self.wait, "roles": self.roles,
                "detail": self.detail, "machine": self.machine}


def _by_process(usage: Mapping[tuple[str, str], Usage]) -> dict[str, Usage]:
    out: dict[str, Usage] = {}
    for (label, _), u in usage.items():
        out[label] = out.get(label, Usage()) + u
    return out


def excess_ms(latency: Any, p99: float) -> float:
    """Summed latency above ``p99`` (ms) of the answered ``latency`` values."""
    return float(np.clip(latency - p99, 0, None).sum() * 1000)


def attribute(load: OpenLoopResult[Any], segs: Sequence[Segment], control: LatencyStats, trace: ProcTrace,
              control_start: float, control_end: float) -> list[SegmentRow]:
    """One row per segment; ``expected_ms``: the excess the control run itself had in as many seconds."""
    latency = load.latency
    ctl_seconds = max(control_end - control_start, 1e-9)
    ctl_lat = latency[load.window(control_start, control_end)]
    ctl_excess_per_s = excess_ms(ctl_lat[~np.isnan(ctl_lat)], control.p99) / ctl_seconds
    ctl = _by_process(trace.between(control_start, control_end))
    rows = []
    for seg in segs:
        names = {"router": "router", "client": "client", **{letter: name for letter, name in seg.workers}}
        mask = load.window(seg.start, seg.end)
        lat = latency[mask]
        lat = lat[~np.isnan(lat)]
        seconds = max(seg.end - seg.start, 0.0)
        usage = trace.between(seg.start, seg.end) if seconds > 0 else {}
        per_process = _by_process(usage)
        row = SegmentRow(seg.label, seconds, int(mask.sum()), int((lat > control.p999).sum()),
                         excess_ms(lat, control.p99), ctl_excess_per_s * seconds, pct(lat, 99.9))
        for shown, name in names.items():
            if seconds >= MIN_CPU_SECONDS:
                row.cores[shown] = per_process.get(name, Usage()).cpu_s / seconds
                main = usage.get((name, "main"), Usage())
                row.wait[shown] = main.wait_s / seconds
                roles = {role: u.cpu_s / seconds for (proc, role), u in usage.items() if proc == name}
                row.roles[shown] = {r: c for r, c in sorted(roles.items()) if c >= 0.005}
                row.detail[shown] = {
                    role: {"cpu": u.cpu_s / seconds, "sys": u.system_s / seconds, "wait": u.wait_s / seconds,
                           "faults": (u.minor_faults + u.major_faults) / seconds}
                    for (proc, role), u in sorted(usage.items()) if proc == name and (u.cpu_s or u.wait_s)}
            row.control_cores[shown] = ctl.get(name, Usage()).cpu_s / ctl_seconds
        if seconds >= MIN_CPU_SECONDS:
            row.machine = trace.machine_between(seg.start, seg.end)
            totals = trace.totals_between(seg.start, seg.end)
            row.machine["others"] = totals.get("others", math.nan) / seconds
            for shown, name in names.items():
                if name in totals:  # CPU of threads that exited between samples
                    exited = totals[name] - per_process.get(name, Usage()).cpu_s
                    if exited > 0.01 * seconds:
                        row.detail.setdefault(shown, {})["exited"] = {
                            "cpu": exited / seconds, "sys": 0.0, "wait": 0.0, "faults": 0.0}
        rows.append(row)
    return rows


def combine(rounds: Sequence[Sequence[SegmentRow]]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the segments of every round, summed (cores and waits weighted by time)."""
    order: list[str] = []
    groups: dict[str, list[SegmentRow]] = {}
    for rows in rounds:
        for row in rows:
            if row.label not in groups:
                order.append(row.label)
                groups[row.label] = []
            groups[row.label].append(row)
    total_excess = sum(max(0.0, r.excess_ms - r.expected_ms) for rows in rounds for r in rows) or 1.0
    headers = ["segment", "s", "requests", "> ctl p999", "excess ms", "control's", "share", "p999"]
    headers += [f"{p} cores" for p in SHOWN] + [f"{p} main wait ms/s" for p in ("router", "A", "B")]
    table = []
    for label in order:
        rows = groups[label]
        seconds = sum(r.seconds for r in rows)
        excess = sum(r.excess_ms for r in rows)
        expected = sum(r.expected_ms for r in rows)
        beyond = sum(max(0.0, r.excess_ms - r.expected_ms) for r in rows)
        cells: list[Any] = [label, f"{seconds:.2f}", sum(r.requests for r in rows), sum(r.over_p999 for r in rows),
                            f"{excess:,.0f}", f"{expected:,.0f}", f"{beyond / total_excess:.0%}",
                            fmt_ms(max((r.p999 for r in rows if r.p999 == r.p999), default=float("nan")))]
        timed = [r for r in rows if r.cores]
        timed_s = sum(r.seconds for r in timed)
        for p in SHOWN:
            if timed_s <= 0:
                cells.append("-")
                continue
            used = sum(r.cores.get(p, 0.0) * r.seconds for r in timed) / timed_s
            before = sum(r.control_cores.get(p, 0.0) * r.seconds for r in timed) / timed_s
            cells.append(f"{used:.2f} ({used - before:+.2f})")
        for p in ("router", "A", "B"):
            cells.append(f"{sum(r.wait.get(p, 0.0) * r.seconds for r in timed) / timed_s * 1000:.0f}"
                         if timed_s > 0 else "-")
        table.append(cells)
    return headers, table


def roles_text(rows: Sequence[SegmentRow], process: str) -> str:
    """``main 0.41/0.02/0.20, load 0.22/0.10/0.50``: per thread role of ``process``, time-weighted over
    ``rows``: cores on a CPU / of them in the kernel / seconds per second waiting for a CPU."""
    seconds = sum(r.seconds for r in rows if r.detail)
    if seconds <= 0:
        return "-"
    totals: dict[str, list[float]] = {}
    for r in rows:
        for role, d in r.detail.get(process, {}).items():
            t = totals.setdefault(role, [0.0, 0.0, 0.0])
            t[0] += d["cpu"] * r.seconds
            t[1] += d["sys"] * r.seconds
            t[2] += d["wait"] * r.seconds
    top = sorted(totals.items(), key=lambda kv: -(kv[1][0] + kv[1][2]))[:4]
    return ", ".join(f"{role} {c / seconds:.2f}/{k / seconds:.2f}/{w / seconds:.2f}" for role, (c, k, w) in top
                     if (c + w) / seconds >= 0.01) or "-"


def machine_text(rows: Sequence[SegmentRow]) -> str:
    """The machine's idle, kernel and steal cores over ``rows`` (time-weighted)."""
    timed = [r for r in rows if r.machine]
    seconds = sum(r.seconds for r in timed)
    if seconds <= 0:
        return "-"

    def avg(*names: str) -> float:
        return sum(sum(r.machine.get(n, 0.0) for n in names) * r.seconds for r in timed) / seconds

    return (f"idle {avg('idle'):.2f}, iowait {avg('iowait'):.2f}, kernel {avg('system', 'irq', 'softirq'):.2f}, "
            f"steal {avg('steal'):.2f}, other processes {avg('others'):.2f}")
