"""Operator decisions that survive a restart (state.backend: file, router/state.py), with real routers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, RouterProcess, child_env, copy_in, wait_for



def canary_config(model_root: Path, state_dir: Path) -> dict[str, Any]:
    return {"models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1,2",
                        "version_labels": {"stable": 1, "canary": 2},
                        "routing": {"split": {"stable": 90, "canary": 10}, "sticky_header": "x-user"}}],
            "workers": {"count": 2}, "state": {"dir": str(state_dir)}}


def weights(router: RouterProcess) -> dict[str, int]:
    return router.status()["models"][0]["routing"]["weights"]


def test_a_canary_weight_and_a_drain_survive_a_restart(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    state_dir = tmp_path / "state"
    config = canary_config(model_root, state_dir)
    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        before = weights(router)
        assert router.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 30})[0] == 200
        assert router.admin("POST", "/v1/admin/workers/w1/drain")[0] == 200
        saved = json.loads((state_dir / "state.json").read_text())
        assert saved["models"]["ctr"]["routing"]["by"].startswith("admin ")
        assert saved["workers"]["w1"]["value"] is True
        raised = weights(router)
    finally:
        assert router.terminate() == 0, router.log()
    assert raised != before

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        assert weights(router) == raised  # the operator's 30%, not the config's 10%
        wait_for(lambda: {w["name"]: w["state"] for w in router.status()["workers"]}.get("w1") == "drained",
                 "w1 to come back drained")
        status = router.status()
        assert status["state"]["models"]["ctr"]["routing"]["by"].startswith("admin ")
        cli = subprocess.run([sys.executable, "-m", "router", "status", "--admin", router.admin_url], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=60)
        assert "set at run time" in cli.stdout and "routing" in cli.stdout and "drained" in cli.stdout, cli.stdout

        # tfs-router state reset: back to the config
        reset = subprocess.run([sys.executable, "-m", "router", "state", "reset", "ctr", "--admin",
                                router.admin_url], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                               timeout=60)
        assert reset.returncode == 0, reset.stderr
        assert weights(router) == before
        saved = json.loads((state_dir / "state.json").read_text())
        assert "ctr" not in saved["models"] and "w1" in saved["workers"]  # the drain is the worker's, not the model's
    finally:
        assert router.terminate() == 0, router.log()


@pytest.mark.parametrize("backend", ["file", "etcd"])
def test_a_pin_and_a_failed_version_survive_a_restart(backend: str, model_root: Path, tmp_path: Path,
                                                      logs_dir: Path, request: pytest.FixtureRequest) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    for v in (1, 2):
        copy_in(model_root / "ctr" / str(v), base, v, tmp_path)
    state_dir = tmp_path / "state"
    config: dict[str, Any] = {"models": [{"name": "ctr", "base_path": str(base)}], "workers": {"count": 1},
                              "poll_interval_s": 0.2, "state": {"dir": str(state_dir)}}
    if backend == "etcd":
        config["state"] = {"backend": "etcd", "endpoints": [request.getfixturevalue("etcd").endpoint],
                           "prefix": "/pins/"}
    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        router.wait_rollouts(1)
        staging = tmp_path / "corrupt"  # a version 3 whose variables are cut short: it fails to load
        shutil.copytree(model_root / "ctr" / "2", staging)
        data = next((staging / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:1000])
        os.rename(staging, base / "3")
        wait_for(lambda: 3 in router.status()["models"][0]["complete_on_disk"], "version 3 on disk")
        wait_for(lambda: "3" in router.status()["models"][0]["failed"], "version 3 to fail", timeout=120)
        wait_for(lambda: router.status()["rollout"] is None, "the rollback to end", timeout=120)
        code, body = router.admin("POST", "/v1/admin/models/ctr/rollout", {"version": 1})  # pins version 1
        assert code in (200, 202), body
        wait_for(lambda: router.status()["models"][0]["pinned"] == [1] and router.status()["rollout"] is None,
                 "the pin on 1", timeout=120)
        time.sleep(1.5)  # the router's own changes (the failed mark) are written within a second
        if backend == "file":
            saved = json.loads((state_dir / "state.json").read_text())["models"]["ctr"]
            assert saved["pinned"]["value"] == [1] and "3" in saved["failed"], saved
        kept = router.status()["state"]["models"]["ctr"]  # what the store holds, who set it and when
        assert kept["pinned"]["by"].startswith("admin ") and "3" in kept["failed"], kept
    finally:
        assert router.terminate() == 0, router.log()

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        [first] = router.wait_rollouts(1)
        model = router.status()["models"][0]
        assert model["pinned"] == [1], model  # not the policy's latest
        assert "3" in model["failed"], model  # not tried again: its directory did not change
        assert first["to"] == {"ctr": [1]}, first
    finally:
        assert router.terminate() == 0, router.log()


def test_an_unreadable_state_file_refuses_the_start_unless_ignored(model_root: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text("{not json")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                                    "grpc": {"port": 0}, "rest": {"port": 0}, "admin": {"port": 0},
                                    "state": {"dir": str(state_dir)}}))
    env = {k: v for k, v in child_env().items() if k != "TFS_ROUTER_STATE_DIR"}
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"state file {state_dir / 'state.json'}" in done.stderr and "--ignore-state" in done.stderr, done.stderr


@pytest.mark.parametrize("backend", ["memory", "zookeeper"])
def test_unknown_backends_are_refused(backend: str) -> None:
    from router.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="state.backend"):
        from_dict({"models": [{"name": "m", "base_path": "/m"}], "state": {"backend": backend}})


# -- etcd: routers that share their runtime state ------------------------------------------------------


class Etcd:
    """A real etcd member (Debian's etcd-server) on free ports, its data in a temporary directory."""

    def __init__(self, data_dir: Path, log_dir: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        import socket

        self.tls = tls  # (CA, certificate, key): clients must present a certificate that CA signed

        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: `make install` installs Debian's etcd-server (as root), "
                        "or apt-get install etcd-server")
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.port, self.peer_port = ports
        self.data_dir, self.log = data_dir, open(log_dir / f"etcd-{time.monotonic_ns()}.log", "wb")
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        scheme = "https" if self.tls else "http"
        tls = ["--trusted-ca-file", str(self.tls[0]), "--cert-file", str(self.tls[1]), "--key-file", str(self.tls[2]),
               "--client-cert-auth"] if self.tls else []
        self.proc = subprocess.Popen(
            [self.binary, "--data-dir", str(self.data_dir), "--name", "t", *tls,
             "--listen-client-urls", f"{scheme}://{self.endpoint}",
             "--advertise-client-urls", f"{scheme}://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", f"t=http://127.0.0.1:{self.peer_port}"],
            stdout=self.log, stderr=self.log)
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def etcd(tmp_path: Path, logs_dir: Path) -> Any:
    member = Etcd(tmp_path / "etcd", logs_dir)
    yield member
    member.stop()
    member.log.close()


def etcd_config(model_root: Path, etcd: Etcd) -> dict[str, Any]:
    config = canary_config(model_root, Path("/unused"))
    config["state"] = {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": "/t/"}
    config["workers"] = {"count": 1}
    return config


def test_replicas_on_one_etcd_agree_and_keep_it_over_a_restart(model_root: Path, etcd: Etcd,
                                                               logs_dir: Path) -> None:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from tests.support import TEST_VOCAB, predict_request
    from workers.demo_model import example_inputs

    config = etcd_config(model_root, etcd)
    routers = [RouterProcess(config, log_dir=logs_dir) for _ in range(3)]
    try:
        for r in routers:
            r.wait_ready()
            wait_for(lambda r=r: r.status()["models"][0]["available"] == [1, 2], "both versions")
        before = weights(routers[0])
        assert routers[0].admin("POST", "/v1/admin/models/ctr/canary", {"weight": 50})[0] == 200
        raised = weights(routers[0])
        assert raised != before
        start = time.monotonic()
        wait_for(lambda: all(weights(r) == raised for r in routers[1:]), "the other replicas to apply it",
                 timeout=10)
        assert time.monotonic() - start < 2.0
        # the same sticky key, the same version, whichever replica answers
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(r.channel) for r in routers]
        for i in range(30):
            answers = {s.Predict(request, metadata=(("x-user", f"u{i}"),), timeout=30).model_spec.version.value
                       for s in stubs}
            assert len(answers) == 1, (i, answers)
        assert routers[1].status()["state"]["models"]["ctr"]["routing"]["by"].startswith("admin ")
        leaders = [r.status()["state"]["fleet"]["leading"] for r in routers]
        assert sum(leaders) == 1, leaders
        cli = subprocess.run([sys.executable, "-m", "router", "status", "--admin", routers[leaders.index(False)].admin_url],
                             cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
        leader_name = routers[leaders.index(True)].status()["state"]["fleet"]["replica"]
        assert f"leader: {leader_name}" in cli.stdout, cli.stdout

        # etcd down under load: no request fails, writes are refused (503); back: writes work, and reach
        # the others
        from tests.support import SteadyLoad

        loads = [SteadyLoad(r.channel, request) for r in routers]
        for load in loads:
            load.__enter__()
        try:
            etcd.stop()
            wait_for(lambda: routers[0].status()["state"]["stale"] or routers[0].admin(
                "POST", "/v1/admin/models/ctr/canary", {"weight": 40})[0] == 503, "the store to be seen down")
            code, body = routers[0].admin("POST", "/v1/admin/models/ctr/canary", {"weight": 40})
            assert code == 503 and "state store is unreachable" in body["error"], body
            code, ready, _ = routers[0].get("/readyz")  # still ready: it serves on; the detail says why not all is well
            assert code == 200 and json.loads(ready)["state_store"] == "stale", ready
            assert weights(routers[0]) == raised  # the refused command is undone here
            etcd.start()
            wait_for(lambda: routers[0].admin("POST", "/v1/admin/models/ctr/canary", {"weight": 20})[0] == 200,
                     "writes to work again", timeout=30)
            lowered = weights(routers[0])
            wait_for(lambda: all(weights(r) == lowered for r in routers[1:]), "the others to catch up", timeout=30)
        finally:
            for load in loads:
                load.__exit__()
        assert all(load.served for load in loads)
        assert not [f for load in loads for f in load.failures], [f for load in loads for f in load.failures][:5]

        # a replica restarted reads the shared state
        assert routers[1].terminate() == 0
        routers[1] = RouterProcess(config, log_dir=logs_dir)
        routers[1].wait_ready()
        wait_for(lambda: weights(routers[1]) == lowered, "the restarted replica to have it", timeout=30)
    finally:
        for r in routers:
            r.terminate()


def test_two_conflicting_writes_one_wins_the_other_is_refused(etcd: Etcd) -> None:
    import asyncio

    from router.state import EtcdStore, Entry, StateConflict, empty

    async def run() -> None:
        a, b = EtcdStore((etcd.endpoint,), "/c/"), EtcdStore((etcd.endpoint,), "/c/")
        await a.load()
        await b.load()  # both saw the same (empty) state
        mine, theirs = empty(), empty()
        mine["models"]["ctr"] = {"pinned": Entry([1], "admin a", 1.0)}
        theirs["models"]["ctr"] = {"pinned": Entry([2], "admin b", 2.0)}
        await a.save(mine)
        with pytest.raises(StateConflict, match="changed by another router"):
            await b.save(theirs)
        assert (await b.load())["models"]["ctr"]["pinned"].value == [1]  # the first write stands
        await b.save(theirs)  # having seen it, b may change it
        assert (await a.load())["models"]["ctr"]["pinned"].value == [2]
        await a.close()
        await b.close()

    asyncio.run(run())


def test_a_write_through_a_replica_that_had_not_seen_the_last_one_gets_409(model_root: Path, etcd: Etcd,
                                                                          logs_dir: Path) -> None:
    config = etcd_config(model_root, etcd)
    fast = RouterProcess(config, log_dir=logs_dir)
    # the second replica applies other replicas' writes 3 s late: its view is behind for that long
    slow = RouterProcess(config, log_dir=logs_dir, env={"TFS_ROUTER_TEST_WATCH_LAG": "3"})
    try:
        for r in (fast, slow):
            r.wait_ready()
            wait_for(lambda r=r: r.status()["models"][0]["available"] == [1, 2], "both versions")
        assert fast.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 40})[0] == 200
        code, body = slow.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 70})
        assert code == 409 and "changed by another router" in body["error"], (code, body)
        forty = weights(fast)
        wait_for(lambda: weights(slow) == forty, "the slow replica to see the write that won", timeout=15)
        assert slow.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 70})[0] == 200  # now it may
    finally:
        for r in (fast, slow):
            r.terminate()


