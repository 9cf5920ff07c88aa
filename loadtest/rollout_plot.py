"""The picture of ``bench_rollout``: every request's latency around a hot update, one panel per scenario.

x: each request's scheduled send time, seconds relative to the new version's
appearance; y: its latency from that scheduled time (ms, log scale), blue
when version 1 answered, orange for version 2, red crosses for errors.  The
window from the appearance until the old version was unloaded is shaded
grey; a dashed line marks the steady p999.  When the router's admin API
reported the rollout, each worker gets a strip along the top coloured by
its phase (a phase runs from its event until that worker's next event), and
pool-wide events are dashed vertical lines.  Drawn with matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.openloop import codes_text, fmt_ms

if TYPE_CHECKING:
    from loadtest.bench_rollout import Outcome

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
VERSION_COLORS = {1: "#1f77b4", 2: "#ff7f0e"}
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


def plot(outcomes: Sequence[Outcome], path: Path, title: str) -> Path | None:
    """Draws the scenarios that produced load into ``path`` (a PNG); None if none did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    shown = [o for o in outcomes if o.ok]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(14, 4.4 * len(shown)), squeeze=False)
    colors = dict(PHASE_COLORS)
    spare = iter(EXTRA_COLORS * 8)
    used: list[str] = []
    # One time axis for all panels, so the scenarios compare at a glance.
    lo = min(float(o.load.scheduled.min()) - o.appeared for o in shown if o.load is not None)
    hi = max(float(o.load.scheduled.max()) - o.appeared for o in shown if o.load is not None)
    for ax, out in zip(axes[:, 0], shown):
        load = out.load
        assert load is not None
        rel = load.scheduled - out.appeared
        lat_ms = load.latency * 1000
        for version, color in VERSION_COLORS.items():
            sel = np.array([v == version for v in load.values], dtype=bool)
            ax.scatter(rel[sel], lat_ms[sel], s=2, color=color, alpha=0.45, linewidths=0, rasterized=True)
        bad = np.array([c != "OK" for c in load.codes], dtype=bool) & ~np.isnan(lat_ms)
        if bad.any():
            ax.scatter(rel[bad], lat_ms[bad], s=18, color="red", marker="x", linewidths=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        steady, during = out.steady_stats(), out.during_stats()
        ax.axhline(steady.p999 * 1000, color="#333333", linestyle="--", linewidth=1)
        ax.text(lo, steady.p999 * 1000, f" steady p999 {fmt_ms(steady.p999)} ms", va="bottom",
                ha="left", fontsize=8, color="#333333")
        ax.axvspan(0, out.during_s, color="#999999", alpha=0.15, linewidth=0)
        ax.axvline(0, color="black", linewidth=1)
        ax.axvline(out.during_s, color="black", linewidth=1, linestyle=":")
        strips = 0
        if out.rollout:
            spans = worker_spans(out.rollout, out.appeared_wall + out.during_s)
            strips = len(spans)
            for k, (worker, items) in enumerate(spans.items()):
                top = 1 - k * STRIP
                for start, stop, phase in items:
                    if phase not in colors:
                        colors[phase] = next(spare)
                    if phase not in used:
                        used.append(phase)
                    ax.axvspan(start - out.appeared_wall, stop - out.appeared_wall, ymin=top - STRIP * 0.85,
                               ymax=top, color=colors[phase], alpha=0.85, linewidth=0)
                ax.text(1.003, top - STRIP * 0.42, worker, transform=ax.transAxes, fontsize=8, va="center")
            for at, phase in pool_events(out.rollout):
                x = at - out.appeared_wall
                ax.axvline(x, color="#6a4c93", linewidth=0.8, linestyle="--")
                ax.text(x, 0.02, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=8, color="#6a4c93",
                        rotation=90, va="bottom")
        _headroom(ax, STRIP * strips + 0.03 if strips else 0.0)
        errors = codes_text(load.latency_stats().error_codes())
        ax.set_title(f"{out.name}: steady p999 {fmt_ms(steady.p999)} ms -> during p999 {fmt_ms(during.p999)} ms "
                     f"({fmt_ratio(out.ratio())}), during max {fmt_ms(during.max)} ms over {out.during_s:.1f}s; "
                     f"errors {errors}; end from {out.signal}", fontsize=10, loc="left")
        ax.set_ylabel("latency from scheduled send (ms)")
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.set_xlim(lo, hi)
    axes[-1, 0].set_xlabel("scheduled send time (s), relative to version 2 appearing; "
                           "shaded grey: until version 1 was unloaded")
    handles: list[Any] = [
        Line2D([], [], marker="o", linestyle="", color=VERSION_COLORS[1], label="answered by v1"),
        Line2D([], [], marker="o", linestyle="", color=VERSION_COLORS[2], label="answered by v2"),
        Line2D([], [], marker="x", linestyle="", color="red", label="error"),
        Line2D([], [], color="#333333", linestyle="--", label="steady p999"),
    ]
    handles += [Patch(color=colors[p], label=f"phase: {p}") for p in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False,
               columnspacing=1.2, handletextpad=0.4)
    fig.suptitle(title, fontsize=12)
    height = fig.get_size_inches()[1]
    # Room at the bottom for the legend (one row, ~0.35 in) below the last x label.
    fig.tight_layout(rect=(0, 0.4 / height, 0.985, 1 - 0.35 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
