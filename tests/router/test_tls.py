"""TLS and mutual TLS on the router's listeners and on its links to workers, and rotation (router/tls.py).

Real processes, certificates made at test time with trustme; the official
client over ``grpc.ssl_channel_credentials`` and urllib over HTTPS.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import trustme
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import (ROOT, TEST_VOCAB, RouterProcess, SteadyLoad, WorkerProcess, child_env, outputs_of,
                           predict_request)
from workers.demo_model import example_inputs

INPUTS = example_inputs(2, vocab=TEST_VOCAB)
TOKEN = "s3cret-admin-token"


@dataclass
class Pki:
    """A server CA and certificate, a client CA and client certificates, as files under ``dir``."""

    dir: Path
    ca: trustme.CA
    client_ca: trustme.CA

    def server(self, name: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        cert = (ca or self.ca).issue_cert("localhost", "127.0.0.1")
        chain, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        return chain, key

    def ca_file(self, ca: trustme.CA, name: str) -> Path:
        path = self.dir / f"{name}.pem"
        ca.cert_pem.write_to_path(str(path))
        return path

    def client(self, name: str, ca: trustme.CA | None = None) -> tuple[bytes, bytes]:
        cert = (ca or self.client_ca).issue_cert(name)
        return b"".join(p.bytes() for p in cert.cert_chain_pems), cert.private_key_pem.bytes()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(d, trustme.CA(), trustme.CA())


def grpc_channel(port: int, ca: bytes, client: tuple[bytes, bytes] | None = None) -> grpc.Channel:
    chain, key = client if client is not None else (None, None)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(f"localhost:{port}", creds)


def predict(channel: grpc.Channel, timeout: float = 30) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request("ctr", INPUTS),
                                                                              timeout=timeout)


def https_context(ca_pem: bytes, client: tuple[bytes, bytes] | None = None, tmp: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    if client is not None:
        assert tmp is not None
        chain, key = tmp / f"client-{time.monotonic_ns()}.crt", tmp / f"client-{time.monotonic_ns()}.key"
        chain.write_bytes(client[0])
        key.write_bytes(client[1])
        ctx.load_cert_chain(chain, key)
    return ctx


def https(url: str, ctx: ssl.SSLContext | None, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_https_ready(router: RouterProcess, ctx: ssl.SSLContext, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.proc.poll() is not None:
            raise RuntimeError(f"router exited with {router.proc.returncode}:\n{router.log()}")
        try:
            if https(f"https://127.0.0.1:{router.rest_port}/readyz", ctx)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"router not ready after {timeout}s:\n{router.log()}")


def served_certificate(port: int, alpn: str = "h2") -> bytes:
    """The certificate a new handshake on ``port`` gets (DER), whoever signed it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert_file: Path) -> bytes:
    pem = cert_file.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(pem)


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
    except (grpc.RpcError, OSError, ssl.SSLError, urllib.error.URLError):
        return True
    return False


def metric(router: RouterProcess, ctx: ssl.SSLContext | None, line_start: str) -> float:
    scheme = "https" if ctx is not None else "http"
    _, body = https(f"{scheme}://127.0.0.1:{router.rest_port}/monitoring/prometheus/metrics", ctx)
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(config: dict[str, Any], logs_dir: Path, ctx: ssl.SSLContext, env: dict[str, str] | None = None
          ) -> RouterProcess:
    router = RouterProcess(config, log_dir=logs_dir, env=env)
    try:
        wait_https_ready(router, ctx)
    except BaseException:
        router.kill()
        raise
    return router


