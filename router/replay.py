"""``tfs-router replay``: send logged requests again, as a load test made of real traffic.

    tfs-router replay FILE... --target HOST:PORT [--rate R] [--duration S] [--concurrency N]
                              [--keep-versions] [--json]

Reads request logs (router/reqlog.py; any TFRecord file of ``PredictionLog``
records with ``predict_log``, warm-up files included) and sends their
``PredictRequest``s to ``--target`` over gRPC (TF Serving's
``PredictionService/Predict``, so any TF Serving or tfs-router answers).  A
logged request names the version that answered it; by default that is
cleared, so the target routes each as unversioned traffic now
(``--keep-versions`` sends them to the logged versions).

``--rate R`` sends on a fixed schedule (open loop: R requests a second,
latency counted from each request's scheduled time, so a stall is not hidden
by a client that waited; at most ``--concurrency`` in flight, past which a
request is counted as not sent).  Without it, ``--concurrency`` callers send
back to back (closed loop).  The logged requests are sent in order, over and
over for ``--duration`` seconds, or once each without it.  Progress goes to
stderr every second; the report gives the requests sent, the errors by code,
the versions that answered, latency percentiles and the mix of batch sizes
sent.  Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from protos import predict_pb2, prediction_log_pb2
from shared.errors import ServingError
from shared.tfrecord import split_records

MAX_RECORDS = 10_000_000
METHOD = "/tensorflow.serving.PredictionService/Predict"


def read_requests(paths: Sequence[Path], keep_versions: bool) -> list[predict_pb2.PredictRequest]:
    requests = []
    for path in paths:
        for i, record in enumerate(split_records(path.read_bytes(), path, MAX_RECORDS)):
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            if entry.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"{path}: record {i} is not a PredictLog")
            request = entry.predict_log.request
            if not keep_versions:
                request.model_spec.ClearField("version_choice")
            requests.append(request)
    return requests


def rows(request: predict_pb2.PredictRequest) -> int:
    """The batch size a request carries (its inputs' first dimension; 1 for scalars)."""
    for tensor in request.inputs.values():
        dims = tensor.tensor_shape.dim
        return int(dims[0].size) if dims else 1
    return 0


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.not_sent = 0

    def report(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else None

        sent = sum(self.codes.values())
        return {"sent": sent, "seconds": round(seconds, 3), "rate": round(sent / seconds, 1) if seconds else 0.0,
                "codes": dict(self.codes), "versions": dict(self.versions),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}, "not_sent": self.not_sent,
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999)}


async def replay(requests: Sequence[predict_pb2.PredictRequest], target: str, *, rate: float | None,
                 duration: float | None, concurrency: int, timeout: float = 30.0) -> dict[str, Any]:
    import grpc

    tally = Tally()
    feed = itertools.cycle(requests) if duration else iter(requests)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 2**31 - 1)]) as ch:
        call = ch.unary_unary(METHOD, request_serializer=predict_pb2.PredictRequest.SerializeToString,
                              response_deserializer=predict_pb2.PredictResponse.FromString)
        start = time.monotonic()
        end = start + duration if duration else float("inf")

        async def one(request: predict_pb2.PredictRequest, since: float) -> None:
            tally.batch_sizes[rows(request)] += 1
            try:
                response = await call(request, timeout=timeout)
                tally.codes["OK"] += 1
                tally.versions[str(response.model_spec.version.value)] += 1
            except grpc.aio.AioRpcError as exc:
                tally.codes[exc.code().name] += 1
            tally.latencies.append(time.monotonic() - since)

        async def show() -> None:
            while True:
                await asyncio.sleep(1.0)
                print(f"replay: {sum(tally.codes.values())} answered, {sum(tally.codes.values()) - tally.codes['OK']} "
                      f"failed, {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)

        shower = asyncio.create_task(show())
        try:
            if rate:
                inflight: set[asyncio.Task[None]] = set()
                for i, request in enumerate(feed):
                    due = start + i / rate
                    if due >= end:
                        break
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    if len(inflight) >= concurrency:
                        tally.not_sent += 1
                        continue
                    task = asyncio.create_task(one(request, due))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                await asyncio.gather(*inflight)
            else:
                async def caller() -> None:
                    for request in feed:
                        if time.monotonic() >= end:
                            return
                        await one(request, time.monotonic())

                await asyncio.gather(*(caller() for _ in range(concurrency)))
        finally:
            shower.cancel()
        return tally.report(time.monotonic() - start)


def render(report: dict[str, Any]) -> str:
    failed = report["sent"] - report["codes"].get("OK", 0)
    lines = [f"sent {report['sent']} in {report['seconds']:.1f}s ({report['rate']:,.1f}/s), {failed} failed"
             + (f", {report['not_sent']} not sent (concurrency reached)" if report["not_sent"] else ""),
             f"latency ms: p50 {report['p50_ms']}, p99 {report['p99_ms']}, p999 {report['p999_ms']}",
             "answers: " + ", ".join(f"{code} {n}" for code, n in sorted(report["codes"].items())),
             "versions: " + (", ".join(f"{v}: {n}" for v, n in sorted(report["versions"].items())) or "none"),
             "batch sizes sent: " + ", ".join(f"{k}: {n}" for k, n in report["batch_sizes"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="tfs-router replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="request logs (TFRecord files of PredictionLog)")
    p.add_argument("--target", required=True, help="HOST:PORT of a TF Serving or tfs-router gRPC endpoint")
    p.add_argument("--rate", type=float, help="requests a second, on a fixed schedule (default: closed loop)")
    p.add_argument("--duration", type=float, help="seconds, the log sent over and over (default: once)")
    p.add_argument("--concurrency", type=int, default=8, help="callers (closed loop) or calls in flight at most")
    p.add_argument("--keep-versions", action="store_true", help="send each to the version that answered it")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args(argv)
    if args.concurrency < 1 or (args.rate is not None and args.rate <= 0):
        p.error("--concurrency and --rate must be above 0")
    try:
        requests = read_requests(args.files, args.keep_versions)
    except (OSError, ValueError, ServingError, DecodeError) as exc:
        print(f"tfs-router replay: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print("tfs-router replay: no requests in the files given", file=sys.stderr)
        return 2
    report = asyncio.run(replay(requests, args.target, rate=args.rate, duration=args.duration,
                                concurrency=args.concurrency))
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["sent"] == report["codes"].get("OK", 0) and not report["not_sent"] else 1
