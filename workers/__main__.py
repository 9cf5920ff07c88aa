"""``python -m workers``: one TF-Serving-compatible worker process.

    python -m workers --listen 127.0.0.1:0 --model ctr=models/ctr
    python -m workers --listen unix:/tmp/w0.sock --model-config-file models.config
    python -m workers --listen unix:/tmp/w0.sock --cpus 0-3 --intra-op-threads 4

``--model NAME=BASE_PATH`` may repeat (version policy from ``--version-policy``:
``latest``, ``latest:N``, ``all`` or ``specific:1,2``); ``--model-config-file``
takes TF Serving's own models.config (text ModelServerConfig).  With neither,
the worker starts empty and waits for HandleReloadConfigRequest.  When the
port is bound the worker prints ``tfs-worker listening on ADDRESS``.
``--cpus`` pins the process before TensorFlow starts its threads.  SIGTERM
stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from google.protobuf import text_format

from protos import config_pb2
from workers import numa


def parse_policy(text: str) -> config_pb2.ServableVersionPolicy:
    policy = config_pb2.ServableVersionPolicy()
    kind, _, arg = text.partition(":")
    if kind == "latest":
        policy.latest.num_versions = int(arg or 1)
    elif kind == "all" and not arg:
        policy.all.SetInParent()
    elif kind == "specific" and arg:
        policy.specific.versions.extend(int(v) for v in arg.split(","))
    else:
        raise argparse.ArgumentTypeError(f"bad version policy {text!r}: latest[:N], all or specific:V[,V...]")
    return policy


def build_config(args: argparse.Namespace) -> config_pb2.ModelServerConfig | None:
    if args.model_config_file:
        with open(args.model_config_file, encoding="utf-8") as f:
            return text_format.Parse(f.read(), config_pb2.ModelServerConfig())
    if not args.model:
        return None
    config = config_pb2.ModelServerConfig()
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model takes NAME=BASE_PATH, got {item!r}")
        cfg = config.model_config_list.config.add(name=name, base_path=os.path.abspath(path))
        cfg.model_platform = "tensorflow"
        cfg.model_version_policy.CopyFrom(args.version_policy)
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT (port 0 picks a free one)")
    p.add_argument("--frames-listen", metavar="unix:PATH",
                   help="also serve Predict over the router's framed protocol on this Unix socket "
                        "(the router's lean transport to its spawned workers)")
    p.add_argument("--tls-cert-file", default="", help="serve gRPC over TLS with this certificate chain (PEM) ...")
    p.add_argument("--tls-key-file", default="", help="... and this key (PEM); read at start")
    p.add_argument("--tls-client-ca-file", default="",
                   help="with TLS: clients must present a certificate this CA signed (mutual TLS)")
    p.add_argument("--model", action="append", default=[], help="NAME=BASE_PATH (repeatable)")
    p.add_argument("--version-policy", type=parse_policy, default=parse_policy("latest"),
                   help="for --model: latest[:N] (default latest:1), all, specific:V[,V...]")
    p.add_argument("--model-config-file", help="TF Serving models.config (text ModelServerConfig)")
    p.add_argument("--file-system-poll-wait-seconds", type=float, default=0.0,
                   help="re-read the model base paths this often and load new versions by themselves "
                        "(as tensorflow_model_server does; 0: only at start, then as told by ReloadConfig)")
    p.add_argument("--cpus", help="pin to this CPU list (e.g. 0-3,8) before TF starts")
    p.add_argument("--mem-node", type=int, default=-1,
                   help="bind memory allocations to this NUMA node (like numactl --membind)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="TF intra-op threads (0: TF default)")
    p.add_argument("--inter-op-threads", type=int, default=0, help="TF inter-op threads (0: TF default)")
    p.add_argument("--predict-threads", type=int, default=0,
                   help="threads running TF calls; 0 (default) runs them inline on the event loop, "
                        "measured fastest (no thread hand-off per call)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256, help="gRPC concurrency bound")
    p.add_argument("--nice", type=int, default=0,
                   help="lower this process's CPU priority by N (0-19) before TF starts its threads")
    p.add_argument("--parent-pid", type=int, default=0,
                   help="exit when this process (the router) is gone, even if it was killed with SIGKILL")
    p.add_argument("--no-pacer", action="store_true",
                   help="start no pacer process: a router's request to pace a conversion is ignored")
    p.add_argument("--log-level", default="INFO")
    return p


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """An orphaned worker would hold its CPUs and memory forever; leave with the parent."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logging.getLogger("workers").warning("parent %d is gone; stopping", parent)
    stop.set()


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if bool(args.tls_cert_file) != bool(args.tls_key_file) or (args.tls_client_ca_file and not args.tls_cert_file):
        p.error("--tls-cert-file and --tls-key-file go together (and --tls-client-ca-file needs them)")
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The pacer of conversions the router asks to pace: forked now, while this
    # process has one thread and its normal priority.
    from workers.pacer import Pacer

    pacer = None if args.no_pacer else Pacer.start()
    if args.nice:
        # Threads inherit the niceness of the thread that creates them, so this
        # must run before TF or gRPC start theirs.
        os.setpriority(os.PRIO_PROCESS, 0, max(0, min(19, args.nice)))
    if args.cpus:
        # Before TensorFlow is imported: affinity is inherited only by threads
        # created afterwards.
        numa.pin_current_process(numa.parse_cpulist(args.cpus))
    if args.mem_node >= 0:
        try:
            numa.bind_memory(args.mem_node)
        except OSError as exc:
            # Serving still works, only without the memory policy: say so loudly.
            logging.getLogger("workers").warning("memory NOT bound to node %d: %s", args.mem_node, exc)
    config = build_config(args)

    from workers import runtime, server  # imports TensorFlow

    runtime.start_threads(args.intra_op_threads or None, args.inter_op_threads or None)

    def on_bound(address: str) -> None:
        print(f"tfs-worker listening on {address}", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watch = loop.create_task(_watch_parent(args.parent_pid, stop)) if args.parent_pid else None
        await server.serve(
            args.listen,
            config,
            predict_threads=args.predict_threads,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            poll_s=args.file_system_poll_wait_seconds,
            on_bound=on_bound,
            stop=stop,
            pacer=pacer,
            frames_listen=args.frames_listen,
            credentials=server.tls_credentials(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
            if args.tls_cert_file else None,
        )
        if watch is not None:
            watch.cancel()

    import uvloop

    try:
        uvloop.run(run())
    finally:
        if pacer is not None:
            pacer.close()


if __name__ == "__main__":
    main()
