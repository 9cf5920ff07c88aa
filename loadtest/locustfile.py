"""Locust scenarios against a running router (or TF Serving itself): REST and gRPC users.

    locust -f loadtest/locustfile.py --host http://localhost:8501            # web UI
    locust -f loadtest/locustfile.py --host http://localhost:8501 --headless -u 64 -r 16 -t 60s

The REST user posts one-row ``instances`` bodies to ``/v1/models/ctr:predict``;
the gRPC user sends the same rows with the official client to
``TFS_GRPC_TARGET`` (default: the host of ``--host`` on port 8500).  Both
check every answer (status, output names, one value per row) and report a
wrong answer as a failure, so a load test can never pass on errors.
``TFS_MODEL`` and ``TFS_ROWS`` choose the model name and rows per request.
Inputs are the demo CTR model's; point ``TFS_MODEL`` elsewhere only for a
model with the same signature.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any
from urllib.parse import urlparse

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # gRPC's C core must cooperate with locust's gevent loop

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
from locust import HttpUser, User, between, task  # noqa: E402

from protos import predict_pb2  # noqa: E402
from shared.tensor import from_numpy, to_numpy  # noqa: E402

MODEL = os.environ.get("TFS_MODEL", "ctr")
ROWS = int(os.environ.get("TFS_ROWS", "1"))
IDS = ("user_id", "item_id", "category", "city", "device")


def rows(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {name: rng.integers(0, 100_000, ROWS, dtype=np.int64) for name in IDS}
    out["dense"] = rng.standard_normal((ROWS, 20), dtype=np.float32)
    return out


SAMPLES = [rows(seed) for seed in range(32)]


class RestUser(HttpUser):
    wait_time = between(0, 0.001)

    @task
    def predict(self) -> None:
        x = random.choice(SAMPLES)
        body = orjson.dumps({"instances": [{k: v[i].tolist() for k, v in x.items()} for i in range(ROWS)]})
        with self.client.post(f"/v1/models/{MODEL}:predict", data=body, name="REST predict",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            preds = orjson.loads(resp.content).get("predictions", [])
            if len(preds) != ROWS or "probability" not in preds[0]:
                resp.failure(f"unexpected answer: {resp.text[:200]}")


class GrpcUser(User):
    wait_time = between(0, 0.001)

    def on_start(self) -> None:
        target = os.environ.get("TFS_GRPC_TARGET") or f"{urlparse(self.host or 'http://localhost').hostname}:8500"
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )
        self.requests = []
        for x in SAMPLES:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = MODEL
            for name, value in x.items():
                req.inputs[name].CopyFrom(from_numpy(value))
            self.requests.append(req)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            resp: Any = self.call(random.choice(self.requests), timeout=10)
            length = resp.ByteSize()
            if to_numpy(resp.outputs["probability"]).shape != (ROWS,):
                error = RuntimeError("unexpected answer shape")
        except (grpc.RpcError, KeyError) as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="gRPC", name="gRPC Predict", response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=error, context={},
        )
