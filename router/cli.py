"""The operator's commands: clients of the admin endpoint (``router/frontends/admin.py``).

    tfs-router status                          pool, models, routing and the running rollout, as tables
    tfs-router rollout MODEL [--version V] [--watch]
    tfs-router rollout MODEL --abort [--watch] roll the running rollout back
    tfs-router rollback MODEL [--version V] [--watch]
    tfs-router canary MODEL --weight N         the canary's share of unversioned traffic
    tfs-router promote MODEL                   the canary gets all traffic and becomes the default
    tfs-router abort MODEL                     the canary's weight goes to 0
    tfs-router drain WORKER / undrain WORKER

``--admin URL`` (default ``http://127.0.0.1:8502``, or ``TFS_ROUTER_ADMIN_URL``)
says where the router's admin endpoint is; the token comes from
``TFS_ROUTER_ADMIN_TOKEN``.  ``--watch`` prints the rollout's progress,
worker by worker and phase by phase, until it ends, and exits 0 when it
completed, 1 when it was rolled back.  Plain HTTP with the standard
library: these commands start in milliseconds and need nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

DEFAULT_ADMIN_URL = "http://127.0.0.1:8502"
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class AdminError(Exception):
    """The admin endpoint could not be reached or refused the command."""


class AdminClient:
    def __init__(self, url: str, token: str = "", timeout: float = 10.0, cacert: str = "") -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # https: the router's certificate is checked against this CA file (default: the system's roots)
        self.context = ssl.create_default_context(cafile=cacert or None) if self.url.startswith("https:") else None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise AdminError(f"{exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the admin endpoint at {self.url} ({reason}); "
                             "is the router running, and is --admin right?") from None

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/admin/status")


# -- rendering -------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _versions(by_model: dict[str, dict[str, str]]) -> str:
    parts = []
    for model, versions in by_model.items():
        shown = [f"{v}" if s == "AVAILABLE" else f"{v}:{s.lower()}" for v, s in versions.items()]
        parts.append(f"{model} {','.join(shown) or '-'}")
    return "; ".join(parts) or "-"


def _at(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def render_status(status: dict[str, Any]) -> str:
    out = []
    workers = [[w["name"] + (" (surge)" if w.get("surge") else ""), w["state"], "yes" if w["in_rotation"] else "no",
                w.get("pid") or "-", w["inflight"], _versions(w["versions"]), w.get("step") or "-"]
               for w in status["workers"]]
    out.append(table(["worker", "state", "in rotation", "pid", "in flight", "versions", "step"], workers))
    kept = status.get("state") or {}
    entries = [(m, key, e) for m, model in sorted(kept.get("models", {}).items())
               for key, e in sorted(model.items()) if key != "failed"]
    entries += [(m, f"failed {v}", e) for m, model in sorted(kept.get("models", {}).items())
                for v, e in sorted(model.get("failed", {}).items())]
    entries += [(w, "drained", e) for w, e in sorted(kept.get("workers", {}).items())]
    rows = [[who, what, e["by"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))]
            for who, what, e in entries]
    if rows:  # what comes from the runtime state, not the config
        out.append("")
        out.append(table(["set at run time", "what", "by", "when"], rows))
    fleet = kept.get("fleet")
    if fleet:  # state.backend: etcd (router/fleet.py)
        who = "this replica" if fleet["leading"] else (fleet["leader"] or "nobody yet")
        out.append("")
        out.append(f"fleet: replica {fleet['replica']}; leader: {who}"
                   + ("; the state store is unreachable (serving on with the last state)" if kept.get("stale") else ""))
    if status.get("dataplanes"):  # dataplane.processes > 1
        planes = [[d["index"], d["pid"] or "-", "yes" if d["ready"] else "no",
                   f"{d['revision']}/{d['revision_published']}" if d["revision"] is not None else "-",
                   d["inflight"], d["answered"]] for d in status["dataplanes"]]
        out.append("")
        out.append(table(["data plane", "pid", "ready", "revision", "in flight", "answered"], planes))
    models = [[m["name"], m["default_version"] if m["default_version"] is not None else "-",
               ",".join(map(str, m["serving"])) or "-", ",".join(map(str, m["complete_on_disk"])) or "-",
               ",".join(f"{v} ({why})" for v, why in m["failed"].items()) or "-",
               ",".join(map(str, m["pinned"])) if m["pinned"] else "-"]
              for m in status["models"]]
    out.append("")
    out.append(table(["model", "default", "serving", "on disk", "failed", "pinned"], models))
    for m in status["models"]:
        routing = m.get("routing") or {}
        if routing.get("weights") or (routing.get("routing") or {}).get("rules"):
            weights = ", ".join(f"v{v} {w}%" for v, w in routing.get("weights", {}).items()) or "-"
            rules = len((routing.get("routing") or {}).get("rules", []))
            out.append(f"routing {m['name']}: split {weights}; {rules} header rule(s)"
                       f"{'; sticky by ' + routing['routing']['sticky_header'] if routing['routing'].get('sticky_header') else ''}")
        progress = routing.get("progressive")
        if progress:
            out.append(f"progressive {m['name']}: {progress['state']}, canary v{progress['canary']} at "
                       f"{progress['weight']}% (step {progress['step'] + 1} of {len(progress['steps'])}): "
                       f"{progress['reason'] or 'first interval running'}")
            if progress["verdicts"]:
                last = progress["verdicts"][-1]
                out.append(f"  last comparison: stable {last['stable']}, canary {last['canary']} -> {last['verdict']}")
    rollout = status.get("rollout")
    out.append("")
    if rollout:
        out.append(describe_rollout(rollout))
        if rollout.get("workers"):
            out.append(table(["worker", "phase"], [[w, p] for w, p in sorted(rollout["workers"].items())]))
    else:
        out.append("no rollout running")
    if status.get("history"):
        last = status["history"][-1]
        out.append(f"last rollout: {describe_rollout(last)}")
    return "\n".join(out)


def describe_rollout(r: dict[str, Any]) -> str:
    changes = ", ".join(f"{m} {r['from'].get(m, [])} -> {r['to'].get(m, [])}" for m in sorted({*r["from"], *r["to"]})
                        if r["from"].get(m) != r["to"].get(m))
    text = (f"rollout {r['id']} [{r['state']}] {changes or 'no change'}: phase {r['phase']}"
            f"{' (switched)' if r['switched'] else ''}, {r['strategy']}/{r['mode']}"
            f"{', surge' if r['surge'] else ''}, started {_at(r['started'])}")
    if r.get("ended"):
        text += f", ended {_at(r['ended'])} ({r['ended'] - r['started']:.1f}s)"
    if r.get("error"):
        text += f"\n  error: {r['error']}"
    if r.get("blocked"):
        text += f"\n  waiting: {r['blocked']}"
    return text


def event_line(event: dict[str, Any], started: float) -> str:
    who = event["worker"] or "pool"
    return f"{event['time'] - started:7.2f}s  {who:<6} {event['phase']:<9} {event['message']}"


# -- watching ----------------------------------------------------------------------


def watch(client: AdminClient, rollout_id: int, out: IO[str], interval: float = 0.5,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the rollout's events as they happen; EXIT_OK when it completed, EXIT_FAILED otherwise."""
    shown = 0
    while True:
        status = client.status()
        candidates = [status["rollout"], *reversed(status.get("history", []))]
        rollout = next((r for r in candidates if r and r["id"] == rollout_id), None)
        if rollout is None:
            raise AdminError(f"rollout {rollout_id} is not known to the router (restarted?)")
        for event in rollout["events"][shown:]:
            print(event_line(event, rollout["started"]), file=out, flush=True)
        shown = len(rollout["events"])
        if rollout["state"] != "running":
            print(describe_rollout(rollout), file=out, flush=True)
            return EXIT_OK if rollout["state"] == "done" else EXIT_FAILED
        sleep(interval)


