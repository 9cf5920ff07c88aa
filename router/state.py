"""Operator decisions that survive a restart: the runtime state in a file (``state.backend: file``).

The config file stays the base.  What changes at run time and is not in it
is kept here, each entry with who changed it and when:

* a model's routing block (a canary weight, a split, rules) set through the
  admin API, when it differs from the config's;
* pins (``rollout --version``, rollbacks): the versions a model serves
  whatever its policy says;
* failed-version marks (a version that failed to load or warm stays out until
  its directory changes), with the directory's fingerprint;
* drains of named workers.

The file (``state.json`` under ``state.dir``) is written whole, atomically
(a temporary file, fsync, rename, fsync of the directory), whenever what it
holds changed; read back at start and applied before the first rollout.  A
file that cannot be read or parsed refuses the start with its path and the
reason; ``--ignore-state`` starts from the config alone (the file is then
replaced at the first change).  ``tfs-router state reset MODEL`` drops a
model's entries (the config's routing, the policy, failed versions retried).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.config import ConfigError

log = logging.getLogger("router.state")

STATE_FILE = "state.json"
FORMAT = 1
STATE_DIR_ENV = "TFS_ROUTER_STATE_DIR"  # overrides state.dir (tests give every router its own)


class StateError(ConfigError):
    """A state file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Entry:
    value: Any
    by: str
    at: float

    def document(self) -> dict[str, Any]:
        return {"value": self.value, "by": self.by, "at": self.at}


State = dict[str, Any]  # {"models": {model: {key: Entry | {version: Entry}}}, "workers": {name: Entry}}


def empty() -> State:
    return {"models": {}, "workers": {}}


class FileStore:
    """The runtime state as one JSON document in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> State:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty()
        except OSError as exc:
            raise StateError(f"state file {self.path}: cannot read it ({exc.strerror}); "
                             "start with --ignore-state to begin from the config") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a tfs-router state file of format {FORMAT}")
            state = empty()
            for model, entries in data["models"].items():
                out: dict[str, Any] = {}
                for key, e in entries.items():
                    if key == "failed":
                        out[key] = {int(v): _entry(x) for v, x in e.items()}
                    else:
                        out[key] = _entry(e)
                state["models"][model] = out
            state["workers"] = {name: _entry(e) for name, e in data["workers"].items()}
            return state
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"state file {self.path}: {exc}; start with --ignore-state to begin from the "
                             "config (the file is replaced at the next change)") from None

    def save(self, state: State) -> None:
        doc = {"format": FORMAT, "saved_at": time.time(),
               "models": {m: {k: ({str(v): x.document() for v, x in e.items()} if k == "failed" else e.document())
                              for k, e in entries.items()} for m, entries in state["models"].items() if entries},
               "workers": {name: e.document() for name, e in state["workers"].items()}}
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, dict) or "value" not in raw:
        raise ValueError(f"an entry must be {{value, by, at}}, got {raw!r}")
    return Entry(raw["value"], str(raw.get("by", "")), float(raw.get("at", 0.0)))


def merge(old: State, values: dict[str, Any], by: str, now: float) -> State:
    """The state for ``values`` (the same shape, plain values): an entry whose value did not change
    keeps who set it and when; a changed one is ``by`` at ``now``."""
    def keep(prev: Entry | None, value: Any) -> Entry:
        return prev if prev is not None and prev.value == value else Entry(value, by, now)

    state = empty()
    for model, entries in values["models"].items():
        prev = old["models"].get(model, {})
        out: dict[str, Any] = {}
        for key, value in entries.items():
            if key == "failed":
                out[key] = {v: keep(prev.get("failed", {}).get(v), x) for v, x in value.items()}
            else:
                out[key] = keep(prev.get(key), value)
        if out:
            state["models"][model] = out
    state["workers"] = {name: keep(old["workers"].get(name), value) for name, value in values["workers"].items()}
    return state


def directory(configured: str, config_path: str | None) -> Path:
    """Where the state lives: ``TFS_ROUTER_STATE_DIR``, else ``state.dir``, else ``.tfs-router-state``
    beside the config file (or in the working directory without one)."""
    override = os.environ.get(STATE_DIR_ENV)
    if override:
        return Path(override)
    if configured:
        return Path(configured)
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    return base / ".tfs-router-state"
