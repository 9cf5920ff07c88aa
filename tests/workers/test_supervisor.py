"""Tests for workers.supervisor: the pure policy (Backoff, worker_specs) and the
process mechanism, with a tiny fake worker (fast) and once with the real one."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import sysconfig
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from workers import numa
from workers.supervisor import (
    REPO_ROOT,
    Backoff,
    Supervisor,
    WorkerSpec,
    find_allocator,
    library_dirs,
    socket_path,
    worker_specs,
)

T = TypeVar("T")

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


# ---------------------------------------------------------------- Backoff


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(0.5, 4.0, reset_after=30.0)
    assert [b.next_delay(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_resets_after_a_long_life() -> None:
    b = Backoff(1.0, 60.0, reset_after=30.0)
    assert [b.next_delay(0.1) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert b.next_delay(30.0) == 1.0  # lived long enough: healthy again
    assert b.next_delay(29.9) == 2.0  # and a quick failure after that doubles from there
    assert b.next_delay(100.0) == 1.0


def test_backoff_cap_not_a_power_of_two_multiple() -> None:
    b = Backoff(0.3, 1.0)
    assert [b.next_delay(0) for _ in range(4)] == [0.3, 0.6, 1.0, 1.0]


@pytest.mark.parametrize(("initial", "maximum", "reset"), [(0, 1, 1), (-1, 1, 1), (2, 1, 1), (1, 2, -1)])
def test_backoff_rejects_bad_parameters(initial: float, maximum: float, reset: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum, reset)


# ---------------------------------------------------------------- worker_specs


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    for n, cpulist in ((0, "0-3\n"), (1, "4-7\n")):
        (root / f"node{n}").mkdir(parents=True)
        (root / f"node{n}" / "cpulist").write_text(cpulist)
    return root


def _flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _specs(sysfs: Path, sock: Path, **overrides: Any) -> list[WorkerSpec]:
    kwargs: dict[str, Any] = dict(
        numa=True, sysfs_root=str(sysfs), cpus_per_worker=0, intra_op_threads=0, inter_op_threads=0,
        predict_threads=0, allocator="", python="/usr/bin/python3", base_env={"PATH": "/bin"},
        allowed=range(8),
    )
    kwargs.update(overrides)
    count = kwargs.pop("count", 4)
    return worker_specs(count, sock, **kwargs)


def test_worker_specs_numa_without_numactl_pins_with_cpus_flag(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(numa, "find_numactl", lambda: None)
    specs = _specs(sysfs, tmp_path / "sock", predict_threads=3)
    assert [s.index for s in specs] == [0, 1, 2, 3]
    # No cpus_per_worker: the two workers of each node share its CPUs.
    assert [s.cpus for s in specs] == [(0, 1, 2, 3), (0, 1, 2, 3), (4, 5, 6, 7), (4, 5, 6, 7)]
    for i, s in enumerate(specs):
        path = (tmp_path / "sock" / f"w{i}.sock").absolute()
        assert s.address == f"unix:{path}"
        assert socket_path(s.address) == path
        assert s.argv[:6] == ("/usr/bin/python3", "-m", "workers", "--listen", s.address, "--cpus")
        assert _flag(s.argv, "--cpus") == numa.format_cpulist(s.cpus)
        assert _flag(s.argv, "--mem-node") == ("0" if i < 2 else "1")  # the node its CPUs are on
        assert _flag(s.argv, "--intra-op-threads") == "2"  # from the placement: its share of the node
        assert _flag(s.argv, "--inter-op-threads") == "1"
        assert _flag(s.argv, "--predict-threads") == "3"
        assert s.env["PYTHONPATH"] == str(REPO_ROOT)
        assert s.env["TF_CPP_MIN_LOG_LEVEL"] == "2"
        assert s.env["PATH"] == "/bin"
        assert "LD_PRELOAD" not in s.env


def test_worker_specs_numa_explicit_threads_and_cpus_per_worker(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(numa, "find_numactl", lambda: None)
    specs = _specs(sysfs, tmp_path, count=2, cpus_per_worker=3, intra_op_threads=5, inter_op_threads=4)
    assert [s.cpus for s in specs] == [(0, 1, 2), (4, 5, 6)]
    assert [_flag(s.argv, "--cpus") for s in specs] == ["0-2", "4-6"]
    assert {_flag(s.argv, "--intra-op-threads") for s in specs} == {"5"}
    assert {_flag(s.argv, "--inter-op-threads") for s in specs} == {"4"}
    assert all("--predict-threads" not in s.argv for s in specs)  # worker default
    # Placement-sized threads when not given: 4 CPUs each -> intra 4, inter 2.
    auto = _specs(sysfs, tmp_path, count=2)
    assert [(_flag(s.argv, "--intra-op-threads"), _flag(s.argv, "--inter-op-threads")) for s in auto] == [
        ("4", "2"), ("4", "2")
    ]


def test_worker_specs_numa_uses_numactl_when_installed(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(numa, "find_numactl", lambda: "/usr/bin/numactl")
    specs = _specs(sysfs, tmp_path, count=2)
    assert specs[0].argv[:4] == ("/usr/bin/numactl", "--physcpubind=0-3", "--membind=0", "/usr/bin/python3")
    assert specs[1].argv[:4] == ("/usr/bin/numactl", "--physcpubind=4-7", "--membind=1", "/usr/bin/python3")
    assert all("--cpus" not in s.argv for s in specs)  # numactl pins: no self-pinning
    no_numactl = _specs(sysfs, tmp_path, count=2, use_numactl=False)
    assert [_flag(s.argv, "--cpus") for s in no_numactl] == ["0-3", "4-7"]
    assert all(s.argv[0] == "/usr/bin/python3" for s in no_numactl)


def test_worker_specs_without_numa(sysfs: Path, tmp_path: Path) -> None:
    specs = _specs(sysfs, tmp_path, count=3, numa=False)
    assert len(specs) == 3
    for s in specs:
        assert s.cpus == ()
        assert s.argv[0] == "/usr/bin/python3"
        assert "--cpus" not in s.argv
        assert _flag(s.argv, "--intra-op-threads") == "0"
        assert _flag(s.argv, "--inter-op-threads") == "0"
    given = _specs(sysfs, tmp_path, count=1, numa=False, intra_op_threads=6, inter_op_threads=2,
                   extra_args=("--log-level", "DEBUG"))
    assert _flag(given[0].argv, "--intra-op-threads") == "6"
    assert _flag(given[0].argv, "--inter-op-threads") == "2"
    assert given[0].argv[-2:] == ("--log-level", "DEBUG")


def test_worker_specs_environment(sysfs: Path, tmp_path: Path) -> None:
    allocator = tmp_path / "libjemalloc.so.2"
    allocator.write_bytes(b"")
    base = {"PYTHONPATH": f"/a{os.pathsep}{REPO_ROOT}", "TF_CPP_MIN_LOG_LEVEL": "0", "LD_PRELOAD": "/x.so"}
    spec = _specs(sysfs, tmp_path, count=1, numa=False, allocator=str(allocator), base_env=base)[0]
    assert spec.env["PYTHONPATH"] == f"{REPO_ROOT}{os.pathsep}/a"  # prepended, not duplicated
    assert spec.env["TF_CPP_MIN_LOG_LEVEL"] == "0"  # a given value wins over the default
    assert spec.env["LD_PRELOAD"] == f"{allocator}:/x.so"
    assert base["LD_PRELOAD"] == "/x.so"  # the caller's mapping is not modified
    plain = _specs(sysfs, tmp_path, count=1, numa=False, allocator=str(allocator))[0]
    assert plain.env["LD_PRELOAD"] == str(allocator)
    inherited = _specs(sysfs, tmp_path, count=1, numa=False, base_env=None)[0]
    assert inherited.env["PATH"] == os.environ["PATH"]


# ---------------------------------------------------------------- allocators by name


@pytest.fixture
def libdirs(tmp_path: Path) -> list[Path]:
    """A fake multiarch, lib64, lib and local lib directory, in search order."""
    dirs = [tmp_path / "usr/lib/x86_64-linux-gnu", tmp_path / "usr/lib64", tmp_path / "usr/lib",
            tmp_path / "usr/local/lib"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def test_find_allocator_takes_the_first_directory_that_has_the_library(libdirs: list[Path]) -> None:
    multiarch, _, lib, local = libdirs
    for d in (lib, local):
        (d / "libjemalloc.so.2").write_bytes(b"")
    assert find_allocator("jemalloc", libdirs) == lib / "libjemalloc.so.2"
    (multiarch / "libjemalloc.so.2").write_bytes(b"")
    assert find_allocator("jemalloc", libdirs) == multiarch / "libjemalloc.so.2"
    # tcmalloc: the minimal library (no profiler) wins over the full one, wherever each is.
    (multiarch / "libtcmalloc.so.4").write_bytes(b"")
    assert find_allocator("tcmalloc", libdirs) == multiarch / "libtcmalloc.so.4"
    (local / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_allocator("tcmalloc", libdirs) == local / "libtcmalloc_minimal.so.4"
    # Anything else is a path, as before.
    assert find_allocator(str(lib / "libjemalloc.so.2"), []) == lib / "libjemalloc.so.2"


def test_find_allocator_names_the_debian_package_to_install(libdirs: list[Path]) -> None:
    (libdirs[0] / "libjemalloc.so.2").mkdir()  # a directory is not a library
    with pytest.raises(ValueError, match=r"libjemalloc\.so\.2 in .*usr/lib64.*install Debian's libjemalloc2"):
        find_allocator("jemalloc", libdirs)
    with pytest.raises(ValueError, match="install Debian's libtcmalloc-minimal4"):
        find_allocator("tcmalloc", libdirs)
    with pytest.raises(ValueError, match="nor one of the names jemalloc, tcmalloc"):
        find_allocator("mimalloc", libdirs)


def test_worker_specs_preload_an_allocator_by_name(sysfs: Path, tmp_path: Path, libdirs: list[Path]) -> None:
    (libdirs[2] / "libjemalloc.so.2").write_bytes(b"")
    specs = _specs(sysfs, tmp_path, count=2, numa=False, allocator="jemalloc", allocator_dirs=libdirs,
                   base_env={"LD_PRELOAD": "/x.so"})
    assert [s.env["LD_PRELOAD"] for s in specs] == [f"{libdirs[2] / 'libjemalloc.so.2'}:/x.so"] * 2
    with pytest.raises(ValueError, match="libtcmalloc-minimal4"):
        _specs(sysfs, tmp_path, allocator="tcmalloc", allocator_dirs=libdirs)


def test_library_dirs_search_this_interpreters_multiarch_directory_first() -> None:
    dirs = library_dirs()
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    assert dirs[0] == Path("/usr/lib") / triplet
    assert {Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")} <= set(dirs)


def test_worker_specs_errors(sysfs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allocator"):
        _specs(sysfs, tmp_path, allocator=str(tmp_path / "missing.so"))
    with pytest.raises(ValueError, match="allocator"):
        _specs(sysfs, tmp_path, allocator=str(tmp_path))  # a directory is not an allocator
    with pytest.raises(ValueError):
        _specs(sysfs, tmp_path, count=0)
    with pytest.raises(ValueError):
        _specs(sysfs, tmp_path, count=2, cpus_per_worker=5)  # nodes have 4 CPUs
    with pytest.raises(ValueError, match="too long"):
        _specs(sysfs, tmp_path / ("d" * 120))


# ---------------------------------------------------------------- a fake worker process

FAKE_WORKER = textwrap.dedent(
    """
    import os, signal, socket, sys, time

    mode, address = sys.argv[1], sys.argv[2]
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode == "silent":
        print("loading, not listening yet", flush=True)
        time.sleep(3600)
    # Bind the socket like a real worker; SIGKILL leaves the file behind.
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(address[len("unix:"):])
    sock.listen()
    print("some other output", flush=True)
    print(f"tfs-worker listening on {address}", flush=True)
    if mode == "crash":
        sys.exit(3)
    if mode == "chatty":
        # Far more than a pipe buffer: this blocks unless the supervisor keeps draining.
        progress = address[len("unix:"):] + ".progress"
        for n in range(1, 10**9):
            print("x" * 1000, flush=True)
            with open(progress, "w") as f:
                f.write(str(n))
            time.sleep(0.0005)
    while True:
        time.sleep(3600)
    """
)


class Recorder:
    """Collects supervisor events; ``wait_for`` polls for a condition."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    def __call__(self, index: int, event: str, info: dict[str, Any]) -> None:
        self.events.append((index, event, dict(info)))

    def of(self, index: int, event: str) -> list[dict[str, Any]]:
        return [info for i, e, info in self.events if i == index and e == event]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; events so far: {self.events}")
            await asyncio.sleep(0.01)


