"""Tests for workers.numa: cpulist parsing, topology reading, placement policy,
and (on this machine) actually pinning child processes."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import numa
from workers.numa import (
    Node,
    Placement,
    affinity_of,
    find_numactl,
    format_cpulist,
    launch_prefix,
    numactl_command,
    parse_cpulist,
    pin_current_process,
    plan,
    read_topology,
)

# No example database: keep test runs from writing .hypothesis/ into the repo.
PROPERTY = settings(database=None, max_examples=300, deadline=None)


# ---------------------------------------------------------------- cpulist


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("\n", ()),
        ("0", (0,)),
        ("0\n", (0,)),
        ("0-3", (0, 1, 2, 3)),
        ("0-3,8-11\n", (0, 1, 2, 3, 8, 9, 10, 11)),
        ("  2-3 , 0 \n", (0, 2, 3)),
        ("5,1-2,2,1", (1, 2, 5)),
        ("7-7", (7,)),
        ("0-1,64", (0, 1, 64)),
    ],
)
def test_parse_cpulist(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize(
    "text",
    ["a", "1-", "-1", "3-1", "1,,2", "1,", ",1", "1-2-3", "0-15:2/4", "+1", "1 2", "٣", "0x1"],
)
def test_parse_cpulist_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ([], ""),
        ([0], "0"),
        ([0, 1], "0-1"),
        ([0, 1, 2, 3, 6], "0-3,6"),
        ([6, 3, 2, 1, 0, 3], "0-3,6"),
        ([1, 3, 5], "1,3,5"),
        ([0, 1, 2, 8, 9, 10, 11, 20], "0-2,8-11,20"),
    ],
)
def test_format_cpulist(cpus: list[int], expected: str) -> None:
    assert format_cpulist(cpus) == expected


def test_format_cpulist_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_cpulist([-1, 0])


@PROPERTY
@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_cpulist_round_trip(cpus: set[int]) -> None:
    text = format_cpulist(cpus)
    assert parse_cpulist(text) == tuple(sorted(cpus))
    assert parse_cpulist(text + "\n") == tuple(sorted(cpus))
    # compact: no two consecutive items could have been merged
    assert format_cpulist(parse_cpulist(text)) == text


# ---------------------------------------------------------------- topology


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A fake /sys/devices/system/node with two 4-CPU nodes plus noise."""
    root = tmp_path / "node"
    for name, cpulist in [("node0", "0-3\n"), ("node1", "4-7\n")]:
        (root / name).mkdir(parents=True)
        (root / name / "cpulist").write_text(cpulist)
    (root / "possible").write_text("0-1\n")
    (root / "online").write_text("0-1\n")
    (root / "has_cpu").write_text("0-1\n")
    (root / "power").mkdir()
    (root / "power" / "cpulist").write_text("0-7\n")  # must not be read as a node
    return root


def test_read_topology_two_nodes(sysfs: Path) -> None:
    assert read_topology(sysfs, allowed=range(8)) == (
        Node(0, (0, 1, 2, 3)),
        Node(1, (4, 5, 6, 7)),
    )
    assert read_topology(str(sysfs), allowed=range(8)) == read_topology(sysfs, allowed=range(8))


def test_read_topology_drops_disallowed_cpus_and_empty_nodes(sysfs: Path) -> None:
    assert read_topology(sysfs, allowed=[1, 3, 4, 5, 6, 7, 99]) == (
        Node(0, (1, 3)),
        Node(1, (4, 5, 6, 7)),
    )
    # node0 entirely outside the cpuset disappears
    assert read_topology(sysfs, allowed=[5, 6]) == (Node(1, (5, 6)),)


def test_read_topology_sorts_nodes_numerically_and_skips_memory_only(tmp_path: Path) -> None:
    for n, cpulist in [(10, "20-21"), (2, "4-5"), (9, "\n"), (0, "0-1")]:
        (tmp_path / f"node{n}").mkdir()
        (tmp_path / f"node{n}" / "cpulist").write_text(cpulist)
    (tmp_path / "node3").mkdir()  # no cpulist at all
    (tmp_path / "node4").write_text("")  # a file, not a node directory
    (tmp_path / "nodeX").mkdir()
    topo = read_topology(tmp_path, allowed=range(64))
    assert [node.id for node in topo] == [0, 2, 10]
    assert topo[2].cpus == (20, 21)


