"""Verification inputs built from the model alone, with no flags.

A real export has symbolic dimensions (``batch``, ``seq``, ``p2o.DynamicDimension.1``...),
integer inputs that index embeddings, masks and lengths. Random small integers at a guessed shape
make such a model fail in onnxruntime. Here the model itself
says what a valid feed is:

* **sizes**: a batch-like dimension is 1; every other symbolic dimension gets plausible sizes for
  its role (spatial dims of an image input: multiples of 32 such as 64, 96, 128, 224, 320;
  sequence dims: 8, 16, ...; others: 8, 16, 4...). A dimension name shared by several inputs gets
  one value. A size is accepted when ONNX shape inference and one onnxruntime run of the model
  accept it, so divisibility the graph implies is respected by construction;
* **integer values**: an input that reaches the indices of a Gather / GatherElements / GatherND /
  Scatter* / OneHot (through Cast, Reshape, Unsqueeze...) takes values in ``[0, bound)`` where
  ``bound`` is the indexed dimension (read from shape inference at that size); a length input of an
  RNN (``sequence_lens``) or one named like a length takes the sequence length; a mask (named
  ``*mask*``) is all ones; any other integer input is zeros (then ones); bool inputs are true;
* **two sizes**: where the model has dynamic non-batch dimensions, a second set of sizes is found
  (or batch 2 when the batch is the only dynamic dimension), so an exact pass is checked at two
  concrete sizes -- a folded shape chain must not bake one size in.

When no feed runs, :class:`NoFeedError` says why (the manager then runs the pass unverified and
says so, unless the user asked for ``--require-verify``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, helper

from . import runtime
from .errors import OnnxoptError
from .input_dims import dim_role, real_inputs, shape_hint
from .ir.proto import const_tensors, input_uses, node_attr, without_declared_shapes

# Candidate sizes per dimension role, in the order tried; the first two that run are used.
SPATIAL_SIZES = (64, 96, 128, 160, 224, 256, 320, 32, 416, 512, 640)
SEQUENCE_SIZES = (8, 16, 12, 32, 24, 64, 4, 128)
OTHER_SIZES = (8, 16, 4, 32, 12, 64, 2, 3, 1)
# how many size combinations are tried (one shape inference + one onnxruntime run each)
MAX_TRIES = 10

_MASK_NAME = re.compile(r"mask", re.I)
_LENGTH_NAME = re.compile(r"len", re.I)

# Ops that pass an integer tensor's values on unchanged (possibly reshaped): tracing an input's
# values through them reaches the node that indexes with them.
_VALUE_PRESERVING = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Expand",
                     "Slice", "Concat", "Tile", "Gather", "GatherElements", "Split", "CastLike", "Abs"}
# (op, input index) -> how the tensor is used as indices
_INDEX_SLOTS = {("Gather", 1), ("GatherElements", 1), ("GatherND", 1), ("ScatterElements", 1), ("Scatter", 1),
                ("ScatterND", 1), ("OneHot", 0), ("TopK", 1)}


class NoFeedError(OnnxoptError):
    """No runnable verification feed could be built from the model; the message says why."""


@dataclass
class FeedPlan:
    """Concrete input shapes (one or two sizes) and how each input's values are made."""

    sizes: list  # [{input: [dims]}], one entry per verified size
    values: list  # per size: {input: (kind, arg)}  kind in normal|index|const|length
    specs: dict  # {input: np.dtype}
    notes: list = field(default_factory=list)

    def feed(self, size: int = 0, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in self.sizes[size].items():
            out[name] = _make_values(rng, shape, self.specs[name], self.values[size][name])
        return out

    def describe(self) -> str:
        return " and ".join(f"[{_fmt(shapes)}]" for shapes in self.sizes)


def _make_values(rng, shape, dtype: np.dtype, rule) -> np.ndarray:
    kind, arg = rule
    if kind == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "index":
        return rng.integers(0, max(int(arg), 1), shape).astype(dtype) if int(arg) > 0 else np.zeros(shape, dtype)
    if kind in ("length", "const"):
        return np.full(shape, arg, dtype)
    if kind == "small":  # the historical generator: small non-negative integers
        return rng.integers(0, 8, shape).astype(dtype)
    raise ValueError(kind)


# ------------------------------------------------------------------------------ the model's inputs
_ROLE_SIZES = {"spatial": SPATIAL_SIZES, "sequence": SEQUENCE_SIZES, "other": OTHER_SIZES}


def _dim_groups(model: ModelProto, overrides: dict) -> tuple:
    """(groups, layout): groups {key: role}; layout {input: [int | key]} with keys for symbolic dims."""
    groups: dict = {}
    layout: dict = {}
    for vi in real_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise NoFeedError(f"input '{vi.name}' is not a tensor (a sequence or optional); onnxopt generates tensors only",
                              "give --data with real inputs")
        if overrides and vi.name in overrides:
            layout[vi.name] = [int(d) for d in overrides[vi.name]]
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise NoFeedError(f"input '{vi.name}' has no declared rank", f"give --input-shape {vi.name}:DIMS or --data")
        rank = len(tt.shape.dim)
        dims: list = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
                continue
            role = dim_role(vi, axis, rank, d.dim_param)
            key = ("param", d.dim_param) if d.dim_param else ("anon", vi.name, axis)
            if role == "batch":
                key = ("batch",) if not d.dim_param else key
            prev = groups.get(key)
            if prev is None or prev == "other":  # the most specific role wins for a shared name
                groups[key] = role
            dims.append(key)
        layout[vi.name] = dims
    return groups, layout


def _size_sets(groups: dict) -> list:
    """Candidate {key: size} assignments, most plausible first (all non-batch dims move together)."""
    out = []
    for level in range(MAX_TRIES):
        assign = {}
        for key, role in groups.items():
            if role == "batch":
                assign[key] = 1
            else:
                sizes = _ROLE_SIZES[role]
                assign[key] = sizes[level % len(sizes)]
        if assign not in out:
            out.append(assign)
    return out


# ------------------------------------------------------------------------------ integer values
def _index_uses(model: ModelProto, name: str, cons: dict) -> list:
    """[(node, slot)] where ``name``'s values (traced through value-preserving ops) are indices
    or lengths."""
    uses, seen, stack = [], {name}, [name]
    while stack:
        t = stack.pop()
        for node, i in cons.get(t, []):
            if (node.op_type, i) in _INDEX_SLOTS or (node.op_type in ("LSTM", "GRU", "RNN") and i == 4):
                uses.append((node, i))
                continue
            if node.op_type in _VALUE_PRESERVING and (node.op_type not in ("Gather", "GatherElements") or i == 0):
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
    return uses


def _value_rules(model: ModelProto, shapes: dict, concrete: dict, cons: dict, consts: dict) -> dict:
    """{input: (kind, arg)} for one concrete size; ``shapes`` are inferred dims at that size."""
    rules = {}
    for vi in real_inputs(model):
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if dtype.kind in "fc":
            rules[vi.name] = ("normal", None)
            continue
        if dtype.kind == "b":
            rules[vi.name] = ("const", True)
            continue
        bounds, length = [], None
        for node, slot in _index_uses(model, vi.name, cons):
            bound = _index_bound(node, slot, shapes, consts)
            if bound == "length":
                x = shapes.get(node.input[0])
                layout = node_attr(node, "layout", 0)
                if x and len(x) == 3 and x[1 if layout else 0]:
                    length = int(x[1 if layout else 0])
            elif bound is not None:
                bounds.append(bound)
        if length is not None:
            rules[vi.name] = ("length", length)
        elif bounds:
            rules[vi.name] = ("index", min(bounds))
        elif _LENGTH_NAME.search(vi.name) and len(concrete[vi.name]) <= 1:
            seq = [v for k, v in concrete.items() if k != vi.name for v in v[1:2]]
            rules[vi.name] = ("length", max(seq) if seq else 1)
        elif _MASK_NAME.search(vi.name):
            rules[vi.name] = ("const", 1)
        else:
            rules[vi.name] = ("const", 0)
    return rules


def _index_bound(node, slot: int, shapes: dict, consts: dict):
    """The exclusive upper bound the indices of ``node`` must respect, 'length', or None if unknown."""
    op = node.op_type
    if op in ("LSTM", "GRU", "RNN"):
        return "length"
    if op == "OneHot":
        depth = consts.get(node.input[1])
        if depth is not None:
            try:
                return int(np.asarray(onnx.numpy_helper.to_array(depth)).reshape(-1)[0])
            except (ValueError, TypeError, IndexError):  # an empty or non-numeric depth: unknown
                return None
        return None
    if op == "TopK":
        return None
    data = shapes.get(node.input[0])
    if not data:
        return None
    if op == "GatherND" or op == "ScatterND":
        known = [d for d in data if d]
        return min(known) if known else None
    axis = int(node_attr(node, "axis", 0))
    axis = axis + len(data) if axis < 0 else axis
    if 0 <= axis < len(data) and data[axis]:
        return int(data[axis])
    return None


# ------------------------------------------------------------------------------ the search
def _concrete_model_shapes(model: ModelProto, concrete: dict) -> Optional[dict]:
    """Inferred {tensor: [dims]} with the inputs at ``concrete``; None when inference rejects it."""
    probe = without_declared_shapes(model)
    for vi in probe.graph.input:
        if vi.name in concrete and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in concrete[vi.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        return None
    except Exception:  # an op inference does not know, or a >2 GB model: onnxruntime decides alone
        return {}
    out = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    for init in model.graph.initializer:
        out.setdefault(init.name, list(init.dims))
    return out


def plan_feeds(model: ModelProto, overrides: Optional[dict] = None, *, session=None, two_sizes: bool = True) -> FeedPlan:
    """Find one (or two) sets of input sizes and values the model runs on; raise NoFeedError."""
    overrides = overrides or {}
    groups, layout = _dim_groups(model, overrides)
    specs = {vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)) for vi in real_inputs(model)}
    for name, dtype in specs.items():
        if dtype.kind not in "fciub":
            raise NoFeedError(f"input '{name}' has dtype {dtype}, which onnxopt cannot generate", "give --data with real inputs")
    cons = input_uses(model.graph)
    consts = const_tensors(model)
    if session is None:
        try:
            session = runtime.session(model, quiet=True)
        except OnnxoptError as exc:
            raise NoFeedError(exc.message, exc.hint) from None
    candidates = _size_sets(groups)
    if groups and all(role == "batch" for role in groups.values()):
        # the batch is the only dynamic dim: the second size is batch 2
        candidates = candidates[:1] + [{k: 2 for k in candidates[0]}]
    found_sizes, found_values, last_error = [], [], None
    tried = 0
    for assign in candidates:
        concrete = {name: [d if isinstance(d, int) else assign[d] for d in dims] for name, dims in layout.items()}
        if found_sizes and concrete == found_sizes[0]:
            continue
        tried += 1
        shapes = _concrete_model_shapes(model, concrete)
        if shapes is None:
            last_error = f"shape inference rejects {_fmt(concrete)}"
            continue
        rules = _value_rules(model, shapes, concrete, cons, consts)
        attempts = [rules]
        fallback = {n: (("const", 1) if r == ("const", 0) else r) for n, r in rules.items()}
        if fallback != rules:
            attempts.append(fallback)
        ok = None
        for values in attempts:
            plan = FeedPlan([concrete], [values], specs)
            try:
                runtime.run(session, plan.feed(0, 0))
            except OnnxoptError as exc:
                last_error = f"onnxruntime fails at {_fmt(concrete)}: {exc.message.split(': ', 1)[-1][:160]}"
                continue
            ok = values
            break
        if ok is None:
            continue
        found_sizes.append(concrete)
        found_values.append(ok)
        if not two_sizes or len(found_sizes) == 2 or not groups:
            break
    if not found_sizes:
        raise NoFeedError(f"no generated input runs the model (tried {tried} size sets; {last_error})",
                          "give --data with real inputs, or --input-shape " +
                          " --input-shape ".join(shape_hint(vi) for vi in real_inputs(model) if vi.name not in overrides))
    notes = []
    if groups and len(found_sizes) == 1 and two_sizes:
        notes.append("one size only: no second size ran")
    return FeedPlan(found_sizes, found_values, specs, notes)


def _fmt(concrete: dict) -> str:
    return ", ".join(f"{n}:{'x'.join(map(str, s)) or 'scalar'}" for n, s in concrete.items())
