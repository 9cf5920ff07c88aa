"""TF Serving's command line (router/tfs_flags.py): flags, the text files, and the config they make."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router import config as cfgmod
from router import tfs_flags as tf
from tests.support import ROOT, child_env

# Every flag of tensorflow_serving/model_servers/main.cc's flag_list (TF Serving 2.x), in its order.
MAIN_CC_FLAGS = [
    "port", "grpc_socket_path", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms",
    "rest_api_enable_cors_support", "enable_batching", "allow_version_labels_for_unavailable_models",
    "batching_parameters_file", "enable_per_model_batching_parameters", "model_config_file",
    "model_config_file_poll_wait_seconds", "model_name", "model_base_path", "num_load_threads",
    "num_unload_threads", "max_num_load_retries", "load_retry_interval_micros", "file_system_poll_wait_seconds",
    "flush_filesystem_caches", "tensorflow_session_parallelism", "tensorflow_session_config_file",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "use_alts_credentials",
    "ssl_config_file", "platform_config_file", "per_process_gpu_memory_fraction", "saved_model_tags",
    "grpc_channel_arguments", "grpc_max_threads", "enable_model_warmup", "num_request_iterations_for_warmup",
    "version", "monitoring_config_file", "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model",
    "num_tflite_pools", "num_tflite_interpreters_per_pool", "enable_signature_method_name_check",
    "xla_cpu_compilation_enabled", "xla_gpu_compilation_enabled", "enable_profiler",
    "thread_pool_factory_config_file", "mixed_precision", "skip_initialize_tpu",
    "enable_grpc_healthcheck_service", "enable_serialization_as_tensor_content",
]

# tensorflow_serving/g3doc/serving_config.md, verbatim.
DOCS_MODELS = """\
model_config_list {
  config {
    name: 'my_first_model'
    base_path: '/tmp/my_first_model/'
    model_platform: 'tensorflow'
  }
  config {
    name: 'my_second_model'
    base_path: '/tmp/my_second_model/'
    model_platform: 'tensorflow'
  }
}
"""
DOCS_SPECIFIC_42 = """\
model_version_policy {
  specific {
    versions: 42
  }
}
"""
DOCS_SPECIFIC_LABELS = """\
model_version_policy {
  specific {
    versions: 42
    versions: 43
  }
}
version_labels {
  key: 'stable'
  value: 42
}
version_labels {
  key: 'canary'
  value: 43
}
"""
DOCS_MONITORING = """\
prometheus_config {
  enable: true,
  path: "/monitoring/prometheus/metrics"
}
"""
DOCS_BATCHING = """\
max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
"""


def one_model(body: str, name: str = "m", base_path: str = "/models/m") -> str:
    """A models.config with one model whose ModelConfig holds ``body`` (docs snippets go here)."""
    inner = "\n".join("    " + line for line in body.splitlines())
    return (f"model_config_list {{\n  config {{\n    name: '{name}'\n    base_path: '{base_path}'\n"
            f"    model_platform: 'tensorflow'\n{inner}\n  }}\n}}\n")


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def plan(*argv: str) -> tf.Plan:
    return tf.build(tf.parse_args(argv))


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the command line; it must exit 2 with exactly one line on stderr, returned."""
    with pytest.raises(SystemExit) as exit_:
        tf.main(list(argv))
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


BASE = ("--model_base_path=/models/ctr",)


# -- the table ---------------------------------------------------------------------------


def test_the_table_has_every_flag_of_main_cc_once_in_order() -> None:
    assert [f.name for f in tf.FLAGS] == MAIN_CC_FLAGS
    assert len(tf.BY_NAME) == len(tf.FLAGS) + len(tf.OWN_FLAGS)


