"""Router configuration: frozen dataclasses, validated on load.

A YAML file (``tfs-router serve --config FILE``) or the embedded default
(``configs/local.yaml``) is read into ``Config``.  Unknown keys are an error
naming their path (``models[0].batching.max_batch_sise: unknown key``), as are
wrong types and out-of-range values: a typo must never be silently ignored.
Every field has a default, so the smallest config names one model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.traffic import RoutingError, compile_routing

EMBEDDED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending path."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS on a listener.  The top-level ``tls`` block is the default of the gRPC,
    REST and admin listeners; a listener's own ``tls`` block, when it sets anything,
    replaces it.  Files are PEM and re-read when they change (rotation)."""

    cert_file: str = ""  # the certificate chain, leaf first
    key_file: str = ""
    # Mutual TLS: clients must present a certificate signed by this CA (with require_client_cert).
    client_ca_file: str = ""
    require_client_cert: bool = False
    # TF Serving's SSLConfig text proto (server_key, server_cert, custom_ca, client_verify:
    # PEM contents inline), instead of the files above (--ssl_config_file).
    ssl_config_file: str = ""
    plaintext: bool = False  # this listener stays plaintext even when the top-level block is set
    reload_s: float = 2.0  # how often the files are checked for a change

    @property
    def configured(self) -> bool:
        """The block says something (a listener's own block then replaces the top-level one)."""
        return bool(self.cert_file or self.key_file or self.ssl_config_file or self.plaintext
                    or self.client_ca_file or self.require_client_cert)

    @property
    def enabled(self) -> bool:
        return not self.plaintext and bool(self.cert_file or self.ssl_config_file)


@dataclass(frozen=True)
class WorkerTlsConfig:
    """TLS on the links to static and dns: workers over TCP (spawned workers use Unix sockets)."""

    enabled: bool = False
    ca_file: str = ""  # the CA that signed the workers' certificates ("": the system's roots)
    cert_file: str = ""  # the router's own certificate and key, for workers that require one (mTLS)
    key_file: str = ""
    server_name: str = ""  # the name the workers' certificates carry, when not the address's host
    reload_s: float = 2.0


