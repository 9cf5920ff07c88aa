"""``tfs-router``: run the router (``serve``), or operate a running one.

    tfs-router serve                                  # embedded configs/local.yaml
    tfs-router serve --config configs/local.yaml
    tfs-router serve --model-name ctr --model-base-path models/ctr --workers 2
    tfs-router serve --static 10.0.0.5:8500 --model-name ctr --model-base-path /models/ctr
    tfs-router serve --port 8500 --model_config_file models.config --enable_batching   # TF Serving's flags
    tfs-router status | rollout MODEL [--version V] [--watch] | rollback MODEL | abort | drain W | undrain W

Quick flags override the config file; with --model-name/--model-base-path no
config file is needed.  A command line with any of tensorflow_model_server's
own flags (``--port``, ``--model_config_file``, ...) is read the way TF Serving
reads it instead (``router/tfs_flags.py``; also installed as the
``tensorflow_model_server`` command).  The operator commands talk to the admin
endpoint (``router/cli.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from shared.errors import BindError
from router import cli
from router import config as cfgmod
from router import log as rlog
from router import tfs_flags

Watch = tuple[Callable[[], tuple[cfgmod.ModelConfig, ...]], float]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfs-router", description="TF Serving API router in front of a worker pool")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the router", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", help="YAML config file (default: the embedded configs/local.yaml)")
    s.add_argument("--model-name", help="serve one model by this name (with --model-base-path)")
    s.add_argument("--model-base-path", help="directory holding the model's numbered versions")
    s.add_argument("--workers", type=int, help="number of worker processes to spawn")
    s.add_argument("--processes", type=int, help="data-plane processes sharing the ports (dataplane.processes; "
                                                  "1: one process; 0: one per CPU)")
    s.add_argument("--numa", action=argparse.BooleanOptionalAction, default=None,
                   help="pin each worker to one NUMA node's CPUs and memory (workers.numa)")
    s.add_argument("--cpus-per-worker", type=int, help="0: a node's workers share its CPUs; N: each worker "
                                                        "pinned to its own N CPUs (workers.cpus_per_worker)")
    s.add_argument("--static", nargs="+", metavar="ADDR", help="use these TF-Serving-compatible servers instead of spawning")
    s.add_argument("--grpc-port", type=int, help="gRPC port (TF Serving: 8500; 0 picks a free one)")
    s.add_argument("--rest-port", type=int, help="REST port (TF Serving: 8501; 0 picks a free one)")
    s.add_argument("--no-batching", action="store_true", help="turn request coalescing off for every model")
    s.add_argument("--admin-port", type=int, help="admin endpoint port on admin.host (default 8502; 0 picks a "
                                                   "free one; -1 turns it off)")
    s.add_argument("--log-level", help="debug, info, warning, error")
    s.add_argument("--ignore-state", action="store_true",
                   help="start from the config alone, not the runtime state kept from before (state.dir); "
                        "the state file is replaced at the next change")
    cli.add_commands(sub)
    return p


def build_config(args: argparse.Namespace) -> cfgmod.Config:
    quick_model = args.model_name or args.model_base_path
    if quick_model and not (args.model_name and args.model_base_path):
        raise cfgmod.ConfigError("--model-name and --model-base-path go together")
    base = cfgmod.load(args.config) if (args.config or not quick_model) else cfgmod.Config()
    changes: dict[str, Any] = {}
    if quick_model:
        batching = base.models[0].batching if base.models else cfgmod.BatchingConfig()
        changes["models"] = [{"name": args.model_name, "base_path": args.model_base_path,
                              "batching": cfgmod.asdict_lists(batching)}]
    if args.workers is not None:
        changes["workers.count"] = args.workers
    if args.numa is not None:
        changes["workers.numa"] = args.numa
    if args.cpus_per_worker is not None:
        changes["workers.cpus_per_worker"] = args.cpus_per_worker
    if args.static:
        changes["workers.mode"] = "static"
        changes["workers.addresses"] = list(args.static)
    if args.grpc_port is not None:
        changes["grpc.port"] = args.grpc_port
    if args.rest_port is not None:
        changes["rest.port"] = args.rest_port
    if args.admin_port is not None:
        changes["admin.port"] = args.admin_port
    if args.log_level:
        changes["log.level"] = args.log_level
    if args.processes is not None:
        changes["dataplane.processes"] = args.processes
    cfg = cfgmod.override(base, **changes) if changes or not base.models else base
    if args.no_batching:
        cfg = cfgmod.override(cfg, models=[{**cfgmod.asdict_lists(m), "batching": {
            **cfgmod.asdict_lists(m.batching), "enabled": False}} for m in cfg.models])
    return cfg


async def serve(cfg: cfgmod.Config, watch: Watch | None = None, config_path: str | None = None,
                ignore_state: bool = False) -> int:
    from router.app import App, describe
    from router.procs import freeze_heap

    app = App(cfg, config_path=config_path, ignore_state=ignore_state)
    if watch is not None:  # --model_config_file_poll_wait_seconds
        app.watch_models(*watch)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await app.wait_dataplanes()
        print(describe(app, cfg.rest.host), flush=True)
        waiter = asyncio.ensure_future(app.wait_ready(cfg.workers.startup_timeout_s))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        freeze_heap()
        if waiter.done() and waiter.result():
            print("tfs-router ready", flush=True)
        elif waiter.done():
            print("tfs-router: models not available yet; still trying (see the log)", flush=True)
        await stopper
        waiter.cancel()
    finally:
        await app.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dataplane"]:  # a data-plane process the control plane started (router/procs.py)
        from router import dataplane_proc

        dataplane_proc.main(argv[1:])
    if argv[:1] == ["replay"]:  # logged requests sent again (router/replay.py)
        from router import replay

        raise SystemExit(replay.main(argv[1:]))
    if argv[:1] == ["serve"] and tfs_flags.wants(argv[1:]):
        tfs_flags.main(argv[1:], prog="tfs-router serve")
    args = parser().parse_args(argv)
    if args.command != "serve":
        raise SystemExit(cli.run(args))
    try:
        cfg = build_config(args)
    except cfgmod.ConfigError as exc:
        print(f"tfs-router: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(run(cfg, config_path=args.config, ignore_state=args.ignore_state))


def run(cfg: cfgmod.Config, watch: Watch | None = None, config_path: str | None = None,
        ignore_state: bool = False) -> int:
    """Serve ``cfg`` until SIGTERM/SIGINT; the exit status (2: a port or config problem)."""
    rlog.setup(cfg.log.level, cfg.log.format, cfg.log.access_log)
    # One series per label set is enough; *_created doubles the scrape for nothing.
    import prometheus_client

    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    import uvloop

    try:
        code = uvloop.run(serve(cfg, watch, config_path, ignore_state))
    except BindError as exc:
        print(f"tfs-router: {exc}", file=sys.stderr)
        code = 2
    except cfgmod.ConfigError as exc:
        print(f"tfs-router: config error: {exc}", file=sys.stderr)
        code = 2
    return code


if __name__ == "__main__":
    main()
