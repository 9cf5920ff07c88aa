"""bench_rollout's pieces without a router: the rollout watch against a fake admin/REST server,
the scenario configs, the phase spans and the plot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.bench_rollout import Outcome, dropped, report, save_data, scenario_config
from loadtest.openloop import OK, OpenLoopResult
from loadtest.rollout_plot import plot, pool_events, worker_spans
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


def test_scenario_configs_carry_the_keys_as_written_and_drop_what_is_asked(tmp_path: Path) -> None:
    staged = scenario_config("staged", tmp_path, [])
    assert staged["rollout"] == {"strategy": "staged"} and staged["admin"] == {"port": 0}
    assert staged["workers"] == {"count": 2} and staged["poll_interval_s"] == 0.5
    assert staged["models"] == [{"name": "ctr", "base_path": str(tmp_path)}]
    jemalloc = scenario_config("staged+jemalloc", tmp_path, [])
    assert jemalloc["workers"] == {"count": 2, "allocator": "jemalloc"}
    assert scenario_config("in_place", tmp_path, [])["rollout"] == {"strategy": "in_place"}
    slim = dropped(jemalloc, ["rollout", "admin", "workers.allocator", "no.such.key"])
    assert "rollout" not in slim and "admin" not in slim and slim["workers"] == {"count": 2}
    assert dropped({"a": {"b": 1}}, ["a.b"]) == {}  # an emptied section goes too


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


def fake_outcome(name: str, rollout: dict[str, Any] | None) -> Outcome:
    rate, n = 200.0, 1200
    start = 100.0
    scheduled = start + np.arange(n) / rate
    latency = np.full(n, 0.003)
    stall = (scheduled >= 104.0) & (scheduled < 104.2)
    latency[stall] = 104.2 - scheduled[stall] + 0.003
    values: list[int | None] = [1 if t < 104.2 else 2 for t in scheduled]
    codes = [OK] * n
    codes[900], values[900] = "UNAVAILABLE", None
    load = OpenLoopResult(rate=rate, start=start, scheduled=scheduled, sent=scheduled + 0.0005,
                          done=scheduled + latency, codes=codes, values=values, max_inflight=40,
                          wall_offset=1_000_000.0)
    return Outcome(name=name, config={}, load=load, appeared=104.0, appeared_wall=1_000_104.0, during_s=1.0,
                   signal=ADMIN_SIGNAL if rollout else REST_SIGNAL, rollout=rollout, steady_s=3.0)


def test_outcome_windows_and_the_plot(tmp_path: Path) -> None:
    w = 1_000_104.0
    rollout = rollout_entry("done", w + 1.0, [
        {"time": w + 0.1, "worker": "w0", "phase": "drain"},
        {"time": w + 0.2, "worker": "w0", "phase": "load"},
        {"time": w + 0.5, "worker": "w0", "phase": "warm"},
        {"time": w + 0.6, "worker": None, "phase": "switch"},
        {"time": w + 0.7, "worker": "w1", "phase": "unload"},
        {"time": w + 0.8, "worker": "w1", "phase": "a-phase-from-the-future"},
    ])
    staged, in_place = fake_outcome("staged", rollout), fake_outcome("in_place", None)
    assert staged.steady_stats().requests == 600 and staged.during_stats().requests == 200
    assert staged.ratio() > 10  # the 0.2 s stall against a flat 3 ms
    assert staged.errors() == 1 and not staged.client_void()
    path = plot([staged, in_place, Outcome(name="failed", config={}, error="boom")], tmp_path / "r.png", "t")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot([Outcome(name="failed", config={}, error="boom")], tmp_path / "none.png", "t") is None


def test_the_data_file_holds_every_request(tmp_path: Path) -> None:
    import json

    out = fake_outcome("staged", None)
    path = save_data([out, Outcome(name="failed", config={}, error="boom")], tmp_path / "r.npz")
    assert path is not None
    with np.load(path) as data:
        assert data["staged/scheduled"].size == len(out.load)  # type: ignore[arg-type]
        assert data["staged/scheduled"][0] == pytest.approx(-4.0)
        assert data["staged/code"][900] == "UNAVAILABLE" and data["staged/version"][900] == 0
        meta = json.loads(str(data["meta"]))
    assert meta["staged"]["during_s"] == 1.0 and "failed" not in meta


def test_the_report_ends_with_one_line_of_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    staged = fake_outcome("staged", rollout_entry("done", 1_000_105.0, []))
    staged.config = {"rollout": {"strategy": "staged"}}
    in_place = fake_outcome("in_place", None)
    failed = Outcome(name="staged+jemalloc", config={}, error="RuntimeError: router exited with 1")
    headline = report([staged, in_place, failed], 200.0, "--rate", 4.0, [], None, 0.1)
    printed = capsys.readouterr().out
    assert headline.startswith("rollout p999 during/steady: staged 67.3x (1 errors), in_place 67.3x (1 errors), "
                               "staged+jemalloc failed [target staged <= 1.25x]")
    assert "\n" not in headline
    assert "UNAVAILABLE 1" in printed and "FAILED staged+jemalloc" in printed
