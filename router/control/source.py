"""The version source: which version directories are complete, and which to serve.

A model's base path holds numbered version directories (TF Serving's
layout).  A directory becomes a *candidate* only when it is complete:
``saved_model.pb`` is there and either the configured marker file
(``source.ready_marker``, e.g. ``_READY``) exists or the directory's listing
and file sizes stayed the same over ``source.stable_polls`` polls, so a
version still being copied is never loaded half-written.

The model's version policy (``latest``, ``latest:N``, ``all``,
``specific:...``) then picks the versions to serve from the candidates.
Two rules keep a flaky filesystem from hurting: a base path that cannot be
listed changes nothing (its previous answer stands), and a policy that would
leave a model with no version at all keeps what is served.  A version that
failed (to load, or to warm up) is left out until its directory changes or
an operator retries it; an operator may also pin a model to given versions.

``scan_version_dirs`` is the only I/O; ``VersionSource`` is pure given its
listings, so it is tested with fake directory states.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from router.config import ModelConfig

log = logging.getLogger("router.control.source")

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

# A version directory's contents: (relative path, size, mtime ns) of every file.
Fingerprint = tuple[tuple[str, int, int], ...]
# version -> its fingerprint, or None when the directory could not be read.
Listing = dict[int, Fingerprint | None]


class Unreadable(OSError):
    """The base path exists but cannot be listed: nothing about it is known this poll."""


def fingerprint(path: str) -> Fingerprint:
    entries = []
    for root, dirs, files in os.walk(path, onerror=_raise):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            st = os.stat(full)
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _raise(exc: OSError) -> None:
    raise exc


def scan_version_dirs(base_path: str) -> Listing:
    """Every numbered directory under ``base_path`` with its fingerprint.

    A missing base path holds no versions; one that exists but cannot be
    listed raises ``Unreadable``.  A version directory that vanishes or
    cannot be read while it is walked maps to None.
    """
    try:
        entries = [e for e in os.scandir(base_path) if e.name.isdigit() and e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise Unreadable(f"cannot list {base_path}: {exc}") from exc
    listing: Listing = {}
    for entry in entries:
        try:
            listing[int(entry.name)] = fingerprint(entry.path)
        except OSError:
            listing[int(entry.name)] = None
    return listing


def aspired(model: ModelConfig, found: Iterable[int]) -> tuple[int, ...]:
    """The versions a model's policy asks for among the complete ones (pure)."""
    found = sorted(found)
    kind, numbers = model.policy()
    if kind == "all":
        return tuple(found)
    if kind == "specific":
        return tuple(v for v in numbers if v in found)
    return tuple(found[-numbers[0]:]) if found else ()


@dataclass
class _ModelState:
    seen: dict[int, tuple[Fingerprint, int]] = field(default_factory=dict)  # fingerprint, polls unchanged
    candidates: tuple[int, ...] = ()
    failed: dict[int, tuple[Fingerprint | None, str]] = field(default_factory=dict)
    pinned: tuple[int, ...] | None = None


