"""docker-compose.yml, as users get it, is a valid compose file, wired as documented.

Validation is ``docker-compose config -q`` from Debian's ``docker-compose``
package (compose v1): it checks the file against the compose schema offline,
with no Docker engine (``make test`` installs it). A broken copy must fail, so
the check is known to check something. ``make compose-test`` brings the stack up
for real (deploy/compose.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OFFLINE = ROOT / "docker-compose.offline.yml"


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is missing: Debian's docker-compose package (compose v1) validates "
            "docker-compose.yml offline. Install it with `apt-get install docker-compose` "
            "(`make test` does).",
            pytrace=False,
        )
    return exe


def compose(*files: Path, command: tuple[str, ...] = ("config", "-q")) -> subprocess.CompletedProcess[str]:
    """docker-compose on ``files``, relative paths taken from the repository (as for the real file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and k != "BASE_IMAGE"}
    args = [docker_compose(), "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run([*args, *command], check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def check(run: subprocess.CompletedProcess[str], what: str) -> None:
    assert run.returncode == 0, f"`docker-compose config -q` rejects {what}:\n{run.stderr}{run.stdout}"


def resolved(*files: Path) -> dict:
    run = compose(*files, command=("config",))
    check(run, " + ".join(f.name for f in files))
    return yaml.safe_load(run.stdout)


def test_compose_file_is_valid() -> None:
    check(compose(COMPOSE), "docker-compose.yml")


def test_offline_override_is_valid() -> None:
    check(compose(COMPOSE, OFFLINE), "docker-compose.yml + docker-compose.offline.yml")


BREAKAGES = {
    "unknown key": (
        ("    ports:\n      - \"8500:8500\"", "    portz:\n      - \"8500:8500\""),
        "portz",
    ),
    "bad depends_on condition": (
        ("condition: service_completed_successfully", "condition: service_finished"),
        "service_finished",
    ),
    "not YAML": (("services:\n", "services:\n  - [\n"), ""),
}


def test_an_unbroken_copy_passes(tmp_path: Path) -> None:
    """The control for the broken copies below: copying alone changes nothing."""
    copy = tmp_path / "docker-compose.yml"
    shutil.copy(COMPOSE, copy)
    check(compose(copy), "an unchanged copy of docker-compose.yml")


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_copy_fails(tmp_path: Path, breakage: str) -> None:
    (old, new), culprit = BREAKAGES[breakage]
    text = COMPOSE.read_text(encoding="utf-8")
    assert old in text, f"the test's anchor {old!r} is no longer in docker-compose.yml: update BREAKAGES"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1), encoding="utf-8")
    run = compose(broken)
    assert run.returncode != 0, f"docker-compose config -q accepted a copy with {breakage}"
    assert culprit in run.stderr, run.stderr


def test_services_are_wired_as_documented() -> None:
    services = resolved(COMPOSE)["services"]
    assert set(services) == {"model-init", "router", "prometheus", "grafana", "locust"}

    router = services["router"]
    assert router["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
    published = {str(p["target"]) if isinstance(p, dict) else str(p).split(":")[-1] for p in router["ports"]}
    assert published == {"8500", "8501"}, "only gRPC and REST are published (the admin API stays on loopback)"
    targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in router["volumes"]}
    assert {"/models", "/etc/tfs-router/config.yaml"} <= targets
    assert services["model-init"]["image"] == router["image"], "model-init runs the router's image"

    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "http://router:8501" in services["locust"]["command"]


def test_offline_override_builds_prometheus_and_drops_grafana() -> None:
    services = resolved(COMPOSE, OFFLINE)["services"]
    assert "build" in services["prometheus"] and "prom/prometheus" not in services["prometheus"]["image"]
    assert services["grafana"]["profiles"] == ["grafana"], "grafana runs only with --profile grafana offline"
    assert services["prometheus"]["command"] == resolved(COMPOSE)["services"]["prometheus"]["command"]


def test_router_config_for_compose_loads() -> None:
    cfg = cfgmod.load(ROOT / "configs" / "compose.yaml")
    assert [(m.name, m.base_path) for m in cfg.models] == [("ctr", "/models/ctr")]
    assert cfg.workers.count == 2
    assert (cfg.grpc.host, cfg.grpc.port, cfg.rest.host, cfg.rest.port) == ("0.0.0.0", 8500, "0.0.0.0", 8501)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 8502)
    assert not any(cfg.listener_tls(n).enabled for n in ("grpc", "rest", "admin")), "plaintext by default"