def test_a_progression_resumes_at_its_step_after_a_restart(model_root: Path, tmp_path: Path,
                                                           logs_dir: Path) -> None:
    from tests.support import TEST_VOCAB, SteadyLoad, predict_request
    from workers.demo_model import example_inputs

    state_dir = tmp_path / "state"
    config = canary_config(model_root, state_dir)
    config["models"][0]["routing"] = {
        "split": {"stable": 100, "canary": 0}, "sticky_header": "x-user",
        "progressive": {"steps": [10, 40, 70, 100], "interval_s": 1.0, "min_requests": 5, "max_p99_ratio": 10.0}}

    def progress(r: RouterProcess) -> dict[str, Any]:
        result: dict[str, Any] = r.status()["models"][0]["routing"]["progressive"] or {}
        return result

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        wait_for(lambda: router.status()["models"][0]["available"] == [1, 2], "both versions")
        with SteadyLoad(router.channel, predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB)),
                        clients=4):
            wait_for(lambda: progress(router).get("step", 0) >= 1, "the progression to advance", timeout=60)
        time.sleep(1.5)  # no traffic: the step holds (too few requests to judge); its place is written
        at = progress(router)
        assert at["state"] == "running", at
    finally:
        assert router.terminate() == 0, router.log()
    saved = json.loads((state_dir / "state.json").read_text())["models"]["ctr"]["progressive"]["value"]
    assert saved["step"] == at["step"] >= 1, (saved, at)

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        resumed = progress(router)
        assert resumed["state"] == "running" and resumed["step"] == saved["step"], resumed  # not step 0 again
        assert resumed["weight"] == [10, 40, 70, 100][saved["step"]]
        assert "progression resumed at step" in router.log()
    finally:
        assert router.terminate() == 0, router.log()


