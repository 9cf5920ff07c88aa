"""TLS for the router's listeners and its links to workers: certificates read, checked, and kept current.

A listener's certificate and key (and, for mutual TLS, the CA its clients'
certificates must chain to) come from PEM files (``tls`` in the config) or
from TF Serving's ``SSLConfig`` text proto with the PEM contents inline
(``--ssl_config_file``).  ``ServerTls`` reads them once at start (a missing,
unreadable or mismatched pair refuses the start, naming the file) and then
every ``reload_s`` compares the files' identity (inode, size, mtime of what
each path resolves to: Kubernetes replaces a mounted Secret by swapping a
symlink, cert-manager likewise), re-reading them when it changed.  A new pair
is checked the way a server would load it (``ssl.SSLContext.load_cert_chain``)
before anything uses it; a broken one is logged and counted and the last good
pair stays.  New handshakes then get the new certificate: gRPC asks for it on
each handshake (``grpc.dynamic_ssl_server_credentials``), aiohttp's listeners
switch the handshake's ``SSLContext`` in the server-name callback.
Established connections keep theirs and finish their calls.

``ClientTls`` is the same for the router's links to static and ``dns:``
workers (the CA to verify them by, an optional client certificate); a change
gives each worker's transport a new channel for its next calls.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format

from protos import ssl_config_pb2
from router.config import ConfigError, TlsConfig, WorkerTlsConfig

log = logging.getLogger("router.tls")

FileIdentity = tuple[tuple[str, tuple[int, int, int] | None], ...]


class TlsError(ConfigError):
    """Certificates that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class ServerMaterial:
    """What a listener presents and whom it accepts."""

    cert_chain: bytes  # PEM, leaf first
    key: bytes  # PEM
    client_ca: bytes | None  # PEM: client certificates are required and must chain to it
    fingerprint: str  # of the leaf certificate, for logs

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def _fingerprint(cert_chain: bytes) -> str:
    try:
        first = cert_chain.split(b"-----END CERTIFICATE-----", 1)[0] + b"-----END CERTIFICATE-----"
        der = ssl.PEM_cert_to_DER_cert(first.decode("ascii", "replace").strip())
    except ValueError:
        raise TlsError("the certificate file holds no PEM certificate") from None
    return hashlib.sha256(der).hexdigest()[:16]


def _context(purpose: ssl.Purpose, cert_chain: bytes | None, key: bytes | None, ca: bytes | None,
             where: str) -> ssl.SSLContext:
    """An SSLContext loaded from PEM bytes: Python's ssl loads a pair only from files, so the bytes
    already read (and checked as one pair) go through a private temporary directory, removed at once."""
    # Only the CA given is trusted (never the system's roots, for client certificates above all).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_chain is not None and key is not None:
        with tempfile.TemporaryDirectory(prefix="tfs-router-tls-") as tmp:  # mode 0700
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, cert_chain), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise TlsError(f"{where}: the key does not match the certificate, or either is not PEM "
                               f"({exc.reason or exc})") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"{where}: the CA file holds no usable PEM certificate ({exc})") from None
    return ctx


def read_ssl_config(path: str) -> ssl_config_pb2.SSLConfig:
    """TF Serving's SSLConfig text proto (``--ssl_config_file``)."""
    text = _read(path, "ssl_config_file").decode("utf-8", "replace")
    message = ssl_config_pb2.SSLConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise TlsError(f"ssl_config_file {path}: not a text-format SSLConfig: {exc}") from None
    return message


def read_server_material(cfg: TlsConfig) -> ServerMaterial:
    """A listener's certificate, key and client CA from its settings, checked as a server loads them."""
    if cfg.ssl_config_file:
        sc = read_ssl_config(cfg.ssl_config_file)
        where = f"ssl_config_file {cfg.ssl_config_file}"
        if not sc.server_cert or not sc.server_key:
            raise TlsError(f"{where}: server_cert and server_key are required")
        if sc.client_verify and not sc.custom_ca:
            raise TlsError(f"{where}: client_verify needs custom_ca (the CA client certificates must chain to)")
        chain, key = sc.server_cert.encode(), sc.server_key.encode()
        # As TF Serving: custom_ca matters only when client certificates are verified.
        ca = sc.custom_ca.encode() if sc.client_verify else None
    else:
        where = f"cert_file {cfg.cert_file} / key_file {cfg.key_file}"
        chain, key = _read(cfg.cert_file, "cert_file"), _read(cfg.key_file, "key_file")
        ca = _read(cfg.client_ca_file, "client_ca_file") if cfg.require_client_cert else None
    _context(ssl.Purpose.CLIENT_AUTH, chain, key, ca, where)
    try:
        fingerprint = _fingerprint(chain)
    except TlsError as exc:
        raise TlsError(f"{where}: {exc}") from None
    return ServerMaterial(chain, key, ca, fingerprint)


def _identity(paths: Sequence[str]) -> FileIdentity:
    """What each path resolves to now (a symlink swap changes the inode)."""
    out: list[tuple[str, tuple[int, int, int] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, (st.st_ino, st.st_size, st.st_mtime_ns)))
        except OSError:
            out.append((path, None))
    return tuple(out)


