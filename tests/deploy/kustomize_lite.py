"""A small Kustomize renderer: exactly the features deploy/k8s uses, nothing more.

There is no kustomize binary on this project's machines, so the tests render the
overlays with this instead. It supports

* ``resources``: local YAML files (several documents each) and directories
  holding a ``kustomization.yaml`` (rendered first, recursively);
* ``configMapGenerator``: ``name`` and ``files`` (``path`` or ``key=path``); the
  generated name gets a ``-<hash>`` suffix of its content, and references to it
  from pod templates (``volumes[].configMap.name``, ``env[].valueFrom.
  configMapKeyRef.name``, ``envFrom[].configMapRef.name``) are renamed, as
  kustomize does. The hash is this module's own (sha256 of the content), not
  byte for byte the one kustomize computes;
* ``patches``: ``path`` entries only, each a strategic-merge patch naming its
  target by apiVersion, kind and metadata.name. Maps merge recursively (``null``
  deletes a key); lists merge by Kubernetes' merge key where this module knows it
  (``MERGE_KEYS``), are replaced where Kubernetes replaces them
  (``ATOMIC_LISTS``), and any other list is refused, as is any ``$patch``
  directive.

Anything else (another kustomization key, a remote resource, a generator option,
a patch with a target selector or inline text) is refused with
``KustomizeError``, so a manifest can never rely on a feature this renderer only
pretends to have.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_API = "kustomize.config.k8s.io/v1beta1"
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "configMapGenerator", "patches"})
GENERATOR_KEYS = frozenset({"name", "files"})
PATCH_KEYS = frozenset({"path"})

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})

# Lists a strategic-merge patch merges item by item, keyed by this field (as in
# Kubernetes' own patchMergeKey tags). Paths are from the object's root; "[]"
# stands for "each item of the list".
_POD = "spec.template.spec"
MERGE_KEYS: dict[str, str] = {
    f"{_POD}.containers": "name",
    f"{_POD}.initContainers": "name",
    f"{_POD}.volumes": "name",
    f"{_POD}.containers[].ports": "containerPort",
    f"{_POD}.containers[].env": "name",
    f"{_POD}.containers[].volumeMounts": "mountPath",
    "spec.ports": "port",  # Service
}
# Lists Kubernetes replaces whole (no merge key: "atomic").
ATOMIC_LISTS: frozenset[str] = frozenset({
    f"{_POD}.containers[].command",
    f"{_POD}.containers[].args",
    f"{_POD}.containers[].lifecycle.preStop.exec.command",
    f"{_POD}.containers[].securityContext.capabilities.drop",
    "spec.accessModes",  # PersistentVolumeClaim
    "spec.metrics",  # HorizontalPodAutoscaler (atomic in autoscaling/v2)
    "spec.behavior.scaleUp.policies",
    "spec.behavior.scaleDown.policies",
})


class KustomizeError(Exception):
    """A kustomization this renderer cannot render faithfully."""


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize DIRECTORY`` would print, as dicts."""
    return _render(Path(directory), seen=())


def _render(directory: Path, seen: tuple[Path, ...]) -> list[dict[str, Any]]:
    directory = directory.resolve()
    if directory in seen:
        raise KustomizeError(f"{directory}: kustomization cycle")
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise KustomizeError(f"{kfile}: not a mapping")
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported kustomization keys {sorted(unknown)} "
                             f"(this renderer knows {sorted(SUPPORTED_KEYS)})")
    if spec.get("apiVersion") != KUSTOMIZATION_API or spec.get("kind") != "Kustomization":
        raise KustomizeError(f"{kfile}: expected apiVersion {KUSTOMIZATION_API}, kind Kustomization")

    resources: list[dict[str, Any]] = []
    for entry in _list(spec, "resources", kfile):
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com/", "git@")):
            raise KustomizeError(f"{kfile}: resource {entry!r}: only local files and directories")
        path = directory / entry
        if path.is_dir():
            resources += _render(path, (*seen, directory))
        elif path.is_file():
            resources += _documents(path)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")

    renames: dict[str, str] = {}
    for gen in _list(spec, "configMapGenerator", kfile):
        cm = _config_map(gen, directory, kfile)
        renames[cm["metadata"]["name"]] = f"{cm['metadata']['name']}-{_content_hash(cm)}"
        resources.append(cm)
    _check_unique(resources, kfile)

    for entry in _list(spec, "patches", kfile):
        if not isinstance(entry, dict) or set(entry) - PATCH_KEYS or "path" not in entry:
            raise KustomizeError(f"{kfile}: patch {entry!r}: only {{path: FILE}} entries are supported")
        patch_docs = _documents(directory / entry["path"])
        if len(patch_docs) != 1:
            raise KustomizeError(f"{kfile}: patch {entry['path']}: expected one document")
        _apply_patch(resources, patch_docs[0], f"{directory / entry['path']}")

    for res in resources:
        if res["kind"] == "ConfigMap" and res["metadata"]["name"] in renames:
            res["metadata"]["name"] = renames[res["metadata"]["name"]]
        _rename_config_map_refs(res, renames)
    return resources


