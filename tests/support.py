"""Shared test machinery: real worker processes and official-client helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
TEST_VOCAB = 1000  # small embedding tables keep model builds fast


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = str(ROOT)
    return env


class WorkerProcess:
    """``python -m workers`` on a free TCP port, with its stderr kept for failures."""

    def __init__(self, *args: str, log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(),
            cwd=ROOT,
        )
        self.address = self._read_address()
        self.channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 2**31 - 1)]
        )

    def _read_address(self, timeout: float = 120.0) -> str:
        assert self.proc.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                text = line.decode()
                if text.startswith("tfs-worker listening on "):
                    found.append(text.split()[-1])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.kill()
            raise RuntimeError(f"worker did not start:\n{self.log()}")
        return found[0]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_serving(self, timeout: float = 120.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"worker not SERVING after {timeout}s:\n{self.log()}")

    def stats(self) -> dict[str, Any]:
        call = self.channel.unary_unary("/tfsrouter.Worker/Stats")
        result: dict[str, Any] = orjson.loads(call(b"", timeout=10))
        return result

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.channel.close()
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def predict_request(model: str, inputs: Mapping[str, np.ndarray], **spec: Any) -> Any:
    """An official PredictRequest built the way client code builds one."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            req.model_spec.version.value = value
        elif key == "output_filter":
            req.output_filter.extend(value)
        else:
            setattr(req.model_spec, key, value)
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return req


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