@dataclass(frozen=True)
class GrpcConfig:
    host: str = "0.0.0.0"
    port: int = 8500
    # A backstop inside grpc.aio, which refuses past it with CANCELLED: the
    # router's own admission (limits.max_inflight, max_waiting) refuses with
    # RESOURCE_EXHAUSTED well before; 0 sizes it past those (+1024).
    max_concurrent_rpcs: int = 0
    max_message_bytes: int = 2**31 - 1  # TF Serving accepts up to 2 GB
    max_metadata_bytes: int = 16384  # request headers (metadata) per call
    # Per connection (HTTP/2); 0: gRPC's own default.  A stream past it is
    # refused (REFUSED_STREAM, UNAVAILABLE to the client), and clients put many
    # channels on one connection: leave it to the admission gates unless a
    # single connection must be capped.
    max_concurrent_streams: int = 0
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class RestConfig:
    host: str = "0.0.0.0"
    port: int = 8501
    max_body_bytes: int = 256 * 2**20
    max_connections: int = 4096  # open connections; more are closed at once
    max_header_bytes: int = 16384  # one header line (name and value)
    max_headers: int = 64
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class WorkersConfig:
    mode: str = "spawn"  # spawn: start and supervise local processes; static: use addresses
    count: int = 2
    # static: HOST:PORT or unix:PATH, or dns:NAME:PORT (every address NAME resolves
    # to, re-resolved every dns_refresh_s: a Kubernetes headless Service)
    addresses: tuple[str, ...] = ()
    # active: the router tells each worker which versions to hold (ReloadConfig)
    # and rolls new ones out staged; passive: it never does, it reads what each
    # worker holds (GetModelStatus every status_poll_s) and routes by that, so
    # workers that poll their own storage (tensorflow_model_server) stay in charge.
    control: str = "active"
    status_poll_s: float = 1.0
    dns_refresh_s: float = 5.0
    dns_drop_after: int = 2  # a dns: address missing from this many successful lookups in a row is dropped
    socket_dir: str = ""  # spawn: where the Unix sockets live (default: a private temp dir)
    # How the router sends Predict calls to workers: auto (frames to spawned workers,
    # gRPC to static ones), grpc (TF Serving's API everywhere), frames (spawned only).
    transport: str = "auto"
    numa: bool = True  # pin each worker to one NUMA node's CPUs and memory
    sysfs_root: str = "/sys/devices/system/node"
    cpus_per_worker: int = 0  # 0: a node's workers share all its CPUs; N: each worker its own N CPUs
    intra_op_threads: int = 0  # 0: the worker's CPU count
    inter_op_threads: int = 0  # 0: 1 or 2 by CPU count
    predict_threads: int = 0  # threads running TF calls per worker; 0: inline on its loop (measured fastest)
    max_inflight: int = 4  # requests or batches in flight per worker
    allocator: str = ""  # a malloc .so to LD_PRELOAD into workers (e.g. jemalloc)
    # Workers run at the lowest CPU priority: where they share cores with the
    # router, its event loop (which admits requests and forms batches) must
    # never wait for TF's compute threads, and workers that only get the CPU
    # the router leaves form bigger batches (measured without the model-wide
    # batch limit: c=64 2.43k req/s at nice 10, 2.78k at nice 19; with it, alike).
    nice: int = 19
    health_interval_s: float = 1.0
    startup_timeout_s: float = 180.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    tls: WorkerTlsConfig = field(default_factory=WorkerTlsConfig)


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    max_batch_size: int = 256  # rows
    batch_timeout_micros: int = 0  # 0: dispatch as soon as a worker slot frees
    max_inflight_batches: int = 1  # per worker (1 measured best on 2 cores: fuller batches)
    # Batches of this model in flight over all workers together (TF Serving's
    # num_batch_threads; its versions take turns, see share_wait_micros); 0: only the
    # per-worker limit applies.  1 suits
    # models that compute a batch in a few ms (the CTR models this serves):
    # one router's requests fit in one batch at a time, and every extra
    # concurrent batch only adds a fixed per-call cost in router and worker
    # (measured on 2 cores: same throughput, c=64 p99 28-32 ms against 37).
    max_concurrent_batches: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    max_enqueued: int = 8192  # rows waiting per queue
    # Versions of the model (a canary split) take turns under max_concurrent_batches (the
    # one whose requests waited longest first): a version's batch waits for another
    # version's batch in flight, but once that one has run this long it no longer counts,
    # so a slow version holds the others back by this much at most.  Measured in
    # bench-batching: a 90/10 split then costs 2-4% of throughput, against 5-15% with
    # every version batching on its own.  0: versions never wait for each other.
    share_wait_micros: int = 5000


@dataclass(frozen=True)
class RuleConfig:
    """One header rule of a model's routing: the first that matches decides the version."""

    header: str  # HTTP header or gRPC metadata key, matched case-insensitively
    version: str | int  # a label or a version number
    equals: str | int = ""
    one_of: tuple[str | int, ...] = ()
    matches: str = ""  # a regular expression the whole value must match
    present: bool = False  # the header is there, whatever its value


@dataclass(frozen=True)
class ProgressiveConfig:
    """Automatic canary steps: each held for interval_s, checked, then the next (empty steps: off)."""

    steps: tuple[int, ...] = ()  # canary weights in percent, e.g. [5, 25, 50, 100]
    interval_s: float = 60.0
    min_requests: int = 100  # canary requests an interval needs before it is judged
    max_error_rate_delta: float = 0.01  # canary error rate minus stable's, at most
    max_p99_ratio: float = 1.5  # canary p99 over stable's, at most


@dataclass(frozen=True)
class RoutingConfig:
    """Which version answers requests that name none (``docs``: README, Canary)."""

    rules: tuple[RuleConfig, ...] = ()
    split: dict[str, int] = field(default_factory=dict)  # label or version -> percent; sums to 100
    sticky_header: str = ""  # same value, same version; absent: chosen per request
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def document(self) -> dict[str, Any]:
        """This block in the admin API's JSON form (empty fields left out)."""
        doc: dict[str, Any] = {}
        rules = []
        for r in self.rules:
            rule: dict[str, Any] = {"header": r.header, "version": r.version}
            for key in ("equals", "one_of", "matches", "present"):
                value = getattr(r, key)
                if value not in ("", (), False):
                    rule[key] = list(value) if isinstance(value, tuple) else value
            rules.append(rule)
        if rules:
            doc["rules"] = rules
        if self.split:
            doc["split"] = dict(self.split)
        if self.sticky_header:
            doc["sticky_header"] = self.sticky_header
        if self.progressive.steps:
            doc["progressive"] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in dataclasses.asdict(self.progressive).items()}
        return doc