def test_every_accepted_flag_has_an_effect_or_an_exact_match() -> None:
    # Supported and mapped flags are written to a config key, handled by the builder,
    # or limited to the values the router matches by construction: none is ignored.
    for f in tf.FLAGS + tf.OWN_FLAGS:
        assert f.status in (tf.SUPPORTED, tf.MAPPED, tf.REFUSED, tf.OWN), f
        assert f.text, f
        if f.status == tf.REFUSED:
            assert not f.target and not f.accepts and f.name not in tf.HANDLED, f
        else:
            assert bool(f.target) + bool(f.accepts) + (f.name in tf.HANDLED) == 1, f
        if f.accepts:
            assert f.refuse, f
        if f.target:  # the key exists
            node: Any = cfgmod.asdict_lists(cfgmod.Config())
            for part in f.target.split("."):
                node = node[part]
    assert tf.HANDLED <= set(tf.BY_NAME)


def test_markdown_table_lists_every_flag_with_its_status() -> None:
    table = tf.markdown_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(tf.FLAGS)
    for f, row in zip(tf.FLAGS, rows):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`--{f.name}`"
        assert cells[2].startswith(f.status)
        assert len(cells) == 4, row
    assert "| `--platform_config_file` | \"\" | refused | the router serves TensorFlow SavedModels only" in table
    assert "| `--enable_model_warmup` | true | supported (`true` only) |" in table
    own = tf.markdown_table(tf.OWN_FLAGS).splitlines()
    assert len(own) == 2 + len(tf.OWN_FLAGS) and own[0] == "| flag | default | status | meaning |"


def test_help_lists_every_flag_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        tf.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for f in tf.FLAGS + tf.OWN_FLAGS:
        assert f"  --{f.name} (" in out
    assert "`" not in out


def test_version_prints_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        tf.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("TensorFlow ModelServer: tfs-router ")


# -- flag syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--port=9000", "--rest_api_port=9001"],
    ["--port", "9000", "--rest_api_port", "9001"],
    ["--port=9000", "--rest_api_port", "9001"],
    ["--grpc-port", "9000", "--rest-port=9001"],  # tfs-router serve's spellings
])
def test_both_value_forms(argv: list[str]) -> None:
    cfg = plan(*argv, *BASE).config
    assert (cfg.grpc.port, cfg.rest.port) == (9000, 9001)


@pytest.mark.parametrize(("argv", "enabled"), [
    (["--enable_batching"], True),
    (["--enable_batching=true"], True),
    (["--enable_batching=True"], True),
    (["--enable_batching=1"], True),
    (["--enable_batching=false"], False),
    (["--enable_batching=0"], False),
    ([], False),  # TF Serving: batching is off unless asked for
    (["--enable_batching", "--no-batching"], False),  # the last one wins
])
def test_boolean_forms(argv: list[str], enabled: bool) -> None:
    (model,) = plan(*argv, *BASE).config.models
    assert model.batching.enabled is enabled


def test_empty_string_flags_are_unset(capsys: pytest.CaptureFixture[str]) -> None:
    # docker entrypoints pass --flag=$VAR with VAR empty; TF Serving reads "" as unset
    cfg = plan("--ssl_config_file=", "--monitoring_config_file=", "--model_config_file=", *BASE).config
    assert cfg.models[0].name == "default"


@pytest.mark.parametrize(("argv", "message"), [
    (["--port=abc"], "--port=abc: expected an integer"),
    (["--port"], "--port: needs a value"),
    (["--enable_batching=maybe"], "--enable_batching=maybe: expected true or false"),
    (["--port=-1"], "--port=-1: must be at least 0"),
    (["--file_system_poll_wait_seconds=-1"], "--file_system_poll_wait_seconds=-1: must be at least 0"),
    (["--rest_api_timeout_in_ms=0"], "--rest_api_timeout_in_ms=0: must be at least 1"),
    (["--no-batching=true"], "--no-batching: takes no value"),
    (["models.config"], "models.config: unexpected argument"),
    (["--model_nam=x"], "--model_nam: unknown flag (not a tensorflow_model_server or tfs-router flag"),
    (["--use_tflite_model"], "--use_tflite_model: unknown flag"),
])
def test_bad_values_and_unknown_flags(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert fails(capsys, *argv, *BASE).startswith(f"tensorflow_model_server: {message}")


# -- each status ---------------------------------------------------------------------------

REFUSED = [f for f in tf.FLAGS if f.status == tf.REFUSED]
SAMPLE = {"bool": "true", "int": "4", "float": "0.5", "str": "x"}


@pytest.mark.parametrize("flag", REFUSED, ids=[f.name for f in REFUSED])
def test_refused_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str], flag: tf.Flag) -> None:
    line = fails(capsys, *BASE, f"--{flag.name}={SAMPLE[flag.kind]}")
    assert line == f"tensorflow_model_server: --{flag.name}: not supported: {flag.text.replace('`', '')}"