def fake_specs(tmp_path: Path, modes: list[str]) -> list[WorkerSpec]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    specs = []
    for i, mode in enumerate(modes):
        address = f"unix:{tmp_path / f'w{i}.sock'}"
        specs.append(WorkerSpec(i, address, (sys.executable, str(script), mode, address), dict(os.environ)))
    return specs


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_supervisor_starts_restarts_and_stops(tmp_path: Path, loop: str) -> None:
    rec = Recorder()
    specs = fake_specs(tmp_path, ["sleep", "sleep", "chatty"])

    async def main() -> None:
        sup = Supervisor(specs, rec, backoff_initial=0.05, backoff_max=0.2)
        await sup.start()
        assert await sup.wait_started(30)
        for spec in specs:
            (started,) = rec.of(spec.index, "started")
            assert started == {"address": spec.address, "pid": sup.pid(spec.index)}
            assert sup.restarts(spec.index) == 0
        first = sup.pid(1)
        assert first is not None

        os.kill(first, signal.SIGKILL)
        await rec.wait_for(lambda: len(rec.of(1, "started")) == 2)
        (exited,) = rec.of(1, "exited")
        assert exited["returncode"] == -signal.SIGKILL and exited["pid"] == first
        second = sup.pid(1)
        assert second is not None and second != first
        assert rec.of(1, "started")[1] == {"address": specs[1].address, "pid": second}
        assert sup.restarts(1) == 1 and sup.restarts(0) == 0  # restarted despite its stale socket file

        # The chatty worker keeps writing well past a pipe buffer (64 KiB = 65 lines).
        progress = Path(f"{socket_path(specs[2].address)}.progress")
        await rec.wait_for(lambda: progress.exists() and int(progress.read_text() or 0) > 300)
        assert sup.pid(2) is not None and not rec.of(2, "exited")

        pids = [sup.pid(s.index) for s in specs]
        t0 = time.monotonic()
        await sup.stop(timeout=10)
        assert time.monotonic() - t0 < 5
        for index, pid in enumerate(pids):
            assert pid is not None and gone(pid)
            assert sup.pid(index) is None
            assert rec.of(index, "exited")[-1]["returncode"] == 0  # clean SIGTERM exit
        before = list(rec.events)
        await asyncio.sleep(0.5)  # several backoff periods: nothing may restart
        assert rec.events == before
        assert [len(rec.of(s.index, "started")) for s in specs] == [1, 2, 1]

    LOOPS[loop](main())


