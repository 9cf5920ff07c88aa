"""router.control.source: complete versions, the version policy, failures and pins.

``VersionSource.observe`` is fed listings directly (pure); ``scan_version_dirs``
and ``poll`` run against real directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import ModelConfig
from router.control.source import Fingerprint, Unreadable, VersionSource, aspired, scan_version_dirs

PB = ("saved_model.pb", 100, 1)
VARS = ("variables/variables.data-00000-of-00001", 5000, 1)


def fp(*extra: tuple[str, int, int]) -> Fingerprint:
    return tuple(sorted((PB, VARS, *extra)))


def source(policy: str = "latest", **kwargs: object) -> VersionSource:
    return VersionSource([ModelConfig("m", "/m", version_policy=policy)], **kwargs)  # type: ignore[arg-type]


# -- aspired(): the version policy ----------------------------------------------------------


def model(policy: str) -> ModelConfig:
    return ModelConfig("m", "/m", version_policy=policy)


@pytest.mark.parametrize(
    ("policy", "found", "expected"),
    [
        ("latest", [1, 2, 3], (3,)),
        ("latest:2", [1, 2, 3], (2, 3)),
        ("latest:5", [1, 2, 3], (1, 2, 3)),
        ("latest", [], ()),
        ("latest:3", [7], (7,)),
        ("all", [1, 4, 9], (1, 4, 9)),
        ("all", [], ()),
        ("specific:3,1", [1, 2, 3], (1, 3)),
        ("specific:5", [1, 2], ()),  # named, but not complete on disk: nothing to load yet
    ],
)
def test_aspired(policy: str, found: list[int], expected: tuple[int, ...]) -> None:
    assert aspired(model(policy), found) == expected


@settings(max_examples=200, deadline=None)
@given(found=st.lists(st.integers(0, 1000), unique=True), n=st.integers(1, 8))
def test_latest_n_is_the_n_newest(found: list[int], n: int) -> None:
    got = aspired(model(f"latest:{n}"), found)
    assert list(got) == sorted(found)[-n:]
    assert all(v > other for v in got for other in set(found) - set(got))


# -- completeness ---------------------------------------------------------------------------


def test_a_version_is_a_candidate_once_unchanged_over_two_polls() -> None:
    s = source()
    s.observe("m", {1: fp()})
    assert s.candidates("m") == ()  # seen once: may still be copying
    s.observe("m", {1: fp()})
    assert s.candidates("m") == (1,)


def test_a_growing_directory_is_not_a_candidate_until_it_settles() -> None:
    s = source()
    s.observe("m", {1: fp(), 2: (PB,)})
    s.observe("m", {1: fp(), 2: (PB, ("variables/variables.data-00000-of-00001", 100, 2))})
    s.observe("m", {1: fp(), 2: (PB, ("variables/variables.data-00000-of-00001", 900, 3))})
    assert s.candidates("m") == (1,)
    assert s.wanted("m") == (1,)
    s.observe("m", {1: fp(), 2: (PB, ("variables/variables.data-00000-of-00001", 900, 3))})
    assert s.candidates("m") == (1, 2) and s.wanted("m") == (2,)


def test_no_saved_model_pb_is_never_a_candidate() -> None:
    s = source()
    for _ in range(3):
        s.observe("m", {1: (VARS,)})
    assert s.candidates("m") == ()


def test_ready_marker_makes_a_version_complete_at_once_and_is_required() -> None:
    s = source(ready_marker="_READY")
    s.observe("m", {1: fp()})
    s.observe("m", {1: fp()})
    assert s.candidates("m") == ()  # stable, but no marker
    s.observe("m", {1: fp(("_READY", 0, 5))})
    assert s.candidates("m") == (1,)


def test_vanished_or_unreadable_directories_never_leave_a_model_empty() -> None:
    s = source()
    s.observe("m", {1: fp()})
    s.observe("m", {1: fp()})
    assert s.wanted("m", serving=()) == (1,)
    s.observe("m", {})  # the directory vanished
    assert s.wanted("m", serving=(1,)) == (1,)  # keeps serving what it serves
    s.observe("m", {1: None})  # unreadable
    assert s.wanted("m", serving=(1,)) == (1,)


def test_deleting_the_newest_version_goes_back_to_the_one_before() -> None:
    s = source()
    for _ in range(2):
        s.observe("m", {1: fp(), 2: fp(("x", 1, 1))})
    assert s.wanted("m", serving=(2,)) == (2,)
    s.observe("m", {1: fp()})
    assert s.wanted("m", serving=(2,)) == (1,)  # TF Serving's latest policy does the same


# -- failures and pins ------------------------------------------------------------------------


def test_a_failed_version_is_skipped_until_its_directory_changes() -> None:
    s = source()
    for _ in range(2):
        s.observe("m", {1: fp(), 2: fp(("x", 1, 1))})
    s.mark_failed("m", 2, "warm-up failed")
    assert s.wanted("m", serving=(1,)) == (1,) and s.failed("m") == {2: "warm-up failed"}
    for _ in range(3):
        s.observe("m", {1: fp(), 2: fp(("x", 1, 1))})
    assert s.wanted("m", serving=(1,)) == (1,)  # same bytes: not retried
    s.observe("m", {1: fp(), 2: fp(("x", 2, 2))})  # replaced on disk
    assert s.failed("m") == {}
    s.observe("m", {1: fp(), 2: fp(("x", 2, 2))})
    assert s.wanted("m", serving=(1,)) == (2,)


def test_an_operator_retry_clears_the_failure_at_once() -> None:
    s = source()
    for _ in range(2):
        s.observe("m", {1: fp(), 2: fp(("x", 1, 1))})
    s.mark_failed("m", 2, "load failed")
    s.retry("m", 2)
    assert s.failed("m") == {} and s.wanted("m") == (2,)


def test_pin_overrides_the_policy_until_cleared() -> None:
    s = source()
    for _ in range(2):
        s.observe("m", {1: fp(), 2: fp(("x", 1, 1)), 3: fp(("y", 1, 1))})
    s.pin("m", [1])
    assert s.wanted("m") == (1,) and s.pinned("m") == (1,)
    s.pin("m", None)
    assert s.wanted("m") == (3,)


# -- the filesystem --------------------------------------------------------------------------


def write_version(base: Path, version: int, size: int = 10) -> Path:
    d = base / str(version)
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"x" * size)
    (d / "variables" / "variables.index").write_bytes(b"i")
    return d


def test_scan_lists_numbered_dirs_with_fingerprints(tmp_path: Path) -> None:
    base = tmp_path / "m"
    write_version(base, 1)
    write_version(base, 10, size=20)
    (base / "tmp").mkdir()
    (base / "7").write_text("a file, not a version")
    listing = scan_version_dirs(str(base))
    assert sorted(listing) == [1, 10]
    assert {path for path, _, _ in listing[10] or ()} == {"saved_model.pb", "variables/variables.index"}
    assert ("saved_model.pb", 20) in {(p, size) for p, size, _ in listing[10] or ()}
    assert scan_version_dirs(str(tmp_path / "missing")) == {}


def test_unreadable_base_path_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "m"
    write_version(base, 1)

    def refuse(path: str) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", refuse)  # chmod does not stop root, who runs CI
    with pytest.raises(Unreadable, match="Permission denied"):
        scan_version_dirs(str(base))


def test_poll_keeps_what_it_knew_when_a_base_path_cannot_be_listed(tmp_path: Path) -> None:
    base = tmp_path / "m"
    write_version(base, 1)
    broken = [False]

    def scan(path: str) -> dict[int, Fingerprint | None]:
        if broken[0]:
            raise Unreadable("cannot list: I/O error")
        return scan_version_dirs(path)

    s = VersionSource([ModelConfig("m", str(base))], scan=scan)
    s.poll()
    s.poll()
    assert s.candidates("m") == (1,)
    broken[0] = True
    s.poll()
    assert s.candidates("m") == (1,)


def test_poll_sees_a_copy_in_progress_then_complete(tmp_path: Path) -> None:
    base = tmp_path / "m"
    s = VersionSource([ModelConfig("m", str(base))])
    d = write_version(base, 1)
    s.poll()
    (d / "variables" / "variables.data-00000-of-00001").write_bytes(b"d" * 100)  # still copying
    s.poll()
    assert s.candidates("m") == ()
    s.poll()
    assert s.candidates("m") == (1,) and s.complete("m", 1) and s.on_disk("m") == (1,)