class _Watched(abc.ABC):
    """Files re-read when they change; the last good reading kept when a new one fails.
    Subclasses say what a reading is (``_load``)."""

    def __init__(self, name: str, paths: Sequence[str], reload_s: float,
                 on_reload_failed: Callable[[str], None] | None) -> None:
        self.name = name
        self._paths = tuple(p for p in paths if p)
        self.reload_s = reload_s
        self._seen = _identity(self._paths)
        self._on_failed = on_reload_failed
        self.generation = 0

    @abc.abstractmethod
    def _load(self) -> bool:
        """Read the files again; True when what they hold changed (raises TlsError)."""

    def check(self) -> bool:
        """Re-read the files if they changed since the last look; True when a new reading took effect."""
        now = _identity(self._paths)
        if now == self._seen:
            return False
        self._seen = now
        try:
            changed = self._load()
        except TlsError as exc:
            log.error("%s: new certificate files not used, the last good ones stay: %s", self.name, exc)
            if self._on_failed is not None:
                self._on_failed(self.name)
            return False
        if changed:
            self.generation += 1
        return changed

    async def watch(self) -> None:
        """Check every ``reload_s`` until cancelled (file reads off the event loop)."""
        while True:
            await asyncio.sleep(self.reload_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # the watcher outlives anything a filesystem does
                log.exception("%s: checking the certificate files failed", self.name)


class ServerTls(_Watched):
    """One listener's TLS: its material, kept current, as gRPC credentials or an SSLContext."""

    def __init__(self, name: str, cfg: TlsConfig, on_reload_failed: Callable[[str], None] | None = None,
                 alpn: Sequence[str] = ()) -> None:
        paths = (cfg.ssl_config_file,) if cfg.ssl_config_file else (cfg.cert_file, cfg.key_file, cfg.client_ca_file)
        super().__init__(name, paths, cfg.reload_s, on_reload_failed)
        self.cfg = cfg
        self._alpn = tuple(alpn)
        self.material = read_server_material(cfg)
        self._ctx = self._server_context(self.material)
        log.info("%s: TLS with certificate %s%s", name, self.material.fingerprint,
                 ", client certificates required" if self.material.mutual else "")

    def _load(self) -> bool:
        material = read_server_material(self.cfg)
        if material == self.material:
            return False
        if material.mutual != self.material.mutual:
            raise TlsError("whether client certificates are required cannot change while running; restart")
        ctx = self._server_context(material)
        old, self.material, self._ctx = self.material.fingerprint, material, ctx
        log.info("%s: new certificate %s (was %s) for new connections", self.name, material.fingerprint, old)
        return True

    def _server_context(self, m: ServerMaterial) -> ssl.SSLContext:
        ctx = _context(ssl.Purpose.CLIENT_AUTH, m.cert_chain, m.key, m.client_ca, self.name)
        ctx.verify_mode = ssl.CERT_REQUIRED if m.mutual else ssl.CERT_NONE
        if self._alpn:
            ctx.set_alpn_protocols(list(self._alpn))
        return ctx

    # -- gRPC ------------------------------------------------------------------

    def _grpc_config(self) -> Any:
        m = self.material
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert_chain)], root_certificates=m.client_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials that ask for the current certificate on each new handshake."""
        served = [self.generation]

        def fetch() -> Any:  # called by gRPC's own threads: reads only
            generation = self.generation
            if generation == served[0]:
                return None  # unchanged
            served[0] = generation
            return self._grpc_config()

        return grpc.dynamic_ssl_server_credentials(self._grpc_config(), fetch,
                                                   require_client_authentication=self.material.mutual)

    # -- asyncio (aiohttp) -----------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The context to listen with: each handshake switches to the current one."""
        base = self._server_context(self.material)

        def current(obj: Any, server_name: str | None, _: ssl.SSLContext) -> None:
            if self._ctx is not base:
                obj.context = self._ctx

        base.sni_callback = current
        return base


class ClientTls(_Watched):
    """The router's TLS towards its workers: the CA it verifies them by and its own certificate."""

    def __init__(self, cfg: WorkerTlsConfig, on_reload_failed: Callable[[str], None] | None = None) -> None:
        super().__init__("workers.tls", (cfg.ca_file, cfg.cert_file, cfg.key_file), cfg.reload_s, on_reload_failed)
        self.cfg = cfg
        self.material = self._read()

    def _read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        c = self.cfg
        ca = _read(c.ca_file, "workers.tls.ca_file") if c.ca_file else None
        chain = _read(c.cert_file, "workers.tls.cert_file") if c.cert_file else None
        key = _read(c.key_file, "workers.tls.key_file") if c.key_file else None
        _context(ssl.Purpose.SERVER_AUTH, chain, key, ca, "workers.tls")
        return ca, key, chain

    def _load(self) -> bool:
        material = self._read()
        if material == self.material:
            return False
        self.material = material
        log.info("workers.tls: new certificate files; each worker's next calls use a new connection")
        return True

    def credentials(self) -> grpc.ChannelCredentials:
        ca, key, chain = self.material
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.cfg.server_name)] if self.cfg.server_name else []


# -- who the client is (mutual TLS) ----------------------------------------------------


def _first(values: Iterable[Any] | None) -> str | None:
    for v in values or ():
        text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        if text:
            return text
    return None


def grpc_client_identity(auth_context: Mapping[str, Iterable[bytes]] | None) -> str | None:
    """A verified gRPC client's name: its certificate's common name, else its first SAN."""
    if not auth_context:
        return None
    return _first(auth_context.get("x509_common_name")) or _first(auth_context.get("x509_subject_alternative_name"))


def peercert_identity(peercert: Mapping[str, Any] | None) -> str | None:
    """The same from Python's ``getpeercert()`` dict (REST): common name, else first SAN."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return _first([value for _, value in peercert.get("subjectAltName", ())])


def is_tls_failure(details: str) -> bool:
    """A gRPC error's details say a TLS handshake or certificate check failed."""
    lowered = details.lower()
    return "handshake" in lowered or "certificate" in lowered or "ssl" in lowered