# The commented TLS guidance of the router service: the mount to uncomment, and the
# config keys to add to configs/compose.yaml (the "#   " lines after this line).
TLS_MOUNT = "# - ./certs:/etc/tfs-router-tls:ro"
TLS_KEYS_AFTER = "add to configs/compose.yaml:"


def _volume(v: dict[str, Any] | str) -> tuple[str, str, bool]:
    """(source, target, read-only) of a resolved service volume, long or short syntax."""
    if isinstance(v, dict):
        return v.get("source", ""), v["target"], bool(v.get("read_only"))
    source, target, *mode = v.split(":")
    return source, target, "ro" in (mode[0].split(",") if mode else [])


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def test_the_commented_tls_guidance_works(tmp_path: Path) -> None:
    """Uncommenting the certs mount gives a valid compose file with a read-only directory mount, and
    the commented keys, added to configs/compose.yaml, load with the router's loader and name files
    in that mount."""
    text = COMPOSE.read_text(encoding="utf-8")
    assert text.count(TLS_MOUNT) == 1, f"{TLS_MOUNT!r} is no longer in docker-compose.yml: update the test"
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text.replace(TLS_MOUNT, TLS_MOUNT.removeprefix("# ")), encoding="utf-8")
    mounts = [_volume(v) for v in resolved(copy)["services"]["router"]["volumes"]]
    assert (str(ROOT / "certs"), "/etc/tfs-router-tls", True) in mounts, mounts
    default = [_volume(v)[1] for v in resolved(COMPOSE)["services"]["router"]["volumes"]]
    assert "/etc/tfs-router-tls" not in default, "the certificates' mount is commented out by default"

    lines = text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.rstrip().endswith(TLS_KEYS_AFTER)]
    block = []
    for line in lines[start + 1:]:
        body = line.strip()
        if not body.startswith("#   "):
            break
        block.append(body[1:].split("  #", 1)[0].rstrip())
    keys = yaml.safe_load("\n".join(block))
    assert isinstance(keys, dict) and keys, block
    data = yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text(encoding="utf-8"))
    cfg = cfgmod.from_dict(_merge(data, keys))
    assert cfg.listener_tls("grpc").enabled
    assert not cfg.listener_tls("rest").enabled and not cfg.listener_tls("admin").enabled, (
        "REST (the healthcheck, prometheus) and admin (tfs-router status) stay plain")
    for path in (cfg.listener_tls("grpc").cert_file, cfg.listener_tls("grpc").key_file):
        assert Path(path).parent == Path("/etc/tfs-router-tls"), path


def test_prometheus_scrapes_the_router_service() -> None:
    """deploy/prometheus/prometheus.yml names the compose service and mounted rules file."""
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "router:8501" in targets, targets
    mounted = {Path(v["target"] if isinstance(v, dict) else v.split(":")[1]).name
               for v in resolved(COMPOSE)["services"]["prometheus"]["volumes"]}
    for rule_file in prom.get("rule_files", []):
        assert Path(rule_file).name in mounted, f"{rule_file} is not mounted into the prometheus service"


def test_grafana_provisioning_reads_the_mounted_folders() -> None:
    """deploy/grafana's dashboard providers read the folder compose mounts the dashboards at."""
    grafana = resolved(COMPOSE)["services"]["grafana"]
    mounts = {(v["source"] if isinstance(v, dict) else v.split(":")[0]): (v["target"] if isinstance(v, dict)
              else v.split(":")[1]) for v in grafana["volumes"]}
    assert mounts.get(str(ROOT / "deploy" / "grafana" / "provisioning")) == "/etc/grafana/provisioning", mounts
    dashboards = mounts.get(str(ROOT / "deploy" / "grafana" / "dashboards"))
    assert dashboards, mounts
    providers = [p for f in sorted((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
                 for p in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("providers", [])]
    assert providers, "no dashboard provider in deploy/grafana/provisioning/dashboards"
    for provider in providers:
        assert provider["options"]["path"].rstrip("/") == dashboards, provider
