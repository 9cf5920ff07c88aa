"""Names the router and its workers must agree on, in one place.

Both sides read these (the router never imports TensorFlow; the workers
never import the router), so each name has exactly one home.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# TF Serving's convention: a version's warm-up requests, a TFRecord of PredictionLog.
WARMUP_FILE = PurePosixPath("assets.extra") / "tf_serving_warmup_requests"

# gRPC metadata on a call the router makes to a worker it took out of rotation:
# control-plane traffic (warm-up Predicts, signature reads), which the project's
# worker runs on its idle-priority load thread and keeps out of its client
# counts. Any other TF Serving server ignores it.
WARMUP_KEY = "x-tfs-router-warmup"
WARMUP_MARK = (WARMUP_KEY, "1")

# On a reload or warm-up of a worker out of rotation: "RUN_MS/PAUSE_MS", the
# project's worker converts in bursts that short (workers/pacer.py).
PACE_KEY = "x-tfs-router-pace"
