"""deploy/k8s: both Kustomize overlays render, every object is valid Kubernetes, and
the objects fit together and fit the router.

Offline and fast: no cluster, no kustomize binary and no server. The overlays are
rendered by tests/deploy/kustomize_lite.py (which refuses any kustomization
feature it does not implement), every rendered object is checked against the
Kubernetes API schema in strict mode (kubernetes-validate: unknown fields fail),
and the checks below cross-reference the objects: Service, PDB and HPA targets,
ports, probes, volumes, the router config inside its ConfigMap (loaded with the
router's own loader), the TF Serving flags and models.config of the fleet's
workers. Broken copies show that each kind of check fails when it should.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
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
OVERLAYS = {name: K8S / "overlays" / name for name in ("pod", "fleet")}
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
        for c in spec["containers"]:
            where = f"{name_of(w)} container {c['name']}"
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    problems.append(f"{where}: mount {m['mountPath']}: no volume {m['name']}")
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


# -- the overlays as they are -------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_what_it_should(overlay: str) -> None:
    kinds = sorted(name_of(d).rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else name_of(d)
                   for d in rendered(overlay))
    common = ["ConfigMap/tfs-router-config", "Deployment/tfs-router", "HorizontalPodAutoscaler/tfs-router",
              "PersistentVolumeClaim/tfs-models", "PodDisruptionBudget/tfs-router", "Service/tfs-router",
              "Service/tfs-router-headless"]
    extra = {"pod": [],
             "fleet": ["ConfigMap/tfs-workers-config", "PodDisruptionBudget/tfs-workers", "Service/tfs-workers",
                       "StatefulSet/tfs-workers"]}[overlay]
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


def test_fleet_topology() -> None:
    assert fleet_problems(rendered("fleet")) == []


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
