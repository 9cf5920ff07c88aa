"""How much a worker process costs compared with calling TensorFlow directly.

    python -m loadtest.bench_worker [--seconds 5] [--concurrency 8] [--model-dir models/ctr]

Measures, in one run on the same machine:

1. In-process baseline: the latest version under ``--model-dir`` loaded with
   ``tf.saved_model.load``; its ``serving_default`` signature called back to
   back from one thread (inputs converted to tensors once, outputs converted
   to numpy as the worker does) at batch 1 and batch 64.
2. Worker over gRPC: one ``python -m workers`` process with default flags,
   driven after a 1 s warm-up by a closed-loop grpc.aio client (the official
   ``PredictionServiceStub``, PredictRequests built ahead of time; the stub
   still serializes each one, as any client does) keeping ``--concurrency``
   requests in flight, at batch 1 and batch 64.

Then prints one table and, as its last line, the ratios worker/in-process:
requests/s at batch 1 over calls/s at batch 1, and rows/s at batch 64.

The load client runs in this process, never at the same time as the
in-process baseline.  Client and worker share the machine's cores (2 on the
reference machine), so the worker figures include the client's CPU cost:
the ``client cpu`` and ``worker cpu`` columns show how many cores each used
during the measured window.  Progress goes to stderr; results to stdout.
Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.common import (
    GRPC_OPTIONS,
    LoadResult,
    WorkerProcess,
    bench_parser,
    closed_loop,
    error_text,
    parse_bench_args,
    print_table,
    progress,
    run_async,
    start_worker,
    sync_loop,
)

MODEL_NAME = "ctr"
SIGNATURE = "serving_default"
BATCHES = (1, 64)
DISTINCT_INPUTS = 16  # requests cycle through this many different input sets
WARMUP_WORKER_S = 1.0
WARMUP_IN_PROCESS_S = 0.5
STEPS = 2 * len(BATCHES)


def input_sets(batch: int) -> list[dict[str, Any]]:
    from workers.demo_model import example_inputs

    return [example_inputs(batch, seed=1000 * batch + i) for i in range(DISTINCT_INPUTS)]


# -- 1. in-process ----------------------------------------------------------------


def bench_in_process(version_dir: Path, seconds: float, step: int) -> list[LoadResult]:
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
    results = []
    for batch in BATCHES:
        step += 1
        progress(f"[{step}/{STEPS}] in-process batch {batch} ({seconds:g}s) ...")
        tensors = [{k: tf.constant(v) for k, v in inputs.items()} for inputs in input_sets(batch)]
        feeds = itertools.cycle(tensors)

        def call() -> None:
            out = fn(**next(feeds))
            for value in out.values():
                value.numpy()

        results.append(
            sync_loop(
                call,
                seconds=seconds,
                warmup=WARMUP_IN_PROCESS_S,
                rows_per_call=batch,
                label="in-process",
                cpu_pids={"client": None},
            )
        )
    return results


# -- 2. worker over gRPC ----------------------------------------------------------


def predict_requests(batch: int) -> list[Any]:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    requests = []
    for inputs in input_sets(batch):
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL_NAME
        req.model_spec.signature_name = SIGNATURE
        for name, value in inputs.items():
            req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        requests.append(req)
    return requests


async def bench_worker(worker: WorkerProcess, seconds: float, concurrency: int, step: int) -> list[LoadResult]:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    results = []
    async with grpc.aio.insecure_channel(worker.address, options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for batch in BATCHES:
            step += 1
            progress(
                f"[{step}/{STEPS}] worker batch {batch}, concurrency {concurrency} "
                f"({WARMUP_WORKER_S:g}s warm-up + {seconds:g}s) ..."
            )
            requests = predict_requests(batch)
            # One checked request first: a wrong answer must not pass as throughput.
            try:
                first = await stub.Predict(requests[0], timeout=30)
                got = [d.size for d in first.outputs["probability"].tensor_shape.dim]
                if got != [batch]:
                    raise RuntimeError(f"wrong answer: probability shape {got} for batch {batch}")
            except (grpc.RpcError, RuntimeError) as exc:
                results.append(LoadResult(label="worker grpc", concurrency=concurrency, rows_per_call=batch,
                                          seconds=0.0, latencies=[], errors=Counter({error_text(exc): 1})))
                continue
            feeds = itertools.cycle(requests)

            async def call() -> None:
                await stub.Predict(next(feeds), timeout=30)

            results.append(
                await closed_loop(
                    call,
                    concurrency=concurrency,
                    seconds=seconds,
                    warmup=WARMUP_WORKER_S,
                    rows_per_call=batch,
                    label="worker grpc",
                    cpu_pids={"client": None, "worker": worker.pid},
                )
            )
    return results


# -- report -----------------------------------------------------------------------


def report(results: Sequence[LoadResult]) -> None:
    headers = ["mode", "batch", "conc", "calls", "calls/s", "rows/s", "p50 ms", "p99 ms", "errors",
               "client cpu", "worker cpu"]
    rows = [
        [r.label, r.rows_per_call, r.concurrency, r.calls, r.rate, r.rows_per_s, r.p50_ms, r.p99_ms,
         r.error_count, r.cpu.get("client", float("nan")), r.cpu.get("worker", float("nan"))]
        for r in results
    ]
    print_table(headers, rows)
    print("(cpu columns: cores used during the measured window)")
    for r in results:
        for message, count in r.errors.most_common():
            print(f"ERROR {r.label} batch {r.rows_per_call}: {count}x {message}")


def ratio(a: float, b: float) -> str:
    value = a / b if b > 0 else float("nan")
    return f"{value:.2f}x" if value == value else "n/a"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser("python -m loadtest.bench_worker", __doc__)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight against the worker (default 8)")
    args = parse_bench_args(p, argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version_dir = args.version_dir

    progress(f"starting worker for {args.model_dir} ...")
    worker = start_worker({MODEL_NAME: args.model_dir})
    try:
        # This process imports TF and loads the model while the worker loads
        # its own copy; nothing is measured until the worker is SERVING (an
        # idle worker uses no CPU during the in-process steps).
        import tensorflow  # noqa: F401

        ready = worker.wait_serving()
        progress(f"worker pid {worker.pid} on {worker.address} SERVING ({ready:.1f}s after start)")
        in_process = bench_in_process(version_dir, args.seconds, step=0)
        over_grpc = run_async(bench_worker(worker, args.seconds, args.concurrency, step=len(BATCHES)))
    finally:
        died = not worker.alive()
        code = worker.terminate()
        if died:
            progress(f"worker died (exit code {code}); its log ends:\n{worker.log_tail(3000)}")
        else:
            progress(f"worker stopped (exit code {code})")

    try:
        import uvloop  # noqa: F401

        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    print(f"model {version_dir.parent.name} version {version_dir.name}; {os.cpu_count()} CPUs; "
          f"{args.seconds:g}s per step; client on {loop_name}, worker with default flags")
    report([*in_process, *over_grpc])
    in1, in64 = in_process
    w1, w64 = over_grpc
    print(f"worker/in-process throughput: batch1 {ratio(w1.rate, in1.rate)}, "
          f"batch64 rows {ratio(w64.rows_per_s, in64.rows_per_s)}")
    return 1 if any(r.error_count for r in [*in_process, *over_grpc]) else 0


if __name__ == "__main__":
    sys.exit(main())