def test_supervisor_kills_a_worker_that_never_listens(tmp_path: Path) -> None:
    rec = Recorder()
    specs = fake_specs(tmp_path, ["silent"])

    async def main() -> None:
        sup = Supervisor(specs, rec, backoff_initial=0.05, startup_timeout=0.5)
        await sup.start()
        await rec.wait_for(lambda: sup.restarts(0) >= 1 and sup.pid(0) is not None)
        (exited, *_) = rec.of(0, "exited")
        assert exited["returncode"] == -signal.SIGKILL
        assert gone(exited["pid"]) and exited["pid"] != sup.pid(0)
        assert not rec.of(0, "started")
        assert not await sup.wait_started(0.1)
        await sup.stop(timeout=5)
        assert sup.pid(0) is None

    asyncio.run(main())


def test_supervisor_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    rec = Recorder()
    specs = fake_specs(tmp_path, ["stubborn", "sleep"])

    async def main() -> None:
        sup = Supervisor(specs, rec)
        await sup.start()
        assert await sup.wait_started(30)
        pids = [sup.pid(0), sup.pid(1)]
        t0 = time.monotonic()
        await sup.stop(timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert all(pid is not None and gone(pid) for pid in pids)
        assert rec.of(0, "exited")[-1]["returncode"] == -signal.SIGKILL
        assert rec.of(1, "exited")[-1]["returncode"] == 0

    asyncio.run(main())


def test_supervisor_stop_interrupts_backoff_and_callback_errors_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[int, str]] = []

    async def on_event(index: int, event: str, info: dict[str, Any]) -> None:
        events.append((index, event))
        await asyncio.sleep(0)
        raise RuntimeError("callback bug")

    specs = fake_specs(tmp_path, ["crash"])

    async def main() -> None:
        # A 60 s backoff after the crash: stop() must not wait for it.
        sup = Supervisor(specs, on_event, backoff_initial=60, backoff_max=60)
        await sup.start()
        deadline = time.monotonic() + 30
        while (0, "exited") not in events and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert events == [(0, "started"), (0, "exited")]  # the task survived the callback's error
        assert sup.pid(0) is None and sup.restarts(0) == 0
        t0 = time.monotonic()
        await sup.stop()
        assert time.monotonic() - t0 < 2
        assert sup.restarts(0) == 0

    with caplog.at_level(logging.ERROR, logger="workers.supervisor"):
        asyncio.run(main())
    assert sum("event callback failed" in r.getMessage() for r in caplog.records) == 2


