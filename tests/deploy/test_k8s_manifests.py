"""deploy/k8s: both Kustomize overlays render, every object is valid Kubernetes, and
the objects fit together and fit the router.

Offline and fast: no cluster, no kustomize binary and no server. The overlays are
rendered by tests/deploy/kustomize_lite.py (which refuses any kustomization
feature it does not implement), every rendered object is checked against the
Kubernetes API schema in strict mode (kubernetes-validate: unknown fields fail),
and the checks below cross-reference the objects: Service, PDB and HPA targets,
ports, probes, volumes and the ConfigMaps and Secrets they name, the router config
inside its ConfigMap (loaded with the router's own loader), the TF Serving flags
and models.config of the fleet's workers, and TLS (overlays/tls): the certificate
files the router config and TF Serving name lie in a mounted Secret that holds
them, probes and Services speak what each listener serves. Broken copies show
that each kind of check fails when it should.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from google.protobuf import text_format

from router import config as cfgmod
from tests.deploy.kustomize_lite import KustomizeError, render

try:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest.fail("kubernetes-validate is missing: `pip install -e '.[dev]'` (make test does) installs it",
                pytrace=False)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {name: K8S / "overlays" / name for name in ("pod", "fleet", "tls")}
# Overlays with the fleet topology (tls is fleet with TLS on top).
FLEET_OVERLAYS = ("fleet", "tls")
# The Kubernetes version whose API schemas the objects are checked against
# (kubernetes-validate ships its schemas; the newest it has not newer than this).
K8S_VERSION = "1.33"

Doc = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet")
ROUTER = "tfs-router"
WORKERS = "tfs-workers"
CONFIG_PATH = "/etc/tfs-router/config.yaml"


@cache
def _rendered(overlay: str) -> tuple[Doc, ...]:
    return tuple(render(OVERLAYS[overlay]))


def rendered(overlay: str) -> list[Doc]:
    """A fresh copy of the overlay's objects (tests may break it)."""
    return copy.deepcopy(list(_rendered(overlay)))


# -- looking things up ----------------------------------------------------------