def test_read_topology_without_numa_info_is_one_node(tmp_path: Path) -> None:
    assert read_topology(tmp_path / "missing", allowed=[3, 1, 2]) == (Node(0, (1, 2, 3)),)
    assert read_topology(tmp_path, allowed=[0]) == (Node(0, (0,)),)  # exists, no nodes


def test_read_topology_errors(sysfs: Path) -> None:
    with pytest.raises(ValueError):
        read_topology(sysfs, allowed=[])
    with pytest.raises(ValueError):  # sysfs and affinity disagree entirely
        read_topology(sysfs, allowed=[100, 101])
    (sysfs / "node0" / "cpulist").write_text("zero-three\n")
    with pytest.raises(ValueError):
        read_topology(sysfs, allowed=range(8))


def test_read_topology_default_allowed_uses_affinity(sysfs: Path) -> None:
    allowed = affinity_of(0)
    topo = read_topology(sysfs)
    assert sorted(cpu for node in topo for cpu in node.cpus) == [c for c in allowed if c < 8]


def test_read_topology_on_this_machine() -> None:
    """The real sysfs: every allowed CPU is placed, on exactly one node."""
    allowed = affinity_of(0)
    topo = read_topology()
    cpus = [cpu for node in topo for cpu in node.cpus]
    assert sorted(cpus) == list(allowed)
    assert len(cpus) == len(set(cpus))
    real = Path(numa.DEFAULT_SYSFS_NODE_ROOT)
    if not real.is_dir() or len(list(real.glob("node[0-9]*"))) <= 1:
        assert topo == (Node(topo[0].id, allowed),)


def test_node_normalizes_cpus() -> None:
    node = Node(0, [3, 1, 1, 2])  # type: ignore[arg-type]
    assert node.cpus == (1, 2, 3)
    assert node == Node(0, (1, 2, 3))
    hash(node)
    with pytest.raises(ValueError):
        Node(0, (-1,))
    with pytest.raises(ValueError):
        Node(-1, (0,))


# ---------------------------------------------------------------- plan

TWO_NODES = (Node(0, (0, 1, 2, 3)), Node(1, (4, 5, 6, 7)))


def _layout(placements: tuple[Placement, ...]) -> list[tuple[int, tuple[int, ...]]]:
    assert [p.worker for p in placements] == list(range(len(placements)))
    return [(p.node, p.cpus) for p in placements]


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        (1, [(0, (0, 1, 2, 3))]),
        (2, [(0, (0, 1, 2, 3)), (1, (4, 5, 6, 7))]),
        (3, [(0, (0, 1)), (0, (2, 3)), (1, (4, 5, 6, 7))]),
        (4, [(0, (0, 1)), (0, (2, 3)), (1, (4, 5)), (1, (6, 7))]),
        (5, [(0, (0, 1)), (0, (2,)), (0, (3,)), (1, (4, 5)), (1, (6, 7))]),
        (8, [(0, (c,)) for c in range(4)] + [(1, (c,)) for c in range(4, 8)]),
        (
            16,
            [(0, (c % 4,)) for c in range(8)] + [(1, (4 + c % 4,)) for c in range(8)],
        ),
    ],
)
def test_plan_two_nodes(workers: int, expected: list[tuple[int, tuple[int, ...]]]) -> None:
    placements = plan(TWO_NODES, workers)
    assert _layout(placements) == expected
    for p in placements:
        assert p.intra_op_threads == len(p.cpus)
        assert p.inter_op_threads == (1 if len(p.cpus) <= 2 else 2)


def test_plan_design_example() -> None:
    """4 workers on 2 nodes of 8 CPUs: w0,w1 on node0 (0-3, 4-7), w2,w3 on node1."""
    topo = (Node(0, tuple(range(8))), Node(1, tuple(range(8, 16))))
    placements = plan(topo, 4)
    assert _layout(placements) == [
        (0, (0, 1, 2, 3)),
        (0, (4, 5, 6, 7)),
        (1, (8, 9, 10, 11)),
        (1, (12, 13, 14, 15)),
    ]
    assert [(p.intra_op_threads, p.inter_op_threads) for p in placements] == [(4, 2)] * 4