def test_supervisor_survives_a_spawn_failure(tmp_path: Path) -> None:
    rec = Recorder()
    spec = WorkerSpec(0, "127.0.0.1:0", (str(tmp_path / "no-such-binary"),), dict(os.environ))

    async def main() -> None:
        sup = Supervisor([spec], rec, backoff_initial=0.02, backoff_max=0.05)
        await sup.start()
        await rec.wait_for(lambda: sup.restarts(0) >= 3)
        assert not rec.events and sup.pid(0) is None
        await sup.stop()

    asyncio.run(main())


# ---------------------------------------------------------------- adding and removing workers


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_supervisor_adds_and_removes_a_worker_while_others_run(tmp_path: Path, loop: str) -> None:
    rec = Recorder()
    steady, surge = fake_specs(tmp_path, ["sleep", "sleep"])

    async def main() -> None:
        sup = Supervisor([steady], rec, backoff_initial=0.05, backoff_max=0.2)
        await sup.start()
        assert await sup.wait_started(30)
        steady_pid = sup.pid(0)
        await sup.add(surge)
        with pytest.raises(ValueError, match="duplicate"):
            await sup.add(surge)
        assert await sup.wait_started(30)  # now also waits for the added worker
        surge_pid = sup.pid(1)
        assert rec.of(1, "started") == [{"address": surge.address, "pid": surge_pid}]
        assert [s.index for s in sup.specs] == [0, 1]

        await sup.remove(1)
        assert surge_pid is not None and gone(surge_pid)
        (exited,) = rec.of(1, "exited")
        assert exited["returncode"] == 0 and exited["pid"] == surge_pid  # a clean SIGTERM exit
        assert [s.index for s in sup.specs] == [0]
        with pytest.raises(KeyError):
            sup.pid(1)
        with pytest.raises(ValueError, match="no worker with index 1"):
            await sup.remove(1)
        await asyncio.sleep(0.5)  # several backoff periods: nothing restarts it
        assert len(rec.of(1, "started")) == 1 and len(rec.of(1, "exited")) == 1
        assert sup.pid(0) == steady_pid and not rec.of(0, "exited")  # the other worker never noticed

        await sup.add(surge)  # the index is free again
        await rec.wait_for(lambda: len(rec.of(1, "started")) == 2)
        await sup.stop(timeout=10)
        assert [len(rec.of(i, "exited")) for i in (0, 1)] == [1, 2]
        with pytest.raises(RuntimeError, match="stopped"):
            await sup.add(WorkerSpec(5, surge.address, surge.argv, surge.env))

    LOOPS[loop](main())


