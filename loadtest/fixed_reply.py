"""A gRPC server that answers every Predict with the same bytes: the client-side ceiling.

    python -m loadtest.fixed_reply [--port 0] [--host 127.0.0.1] [--rows 1]

Serves ``/tensorflow.serving.PredictionService/Predict`` with a grpc.aio
generic handler and identity (de)serializers: the request bytes are never
parsed and the reply is a PredictResponse serialized once at start-up
(model ``ctr`` version 2, ``serving_default``; outputs ``logit`` and
``probability``, float32 ``[rows]``, the shape and names the demo model
answers with).  Whatever rate a client reaches against it is what gRPC and
the client itself allow on this machine, with no model and no router in the
way.  Prints ``listening on PORT`` once bound; SIGTERM stops it.  No
TensorFlow import: the reply is built with the project's own protos.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Sequence

import grpc

from loadtest.common import GRPC_OPTIONS, run_async, serve_until_signalled
from protos import predict_pb2, types_pb2

SERVICE = "tensorflow.serving.PredictionService"


def fixed_response(rows: int, model: str = "ctr", version: int = 2) -> bytes:
    """A serialized PredictResponse like the demo model's, same values on every row."""
    resp = predict_pb2.PredictResponse()
    resp.model_spec.name = model
    resp.model_spec.version.value = version
    resp.model_spec.signature_name = "serving_default"
    for name, value in (("logit", -1.0), ("probability", 0.2689414)):
        tensor = resp.outputs[name]
        tensor.dtype = types_pb2.DT_FLOAT
        tensor.tensor_shape.dim.add().size = rows
        tensor.tensor_content = struct.pack(f"<{rows}f", *([value] * rows))
    return resp.SerializeToString()


async def serve(host: str, port: int, reply: bytes) -> None:
    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Predict": grpc.unary_unary_rpc_method_handler(predict)}),)
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await serve_until_signalled(bound, lambda: server.stop(grace=1))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fixed_reply", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--rows", type=int, default=1, help="rows in the fixed reply (default 1)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")
    run_async(serve(args.host, args.port, fixed_response(args.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