def test_plan_thread_counts() -> None:
    single = (Node(0, tuple(range(8))),)
    assert [(p.intra_op_threads, p.inter_op_threads) for p in plan(single, 1)] == [(8, 2)]
    assert {(p.intra_op_threads, p.inter_op_threads) for p in plan(single, 4)} == {(2, 1)}
    assert [(p.intra_op_threads, p.inter_op_threads) for p in plan(single, 3)] == [
        (3, 2),
        (3, 2),
        (2, 1),
    ]
    assert {(p.intra_op_threads, p.inter_op_threads) for p in plan(single, 8)} == {(1, 1)}


def test_plan_share_node_gives_every_worker_its_whole_node() -> None:
    topo = (Node(0, (0, 1, 4, 5)), Node(1, (2, 3, 6, 7)))
    shared = plan(topo, 5, share_node=True)
    assert _layout(shared) == [
        (0, (0, 1, 4, 5)), (0, (0, 1, 4, 5)), (0, (0, 1, 4, 5)),
        (1, (2, 3, 6, 7)), (1, (2, 3, 6, 7)),
    ]
    assert [p.worker for p in shared] == [0, 1, 2, 3, 4]
    # TF threads sized to the worker's share of its node: 4 CPUs / 3 workers -> 1, 4 / 2 -> 2.
    assert [p.intra_op_threads for p in shared] == [1, 1, 1, 2, 2]
    # An explicit slice size still slices.
    assert _layout(plan(topo, 2, 1, share_node=True)) == [(0, (0,)), (1, (2,))]


def test_plan_extra_workers_go_to_bigger_nodes() -> None:
    # a cpuset holding 1 CPU of node0 and 8 of node1: the third worker shouldn't share CPU 0
    topo = (Node(0, (0,)), Node(1, tuple(range(8, 16))))
    assert _layout(plan(topo, 3)) == [
        (0, (0,)),
        (1, (8, 9, 10, 11)),
        (1, (12, 13, 14, 15)),
    ]


def test_plan_preserves_non_contiguous_node_cpus() -> None:
    # SMT siblings numbered far apart (node0: 0-1 and 4-5)
    topo = (Node(0, (0, 1, 4, 5)), Node(1, (2, 3, 6, 7)))
    assert _layout(plan(topo, 4)) == [(0, (0, 1)), (0, (4, 5)), (1, (2, 3)), (1, (6, 7))]
    assert numactl_command(plan(topo, 2)[1], "numactl")[1] == "--physcpubind=2-3,6-7"


def test_plan_cpus_per_worker() -> None:
    # fits: blocks are disjoint, taken from each worker's slice start
    assert _layout(plan(TWO_NODES, 2, cpus_per_worker=2)) == [(0, (0, 1)), (1, (4, 5))]
    assert _layout(plan(TWO_NODES, 4, cpus_per_worker=1)) == [
        (0, (0,)),
        (0, (2,)),
        (1, (4,)),
        (1, (6,)),
    ]
    eight = (Node(0, tuple(range(8))),)
    assert _layout(plan(eight, 3, cpus_per_worker=2)) == [(0, (0, 1)), (0, (3, 4)), (0, (6, 7))]
    # doesn't fit: blocks overlap, wrapping around the node's CPUs
    assert _layout(plan(eight, 3, cpus_per_worker=4)) == [
        (0, (0, 1, 2, 3)),
        (0, (3, 4, 5, 6)),
        (0, (0, 1, 6, 7)),
    ]
    assert _layout(plan(TWO_NODES, 1, cpus_per_worker=4)) == [(0, (0, 1, 2, 3))]
    for p in plan(TWO_NODES, 3, cpus_per_worker=3):
        assert len(p.cpus) == 3
        assert (p.intra_op_threads, p.inter_op_threads) == (3, 2)


