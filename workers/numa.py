"""NUMA-aware placement of worker processes.

Each worker process owns a TensorFlow runtime. Pinning a worker to the CPUs of
one NUMA node (and binding its memory to that node) keeps its tensors in local
memory and stops the kernel scheduler from bouncing its threads across sockets,
which is where most of the tail latency of CPU inference comes from. Sizing TF's
intra/inter-op thread pools to the worker's CPU share keeps workers from
oversubscribing the CPUs they share a node with.

The module is split in two on purpose:

* **Policy** (:func:`parse_cpulist`, :func:`format_cpulist`,
  :func:`read_topology`, :func:`plan`, :func:`numactl_command`) is pure code.
  The sysfs root and the allowed CPU set are injectable, so placement can be
  tested against fake topologies without a multi-socket machine.
* **Mechanism** (:func:`find_numactl`, :func:`launch_prefix`,
  :func:`pin_current_process`, :func:`affinity_of`) is a thin layer over
  ``numactl`` and ``os.sched_*affinity`` at the edge.

This module must not import TensorFlow: the router imports it to plan placement
and never loads a TF runtime itself.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_SYSFS_NODE_ROOT",
    "Node",
    "Placement",
    "affinity_of",
    "find_numactl",
    "format_cpulist",
    "launch_prefix",
    "numactl_command",
    "parse_cpulist",
    "pin_current_process",
    "plan",
    "read_topology",
]

DEFAULT_SYSFS_NODE_ROOT = "/sys/devices/system/node"

# One item of a cpulist: "N" or "A-B". ASCII digits only: ``int()`` would
# happily accept other Unicode digits, which the kernel never writes.
_CPULIST_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)
_NODE_DIR = re.compile(r"node([0-9]+)", re.ASCII)


# --------------------------------------------------------------------------
# cpulist format
# --------------------------------------------------------------------------


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the Linux cpulist format (``"0-3,8-11"``) into sorted unique CPU ids.

    This is the format of ``/sys/devices/system/node/node*/cpulist``,
    ``/proc/self/status`` (``Cpus_allowed_list``) and cgroup ``cpuset.cpus``.
    An empty string (or only whitespace, as in a memory-only node's
    ``"\\n"``) is the empty set. Whitespace around the list and around items
    is tolerated because sysfs files end in a newline.

    The kernel's input-only stride syntax (``"0-15:2/4"``) is rejected: sysfs
    never prints it, and silently mis-reading it would pin workers to the
    wrong CPUs.

    Raises ValueError on anything malformed (empty items, descending ranges,
    signs, non-digits) rather than guessing, for the same reason.
    """
    stripped = text.strip()
    if not stripped:
        return ()
    cpus: set[int] = set()
    for raw in stripped.split(","):
        item = raw.strip()
        match = _CPULIST_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"malformed cpulist item {raw!r} in {text!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"descending cpulist range {item!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPU ids in the compact cpulist form the kernel and numactl use.

    Runs of consecutive ids collapse to ``"A-B"`` (``[0, 1, 2, 3, 6]`` ->
    ``"0-3,6"``); input order and duplicates don't matter, so
    ``parse_cpulist(format_cpulist(x)) == tuple(sorted(set(x)))``. The empty
    set formats as ``""``.

    Raises ValueError on negative ids, which no cpulist can express.
    """
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ValueError(f"negative CPU id {ordered[0]}")
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------


def _normalize_cpus(cpus: Iterable[int]) -> tuple[int, ...]:
    normalized = tuple(sorted(set(cpus)))
    if normalized and normalized[0] < 0:
        raise ValueError(f"negative CPU id {normalized[0]}")
    return normalized


@dataclass(frozen=True)
class Node:
    """A NUMA node as seen by this process: its id and the CPUs we may use on it.

    ``cpus`` is normalized to a sorted tuple of unique ids so that nodes built
    from lists or unsorted input compare, hash and slice deterministically.
    """

    id: int
    cpus: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.id < 0:
            raise ValueError(f"negative NUMA node id {self.id}")
        object.__setattr__(self, "cpus", _normalize_cpus(self.cpus))


def _allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its cpuset/affinity, not the host's)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:  # not Linux: no affinity API, assume all CPUs
        return tuple(range(os.cpu_count() or 1))
    return tuple(sorted(getaffinity(0)))


def read_topology(
    root: str | Path = DEFAULT_SYSFS_NODE_ROOT,
    allowed: Iterable[int] | None = None,
) -> tuple[Node, ...]:
    """Read the NUMA topology from sysfs, restricted to the CPUs we may use.

    Reads ``<root>/node<N>/cpulist`` for every ``node<N>`` directory, sorted
    by N (numerically, so node10 follows node9). Other entries (``possible``,
    ``online``, ``power``, ...) are ignored.

    CPUs not in ``allowed`` (default: this process's affinity mask) are
    dropped, because in a container or under a cgroup cpuset sysfs still
    describes the whole host, and pinning to a CPU outside our cpuset fails
    with EINVAL. Nodes left without CPUs (memory-only nodes, or nodes entirely
    outside our cpuset) are dropped too: a worker can't run there.

    When ``root`` doesn't exist or contains no node directories (non-NUMA
    kernels, some containers and sandboxes), the machine is treated as a
    single node 0 holding every allowed CPU.

    Raises ValueError if ``allowed`` is empty, or if nodes exist but none of
    them holds an allowed CPU (sysfs and the affinity mask disagree, so any
    placement would be wrong).
    """
    allowed_set = set(_allowed_cpus() if allowed is None else allowed)
    if not allowed_set:
        raise ValueError("no allowed CPUs")
    root_path = Path(root)

    node_dirs: list[tuple[int, Path]] = []
    if root_path.is_dir():
        for entry in root_path.iterdir():
            match = _NODE_DIR.fullmatch(entry.name)
            if match is not None and entry.is_dir():
                node_dirs.append((int(match.group(1)), entry))
    if not node_dirs:
        return (Node(0, tuple(allowed_set)),)

    nodes: list[Node] = []
    for node_id, path in sorted(node_dirs):
        try:
            text = (path / "cpulist").read_text()
        except FileNotFoundError:
            continue  # no cpulist: nothing to run on
        cpus = [cpu for cpu in parse_cpulist(text) if cpu in allowed_set]
        if cpus:
            nodes.append(Node(node_id, tuple(cpus)))
    if not nodes:
        raise ValueError(
            f"none of the allowed CPUs {format_cpulist(allowed_set)} "
            f"belongs to a NUMA node under {root_path}"
        )
    return tuple(nodes)


# --------------------------------------------------------------------------
# Placement policy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one worker runs and how big its TF thread pools are.

    ``intra_op_threads`` equals the worker's CPU count so one op can use
    every CPU it owns without oversubscribing them; ``inter_op_threads`` is
    kept small (1 or 2) because a serving worker runs mostly one request's
    graph at a time and extra inter-op threads only contend for the same CPUs.
    """

    worker: int
    node: int
    cpus: tuple[int, ...]
    intra_op_threads: int
    inter_op_threads: int

    def __post_init__(self) -> None:
        cpus = _normalize_cpus(self.cpus)
        if not cpus:
            raise ValueError(f"worker {self.worker} placed on no CPUs")
        object.__setattr__(self, "cpus", cpus)


def _workers_per_node(topology: Sequence[Node], workers: int) -> list[int]:
    """Spread ``workers`` over the nodes so counts differ by at most one.

    The remainder goes to the nodes with the most CPUs (ties: lower position
    in ``topology``), so on lopsided topologies (e.g. a cpuset holding 2 CPUs
    of node0 and 8 of node1) the extra workers land where they can get CPUs
    of their own instead of sharing.
    """
    base, extra = divmod(workers, len(topology))
    counts = [base] * len(topology)
    by_size = sorted(range(len(topology)), key=lambda i: (-len(topology[i].cpus), i))
    for i in by_size[:extra]:
        counts[i] += 1
    return counts


def _slice_starts(n_cpus: int, k: int) -> list[int]:
    """Offsets of ``k`` nearly equal contiguous slices of ``n_cpus`` CPUs.

    With k <= n the first ``n % k`` slices are one CPU longer. With k > n
    there aren't enough CPUs for disjoint slices; worker j starts at CPU
    ``j % n``, so every worker still gets a CPU and each CPU is shared by
    ``floor(k/n)`` or ``ceil(k/n)`` workers (round-robin), rather than piling
    the surplus onto the first CPUs.
    """
    if k > n_cpus:
        return [j % n_cpus for j in range(k)]
    size, longer = divmod(n_cpus, k)
    starts: list[int] = []
    offset = 0
    for j in range(k):
        starts.append(offset)
        offset += size + (1 if j < longer else 0)
    return starts


def _threads(n_cpus: int) -> tuple[int, int]:
    return n_cpus, (1 if n_cpus <= 2 else 2)


def plan(
    topology: Sequence[Node],
    workers: int,
    cpus_per_worker: int | None = None,
    *,
    share_node: bool = False,
) -> tuple[Placement, ...]:
    """Assign ``workers`` worker processes to NUMA nodes and CPU slices.

    Workers are spread over the nodes as evenly as possible (per-node counts
    differ by at most one; see :func:`_workers_per_node`) and numbered in
    contiguous groups per node, in topology order: with 4 workers on two
    8-CPU nodes, workers 0 and 1 get CPUs 0-3 and 4-7 of node 0, workers 2 and
    3 the two halves of node 1. Contiguous slices of the node's sorted CPU
    list keep SMT siblings and cache-sharing CPUs together when the kernel
    numbers them adjacently, and keep worker ids stable per node.

    Within a node with ``n`` CPUs and ``k`` workers:

    * ``k <= n``: ``k`` disjoint contiguous slices whose sizes differ by at
      most one, covering all ``n`` CPUs.
    * ``k > n``: oversubscribed; each worker gets one CPU, assigned
      round-robin (worker j of the node gets CPU ``j % n``). Every worker
      gets at least one CPU and sharing is as even as it can be.

    With ``cpus_per_worker = c`` each worker gets exactly ``c`` CPUs, taken
    from the start of its slice above (wrapping around the node's CPU list if
    needed). When ``k * c <= n`` the blocks are disjoint (every slice has at
    least ``c`` CPUs) and the left-over CPUs are spread between them; when
    ``k * c > n`` blocks overlap, which is the caller's explicit choice.

    With ``share_node=True`` (and no ``cpus_per_worker``) there are no
    slices: every worker of a node may run on all of the node's CPUs and the
    kernel balances them; memory stays bound to the node.  That suits workers
    that share their cores with the router: a low-priority worker pinned to
    one CPU waits whenever the router runs there, even while another CPU of
    the node is idle (measured here: c=64 p99 57 ms pinned, 37 ms shared).

    TF thread pools are sized to the CPU share: ``intra_op_threads`` is the
    worker's CPU count (with ``share_node``, the node's CPUs divided by its
    workers, at least 1), ``inter_op_threads`` is 1 for one or two CPUs and 2
    otherwise.

    Raises ValueError when ``workers < 1``, ``cpus_per_worker < 1``, the
    topology is empty, has duplicate node ids or an empty node, or a node
    that receives workers has fewer than ``cpus_per_worker`` CPUs.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cpus_per_worker is not None and cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
    if not topology:
        raise ValueError("empty topology: no NUMA node to place workers on")
    ids = [node.id for node in topology]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate NUMA node ids in topology: {ids}")
    for node in topology:
        if not node.cpus:
            raise ValueError(f"NUMA node {node.id} has no CPUs")

    placements: list[Placement] = []
    worker = 0
    for node, k in zip(topology, _workers_per_node(topology, workers)):
        if k == 0:
            continue
        n = len(node.cpus)
        if share_node and cpus_per_worker is None:
            intra, inter = _threads(max(1, n // k))
            for _ in range(k):
                placements.append(Placement(worker, node.id, node.cpus, intra, inter))
                worker += 1
            continue
        starts = _slice_starts(n, k)
        if cpus_per_worker is None:
            ends = [*starts[1:], n] if k <= n else [s + 1 for s in starts]
            slices = [node.cpus[s:e] for s, e in zip(starts, ends)]
        else:
            if cpus_per_worker > n:
                raise ValueError(
                    f"NUMA node {node.id} has {n} CPUs, "
                    f"fewer than cpus_per_worker={cpus_per_worker}"
                )
            slices = [
                tuple(node.cpus[(s + t) % n] for t in range(cpus_per_worker))
                for s in starts
            ]
        for cpus in slices:
            intra, inter = _threads(len(cpus))
            placements.append(Placement(worker, node.id, cpus, intra, inter))
            worker += 1
    return tuple(placements)


def numactl_command(placement: Placement, numactl: str) -> list[str]:
    """The ``numactl`` prefix that pins a worker's CPUs and memory to its node.

    Returns ``[numactl, "--physcpubind=<cpulist>", "--membind=<node>"]``; the
    caller appends the worker's own argv. ``--physcpubind`` takes absolute CPU
    ids, which is what :func:`read_topology` yields; ``--membind`` makes
    allocations fail over to nothing rather than silently to a remote node.
    """
    return [
        numactl,
        f"--physcpubind={format_cpulist(placement.cpus)}",
        f"--membind={placement.node}",
    ]


# --------------------------------------------------------------------------
# Mechanism
# --------------------------------------------------------------------------


def find_numactl() -> str | None:
    """Path of the ``numactl`` executable on PATH, or None if it isn't installed."""
    return shutil.which("numactl")


def launch_prefix(placement: Placement, use_numactl: bool = True) -> list[str]:
    """The argv prefix to launch a worker with, or ``[]`` to pin it ourselves.

    numactl is preferred when present because it sets the memory policy as
    well as the CPU set. When it's absent (or disabled) the result is ``[]``
    and the caller pins the CPU set with :func:`pin_current_process`; memory
    then follows Linux's default first-touch policy, which is node-local in
    practice once the worker only runs on that node's CPUs.
    """
    if not use_numactl:
        return []
    numactl = find_numactl()
    if numactl is None:
        return []
    return numactl_command(placement, numactl)


def pin_current_process(cpus: Sequence[int]) -> None:
    """Restrict the calling process to ``cpus`` (``sched_setaffinity(0, ...)``).

    Meant for a child's ``preexec_fn`` or the first lines of a worker's
    start-up, *before* TensorFlow is imported: affinity is per thread and only
    inherited by threads created afterwards, so TF's thread pools must be
    spawned after the pin to be covered by it.

    Raises ValueError for an empty CPU set (the kernel would reject it with
    a less helpful EINVAL); OSError from the kernel otherwise propagates.
    """
    cpu_set = set(cpus)
    if not cpu_set:
        raise ValueError("cannot pin a process to an empty CPU set")
    os.sched_setaffinity(0, cpu_set)


_MPOL_BIND = 2
_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}  # syscall numbers


def bind_memory(node: int) -> None:
    """Bind this process's future allocations to ``node`` (what ``numactl --membind`` does).

    Uses the set_mempolicy system call directly, so no numactl/libnuma is
    needed.  Threads inherit the policy of the thread that creates them:
    call before TensorFlow starts its threads.  Raises OSError when the
    kernel refuses (no NUMA support, a node without memory, a container
    without CAP_SYS_NICE).
    """
    import ctypes
    import platform

    number = _SET_MEMPOLICY.get(platform.machine())
    if number is None:
        raise OSError(f"set_mempolicy: unsupported architecture {platform.machine()}")
    if not 0 <= node < 64:
        raise ValueError(f"node {node} out of range")
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_ulong(1 << node)
    if libc.syscall(number, _MPOL_BIND, ctypes.byref(mask), 64) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy(MPOL_BIND, node {node}): {os.strerror(err)}")


def affinity_of(pid: int) -> tuple[int, ...]:
    """The sorted CPU ids ``pid`` may run on (0 means the calling process)."""
    return tuple(sorted(os.sched_getaffinity(pid)))
