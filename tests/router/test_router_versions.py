"""A new version directory is picked up by polling and served without a failed request."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, predict_request
from workers.demo_model import example_inputs


def test_new_version_is_served_without_failures(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(base)}],
                            "workers": {"count": 2}, "poll_interval_s": 0.2}, log_dir=logs_dir)
    try:
        router.wait_ready()
        request = predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB))
        with SteadyLoad(router.channel, request, clients=4) as load:
            # Written beside, renamed in: a half-copied version is never seen.
            shutil.copytree(model_root / "ctr" / "2", tmp_path / "staging")
            os.rename(tmp_path / "staging", base / "2")
            waited = 0.0
            while waited < 120 and (not load.served or load.served[-1] != 2):
                load.wait(0.2)
                waited += 0.2
            count = len(load.served)
            # latest:1 policy: version 1 is unloaded (END, as TF Serving reports it) once 2 serves,
            # by the last worker's conversion (paced: it takes a few times its unpaced length).
            states: dict[str, str] = {}
            while waited < 120 and states != {"1": "END", "2": "AVAILABLE"}:
                load.wait(0.2)  # serving goes on meanwhile
                waited += 0.2
                status, body, _ = router.get("/v1/models/ctr")
                assert status == 200, body
                states = {s["version"]: s["state"] for s in orjson.loads(body)["model_version_status"]}
        assert not load.failures, load.failures[:5]
        assert load.served[0] == 1 and load.served[-1] == 2 and len(load.served) > count
        assert states == {"1": "END", "2": "AVAILABLE"}
    finally:
        assert router.terminate() == 0, router.log()