# -- the commands --------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    def admin_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--admin", default=os.environ.get("TFS_ROUTER_ADMIN_URL", DEFAULT_ADMIN_URL),
                       help=f"the router's admin endpoint (default {DEFAULT_ADMIN_URL}; token from "
                            "TFS_ROUTER_ADMIN_TOKEN)")
        p.add_argument("--cacert", default=os.environ.get("TFS_ROUTER_ADMIN_CACERT", ""),
                       help="with an https:// endpoint: the CA file its certificate is checked against "
                            "(default: the system's; or TFS_ROUTER_ADMIN_CACERT)")

    p = sub.add_parser("status", help="workers, models and rollouts of a running router")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON")
    admin_flags(p)
    for name, text in (("rollout", "roll a model out to a version (default: what its policy says)"),
                       ("rollback", "roll a model back (default: to the version before the last rollout)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.add_argument("--version", type=int, help="the version to serve")
        p.add_argument("--watch", action="store_true", help="follow the rollout until it ends; exit 1 if rolled back")
        if name == "rollout":
            p.add_argument("--abort", action="store_true", help="roll the running rollout back instead")
        admin_flags(p)
    p = sub.add_parser("canary", help="set the canary's share of a model's unversioned traffic")
    p.add_argument("model")
    p.add_argument("--weight", type=int, required=True, help="percent, 0 to 100")
    admin_flags(p)
    for name, text in (("promote", "the canary gets all traffic and becomes the default; the old version retires"),
                       ("abort", "the canary's weight goes to 0 (a progression stops)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        admin_flags(p)
    for name in ("drain", "undrain"):
        p = sub.add_parser(name, help=f"{name} a worker (out of / back into rotation)")
        p.add_argument("worker")
        admin_flags(p)
    sub.add_parser("replay", add_help=False, help="send logged requests again (tfs-router replay --help)")
    p = sub.add_parser("state", help="the runtime state kept across restarts (state.dir)")
    p.add_argument("action", choices=("reset",), help="reset: drop a model's runtime decisions (routing set at "
                                                      "run time, pins, failed marks): back to the config")
    p.add_argument("model")
    admin_flags(p)


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    client = AdminClient(args.admin, os.environ.get("TFS_ROUTER_ADMIN_TOKEN", ""), cacert=args.cacert)
    try:
        if args.command == "status":
            status = client.status()
            print(json.dumps(status, indent=2) if args.json else render_status(status), file=out)
            return EXIT_OK
        if args.command == "rollout" and args.abort:
            rollout = client.call("POST", "/v1/admin/rollout/abort")["rollout"]
            print(f"rollout {rollout['id']}: rolling back", file=out)
            return watch(client, rollout["id"], out) if args.watch else EXIT_OK
        if args.command in ("rollout", "rollback"):
            body = {"version": args.version} if args.version is not None else {}
            result = client.call("POST", f"/v1/admin/models/{args.model}/{args.command}", body)
            rollout = result.get("rollout")
            if rollout is None:
                print(result.get("message", "nothing to do"), file=out)
                return EXIT_OK
            print(f"rollout {rollout['id']} started: {describe_rollout(rollout).splitlines()[0]}", file=out)
            return watch(client, rollout["id"], out) if args.watch else EXIT_OK
        if args.command in ("canary", "promote", "abort"):
            body = {"weight": args.weight} if args.command == "canary" else {}
            result = client.call("POST", f"/v1/admin/models/{args.model}/{args.command}", body)
            weights = ", ".join(f"version {v}: {w}%" for v, w in result["weights"].items()) or "no split"
            print(f"{args.model}: {weights}", file=out)
            return EXIT_OK
        if args.command == "state":
            client.call("POST", f"/v1/admin/models/{args.model}/state/reset")
            print(f"{args.model}: back to the config (its runtime state dropped)", file=out)
            return EXIT_OK
        result = client.call("POST", f"/v1/admin/workers/{args.worker}/{args.command}")
        print(f"{result['worker']}: {result['state']}", file=out)
        return EXIT_OK
    except AdminError as exc:
        print(f"tfs-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
