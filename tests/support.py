"""Shared test machinery: real worker processes and official-client helpers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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


class _ChildProcess:
    """A child process with its stderr in ``log_path`` and a gRPC ``channel`` to it.

    Subclasses ``_start`` it, then ``_connect`` once they know its address.
    """

    log_chars = 5000  # how much of the log's end ``log()`` returns
    _reader: threading.Thread | None = None  # drains stdout until EOF, if set

    def _start(self, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, env={**child_env(), **(env or {})},
                                     cwd=ROOT)

    def _connect(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 2**31 - 1)])

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-self.log_chars :]

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.channel.close()
        self._log.close()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is None and self.proc.stdout:  # a reader closes nothing under itself
            self.proc.stdout.close()


def copy_in(source: Path, base: Path, version: int, staging: Path) -> None:
    """A version directory written beside, renamed in: what a careful deployment tool does."""
    target = staging / f"v{version}-{time.monotonic_ns()}"
    shutil.copytree(source, target)
    os.rename(target, base / str(version))


class WorkerProcess(_ChildProcess):
    """``python -m workers`` on a free TCP port, with its stderr kept for failures."""

    def __init__(self, *args: str, log_dir: Path) -> None:
        self._start([sys.executable, "-m", "workers", "--listen", "127.0.0.1:0", *args],
                    log_dir / f"worker-{time.monotonic_ns()}.log")
        self.address = self._read_address()
        self._connect(self.address)

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


def fill_typed(proto: Any, values: np.ndarray) -> None:
    """Fill the typed ``*_val`` field of a TensorProto (ours or TF's) with the flat ``values``, as TF clients do."""
    kind = values.dtype
    if kind == object:
        proto.string_val.extend(values.tolist())
    elif kind == np.float16:
        proto.half_val.extend(values.view(np.uint16).astype(np.int32).tolist())
    elif kind == np.float32:
        proto.float_val.extend(values.tolist())
    elif kind == np.float64:
        proto.double_val.extend(values.tolist())
    elif kind in (np.int8, np.int16, np.int32, np.uint8, np.uint16):
        proto.int_val.extend(values.astype(np.int64).tolist())
    elif kind == np.int64:
        proto.int64_val.extend(values.tolist())
    elif kind == np.uint32:
        proto.uint32_val.extend(values.tolist())
    elif kind == np.uint64:
        proto.uint64_val.extend(values.tolist())
    elif kind == np.bool_:
        proto.bool_val.extend(values.tolist())
    elif kind == np.complex64:
        proto.scomplex_val.extend(values.view(np.float32).tolist())
    elif kind == np.complex128:
        proto.dcomplex_val.extend(values.view(np.float64).tolist())
    else:  # pragma: no cover - the tests' strategies only draw the kinds above
        raise AssertionError(kind)


class RouterProcess(_ChildProcess):
    """``python -m router serve`` on free ports, with a config written from ``config``."""

    log_chars = 8000

    def __init__(self, config: dict[str, Any], *, log_dir: Path, extra_args: tuple[str, ...] = (),
                 env: Mapping[str, str] | None = None) -> None:
        import yaml

        stamp = time.monotonic_ns()
        # Every router its own runtime state (router/state.py), unless the test names one.
        config = {"grpc": {"port": 0}, "rest": {"port": 0}, "admin": {"port": 0},
                  "state": {"dir": str(log_dir / f"router-{stamp}.state")}, **config}
        self.config_path = log_dir / f"router-{stamp}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self._start([sys.executable, "-m", "router", "serve", "--config", str(self.config_path), *extra_args],
                    log_dir / f"router-{stamp}.log", env)
        self._follow()

    def _follow(self) -> None:
        """Read the started router's stdout until it prints its ports, then connect."""
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.grpc_port, self.rest_port = self._ports()
        self._connect(f"127.0.0.1:{self.grpc_port}")
        self.url = f"http://127.0.0.1:{self.rest_port}"

    @classmethod
    def command(cls, argv: Sequence[str], *, log_dir: Path, env: Mapping[str, str] | None = None) -> RouterProcess:
        """A router started from a whole command line, e.g. ``tensorflow_model_server --port=0 ...``
        (pass free ports or 0, and an admin port that cannot clash: ``--admin_port=0``)."""
        router = cls.__new__(cls)
        stamp = time.monotonic_ns()
        env = {"TFS_ROUTER_STATE_DIR": str(log_dir / f"router-{stamp}.state"), **(env or {})}
        router._start(list(argv), log_dir / f"router-{stamp}.log", env)
        router._follow()
        return router

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def admin_url(self) -> str:
        for line in self.lines:
            if line.strip().startswith("admin:"):
                return line.split()[1].rsplit("/v1/", 1)[0]
        raise RuntimeError(f"the router printed no admin line:\n{self.lines}")

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None,
              timeout: float = 30.0) -> tuple[int, Any]:
        """A call to the admin endpoint: (HTTP status, parsed JSON body)."""
        import urllib.error
        import urllib.request

        data = orjson.dumps(body) if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.admin_url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """Every worker's own Stats (counts by transport, the operations journal), by worker name."""
        out = {}
        for w in self.status()["workers"]:
            with grpc.insecure_channel(w["address"]) as channel:
                out[w["name"]] = orjson.loads(channel.unary_unary("/tfsrouter.Worker/Stats")(b"", timeout=10))
        return out

    def status(self, token: str | None = None) -> dict[str, Any]:
        code, body = self.admin("GET", "/v1/admin/status", token=token)
        assert code == 200, body
        result: dict[str, Any] = body
        return result

    def wait_rollouts(self, count: int, timeout: float = 120.0, token: str | None = None) -> list[dict[str, Any]]:
        """Wait until ``count`` rollouts have finished (the start-up load is the first); their history."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history: list[dict[str, Any]] = self.status(token)["history"]
            if len(history) >= count:
                return history
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"{count} rollouts did not finish in {timeout}s: {self.status(token)}\n{self.log()}")

    def _ports(self, timeout: float = 60.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        grpc_port = rest_port = None
        while time.monotonic() < deadline and (grpc_port is None or rest_port is None):
            for line in list(self.lines):
                if "gRPC (TF Serving API):" in line:
                    grpc_port = int(line.rsplit(":", 1)[1])
                if "REST (TF Serving API):" in line:
                    rest_port = int(line.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if grpc_port is None or rest_port is None:
            self.kill()
            raise RuntimeError(f"router did not start:\n{self.log()}")
        return grpc_port, rest_port

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def post(self, path: str, body: bytes | dict[str, Any], timeout: float = 30.0) -> tuple[int, bytes, dict[str, str]]:
        import urllib.error
        import urllib.request

        data = body if isinstance(body, bytes) else orjson.dumps(body)
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = self.get("/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"router not ready after {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        import psutil

        pids = []
        # Direct children: a worker's own child (its pacer, workers/pacer.py) is no worker.
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "workers" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:  # exited while we looked
                continue
        return sorted(pids)

    def terminate(self, timeout: float = 60.0) -> int:
        return super().terminate(timeout)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120.0) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class SteadyLoad:
    """Threads calling Predict back to back until the block ends: the versions that
    answered, in order, and every failure, for "no request failed while ..." tests.

    ``records`` has one ``(sent, answered, version or None, code name)`` per call,
    times from ``time.monotonic()``, so tests can order answers across clients.
    """

    def __init__(self, channel: grpc.Channel, request: Any, clients: int = 1) -> None:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self._request = request
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        self.served: list[int] = []
        self.failures: list[str] = []
        self.records: list[tuple[float, float, int | None, str]] = []

    def _client(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                version = self._stub.Predict(self._request, timeout=30).model_spec.version.value
                self.served.append(version)
                self.records.append((sent, time.monotonic(), version, "OK"))
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
                self.records.append((sent, time.monotonic(), None, exc.code().name))

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