@pytest.fixture
def base_config(model_root: Path) -> dict[str, Any]:
    return {"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}], "workers": {"count": 1}}


# -- listeners -------------------------------------------------------------------------


def test_tls_on_grpc_rest_and_admin(pki: Pki, base_config: dict[str, Any], logs_dir: Path, tmp_path: Path) -> None:
    cert, key = pki.server("server")
    ca = pki.ca.cert_pem.bytes()
    ctx = https_context(ca)
    router = start({**base_config, "tls": {"cert_file": str(cert), "key_file": str(key)}}, logs_dir, ctx,
                   env={"TFS_ROUTER_ADMIN_TOKEN": TOKEN})
    try:
        assert any("TLS:" in line and "gRPC, REST, admin" in line for line in router.lines), router.lines
        with grpc_channel(router.grpc_port, ca) as channel:
            assert outputs_of(predict(channel))["probability"].shape == (2,)
        # a plaintext client, and a client that trusts another CA: refused at the handshake
        with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as plain:
            assert refused(lambda: predict(plain, timeout=5))
        with grpc_channel(router.grpc_port, trustme.CA().cert_pem.bytes()) as stranger:
            assert refused(lambda: predict(stranger, timeout=5))

        rest = f"https://127.0.0.1:{router.rest_port}"
        status, body = https(f"{rest}/v1/models/ctr:predict", ctx,
                             orjson.dumps({"instances": [{k: v[0].tolist() for k, v in INPUTS.items()}]}))
        assert status == 200, body
        assert "predictions" in orjson.loads(body)
        assert refused(lambda: https(f"http://127.0.0.1:{router.rest_port}/v1/models/ctr", None))
        assert refused(lambda: https(f"{rest}/v1/models/ctr", ssl.create_default_context()))  # system roots

        # the admin API: the same certificate (the top-level block), the CLI given the CA
        admin = router.admin_url
        assert admin.startswith("https://"), admin
        ca_file = pki.ca_file(pki.ca, "ca")
        cli = subprocess.run([sys.executable, "-m", "router", "status", "--admin", admin, "--cacert", str(ca_file)],
                             cwd=ROOT, env={**child_env(), "TFS_ROUTER_ADMIN_TOKEN": TOKEN}, capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "ctr" in cli.stdout

        # repeated failed authentications from one address: refused for a while, whatever it sends
        codes = [https(f"{admin}/v1/admin/status", ctx, headers={"Authorization": "Bearer wrong"})[0]
                 for _ in range(6)]
        assert codes == [401] * 5 + [429], codes
        assert https(f"{admin}/v1/admin/status", ctx, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 429
        assert TOKEN not in router.log() and "wrong" not in router.log()
    finally:
        router.terminate()


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-dataplanes"])
def test_mutual_tls_names_the_tenant(processes: int, pki: Pki, base_config: dict[str, Any], logs_dir: Path,
                                     tmp_path: Path) -> None:
    """With two data-plane processes, REST's handshakes happen on connections accepted from the shared
    socket (router/frontends/balanced.py)."""
    cert, key = pki.server("server")
    client_ca = pki.ca_file(pki.client_ca, "client-ca")
    ca = pki.ca.cert_pem.bytes()
    alice = pki.client("alice")
    ctx = https_context(ca, alice, tmp_path)
    config = {**base_config,
              "tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(client_ca),
                      "require_client_cert": True},
              "admin": {"port": 0, "tls": {"plaintext": True}},
              "quotas": {"tenant_from": "client_cert", "tenants": {"alice": {"max_inflight": 64}}},
              "dataplane": {"processes": processes}}
    router = start(config, logs_dir, ctx)
    try:
        with grpc_channel(router.grpc_port, ca, alice) as channel:
            assert outputs_of(predict(channel))["probability"].shape == (2,)
        for who in (None, pki.client("mallory", trustme.CA())):  # no certificate; one from another CA
            with grpc_channel(router.grpc_port, ca, who) as channel:
                assert refused(lambda: predict(channel, timeout=5)), who

        rest = f"https://127.0.0.1:{router.rest_port}"
        body = orjson.dumps({"instances": [{k: v[0].tolist() for k, v in INPUTS.items()}]})
        assert https(f"{rest}/v1/models/ctr:predict", ctx, body)[0] == 200
        assert refused(lambda: https(f"{rest}/v1/models/ctr:predict", https_context(ca), body))
        stranger = https_context(ca, pki.client("mallory", trustme.CA()), tmp_path)
        assert refused(lambda: https(f"{rest}/v1/models/ctr:predict", stranger, body))

        # both answered requests were alice's: the certificate named the tenant, not a header
        assert metric(router, ctx, 'tfs_router_admitted_total{model="ctr",tenant="alice"') == 2
        assert router.admin_url.startswith("http://127.0.0.1")  # admin.tls plaintext: loopback, no TLS
    finally:
        router.terminate()


def test_tensorflow_model_server_ssl_config_file(pki: Pki, model_root: Path, logs_dir: Path, tmp_path: Path) -> None:
    cert, key = pki.server("server")
    ssl_config = tmp_path / "ssl.config"
    def field(pem: str) -> str:  # a text-proto string: no raw line breaks inside quotes
        return '"' + pem.replace("\n", "\\n") + '"'

    ssl_config.write_text(f"server_key: {field(key.read_text())}\nserver_cert: {field(cert.read_text())}\n"
                          f"custom_ca: {field(pki.client_ca.cert_pem.bytes().decode())}\nclient_verify: true\n")
    router = RouterProcess.command(
        [os.path.join(os.path.dirname(sys.executable), "tensorflow_model_server"), "--port=0",
         "--rest_api_port=0", "--admin_port=0", "--model_name=ctr", f"--model_base_path={model_root / 'ctr'}",
         f"--ssl_config_file={ssl_config}", "--workers=1"], log_dir=logs_dir)
    try:
        router.wait_ready()  # REST stays plain HTTP, as in TF Serving
        ca = pki.ca.cert_pem.bytes()
        with grpc_channel(router.grpc_port, ca, pki.client("bob")) as channel:
            assert outputs_of(predict(channel))["probability"].shape == (2,)
        with grpc_channel(router.grpc_port, ca) as channel:  # client_verify: a certificate is required
            assert refused(lambda: predict(channel, timeout=5))
    finally:
        router.terminate()


# -- links to workers -------------------------------------------------------------------


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_router_talks_tls_to_a_static_worker(mutual: bool, pki: Pki, model_root: Path, logs_dir: Path,
                                             tmp_path: Path) -> None:
    cert, key = pki.server("worker")
    client_ca = pki.ca_file(pki.client_ca, "client-ca")
    router_chain, router_key = pki.client("router")
    (tmp_path / "router.crt").write_bytes(router_chain)
    (tmp_path / "router.key").write_bytes(router_key)
    required = ("--tls-client-ca-file", str(client_ca)) if mutual else ()
    worker = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", "--tls-cert-file", str(cert), "--tls-key-file",
                           str(key), *required, log_dir=logs_dir)
    port = int(worker.address.rsplit(":", 1)[1])
    routers: list[RouterProcess] = []
    try:
        good = {"ca_file": str(pki.ca_file(pki.ca, "ca")), "server_name": "localhost",
                **({"cert_file": str(tmp_path / "router.crt"), "key_file": str(tmp_path / "router.key")}
                   if mutual else {})}
        base = {"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                "workers": {"mode": "static", "addresses": [f"127.0.0.1:{port}"], "health_interval_s": 0.2}}
        router = RouterProcess({**base, "workers": {**base["workers"], "tls": {"enabled": True, **good}}},
                               log_dir=logs_dir)
        routers.append(router)
        router.wait_ready()
        assert outputs_of(predict(router.channel))["probability"].shape == (2,)

        if not mutual:
            return
        # a CA that did not sign the worker's certificate: never in rotation, said once, counted
        wrong = {**good, "ca_file": str(pki.ca_file(trustme.CA(), "other-ca"))}
        bad = RouterProcess({**base, "workers": {**base["workers"], "tls": {"enabled": True, **wrong}}},
                            log_dir=logs_dir)
        routers.append(bad)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric(bad, None, "tfs_router_worker_tls_errors_total") < 2:
            time.sleep(0.2)
        assert metric(bad, None, "tfs_router_worker_tls_errors_total") >= 2
        assert bad.get("/readyz")[0] == 503
        assert refused(lambda: predict(bad.channel, timeout=5))
        assert bad.log().count("TLS handshake failed") == 1, bad.log()
    finally:
        for r in routers:
            r.terminate()
        worker.terminate()


# -- rotation ---------------------------------------------------------------------------


def swap_in(live: Path, chain: Path, key: Path) -> None:
    """Replace a mounted Secret's files the way Kubernetes does: a new directory, one symlink swapped."""
    fresh = live.parent / f"..data-{time.monotonic_ns()}"
    fresh.mkdir()
    (fresh / "tls.crt").write_bytes(chain.read_bytes())
    (fresh / "tls.key").write_bytes(key.read_bytes())
    tmp_link = live.parent / f"..tmp-{time.monotonic_ns()}"
    tmp_link.symlink_to(fresh.name)
    os.replace(tmp_link, live)


def wait_served(port: int, want: bytes, timeout: float = 30.0, alpn: str = "h2") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_certificate(port, alpn) == want:
            return
        time.sleep(0.1)
    raise AssertionError("new handshakes did not get the new certificate")


def test_rotation_under_load_fails_no_request(pki: Pki, base_config: dict[str, Any], logs_dir: Path,
                                              tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    first = pki.server("first")
    live = secret / "..data"
    swap_in(live, *first)
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(f"..data/{name}")
    new_ca = trustme.CA()
    trusted = pki.ca.cert_pem.bytes() + new_ca.cert_pem.bytes()  # the client trusts the old and the new CA
    ctx = https_context(trusted)
    config = {**base_config, "tls": {"cert_file": str(secret / "tls.crt"), "key_file": str(secret / "tls.key"),
                                     "reload_s": 0.2},
              "admin": {"port": 0, "tls": {"plaintext": True}}}
    router = start(config, logs_dir, ctx)
    try:
        with grpc_channel(router.grpc_port, trusted) as channel, SteadyLoad(channel, predict_request("ctr", INPUTS),
                                                                             clients=2) as load:
            assert served_certificate(router.grpc_port) == der_of(first[0])
            for step, ca in (("same-ca", None), ("new-ca", new_ca)):
                chain, key = pki.server(step, ca)
                swap_in(live, chain, key)
                wait_served(router.grpc_port, der_of(chain))
                wait_served(router.rest_port, der_of(chain), alpn="http/1.1")  # each listener within reload_s
                # a new client connection trusts it and is answered
                with grpc_channel(router.grpc_port, trusted) as fresh:
                    assert outputs_of(predict(fresh))["probability"].shape == (2,)
                assert https(f"https://127.0.0.1:{router.rest_port}/v1/models/ctr", ctx)[0] == 200
            # a broken replacement (the key of another certificate): logged, counted, the last good pair stays
            other_chain, _ = pki.server("other")
            swap_in(live, other_chain, key)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and metric(router, ctx, "tfs_router_tls_reload_failures_total") < 2:
                time.sleep(0.1)
            assert metric(router, ctx, "tfs_router_tls_reload_failures_total") >= 2  # gRPC and REST
            assert served_certificate(router.grpc_port) == der_of(chain)
            assert served_certificate(router.rest_port, "http/1.1") == der_of(chain)
            load.wait(0.5)
        assert load.served and not load.failures, load.failures[:5]
        assert "the last good ones stay" in router.log()
    finally:
        router.terminate()


# -- refusals at start -------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "env", "message"), [
    ({"admin": {"host": "0.0.0.0", "port": 0}}, {"TFS_ROUTER_ADMIN_TOKEN": TOKEN},
     "is not a loopback address: the admin API there needs TLS"),
    ({"tls": {"cert_file": "/nonexistent/cert.pem", "key_file": "/nonexistent/key.pem"}}, {},
     "cert_file /nonexistent/cert.pem: cannot read it"),
])
def test_start_refused(extra: dict[str, Any], env: dict[str, str], message: str, base_config: dict[str, Any],
                       logs_dir: Path, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({**base_config, "grpc": {"port": 0}, "rest": {"port": 0}, **extra}))
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(path)], cwd=ROOT,
                          env={**child_env(), **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_mismatched_key_refuses_the_start(pki: Pki, base_config: dict[str, Any], tmp_path: Path) -> None:
    from router.config import from_dict
    from router.tls import ServerTls, TlsError

    cert, _ = pki.server("one")
    _, other_key = pki.server("two")
    cfg = from_dict({**base_config, "tls": {"cert_file": str(cert), "key_file": str(other_key)}})
    with pytest.raises(TlsError, match="the key does not match the certificate"):
        ServerTls("grpc", cfg.listener_tls("grpc"))


def test_spawned_workers_sockets_are_private(base_config: dict[str, Any], tmp_path: Path) -> None:
    from router.app import App
    from router.config import from_dict

    import asyncio

    shared = tmp_path / "sockets"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)

    async def build() -> None:  # on a loop of its own, closed after (grpc.aio's parts take the running one)
        App(from_dict({**base_config, "workers": {"count": 1, "socket_dir": str(shared)},
                       "state": {"backend": "none"}}))

    asyncio.run(build())
    assert shared.stat().st_mode & 0o777 == 0o700


def test_worker_link_certificates_are_watched(pki: Pki, tmp_path: Path) -> None:
    from router.config import WorkerTlsConfig
    from router.tls import ClientTls

    ca_file = pki.ca_file(pki.ca, "ca")
    chain, key = pki.client("router")
    (tmp_path / "r.crt").write_bytes(chain)
    (tmp_path / "r.key").write_bytes(key)
    failed: list[str] = []
    tls = ClientTls(WorkerTlsConfig(enabled=True, ca_file=str(ca_file), cert_file=str(tmp_path / "r.crt"),
                                    key_file=str(tmp_path / "r.key")), failed.append)
    assert not tls.check() and tls.generation == 0  # nothing changed
    pki.ca_file(trustme.CA(), "ca")  # a new CA in place
    assert tls.check() and tls.generation == 1
    assert tls.material[0] == ca_file.read_bytes()
    _, other_key = pki.client("someone-else")
    (tmp_path / "r.key").write_bytes(other_key)  # a key that does not match: the last good files stay
    assert not tls.check() and tls.generation == 1 and failed == ["workers.tls"]
    assert tls.material[1] == key
