"""The hand-written REST baseline: one aiohttp process calling the model inline.

    python -m loadtest.inline_rest [--port 0] [--host 127.0.0.1] --model-dir models/ctr [--model-name ctr]

What one would write without a router: an aiohttp app that loads the latest
version under ``--model-dir`` with ``tf.saved_model.load`` and serves
``POST /v1/models/NAME:predict`` (TF Serving's row format, ``{"instances":
[{input: value, ...}, ...]}``) by calling the ``serving_default`` signature
directly on the event loop, one request at a time, with orjson for JSON.
The answer is TF Serving's: ``{"predictions": [{output: value, ...}, ...]}``
(bare values when the signature has a single output).  No coalescing, no
worker processes.  Prints ``listening on PORT`` once bound; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from loadtest.common import latest_version, run_async, serve_until_signalled  # noqa: E402

SIGNATURE = "serving_default"
JSON = "application/json"


class InlineModel:
    """The signature of one SavedModel version, called on the caller's thread."""

    def __init__(self, version_dir: Path) -> None:
        import tensorflow as tf

        self.tf = tf
        self.loaded = tf.saved_model.load(str(version_dir))
        self.fn = self.loaded.signatures[SIGNATURE]
        _, specs = self.fn.structured_input_signature
        self.dtypes = {name: spec.dtype.as_numpy_dtype for name, spec in specs.items()}
        self.outputs = sorted(self.fn.structured_outputs)

    def predict_rows(self, instances: list[dict[str, Any]]) -> list[Any]:
        if not instances:
            raise ValueError("instances is empty")
        feeds = {}
        for name, dtype in self.dtypes.items():
            try:
                feeds[name] = self.tf.constant(np.asarray([row[name] for row in instances], dtype=dtype))
            except KeyError:
                raise ValueError(f"every instance needs input {name!r}") from None
        out = self.fn(**feeds)
        values = {name: out[name].numpy().tolist() for name in self.outputs}
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return [{name: values[name][i] for name in self.outputs} for i in range(len(instances))]


def make_app(model: InlineModel, model_name: str) -> web.Application:
    async def predict(request: web.Request) -> web.Response:
        try:
            doc = orjson.loads(await request.read())
            instances = doc["instances"]
            if not isinstance(instances, list):
                raise ValueError("instances must be a list")
            predictions = model.predict_rows(instances)  # inline: blocks the loop
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return web.Response(body=orjson.dumps({"error": str(exc)}), status=400, content_type=JSON)
        return web.Response(body=orjson.dumps({"predictions": predictions}), content_type=JSON)

    app = web.Application()
    app.router.add_post(f"/v1/models/{model_name}:predict", predict)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # noqa: SLF001 - the bound port is only known here
    assert server is not None and server.sockets
    await serve_until_signalled(server.sockets[0].getsockname()[1], runner.cleanup)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.inline_rest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--model-dir", type=Path, required=True, help="model base directory (numbered versions)")
    p.add_argument("--model-name", default="ctr", help="name in the URL (default ctr)")
    args = p.parse_args(argv)
    model = InlineModel(latest_version(args.model_dir.resolve()))
    run_async(serve(make_app(model, args.model_name), args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