def name_of(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return hits[0] if hits else None


def get(docs: list[Doc], kind: str, name: str) -> Doc:
    doc = find(docs, kind, name)
    assert doc is not None, f"no {kind}/{name} in {[name_of(d) for d in docs]}"
    return doc


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"].get("metadata", {}).get("labels") or {}


def container(workload: Doc, name: str) -> Doc:
    (c,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return c


def config_map(docs: list[Doc], name: str) -> Doc | None:
    return find(docs, "ConfigMap", name)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Service's plain selector, or a LabelSelector's matchLabels (matchExpressions: refused)."""
    if not selector:
        return False
    if "matchExpressions" in selector:
        raise AssertionError("this checker supports matchLabels only")
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def port_number(c: Doc, port: int | str) -> int | None:
    """A probe's or Service's target port, by number or name, as the container's port number."""
    for p in c.get("ports") or []:
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    return None


def named_port(c: Doc, name: str) -> int | None:
    for p in c.get("ports") or []:
        if p.get("name") == name:
            return int(p["containerPort"])
    return None


def mounted_file(workload: Doc, c: Doc, docs: list[Doc], path: str) -> str | None:
    """The content of the ConfigMap file a container sees at ``path``, or None."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        mount = PurePosixPath(m["mountPath"])
        target = PurePosixPath(path)
        if mount not in target.parents or "subPath" in m:
            continue
        rel = str(target.relative_to(mount))
        source = (volumes.get(m["name"]) or {}).get("configMap")
        cm = config_map(docs, source["name"]) if source else None
        if source is None or cm is None:
            return None
        items = source.get("items")
        key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
        return cm.get("data", {}).get(key) if key else None
    return None


def secret_data(secret: Doc) -> dict[str, str]:
    """A Secret's keys and contents: ``data`` (base64) decoded, ``stringData`` as written (it wins, as in the API)."""
    out = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


# Volumes whose content the kubelet writes and mounts read-only: nothing can be
# mounted inside them (the runtime cannot create the mount point).
API_DATA_VOLUMES = ("configMap", "secret", "downwardAPI", "projected")


def volume_source(volume: Doc) -> str:
    return next((k for k in volume if k != "name"), "")


def mount_at(c: Doc, path: str) -> Doc | None:
    """The container's mount a file at ``path`` lies in (the deepest one), or None."""
    target = PurePosixPath(path)
    under = [m for m in c.get("volumeMounts") or [] if PurePosixPath(m["mountPath"]) in target.parents]
    return max(under, key=lambda m: len(PurePosixPath(m["mountPath"]).parts)) if under else None


def secret_file(workload: Doc, c: Doc, docs: list[Doc], path: str, what: str) -> tuple[str | None, str | None]:
    """(the content of the Secret key a container sees at ``path``, None) or (None, the problem)."""
    m = mount_at(c, path)
    if m is None:
        return None, f"{what} {path}: nothing is mounted there"
    volume: Doc = next((v for v in pod_spec(workload).get("volumes") or [] if v["name"] == m["name"]), {})
    source = volume.get("secret")
    if source is None:
        return None, f"{what} {path}: not in a mounted Secret ({m['mountPath']} is a {volume_source(volume)} volume)"
    if "subPath" in m:
        return None, f"{what} {path}: {m['mountPath']} is mounted with subPath, which never sees the Secret's updates"
    secret = find(docs, "Secret", source.get("secretName", ""))
    if secret is None:
        return None, f"{what} {path}: no Secret {source.get('secretName')}"
    rel = str(PurePosixPath(path).relative_to(m["mountPath"]))
    items = source.get("items")
    key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
    data = secret_data(secret)
    if key is None or key not in data:
        return None, f"{what} {path}: {name_of(secret)} has no key {key or rel} (it has {sorted(data)})"
    return data[key], None


def pre_stop_sleep(c: Doc) -> int:
    cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
    if len(cmd) == 2 and cmd[0] == "sleep":
        return int(cmd[1])
    sleep = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep")
    return int(sleep["seconds"]) if sleep else 0


@cache
def router_get_paths() -> frozenset[str]:
    """The fixed paths the router's REST frontend answers GET on, read from its own app.

    RestFrontend.app() is called on a stand-in that only has the config and a
    no-op coroutine for every handler it names: nothing starts or listens.
    """
    from aiohttp.web_urldispatcher import PlainResource

    from router.frontends.http_server import RestFrontend

    class Handlers:
        config = cfgmod.Config()

        def __getattr__(self, name: str) -> Callable[..., Any]:
            async def handler(request: Any) -> None:
                raise AssertionError("not called")
            return handler

    app = RestFrontend.app(Handlers())  # type: ignore[arg-type]
    return frozenset(r.resource.canonical for r in app.router.routes()
                     if r.method == "GET" and isinstance(r.resource, PlainResource))


# -- checks: each returns its problems, [] when all is well ----------------------


def schema_problems(docs: list[Doc]) -> list[str]:
    """Every object against the Kubernetes API schema, strict: unknown fields fail."""
    problems = []
    for doc in docs:
        try:
            version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(root)"
            problems.append(f"{name_of(doc)}: {where}: {exc.message}")
        except SchemaNotFoundError as exc:
            problems.append(f"{name_of(doc)}: {exc.message}")
        else:
            if version != K8S_VERSION:
                problems.append(f"{name_of(doc)}: validated against {version}, not {K8S_VERSION}")
    return problems


def reference_problems(docs: list[Doc]) -> list[str]:
    """Selectors, targets, ports, probes and volumes that point at what exists."""
    problems: list[str] = []
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    services = [d for d in docs if d["kind"] == "Service"]
    for w in workloads:
        labels = pod_labels(w)
        if not selects(w["spec"].get("selector"), labels):
            problems.append(f"{name_of(w)}: selector does not match its own pod template labels")
        for other in workloads:
            if other is not w and selects(w["spec"].get("selector"), pod_labels(other)):
                problems.append(f"{name_of(w)}: selector also matches the pods of {name_of(other)}")
        spec = pod_spec(w)
        for tsc in spec.get("topologySpreadConstraints") or []:
            if not selects(tsc.get("labelSelector"), labels):
                problems.append(f"{name_of(w)}: topologySpreadConstraints labelSelector misses its own pods")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():
            if "configMap" in v:
                cm = config_map(docs, v["configMap"]["name"])
                if cm is None:
                    problems.append(f"{name_of(w)}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
                else:
                    for item in v["configMap"].get("items") or []:
                        if item["key"] not in (cm.get("data") or {}):
                            problems.append(f"{name_of(w)}: volume {v['name']}: {name_of(cm)} has no key "
                                            f"{item['key']}")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if find(docs, "PersistentVolumeClaim", claim) is None:
                    problems.append(f"{name_of(w)}: volume {v['name']}: no PersistentVolumeClaim {claim}")
            if "secret" in v:
                secret = find(docs, "Secret", v["secret"].get("secretName", ""))
                if secret is None:
                    problems.append(f"{name_of(w)}: volume {v['name']}: no Secret {v['secret'].get('secretName')}")
                else:
                    for item in v["secret"].get("items") or []:
                        if item["key"] not in secret_data(secret):
                            problems.append(f"{name_of(w)}: volume {v['name']}: {name_of(secret)} has no key "
                                            f"{item['key']}")
        for c in spec["containers"]:
            where = f"{name_of(w)} container {c['name']}"
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    problems.append(f"{where}: mount {m['mountPath']}: no volume {m['name']}")
                for outer in c.get("volumeMounts") or []:
                    if (PurePosixPath(outer["mountPath"]) in PurePosixPath(m["mountPath"]).parents
                            and volume_source(volumes.get(outer["name"], {})) in API_DATA_VOLUMES):
                        problems.append(f"{where}: mount {m['mountPath']} lies inside the read-only mount "
                                        f"{outer['mountPath']} ({outer['name']}): the runtime cannot create its "
                                        "mount point")
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if handler is None:
                    problems.append(f"{where}: {kind}: not an httpGet, tcpSocket or grpc probe")
                elif port_number(c, handler["port"]) is None:
                    problems.append(f"{where}: {kind}: port {handler['port']!r} is not a container port")
            if "cpu" not in ((c.get("resources") or {}).get("requests") or {}):
                problems.append(f"{where}: no CPU request")
        if w["kind"] == "StatefulSet":
            svc = find(docs, "Service", w["spec"].get("serviceName", ""))
            if svc is None:
                problems.append(f"{name_of(w)}: serviceName {w['spec'].get('serviceName')!r} is no Service")
            elif svc["spec"].get("clusterIP") != "None" or not selects(svc["spec"].get("selector"), labels):
                problems.append(f"{name_of(w)}: serviceName {name_of(svc)} is not a headless Service of its pods")
    for svc in services:
        targets = [w for w in workloads if selects(svc["spec"].get("selector"), pod_labels(w))]
        if not targets:
            problems.append(f"{name_of(svc)}: selector {svc['spec'].get('selector')} selects no pod template")
        for w in targets:
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                if all(port_number(c, target) is None for c in pod_spec(w)["containers"]):
                    problems.append(f"{name_of(svc)}: port {sp['port']}: targetPort {target!r} is no container "
                                    f"port of {name_of(w)}")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        if not any(selects(pdb["spec"].get("selector"), pod_labels(w)) for w in workloads):
            problems.append(f"{name_of(pdb)}: selector selects no pod template")
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(docs, ref["kind"], ref["name"])
        if target is None or target["apiVersion"] != ref.get("apiVersion"):
            problems.append(f"{name_of(hpa)}: scaleTargetRef {ref} names nothing here")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append(f"{name_of(hpa)}: minReplicas below 2 (a PDB eviction would leave no pod)")
        if target is not None and "replicas" in target["spec"]:
            problems.append(f"{name_of(target)}: sets replicas, which the autoscaler owns")
    return problems


def router_config(docs: list[Doc]) -> dict[str, Any]:
    """The router config as the router container reads it (--config through its mounts)."""
    router = get(docs, "Deployment", ROUTER)
    c = container(router, "router")
    text = mounted_file(router, c, docs, CONFIG_PATH)
    assert text is not None, f"nothing mounted at {CONFIG_PATH} from a ConfigMap"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def router_problems(docs: list[Doc]) -> list[str]:
    """The router's Deployment against its config and the routes the router serves."""
    problems: list[str] = []
    router = get(docs, "Deployment", ROUTER)
    c = container(router, "router")
    if c["image"] != "tfs-router:latest":
        problems.append(f"router image {c['image']}")
    if c.get("command") != ["tfs-router", "serve", "--config", CONFIG_PATH]:
        problems.append(f"router command {c.get('command')}")
    pod_sec = pod_spec(router).get("securityContext") or {}
    if not (pod_sec.get("runAsNonRoot") is True and pod_sec.get("runAsUser") == 10001):
        problems.append("router pod does not run as the image's non-root user 10001")
    if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
        problems.append("router container allows privilege escalation")
    for kind in ("requests", "limits"):
        if not {"cpu", "memory"} <= set((c.get("resources") or {}).get(kind) or {}):
            problems.append(f"router container: no cpu and memory {kind}")

    cfg = router_config(docs)
    for section, default in (("grpc", 8500), ("rest", 8501)):
        port = (cfg.get(section) or {}).get("port", default)
        if named_port(c, section) != port:
            problems.append(f"container port {section} is {named_port(c, section)}, the config's "
                            f"{section}.port {port}")
        if (cfg.get(section) or {}).get("host", "0.0.0.0") not in ("0.0.0.0", "::"):
            problems.append(f"{section}.host is not every interface: the Services could not reach it")
    admin = cfg.get("admin") or {}
    admin_host, admin_port = admin.get("host", "127.0.0.1"), admin.get("port", 8502)
    if not is_loopback(admin_host):
        problems.append(f"admin.host {admin_host} is not loopback")
    if port_number(c, admin_port) is not None:
        problems.append(f"admin port {admin_port} is a container port")
    for svc in (d for d in docs if d["kind"] == "Service"):
        if any(admin_port in (p["port"], p.get("targetPort")) for p in svc["spec"]["ports"]):
            problems.append(f"{name_of(svc)} exposes the admin port {admin_port}")

    rest = named_port(c, "rest")
    routes = router_get_paths()
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        get_ = (c.get(kind) or {}).get("httpGet") or {}
        if get_.get("path") != path:
            problems.append(f"router {kind}: path {get_.get('path')!r}, expected {path}")
        if get_.get("path") not in routes:
            problems.append(f"router {kind}: the router serves no GET {get_.get('path')!r} (it has {sorted(routes)})")
        if port_number(c, get_.get("port", -1)) != rest:
            problems.append(f"router {kind}: port {get_.get('port')!r} is not the REST port {rest}")
    annotations = router["spec"]["template"].get("metadata", {}).get("annotations") or {}
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("router pods are not marked for scraping")
    if annotations.get("prometheus.io/port") != str(rest):
        problems.append(f"scrape port {annotations.get('prometheus.io/port')} is not the REST port {rest}")
    if annotations.get("prometheus.io/path") not in routes:
        problems.append(f"scrape path {annotations.get('prometheus.io/path')!r} is no router route")

    spawn = (cfg.get("workers") or {}).get("mode", "spawn") == "spawn"
    shutdown = float(cfg.get("shutdown_timeout_s", 10))
    # App.stop: the drain has shutdown_timeout_s; then spawned workers get as long again to stop.
    needed = pre_stop_sleep(c) + shutdown * (2 if spawn else 1)
    grace = pod_spec(router).get("terminationGracePeriodSeconds", 30)
    if grace <= needed:
        problems.append(f"terminationGracePeriodSeconds {grace} does not cover preStop + shutdown ({needed:g} s)")
    return problems


def pod_topology_problems(docs: list[Doc]) -> list[str]:
    """overlays/pod: spawned workers; the models read-only at /models, under every base_path."""
    problems: list[str] = []
    cfg = router_config(docs)
    router = get(docs, "Deployment", ROUTER)
    c = container(router, "router")
    if (cfg.get("workers") or {}).get("mode", "spawn") != "spawn":
        problems.append("the pod topology's router does not spawn its workers")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod_spec(router).get("volumes") or []}
    models = mounts.get("/models")
    if models is None:
        problems.append("no volume mounted at /models")
    else:
        pvc = volumes.get(models["name"], {}).get("persistentVolumeClaim")
        if not (models.get("readOnly") and pvc and pvc.get("readOnly")):
            problems.append("/models is not a read-only PersistentVolumeClaim mount")
    for m in cfg["models"]:
        if PurePosixPath("/models") not in PurePosixPath(m["base_path"]).parents:
            problems.append(f"model {m['name']}: base_path {m['base_path']} is not under /models")
    return problems


def tf_serving_flags(c: Doc) -> dict[str, str]:
    flags = {}
    for arg in c.get("args") or []:
        assert arg.startswith("--") and "=" in arg, f"worker argument {arg!r}: expected --flag=value"
        key, _, value = arg[2:].partition("=")
        flags[key] = value
    return flags


@cache
def tf_serving_messages() -> tuple[type, type]:
    """TF Serving's ModelServerConfig (from tensorflow-serving-api) and MonitoringConfig
    (not in that package: the project's own copy, text-compatible with TF Serving's)."""
    from tensorflow_serving.config import model_server_config_pb2

    from protos import monitoring_pb2

    return model_server_config_pb2.ModelServerConfig, monitoring_pb2.MonitoringConfig


def parse_dns_address(address: str) -> tuple[str, int]:
    """``dns:NAME:PORT`` -> (NAME, PORT)."""
    scheme, _, rest = address.partition(":")
    name, _, port = rest.rpartition(":")
    assert scheme == "dns" and name and port.isdigit(), f"{address!r} is not dns:NAME:PORT"
    return name, int(port)


def fleet_problems(docs: list[Doc]) -> list[str]:
    """overlays/fleet: passive routers find the workers' headless Service; the workers'
    TF Serving flags, models.config and probes against their container and the router config."""
    problems: list[str] = []
    cfg = router_config(docs)
    workers_cfg = cfg.get("workers") or {}
    sts = get(docs, "StatefulSet", WORKERS)
    tfs = container(sts, "tensorflow-serving")
    router = get(docs, "Deployment", ROUTER)

    if workers_cfg.get("mode") != "static" or workers_cfg.get("control") != "passive":
        problems.append("the fleet's routers are not static and passive")
    if any(m["mountPath"].startswith("/models") for m in container(router, "router").get("volumeMounts") or []):
        problems.append("passive routers mount the models")
    addresses = workers_cfg.get("addresses") or []
    if not addresses:
        problems.append("no worker addresses")
    for address in addresses:
        name, port = parse_dns_address(address)
        svc = find(docs, "Service", name.split(".")[0])
        if svc is None or (name != svc["metadata"]["name"] and not name.startswith(f"{svc['metadata']['name']}.")):
            problems.append(f"{address}: names no Service here")
            continue
        if svc["spec"].get("clusterIP") != "None":
            problems.append(f"{address}: {name_of(svc)} is not headless (it would resolve to one virtual IP)")
        if sts["spec"].get("serviceName") != svc["metadata"]["name"]:
            problems.append(f"{address}: {name_of(svc)} is not the workers' StatefulSet serviceName")
        sp = [p for p in svc["spec"]["ports"] if p["port"] == port]
        if not sp:
            problems.append(f"{address}: {name_of(svc)} has no port {port}")
        # A headless Service's DNS answers pod addresses: the router dials the container port itself.
        elif port_number(tfs, sp[0].get("targetPort", port)) != port or named_port(tfs, "grpc") != port:
            problems.append(f"{address}: port {port} is not the workers' gRPC container port")
    if float(workers_cfg.get("dns_refresh_s", 0)) <= 0 or float(workers_cfg.get("status_poll_s", 0)) <= 0:
        problems.append("dns_refresh_s and status_poll_s must be set and positive")
    else:
        # A router drops an address missing from dns_drop_after lookups in a row (2 by
        # default), one every dns_refresh_s: the worker must serve until then.
        drop_after = int(workers_cfg.get("dns_drop_after", getattr(cfgmod.WorkersConfig(), "dns_drop_after", 2)))
        needed = (drop_after + 1) * float(workers_cfg["dns_refresh_s"])
        if pre_stop_sleep(tfs) < needed:
            problems.append(f"worker preStop sleep {pre_stop_sleep(tfs)} s is shorter than the routers' "
                            f"{needed:g} s to drop it from DNS: they would still send to a stopping worker")
    if pod_spec(sts).get("terminationGracePeriodSeconds", 30) <= pre_stop_sleep(tfs):
        problems.append("worker terminationGracePeriodSeconds does not cover its preStop sleep")

    if not tfs["image"].startswith("tensorflow/serving:") or tfs["image"].endswith(":latest"):
        problems.append(f"worker image {tfs['image']}: expected a pinned tensorflow/serving tag")
    if tfs.get("command") != ["tensorflow_model_server"]:
        problems.append(f"worker command {tfs.get('command')}")
    flags = tf_serving_flags(tfs)
    for flag, port_name in (("port", "grpc"), ("rest_api_port", "rest")):
        if flags.get(flag) != str(named_port(tfs, port_name)):
            problems.append(f"--{flag}={flags.get(flag)} but container port {port_name} is "
                            f"{named_port(tfs, port_name)}")
    if not flags.get("file_system_poll_wait_seconds", "").isdigit() or int(flags["file_system_poll_wait_seconds"]) < 1:
        problems.append("--file_system_poll_wait_seconds: workers must poll for new versions")
    model_server_config, monitoring_config = tf_serving_messages()
    models_text = mounted_file(sts, tfs, docs, flags.get("model_config_file", ""))
    served: dict[str, str] = {}
    if models_text is None:
        problems.append(f"--model_config_file={flags.get('model_config_file')}: no ConfigMap file mounted there")
    else:
        msc = text_format.Parse(models_text, model_server_config())
        served = {m.name: m.base_path for m in msc.model_config_list.config}
    mounts = {m["mountPath"]: m for m in tfs.get("volumeMounts") or []}
    for model, base_path in served.items():
        under = [m for p, m in mounts.items() if PurePosixPath(p) in PurePosixPath(base_path).parents]
        if not under or not under[0].get("readOnly"):
            problems.append(f"models.config {model}: base_path {base_path} is not under a read-only mount")
    for m in cfg["models"]:
        if served.get(m["name"]) != m["base_path"]:
            problems.append(f"router model {m['name']} ({m['base_path']}) is not served by the workers' "
                            f"models.config ({served})")
    for kind in ("readinessProbe", "startupProbe"):
        path = ((tfs.get(kind) or {}).get("httpGet") or {}).get("path", "")
        model = path.removeprefix("/v1/models/")
        if model == path or model not in served:
            problems.append(f"worker {kind}: {path!r} is not /v1/models/<a model of models.config>")
        probe_port = ((tfs.get(kind) or {}).get("httpGet") or {}).get("port", -1)
        if port_number(tfs, probe_port) != named_port(tfs, "rest"):
            problems.append(f"worker {kind}: port {probe_port!r} is not TF Serving's REST port")

    monitoring_text = mounted_file(sts, tfs, docs, flags.get("monitoring_config_file", ""))
    annotations = sts["spec"]["template"].get("metadata", {}).get("annotations") or {}
    if monitoring_text is None:
        problems.append(f"--monitoring_config_file={flags.get('monitoring_config_file')}: nothing mounted there")
    else:
        mon = text_format.Parse(monitoring_text, monitoring_config())
        if not mon.prometheus_config.enable or annotations.get("prometheus.io/path") != mon.prometheus_config.path:
            problems.append(f"worker scrape path {annotations.get('prometheus.io/path')!r} is not the enabled "
                            f"monitoring path {mon.prometheus_config.path!r}")
    if annotations.get("prometheus.io/port") != flags.get("rest_api_port"):
        problems.append("worker scrape port is not TF Serving's REST port")
    if find(docs, "PodDisruptionBudget", WORKERS) is None:
        problems.append("no PodDisruptionBudget for the workers")
    return problems


def _app_protocol_problem(svc: Doc, sp: Doc, tls: bool, who: str) -> str | None:
    app = sp.get("appProtocol")
    if tls and app != "https":
        return f"{name_of(svc)}: port {sp['port']}: appProtocol {app!r}, but {who} serves TLS (https)"
    if not tls and app == "https":
        return f"{name_of(svc)}: port {sp['port']}: appProtocol https, but {who} serves plaintext"
    return None


def tls_problems(docs: list[Doc]) -> list[str]:
    """TLS as the router config (read with the router's own loader) and TF Serving's flags set it:
    every certificate file lies in a mounted Secret that holds it, mounted as a directory (rotation);
    probes, the scrape annotation and the Services speak what each listener serves; the routers and
    the workers agree on TLS between them. In a plaintext overlay it checks that nothing says HTTPS."""
    problems: list[str] = []
    cfg = cfgmod.from_dict(router_config(docs))
    router = get(docs, "Deployment", ROUTER)
    c = container(router, "router")

    for w in (d for d in docs if d["kind"] in WORKLOADS):
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes") or []}
        for ct in pod_spec(w)["containers"]:
            for m in ct.get("volumeMounts") or []:
                if "secret" in volumes.get(m["name"], {}):
                    if "subPath" in m:
                        problems.append(f"{name_of(w)} container {ct['name']}: the Secret volume {m['name']} is "
                                        f"mounted with subPath at {m['mountPath']}: it never sees the Secret's "
                                        "updates (mount it as a directory)")
                    if not m.get("readOnly"):
                        problems.append(f"{name_of(w)} container {ct['name']}: the Secret volume {m['name']} is "
                                        "not mounted readOnly")

    files: dict[tuple[str, str], None] = {}
    for n in ("grpc", "rest", "admin"):
        t = cfg.listener_tls(n)
        if t.enabled:
            where = f"{n}.tls" if getattr(cfg, n).tls.configured else "tls"
            for key in ("cert_file", "key_file", "client_ca_file", "ssl_config_file"):
                if getattr(t, key):
                    files[(f"{where}.{key}", getattr(t, key))] = None
    wt = cfg.workers.tls
    if wt.enabled:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(wt, key):
                files[(f"workers.tls.{key}", getattr(wt, key))] = None
    for what, path in files:
        _, problem = secret_file(router, c, docs, path, what)
        if problem:
            problems.append(problem)

    if cfg.listener_tls("admin").enabled:
        problems.append("admin: the admin API serves TLS, so `kubectl exec deploy/tfs-router -- tfs-router status` "
                        "(http://127.0.0.1:8502) fails: set admin.tls.plaintext: true")
    rest_tls = cfg.listener_tls("rest").enabled
    serves = "TLS" if rest_tls else "plain HTTP"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get_ = (c.get(kind) or {}).get("httpGet")
        if get_ is not None and get_.get("scheme", "HTTP") != ("HTTPS" if rest_tls else "HTTP"):
            problems.append(f"router {kind}: scheme {get_.get('scheme', 'HTTP')}, but REST serves {serves}")
    annotations = router["spec"]["template"].get("metadata", {}).get("annotations") or {}
    scrape = annotations.get("prometheus.io/scheme", "http")
    if scrape != ("https" if rest_tls else "http"):
        problems.append(f"router scrape scheme {scrape} (prometheus.io/scheme), but REST serves {serves}")
    listener_tls = {named_port(c, n): (n, cfg.listener_tls(n).enabled) for n in ("grpc", "rest")}
    for svc in (d for d in docs if d["kind"] == "Service" and selects(d["spec"].get("selector"), pod_labels(router))):
        for sp in svc["spec"]["ports"]:
            listener = listener_tls.get(port_number(c, sp.get("targetPort", sp["port"])))
            if listener is not None:
                problem = _app_protocol_problem(svc, sp, listener[1], f"the router's {listener[0]} listener")
                if problem:
                    problems.append(problem)

    sts = find(docs, "StatefulSet", WORKERS)
    if sts is None:
        return problems
    tfs = container(sts, "tensorflow-serving")
    ssl_path = tf_serving_flags(tfs).get("ssl_config_file", "")
    if wt.enabled and not ssl_path:
        problems.append("workers.tls is enabled, but the workers serve plaintext gRPC (no --ssl_config_file): "
                        "every handshake would fail")
    if ssl_path and not wt.enabled:
        problems.append("the workers serve gRPC with TLS (--ssl_config_file), but workers.tls is off: the routers' "
                        "plaintext calls would fail")
    if wt.enabled and not wt.server_name and any(a.startswith("dns:") for a in cfg.workers.addresses):
        problems.append("workers.tls.server_name is not set: dns: addresses are pod IPs, which the workers' "
                        "certificate does not carry")
    if ssl_path:
        text, problem = secret_file(sts, tfs, docs, ssl_path, "--ssl_config_file")
        if problem or text is None:
            problems.append(problem or "")
        else:
            try:
                sc = text_format.Parse(text, ssl_config_message()())
            except text_format.ParseError as exc:
                problems.append(f"--ssl_config_file {ssl_path}: not a text-format SSLConfig: {exc}")
            else:
                if not (sc.server_key and sc.server_cert):
                    problems.append(f"--ssl_config_file {ssl_path}: server_key and server_cert are required")
                if sc.client_verify and not (wt.cert_file and wt.key_file):
                    problems.append(f"--ssl_config_file {ssl_path}: client_verify: true, but the routers present "
                                    "no certificate (workers.tls.cert_file and key_file)")
    workers_svc = find(docs, "Service", WORKERS)
    for sp in (workers_svc or {}).get("spec", {}).get("ports") or []:
        if workers_svc and port_number(tfs, sp.get("targetPort", sp["port"])) == named_port(tfs, "grpc"):
            problem = _app_protocol_problem(workers_svc, sp, bool(ssl_path), "the workers' gRPC port")
            if problem:
                problems.append(problem)
    return problems


@cache
def ssl_config_message() -> type:
    """TF Serving's SSLConfig (--ssl_config_file): the project's text-compatible copy."""
    from protos import ssl_config_pb2

    return ssl_config_pb2.SSLConfig


# -- the overlays as they are -------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_what_it_should(overlay: str) -> None:
    kinds = sorted(name_of(d).rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else name_of(d)
                   for d in rendered(overlay))
    common = ["ConfigMap/tfs-router-config", "Deployment/tfs-router", "HorizontalPodAutoscaler/tfs-router",
              "PersistentVolumeClaim/tfs-models", "PodDisruptionBudget/tfs-router", "Service/tfs-router",
              "Service/tfs-router-headless"]
    fleet = ["ConfigMap/tfs-workers-config", "PodDisruptionBudget/tfs-workers", "Service/tfs-workers",
             "StatefulSet/tfs-workers"]
    extra = {"pod": [],
             "fleet": fleet,
             # The fleet's tfs-router-config stays in the output, unused: the routers mount tfs-router-tls-config.
             "tls": [*fleet, "ConfigMap/tfs-router-tls-config", "Secret/tfs-router-tls", "Secret/tfs-workers-tls"],
             }[overlay]
    assert kinds == sorted(common + extra)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_is_valid_kubernetes(overlay: str) -> None:
    assert schema_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_objects_reference_each_other_correctly(overlay: str) -> None:
    assert reference_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_router_deployment_fits_its_config_and_routes(overlay: str) -> None:
    assert router_problems(rendered(overlay)) == []


def test_pod_topology() -> None:
    assert pod_topology_problems(rendered("pod")) == []


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_fleet_topology(overlay: str) -> None:
    assert fleet_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_tls_fits_the_mounts_probes_and_services(overlay: str) -> None:
    assert tls_problems(rendered(overlay)) == []


def test_probe_paths_are_router_routes() -> None:
    """The route reader itself: it sees the router's real GET routes."""
    paths = router_get_paths()
    assert {"/healthz", "/readyz", "/monitoring/prometheus/metrics"} <= paths
    assert "/ready" not in paths


def test_both_headless_and_clusterip_router_services() -> None:
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        assert "clusterIP" not in get(docs, "Service", "tfs-router")["spec"]
        headless = get(docs, "Service", "tfs-router-headless")["spec"]
        assert headless["clusterIP"] == "None"
        assert {p["port"] for p in headless["ports"]} == {8500, 8501}


def test_pod_router_config_loads_with_the_routers_loader() -> None:
    cfg = cfgmod.from_dict(router_config(rendered("pod")))
    assert cfg.workers.mode == "spawn" and cfg.admin.host == "127.0.0.1"


NEW_WORKER_KEYS = ("control", "dns_refresh_s", "status_poll_s")


def test_fleet_router_config_loads_with_the_routers_loader() -> None:
    known = {f.name for f in dataclasses.fields(cfgmod.WorkersConfig)}
    if "control" not in known:
        pytest.skip("router.config.WorkersConfig has no `control` field yet (passive mode is being "
                    "implemented): this check runs by itself once it lands")
    cfg = cfgmod.from_dict(router_config(rendered("fleet")))
    assert cfg.workers.mode == "static"
    assert dataclasses.asdict(cfg.workers)["control"] == "passive"


def test_fleet_router_config_loads_today_without_the_new_keys() -> None:
    """Everything but workers.control, dns_refresh_s and status_poll_s is checked now."""
    data = router_config(rendered("fleet"))
    data["workers"] = {k: v for k, v in data["workers"].items() if k not in NEW_WORKER_KEYS}
    cfg = cfgmod.from_dict(data)
    assert cfg.workers.addresses == ("dns:tfs-workers:8500",)


def test_tls_router_config_loads_with_the_routers_loader() -> None:
    cfg = cfgmod.from_dict(router_config(rendered("tls")))
    assert cfg.listener_tls("grpc").enabled and cfg.listener_tls("rest").enabled
    assert not cfg.listener_tls("admin").enabled and cfg.admin.host == "127.0.0.1"
    assert cfg.workers.tls.enabled and cfg.workers.tls.server_name == WORKERS


TLS_CONFIG_KEYS = ("tls", "admin.tls", "workers.tls")


def _without(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data[p]
    data.pop(last, None)


def test_tls_overlay_is_the_fleet_with_tls() -> None:
    """overlays/tls repeats the fleet's router config and the workers' args (a ConfigMap's file and an
    atomic list, which kustomize cannot patch in part): they must differ from the fleet's by TLS only."""
    fleet, tls = rendered("fleet"), rendered("tls")
    fleet_cfg, tls_cfg = router_config(fleet), router_config(tls)
    for key in TLS_CONFIG_KEYS:
        _without(tls_cfg, key)
    assert tls_cfg == fleet_cfg
    fleet_args = container(get(fleet, "StatefulSet", WORKERS), "tensorflow-serving")["args"]
    tls_args = container(get(tls, "StatefulSet", WORKERS), "tensorflow-serving")["args"]
    assert [a for a in tls_args if not a.startswith("--ssl_config_file=")] == fleet_args


def test_tls_secrets_in_the_repository_are_placeholders() -> None:
    """No certificate or key is committed: every value says PLACEHOLDER, and neither the router nor TF
    Serving starts with it (a forgotten replacement fails loudly instead of serving a shared key)."""
    secrets = [d for d in rendered("tls") if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"tfs-router-tls", "tfs-workers-tls"}
    assert get(secrets, "Secret", "tfs-router-tls")["type"] == "kubernetes.io/tls"
    for s in secrets:
        for key, value in secret_data(s).items():
            assert "PLACEHOLDER" in value and "-----BEGIN" not in value, f"{name_of(s)} {key}"


def test_the_router_refuses_to_start_with_the_placeholders(tmp_path: Path) -> None:
    from router.tls import TlsError, read_server_material

    docs = rendered("tls")
    for key, value in secret_data(get(docs, "Secret", "tfs-router-tls")).items():
        (tmp_path / key).write_text(value, encoding="utf-8")
    with pytest.raises(TlsError, match="tls.crt"):
        read_server_material(cfgmod.TlsConfig(cert_file=str(tmp_path / "tls.crt"), key_file=str(tmp_path / "tls.key")))
    (tmp_path / "ssl_config.txt").write_text(secret_data(get(docs, "Secret", "tfs-workers-tls"))["ssl_config.txt"],
                                             encoding="utf-8")
    with pytest.raises(TlsError, match="ssl_config.txt"):  # the drop-in, as TF Serving reads it
        read_server_material(cfgmod.TlsConfig(ssl_config_file=str(tmp_path / "ssl_config.txt")))


def _readme_block(marker: str) -> str:
    """The fenced block of deploy/k8s/README.md that holds ``marker``."""
    blocks = (K8S / "README.md").read_text(encoding="utf-8").split("```")[1::2]
    (block,) = [b for b in blocks if marker in b]
    return block.partition("\n")[2]  # without the info string


def test_real_certificates_in_the_secrets_work_with_the_router(tmp_path: Path) -> None:
    """Real certificates under the Secrets' keys: the router loads its listeners' pair and the workers' CA
    from the paths its config names in the mounts, and the README's command turns the workers' PEM
    files into an SSLConfig that loads (the router reads it as TF Serving does)."""
    import trustme  # the dev extra

    from router.tls import ClientTls, read_server_material

    docs = rendered("tls")
    ca = trustme.CA()
    router_cert, workers_cert = ca.issue_cert("tfs-router", "tfs-router-headless"), ca.issue_cert(WORKERS)
    real = {"tls.crt": b"".join(p.bytes() for p in router_cert.cert_chain_pems),
            "tls.key": router_cert.private_key_pem.bytes(), "ca.crt": ca.cert_pem.bytes()}
    assert set(secret_data(get(docs, "Secret", "tfs-router-tls"))) == set(real)
    router = get(docs, "Deployment", ROUTER)
    (mount,) = [m for m in container(router, "router")["volumeMounts"] if m["name"] == "tls"]
    where = tmp_path / mount["mountPath"].lstrip("/")
    where.mkdir(parents=True)
    for key, pem in real.items():
        (where / key).write_bytes(pem)
    data = router_config(docs)
    for block in (data["tls"], data["workers"]["tls"]):
        for key, value in block.items():
            if key.endswith("_file"):
                block[key] = str(tmp_path / value.lstrip("/"))
    cfg = cfgmod.from_dict(data)
    assert read_server_material(cfg.listener_tls("grpc")).cert_chain == real["tls.crt"]
    assert ClientTls(cfg.workers.tls).material[0] == real["ca.crt"]

    (tmp_path / "workers.crt").write_bytes(b"".join(p.bytes() for p in workers_cert.cert_chain_pems))
    workers_cert.private_key_pem.write_to_path(str(tmp_path / "workers.key"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", _readme_block("> ssl_config.txt")], cwd=tmp_path, check=True,
                   timeout=30)
    made = text_format.Parse((tmp_path / "ssl_config.txt").read_text(encoding="utf-8"), ssl_config_message()())
    assert made.server_cert.encode() == (tmp_path / "workers.crt").read_bytes() and not made.client_verify
    material = read_server_material(cfgmod.TlsConfig(ssl_config_file=str(tmp_path / "ssl_config.txt")))
    assert material.key == workers_cert.private_key_pem.bytes() and not material.mutual


# -- broken copies: the checks fail when they should ------------------------------


def set_router_config(docs: list[Doc], edit: Callable[[dict[str, Any]], None]) -> None:
    data = router_config(docs)
    edit(data)
    router = get(docs, "Deployment", ROUTER)
    (vol,) = [v for v in pod_spec(router)["volumes"] if v["name"] == "config"]
    config_map(docs, vol["configMap"]["name"])["data"]["config.yaml"] = yaml.safe_dump(data)  # type: ignore[index]


def _svc_selector(docs: list[Doc]) -> None:
    get(docs, "Service", "tfs-router")["spec"]["selector"]["app.kubernetes.io/component"] = "routr"


def _headless_selector(docs: list[Doc]) -> None:
    get(docs, "Service", "tfs-workers")["spec"]["selector"]["app.kubernetes.io/component"] = "workers"


def _pdb_selector(docs: list[Doc]) -> None:
    get(docs, "PodDisruptionBudget", "tfs-router")["spec"]["selector"]["matchLabels"] = {"app": "tfs-router"}


def _deployment_selector(docs: list[Doc]) -> None:
    get(docs, "Deployment", ROUTER)["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "tfs-router"}


def _hpa_target(docs: list[Doc]) -> None:
    get(docs, "HorizontalPodAutoscaler", "tfs-router")["spec"]["scaleTargetRef"]["name"] = "tfs-routers"


def _target_port(docs: list[Doc]) -> None:
    get(docs, "Service", "tfs-router")["spec"]["ports"][0]["targetPort"] = "gprc"


def _service_name(docs: list[Doc]) -> None:
    get(docs, "StatefulSet", WORKERS)["spec"]["serviceName"] = "tfs-router"


def _missing_volume(docs: list[Doc]) -> None:
    router = get(docs, "Deployment", ROUTER)
    pod_spec(router)["volumes"] = [v for v in pod_spec(router)["volumes"] if v["name"] != "tmp"]


def _config_map_ref(docs: list[Doc]) -> None:
    (vol,) = [v for v in pod_spec(get(docs, "Deployment", ROUTER))["volumes"] if v["name"] == "config"]
    vol["configMap"]["name"] = "tfs-router-config"  # the name before the generator's hash


def _probe_port(docs: list[Doc]) -> None:
    container(get(docs, "Deployment", ROUTER), "router")["livenessProbe"]["httpGet"]["port"] = "http"


def _secret_ref(docs: list[Doc]) -> None:
    (vol,) = [v for v in pod_spec(get(docs, "Deployment", ROUTER))["volumes"] if v["name"] == "tls"]
    vol["secret"]["secretName"] = "tfs-router-certs"


def _secret_item(docs: list[Doc]) -> None:
    (vol,) = [v for v in pod_spec(get(docs, "StatefulSet", WORKERS))["volumes"] if v["name"] == "tls"]
    vol["secret"]["items"] = [{"key": "ssl.config", "path": "ssl_config.txt"}]


def _nested_mount(docs: list[Doc]) -> None:
    (m,) = [m for m in container(get(docs, "Deployment", ROUTER), "router")["volumeMounts"] if m["name"] == "tls"]
    m["mountPath"] = "/etc/tfs-router/tls"


REFERENCE_BREAKAGES = {
    "Service selector": ("pod", _svc_selector, "Service/tfs-router: selector"),
    "headless Service selector": ("fleet", _headless_selector, "Service/tfs-workers: selector"),
    "PDB selector": ("pod", _pdb_selector, "PodDisruptionBudget/tfs-router: selector selects no pod"),
    "Deployment selector": ("fleet", _deployment_selector, "Deployment/tfs-router: selector also matches"),
    "HPA target": ("pod", _hpa_target, "HorizontalPodAutoscaler/tfs-router: scaleTargetRef"),
    "Service targetPort": ("fleet", _target_port, "targetPort 'gprc' is no container port"),
    "StatefulSet serviceName": ("fleet", _service_name, "is not a headless Service of its pods"),
    "mount without volume": ("pod", _missing_volume, "mount /tmp: no volume tmp"),
    "ConfigMap reference": ("pod", _config_map_ref, "no ConfigMap tfs-router-config"),
    "probe port": ("pod", _probe_port, "livenessProbe: port 'http' is not a container port"),
    "Secret reference": ("tls", _secret_ref, "volume tls: no Secret tfs-router-certs"),
    "Secret key": ("tls", _secret_item, "Secret/tfs-workers-tls has no key ssl.config"),
    "mount inside a ConfigMap mount": ("tls", _nested_mount, "mount /etc/tfs-router/tls lies inside the read-only "
                                       "mount /etc/tfs-router"),
}


@pytest.mark.parametrize("breakage", sorted(REFERENCE_BREAKAGES))
def test_a_broken_reference_is_caught(breakage: str) -> None:
    overlay, breaks, expected = REFERENCE_BREAKAGES[breakage]
    docs = rendered(overlay)
    assert reference_problems(docs) == []  # the control: unbroken, it passes
    breaks(docs)
    problems = reference_problems(docs)
    assert any(expected in p for p in problems), problems


def _unknown_container_field(docs: list[Doc]) -> None:
    container(get(docs, "Deployment", ROUTER), "router")["livenessProbe"]["httpGett"] = {"path": "/healthz"}


def _unknown_spec_field(docs: list[Doc]) -> None:
    get(docs, "StatefulSet", WORKERS)["spec"]["replica"] = 3


def _wrong_type(docs: list[Doc]) -> None:
    get(docs, "Service", "tfs-router")["spec"]["ports"][0]["port"] = "8500"


def _missing_required(docs: list[Doc]) -> None:
    del get(docs, "HorizontalPodAutoscaler", "tfs-router")["spec"]["scaleTargetRef"]


SCHEMA_BREAKAGES = {
    "unknown field in a probe": ("pod", _unknown_container_field,
                                 ("Deployment/tfs-router: spec.template.spec.containers.0.livenessProbe: "
                                  "Additional properties are not allowed ('httpGett' was unexpected)")),
    "unknown spec field": ("fleet", _unknown_spec_field, "StatefulSet/tfs-workers: spec: Additional properties"),
    "wrong type": ("pod", _wrong_type, "Service/tfs-router: spec.ports.0.port"),
    "missing required field": ("fleet", _missing_required, "'scaleTargetRef' is a required property"),
}


@pytest.mark.parametrize("breakage", sorted(SCHEMA_BREAKAGES))
def test_an_invalid_object_is_caught(breakage: str) -> None:
    overlay, breaks, expected = SCHEMA_BREAKAGES[breakage]
    docs = rendered(overlay)
    breaks(docs)
    problems = schema_problems(docs)
    assert len(problems) == 1 and expected in problems[0], problems


def test_an_unknown_kind_is_caught() -> None:
    docs = [{"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}, "spec": {}}]
    assert any("Couldn't find schema" in p for p in schema_problems(docs))


ROUTER_BREAKAGES: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    "readiness path": ("pod", lambda d: container(get(d, "Deployment", ROUTER), "router")["readinessProbe"]["httpGet"]
                       .__setitem__("path", "/ready"), "the router serves no GET '/ready'"),
    "config rest port": ("fleet", lambda d: set_router_config(d, lambda c: c["rest"].__setitem__("port", 8080)),
                         "container port rest is 8501, the config's rest.port 8080"),
    "admin exposed": ("pod", lambda d: set_router_config(d, lambda c: c["admin"].__setitem__("host", "0.0.0.0")),
                      "admin.host 0.0.0.0 is not loopback"),
    "grace period": ("pod", lambda d: pod_spec(get(d, "Deployment", ROUTER)).__setitem__(
        "terminationGracePeriodSeconds", 20), "terminationGracePeriodSeconds 20 does not cover"),
    "scrape path": ("fleet", lambda d: get(d, "Deployment", ROUTER)["spec"]["template"]["metadata"]["annotations"]
                    .__setitem__("prometheus.io/path", "/prometheus"), "scrape path '/prometheus' is no router route"),
}


@pytest.mark.parametrize("breakage", sorted(ROUTER_BREAKAGES))
def test_a_router_mismatch_is_caught(breakage: str) -> None:
    overlay, breaks, expected = ROUTER_BREAKAGES[breakage]
    docs = rendered(overlay)
    breaks(docs)
    problems = router_problems(docs)
    assert any(expected in p for p in problems), problems


def _router_mount(docs: list[Doc], name: str) -> Doc:
    (m,) = [m for m in container(get(docs, "Deployment", ROUTER), "router")["volumeMounts"] if m["name"] == name]
    return m


def _worker_args(docs: list[Doc], edit: Callable[[list[str]], list[str]]) -> None:
    c = container(get(docs, "StatefulSet", WORKERS), "tensorflow-serving")
    c["args"] = edit(c["args"])


def _ssl_config_text(docs: list[Doc], old: str, new: str) -> None:
    data = get(docs, "Secret", "tfs-workers-tls")["stringData"]
    assert old in data["ssl_config.txt"]
    data["ssl_config.txt"] = data["ssl_config.txt"].replace(old, new)


def _service_port(docs: list[Doc], name: str, port: int) -> Doc:
    (sp,) = [p for p in get(docs, "Service", name)["spec"]["ports"] if p["port"] == port]
    return sp


TLS_BREAKAGES: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    "probe without HTTPS": ("tls", lambda d: container(get(d, "Deployment", ROUTER), "router")["readinessProbe"]
                            ["httpGet"].pop("scheme"), "router readinessProbe: scheme HTTP, but REST serves TLS"),
    "HTTPS probe on plain REST": ("pod", lambda d: container(get(d, "Deployment", ROUTER), "router")["livenessProbe"]
                                  ["httpGet"].__setitem__("scheme", "HTTPS"),
                                  "router livenessProbe: scheme HTTPS, but REST serves plain HTTP"),
    "scrape scheme": ("tls", lambda d: get(d, "Deployment", ROUTER)["spec"]["template"]["metadata"]["annotations"]
                      .pop("prometheus.io/scheme"), "router scrape scheme http (prometheus.io/scheme), but REST"),
    "certificate outside the Secret": ("tls", lambda d: set_router_config(d, lambda c: c["tls"].__setitem__(
        "cert_file", "/etc/tfs-router/tls.crt")), "tls.cert_file /etc/tfs-router/tls.crt: not in a mounted Secret "
        "(/etc/tfs-router is a configMap volume)"),
    "key the Secret lacks": ("tls", lambda d: set_router_config(d, lambda c: c["tls"].__setitem__(
        "key_file", "/etc/tfs-router-tls/tls.pem")), "Secret/tfs-router-tls has no key tls.pem"),
    "CA the Secret lacks": ("tls", lambda d: get(d, "Secret", "tfs-router-tls")["stringData"].pop("ca.crt"),
                            "workers.tls.ca_file /etc/tfs-router-tls/ca.crt: Secret/tfs-router-tls has no key ca.crt"),
    "subPath": ("tls", lambda d: _router_mount(d, "tls").__setitem__("subPath", "tls.crt"),
                "mounted with subPath at /etc/tfs-router-tls: it never sees the Secret's updates"),
    "writable Secret mount": ("tls", lambda d: _router_mount(d, "tls").pop("readOnly"),
                              "the Secret volume tls is not mounted readOnly"),
    "admin on TLS": ("tls", lambda d: set_router_config(d, lambda c: c["admin"].pop("tls")),
                     "admin: the admin API serves TLS"),
    "Service still h2c": ("tls", lambda d: _service_port(d, "tfs-router-headless", 8500).__setitem__(
        "appProtocol", "kubernetes.io/h2c"), "Service/tfs-router-headless: port 8500: appProtocol "
        "'kubernetes.io/h2c', but the router's grpc listener serves TLS"),
    "workers without TLS": ("tls", lambda d: _worker_args(d, lambda a: [x for x in a if "ssl_config" not in x]),
                            "workers.tls is enabled, but the workers serve plaintext gRPC"),
    "routers without worker TLS": ("tls", lambda d: set_router_config(d, lambda c: c["workers"].pop("tls")),
                                   "workers.tls is off"),
    "no server_name": ("tls", lambda d: set_router_config(d, lambda c: c["workers"]["tls"].pop("server_name")),
                       "workers.tls.server_name is not set"),
    "SSLConfig typo": ("tls", lambda d: _ssl_config_text(d, "server_key:", "server_kye:"),
                       "not a text-format SSLConfig"),
    "SSLConfig client_verify": ("tls", lambda d: _ssl_config_text(d, "client_verify: false", "client_verify: true"),
                                "client_verify: true, but the routers present no certificate"),
    "worker Service still h2c": ("tls", lambda d: _service_port(d, WORKERS, 8500).__setitem__(
        "appProtocol", "kubernetes.io/h2c"), "Service/tfs-workers: port 8500: appProtocol 'kubernetes.io/h2c'"),
}


@pytest.mark.parametrize("breakage", sorted(TLS_BREAKAGES))
def test_a_tls_mismatch_is_caught(breakage: str) -> None:
    overlay, breaks, expected = TLS_BREAKAGES[breakage]
    docs = rendered(overlay)
    assert tls_problems(docs) == []  # the control: unbroken, it passes
    breaks(docs)
    problems = tls_problems(docs)
    assert any(expected in p for p in problems), problems


def _replace_config_file(docs: list[Doc], key: str, old: str, new: str) -> None:
    sts = get(docs, "StatefulSet", WORKERS)
    (vol,) = [v for v in pod_spec(sts)["volumes"] if v["name"] == "config"]
    data = config_map(docs, vol["configMap"]["name"])["data"]  # type: ignore[index]
    assert old in data[key]
    data[key] = data[key].replace(old, new)


FLEET_BREAKAGES: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "dns name": (lambda d: set_router_config(d, lambda c: c["workers"].__setitem__(
        "addresses", ["dns:tfs-worker:8500"])), "dns:tfs-worker:8500: names no Service here"),
    "dns port": (lambda d: set_router_config(d, lambda c: c["workers"].__setitem__(
        "addresses", ["dns:tfs-workers:8501"])), "is not the workers' gRPC container port"),
    "TF Serving port flag": (lambda d: container(get(d, "StatefulSet", WORKERS), "tensorflow-serving")["args"]
                             .__setitem__(0, "--port=9000"), "--port=9000 but container port grpc is 8500"),
    "model name in probe": (lambda d: container(get(d, "StatefulSet", WORKERS), "tensorflow-serving")
                            ["readinessProbe"]["httpGet"].__setitem__("path", "/v1/models/ctrr"),
                            "worker readinessProbe: '/v1/models/ctrr'"),
    "worker preStop": (lambda d: container(get(d, "StatefulSet", WORKERS), "tensorflow-serving")["lifecycle"]
                       ["preStop"]["exec"].__setitem__("command", ["sleep", "5"]),
                       "worker preStop sleep 5 s is shorter than the routers' 15 s"),
    "models.config base_path": (lambda d: _replace_config_file(d, "models.config", '"/models/ctr"', '"/data/ctr"'),
                                "base_path /data/ctr is not under a read-only mount"),
}


@pytest.mark.parametrize("breakage", sorted(FLEET_BREAKAGES))
def test_a_fleet_mismatch_is_caught(breakage: str) -> None:
    breaks, expected = FLEET_BREAKAGES[breakage]
    docs = rendered("fleet")
    breaks(docs)
    problems = fleet_problems(docs)
    assert any(expected in p for p in problems), problems


def test_models_config_is_parsed_strictly() -> None:
    """A typo in models.config is a parse error, not an ignored line."""
    docs = rendered("fleet")
    _replace_config_file(docs, "models.config", "base_path:", "base_pth:")
    with pytest.raises(text_format.ParseError, match="base_pth"):
        fleet_problems(docs)


# -- the renderer refuses what it does not implement -------------------------------


def _kustomization(tmp_path: Path, body: str, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + body, encoding="utf-8")
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


CM = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n"
DEPLOY = ("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  template:\n    spec:\n"
          "      containers:\n        - name: c\n          image: i\n")


@pytest.mark.parametrize(("body", "files", "message"), [
    ("namePrefix: x-\n", {}, "unsupported kustomization keys ['namePrefix']"),
    ("resources: [cm.yaml]\nimages:\n  - name: tfs-router\n", {"cm.yaml": CM}, "unsupported kustomization keys"),
    ("resources: [https://example.invalid/x.yaml]\n", {}, "only local files and directories"),
    ("configMapGenerator:\n  - name: g\n    literals: [a=b]\n", {}, "only name and files"),
    ("resources: [d.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: Deployment}\n",
     {"d.yaml": DEPLOY, "p.yaml": DEPLOY}, "only {path: FILE} entries"),
    ("resources: [d.yaml]\npatches:\n  - path: p.yaml\n",
     {"d.yaml": DEPLOY, "p.yaml": DEPLOY.replace("name: d", "name: e")}, "no resource ('apps', 'Deployment', 'e')"),
    ("resources: [d.yaml]\npatches:\n  - path: p.yaml\n",
     {"d.yaml": DEPLOY, "p.yaml": DEPLOY + "      tolerations:\n        - key: k\n"},
     "spec.template.spec.tolerations: a list whose strategic-merge rule"),
    ("resources: [d.yaml]\npatches:\n  - path: p.yaml\n",
     {"d.yaml": DEPLOY, "p.yaml": DEPLOY.replace("- name: c", "- $patch: delete\n          name: c")},
     "$-directives are not supported"),
    ("resources: [cm.yaml, cm.yaml]\n", {"cm.yaml": CM}, "resources defined twice"),
])
def test_renderer_refuses_what_it_does_not_support(tmp_path: Path, body: str, files: dict[str, str],
                                                   message: str) -> None:
    with pytest.raises(KustomizeError) as info:
        render(_kustomization(tmp_path, body, files))
    assert message in str(info.value)


def test_renderer_merges_as_strategic_merge_does(tmp_path: Path) -> None:
    """Containers merge by name, mounts by mountPath, maps key by key, null deletes;
    a generated ConfigMap gets a content hash and the pod's reference follows it."""
    base = DEPLOY + ("          args: [a, b]\n          resources: {requests: {cpu: '1', memory: 1Gi}}\n"
                     "          volumeMounts:\n            - {name: v, mountPath: /v}\n"
                     "      volumes:\n        - name: v\n          configMap: {name: gen}\n")
    patch = DEPLOY.replace("          image: i\n", "") + (
        "          args: [c]\n          resources: {requests: {cpu: '2', memory: null}}\n"
        "          volumeMounts:\n            - {name: w, mountPath: /w}\n"
        "        - name: sidecar\n          image: s\n")
    out = render(_kustomization(tmp_path, "resources: [d.yaml]\nconfigMapGenerator:\n  - name: gen\n"
                                "    files: [k=f.txt]\npatches:\n  - path: p.yaml\n",
                                {"d.yaml": base, "p.yaml": patch, "f.txt": "hello\n"}))
    deploy, cm = out
    c, sidecar = pod_spec(deploy)["containers"]
    assert (c["image"], c["args"], c["resources"]) == ("i", ["c"], {"requests": {"cpu": "2"}})
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/v", "/w"]
    assert sidecar == {"name": "sidecar", "image": "s"}
    assert cm["metadata"]["name"].startswith("gen-") and cm["data"] == {"k": "hello\n"}
    assert pod_spec(deploy)["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    (tmp_path / "f.txt").write_text("changed\n", encoding="utf-8")
    assert render(tmp_path)[1]["metadata"]["name"] != cm["metadata"]["name"]
