"""Request validation against a SignatureDef, shared by the router and the workers.

The router checks a request against the cached signature so bad input is
refused before it costs a worker anything; the worker checks again because it
may be called directly.  Checks and messages follow TF Serving: missing or
extra input names, wrong dtype, incompatible shape and unknown output filter
are INVALID_ARGUMENT naming the input; an unknown signature is
FAILED_PRECONDITION.  Only tensor headers (dtype, shape) are read here, never
the payload, so validation costs the same at batch 1 and 1024.
"""

from __future__ import annotations

import functools

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protos import metadata_pb2, tensor_pb2
from shared.errors import FailedPrecondition, InvalidArgument
from shared.tensor import dtype_name, shape_of

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"

SignatureDef = metadata_pb2.SignatureDef


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one signature input/output; None dims are unknown (-1)."""

    dtype: int
    shape: tuple[int | None, ...] | None  # None: unknown rank

    @classmethod
    def from_info(cls, info: metadata_pb2.TensorInfo) -> TensorSpec:
        if info.tensor_shape.unknown_rank:
            return cls(info.dtype, None)
        dims = tuple(None if d.size < 0 else d.size for d in info.tensor_shape.dim)
        return cls(info.dtype, dims)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.shape is None:
            return True
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, shape))

    def describe(self) -> str:
        if self.shape is None:
            return "<unknown rank>"
        return "[" + ",".join("-1" if d is None else str(d) for d in self.shape) + "]"

    @property
    def batchable(self) -> bool:
        """Has a leading batch dimension of unknown size."""
        return self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None


#: Distinct request layouts remembered per signature (see ``Signature.plan``).
PLAN_CACHE_SIZE = 1024


@dataclass
class Plan:
    """What validating one request layout found: sorted inputs, their shapes, sorted outputs.

    ``extra`` is for the caller's own derived values (the batch key), computed
    once per layout instead of once per request.
    """

    names: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    extra: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Signature:
    """A SignatureDef reduced to what validation and batching need."""

    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    method_name: str
    _plans: dict[Any, Plan] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def from_def(cls, name: str, sig: SignatureDef) -> Signature:
        return cls(
            name=name,
            inputs={k: TensorSpec.from_info(v) for k, v in sorted(sig.inputs.items())},
            outputs={k: TensorSpec.from_info(v) for k, v in sorted(sig.outputs.items())},
            method_name=sig.method_name,
        )

    @functools.cached_property
    def batchable(self) -> bool:
        """Every input and output has a leading -1 dimension (safe to concatenate on dim 0)."""
        return bool(self.inputs) and all(
            s.batchable for s in (*self.inputs.values(), *self.outputs.values())
        )

    def select_outputs(self, output_filter: Sequence[str]) -> tuple[str, ...]:
        """The outputs to compute, sorted; all of them when the filter is empty."""
        if not output_filter:
            return tuple(self.outputs)
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in self.outputs:
                raise InvalidArgument(
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{','.join(self.outputs)}}}."
                )
            if alias in seen:
                raise InvalidArgument(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return tuple(sorted(seen))

    def check_names(self, names: Iterable[str]) -> tuple[str, ...]:
        """The request's input names, sorted; INVALID_ARGUMENT unless they match exactly."""
        sent = sorted(names)
        if sent == list(self.inputs):
            return tuple(sent)
        extra = sorted(set(sent) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(sent))
        raise InvalidArgument(
            f"input size does not match signature: {len(sent)}!={len(self.inputs)} "
            f"len({{{','.join(sent)}}}) != len({{{','.join(self.inputs)}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
        )

    def check_tensor(self, name: str, dtype: int, shape: tuple[int, ...]) -> None:
        spec = self.inputs[name]
        if dtype != spec.dtype:
            raise InvalidArgument(
                f"input '{name}' expects dtype {dtype_name(spec.dtype)} "
                f"but {dtype_name(dtype)} is provided"
            )
        if not spec.accepts(shape):
            raise InvalidArgument(
                f"input '{name}' has shape [{','.join(map(str, shape))}] "
                f"incompatible with the signature's {spec.describe()}"
            )

    def validate(
        self, inputs: Mapping[str, tensor_pb2.TensorProto], output_filter: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Validate a Predict request's tensors; returns (sorted inputs, sorted outputs)."""
        names, outputs, _ = self.validate_shapes(inputs, output_filter)
        return names, outputs

    def validate_shapes(
        self, inputs: Mapping[str, tensor_pb2.TensorProto], output_filter: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]:
        """``validate``, also returning each sorted input's shape (read once, reused for batching)."""
        names = self.check_names(inputs)
        shapes = []
        for name in names:
            tensor = inputs[name]
            shape = shape_of(tensor)
            self.check_tensor(name, tensor.dtype, shape)
            shapes.append(shape)
        return names, self.select_outputs(output_filter), tuple(shapes)

    def plan(self, inputs: Mapping[str, tensor_pb2.TensorProto], output_filter: Sequence[str]) -> Plan:
        """``validate_shapes``, remembered per request layout.

        Clients send the same layout over and over (same input names, dtypes
        and shapes), and reading shapes through protobuf's Python API costs
        more than the rest of the router's request path.  The layout is
        fingerprinted by each input's name, dtype and *serialized*
        TensorShapeProto (equal bytes, equal shape), so a hit skips every
        per-dimension read and check.  Only valid layouts are remembered; a bad
        request is checked (and refused) afresh every time.  At most
        ``PLAN_CACHE_SIZE`` layouts are kept; past that the cache starts over.
        """
        layout = []
        for name in inputs:  # keys and lookups: a map's items() iterates in Python
            tensor = inputs[name]
            layout.append((name, tensor.dtype, tensor.tensor_shape.SerializeToString()))
        fingerprint = (tuple(layout), tuple(output_filter))
        plan = self._plans.get(fingerprint)
        if plan is None:
            plan = Plan(*self.validate_shapes(inputs, output_filter))
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[fingerprint] = plan
        return plan


def find_signature(sigs: Mapping[str, Signature], name: str) -> Signature:
    """The named signature ("" means serving_default), FAILED_PRECONDITION if absent."""
    key = name or DEFAULT_SIGNATURE
    sig = sigs.get(key)
    if sig is None:
        raise FailedPrecondition(f'Serving signature name: "{key}" not found in signature def')
    return sig