class VersionSource:
    def __init__(self, models: Iterable[ModelConfig], *, ready_marker: str = "", stable_polls: int = 2,
                 scan: Callable[[str], Listing] = scan_version_dirs) -> None:
        self.models = {m.name: m for m in models}
        self.ready_marker = ready_marker
        self.stable_polls = stable_polls
        self._scan = scan
        self._state = {name: _ModelState() for name in self.models}

    def set_models(self, models: Iterable[ModelConfig]) -> None:
        """Follow a new model list (a model whose base path changed starts afresh)."""
        old = self.models
        self.models = {m.name: m for m in models}
        self._state = {name: self._state[name] if name in old and old[name].base_path == m.base_path
                       else _ModelState() for name, m in self.models.items()}

    # -- polling ---------------------------------------------------------------

    def poll(self) -> None:
        """Scan every base path once (blocking I/O: run it off the event loop)."""
        for name, model in self.models.items():
            try:
                listing = self._scan(model.base_path)
            except Unreadable as exc:
                log.warning("model %s: %s; keeping what is known", name, exc)
                continue
            self.observe(name, listing)

    def observe(self, name: str, listing: Mapping[int, Fingerprint | None]) -> None:
        """One poll's listing of a model's base path."""
        state = self._state[name]
        seen: dict[int, tuple[Fingerprint, int]] = {}
        complete = []
        for version, fp in listing.items():
            if fp is None:
                continue  # unreadable right now: neither a candidate nor forgotten as failed
            before = state.seen.get(version)
            polls = before[1] + 1 if before is not None and before[0] == fp else 1
            seen[version] = (fp, polls)
            if self._complete(fp, polls):
                complete.append(version)
        for version, (fp_failed, _) in list(state.failed.items()):
            now = listing.get(version)
            if version in listing and now is not None and now != fp_failed:
                log.info("model %s version %d changed on disk; it will be tried again", name, version)
                del state.failed[version]
        state.seen = seen
        candidates = tuple(sorted(v for v in complete if v not in state.failed))
        if candidates != state.candidates:
            log.info("model %s: complete versions %s", name, list(candidates))
        state.candidates = candidates

    def _complete(self, fp: Fingerprint, polls: int) -> bool:
        files = {path for path, _, _ in fp}
        if not any(f in files for f in SAVED_MODEL_FILES):
            return False
        if self.ready_marker:
            return self.ready_marker in files
        return polls >= self.stable_polls

    # -- what to serve ---------------------------------------------------------

    def candidates(self, name: str) -> tuple[int, ...]:
        return self._state[name].candidates

    def wanted(self, name: str, serving: Iterable[int] = ()) -> tuple[int, ...]:
        """The versions to serve: the pin, else the policy over the candidates.

        Never empty while ``serving`` is not: a model keeps its versions when
        its directories vanish.
        """
        state = self._state[name]
        if state.pinned is not None:
            return state.pinned
        chosen = aspired(self.models[name], state.candidates)
        return chosen or tuple(sorted(serving))

    def pin(self, name: str, versions: Iterable[int] | None) -> None:
        """Serve exactly ``versions`` whatever the policy says (None: follow the policy again)."""
        self._state[name].pinned = None if versions is None else tuple(sorted(set(versions)))

    def pinned(self, name: str) -> tuple[int, ...] | None:
        return self._state[name].pinned

    # -- failures --------------------------------------------------------------

    def mark_failed(self, name: str, version: int, reason: str) -> None:
        """Leave ``version`` out until its directory changes or ``retry`` is called."""
        state = self._state[name]
        seen = state.seen.get(version)
        state.failed[version] = (seen[0] if seen else None, reason)
        state.candidates = tuple(v for v in state.candidates if v != version)

    def retry(self, name: str, version: int) -> None:
        state = self._state[name]
        if state.failed.pop(version, None) is not None:
            seen = state.seen.get(version)
            if seen is not None and self._complete(*seen):
                state.candidates = tuple(sorted({*state.candidates, version}))

    def failed_marks(self, name: str) -> dict[int, tuple[Fingerprint | None, str]]:
        """Failed versions with the fingerprint of the directory that failed (router/state.py keeps them)."""
        return dict(self._state[name].failed)

    def restore_failed(self, name: str, version: int, fingerprint: Fingerprint | None, reason: str) -> None:
        """A failed mark from before a restart: left out until that directory changes."""
        state = self._state[name]
        state.failed[version] = (fingerprint, reason)
        state.candidates = tuple(v for v in state.candidates if v != version)

    def failed(self, name: str) -> dict[int, str]:
        return {v: reason for v, (_, reason) in self._state[name].failed.items()}

    def on_disk(self, name: str) -> tuple[int, ...]:
        """Every version directory seen in the last poll, complete or not."""
        return tuple(sorted(self._state[name].seen))

    def complete(self, name: str, version: int) -> bool:
        """Whether ``version`` is on disk and complete, failed or not."""
        seen = self._state[name].seen.get(version)
        return seen is not None and self._complete(*seen)