def test_a_refused_flag_is_refused_in_both_forms_and_before_anything_runs(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert fails(capsys, "--platform_config_file", "/etc/platform.config") == (
        "tensorflow_model_server: --platform_config_file: not supported: the router serves TensorFlow "
        "SavedModels only, with its own worker settings")


LIMITED = [f for f in tf.FLAGS if f.accepts]


@pytest.mark.parametrize("flag", LIMITED, ids=[f.name for f in LIMITED])
def test_limited_flags_take_the_routers_value_and_refuse_others(
        capsys: pytest.CaptureFixture[str], flag: tf.Flag) -> None:
    good = tf._shown(flag.accepts[0])
    assert plan(f"--{flag.name}={good}", *BASE).config.models[0].name == "default"
    bad = {"bool": "false" if flag.accepts[0] else "true", "float": "0.5", "str": "serve,tpu"}[flag.kind]
    line = fails(capsys, f"--{flag.name}={bad}", *BASE)
    assert line == f"tensorflow_model_server: --{flag.name}={bad}: not supported: {flag.refuse}"
    if flag.kind == "bool" and flag.accepts == (True,):
        assert plan(f"--{flag.name}", *BASE).config  # the bare form is true


def test_supported_and_mapped_flags_reach_the_config() -> None:
    cfg = plan("--port=8600", "--rest_api_port=8601", "--model_name=ctr", "--model_base_path=/models/ctr",
               "--rest_api_timeout_in_ms=2500", "--file_system_poll_wait_seconds=7",
               "--tensorflow_intra_op_parallelism=3", "--tensorflow_inter_op_parallelism=2",
               "--num_request_iterations_for_warmup=5", "--flush_filesystem_caches=false",
               "--workers=3", "--no_numa", "--cpus_per_worker=2", "--admin_port=0", "--log_level=debug").config
    assert (cfg.grpc.port, cfg.rest.port, cfg.admin.port) == (8600, 8601, 0)
    assert [(m.name, m.base_path, m.version_policy) for m in cfg.models] == [("ctr", "/models/ctr", "latest")]
    assert cfg.limits.default_deadline_s == 2.5
    assert cfg.poll_interval_s == 7.0 and cfg.source.stable_polls == 2
    w = cfg.workers
    assert (w.intra_op_threads, w.inter_op_threads, w.count, w.numa, w.cpus_per_worker) == (3, 2, 3, False, 2)
    assert cfg.rollout.warmup_max_rounds == 5
    assert cfg.log.level == "debug"


def test_defaults_follow_tf_serving_where_the_router_can() -> None:
    cfg = plan(*BASE).config
    assert cfg.grpc.port == 8500 and cfg.rest.port == 8501  # REST is never off here (TF Serving: off)
    assert cfg.models[0].name == "default" and not cfg.models[0].batching.enabled
    assert cfg.poll_interval_s == 1.0


def test_file_system_poll_wait_0_scans_once() -> None:
    cfg = plan("--file_system_poll_wait_seconds=0", *BASE).config
    assert cfg.poll_interval_s == tf.SCAN_ONCE_INTERVAL_S and cfg.source.stable_polls == 1


def test_session_parallelism_as_tf_serving_reads_it(capsys: pytest.CaptureFixture[str]) -> None:
    w = plan("--tensorflow_session_parallelism=4", *BASE).config.workers
    assert (w.intra_op_threads, w.inter_op_threads) == (4, 4)
    w = plan("--tensorflow_session_parallelism=4", "--tensorflow_intra_op_parallelism=2", *BASE).config.workers
    assert (w.intra_op_threads, w.inter_op_threads) == (2, 0)  # TF Serving: session parallelism unused then
    assert "not all three" in fails(capsys, "--tensorflow_session_parallelism=4", "--tensorflow_intra_op_parallelism=2",
                                    "--tensorflow_inter_op_parallelism=2", *BASE)


def test_same_grpc_and_rest_port_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert fails(capsys, "--port=9000", "--rest_api_port=9000", *BASE) == (
        "tensorflow_model_server: --rest_api_port=9000: cannot be the same as --port")
    cfg = plan("--port=0", "--rest_api_port=0", *BASE).config  # two free ports
    assert (cfg.grpc.port, cfg.rest.port) == (0, 0)


def test_no_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "no model: give --model_base_path" in fails(capsys, "--model_name=ctr")


def test_remote_base_paths_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "not supported: the router scans local directories only" in fails(
        capsys, "--model_base_path=gs://bucket/ctr")
    path = write(tmp_path, "models.config", one_model("", base_path="s3://bucket/m"))
    line = fails(capsys, f"--model_config_file={path}")
    assert line.startswith(f"{path}: model 'm': base_path 's3://bucket/m': not supported")


def test_relative_base_paths_are_refused_as_in_tf_serving(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    assert fails(capsys, "--model_base_path=models/ctr") == (
        "tensorflow_model_server: --model_base_path=models/ctr: must be an absolute path (as in TF Serving)")
    path = write(tmp_path, "models.config", one_model("", base_path="./m"))
    assert fails(capsys, f"--model_config_file={path}") == (
        f"{path}: model 'm': base_path './m': must be an absolute path (as in TF Serving)")


def test_static_workers_in_both_spellings() -> None:
    for argv in (["--static=h1:8500,h2:8500"], ["--static", "h1:8500", "h2:8500"]):
        w = plan(*argv, *BASE).config.workers
        assert (w.mode, w.addresses) == ("static", ("h1:8500", "h2:8500"))


# -- models.config --------------------------------------------------------------------------


def test_docs_model_config_list(tmp_path: Path) -> None:
    path = write(tmp_path, "models.config", DOCS_MODELS)
    cfg = plan(f"--model_config_file={path}").config
    assert [(m.name, m.base_path, m.version_policy, m.version_labels) for m in cfg.models] == [
        ("my_first_model", "/tmp/my_first_model/", "latest", {}),
        ("my_second_model", "/tmp/my_second_model/", "latest", {}),
    ]


@pytest.mark.parametrize(("body", "policy", "labels"), [
    (DOCS_SPECIFIC_42, "specific:42", {}),
    (DOCS_SPECIFIC_LABELS, "specific:42,43", {"stable": 42, "canary": 43}),
    ("model_version_policy { latest { num_versions: 2 } }", "latest:2", {}),
    ("model_version_policy { latest { } }", "latest", {}),  # unset num_versions: 1, as in TF Serving
    ("model_version_policy { all { } }", "all", {}),
    ("version_labels { key: 'stable' value: 1 }", "latest", {"stable": 1}),
])
def test_version_policies_and_labels(tmp_path: Path, body: str, policy: str, labels: dict[str, int]) -> None:
    path = write(tmp_path, "models.config", one_model(body))
    (model,) = plan(f"--model_config_file={path}").config.models
    assert (model.version_policy, model.version_labels) == (policy, labels)


def test_model_config_file_wins_over_model_name_as_in_tf_serving(tmp_path: Path) -> None:
    # the TF Serving image always passes --model_name/--model_base_path; a config file replaces them
    path = write(tmp_path, "models.config", DOCS_MODELS)
    cfg = plan("--model_name=model", "--model_base_path=/models/model", f"--model_config_file={path}").config
    assert [m.name for m in cfg.models] == ["my_first_model", "my_second_model"]


def test_docs_model_config_reads_as_the_official_classes_read_it(tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from protos import config_pb2

    for text in (DOCS_MODELS, one_model(DOCS_SPECIFIC_LABELS)):
        official = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
        ours = tf.parse_text(write(tmp_path, "models.config", text), config_pb2.ModelServerConfig())
        assert config_pb2.ModelServerConfig.FromString(official.SerializeToString()) == ours


def test_models_the_router_cannot_serve_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = one_model("").replace("model_platform: 'tensorflow'", "model_platform: 'tensorflow_lite'")
    path = write(tmp_path, "models.config", text)
    assert fails(capsys, f"--model_config_file={path}") == (
        f"{path}: model 'm': model_platform 'tensorflow_lite': not supported: the router serves TensorFlow "
        'SavedModels only (model_platform: "tensorflow")')
    path = write(tmp_path, "models.config", one_model("model_version_policy { specific { } }"))
    assert fails(capsys, f"--model_config_file={path}") == (
        f"{path}: model 'm': model_version_policy.specific: names no version")


def test_missing_platform_and_empty_list_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "models.config", "model_config_list { config { name: 'm' base_path: '/m' } }\n")
    assert "model_platform '': not supported" in fails(capsys, f"--model_config_file={path}")
    path = write(tmp_path, "empty.config", "")
    assert fails(capsys, f"--model_config_file={path}") == (
        f"{path}: model_config_list: names no model (the router needs at least one)")


def test_router_validation_errors_name_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = DOCS_MODELS.replace("my_second_model'", "my_first_model'", 1)
    path = write(tmp_path, "models.config", text)
    assert fails(capsys, f"--model_config_file={path}").startswith(f"{path}: models: duplicate model names")


def test_malformed_models_config_is_one_line_with_line_and_column(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    text = one_model("model_version_policy { latest { num_version: 2 } }")
    path = write(tmp_path, "models.config", text)
    row = next(i for i, line in enumerate(text.splitlines(), 1) if "num_version" in line)
    col = text.splitlines()[row - 1].index("num_version") + 1
    assert fails(capsys, f"--model_config_file={path}") == (
        f'{path}:{row}:{col}: Message type "tfsrouter.ServableVersionPolicy.Latest" has no field named '
        '"num_version".')
    # custom_model_config is TF Serving's but not the router's: named, with its place
    path = write(tmp_path, "custom.config", one_model("custom_model_config { }"))
    assert fails(capsys, f"--model_config_file={path}").startswith(f"{path}:6:5: ")


def test_unreadable_files_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.config"
    assert fails(capsys, f"--model_config_file={missing}") == f"{missing}: cannot read: No such file or directory"


# -- batching ---------------------------------------------------------------------------


def test_docs_batching_file_maps_onto_router_batching(tmp_path: Path) -> None:
    path = write(tmp_path, "batching.config", DOCS_BATCHING)
    (model,) = plan("--enable_batching", f"--batching_parameters_file={path}", *BASE).config.models
    b = model.batching
    assert (b.enabled, b.max_batch_size, b.batch_timeout_micros) == (True, 128, 0)
    assert b.max_enqueued == 1000000 * 128  # max_enqueued_batches x max_batch_size
    assert b.max_concurrent_batches == 8  # num_batch_threads
    assert b.allowed_batch_sizes == ()
    assert b.max_inflight_batches == cfgmod.BatchingConfig().max_inflight_batches  # the router's own knob


def test_absent_batching_fields_take_tf_serving_defaults(tmp_path: Path) -> None:
    (model,) = plan("--enable_batching", *BASE).config.models
    b = model.batching
    cpus = len(os.sched_getaffinity(0))
    assert (b.max_batch_size, b.batch_timeout_micros, b.max_enqueued, b.max_concurrent_batches) == (
        1000, 0, 10 * 1000, cpus)
    path = write(tmp_path, "batching.config", "max_batch_size { value: 4 }\nallowed_batch_sizes: 2\n"
                                              "allowed_batch_sizes: 4\nthread_pool_name { value: 'x' }\n")
    (model,) = plan("--enable_batching", f"--batching_parameters_file={path}", *BASE).config.models
    b = model.batching
    assert (b.max_batch_size, b.max_enqueued, b.allowed_batch_sizes, b.max_concurrent_batches) == (
        4, 10 * 4, (2, 4), cpus)


@pytest.mark.parametrize(("text", "message"), [
    ("pad_variable_length_inputs: true", ("pad_variable_length_inputs: not supported: the router batches only "
                                          "requests whose inner dimensions match; it never pads them")),
    ("enable_large_batch_splitting { value: true }", ("enable_large_batch_splitting: not supported: the router "
                                                      "never splits a request across batches")),
    ("num_batch_threads { value: 0 }", "num_batch_threads: must be at least 1, got 0"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "config error"),
])
def test_batching_the_router_cannot_do_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   text: str, message: str) -> None:
    path = write(tmp_path, "batching.config", text + "\n")
    line = fails(capsys, "--enable_batching", f"--batching_parameters_file={path}", *BASE)
    if message == "config error":  # the router's own check: allowed sizes end at max_batch_size
        assert line.startswith("tensorflow_model_server: config error: models[0].batching.allowed_batch_sizes")
    else:
        assert line.startswith(f"{path}: {message}")


def test_batching_file_needs_enable_batching(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "batching.config", DOCS_BATCHING)
    assert fails(capsys, f"--batching_parameters_file={path}", *BASE) == (
        "tensorflow_model_server: --batching_parameters_file: needs --enable_batching (TF Serving refuses it "
        "without)")


def test_malformed_batching_file_is_one_line_with_line_and_column(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    path = write(tmp_path, "batching.config", "max_batch_size { value: 8 }\nbatch_timeout_micros: 100\n")
    assert fails(capsys, "--enable_batching", f"--batching_parameters_file={path}", *BASE) == (
        f"{path}:2:23: 'batch_timeout_micros: 100': Expected \"{{\".")


def test_models_config_models_share_the_batching(tmp_path: Path) -> None:
    models = write(tmp_path, "models.config", DOCS_MODELS)
    batching = write(tmp_path, "batching.config", "max_batch_size { value: 16 }\n")
    cfg = plan(f"--model_config_file={models}", "--enable_batching", f"--batching_parameters_file={batching}").config
    assert [(m.batching.enabled, m.batching.max_batch_size) for m in cfg.models] == [(True, 16), (True, 16)]


# -- monitoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [DOCS_MONITORING, "prometheus_config { enable: true }",
                                  "prometheus_config { enable: true path: '/metrics' }"])
def test_monitoring_at_the_routers_paths_is_accepted(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "monitoring.config", text)
    assert plan(f"--monitoring_config_file={path}", *BASE).config


@pytest.mark.parametrize(("text", "message"), [
    ("prometheus_config { enable: true path: '/prom' }", ("prometheus_config.path '/prom': not supported: the "
                                                          "router serves metrics at /monitoring/prometheus/metrics "
                                                          "and /metrics only")),
    ("prometheus_config { enable: false }", "prometheus_config.enable: not supported unless true"),
    ("", "prometheus_config.enable: not supported unless true"),
])
def test_monitoring_elsewhere_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                                         message: str) -> None:
    path = write(tmp_path, "monitoring.config", text)
    assert fails(capsys, f"--monitoring_config_file={path}", *BASE).startswith(f"{path}: {message}")


