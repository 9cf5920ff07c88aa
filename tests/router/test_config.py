"""router.config and the ``tfs-router serve`` quick flags: what loads, and what is refused by path."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from router import config as cfgmod
from router.__main__ import build_config, parser
from router.config import ConfigError, ModelConfig


def minimal(**extra: Any) -> dict[str, Any]:
    """The smallest valid config, with top-level keys added or replaced."""
    data: dict[str, Any] = {"models": [{"name": "m", "base_path": "/models/m"}]}
    data.update(extra)
    return data


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        cfgmod.from_dict(data)
    return str(info.value)


# -- loading ------------------------------------------------------------------------


def test_embedded_default_loads() -> None:
    cfg = cfgmod.load()
    assert [m.name for m in cfg.models] == ["ctr"]
    ctr = cfg.model("ctr")
    assert ctr is not None and ctr.base_path == "models/ctr"
    assert ctr.policy() == ("latest", (1,))
    assert ctr.batching.enabled and ctr.batching.max_batch_size == 256
    assert (cfg.grpc.port, cfg.rest.port) == (8500, 8501)
    assert (cfg.workers.mode, cfg.workers.count, cfg.workers.max_inflight) == ("spawn", 2, 4)
    assert cfg.model("nope") is None


def test_load_file_and_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - name: a\n    base_path: /a\nworkers:\n  count: 5\n")
    cfg = cfgmod.load(good)
    assert cfg.workers.count == 5 and cfg.models[0].name == "a"

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    base_path: /a\nworkers:\n  cont: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: workers\.cont: unknown key"):
        cfgmod.load(bad)

    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfgmod.load(broken)

    with pytest.raises(ConfigError, match="cannot read config"):
        cfgmod.load(tmp_path / "missing.yaml")


def test_defaults_fill_everything_but_the_model() -> None:
    cfg = cfgmod.from_dict(minimal())
    assert cfg.models[0].batching == cfgmod.BatchingConfig()
    assert cfg.workers == cfgmod.WorkersConfig()
    assert cfg.limits == cfgmod.LimitsConfig()


def test_no_model_is_refused() -> None:
    assert "models: at least one model" in refused({})


# -- unknown keys --------------------------------------------------------------------


def test_unknown_top_level_key_names_it() -> None:
    msg = refused(minimal(grcp={"port": 1}))
    assert msg.startswith("grcp: unknown key")
    assert "grpc" in msg  # the known keys are listed, so the typo is obvious


def test_unknown_nested_key_names_its_path() -> None:
    assert refused(minimal(workers={"cont": 3})).startswith("workers.cont: unknown key")


def test_unknown_key_inside_a_list_names_index_and_path() -> None:
    data = minimal()
    data["models"][0]["batching"] = {"max_batch_sise": 64}
    msg = refused(data)
    assert msg.startswith("models[0].batching.max_batch_sise: unknown key")
    assert "max_batch_size" in msg


def test_unknown_key_in_second_model() -> None:
    data = minimal()
    data["models"].append({"name": "n", "base_path": "/n", "polcy": "all"})
    assert refused(data).startswith("models[1].polcy: unknown key")


# -- wrong types ---------------------------------------------------------------------


def test_string_for_int_names_the_path() -> None:
    msg = refused(minimal(grpc={"port": "8500"}))
    assert msg.startswith("grpc.port: expected int")


def test_bool_for_int_names_the_path() -> None:
    assert refused(minimal(workers={"count": True})).startswith("workers.count: expected a number")


def test_int_for_bool_names_the_path() -> None:
    assert refused(minimal(workers={"numa": 1})).startswith("workers.numa: expected true or false")


def test_list_for_mapping_names_the_path() -> None:
    assert refused(minimal(workers=[1, 2])).startswith("workers: expected a mapping, got list")


def test_mapping_for_list_names_the_path() -> None:
    assert refused({"models": {"name": "m"}}).startswith("models: expected a list")


def test_wrong_type_inside_list_names_index() -> None:
    data = minimal()
    data["models"][0]["batching"] = {"allowed_batch_sizes": [1, "2"]}
    assert refused(data).startswith("models[0].batching.allowed_batch_sizes[1]: expected int")


def test_wrong_type_in_label_mapping() -> None:
    data = minimal()
    data["models"][0]["version_labels"] = {"stable": "1"}
    assert refused(data).startswith("models[0].version_labels.stable: expected int")


def test_int_is_accepted_for_float() -> None:
    cfg = cfgmod.from_dict(minimal(poll_interval_s=2))
    assert cfg.poll_interval_s == 2.0 and isinstance(cfg.poll_interval_s, float)


def test_missing_required_field_names_the_entry() -> None:
    assert refused({"models": [{"name": "m"}]}).startswith("models[0]:")


# -- version policy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "parsed"),
    [
        ("latest", ("latest", (1,))),
        ("latest:3", ("latest", (3,))),
        ("all", ("all", ())),
        ("specific:2,1", ("specific", (1, 2))),
        ("specific:3,1,3", ("specific", (1, 3))),
        ("specific:7", ("specific", (7,))),
    ],
)
def test_version_policy_parses(policy: str, parsed: tuple[str, tuple[int, ...]]) -> None:
    data = minimal()
    data["models"][0]["version_policy"] = policy
    assert cfgmod.from_dict(data).models[0].policy() == parsed


@pytest.mark.parametrize(
    "policy", ["newest", "latest:x", "all:2", "specific", "specific:", "specific:1,,2", "specific:a", ""]
)
def test_bad_version_policy_refused(policy: str) -> None:
    data = minimal()
    data["models"][0]["version_policy"] = policy
    assert refused(data).startswith("models[0].version_policy:")


@pytest.mark.parametrize("policy", ["latest:0", "latest:-1"])
def test_non_positive_latest_refused(policy: str) -> None:
    data = minimal()
    data["models"][0]["version_policy"] = policy
    assert refused(data).startswith("models[0].version_policy:")


# -- batching, workers, models ---------------------------------------------------------


def batching(**b: Any) -> dict[str, Any]:
    data = minimal()
    data["models"][0]["batching"] = b
    return data


def test_allowed_batch_sizes_valid() -> None:
    cfg = cfgmod.from_dict(batching(max_batch_size=32, allowed_batch_sizes=[4, 8, 32]))
    assert cfg.models[0].batching.allowed_batch_sizes == (4, 8, 32)


@pytest.mark.parametrize(
    "sizes",
    [
        [8, 4, 32],  # not increasing
        [4, 4, 32],  # not strictly increasing
        [4, 8, 16],  # does not end at max_batch_size
        [0, 32],  # below 1
        [4, 64],  # beyond max_batch_size
    ],
)
def test_allowed_batch_sizes_refused(sizes: list[int]) -> None:
    msg = refused(batching(max_batch_size=32, allowed_batch_sizes=sizes))
    assert msg.startswith("models[0].batching.allowed_batch_sizes:")


@pytest.mark.parametrize("key", ["max_batch_size", "max_inflight_batches", "max_enqueued"])
def test_batching_minimums(key: str) -> None:
    assert refused(batching(**{key: 0})).startswith(f"models[0].batching.{key}: must be at least 1")


def test_negative_batch_timeout_refused() -> None:
    assert refused(batching(batch_timeout_micros=-1)).startswith("models[0].batching.batch_timeout_micros")


def test_static_mode_requires_addresses() -> None:
    assert refused(minimal(workers={"mode": "static"})).startswith("workers.addresses:")
    cfg = cfgmod.from_dict(minimal(workers={"mode": "static", "addresses": ["h:1", "h:2"]}))
    assert cfg.workers.addresses == ("h:1", "h:2")


def test_bad_worker_mode_and_counts_refused() -> None:
    assert refused(minimal(workers={"mode": "fork"})).startswith("workers.mode:")
    assert refused(minimal(workers={"count": 0})).startswith("workers.count:")
    assert refused(minimal(workers={"max_inflight": 0})).startswith("workers.max_inflight:")


def test_ports_and_log_format_checked() -> None:
    assert refused(minimal(grpc={"port": 65536})).startswith("grpc.port:")
    assert refused(minimal(rest={"port": -1})).startswith("rest.port:")
    assert refused(minimal(log={"format": "xml"})).startswith("log.format:")


def test_duplicate_model_names_refused() -> None:
    data = {"models": [{"name": "m", "base_path": "/a"}, {"name": "m", "base_path": "/b"}]}
    assert refused(data).startswith("models: duplicate model names")


@pytest.mark.parametrize("name", ["", "a/b", "a:b"])
def test_bad_model_names_refused(name: str) -> None:
    assert refused({"models": [{"name": name, "base_path": "/a"}]}).startswith("models[0].name:")


# -- override and immutability -------------------------------------------------------------


def test_override_changes_one_field_and_keeps_the_rest() -> None:
    cfg = cfgmod.from_dict(minimal(workers={"count": 7}))
    new = cfgmod.override(cfg, **{"grpc.port": 0, "rest.port": 0})
    assert (new.grpc.port, new.rest.port) == (0, 0)
    assert new.workers.count == 7 and new.models == cfg.models
    assert (cfg.grpc.port, cfg.rest.port) == (8500, 8501)  # the original is untouched


def test_override_revalidates() -> None:
    cfg = cfgmod.from_dict(minimal())
    with pytest.raises(ConfigError, match=r"^grpc\.port: expected int"):
        cfgmod.override(cfg, **{"grpc.port": "x"})
    with pytest.raises(ConfigError, match=r"^workers\.count: must be at least 1"):
        cfgmod.override(cfg, **{"workers.count": 0})
    with pytest.raises(ConfigError, match=r"^grpc\.prot: unknown key"):
        cfgmod.override(cfg, **{"grpc.prot": 1})


def test_asdict_lists_round_trips() -> None:
    data = minimal(workers={"mode": "static", "addresses": ["a:1"]})
    data["models"][0].update(version_labels={"stable": 1}, batching={"max_batch_size": 8, "allowed_batch_sizes": [2, 8]})
    cfg = cfgmod.from_dict(data)
    assert cfgmod.from_dict(cfgmod.asdict_lists(cfg)) == cfg


def test_config_objects_are_frozen() -> None:
    cfg = cfgmod.load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpc.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models[0].batching.enabled = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers.count = 9  # type: ignore[misc]
    assert isinstance(cfg.models, tuple) and isinstance(cfg.workers.addresses, tuple)


# -- tfs-router serve quick flags ------------------------------------------------------------


def serve(*argv: str) -> cfgmod.Config:
    return build_config(parser().parse_args(["serve", *argv]))


def test_quick_flags_build_one_model_with_batching() -> None:
    cfg = serve("--model-name", "m", "--model-base-path", "/x", "--workers", "3",
                "--grpc-port", "0", "--rest-port", "0")
    assert [(m.name, m.base_path) for m in cfg.models] == [("m", "/x")]
    assert cfg.models[0].batching.enabled
    assert cfg.models[0].version_policy == "latest"
    assert cfg.workers.count == 3
    assert (cfg.grpc.port, cfg.rest.port) == (0, 0)


def test_no_batching_turns_batching_off() -> None:
    cfg = serve("--model-name", "m", "--model-base-path", "/x", "--no-batching")
    assert [m.batching.enabled for m in cfg.models] == [False]
    assert serve("--no-batching").models[0].batching.enabled is False  # embedded config too


def test_model_name_without_base_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--model-name and --model-base-path"):
        serve("--model-name", "m")
    with pytest.raises(ConfigError, match="--model-name and --model-base-path"):
        serve("--model-base-path", "/x")


def test_no_flags_is_the_embedded_config() -> None:
    assert serve() == cfgmod.load()


def test_static_quick_flag() -> None:
    cfg = serve("--static", "h:1", "h:2", "--model-name", "m", "--model-base-path", "/x")
    assert cfg.workers.mode == "static" and cfg.workers.addresses == ("h:1", "h:2")


def test_quick_flags_override_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - name: a\n    base_path: /a\n    batching:\n      max_batch_size: 16\n"
                    "workers:\n  count: 4\n")
    cfg = serve("--config", str(path), "--model-name", "m", "--model-base-path", "/x", "--grpc-port", "0")
    assert [m.name for m in cfg.models] == ["m"]
    assert cfg.models[0].batching.max_batch_size == 16  # the file's batching carries over
    assert cfg.workers.count == 4 and cfg.grpc.port == 0


def test_bad_quick_flag_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="workers.count"):
        serve("--model-name", "m", "--model-base-path", "/x", "--workers", "0")
    with pytest.raises(ConfigError, match="grpc.port"):
        serve("--grpc-port", "70000")


def test_model_config_policy_direct() -> None:
    assert ModelConfig("m", "/m", version_policy="specific:5,3").policy() == ("specific", (3, 5))


@pytest.mark.parametrize("workers, message", [
    ({"transport": "tcp"}, "workers.transport: 'tcp' (use auto, grpc or frames)"),
    ({"transport": "frames", "mode": "static", "addresses": ["h:1"]}, "workers.transport: frames needs workers.mode: spawn"),
])
def test_worker_transport_is_checked(workers: dict[str, Any], message: str) -> None:
    assert message in refused(minimal(workers=workers))
    assert cfgmod.from_dict(minimal()).workers.transport == "auto"


@pytest.mark.parametrize("extra, message", [
    ({"tls": {"cert_file": "c.pem"}}, "tls: cert_file and key_file go together"),
    ({"grpc": {"tls": {"cert_file": "c", "key_file": "k", "require_client_cert": True}}},
     "grpc.tls.require_client_cert: needs client_ca_file"),
    ({"rest": {"tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}}},
     "rest.tls.client_ca_file: used only with require_client_cert: true"),
    ({"tls": {"ssl_config_file": "s", "cert_file": "c", "key_file": "k"}}, "tls: ssl_config_file carries"),
    ({"grpc": {"tls": {"ssl_config_file": "s"}}, "rest": {"tls": {"ssl_config_file": "s"}}},
     "rest.tls: ssl_config_file applies to gRPC only"),
    ({"tls": {"cert_file": "c", "key_file": "k", "reload_s": 0}}, "tls.reload_s: must be greater than 0"),
    ({"workers": {"tls": {"enabled": True}}}, "workers.tls: for static and dns: workers over TCP"),
    ({"workers": {"mode": "static", "addresses": ["h:1"], "tls": {"ca_file": "ca"}}},
     "workers.tls: set enabled: true"),
    ({"quotas": {"tenant_from": "cert"}}, "quotas.tenant_from: 'cert' (use header or client_cert)"),
    ({"quotas": {"tenant_from": "client_cert"}, "tls": {"cert_file": "c", "key_file": "k"}},
     "quotas.tenant_from: client_cert needs mutual TLS on grpc"),
])
def test_tls_settings_are_checked(extra: dict[str, Any], message: str) -> None:
    assert message in refused(minimal(**extra))


def test_a_listeners_own_tls_block_replaces_the_top_level_one() -> None:
    cfg = cfgmod.from_dict(minimal(tls={"cert_file": "c", "key_file": "k"}, admin={"tls": {"plaintext": True}},
                            rest={"tls": {"cert_file": "rc", "key_file": "rk", "client_ca_file": "ca",
                                          "require_client_cert": True}}))
    assert cfg.listener_tls("grpc").cert_file == "c" and cfg.listener_tls("grpc").enabled
    assert cfg.listener_tls("rest").cert_file == "rc" and cfg.listener_tls("rest").require_client_cert
    assert not cfg.listener_tls("admin").enabled
    assert not cfgmod.from_dict(minimal()).listener_tls("grpc").enabled  # plaintext unless asked
