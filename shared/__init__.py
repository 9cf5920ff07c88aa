"""What the router and the workers both need: errors and their status table,
the TensorProto <-> numpy codec, signature checks, TFRecord framing.

Both ``router`` and ``workers`` import this package; it imports neither of
them, and never TensorFlow (the router must not load it, DESIGN decision 2).
"""
