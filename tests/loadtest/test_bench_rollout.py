"""bench_rollout's pieces without a router: the rollout watch against a fake admin/REST server,
the configs, the paired figures, the segments of an update run and what they cost, the CPU trace
of real threads, the plots and the data file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.bench_rollout import Run, Session, figures, report, save_data, scenario_config, setting
from loadtest.openloop import OK, OpenLoopResult
from loadtest.proctrace import ProcTrace, Usage
from loadtest.rollout_phases import attribute, combine, segments
from loadtest.rollout_plot import plot, pool_events, worker_spans
from loadtest.rollout_timeline import draw
from loadtest.rollout_watch import ADMIN_SIGNAL, REST_SIGNAL, TOKEN_ENV, RolloutWatch


def rollout_entry(state: str, ended: float | None, events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": 7, "state": state, "phase": "done" if ended else "load", "strategy": "staged",
            "from": {"ctr": [1]}, "to": {"ctr": [2]}, "started": events[0]["time"] if events else 0.0,
            "ended": ended, "error": None, "events": events}


class FakeRouter:
    """Serves ``/v1/admin/status`` and ``/v1/models/ctr`` from the scripted ``admin`` / ``rest`` values."""

    def __init__(self) -> None:
        self.admin: dict[str, Any] | None = {"workers": [], "models": [], "rollout": None, "history": []}
        self.rest: dict[int, str] = {1: "AVAILABLE"}
        self.auth_seen: list[str | None] = []

    async def serve(self, body: Callable[[str, str], Awaitable[None]]) -> None:
        from aiohttp import web

        async def admin(request: web.Request) -> web.Response:
            self.auth_seen.append(request.headers.get("Authorization"))
            if self.admin is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(self.admin)

        async def rest(request: web.Request) -> web.Response:
            return web.json_response({"model_version_status": [
                {"version": str(v), "state": s, "status": {"error_code": "OK", "error_message": ""}}
                for v, s in sorted(self.rest.items())]})

        app = web.Application()
        app.router.add_get("/v1/admin/status", admin)
        app.router.add_get("/v1/models/ctr", rest)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            await body(f"http://127.0.0.1:{port}/v1/admin/status", f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


def watch_run(fake: FakeRouter, script: Callable[[FakeRouter], Awaitable[None]], *, admin: bool = True,
              grace_s: float = 0.3) -> tuple[float, str, RolloutWatch]:
    """Runs a watch while ``script`` moves the fake router's state; returns its outcome."""
    found: dict[str, Any] = {}

    async def body(admin_url: str, rest_url: str) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            watch = RolloutWatch(session, admin_url if admin else None, rest_url, model="ctr", old=1, new=2,
                                 label="test", appeared=time.time(), poll_s=0.02, grace_s=grace_s)
            mover = asyncio.create_task(script(fake))
            end, signal = await watch.wait_finished(timeout=10)
            await mover
            found.update(end=end, signal=signal, watch=watch)

    asyncio.run(fake.serve(body))
    return found["end"], found["signal"], found["watch"]


def test_the_admin_api_tells_the_end_even_when_the_rest_status_shows_it_first() -> None:
    t0 = time.time()
    events = [{"time": t0 + 0.01, "worker": "w0", "phase": "drain", "message": ""},
              {"time": t0 + 0.02, "worker": "w0", "phase": "load", "message": ""}]

    async def script(fake: FakeRouter) -> None:
        await asyncio.sleep(0.1)
        assert fake.admin is not None
        fake.admin["rollout"] = rollout_entry("running", None, events)
        await asyncio.sleep(0.1)
        fake.rest = {1: "END", 2: "AVAILABLE"}  # REST done first: the admin API still wins
        await asyncio.sleep(0.5)  # longer than the grace: a running rollout is waited for
        fake.admin["rollout"] = None
        fake.admin["history"] = [
            {**rollout_entry("done", None, []), "to": {"ctr": [1]}},  # the initial load: not ours
            rollout_entry("done", t0 + 0.65, [*events, {"time": t0 + 0.65, "worker": None, "phase": "done",
                                                         "message": ""}]),
        ]

    end, signal, watch = watch_run(FakeRouter(), script)
    assert signal == ADMIN_SIGNAL
    assert end == pytest.approx(t0 + 0.65)
    assert watch.entry is not None and watch.entry["state"] == "done" and len(watch.entry["events"]) == 3