# -- the re-read loader -------------------------------------------------------------------


def test_models_loader_rereads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    path.write_text(DOCS_MODELS)
    batching = cfgmod.BatchingConfig(max_batch_size=8)
    load = tf.models_loader(str(path), batching)
    assert [m.name for m in load()] == ["my_first_model", "my_second_model"]
    assert all(m.batching == batching for m in load())
    path.write_text(one_model(DOCS_SPECIFIC_42, name="third"))
    (model,) = load()
    assert (model.name, model.version_policy) == ("third", "specific:42")
    path.write_text("model_config_list {\n  config { nme: 'x' }\n}\n")
    with pytest.raises(cfgmod.ConfigError, match=rf"^{re.escape(str(path))}:2:12: .*no field named \"nme\""):
        load()


def test_poll_wait_makes_a_watch_with_the_files_batching(tmp_path: Path) -> None:
    path = write(tmp_path, "models.config", DOCS_MODELS)
    p = plan(f"--model_config_file={path}", "--model_config_file_poll_wait_seconds=30", "--enable_batching")
    assert p.watch is not None
    load, interval = p.watch
    assert interval == 30.0
    assert load() == p.config.models
    assert plan(f"--model_config_file={path}").watch is None  # 0 (the default): read once, as TF Serving
    assert plan("--model_config_file_poll_wait_seconds=30", *BASE).watch is None  # no file: nothing to re-read


