"""Watching a router's hot update from outside: when did it finish, and through which phases.

Two sources, polled side by side:

* the admin API (``GET /v1/admin/status`` on 127.0.0.1, bearer token from
  ``TFS_ROUTER_ADMIN_TOKEN`` when set): the rollout whose ``to`` holds the
  new version, its phase and its events; it has finished once a history
  entry for it is ``done``, ``rolled_back`` or ``failed``;
* the REST model status (``GET /v1/models/NAME``): the update is over once
  the old version is ``END`` (or gone) and the new one ``AVAILABLE``.

The admin API wins when it reports the rollout.  The REST status decides
when the router has no admin API, or when its admin API reported no rollout
for the update within ``ADMIN_GRACE_S`` of the REST status showing it done
(an in-place update may not be a rollout the admin API knows).  Progress
(phase changes, events, REST state changes) goes to stderr with times
relative to the moment the version appeared.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

from loadtest.common import error_text, progress

FINISHED_STATES = ("done", "rolled_back", "failed")
TOKEN_ENV = "TFS_ROUTER_ADMIN_TOKEN"
POLL_S = 0.1
ADMIN_GRACE_S = 2.0
ADMIN_SIGNAL = "admin API"
REST_SIGNAL = "REST model status"


def admin_headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def target_versions(spec: Any, model: str) -> list[int]:
    """The versions of ``model`` in a rollout's ``from`` / ``to`` (``{"ctr": [2]}``); [] if malformed."""
    try:
        return [int(v) for v in (spec or {}).get(model, [])]
    except (TypeError, ValueError, AttributeError):
        return []


def rollout_to(entry: Any, model: str, version: int) -> bool:
    """Whether an admin ROLLOUT entry brings ``model`` to ``version``."""
    return isinstance(entry, dict) and version in target_versions(entry.get("to"), model)


class RolloutWatch:
    """Polls the admin status and the REST model status until ``model`` has moved from ``old`` to ``new``.

    ``appeared`` is the wall time (``time.time()``) the new version appeared;
    progress lines are stamped relative to it.  After ``wait_finished``,
    ``entry`` holds the admin API's view of the rollout (None without one).
    """

    def __init__(self, session: Any, admin_url: str | None, rest_url: str, *, model: str, old: int, new: int,
                 label: str, appeared: float, poll_s: float = POLL_S, grace_s: float = ADMIN_GRACE_S) -> None:
        self.session = session
        self.admin_url = admin_url
        self.rest_url = f"{rest_url}/v1/models/{model}"
        self.model, self.old, self.new = model, old, new
        self.label = label
        self.appeared = appeared
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.admin_ok = False  # the admin API answered at least once
        self.admin_failures = 0
        self.entry: dict[str, Any] | None = None  # the rollout to ``new``, latest view
        self.finished = False
        self.rest_states: dict[int, str] = {}
        self.rest_done_at: float | None = None
        self._shown_events = 0
        self._shown_rest = ""
        self._shown_phase = ""

    def _say(self, wall: float, message: str) -> None:
        progress(f"[{self.label}] {wall - self.appeared:+7.2f}s {message}")

    async def _get_json(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        import aiohttp
        import orjson

        async with self.session.get(url, headers=dict(headers or {}),
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
            return orjson.loads(body)

    async def poll_admin(self) -> None:
        if self.admin_url is None:
            return
        try:
            status = await self._get_json(self.admin_url, admin_headers())
        except Exception as exc:  # noqa: BLE001 - an absent or failing admin API is tolerated
            self.admin_failures += 1
            if self.admin_failures <= 3:
                progress(f"[{self.label}] admin status failed: {error_text(exc)}")
            return
        self.admin_ok = True
        running = status.get("rollout")
        for entry in reversed(status.get("history") or []):
            if rollout_to(entry, self.model, self.new) and entry.get("state") in FINISHED_STATES:
                self.entry, self.finished = entry, True
                break
        else:
            if rollout_to(running, self.model, self.new):
                self.entry = running
                self.finished = running.get("state") in FINISHED_STATES
        self._show_entry()

    def _show_entry(self) -> None:
        if self.entry is None:
            return
        phase = f"{self.entry.get('state')} / {self.entry.get('phase')}"
        if phase != self._shown_phase:
            self._shown_phase = phase
            self._say(time.time(), f"rollout {self.entry.get('id')} ({self.entry.get('strategy')}): {phase}")
        events = self.entry.get("events") or []
        for event in events[self._shown_events:]:
            try:
                at = float(event.get("time"))
            except (TypeError, ValueError):
                at = time.time()
            self._say(at, f"{event.get('worker') or 'pool'} {event.get('phase')}: {event.get('message', '')}")
        self._shown_events = max(self._shown_events, len(events))

    async def poll_rest(self) -> None:
        try:
            status = await self._get_json(self.rest_url)
        except Exception as exc:  # noqa: BLE001 - a failed poll is retried
            progress(f"[{self.label}] REST model status failed: {error_text(exc)}")
            return
        states: dict[int, str] = {}
        for entry in status.get("model_version_status") or []:
            try:
                states[int(entry["version"])] = str(entry.get("state"))
            except (KeyError, TypeError, ValueError):
                continue
        self.rest_states = states
        shown = ", ".join(f"v{v} {s}" for v, s in sorted(states.items()))
        if shown != self._shown_rest:
            self._shown_rest = shown
            self._say(time.time(), f"REST model status: {shown}")
        if self.rest_done_at is None and states.get(self.new) == "AVAILABLE" \
                and states.get(self.old, "END") == "END":
            self.rest_done_at = time.time()

    def outcome(self) -> tuple[float, str] | None:
        """``(end, signal)`` once the update has finished, else None."""
        if self.finished and self.entry is not None:
            ended = self.entry.get("ended")
            return (float(ended) if ended else time.time()), ADMIN_SIGNAL
        if self.rest_done_at is not None and self.entry is None and (
                not self.admin_ok or time.time() - self.rest_done_at > self.grace_s):
            return self.rest_done_at, REST_SIGNAL
        return None

    async def wait_finished(self, timeout: float) -> tuple[float, str]:
        """``(end, signal)``: the wall time the old version was unloaded, and which source told so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.gather(self.poll_admin(), self.poll_rest())
            found = self.outcome()
            if found is not None:
                return found
            await asyncio.sleep(self.poll_s)
        admin = self._shown_phase or ("no rollout reported" if self.admin_ok else "absent")
        raise TimeoutError(f"update not finished after {timeout:g}s (REST: {self._shown_rest or '-'}; "
                           f"admin: {admin})")
