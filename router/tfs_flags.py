"""``tensorflow_model_server`` command lines, run by tfs-router.

    tensorflow_model_server --port=8500 --rest_api_port=8501 \\
        --model_config_file=/models/models.config --model_config_file_poll_wait_seconds=60 \\
        --enable_batching --batching_parameters_file=/models/batching.config
    tensorflow_model_server --model_name=ctr --model_base_path=/models/ctr --workers=4
    tfs-router serve --port 8500 --model_name ctr --model_base_path /models/ctr

Every flag of TF Serving's ``tensorflow_serving/model_servers/main.cc`` is in
``FLAGS``, one record each: *supported* (same meaning), *mapped* (onto the
router's own setting, named there) or *refused* (exit status 2, one line
naming the flag and why).  A flag the router matches only at some values
lists them (``accepts``); any other value is refused the same way.  Nothing is
silently ignored.  ``OWN_FLAGS`` are tfs-router's additions (worker count and
placement, a YAML config to start from).  The same table drives the parser,
``--help`` and ``markdown_table()`` (the README's flags table).

Values: ``--flag=value`` or ``--flag value``; booleans as TF Serving writes
them: ``--enable_batching``, ``--enable_batching=true|false|1|0``.  A string
flag given empty is as if absent (TF Serving's "if non-empty").  The last of a
repeated flag wins.

The text files (``--model_config_file``, ``--batching_parameters_file``,
``--monitoring_config_file``) are read with protobuf's text format into the
project's own messages (``protos/config.proto``, ``batching.proto``,
``monitoring.proto``); a malformed one is refused as ``PATH:LINE:COL: message``.

The result is a ``router.config.Config`` built with ``from_dict``, plus, with
``--model_config_file_poll_wait_seconds``, a ``models_loader`` the running app
re-reads the model list with.  This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message

from protos import batching_pb2, config_pb2, monitoring_pb2
from router import config as cfgmod

SUPPORTED, MAPPED, REFUSED, OWN = "supported", "mapped", "refused", "tfs-router"

PROG = "tensorflow_model_server"
TF_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
METRICS_PATHS = (TF_PROMETHEUS_PATH, "/metrics")  # where router/frontends/http_server.py serves them
TF_PLATFORM = "tensorflow"
# --file_system_poll_wait_seconds=0 (TF Serving: scan once, never again): the
# router's next scan is this far away; poll_interval_s has no "never".
SCAN_ONCE_INTERVAL_S = 365 * 24 * 3600.0

# SharedBatchScheduler::QueueOptions' defaults, used by TF Serving for a
# BatchingParameters wrapper field that is absent.
TF_MAX_BATCH_SIZE = 1000
TF_BATCH_TIMEOUT_MICROS = 0
TF_MAX_ENQUEUED_BATCHES = 10


def tf_batch_threads() -> int:
    """SharedBatchScheduler::Options' num_batch_threads default: port::MaxParallelism(), the usable CPUs."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Flag:
    """One command-line flag and what tfs-router makes of it."""

    name: str
    kind: str  # bool | int | float | str | addresses
    default: str  # TF Serving's default (tfs-router's for OWN flags), as documentation
    status: str  # SUPPORTED | MAPPED | REFUSED | OWN
    text: str  # supported/mapped/own: what it does here; refused: why not
    target: str = ""  # a config key the value is written to as is (times ``scale``)
    scale: float = 1.0
    accepts: tuple[Any, ...] = ()  # the only values the router matches; empty: any
    refuse: str = ""  # why any other value is refused
    minimum: float | None = None


_CPUS = "4 x CPUs"
_TFLITE = "TensorFlow Lite models are not served (SavedModels only)"

