"""tfs-router's own wire-compatible TF Serving messages (no TensorFlow import).

The ``*_pb2`` modules are generated from the ``.proto`` files here by
``make protos`` (``python -m protos.build``); never edit them by hand.
"""