def _list(spec: dict[str, Any], key: str, kfile: Path) -> list[Any]:
    value = spec.get(key) or []
    if not isinstance(value, list):
        raise KustomizeError(f"{kfile}: {key}: expected a list")
    return value


def _documents(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise KustomizeError(f"{path}: no such file")
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind", "metadata")):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata")
        if not isinstance(d["metadata"], dict) or not d["metadata"].get("name"):
            raise KustomizeError(f"{path}: {d['kind']} without metadata.name")
    return docs


def _config_map(gen: Any, directory: Path, kfile: Path) -> dict[str, Any]:
    if not isinstance(gen, dict) or set(gen) - GENERATOR_KEYS or "name" not in gen:
        raise KustomizeError(f"{kfile}: configMapGenerator {gen!r}: only name and files are supported")
    data: dict[str, str] = {}
    for item in gen.get("files") or []:
        key, sep, rel = str(item).partition("=")
        if not sep:
            key, rel = Path(item).name, item
        if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
            raise KustomizeError(f"{kfile}: {gen['name']}: {key!r} is not a valid ConfigMap key")
        if key in data:
            raise KustomizeError(f"{kfile}: {gen['name']}: key {key!r} twice")
        path = directory / rel
        if not path.is_file():
            raise KustomizeError(f"{kfile}: {gen['name']}: {rel} does not exist")
        data[key] = path.read_text(encoding="utf-8")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}


def _content_hash(cm: dict[str, Any]) -> str:
    body = json.dumps({"kind": cm["kind"], "name": cm["metadata"]["name"], "data": cm["data"]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def ident(res: dict[str, Any]) -> tuple[str, str, str]:
    """(API group, kind, name): the identity a patch is matched by (the version may differ)."""
    group = res["apiVersion"].rpartition("/")[0]
    return group, res["kind"], res["metadata"]["name"]


def _check_unique(resources: list[dict[str, Any]], kfile: Path) -> None:
    ids = [ident(r) for r in resources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KustomizeError(f"{kfile}: resources defined twice: {dupes}")


def _apply_patch(resources: list[dict[str, Any]], patch: dict[str, Any], where: str) -> None:
    targets = [r for r in resources if ident(r) == ident(patch)]
    if not targets:
        raise KustomizeError(f"{where}: no resource {ident(patch)} to patch")
    (target,) = targets
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    merged = _merge(target, body, "", where)
    target.clear()
    target.update(merged)


def _merge(base: Any, patch: Any, path: str, where: str) -> Any:
    if isinstance(patch, dict):
        if any(str(k).startswith("$") for k in patch):
            raise KustomizeError(f"{where}: {path}: $-directives are not supported")
        out = dict(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            sub = f"{path}.{key}" if path else str(key)
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(out.get(key), value, sub, where)
        return out
    if isinstance(patch, list):
        if path in ATOMIC_LISTS:
            return copy.deepcopy(patch)
        if path not in MERGE_KEYS:
            raise KustomizeError(f"{where}: {path}: a list whose strategic-merge rule this renderer does not know")
        key = MERGE_KEYS[path]
        out_list = [copy.deepcopy(x) for x in base] if isinstance(base, list) else []
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"{where}: {path}: every item needs its merge key {key!r}")
            match = [i for i, x in enumerate(out_list) if isinstance(x, dict) and x.get(key) == item[key]]
            if match:
                out_list[match[0]] = _merge(out_list[match[0]], item, f"{path}[]", where)
            else:
                out_list.append(_merge(None, item, f"{path}[]", where))
        return out_list
    return patch


def _rename_config_map_refs(res: dict[str, Any], renames: dict[str, str]) -> None:
    if res["kind"] not in WORKLOAD_KINDS or not renames:
        return
    pod = res.get("spec", {}).get("template", {}).get("spec", {})
    for vol in pod.get("volumes") or []:
        cm = vol.get("configMap")
        if cm and cm.get("name") in renames:
            cm["name"] = renames[cm["name"]]
    for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]
        for src in container.get("envFrom") or []:
            ref = src.get("configMapRef")
            if ref and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]
