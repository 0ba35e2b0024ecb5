"""Folding a per-channel affine map ``s * x + t`` (an inference BatchNormalization, a constant
per-channel Mul/Add/Sub/Div) into a linear layer: the arithmetic of the ``bnfuse`` rules.

Output channel ``o`` of the layer is scaled: ``W'[o] = s[o] * W[o]``, ``b'[o] = s[o] * b[o] + t[o]``.
For ConvTranspose (W ``[Cin, Cout/g, k...]``) channel ``o = gi * Cout/g + j`` is
``W[gi * Cin/g : (gi+1) * Cin/g, j]``, so W is viewed as ``[g, Cin/g, Cout/g, k...]``; for Gemm and
MatMul it is a column of ``op(B)`` / W. Arithmetic is float64, cast back to the weight's dtype.
Folded weights always get a new name (copy-on-write), so a weight shared with another node is
never changed under it; the layer takes over the folded node's output tensor, so graph output
names never change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import can_absorb, constant_value, input_at, node_label, overridable_inputs, set_input, swap_input
from ..ir.proto import tensor_types
from .engine import RuleContext

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class FoldContext(RuleContext):
    """The rule context of the ``bnfuse`` rules: besides the graph editor, the tensor types shape
    inference derived, the names of graph inputs (a graph input with an initializer is not a
    constant) and the constants this run created (safe to overwrite again)."""

    def __init__(self, graph: gs.Graph, model: onnx.ModelProto, opset: int, options, active: frozenset, skip):
        super().__init__(graph, opset, options, active)
        self.shapes = tensor_types(model, skip)
        self.input_names = {t.name for t in graph.inputs} | overridable_inputs(model)
        self.private: set = set()

    def const(self, t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
        """The value of a constant that is not a graph input, else None."""
        if t is None or t.name in self.input_names:
            return None
        v = constant_value(t)
        return None if v is None else np.asarray(v)

    def shape(self, t: gs.Tensor) -> Optional[list]:
        entry = self.shapes.get(t.name)
        return entry[1] if entry else None

    def new_const(self, base: Optional[gs.Tensor], value: np.ndarray, dtype) -> gs.Constant:
        """Copy-on-write: a fresh, uniquely named constant (never overwrites a shared weight)."""
        if isinstance(base, gs.Constant) and id(base) in self.private and len(base.outputs) <= 1:
            base.values = np.ascontiguousarray(value.astype(dtype))
            return base
        const = gs.Constant(self.names(f"{base.name}_fused" if base is not None and base.name else "fused"),
                            np.ascontiguousarray(value.astype(dtype)))
        self.private.add(id(const))
        return const


@dataclass
class Unit:
    """A linear layer whose output channels an affine map can be folded into."""
    kind: str                      # Conv | ConvTranspose | Gemm | MatMul
    node: gs.Node
    weight: gs.Tensor
    bias: Optional[gs.Tensor]
    channels: int
    axis: int                      # the channel axis of the output
    rank: Optional[int]
    add: Optional[gs.Node] = None  # MatMul's bias Add


def per_channel(c: Optional[np.ndarray], channels: int, axis: int, rank: Optional[int]) -> Optional[np.ndarray]:
    """``c`` as a length-``channels`` vector when it broadcasts only along the channel axis."""
    if c is None:
        return None
    if c.ndim == 0:
        return np.full(channels, c, dtype=np.float64)
    if rank is None:
        if axis != -1 or c.ndim != 1:
            return None
        rank = 1
    if c.ndim > rank:
        return None  # would broadcast the output to a larger rank
    padded = [1] * (rank - c.ndim) + list(c.shape)
    ax = axis % rank
    if any(d != 1 for i, d in enumerate(padded) if i != ax) or padded[ax] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def _matmul_bias(ctx: FoldContext, t: gs.Tensor) -> tuple:
    """(layer node, its bias Add or None) for ``t``: a MatMul + constant bias Add counts as one layer."""
    p = t.inputs[0]
    if p.op == "Add" and len(p.inputs) == 2:
        for xi in (0, 1):
            x, c = p.inputs[xi], p.inputs[1 - xi]
            if len(x.inputs) == 1 and x.inputs[0].op == "MatMul" and ctx.const(c) is not None:
                if can_absorb(ctx.graph, x) is None:
                    return x.inputs[0], p
                break
    return p, None


def unit_for(ctx: FoldContext, t: gs.Tensor, need_axis1: bool) -> Union[Unit, str]:
    """The linear layer producing ``t`` whose channels may absorb an affine map, or a reason."""
    if t is None or len(t.inputs) != 1:
        return "input is not produced by a node"
    p, add = _matmul_bias(ctx, t)
    if p.op not in LINEAR:
        return f"producer {p.op} is not Conv/ConvTranspose/Gemm/MatMul"
    for tensor in ([p.outputs[0]] + ([add.outputs[0]] if add is not None else [])):
        reason = can_absorb(ctx.graph, tensor)
        if reason:
            return f"cannot fold into {node_label(p)}: {reason}"
    w = input_at(p, 1)
    if w is not None and w.name in ctx.input_names:
        return f"cannot fold into {node_label(p)}: weight '{w.name}' is a graph input"
    wv = ctx.const(w)
    if wv is None:
        return f"cannot fold into {node_label(p)}: weight is not a constant"
    if wv.dtype.kind != "f":
        return f"cannot fold into {node_label(p)}: weight dtype {wv.dtype} is not floating point"
    bias = input_at(p, 2) if p.op in ("Conv", "ConvTranspose", "Gemm") else None
    if bias is not None and ctx.const(bias) is None:
        return f"cannot fold into {node_label(p)}: bias is not a constant (or is a graph input)"
    if p.op in ("Conv", "ConvTranspose"):  # W is [Cout, Cin/g, k...] / [Cin, Cout/g, k...]
        channels = wv.shape[0] if p.op == "Conv" else wv.shape[1] * int(p.attrs.get("group", 1))
        return Unit(p.op, p, w, bias, channels, 1, wv.ndim)
    if p.op == "Gemm":
        if wv.ndim != 2:
            return f"cannot fold into {node_label(p)}: B is not 2-D"
        return Unit("Gemm", p, w, bias, wv.shape[0] if int(p.attrs.get("transB", 0)) else wv.shape[1], 1, 2)
    return _matmul_unit(ctx, p, w, wv, add, need_axis1)


def _matmul_unit(ctx: FoldContext, p: gs.Node, w: gs.Tensor, wv: np.ndarray, add: Optional[gs.Node],
                 need_axis1: bool) -> Union[Unit, str]:
    """MatMul: only X @ W with a constant 2-D W."""
    if p.inputs[0] is w or wv.ndim != 2:
        return f"cannot fold into {node_label(p)}: weight is not a constant 2-D right operand"
    shape = ctx.shape(p.outputs[0])
    rank = len(shape) if shape is not None else None
    if need_axis1 and rank != 2:
        return f"cannot fold into {node_label(p)}: output rank {rank} is not 2 (BN normalises axis 1, the MatMul folds the last axis)"
    bias_t = None
    if add is not None:
        bias_t = add.inputs[1] if add.inputs[0] is p.outputs[0] else add.inputs[0]
        if per_channel(ctx.const(bias_t), wv.shape[1], -1, rank) is None:
            return f"cannot fold into {node_label(p)}: the Add after it is not a per-column bias"
    return Unit("MatMul", p, w, bias_t, wv.shape[1], -1, rank, add)


def _scaled_weight(unit: Unit, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W with output channel o scaled by s[o] (float64)."""
    w64 = w.astype(np.float64)
    if unit.kind == "Conv":
        return w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if unit.kind == "ConvTranspose":
        g = int(unit.node.attrs.get("group", 1))
        view = w64.reshape((g, w.shape[0] // g, w.shape[1]) + w.shape[2:])
        return (view * s.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
    if unit.kind == "Gemm" and int(unit.node.attrs.get("transB", 0)):
        return w64 * s[:, None]
    return w64 * s[None, :]  # the columns: MatMul, Gemm with transB=0


def fold(ctx: FoldContext, unit: Unit, s: np.ndarray, t: np.ndarray, follower: gs.Node) -> str:
    """Fold ``y = s * unit(x) + t`` (per output channel; lengths checked by the caller) into
    ``unit`` and remove ``follower``, whose output the layer writes now; returns the detail line."""
    node = unit.node
    w = np.asarray(constant_value(unit.weight))
    new_w = _scaled_weight(unit, w, s)
    b = 0.0 if unit.bias is None else np.asarray(constant_value(unit.bias)).astype(np.float64)
    if unit.kind == "Gemm" and unit.bias is not None:
        b = float(node.attrs.get("beta", 1.0)) * b  # C' = s * (beta * C) + t, then beta' = 1
    new_b = np.asarray(b * s + t)  # broadcasting keeps a [1, N] / [M, N] bias shape, a scalar becomes [N]
    node.inputs[1] = ctx.new_const(unit.weight, new_w, w.dtype)
    bias_const = ctx.new_const(unit.bias, new_b, w.dtype) if unit.bias is not None else \
        gs.Constant(ctx.names(f"{unit.weight.name}_bias_fused"), np.ascontiguousarray(new_b.astype(w.dtype)))
    ctx.private.add(id(bias_const))
    if unit.kind in ("Conv", "ConvTranspose", "Gemm"):
        if unit.kind == "Gemm":
            node.attrs["beta"] = 1.0
        set_input(node, 2, bias_const)
    elif unit.add is not None:
        swap_input(unit.add, unit.bias, bias_const)
    note = f"{node_label(follower)} folded into {node_label(node)}"
    y = follower.outputs[0]  # the layer (or a new bias Add after a bare MatMul) writes it now
    remove(ctx, follower)
    if unit.kind == "MatMul" and unit.add is None:
        ctx.add_node("Add", [node.outputs[0], bias_const], [y], base=f"{node.name or y.name}_bias")
    else:
        (unit.add or node).outputs[0] = y
    return note


def remove(ctx: FoldContext, node: gs.Node) -> None:
    """Detach ``node`` (its output is taken over by another node) and mark it dead."""
    node.inputs.clear()
    node.outputs.clear()
    ctx.dead[id(node)] = node