def test_supervisor_remove_escalates_to_sigkill_and_interrupts_backoff(tmp_path: Path) -> None:
    rec = Recorder()
    steady, stubborn, crash = fake_specs(tmp_path, ["sleep", "stubborn", "crash"])

    async def main() -> None:
        # A 60 s backoff after the crash: remove() must not wait for it.
        sup = Supervisor([steady, stubborn, crash], rec, backoff_initial=60, backoff_max=60)
        await sup.start()
        await rec.wait_for(lambda: bool(rec.of(2, "exited")) and bool(rec.of(1, "started")))
        stubborn_pid = sup.pid(1)
        await asyncio.wait_for(sup.remove(1, timeout=0.3), 20)
        assert stubborn_pid is not None and gone(stubborn_pid)
        assert rec.of(1, "exited")[-1]["returncode"] == -signal.SIGKILL
        await asyncio.wait_for(sup.remove(2), 20)  # far less than its backoff
        assert len(rec.of(2, "started")) == 1 and sup.restarts(0) == 0
        assert [s.index for s in sup.specs] == [0] and sup.pid(0) is not None
        await sup.stop(timeout=10)

    asyncio.run(main())


def test_supervisor_forgets_a_worker_whose_removal_was_cancelled(tmp_path: Path) -> None:
    rec = Recorder()
    specs = fake_specs(tmp_path, ["stubborn"])

    async def main() -> None:
        sup = Supervisor(specs, rec, backoff_initial=0.05)
        await sup.start()
        assert await sup.wait_started(30)
        removal = asyncio.create_task(sup.remove(0, timeout=60))
        await asyncio.sleep(0)  # remove() runs up to its wait: the worker is halted and got SIGTERM
        removal.cancel()
        with pytest.raises(asyncio.CancelledError):
            await removal
        assert [s.index for s in sup.specs] == [0]  # SIGTERM was ignored: still there, not restarted
        await sup.stop(timeout=0.3)  # kills it; then it is forgotten as remove() meant
        assert sup.specs == [] and rec.of(0, "exited")[-1]["returncode"] == -signal.SIGKILL
        assert len(rec.of(0, "started")) == 1

    asyncio.run(main())