def test_the_fleets_leader_judges_the_fleets_traffic_and_another_takes_over(model_root: Path, etcd: Etcd,
                                                                           logs_dir: Path) -> None:
    """Three routers on one etcd, a progression: only the leader judges, from every replica's windows (the
    load goes to the two others only, so its own window alone would hold the progression at step 0 for
    ever). kill -9 of the leader mid-step: another leads, goes on from the same step, and the canary is
    promoted once."""
    from tests.support import TEST_VOCAB, SteadyLoad, predict_request
    from workers.demo_model import example_inputs

    steps = [10, 40, 70, 100]
    config = etcd_config(model_root, etcd)
    config["models"][0]["routing"] = {
        "split": {"stable": 100, "canary": 0},
        "progressive": {"steps": steps, "interval_s": 2.0, "min_requests": 20, "max_p99_ratio": 10.0}}

    def progress(r: RouterProcess) -> dict[str, Any]:
        result: dict[str, Any] = r.status()["models"][0]["routing"]["progressive"] or {}
        return result

    def fleet(r: RouterProcess) -> dict[str, Any]:
        result: dict[str, Any] = r.status()["state"]["fleet"]
        return result

    routers = [RouterProcess(config, log_dir=logs_dir) for _ in range(3)]
    loads: list[SteadyLoad] = []
    try:
        for r in routers:
            r.wait_ready()
            wait_for(lambda r=r: r.status()["models"][0]["available"] == [1, 2], "both versions")
        wait_for(lambda: sum(fleet(r)["leading"] for r in routers) == 1
                 and len({fleet(r)["leader"] for r in routers}) == 1, "one leader, known to all")
        leader = next(r for r in routers if fleet(r)["leading"])
        others = [r for r in routers if r is not leader]
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        loads = [SteadyLoad(r.channel, request, clients=2) for r in others]  # none on the leader
        for load in loads:
            load.__enter__()
        wait_for(lambda: progress(leader)["step"] >= 1, "the leader to advance on the others' traffic", timeout=60)
        assert progress(leader)["state"] == "running"
        wait_for(lambda: all(progress(r)["step"] == progress(leader)["step"] for r in others), "the others to follow")
        step = progress(leader)["step"]
        leader.kill()
        seen: list[int] = []

        def led_by_another() -> bool:
            seen.extend(progress(r)["step"] for r in others)
            return any(fleet(r)["leading"] for r in others)

        wait_for(led_by_another, "another replica to lead", timeout=30)
        assert min(seen) >= step, (step, seen)  # went on from the step reached, never back to the start
        wait_for(lambda: all(progress(r)["state"] == "promoted" for r in others), "the promotion", timeout=90)
        for load in loads:
            load.__exit__()
        assert not [f for load in loads for f in load.failures], [f for load in loads for f in load.failures][:5]
        verdicts = progress(others[0])["verdicts"]
        assert [v["step"] for v in verdicts if v["verdict"] == "advance"] == list(range(len(steps))), verdicts
        logs = [r.log_path.read_text(errors="replace") for r in routers]
        assert sum(text.count("canary version 2 promoted (every step healthy") for text in logs) == 1, "promoted twice"
        new_leader = next(r for r in others if fleet(r)["leading"])
        follower = next(r for r in others if r is not new_leader)
        assert "the fleet's leader promoted the canary version 2" in follower.log_path.read_text(errors="replace")
    finally:
        for load in loads:
            load.__exit__()
        for r in routers:
            r.terminate()