def test_the_token_header_is_sent() -> None:
    fake = FakeRouter()

    async def script(fake: FakeRouter) -> None:
        assert fake.admin is not None
        fake.admin["history"] = [rollout_entry("rolled_back", time.time(), [])]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, "s3cret")
        _, signal, watch = watch_run(fake, script)
    assert signal == ADMIN_SIGNAL and watch.entry is not None and watch.entry["state"] == "rolled_back"
    assert fake.auth_seen and set(fake.auth_seen) == {"Bearer s3cret"}


@pytest.mark.parametrize("admin", [False, True], ids=["no admin API", "admin API silent about it"])
def test_without_an_admin_rollout_the_rest_status_tells_the_end(admin: bool) -> None:
    fake = FakeRouter()
    marks: dict[str, float] = {}

    async def script(fake: FakeRouter) -> None:
        await asyncio.sleep(0.1)
        fake.rest = {1: "AVAILABLE", 2: "AVAILABLE"}
        await asyncio.sleep(0.1)
        marks["before"] = time.time()
        fake.rest = {1: "END", 2: "AVAILABLE"}

    end, signal, _ = watch_run(fake, script, admin=admin, grace_s=0.2)
    assert signal == REST_SIGNAL
    assert end >= marks["before"]
    if not admin:
        assert fake.auth_seen == []


def test_configs_carry_the_scenario_and_the_extra_keys(tmp_path: Path) -> None:
    staged = scenario_config("staged", tmp_path)
    assert staged["rollout"] == {"strategy": "staged"} and staged["admin"] == {"port": 0}
    assert staged["workers"] == {"count": 2} and staged["poll_interval_s"] == 0.5
    assert staged["models"] == [{"name": "ctr", "base_path": str(tmp_path)}]
    assert scenario_config("staged+jemalloc", tmp_path)["workers"] == {"count": 2, "allocator": "jemalloc"}
    extra = scenario_config("staged", tmp_path, [setting("rollout.mode=overlap"), setting("workers.nice=0")])
    assert extra["rollout"] == {"strategy": "staged", "mode": "overlap"} and extra["workers"]["nice"] == 0
    with pytest.raises(Exception, match="KEY=VALUE"):
        setting("no-equals-sign")


def test_a_worker_phase_runs_until_its_next_event_and_the_last_until_the_end() -> None:
    rollout = rollout_entry("done", 20.0, [
        {"time": 10.0, "worker": "w0", "phase": "drain"},
        {"time": 11.0, "worker": "w1", "phase": "drain"},
        {"time": 12.0, "worker": "w0", "phase": "load"},
        {"time": 14.0, "worker": None, "phase": "switch"},
        {"time": 15.0, "worker": "w0", "phase": "join"},
        {"time": 19.0, "worker": None, "phase": "done"},
    ])
    assert worker_spans(rollout, end=99.0) == {
        "w0": [(10.0, 12.0, "drain"), (12.0, 15.0, "load"), (15.0, 20.0, "join")],
        "w1": [(11.0, 20.0, "drain")],
    }
    assert worker_spans({**rollout, "ended": None}, end=30.0)["w1"] == [(11.0, 30.0, "drain")]
    assert pool_events(rollout) == [(14.0, "switch"), (19.0, "done")]


WALL = 1_000_000.0  # wall_offset of the fake load: wall time = load clock + WALL
RATE = 200.0


def fake_load(seconds: float, stall_at: float, stall_s: float, versions: list[tuple[float, int]]) -> OpenLoopResult[int]:
    """``seconds`` of requests at RATE, 3 ms each, but those scheduled in a stall wait for its end;
    ``versions``: (from time, version) in order."""
    n = int(seconds * RATE)
    scheduled = np.arange(n) / RATE
    latency = np.full(n, 0.003)
    stall = (scheduled >= stall_at) & (scheduled < stall_at + stall_s)
    latency[stall] = stall_at + stall_s - scheduled[stall] + 0.003
    values: list[int | None] = [max(v for t, v in versions if t <= s) for s in scheduled]
    codes = [OK] * n
    codes[n - 5], values[n - 5] = "UNAVAILABLE", None
    return OpenLoopResult(rate=RATE, start=0.0, scheduled=scheduled, sent=scheduled + 0.0005,
                          done=scheduled + latency, codes=codes, values=values, max_inflight=40, wall_offset=WALL)