@dataclass(frozen=True)
class QuotaConfig:
    """One tenant's (or model's) share: every limit 0 means none."""

    max_inflight: int = 0  # admitted and not yet answered
    max_queued: int = 0  # more that may wait for one of those slots
    rate_per_s: float = 0.0  # a token bucket: sustained requests per second ...
    burst: int = 0  # ... and how many may come at once
    priority: str = "normal"  # high | normal | low: order of service and of shedding when the pool is saturated


@dataclass(frozen=True)
class QuotasConfig:
    tenant_header: str = "x-tenant"  # HTTP header / gRPC metadata key naming the tenant; absent: "default"
    # header: the tenant_header names the tenant; client_cert: the verified client certificate
    # does (its subject's common name, else its first subject alternative name; needs mutual TLS
    # on the gRPC and REST listeners).
    tenant_from: str = "header"
    default: QuotaConfig = field(default_factory=QuotaConfig)  # every tenant the config does not name
    tenants: dict[str, QuotaConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestLogConfig:
    """Request logging (router/reqlog.py): TF Serving's LoggingConfig, and where the files go."""

    sampling_rate: float = 0.0  # the share of requests logged, 0 to 1 (0: off)
    filename_prefix: str = ""  # files PREFIX.UNIXMS.PID.tfrecord (a relative prefix: from the working directory)
    max_file_bytes: int = 64 << 20  # a file is closed past this size ...
    max_file_age_s: float = 600.0  # ... or age
    max_total_bytes: int = 1 << 30  # the oldest files of the prefix go past this total
    max_queued: int = 4096  # records waiting for the writer; past it they are dropped (and counted)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: str
    version_policy: str = "latest"  # latest | latest:N | all | specific:V[,V...]
    version_labels: dict[str, int] = field(default_factory=dict)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    logging: RequestLogConfig = field(default_factory=RequestLogConfig)

    def policy(self) -> tuple[str, tuple[int, ...]]:
        """(kind, numbers): ("latest", (N,)), ("all", ()), ("specific", (v, ...))."""
        kind, _, arg = self.version_policy.partition(":")
        if kind == "latest":
            n = int(arg or 1)
            if n >= 1:
                return kind, (n,)
        elif kind == "all" and not arg:
            return kind, ()
        elif kind == "specific" and arg:
            versions = tuple(sorted({int(v) for v in arg.split(",")}))
            if versions[0] >= 0:
                return kind, versions
        raise ValueError(self.version_policy)


@dataclass(frozen=True)
class LimitsConfig:
    default_deadline_s: float = 10.0  # when the client sends none (REST always)
    max_queued: int = 1024  # requests waiting for a worker slot, per model (unbatched path)
    # Requests the router works on at once (the pool's saturation point): past
    # it they wait for admission, high priority first; past max_waiting they
    # are refused with RESOURCE_EXHAUSTED / 429.
    max_inflight: int = 256
    max_waiting: int = 4096
    priority_aging_s: float = 0.5  # a waiting request moves up one priority class per this long
    # A refusal is decided at once but answered this long later (never past the
    # request's deadline): a client that retries at once cannot spin the
    # router's CPU on refusals.  At most max_delayed_refusals are held; past
    # that, answered at once.
    refusal_delay_s: float = 0.5
    max_delayed_refusals: int = 2048
    max_tensor_elements: int = 1 << 24  # elements in one request tensor (16 Mi)


@dataclass(frozen=True)
class SourceConfig:
    """When a version directory counts as complete (a candidate to load)."""

    # A file whose presence marks a version directory complete (e.g. "_READY");
    # "": complete once saved_model.pb is there and the directory's listing and
    # file sizes stayed the same over ``stable_polls`` polls.
    ready_marker: str = ""
    stable_polls: int = 2


@dataclass(frozen=True)
class RolloutConfig:
    """How new versions reach the workers (DESIGN decision 4)."""

    # staged: drain -> load -> warm -> switch, one worker at a time;
    # in_place: load while serving (TF Serving's way, kept for comparison).
    strategy: str = "staged"
    # swap: a worker unloads the old versions before it loads the new, so it
    # holds one version at a time and reuses the memory it just freed; the
    # pool switches once at least as many workers serve the new default as
    # the old.  overlap: every worker holds old and new until one pool-wide
    # switch, then unloads the old: rollback and explicit requests for the
    # old version stay cheap, at twice the model's memory per worker, and a
    # load that needs fresh memory (measured: ~3 ms/MB of kernel time on
    # this project's VM) slows the workers that serve meanwhile.
    mode: str = "swap"
    # auto: start one extra worker when the pool cannot spare one (a pool of
    # one); always: for every rollout; never.
    surge: str = "auto"
    max_unavailable: int = 1  # workers out of rotation at once for a rollout
    min_serving: int = 1  # never fewer workers serving the default version
    drain_timeout_s: float = 30.0
    load_timeout_s: float = 600.0
    warmup_budget_s: float = 30.0  # per version and worker
    warmup_max_rounds: int = 20
    retry_backoff_s: float = 1.0  # a failed worker step is retried after this, doubling up to 30 s
    # A drained worker converts in bursts: the project's worker stops itself for
    # pace_pause_ms after every pace_run_ms while it unloads, loads and warms
    # (workers/pacer.py), so it never holds back the workers serving meanwhile;
    # pace_run_ms 0 turns it off.  Other TF Serving servers ignore the request.
    pace_run_ms: float = 1.0
    pace_pause_ms: float = 3.0


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"  # a non-loopback address needs TFS_ROUTER_ADMIN_TOKEN
    port: int = 8502  # 0 picks a free one; -1 turns the admin endpoint off
    tls: TlsConfig = field(default_factory=TlsConfig)  # required (with the token) off loopback


@dataclass(frozen=True)
class DataplaneConfig:
    """The data plane on several processes (router/procs.py)."""

    # 1: one process serves everything (no control channel); N > 1: the control plane plus
    # N data-plane processes sharing the gRPC and REST ports; 0 (auto): one per CPU, 1 to 8
    # (README: "The data plane on several processes" says why, and why 1 stays the default).
    processes: int = 1


@dataclass(frozen=True)
class StateConfig:
    """Where operator decisions made at run time are kept across restarts (router/state.py)."""

    backend: str = "file"  # file: a JSON file under dir; etcd: shared by every replica; none: memory only
    dir: str = ""  # file: "" is .tfs-router-state beside the config file (the working directory without one)
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)  # etcd: HOST:PORT of a member
    prefix: str = "/tfs-router/"  # etcd: the routers that share state share this prefix
    # etcd over TLS: the CA that signed the members' certificates, and the router's own certificate
    # for members that require one (--client-cert-auth); read again at each (re)connection
    tls: WorkerTlsConfig = field(default_factory=WorkerTlsConfig)
    username: str = ""  # etcd's authentication (etcdctl auth enable): this user, ...
    password_file: str = ""  # ... its password in this file (a Kubernetes Secret mounted as a file)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"  # text | json
    access_log: bool = False