def test_etcd_over_mutual_tls_with_a_user_and_password(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    """state.tls, state.username and state.password_file against a member that requires client
    certificates and has authentication on; a wrong password: the store is unreachable (503), the
    router serves on."""
    import asyncio

    import grpc
    import trustme
    from aetcd import rpc

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for who, name in (("server", "127.0.0.1"), ("client", "tfs-router")):
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{who}.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{who}.key"))
    member = Etcd(tmp_path / "etcd", logs_dir, tls=(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"))

    async def enable_auth() -> None:  # etcdctl user add root; role add root; user grant-role; auth enable
        creds = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes(), (tmp_path / "client.key").read_bytes(),
                                             (tmp_path / "client.pem").read_bytes())
        async with grpc.aio.secure_channel(member.endpoint, creds) as channel:
            auth = rpc.AuthStub(channel)
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="s3cret"), timeout=10)
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=10)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
            await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)

    routers: list[RouterProcess] = []
    try:
        asyncio.run(enable_auth())
        (tmp_path / "password").write_text("s3cret\n")
        (tmp_path / "wrong").write_text("guess\n")
        config = etcd_config(model_root, member)
        config["state"].update({"tls": {"enabled": True, "ca_file": str(tmp_path / "ca.pem"),
                                        "cert_file": str(tmp_path / "client.pem"),
                                        "key_file": str(tmp_path / "client.key")},
                                "username": "root", "password_file": str(tmp_path / "password")})
        wrong = json.loads(json.dumps(config))
        wrong["state"]["password_file"] = str(tmp_path / "wrong")
        routers = [RouterProcess(config, log_dir=logs_dir), RouterProcess(wrong, log_dir=logs_dir)]
        for r in routers:
            r.wait_ready()
        good, bad = routers
        assert good.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 30})[0] == 200
        assert not good.status()["state"]["stale"]
        assert good.status()["state"]["file"].startswith("etcds://")
        code, body = bad.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 40})
        assert code == 503 and "state store is unreachable" in body["error"], body
        assert bad.status()["state"]["stale"]
        # the good router's write is in the store: a replica started now has it
        third = RouterProcess(config, log_dir=logs_dir)
        routers.append(third)
        third.wait_ready()
        wait_for(lambda: weights(third) == weights(good), "the new replica to read the weight", timeout=30)
    finally:
        for r in routers:
            r.terminate()
        member.stop()
        member.log.close()