class FakeTrace(ProcTrace):
    """A trace with scripted samples: every process uses ``cores`` all the time, w0 ``burst`` more in [a, b)."""

    def __init__(self, seconds: float, burst: tuple[float, float, float]) -> None:
        super().__init__(lambda: {})
        a, b, extra = burst
        used = {"router": 0.0, "client": 0.0, "w0": 0.0, "w1": 0.0}
        for i in range(int(seconds / 0.05) + 1):
            t = i * 0.05
            threads = {label: {1: ("main", Usage(cpu_s=cpu, wait_s=cpu / 10))} for label, cpu in used.items()}
            self.samples.append((t, threads))
            self.machine.append((t, 0, 0, 2 * t, 0, 0, 0, 0))
            self.totals.append({label: (1, cpu) for label, cpu in used.items()} | {"others": (0, 0.0)})
            for label in used:
                used[label] += 0.05 * (0.5 + (extra if label == "w0" and a <= t < b else 0.0))


def fake_session() -> Session:
    # 40 s: control run [0, 20), update run [20, 40): v2 appears at 25, w0 drains at 26 and loads
    # from 26.5 (a 0.2 s stall at 27.0 while w0 burns 0.4 cores more), switch at 28.
    load = fake_load(40.0, 27.0, 0.2, [(0.0, 1), (28.0, 2)])
    w = WALL
    events = [
        {"time": w + 25.8, "worker": None, "phase": "load"},
        {"time": w + 26.0, "worker": "w0", "phase": "drain"},
        {"time": w + 26.5, "worker": "w0", "phase": "load"},
        {"time": w + 27.5, "worker": "w0", "phase": "warm"},
        {"time": w + 27.9, "worker": "w0", "phase": "warm"},
        {"time": w + 28.0, "worker": "w0", "phase": "join"},
        {"time": w + 28.0, "worker": None, "phase": "switch"},
        {"time": w + 28.0, "worker": "w1", "phase": "drain"},
        {"time": w + 28.5, "worker": "w1", "phase": "load"},
        {"time": w + 29.5, "worker": "w1", "phase": "join"},
        {"time": w + 29.5, "worker": None, "phase": "done"},
    ]
    s = Session("staged", scenario_config("staged", Path("/tmp/x")), RATE, "--rate", 20.0, load=load,
                trace=FakeTrace(40.0, (26.5, 27.5, 0.4)))
    s.runs = [Run(1, "control", 0.0, 20.0, old=1, new=1),
              Run(1, "update", 20.0, 40.0, old=1, new=2, appeared=25.0, finished=29.5, signal=ADMIN_SIGNAL,
                  rollout=rollout_entry("done", w + 29.5, events))]
    return s


def test_an_update_run_is_cut_at_its_events_with_workers_lettered_in_turn() -> None:
    s = fake_session()
    update = s.runs[1]
    segs = segments(update.rollout or {}, update.start, update.end, update.appeared, WALL)
    assert [(g.label, round(g.start, 2), round(g.end, 2)) for g in segs] == [
        ("before", 20.0, 25.0), ("detect", 25.0, 25.8), ("start", 25.8, 26.0), ("A drain", 26.0, 26.5),
        ("A load", 26.5, 27.5), ("A warm", 27.5, 28.0), ("A join", 28.0, 28.0), ("switch", 28.0, 28.0),
        ("B drain", 28.0, 28.5), ("B load", 28.5, 29.5), ("B join", 29.5, 29.5), ("after", 29.5, 40.0)]
    assert segs[0].workers == (("A", "w0"), ("B", "w1"))
    assert [g.label for g in segments({}, 20.0, 40.0, 25.0, WALL)] == ["before", "after"]