def test_plan_cpus_per_worker_larger_than_node() -> None:
    with pytest.raises(ValueError, match="cpus_per_worker"):
        plan(TWO_NODES, 2, cpus_per_worker=5)
    # only nodes that receive workers need to be big enough
    lopsided = (Node(0, tuple(range(8))), Node(1, (8,)))
    assert _layout(plan(lopsided, 1, cpus_per_worker=6)) == [(0, tuple(range(6)))]
    with pytest.raises(ValueError):
        plan(lopsided, 2, cpus_per_worker=6)


@pytest.mark.parametrize(
    ("topology", "workers", "cpus_per_worker"),
    [
        ((), 1, None),
        (TWO_NODES, 0, None),
        (TWO_NODES, -1, None),
        (TWO_NODES, 1, 0),
        (TWO_NODES, 1, -2),
        ((Node(0, (0,)), Node(0, (1,))), 1, None),  # duplicate node id
        ((Node(0, ()),), 1, None),  # node without CPUs
    ],
)
def test_plan_errors(
    topology: tuple[Node, ...], workers: int, cpus_per_worker: int | None
) -> None:
    with pytest.raises(ValueError):
        plan(topology, workers, cpus_per_worker)


def test_placement_is_frozen_and_validated() -> None:
    p = plan(TWO_NODES, 1)[0]
    with pytest.raises(AttributeError):
        p.node = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        Placement(0, 0, (), 1, 1)


@st.composite
def topologies(draw: st.DrawFn) -> tuple[Node, ...]:
    """1-4 nodes with 1-16 CPUs each; CPU ids disjoint, arbitrary (not contiguous)."""
    sizes = draw(st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=4))
    ids = draw(
        st.lists(
            st.integers(min_value=0, max_value=255),
            unique=True,
            min_size=sum(sizes),
            max_size=sum(sizes),
        )
    )
    node_ids = draw(
        st.lists(
            st.integers(min_value=0, max_value=63), unique=True, min_size=len(sizes), max_size=len(sizes)
        )
    )
    nodes = []
    offset = 0
    for node_id, size in zip(node_ids, sizes):
        nodes.append(Node(node_id, tuple(ids[offset : offset + size])))
        offset += size
    return tuple(nodes)


def _check_invariants(
    topo: tuple[Node, ...], workers: int, placements: tuple[Placement, ...]
) -> dict[int, list[Placement]]:
    by_id = {node.id: node for node in topo}
    assert [p.worker for p in placements] == list(range(workers))
    per_node: dict[int, list[Placement]] = {node.id: [] for node in topo}
    for p in placements:
        assert p.cpus
        assert set(p.cpus) <= set(by_id[p.node].cpus)
        assert p.intra_op_threads == len(p.cpus)
        assert p.inter_op_threads == (1 if len(p.cpus) <= 2 else 2)
        per_node[p.node].append(p)
    counts = [len(ps) for ps in per_node.values()]
    assert max(counts) - min(counts) <= 1
    # workers of one node are numbered contiguously, nodes in topology order
    assert [p.node for p in placements] == sorted(
        (p.node for p in placements), key=[n.id for n in topo].index
    )
    return per_node


@PROPERTY
@given(topologies(), st.integers(min_value=1, max_value=32))
def test_plan_properties(topo: tuple[Node, ...], workers: int) -> None:
    placements = plan(topo, workers)
    per_node = _check_invariants(topo, workers, placements)
    total_cpus = sum(len(node.cpus) for node in topo)
    for node in topo:
        ps = per_node[node.id]
        if not ps:
            continue
        if len(ps) <= len(node.cpus):
            if workers <= total_cpus:
                seen: set[int] = set()
                for p in ps:
                    assert seen.isdisjoint(p.cpus)
                    seen.update(p.cpus)
            # slices cover the node and are nearly equal
            assert sorted(c for p in ps for c in p.cpus) == list(node.cpus)
            sizes = [len(p.cpus) for p in ps]
            assert max(sizes) - min(sizes) <= 1
        else:
            # oversubscribed: one CPU each, every CPU used, shared evenly
            assert all(len(p.cpus) == 1 for p in ps)
            uses = [sum(p.cpus == (c,) for p in ps) for c in node.cpus]
            assert max(uses) - min(uses) <= 1