def test_a_passive_fleet_switches_its_default_version_at_one_revision(model_root: Path, etcd: Etcd, tmp_path: Path,
                                                                      logs_dir: Path) -> None:
    """Two passive routers on one etcd in front of the same two servers, which load a new version by
    themselves: a client that asks the two routers in turn never gets the old version after the new
    one (each router polls on its own schedule: alone, one switches up to a poll before the other)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from tests.support import TEST_VOCAB, WorkerProcess, predict_request
    from workers.demo_model import example_inputs

    base = tmp_path / "ctr"
    base.mkdir()
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    # one server takes the new version well before the other, and each router reads them once a second:
    # alone, the routers would switch up to a second apart
    servers = [WorkerProcess("--model", f"ctr={base}", "--file-system-poll-wait-seconds", poll, log_dir=logs_dir)
               for poll in ("2", "0.3")]  # the slow one first: with no load, a router picks it
    config = {"models": [{"name": "ctr", "base_path": str(base)}],
              "workers": {"mode": "static", "control": "passive", "status_poll_s": 1.0,
                          "addresses": [s.address for s in servers]},
              "state": {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": "/p/"}}
    routers: list[RouterProcess] = []
    try:
        routers = [RouterProcess(config, log_dir=logs_dir) for _ in range(2)]
        for r in routers:
            r.wait_ready()
        wait_for(lambda: sum(r.status()["state"]["fleet"]["leading"] for r in routers) == 1, "a leader")
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(r.channel) for r in routers]
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        answers: list[tuple[int, int]] = []  # (router, version), in the order the client got them
        failures: list[str] = []

        def ask(n: int) -> None:
            for i in range(n):
                try:
                    answers.append((i % 2, stubs[i % 2].Predict(request, timeout=30).model_spec.version.value))
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        ask(20)
        copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and [v for _, v in answers[-40:]] != [2] * 40:
            ask(20)
        assert not failures, failures[:5]
        versions = [v for _, v in answers]
        first_new = versions.index(2)
        assert set(versions[first_new:]) == {2}, ("the old version after the new one", answers[first_new - 4:][:60])
        # both switched at the one store revision the leader wrote
        revisions = []
        for r in routers:
            lines = [line for line in r.log_path.read_text(errors="replace").splitlines()
                     if "the fleet's default is version 2 (store revision" in line]
            assert lines, r.log()
            revisions.append(lines[-1].rsplit("revision ", 1)[1].rstrip(")"))
        assert revisions[0] == revisions[1] != "None", revisions
    finally:
        for r in routers:
            r.terminate()
        for s in servers:
            s.terminate()