FLAGS: tuple[Flag, ...] = (
    Flag("port", "int", "8500", SUPPORTED,
         "gRPC port (`grpc.port`); 0 picks a free one and prints it (TF Serving: 0 leaves gRPC unset, an error)",
         target="grpc.port", minimum=0),
    Flag("grpc_socket_path", "str", '""', REFUSED,
         "the router's gRPC front end listens on TCP only (--port)"),
    Flag("rest_api_port", "int", "0 (REST off)", SUPPORTED,
         "REST port (`rest.port`); absent: 8501. 0 picks a free one and prints it: the REST port also serves "
         "/metrics and /readyz, so it cannot be turned off (TF Serving: 0 turns REST off)",
         target="rest.port", minimum=0),
    Flag("rest_api_num_threads", "int", _CPUS, REFUSED,
         "the REST front end is asynchronous, with no thread pool to size; its concurrency is bounded by "
         "`limits.max_inflight` and `rest.max_connections` (--config)"),
    Flag("rest_api_timeout_in_ms", "int", "30000", MAPPED,
         "`limits.default_deadline_s` (ms / 1000): the deadline of every request that carries none, i.e. all "
         "REST requests, and also gRPC calls sent without a deadline (TF Serving: no limit for those)",
         target="limits.default_deadline_s", scale=0.001, minimum=1),
    Flag("rest_api_enable_cors_support", "bool", "false", SUPPORTED,
         "no CORS headers in REST responses, as TF Serving's default",
         accepts=(False,), refuse="the router's REST front end cannot send CORS headers"),
    Flag("enable_batching", "bool", "false", MAPPED,
         "`models[].batching.enabled` for every model; absent or false: no batching, as in TF Serving "
         "(models from --config keep their own setting unless the flag is given)"),
    Flag("allow_version_labels_for_unavailable_models", "bool", "false", SUPPORTED,
         "the router always lets a label name a version not loaded yet (requests for it fail "
         "until it is); TF Serving's default refuses such a config",
         accepts=(True,), refuse="the router always accepts labels of versions not loaded yet; it cannot refuse "
                                 "them"),
    Flag("batching_parameters_file", "str", '""', MAPPED,
         "text BatchingParameters onto `models[].batching`: `max_batch_size`, `batch_timeout_micros`, "
         "`max_enqueued` = max_enqueued_batches x max_batch_size, `max_concurrent_batches` = num_batch_threads "
         "(per model here, its versions taking turns; TF Serving's threads are shared by all models), `allowed_batch_sizes`; "
         "absent fields take TF Serving's defaults (1000, 0, 10 batches, the CPUs); "
         "`pad_variable_length_inputs: true` and `enable_large_batch_splitting: true` are refused; "
         "needs --enable_batching, as in TF Serving"),
    Flag("enable_per_model_batching_parameters", "bool", "false", SUPPORTED,
         "batching comes from --batching_parameters_file or --config",
         accepts=(False,), refuse="the router does not read batching_params.pbtxt from SavedModel directories; "
                                  "set per-model batching in --config (models[].batching)"),
    Flag("model_config_file", "str", '""', SUPPORTED,
         "text ModelServerConfig: `model_config_list` with `name`, `base_path` (an absolute local path), "
         "`model_platform` (\"tensorflow\" only), `model_version_policy` (latest, all, specific) and "
         "`version_labels`; --model_name and --model_base_path are then unused, as in TF Serving"),
    Flag("model_config_file_poll_wait_seconds", "int", "0", SUPPORTED,
         "re-read --model_config_file this often: models added, removed or changed are loaded and unloaded "
         "while serving; a broken file is logged and the last good list kept; 0: read once",
         minimum=0),
    Flag("model_name", "str", '"default"', SUPPORTED,
         "the model's name (with --model_base_path)"),
    Flag("model_base_path", "str", '""', SUPPORTED,
         "an absolute path to a local directory of numbered versions (remote file systems such as gs:// are "
         "refused)"),
    Flag("num_load_threads", "int", "0", REFUSED,
         "loads run inside each worker process, staged worker by worker (`rollout.max_unavailable`, --config)"),
    Flag("num_unload_threads", "int", "0", REFUSED,
         "unloads run inside each worker process, as part of a staged rollout"),
    Flag("max_num_load_retries", "int", "5", REFUSED,
         "the router does not retry a failed load: the version is rolled back and left out until its directory "
         "changes or an operator retries it (tfs-router rollout)"),
    Flag("load_retry_interval_micros", "int", "60000000", REFUSED,
         "the router does not retry a failed load (see --max_num_load_retries)"),
    Flag("file_system_poll_wait_seconds", "int", "1", MAPPED,
         "`poll_interval_s`; 0 scans once at start-up, as in TF Serving (the router then takes a version directory "
         "as complete at once, `source.stable_polls: 1`, and its next scan is a year away)",
         minimum=0),
    Flag("flush_filesystem_caches", "bool", "true", SUPPORTED,
         "either value: base paths are local, where TF Serving's flush is a no-op too (nothing is cached)"),
    Flag("tensorflow_session_parallelism", "int", "0 (auto)", MAPPED,
         "both `workers.intra_op_threads` and `workers.inter_op_threads`, per worker process; unused when "
         "--tensorflow_intra_op_parallelism or --tensorflow_inter_op_parallelism is set, an error with both, "
         "as in TF Serving", minimum=0),
    Flag("tensorflow_session_config_file", "str", '""', REFUSED,
         "workers build their own TF session options; only the thread counts can be set "
         "(--tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism)"),
    Flag("tensorflow_intra_op_parallelism", "int", "0 (auto)", SUPPORTED,
         "`workers.intra_op_threads`, per worker process (0: sized to the worker's CPUs)",
         target="workers.intra_op_threads", minimum=0),
    Flag("tensorflow_inter_op_parallelism", "int", "0 (auto)", SUPPORTED,
         "`workers.inter_op_threads`, per worker process (0: sized to the worker's CPUs)",
         target="workers.inter_op_threads", minimum=0),
    Flag("use_alts_credentials", "bool", "false", SUPPORTED,
         "gRPC without transport security",
         accepts=(False,), refuse="the router serves gRPC without transport security; secure it in front of the "
                                  "router"),
    Flag("ssl_config_file", "str", '""', SUPPORTED,
         "gRPC over TLS from TF Serving's SSLConfig text proto (server_key, server_cert, custom_ca, "
         "client_verify; PEM contents inline), as TF Serving: client_verify requires client certificates "
         "signed by custom_ca; REST stays plain HTTP, as in TF Serving (`grpc.tls.ssl_config_file`; "
         "re-read when the file changes)",
         target="grpc.tls.ssl_config_file"),
    Flag("platform_config_file", "str", '""', REFUSED,
         "the router serves TensorFlow SavedModels only, with its own worker settings"),
    Flag("per_process_gpu_memory_fraction", "float", "0", SUPPORTED,
         "TensorFlow picks, as in TF Serving",
         accepts=(0.0,), refuse="the workers do not set a GPU memory fraction"),
    Flag("saved_model_tags", "str", '"serve"', SUPPORTED,
         "the MetaGraph workers load",
         accepts=("serve",), refuse="the workers load the 'serve' MetaGraph only"),
    Flag("grpc_channel_arguments", "str", '""', REFUSED,
         "gRPC server options are the router's `grpc.*` keys (max_message_bytes, max_metadata_bytes, "
         "max_concurrent_streams, max_concurrent_rpcs; --config)"),
    Flag("grpc_max_threads", "int", _CPUS, REFUSED,
         "grpc.aio runs calls on the event loop, with no thread pool to size; concurrency is bounded by "
         "`grpc.max_concurrent_rpcs` and `limits.max_inflight` (--config)"),
    Flag("enable_model_warmup", "bool", "true", SUPPORTED,
         "every version is warmed up before it serves, from assets.extra/tf_serving_warmup_requests "
         "(or requests synthesized from its signatures when it has none)",
         accepts=(True,), refuse="the router always warms a version up before it serves"),
    Flag("num_request_iterations_for_warmup", "int", "0", MAPPED,
         "`rollout.warmup_max_rounds` when > 0: the warm-up requests are replayed at most this many times "
         "(the router stops earlier once a round's time stops falling; TF Serving replays exactly N times)"),
    Flag("version", "bool", "false", SUPPORTED,
         "prints tfs-router's version and the workers' TensorFlow version, and exits"),
    Flag("monitoring_config_file", "str", '""', SUPPORTED,
         "text MonitoringConfig: `prometheus_config { enable: true path: ... }` with path "
         "/monitoring/prometheus/metrics (the default) or /metrics, where the router serves its metrics "
         "on the REST port; other paths and `enable: false` are refused (the router always serves them, "
         "at those two paths only)"),
    Flag("remove_unused_fields_from_bundle_metagraph", "bool", "true", REFUSED,
         "a memory setting of TF Serving's SavedModelBundle; workers load models with tf.saved_model.load, "
         "which has no such option"),
    Flag("prefer_tflite_model", "bool", "false", SUPPORTED,
         "the TensorFlow model (saved_model.pb) is served",
         accepts=(False,), refuse=_TFLITE),
    Flag("num_tflite_pools", "int", "CPUs", REFUSED, _TFLITE),
    Flag("num_tflite_interpreters_per_pool", "int", "1", REFUSED, _TFLITE),
    Flag("enable_signature_method_name_check", "bool", "false", SUPPORTED,
         "Predict serves any signature, whatever its method name",
         accepts=(False,), refuse="the router does not check SignatureDef method names"),
    Flag("xla_cpu_compilation_enabled", "bool", "false", SUPPORTED,
         "functions saved with jit_compile are compiled by XLA, the workers' TensorFlow default "
         "(TF Serving's default turns XLA JIT off, and such models then fail)",
         accepts=(True,), refuse="the workers cannot turn XLA JIT off"),
    Flag("xla_gpu_compilation_enabled", "bool", "false", SUPPORTED,
         "XLA JIT stays on (see --xla_cpu_compilation_enabled)",
         accepts=(True,), refuse="the workers cannot turn XLA JIT off"),
    Flag("enable_profiler", "bool", "true", SUPPORTED,
         "no TF profiler service (TF Serving serves one by default)",
         accepts=(False,), refuse="the router serves no TensorFlow profiler service"),
    Flag("thread_pool_factory_config_file", "str", '""', REFUSED,
         "workers use TensorFlow's own thread pools, sized by --tensorflow_intra_op_parallelism and "
         "--tensorflow_inter_op_parallelism"),
    Flag("mixed_precision", "str", '""', REFUSED,
         "workers run models at the precision they were saved with"),
    Flag("skip_initialize_tpu", "bool", "false", REFUSED,
         "TPUs are not supported"),
    Flag("enable_grpc_healthcheck_service", "bool", "false", SUPPORTED,
         "grpc.health.v1 is always served (SERVING once the router is ready)",
         accepts=(True,), refuse="the router always serves grpc.health.v1"),
    Flag("enable_serialization_as_tensor_content", "bool", "false", SUPPORTED,
         "spawned workers always answer with tensor_content (strings excepted); "
         "TF Serving's default fills the typed *_val fields (tf.make_ndarray reads both)",
         accepts=(True,), refuse="spawned workers always serialize outputs as tensor_content"),
)