@PROPERTY
@given(topologies(), st.integers(min_value=1, max_value=32), st.integers(min_value=1, max_value=16))
def test_plan_cpus_per_worker_properties(
    topo: tuple[Node, ...], workers: int, cpus_per_worker: int
) -> None:
    try:
        placements = plan(topo, workers, cpus_per_worker)
    except ValueError:
        # only legitimate when a node that gets workers is too small
        counts = [len(p) for p in _check_invariants(topo, workers, plan(topo, workers)).values()]
        assert any(
            k > 0 and len(node.cpus) < cpus_per_worker for node, k in zip(topo, counts)
        )
        return
    per_node = _check_invariants(topo, workers, placements)
    for node in topo:
        ps = per_node[node.id]
        assert all(len(p.cpus) == cpus_per_worker for p in ps)
        if len(ps) * cpus_per_worker <= len(node.cpus):
            seen: set[int] = set()
            for p in ps:
                assert seen.isdisjoint(p.cpus)
                seen.update(p.cpus)


# ---------------------------------------------------------------- mechanism


def test_numactl_command() -> None:
    p = Placement(worker=3, node=1, cpus=(4, 5, 6, 7, 10), intra_op_threads=5, inter_op_threads=2)
    assert numactl_command(p, "/usr/bin/numactl") == [
        "/usr/bin/numactl",
        "--physcpubind=4-7,10",
        "--membind=1",
    ]


def test_launch_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    p = plan(TWO_NODES, 2)[1]
    monkeypatch.setattr(numa.shutil, "which", lambda name: None)
    assert find_numactl() is None
    assert launch_prefix(p) == []
    monkeypatch.setattr(numa.shutil, "which", lambda name: f"/opt/bin/{name}")
    assert find_numactl() == "/opt/bin/numactl"
    assert launch_prefix(p) == ["/opt/bin/numactl", "--physcpubind=4-7", "--membind=1"]
    assert launch_prefix(p, use_numactl=False) == []


def test_pin_current_process_rejects_empty() -> None:
    with pytest.raises(ValueError):
        pin_current_process([])


def test_module_does_not_import_tensorflow() -> None:
    code = "import sys, workers.numa; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(numa.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _wait_for_affinity(pid: int, expected: tuple[int, ...], timeout: float = 10.0) -> tuple[int, ...]:
    deadline = time.monotonic() + timeout
    while True:
        got = affinity_of(pid)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def _stop(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait(timeout=10)


def test_pin_child_process_with_preexec_fn() -> None:
    before = affinity_of(0)
    cpu = before[-1]
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        preexec_fn=functools.partial(pin_current_process, [cpu]),
    )
    try:
        # preexec_fn runs before exec, so the pin is in place as soon as Popen returns
        assert affinity_of(child.pid) == (cpu,)
    finally:
        _stop(child)
    assert affinity_of(0) == before  # preexec_fn ran in the child only


def test_pin_at_worker_start_up() -> None:
    """Without preexec_fn: the worker pins itself first thing, as a worker main would."""
    cpu = affinity_of(0)[0]
    code = (
        "import sys, time; from workers.numa import pin_current_process, affinity_of; "
        f"pin_current_process([{cpu}]); print(affinity_of(0), flush=True); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(numa.__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().decode().strip() == f"({cpu},)"
        assert affinity_of(child.pid) == (cpu,)
    finally:
        _stop(child)
        assert child.stdout is not None
        child.stdout.close()


@pytest.mark.skipif(find_numactl() is None, reason="numactl is not installed on this machine")
def test_numactl_command_pins_child() -> None:
    numactl = find_numactl()
    assert numactl is not None
    topo = read_topology()
    node = topo[-1]
    placement = Placement(0, node.id, (node.cpus[-1],), 1, 1)
    child = subprocess.Popen(
        [*numactl_command(placement, numactl), sys.executable, "-c", "import time; time.sleep(30)"],
        stderr=subprocess.PIPE,
    )
    try:
        # numactl sets the affinity and then execs python in the same pid; poll past the exec
        got = _wait_for_affinity(child.pid, placement.cpus)
        if child.poll() is not None:
            assert child.stderr is not None
            pytest.fail(f"numactl exited {child.returncode}: {child.stderr.read().decode()}")
        assert got == placement.cpus
    finally:
        _stop(child)
        assert child.stderr is not None
        child.stderr.close()
