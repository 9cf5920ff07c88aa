"""The picture of ``bench_rollout``: every request's latency in every run, control beside update.

One row per round: the control run on the left, the update run on the
right.  x: each request's scheduled send time, seconds into the run; y: its
latency from that scheduled time (ms, log scale, one scale for all panels),
coloured by the version that answered, red crosses for errors; the run's
p99 (dotted) and p999 (dashed).  In update runs the version's appearance is
a black line, the time until the old version was unloaded is shaded grey,
each worker gets a strip along the top coloured by its phase (a phase runs
from its event until that worker's next event), and pool-wide events are
dashed vertical lines.  Drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.openloop import codes_text, fmt_ms

if TYPE_CHECKING:
    from loadtest.bench_rollout import Session

PHASE_COLORS = {
    "drain": "#f4a261",
    "load": "#e63946",
    "warm": "#e9c46a",
    "join": "#2a9d8f",
    "switch": "#6a4c93",
    "unload": "#8d6e63",
    "retire": "#9e9e9e",
    "rollback": "#000000",
}
EXTRA_COLORS = ("#1d3557", "#ff70a6", "#70d6ff", "#bc6c25", "#606c38", "#3a86ff")
VERSION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
STRIP = 0.055  # height of one worker's phase strip, in axes fraction


def fmt_ratio(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def worker_spans(rollout: Mapping[str, Any], end: float) -> dict[str, list[tuple[float, float, str]]]:
    """worker -> [(start, stop, phase)], wall times: a phase runs until that worker's next event.

    A worker's last phase runs until the rollout ended (``end`` while it has
    not).  Events without a worker are pool-wide and have no span.
    """
    by_worker: dict[str, list[tuple[float, str]]] = {}
    for event in rollout.get("events") or []:
        worker = event.get("worker")
        try:
            at = float(event["time"])
        except (KeyError, TypeError, ValueError):
            continue
        if worker:
            by_worker.setdefault(str(worker), []).append((at, str(event.get("phase"))))
    ended = rollout.get("ended")
    stop = float(ended) if ended else end
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for worker, events in sorted(by_worker.items()):
        events.sort(key=lambda e: e[0])
        spans[worker] = [(at, events[i + 1][0] if i + 1 < len(events) else max(stop, at), phase)
                         for i, (at, phase) in enumerate(events)]
    return spans


def pool_events(rollout: Mapping[str, Any]) -> list[tuple[float, str]]:
    """``(time, phase)`` of the events with no worker (switch, done, ...)."""
    found = []
    for event in rollout.get("events") or []:
        if event.get("worker"):
            continue
        try:
            found.append((float(event["time"]), str(event.get("phase"))))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def _headroom(ax: Any, fraction: float) -> None:
    """Raise a log y axis's top so the data stay below the top ``fraction`` of the panel."""
    lo, hi = ax.get_ylim()
    if fraction <= 0 or lo <= 0 or hi <= lo:
        return
    span = math.log10(hi) - math.log10(lo)
    ax.set_ylim(lo, 10 ** (math.log10(lo) + span / (1 - fraction)))


def plot(s: Session, path: Path, title: str) -> Path | None:
    """Draws every run of the session into ``path`` (a PNG): one row per round, control then update.

    None when the session produced no load.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    load = s.load
    runs = [r for r in s.runs if r.end == r.end]
    if load is None or not runs:
        return None
    rounds = sorted({r.round for r in runs})
    fig, axes = plt.subplots(len(rounds), 2, figsize=(18, 3.8 * len(rounds)), squeeze=False, sharey=True)
    colors = dict(PHASE_COLORS)
    spare = iter(EXTRA_COLORS * 8)
    used: list[str] = []
    versions = sorted({v for v in load.values if v})
    version_colors = {v: VERSION_COLORS[i % len(VERSION_COLORS)] for i, v in enumerate(versions)}
    lat_ms = load.latency * 1000
    for run in runs:
        ax = axes[rounds.index(run.round), 0 if run.kind == "control" else 1]
        mask = load.window(run.start, run.end)
        rel = load.scheduled[mask] - run.start
        lat = lat_ms[mask]
        values = [load.values[i] for i in np.flatnonzero(mask)]
        for version, color in version_colors.items():
            sel = np.array([v == version for v in values], dtype=bool)
            if sel.any():
                ax.scatter(rel[sel], lat[sel], s=2, color=color, alpha=0.45, linewidths=0, rasterized=True)
        codes = [load.codes[i] for i in np.flatnonzero(mask)]
        bad = np.array([c != "OK" for c in codes], dtype=bool) & ~np.isnan(lat)
        if bad.any():
            ax.scatter(rel[bad], lat[bad], s=18, color="red", marker="x", linewidths=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        stats = s.stats(run)
        for value, style in ((stats.p99, ":"), (stats.p999, "--")):
            ax.axhline(value * 1000, color="#333333", linestyle=style, linewidth=1)
        strips = 0
        if run.kind == "update" and run.appeared == run.appeared:
            ax.axvline(run.appeared - run.start, color="black", linewidth=1)
            if run.finished == run.finished:
                ax.axvspan(run.appeared - run.start, run.finished - run.start, color="#999999", alpha=0.15,
                           linewidth=0)
            if run.rollout:
                offset = load.wall_offset + run.start  # wall time of the run's start
                spans = worker_spans(run.rollout, offset + s.seconds)
                strips = len(spans)
                for k, (worker, items) in enumerate(spans.items()):
                    top = 1 - k * STRIP
                    for start, stop, phase in items:
                        if phase not in colors:
                            colors[phase] = next(spare)
                        if phase not in used:
                            used.append(phase)
                        ax.axvspan(start - offset, stop - offset, ymin=top - STRIP * 0.85, ymax=top,
                                   color=colors[phase], alpha=0.85, linewidth=0)
                    ax.text(1.003, top - STRIP * 0.42, worker, transform=ax.transAxes, fontsize=8, va="center")
                for at, phase in pool_events(run.rollout):
                    x = at - offset
                    ax.axvline(x, color="#6a4c93", linewidth=0.8, linestyle="--")
                    ax.text(x, 0.02, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=8,
                            color="#6a4c93", rotation=90, va="bottom")
        _headroom(ax, STRIP * strips + 0.03 if strips else 0.0)
        took = f", rollout {run.finished - run.appeared:.1f}s" if run.finished == run.finished else ""
        ax.set_title(f"{run.label}: p99 {fmt_ms(stats.p99)} ms, p999 {fmt_ms(stats.p999)} ms, max "
                     f"{fmt_ms(stats.max)} ms{took}; errors {codes_text(stats.error_codes())}"
                     + (f"; FAILED {run.error[:60]}" if run.error else ""), fontsize=9, loc="left")
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_xlim(0, s.seconds)
    for row in axes:
        row[0].set_ylabel("latency from scheduled send (ms)")
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run (update runs: the black line is the version's appearance, "
                      "grey until the old version is unloaded)")
    handles: list[Any] = [Line2D([], [], marker="o", linestyle="", color=c, label=f"answered by v{v}")
                          for v, c in version_colors.items()]
    handles += [Line2D([], [], marker="x", linestyle="", color="red", label="error"),
                Line2D([], [], color="#333333", linestyle=":", label="run p99"),
                Line2D([], [], color="#333333", linestyle="--", label="run p999")]
    handles += [Patch(color=colors[p], label=f"phase: {p}") for p in used]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 12), fontsize=9, frameon=False,
               columnspacing=1.2, handletextpad=0.4)
    fig.suptitle(title, fontsize=12)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.5 / height, 0.985, 1 - 0.35 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