def test_the_excess_lands_in_the_segment_of_the_stall_beside_the_cpu_of_the_worker_that_caused_it() -> None:
    s = fake_session()
    control, update = s.runs
    segs = segments(update.rollout or {}, update.start, update.end, update.appeared, WALL)
    assert s.trace is not None and s.load is not None
    rows = {r.label: r for r in attribute(s.load, segs, s.stats(control), s.trace, control.start, control.end)}
    assert rows["A load"].over_p999 == 40  # every request of the 0.2 s stall
    assert rows["A load"].excess_ms > 1000 and rows["before"].excess_ms == 0 and rows["after"].excess_ms == 0
    assert rows["A load"].cores["A"] == pytest.approx(0.9, abs=0.06)  # 0.5 + the 0.4 burst
    assert rows["A load"].control_cores["A"] == pytest.approx(0.5, abs=0.03)
    assert rows["B load"].cores["A"] == pytest.approx(0.5, abs=0.06) and rows["B load"].cores["B"] == pytest.approx(
        0.5, abs=0.06)
    assert rows["A load"].wait["A"] == pytest.approx(0.09, abs=0.01)
    assert rows["A join"].cores == {}  # too short to say anything about CPU
    headers, table = combine([list(rows.values())])
    by_label = {row[0]: dict(zip(headers, row)) for row in table}
    assert by_label["A load"]["share"] == "100%" and by_label["A load"]["A cores"] == "0.90 (+0.40)"


def test_figures_are_medians_over_the_rounds_and_the_report_ends_with_them(capsys: pytest.CaptureFixture[str]) -> None:
    s = fake_session()
    fig = figures(s)
    assert fig is not None and fig.rounds == 1
    assert fig.control_p999 == pytest.approx(0.003) and fig.p999_ratio > 10  # the stall against a flat 3 ms
    headline = report(s, 0.1, None, None)
    printed = capsys.readouterr().out
    assert headline.startswith("rollout staged, paired (1 rounds of 20s runs, 200 req/s = --rate): p999 "
                               "updating/control ")
    assert headline.endswith("1 errors [target p999 <= 1.25x, p99 <= 1.1x]") and "\n" not in headline
    assert "A load" in printed and "UNAVAILABLE 1" in printed
    s.runs[1].error = "RuntimeError: rollout rolled_back"
    assert figures(s) is None and "no complete round" in report(s, 0.1, None, None)


def test_the_plots_and_the_data_file(tmp_path: Path) -> None:
    import json

    s = fake_session()
    path = plot(s, tmp_path / "r.png", "t")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot(Session("staged", {}, RATE, "", 20.0), tmp_path / "none.png", "t") is None
    data = save_data(s, tmp_path / "r.npz")
    assert data is not None
    with np.load(data) as arrays:
        assert arrays["scheduled"].size == len(s.load)  # type: ignore[arg-type]
        assert arrays["code"][len(s.load) - 5] == "UNAVAILABLE"  # type: ignore[arg-type]
        assert "trace/w0/main/cpu" in arrays.files and "trace/machine/idle" in arrays.files
        meta = json.loads(str(arrays["meta"]))
    assert [r["kind"] for r in meta["runs"]] == ["control", "update"]
    assert {row["label"] for row in meta["segments"]["1"]} >= {"A load", "B load"}
    timeline = draw(data, tmp_path / "t.png", before=1.0, after=1.0)
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_trace_sees_a_busy_thread_of_a_real_process() -> None:
    import os
    import threading

    stop, traced = threading.Event(), threading.Event()

    def burn() -> None:
        with open("/proc/thread-self/comm", "w", encoding="ascii") as f:
            f.write("burner7")  # the kernel's name for the thread, as the workers name theirs
        while not traced.is_set():
            sum(range(1000))
        stop.wait()

    trace = ProcTrace(lambda: {"me": os.getpid()}, interval=0.02)
    trace.start()
    thread = threading.Thread(target=burn)
    thread.start()
    time.sleep(0.3)
    traced.set()
    trace.stop()  # while the thread still lives: the trace follows live threads
    stop.set()
    thread.join()
    used = trace.between(trace.samples[0][0], trace.samples[-1][0])
    assert used[("me", "burner")].cpu_s > 0.1  # digits dropped from the thread's name
    assert trace.totals_between(trace.samples[0][0], trace.samples[-1][0])["me"] > 0.1
    assert set(trace.machine_between(trace.samples[0][0], trace.samples[-1][0])) >= {"idle", "user", "steal"}