OWN_FLAGS: tuple[Flag, ...] = (
    Flag("config", "str", "none", OWN,
         "a tfs-router YAML config to start from; the flags above override it, and its models are served "
         "when neither --model_config_file nor --model_base_path is given"),
    Flag("workers", "int", "2", OWN, "worker processes to spawn (`workers.count`)",
         target="workers.count", minimum=1),
    Flag("processes", "int", "1", OWN, "data-plane processes sharing the ports (`dataplane.processes`; 0: one "
         "per CPU, 1 to 8)", target="dataplane.processes", minimum=0),
    Flag("numa", "bool", "true", OWN,
         "pin each worker to one NUMA node's CPUs and memory (`workers.numa`); --no_numa or --numa=false turns "
         "it off", target="workers.numa"),
    Flag("cpus_per_worker", "int", "0", OWN,
         "0: a node's workers share its CPUs; N: each worker pinned to its own N CPUs (`workers.cpus_per_worker`)",
         target="workers.cpus_per_worker", minimum=0),
    Flag("static", "addresses", "none", OWN,
         "use these TF-Serving-compatible servers (HOST:PORT, comma-separated) instead of spawning workers "
         "(`workers.mode: static`)"),
    Flag("admin_port", "int", "8502", OWN,
         "admin endpoint port on 127.0.0.1 (`admin.port`; 0 picks a free one, -1 turns it off)",
         target="admin.port", minimum=-1),
    Flag("log_level", "str", "info", OWN, "debug, info, warning or error (`log.level`)", target="log.level"),
)

BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS + OWN_FLAGS}
TF_FLAG_NAMES = frozenset(f.name for f in FLAGS)

# Other spellings: tfs-router serve's kebab-case flags (any "-" reads as "_"),
# and negations.
ALIASES = {"grpc_port": "port", "rest_port": "rest_api_port"}
NEGATIONS = {"no_batching": "enable_batching", "no_numa": "numa"}

# Flags the builder below handles beyond ``target``; a test checks that every
# accepted flag is either written to a key, handled here, or limited to
# values the router matches by construction (``accepts``).
HANDLED = frozenset({
    "enable_batching", "batching_parameters_file", "model_config_file", "model_config_file_poll_wait_seconds",
    "model_name", "model_base_path", "file_system_poll_wait_seconds", "tensorflow_session_parallelism",
    "num_request_iterations_for_warmup", "version", "monitoring_config_file", "config", "static",
    # Either value behaves as TF Serving's on the local paths the router serves (remote ones are refused).
    "flush_filesystem_caches",
})


class FlagError(Exception):
    """A command line that cannot be run; the message is one line naming the flag."""


class FileError(cfgmod.ConfigError):
    """A text config file that cannot be used; the message starts with ``PATH[:LINE:COL]:``."""


# -- parsing the command line ------------------------------------------------------