# -- --config -----------------------------------------------------------------------------


def test_a_yaml_config_is_the_starting_point(tmp_path: Path) -> None:
    yaml_path = write(tmp_path, "router.yaml", (
        "models:\n  - name: ctr\n    base_path: /models/ctr\n    batching: {max_batch_size: 64, max_enqueued: 640}\n"
        "workers: {count: 3}\nlimits: {max_inflight: 99}\n"))
    cfg = plan(f"--config={yaml_path}", "--port=9100").config
    assert (cfg.models[0].name, cfg.models[0].batching.enabled, cfg.models[0].batching.max_batch_size) == (
        "ctr", True, 64)  # the YAML's models keep their batching without --enable_batching
    assert (cfg.workers.count, cfg.limits.max_inflight, cfg.grpc.port) == (3, 99, 9100)
    assert not plan(f"--config={yaml_path}", "--enable_batching=false").config.models[0].batching.enabled
    batching = write(tmp_path, "batching.config", "batch_timeout_micros { value: 500 }\n")
    b = plan(f"--config={yaml_path}", "--enable_batching", f"--batching_parameters_file={batching}").config.models[
        0].batching
    assert (b.max_batch_size, b.max_enqueued, b.batch_timeout_micros) == (64, 640, 500)  # the file's fields only
    cfg = plan(f"--config={yaml_path}", "--model_name=other", "--model_base_path=/models/other").config
    assert [m.name for m in cfg.models] == ["other"] and cfg.workers.count == 3


