"""Verification inputs built from the model alone, with no flags.

Random small integers at a guessed shape make a real export (symbolic dims, integer inputs that
index embeddings, masks, lengths) fail in onnxruntime, so the model itself says what a valid feed is:
symbolic dims get plausible sizes for their role, kept when shape inference and one onnxruntime run
accept them (divisibility the graph implies is respected by construction); an integer input that
reaches indices takes values below the indexed dim, lengths the sequence length, masks ones. Two
sizes are found where dims are dynamic: a folded shape chain must not bake one size in.
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

# Ops passing an integer tensor's values on (maybe reshaped): tracing through them reaches the indexing node.
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
        return {name: _make_values(rng, shape, self.specs[name], self.values[size][name])
                for name, shape in self.sizes[size].items()}

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
            key = ("param", d.dim_param) if d.dim_param else ("batch",) if role == "batch" else ("anon", vi.name, axis)
            if groups.get(key, "other") == "other":  # the most specific role wins for a shared name
                groups[key] = role
            dims.append(key)
        layout[vi.name] = dims
    return groups, layout


def _size_sets(groups: dict) -> list:
    """Candidate {key: size} assignments, most plausible first (all non-batch dims move together)."""
    out = []
    for level in range(MAX_TRIES):
        assign = {key: 1 if role == "batch" else _ROLE_SIZES[role][level % len(_ROLE_SIZES[role])]
                  for key, role in groups.items()}
        if assign not in out:
            out.append(assign)
    return out


# ------------------------------------------------------------------------------ integer values
def _index_uses(model: ModelProto, name: str, cons: dict) -> list:
    """[(node, slot)] where ``name``'s values (traced through value-preserving ops) are indices or lengths."""
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


def _value_rules(model: ModelProto, shapes: dict, concrete: dict, cons: dict, consts: dict, specs: dict) -> dict:
    """{input: (kind, arg)} for one concrete size; ``shapes`` are inferred dims at that size."""
    rules = {}
    for name, dtype in specs.items():
        if dtype.kind in "fcb":
            rules[name] = ("const", True) if dtype.kind == "b" else ("normal", None)
            continue
        bounds, length = [], None
        for node, slot in _index_uses(model, name, cons):
            bound = _index_bound(node, slot, shapes, consts)
            if bound == "length":
                x, seq_axis = shapes.get(node.input[0]), 1 if node_attr(node, "layout", 0) else 0
                if x and len(x) == 3 and x[seq_axis]:
                    length = int(x[seq_axis])
            elif bound is not None:
                bounds.append(bound)
        if length is not None:
            rules[name] = ("length", length)
        elif bounds:
            rules[name] = ("index", min(bounds))
        elif _LENGTH_NAME.search(name) and len(concrete[name]) <= 1:
            seq = [v for k, v in concrete.items() if k != name for v in v[1:2]]
            rules[name] = ("length", max(seq) if seq else 1)
        else:
            rules[name] = ("const", 1 if _MASK_NAME.search(name) else 0)
    return rules


def _index_bound(node, slot: int, shapes: dict, consts: dict):
    """The exclusive upper bound the indices of ``node`` must respect, 'length', or None if unknown."""
    op = node.op_type
    if op in ("LSTM", "GRU", "RNN"):
        return "length"
    if op == "TopK" or (op == "OneHot" and node.input[1] not in consts):
        return None
    if op == "OneHot":
        try:
            return int(np.asarray(onnx.numpy_helper.to_array(consts[node.input[1]])).reshape(-1)[0])
        except (ValueError, TypeError, IndexError):  # an empty or non-numeric depth: unknown
            return None
    data = shapes.get(node.input[0])
    if not data:
        return None
    if op in ("GatherND", "ScatterND"):
        known = [d for d in data if d]
        return min(known) if known else None
    axis = int(node_attr(node, "axis", 0))
    axis = axis + len(data) if axis < 0 else axis
    return int(data[axis]) if 0 <= axis < len(data) and data[axis] else None


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
    out = {vi.name: [int(d.dim_value) if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
           for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
           if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
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
    cons, consts = input_uses(model.graph), const_tensors(model)
    if session is None:
        try:
            session = runtime.session(model, quiet=True)
        except OnnxoptError as exc:
            raise NoFeedError(exc.message, exc.hint) from None
    candidates = _size_sets(groups)
    if groups and all(role == "batch" for role in groups.values()):
        # the batch is the only dynamic dim: the second size is batch 2
        candidates = candidates[:1] + [{k: 2 for k in candidates[0]}]
    found_sizes, found_values, last_error, tried = [], [], None, 0
    for assign in candidates:
        concrete = {name: [d if isinstance(d, int) else assign[d] for d in dims] for name, dims in layout.items()}
        if found_sizes and concrete == found_sizes[0]:
            continue
        tried += 1
        shapes = _concrete_model_shapes(model, concrete)
        if shapes is None:
            last_error = f"shape inference rejects {_fmt(concrete)}"
            continue
        rules = _value_rules(model, shapes, concrete, cons, consts, specs)
        fallback = {n: (("const", 1) if r == ("const", 0) else r) for n, r in rules.items()}  # zeros, then ones
        for values in [rules] + ([fallback] if fallback != rules else []):
            try:
                runtime.run(session, FeedPlan([concrete], [values], specs).feed(0, 0))
            except OnnxoptError as exc:
                last_error = f"onnxruntime fails at {_fmt(concrete)}: {exc.message.split(': ', 1)[-1][:160]}"
                continue
            found_sizes.append(concrete)
            found_values.append(values)
            break
        else:  # no values ran at this size
            continue
        if not two_sizes or len(found_sizes) == 2 or not groups:
            break
    if not found_sizes:
        raise NoFeedError(f"no generated input runs the model (tried {tried} size sets; {last_error})",
                          "give --data with real inputs, or --input-shape " +
                          " --input-shape ".join(shape_hint(vi) for vi in real_inputs(model) if vi.name not in overrides))
    notes = ["one size only: no second size ran"] if groups and len(found_sizes) == 1 and two_sizes else []
    return FeedPlan(found_sizes, found_values, specs, notes)


def _fmt(concrete: dict) -> str:
    return ", ".join(f"{n}:{'x'.join(map(str, s)) or 'scalar'}" for n, s in concrete.items())