def test_supervisor_remove_during_start_up_and_during_stop(tmp_path: Path) -> None:
    rec = Recorder()
    silent, first, second = fake_specs(tmp_path, ["silent", "sleep", "sleep"])

    async def main() -> None:
        sup = Supervisor([], rec, startup_timeout=60)
        await sup.add(silent)  # before start(): started by start()
        await sup.add(first)
        await sup.start()
        await rec.wait_for(lambda: bool(rec.of(1, "started")))
        assert not await sup.wait_started(0.2)  # the silent worker never listens...
        silent_pid = sup.pid(0)
        await sup.remove(0)  # ...and is removed before it does
        assert silent_pid is not None and gone(silent_pid)
        assert len(rec.of(0, "exited")) == 1 and not rec.of(0, "started")
        assert await sup.wait_started(5)  # only the remaining workers count

        await sup.add(second)
        await rec.wait_for(lambda: bool(rec.of(2, "started")))
        pids = [sup.pid(1), sup.pid(2)]
        await asyncio.gather(sup.stop(timeout=10), sup.remove(2, timeout=10))
        assert all(pid is not None and gone(pid) for pid in pids)
        assert [len(rec.of(i, "exited")) for i in (1, 2)] == [1, 1]
        assert [s.index for s in sup.specs] == [1]

    asyncio.run(main())


# ---------------------------------------------------------------- the real worker


def test_real_worker_is_pinned_started_and_stopped(tmp_path: Path) -> None:
    allowed = numa.affinity_of(0)
    specs = worker_specs(
        1, tmp_path, numa=True, sysfs_root=numa.DEFAULT_SYSFS_NODE_ROOT, cpus_per_worker=1,
        intra_op_threads=0, inter_op_threads=0, predict_threads=1, allocator="",
    )
    (spec,) = specs
    planned = numa.plan(numa.read_topology(), 1, 1)[0].cpus
    assert spec.cpus == planned and len(planned) == 1 and set(planned) <= set(allowed)
    rec = Recorder()

    async def main() -> None:
        sup = Supervisor(specs, rec, stderr=None)
        await sup.start()
        assert await sup.wait_started(120), rec.events
        pid = sup.pid(0)
        assert pid is not None
        assert rec.of(0, "started") == [{"address": spec.address, "pid": pid}]
        assert numa.affinity_of(pid) == planned
        sock = socket_path(spec.address)
        assert sock is not None and sock.is_socket()
        await sup.stop(timeout=30)
        assert gone(pid) and sup.pid(0) is None
        assert rec.of(0, "exited")[-1]["returncode"] == 0
        assert sup.restarts(0) == 0

    asyncio.run(main())


def _installed_jemalloc() -> Path | None:
    try:
        return find_allocator("jemalloc", library_dirs())
    except ValueError:
        return None


@pytest.mark.skipif(_installed_jemalloc() is None,
                    reason="Debian's libjemalloc2 is not installed (make install installs it when run as root)")
def test_real_worker_runs_with_jemalloc_preloaded(tmp_path: Path) -> None:
    library = _installed_jemalloc()
    assert library is not None
    (spec,) = worker_specs(1, tmp_path, numa=False, allocator="jemalloc")
    assert spec.env["LD_PRELOAD"].split(":")[0] == str(library)
    rec = Recorder()

    async def main() -> None:
        sup = Supervisor([spec], rec)
        await sup.start()
        assert await sup.wait_started(120), rec.events
        pid = sup.pid(0)
        assert pid is not None
        maps = Path(f"/proc/{pid}/maps").read_text()
        await sup.stop(timeout=30)
        assert os.path.realpath(library) in maps
        assert rec.of(0, "exited")[-1]["returncode"] == 0

    asyncio.run(main())


def test_worker_specs_frames_socket(sysfs: Path, tmp_path: Path) -> None:
    plain = _specs(sysfs, tmp_path, count=2, numa=False)
    assert all("--frames-listen" not in s.argv for s in plain)
    specs = _specs(sysfs, tmp_path, count=2, numa=False, frames=True)
    for i, s in enumerate(specs):
        assert _flag(s.argv, "--frames-listen") == f"unix:{tmp_path.absolute() / f'w{i}.frames.sock'}"