@dataclass(frozen=True)
class Config:
    models: tuple[ModelConfig, ...] = ()
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    rest: RestConfig = field(default_factory=RestConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    poll_interval_s: float = 1.0  # how often base paths are scanned for new versions
    shutdown_timeout_s: float = 10.0
    tls: TlsConfig = field(default_factory=TlsConfig)  # the default of grpc.tls, rest.tls and admin.tls

    def listener_tls(self, listener: str) -> TlsConfig:
        """The TLS settings a listener (grpc, rest or admin) uses: its own block, else the top-level one."""
        own: TlsConfig = getattr(self, listener).tls
        return own if own.configured else self.tls

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


# -- loading --------------------------------------------------------------------


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{_join(path, str(key))}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {key: _convert(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is dict:
        key_t, _ = typing.get_args(hint)
        if isinstance(value, dict) and key_t is str:
            # A YAML key written as a number (``split: {1: 90, 2: 10}``) names a version.
            value = {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, path)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {_convert(key_t, k, path): _convert(val_t, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        # Scalars only (``str | int``: a label or a version number), taken as written.
        members = typing.get_args(hint)
        if isinstance(value, bool) or not isinstance(value, members):
            names = " or ".join(m.__name__ for m in members)
            raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(cfg: Config) -> None:
    names = [m.name for m in cfg.models]
    if not names:
        raise ConfigError("models: at least one model is required")
    if len(set(names)) != len(names):
        raise ConfigError(f"models: duplicate model names {names}")
    for i, m in enumerate(cfg.models):
        where = f"models[{i}]"
        if not m.name or "/" in m.name or ":" in m.name:
            raise ConfigError(f"{where}.name: {m.name!r} is not a valid model name")
        try:
            m.policy()
        except ValueError:
            raise ConfigError(
                f"{where}.version_policy: {m.version_policy!r} (use latest, latest:N, all or specific:V[,V...])"
            ) from None
        lg = m.logging
        if not 0.0 <= lg.sampling_rate <= 1.0:
            raise ConfigError(f"{where}.logging.sampling_rate: {lg.sampling_rate} (a share from 0 to 1)")
        if lg.sampling_rate > 0 and not lg.filename_prefix:
            raise ConfigError(f"{where}.logging.filename_prefix: needed when sampling_rate is above 0")
        for key in ("max_file_bytes", "max_total_bytes", "max_queued"):
            if getattr(lg, key) < 1:
                raise ConfigError(f"{where}.logging.{key}: must be at least 1")
        if lg.max_file_age_s <= 0:
            raise ConfigError(f"{where}.logging.max_file_age_s: must be greater than 0")
        b = m.batching
        for key in ("max_batch_size", "max_inflight_batches", "max_enqueued"):
            if getattr(b, key) < 1:
                raise ConfigError(f"{where}.batching.{key}: must be at least 1")
        if b.max_concurrent_batches < 0:
            raise ConfigError(f"{where}.batching.max_concurrent_batches: must be >= 0 (0: no limit)")
        if b.batch_timeout_micros < 0:
            raise ConfigError(f"{where}.batching.batch_timeout_micros: must be >= 0")
        if b.share_wait_micros < 0:
            raise ConfigError(f"{where}.batching.share_wait_micros: must be >= 0 (0: versions never wait)")
        try:
            compile_routing(m.routing.document(), m.version_labels)
        except RoutingError as exc:
            raise ConfigError(f"{where}.routing: {exc}") from None
        sizes = list(b.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != b.max_batch_size):
            raise ConfigError(
                f"{where}.batching.allowed_batch_sizes: must increase strictly and end at max_batch_size"
            )
    w = cfg.workers
    if w.mode not in ("spawn", "static"):
        raise ConfigError(f"workers.mode: {w.mode!r} (use spawn or static)")
    if w.mode == "spawn" and w.count < 1:
        raise ConfigError("workers.count: must be at least 1")
    if w.mode == "static" and not w.addresses:
        raise ConfigError("workers.addresses: static mode needs at least one address")
    if w.transport not in ("auto", "grpc", "frames"):
        raise ConfigError(f"workers.transport: {w.transport!r} (use auto, grpc or frames)")
    if w.transport == "frames" and w.mode != "spawn":
        raise ConfigError("workers.transport: frames needs workers.mode: spawn (static and dns: workers "
                          "are TF Serving servers, reached over gRPC); use auto or grpc")
    if w.control not in ("active", "passive"):
        raise ConfigError(f"workers.control: {w.control!r} (use active or passive)")
    if w.control == "passive" and w.mode != "static":
        raise ConfigError("workers.control: passive needs workers.mode: static (spawned workers are the router's own)")
    for i, addr in enumerate(w.addresses):
        if addr.startswith("dns:"):
            name, _, dns_port = addr[4:].rpartition(":")
            if not name or not dns_port.isdigit() or not 0 < int(dns_port) < 65536:
                raise ConfigError(f"workers.addresses[{i}]: {addr!r} (use dns:NAME:PORT)")
    if w.dns_drop_after < 1:
        raise ConfigError("workers.dns_drop_after: must be at least 1")
    if not 0 <= w.nice <= 19:
        raise ConfigError("workers.nice: must be between 0 and 19")
    if w.max_inflight < 1:
        raise ConfigError("workers.max_inflight: must be at least 1")
    for port, where in ((cfg.grpc.port, "grpc.port"), (cfg.rest.port, "rest.port")):
        if not 0 <= port < 65536:
            raise ConfigError(f"{where}: {port} is not a port")
    for value, where in ((cfg.poll_interval_s, "poll_interval_s"),
                         (cfg.shutdown_timeout_s, "shutdown_timeout_s"),
                         (cfg.limits.default_deadline_s, "limits.default_deadline_s"),
                         (w.health_interval_s, "workers.health_interval_s"),
                         (w.startup_timeout_s, "workers.startup_timeout_s"),
                         (w.restart_backoff_s, "workers.restart_backoff_s"),
                         (w.status_poll_s, "workers.status_poll_s"),
                         (w.dns_refresh_s, "workers.dns_refresh_s")):
        if value <= 0:
            raise ConfigError(f"{where}: must be greater than 0")
    r = cfg.rollout
    for key, allowed in (("strategy", ("staged", "in_place")), ("mode", ("swap", "overlap")),
                         ("surge", ("auto", "always", "never"))):
        if getattr(r, key) not in allowed:
            raise ConfigError(f"rollout.{key}: {getattr(r, key)!r} (use {' or '.join(allowed)})")
    if r.max_unavailable < 1:
        raise ConfigError("rollout.max_unavailable: must be at least 1")
    if r.min_serving < 0:
        raise ConfigError("rollout.min_serving: must be >= 0")
    if r.warmup_max_rounds < 1:
        raise ConfigError("rollout.warmup_max_rounds: must be at least 1")
    for key in ("drain_timeout_s", "load_timeout_s", "warmup_budget_s", "retry_backoff_s"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"rollout.{key}: must be greater than 0")
    if not (0 <= r.pace_run_ms <= 1000 and 0 < r.pace_pause_ms <= 1000):
        raise ConfigError("rollout.pace_run_ms: 0 (off) to 1000; rollout.pace_pause_ms: above 0, up to 1000")
    if cfg.source.stable_polls < 1:
        raise ConfigError("source.stable_polls: must be at least 1")
    if "/" in cfg.source.ready_marker:
        raise ConfigError("source.ready_marker: a file name inside the version directory, not a path")
    if not -1 <= cfg.admin.port < 65536:
        raise ConfigError(f"admin.port: {cfg.admin.port} is not a port (-1 turns the endpoint off)")
    q = cfg.quotas
    for where, quota in (("quotas.default", q.default), *((f"quotas.tenants.{n}", t) for n, t in q.tenants.items()),
                         *((f"models[{i}].quota", m.quota) for i, m in enumerate(cfg.models))):
        if quota.priority not in ("high", "normal", "low"):
            raise ConfigError(f"{where}.priority: {quota.priority!r} (use high, normal or low)")
        for key in ("max_inflight", "max_queued", "burst"):
            if getattr(quota, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0 (0: no limit)")
        if quota.rate_per_s < 0:
            raise ConfigError(f"{where}.rate_per_s: must be >= 0 (0: no limit)")
    if not q.tenant_header:
        raise ConfigError("quotas.tenant_header: a header name is required")
    lim = cfg.limits
    if lim.max_inflight < 1 or lim.max_waiting < 0 or lim.max_tensor_elements < 1:
        raise ConfigError("limits.max_inflight and max_tensor_elements must be at least 1, max_waiting >= 0")
    if lim.refusal_delay_s < 0 or lim.max_delayed_refusals < 0:
        raise ConfigError("limits.refusal_delay_s and max_delayed_refusals: must be >= 0 (0: answer at once)")
    if lim.priority_aging_s < 0:
        raise ConfigError("limits.priority_aging_s: must be >= 0 (0: no aging)")
    for key in ("max_connections", "max_header_bytes", "max_headers"):
        if getattr(cfg.rest, key) < 1:
            raise ConfigError(f"rest.{key}: must be at least 1")
    if cfg.limits.max_queued < 1:
        raise ConfigError("limits.max_queued: must be at least 1")
    _validate_tls(cfg)
    if cfg.state.backend not in ("file", "etcd", "none"):
        raise ConfigError(f"state.backend: {cfg.state.backend!r} (use file, etcd or none)")
    st = cfg.state
    if (st.tls.enabled or st.username or st.password_file) and st.backend != "etcd":
        raise ConfigError("state.tls, state.username and state.password_file: for state.backend: etcd")
    if bool(st.username) != bool(st.password_file):
        raise ConfigError("state.username and state.password_file go together")
    if bool(st.tls.cert_file) != bool(st.tls.key_file):
        raise ConfigError("state.tls: cert_file and key_file go together")
    if (st.tls.ca_file or st.tls.cert_file or st.tls.server_name) and not st.tls.enabled:
        raise ConfigError("state.tls: set enabled: true to reach etcd over TLS (files given, TLS off)")
    if cfg.state.backend == "etcd" and (not cfg.state.endpoints or not cfg.state.prefix.startswith("/")):
        raise ConfigError("state: etcd needs endpoints (HOST:PORT) and a prefix starting with /")
    if not 0 <= cfg.dataplane.processes <= 64:
        raise ConfigError("dataplane.processes: 0 (one per CPU) to 64")
    if cfg.log.format not in ("text", "json"):
        raise ConfigError(f"log.format: {cfg.log.format!r} (use text or json)")


def _validate_tls(cfg: Config) -> None:
    blocks = [("tls", cfg.tls)] + [(f"{n}.tls", getattr(cfg, n).tls) for n in ("grpc", "rest", "admin")]
    for where, t in blocks:
        if t.ssl_config_file and (t.cert_file or t.key_file or t.client_ca_file or t.require_client_cert):
            raise ConfigError(f"{where}: ssl_config_file carries the certificate, key and CA itself; "
                              "leave cert_file, key_file, client_ca_file and require_client_cert out")
        if bool(t.cert_file) != bool(t.key_file):
            raise ConfigError(f"{where}: cert_file and key_file go together")
        if t.require_client_cert and not t.client_ca_file:
            raise ConfigError(f"{where}.require_client_cert: needs client_ca_file (the CA clients' certificates "
                              "must chain to)")
        if t.client_ca_file and not t.require_client_cert:
            raise ConfigError(f"{where}.client_ca_file: used only with require_client_cert: true "
                              "(client certificates are required and verified, or not asked for)")
        if (t.client_ca_file or t.require_client_cert) and not (t.cert_file or t.ssl_config_file):
            raise ConfigError(f"{where}: mutual TLS needs the server's own cert_file and key_file")
        if t.reload_s <= 0:
            raise ConfigError(f"{where}.reload_s: must be greater than 0")
    for n in ("rest", "admin"):
        if cfg.listener_tls(n).ssl_config_file:
            raise ConfigError(f"{n}.tls: ssl_config_file applies to gRPC only, as in TF Serving; "
                              "give the REST and admin listeners cert_file and key_file")
    wt = cfg.workers.tls
    if bool(wt.cert_file) != bool(wt.key_file):
        raise ConfigError("workers.tls: cert_file and key_file go together")
    if (wt.ca_file or wt.cert_file or wt.server_name) and not wt.enabled:
        raise ConfigError("workers.tls: set enabled: true to use TLS to the workers (files given, TLS off)")
    if wt.enabled and cfg.workers.mode != "static":
        raise ConfigError("workers.tls: for static and dns: workers over TCP; spawned workers are reached "
                          "over Unix sockets in a private directory")
    if wt.reload_s <= 0:
        raise ConfigError("workers.tls.reload_s: must be greater than 0")
    q = cfg.quotas
    if q.tenant_from not in ("header", "client_cert"):
        raise ConfigError(f"quotas.tenant_from: {q.tenant_from!r} (use header or client_cert)")
    if q.tenant_from == "client_cert":
        for n in ("grpc", "rest"):
            if not (cfg.listener_tls(n).enabled and (cfg.listener_tls(n).require_client_cert
                                                     or cfg.listener_tls(n).ssl_config_file)):
                raise ConfigError(f"quotas.tenant_from: client_cert needs mutual TLS on {n} "
                                  f"({n}.tls or tls: client_ca_file and require_client_cert: true)")


def from_dict(data: dict[str, Any]) -> Config:
    cfg: Config = _build(Config, data, "")
    _validate(cfg)
    return cfg


def load(path: str | Path | None = None) -> Config:
    """Read and validate a config file (the embedded default when ``path`` is None)."""
    source = Path(path) if path else EMBEDDED_CONFIG
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def override(cfg: Config, **changes: Any) -> Config:
    """A copy with dotted-path overrides, e.g. ``override(cfg, **{"grpc.port": 0})``."""
    data = dataclasses.asdict(cfg)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        try:
            for part in parents:
                node = node[part]
        except (KeyError, TypeError):
            raise ConfigError(f"{dotted}: unknown key") from None
        node[leaf] = value
    return from_dict(_lists(data))


def asdict_lists(obj: Any) -> Any:
    """A config dataclass as the plain dict/list data the loader takes."""
    return _lists(dataclasses.asdict(obj))


def _lists(value: Any) -> Any:
    """asdict gives tuples; the loader expects YAML's lists."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