_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _bool(text: str, spelled: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise FlagError(f"{spelled}={text}: expected true or false")


def _value(flag: Flag, text: str, spelled: str) -> Any:
    if flag.kind == "bool":
        return _bool(text, spelled)
    if flag.kind == "int":
        try:
            value: Any = int(text, 10)
        except ValueError:
            raise FlagError(f"{spelled}={text}: expected an integer") from None
    elif flag.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise FlagError(f"{spelled}={text}: expected a number") from None
    elif flag.kind == "addresses":
        value = [a for a in text.split(",") if a]
    else:
        value = text
    if flag.minimum is not None and value < flag.minimum:
        raise FlagError(f"{spelled}={text}: must be at least {flag.minimum:g}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _plain(text: str) -> str:
    """Table text for a terminal: without Markdown's backticks."""
    return text.replace("`", "")


def _check(flag: Flag, value: Any) -> None:
    if flag.status == REFUSED:
        raise FlagError(f"--{flag.name}: not supported: {_plain(flag.text)}")
    if flag.accepts and value not in flag.accepts:
        raise FlagError(f"--{flag.name}={_shown(value)}: not supported: {_plain(flag.refuse)}")


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``{flag name: value}`` for the flags given, checked against the table; FlagError otherwise."""
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help", "--helpfull"):
            values["help"] = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"{arg}: unexpected argument (flags are --name=value or --name value)")
        spelled, eq, text = arg.partition("=")
        name = spelled[2:].replace("-", "_")
        negated = name in NEGATIONS
        name = NEGATIONS.get(name, ALIASES.get(name, name))
        flag = BY_NAME.get(name)
        if flag is None:
            raise FlagError(f"{spelled}: unknown flag (not a tensorflow_model_server or tfs-router flag; see --help)")
        if negated:
            if eq:
                raise FlagError(f"{spelled}: takes no value")
            value: Any = False
        elif flag.kind == "bool":
            value = _bool(text, spelled) if eq else True
        else:
            if not eq:
                if i >= len(args) or args[i].startswith("--"):
                    raise FlagError(f"{spelled}: needs a value")
                text = args[i]
                i += 1
                if flag.kind == "addresses":  # tfs-router serve's --static ADDR [ADDR ...]
                    while i < len(args) and not args[i].startswith("-"):
                        text += "," + args[i]
                        i += 1
            if flag.kind == "str" and text == "":
                values.pop(name, None)  # TF Serving: an empty string flag is unset
                continue
            value = _value(flag, text, spelled)
        _check(flag, value)
        values[name] = value
    return values


def wants(argv: Sequence[str]) -> bool:
    """Whether a ``tfs-router serve`` command line uses TF Serving's flags (spelled as TF Serving does)."""
    for arg in argv:
        if arg.startswith("--") and arg[2:].partition("=")[0] in TF_FLAG_NAMES:
            return True
    return False


# -- the text files ----------------------------------------------------------------

M = TypeVar("M", bound=Message)


def parse_text(path: str, message: M) -> M:
    """``path``'s text-format protobuf into ``message``; FileError ``PATH:LINE:COL: message`` if malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise FileError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        text_format.Parse(text, message)
        return message
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        where = path
        if line is not None:
            loc = f"{line}" if column is None else f"{line}:{column}"
            detail = detail.removeprefix(f"{loc} : ")
            where = f"{path}:{loc}"
        raise FileError(f"{where}: {detail}") from None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value


def tf_batching(base: cfgmod.BatchingConfig) -> cfgmod.BatchingConfig:
    """``base`` with TF Serving's batching defaults (the router's own fields, e.g. max_inflight_batches, kept)."""
    return dataclasses.replace(base, enabled=True, max_batch_size=TF_MAX_BATCH_SIZE,
                               batch_timeout_micros=TF_BATCH_TIMEOUT_MICROS,
                               max_enqueued=TF_MAX_ENQUEUED_BATCHES * TF_MAX_BATCH_SIZE,
                               max_concurrent_batches=tf_batch_threads(), allowed_batch_sizes=())


def apply_batching(params: batching_pb2.BatchingParameters, start: cfgmod.BatchingConfig, where: str, *,
                   default_batches: int | None = TF_MAX_ENQUEUED_BATCHES) -> cfgmod.BatchingConfig:
    """``start`` (enabled) with the fields ``params`` sets.  An absent max_enqueued_batches counts as
    ``default_batches`` batches of the (new) max_batch_size; None keeps ``start``'s row count."""
    if params.pad_variable_length_inputs:
        raise FileError(f"{where}: pad_variable_length_inputs: not supported: the router batches only requests "
                        "whose inner dimensions match; it never pads them")
    if params.HasField("enable_large_batch_splitting") and params.enable_large_batch_splitting.value:
        raise FileError(f"{where}: enable_large_batch_splitting: not supported: the router never splits a request "
                        "across batches (one larger than max_batch_size is sent on its own)")
    for field, least in (("max_batch_size", 1), ("batch_timeout_micros", 0), ("max_enqueued_batches", 1),
                         ("num_batch_threads", 1), ("max_execution_batch_size", 1)):
        if params.HasField(field) and getattr(params, field).value < least:
            raise FileError(f"{where}: {field}: must be at least {least}, got {getattr(params, field).value}")
    changes: dict[str, Any] = {"enabled": True}
    if params.HasField("max_batch_size"):
        changes["max_batch_size"] = params.max_batch_size.value
    if params.HasField("batch_timeout_micros"):
        changes["batch_timeout_micros"] = params.batch_timeout_micros.value
    if params.HasField("num_batch_threads"):
        changes["max_concurrent_batches"] = params.num_batch_threads.value
    if params.allowed_batch_sizes:
        changes["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
    size = changes.get("max_batch_size", start.max_batch_size)
    if params.HasField("max_enqueued_batches"):
        changes["max_enqueued"] = params.max_enqueued_batches.value * size
    elif default_batches is not None:
        changes["max_enqueued"] = default_batches * size
    return dataclasses.replace(start, **changes)


def _policy(config: config_pb2.ModelConfig, where: str) -> str:
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind is None:
        return "latest"  # TF Serving's default: the largest version
    if kind == "latest":
        n = policy.latest.num_versions or 1  # TF Serving: unset means 1
        return "latest" if n == 1 else f"latest:{n}"
    if kind == "all":
        return "all"
    versions = list(policy.specific.versions)
    if not versions:
        raise FileError(f"{where}: model_version_policy.specific: names no version")
    return "specific:" + ",".join(str(v) for v in versions)


def _logging(cfg: config_pb2.LoggingConfig, where: str) -> dict[str, Any]:
    """A model's logging_config as models[].logging (router/reqlog.py writes the files)."""
    kind = cfg.log_collector_config.type
    if kind not in ("", "tfrecord"):
        raise FileError(f"{where}: logging_config.log_collector_config.type {kind!r}: not supported (empty or "
                        "\"tfrecord\": files of PredictionLog records)")
    rate = cfg.sampling_config.sampling_rate
    if not 0.0 <= rate <= 1.0:
        raise FileError(f"{where}: logging_config.sampling_config.sampling_rate {rate}: must be from 0 to 1")
    prefix = cfg.log_collector_config.filename_prefix
    if rate > 0 and not prefix:
        raise FileError(f"{where}: logging_config.log_collector_config.filename_prefix: missing")
    return {"sampling_rate": rate, "filename_prefix": prefix}


def model_dicts(server: config_pb2.ModelServerConfig, batching: cfgmod.BatchingConfig,
                path: str) -> list[dict[str, Any]]:
    """A ModelServerConfig's models as config data, each with ``batching``."""
    if not server.HasField("model_config_list") or not server.model_config_list.config:
        raise FileError(f"{path}: model_config_list: names no model (the router needs at least one)")
    models = []
    for i, c in enumerate(server.model_config_list.config):
        where = f"{path}: model {c.name!r}" if c.name else f"{path}: model_config_list.config[{i}]"
        if not c.name:
            raise FileError(f"{where}: name: missing")
        if c.model_platform != TF_PLATFORM:
            raise FileError(f"{where}: model_platform {c.model_platform!r}: not supported: the router serves "
                            f"TensorFlow SavedModels only (model_platform: \"{TF_PLATFORM}\")")
        if not c.base_path:
            raise FileError(f"{where}: base_path: missing")
        if "://" in c.base_path:
            raise FileError(f"{where}: base_path {c.base_path!r}: not supported: the router scans local "
                            "directories only")
        if not os.path.isabs(c.base_path):
            raise FileError(f"{where}: base_path {c.base_path!r}: must be an absolute path (as in TF Serving)")
        model = {"name": c.name, "base_path": c.base_path, "version_policy": _policy(c, where),
                 "version_labels": dict(c.version_labels), "batching": cfgmod.asdict_lists(batching)}
        if c.HasField("logging_config"):
            model["logging"] = _logging(c.logging_config, where)
        models.append(model)
    return models


def read_models(path: str, batching: cfgmod.BatchingConfig) -> tuple[cfgmod.ModelConfig, ...]:
    """The models of the models.config at ``path``, validated as the router validates its own config."""
    models = model_dicts(parse_text(path, config_pb2.ModelServerConfig()), batching, path)
    try:
        return cfgmod.from_dict({"models": models}).models
    except cfgmod.ConfigError as exc:
        raise FileError(f"{path}: {exc}") from None


def models_loader(path: str, batching: cfgmod.BatchingConfig) -> Callable[[], tuple[cfgmod.ModelConfig, ...]]:
    """A function re-reading ``path`` (a models.config) each call: the models, every one with ``batching``.
    Raises router.config.ConfigError (``PATH:LINE:COL: ...`` when malformed)."""
    return lambda: read_models(path, batching)


def check_monitoring(path: str) -> None:
    """Refuse a MonitoringConfig the router cannot honour: it serves metrics always, at METRICS_PATHS."""
    prometheus = parse_text(path, monitoring_pb2.MonitoringConfig()).prometheus_config
    if not prometheus.enable:
        raise FileError(f"{path}: prometheus_config.enable: not supported unless true: the router always serves "
                        f"Prometheus metrics (at {' and '.join(METRICS_PATHS)})")
    wanted = prometheus.path or TF_PROMETHEUS_PATH
    if wanted not in METRICS_PATHS:
        raise FileError(f"{path}: prometheus_config.path {wanted!r}: not supported: the router serves metrics at "
                        f"{' and '.join(METRICS_PATHS)} only")


# -- building the router's config ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a command line runs: the config, and how to re-read the model list (or None)."""

    config: cfgmod.Config
    watch: tuple[Callable[[], tuple[cfgmod.ModelConfig, ...]], float] | None = None


def build(values: dict[str, Any]) -> Plan:
    """The router config a parsed command line describes (FlagError / ConfigError when it cannot run)."""
    base = cfgmod.load(values["config"]) if "config" in values else None
    data: dict[str, Any] = cfgmod.asdict_lists(base if base is not None else cfgmod.Config())

    enable = values.get("enable_batching")
    params_path = values.get("batching_parameters_file")
    if params_path and not enable:
        raise FlagError("--batching_parameters_file: needs --enable_batching (TF Serving refuses it without)")
    params = parse_text(params_path, batching_pb2.BatchingParameters()) if params_path else \
        batching_pb2.BatchingParameters()

    def batching_for(start: cfgmod.BatchingConfig | None) -> cfgmod.BatchingConfig:
        """TF-flag models: from TF Serving's defaults, or from the YAML's (``start``) with --config."""
        if start is None:
            start = tf_batching(cfgmod.BatchingConfig())
            if not enable:
                return dataclasses.replace(start, enabled=False)
            return apply_batching(params, start, params_path or "--batching_parameters_file")
        if not enable:
            return dataclasses.replace(start, enabled=False)
        return apply_batching(params, start, params_path or "--batching_parameters_file", default_batches=None)

    yaml_start = base.models[0].batching if base is not None and base.models else None
    config_file = values.get("model_config_file")
    watch = None
    if config_file:
        batching = batching_for(yaml_start)
        data["models"] = [cfgmod.asdict_lists(m) for m in read_models(config_file, batching)]
        interval = values.get("model_config_file_poll_wait_seconds", 0)
        if interval > 0:
            watch = (models_loader(config_file, batching), float(interval))
    elif values.get("model_base_path"):
        base_path = values["model_base_path"]
        if "://" in base_path:
            raise FlagError(f"--model_base_path={base_path}: not supported: the router scans local directories "
                            "only")
        if not os.path.isabs(base_path):
            raise FlagError(f"--model_base_path={base_path}: must be an absolute path (as in TF Serving)")
        data["models"] = [{"name": values.get("model_name", "default"), "base_path": base_path,
                           "batching": cfgmod.asdict_lists(batching_for(yaml_start))}]
    elif base is not None and base.models:
        if enable is not None:  # the YAML's models keep their batching unless the flag is given
            for m, model in zip(data["models"], base.models):
                m["batching"] = cfgmod.asdict_lists(batching_for(model.batching))
    else:
        raise FlagError("no model: give --model_base_path (and --model_name) or --model_config_file "
                        "(TF Serving: both empty is an error)")

    for name, value in values.items():
        flag = BY_NAME.get(name)
        if flag is not None and flag.target:
            _set(data, flag.target, value * flag.scale if flag.scale != 1.0 else value)

    if "port" in values and "rest_api_port" in values and values["port"] == values["rest_api_port"] != 0:
        raise FlagError(f"--rest_api_port={values['rest_api_port']}: cannot be the same as --port")
    intra = values.get("tensorflow_intra_op_parallelism", 0)
    inter = values.get("tensorflow_inter_op_parallelism", 0)
    session = values.get("tensorflow_session_parallelism", 0)
    if session > 0:
        if intra > 0 and inter > 0:
            raise FlagError("--tensorflow_session_parallelism: set it or --tensorflow_intra_op_parallelism and "
                            "--tensorflow_inter_op_parallelism, not all three (as in TF Serving)")
        if intra == 0 and inter == 0:
            data["workers"]["intra_op_threads"] = data["workers"]["inter_op_threads"] = session
    poll = values.get("file_system_poll_wait_seconds")
    if poll is not None:
        if poll == 0:
            data["poll_interval_s"] = SCAN_ONCE_INTERVAL_S
            data["source"]["stable_polls"] = 1
        else:
            data["poll_interval_s"] = float(poll)
    if values.get("num_request_iterations_for_warmup", 0) > 0:
        data["rollout"]["warmup_max_rounds"] = values["num_request_iterations_for_warmup"]
    if values.get("monitoring_config_file"):
        check_monitoring(values["monitoring_config_file"])
    if values.get("static"):
        data["workers"]["mode"] = "static"
        data["workers"]["addresses"] = list(values["static"])

    config = cfgmod.from_dict(data)
    if config.grpc.port == config.rest.port != 0:
        raise FlagError(f"the REST port {config.rest.port} cannot be the same as the gRPC port (--rest_api_port, "
                        "--port)")
    return Plan(config, watch)


# -- documentation -------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _status(flag: Flag) -> str:
    if flag.accepts:
        return f"{flag.status} (`{'`, `'.join(_shown(v) for v in flag.accepts)}` only)"
    return flag.status


def _meaning(flag: Flag) -> str:
    if not flag.accepts:
        return flag.text
    other = f"`{_shown(not flag.accepts[0])}`" if flag.kind == "bool" else "other values"
    return f"{flag.text}; {other} refused: {flag.refuse}"


def markdown_table(flags: Sequence[Flag] = FLAGS) -> str:
    """The flags as a Markdown table (the README's): flag, TF Serving's default, status, what tfs-router does."""
    head = "| flag | TF Serving default | status | in tfs-router |" if flags is FLAGS else \
        "| flag | default | status | meaning |"
    rows = [head, "| --- | --- | --- | --- |"]
    for f in flags:
        rows.append(f"| `--{f.name}` | {_cell(f.default)} | {_cell(_status(f))} | {_cell(_meaning(f))} |")
    return "\n".join(rows)


def usage(prog: str = PROG) -> str:
    lines = [f"usage: {prog} [--flag=value | --flag value] ...",
             "",
             "TF Serving's tensorflow_model_server flags, run by tfs-router (refused ones exit with status 2):"]
    for f in FLAGS:
        lines.append(_plain(f"  --{f.name} ({f.kind}, TF Serving default {f.default}): {_status(f)}: {_meaning(f)}"))
    lines += ["", "tfs-router's own flags:"]
    for f in OWN_FLAGS:
        lines.append(_plain(f"  --{f.name} ({f.kind}, default {f.default}): {f.text}"))
    return "\n".join(lines)


def version_text() -> str:
    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"TensorFlow ModelServer: tfs-router {installed('tfs-router')}\n"
            f"TensorFlow Library: {installed('tensorflow')} (in the workers; the router does not load it)")


# -- entry point ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """``tensorflow_model_server`` (the console script) and ``tfs-router serve`` with TF Serving's flags."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        values = parse_args(args)
        if values.get("help"):
            print(usage(prog))
            raise SystemExit(0)
        if values.get("version"):
            print(version_text())
            raise SystemExit(0)
        plan = build(values)
    except FlagError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileError as exc:  # PATH:LINE:COL: message, as compilers print it
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    except cfgmod.ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from router.__main__ import run

    raise SystemExit(run(plan.config, watch=plan.watch))


if __name__ == "__main__":
    main()