# -- entry points -------------------------------------------------------------------------


def test_tfs_router_serve_hands_tf_serving_flags_over(capsys: pytest.CaptureFixture[str]) -> None:
    from router import __main__ as entry

    with pytest.raises(SystemExit) as exit_:
        entry.main(["serve", "--port=0", "--platform_config_file=x", "--model-base-path=/m"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("tfs-router serve: --platform_config_file: not supported: the router serves "
                                       "TensorFlow SavedModels only, with its own worker settings\n")
    assert tf.wants(["--model_config_file", "x"]) and tf.wants(["--port=1"])
    assert not tf.wants(["--model-name", "x", "--grpc-port", "1", "--workers", "2", "--config", "c.yaml"])


def test_serve_takes_the_placement_flags_too(tmp_path: Path) -> None:
    from router import __main__ as entry

    args = entry.parser().parse_args(["serve", "--model-name", "m", "--model-base-path", "/m", "--no-numa",
                                      "--cpus-per-worker", "2", "--workers", "3"])
    w = entry.build_config(args).workers
    assert (w.numa, w.cpus_per_worker, w.count) == (False, 2, 3)


def test_console_script_is_installed() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'tensorflow_model_server = "router.tfs_flags:main"' in text
    script = Path(sys.executable).parent / "tensorflow_model_server"
    assert script.exists(), "reinstall the project: pip install -e . --no-deps"
    done = subprocess.run([str(script), "--platform_config_file=x"], env=child_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.startswith("tensorflow_model_server: --platform_config_file: ")
    done = subprocess.run([sys.executable, "-m", "router.tfs_flags", "--version"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "tfs-router" in done.stdout


def test_the_readme_shows_the_flag_tables_as_the_code_has_them() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert tf.markdown_table() in readme, "README's TF Serving flags table is stale: paste tf.markdown_table()"
    assert tf.markdown_table(tf.OWN_FLAGS) in readme
