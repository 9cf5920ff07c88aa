"""A close look at the update runs of one ``bench_rollout`` session: latency beside CPU, 50 ms at a time.

    python -m loadtest.rollout_timeline loadtest/results/rollout-<stamp>.npz [--out PNG] [--before 1] [--after 2]

For each update run, from ``--before`` seconds before the version appeared
until ``--after`` seconds after the rollout finished, three panels that
share the time axis (seconds after the version appeared):

1. every request's latency (from its scheduled send), with the run's
   control p99 and p999 for reference and the rollout's events;
2. CPU per 50 ms sample (cores): the router, the serving and the
   converting worker (each worker's roles: its main thread, its load
   thread, the rest), the client, and what the machine spent in the kernel;
3. how long the main threads of the router and of each worker waited for
   a CPU (seconds per second).

It reads the ``trace/...`` arrays ``bench_rollout`` saves beside every
request.  Drawn with matplotlib's Agg backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.rollout_plot import pool_events


def _series(data: Any, key: str, n: int) -> Any:
    name = f"trace/{key}"
    return data[name] if name in data.files else np.zeros(n)


def draw(path: Path, out: Path, before: float, after: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        scheduled, done, codes = data["scheduled"], data["done"], data["code"]
        t = data["trace/time"]
        n = t.size
        dt = np.diff(np.concatenate([[t[0] - 0.05], t]))
        dt[dt <= 0] = 0.05
        roles = sorted({k.split("/")[2] for k in data.files if k.startswith("trace/w") and k.endswith("/cpu")})
        workers = sorted({k.split("/")[1] for k in data.files if k.startswith("trace/w") and k.endswith("/cpu")})

        def cores(label: str, role: str | None = None) -> Any:
            if role is not None:
                return _series(data, f"{label}/{role}/cpu", n) / dt
            total = _series(data, f"total/{label}", n)
            return np.nan_to_num(total) / dt

        def wait(label: str) -> Any:
            return _series(data, f"{label}/main/wait", n) / dt

        kernel = (_series(data, "machine/system", n) + _series(data, "machine/softirq", n)) / dt
        idle = _series(data, "machine/idle", n) / dt
        runs = [r for r in meta["runs"] if r["kind"] == "update" and r["appeared"] == r["appeared"]]
        controls = {r["round"]: r for r in meta["runs"] if r["kind"] == "control"}
        fig, axes = plt.subplots(3, len(runs), figsize=(7 * len(runs), 11), squeeze=False, sharex="col",
                                 gridspec_kw={"height_ratios": [2, 1.4, 1]})
        latency = (done - scheduled) * 1000
        for col, run in enumerate(runs):
            zero = run["appeared"]
            end = (run["finished"] if run["finished"] == run["finished"] else zero + 10) + after
            lo, hi = zero - before, end
            ax = axes[0, col]
            sel = (scheduled >= lo) & (scheduled < hi)
            ax.scatter(scheduled[sel] - zero, latency[sel], s=2, alpha=0.5, linewidths=0, rasterized=True)
            bad = sel & (codes != "OK")
            if bad.any():
                ax.scatter(scheduled[bad] - zero, latency[bad], s=16, color="red", marker="x")
            control = controls.get(run["round"])
            if control is not None:
                cmask = (scheduled >= control["start"]) & (scheduled < control["end"])
                clat = latency[cmask]
                clat = clat[~np.isnan(clat)]
                if clat.size:
                    for q, style in ((99, ":"), (99.9, "--")):
                        ax.axhline(np.percentile(clat, q), color="#333333", linestyle=style, linewidth=1)
            ax.set_yscale("log")
            ax.set_ylabel("latency (ms)")
            ax.set_title(f"round {run['round']} v{run['old']}->v{run['new']} (dotted/dashed: control p99/p999)",
                         fontsize=10, loc="left")
            wall_zero = zero + meta["wall_offset"]
            for event in (run.get("rollout") or {}).get("events") or []:
                x = float(event["time"]) - wall_zero
                label = f"{event.get('worker') or 'pool'} {event.get('phase')}"
                for row in range(3):
                    axes[row, col].axvline(x, color="#6a4c93", linewidth=0.6, linestyle="--")
                ax.text(x, 0.98, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7, rotation=90,
                        va="top", color="#6a4c93")
            for _, phase in pool_events(run.get("rollout") or {}):
                pass
            tsel = (t >= lo) & (t < hi)
            x = t[tsel] - zero
            ax = axes[1, col]
            stack = [("router", cores("router")[tsel]), ("client", cores("client")[tsel])]
            for w in workers:
                main = cores(w, "main")[tsel]
                load = cores(w, "load")[tsel] if "load" in roles else np.zeros(x.size)
                rest = np.clip(cores(w)[tsel] - main - load, 0, None)
                stack += [(f"{w} main", main), (f"{w} load", load), (f"{w} other threads", rest)]
            ax.stackplot(x, *[v for _, v in stack], labels=[k for k, _ in stack], step="post", alpha=0.85)
            ax.plot(x, kernel[tsel], color="black", linewidth=1, label="machine: kernel", drawstyle="steps-post")
            ax.plot(x, 2 - idle[tsel], color="grey", linewidth=1, linestyle=":", label="machine: busy",
                    drawstyle="steps-post")
            ax.set_ylabel("cores")
            ax.set_ylim(0, 2.2)
            if col == 0:
                ax.legend(fontsize=7, ncol=3, loc="upper left")
            ax = axes[2, col]
            for label in ("router", *workers):
                ax.plot(x, wait(label)[tsel], label=f"{label} main", drawstyle="steps-post", linewidth=1)
            ax.set_ylabel("waiting for a CPU (s/s)")
            ax.set_xlabel("seconds after the new version appeared")
            if col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{path.name}: latency and CPU around each update", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.rollout_timeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a .npz bench_rollout saved")
    p.add_argument("--out", type=Path, help="the PNG (default: beside the data, -timeline.png)")
    p.add_argument("--before", type=float, default=1.0, help="seconds shown before the version appeared")
    p.add_argument("--after", type=float, default=2.0, help="seconds shown after the rollout finished")
    args = p.parse_args(argv)
    out = args.out or args.data.with_name(args.data.stem + "-timeline.png")
    print(draw(args.data, out, args.before, args.after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
