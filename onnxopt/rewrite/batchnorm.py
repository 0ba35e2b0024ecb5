"""The ``bnfuse`` rules: BatchNormalization and per-channel constant Mul/Add/Sub/Div folded into
the neighbouring linear layer (all exact, up to float rounding; the arithmetic is in :mod:`.fold`).

``bn_into_following_conv`` (when the BN cannot go backwards) uses ``Conv(s * x + t) = Conv'(x)``
with ``W'[o, c] = W[o, c] * s[c]`` and ``b'[o] = b[o] + sum_{c,k} W[o, c, k] * t[c]``: exact only
when the Conv does not pad (padding inserts zeros *after* the BN, which the fold would turn into
``t``), so a padded Conv is skipped with that reason. A BatchNormalization in training mode
(``training_mode=1`` or its mean/var outputs used) is left alone.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at, is_graph_output, node_label, set_input
from .engine import Match, rule
from .fold import LINEAR, FoldContext, fold, per_channel, remove, unit_for

BN_RULES = ("bn_into_layer", "bn_into_following_conv", "bn_standalone")


def bn_params(ctx: FoldContext, bn: gs.Node) -> Union[tuple, str]:
    """(s, t) of an inference BatchNormalization, or why it is left alone."""
    if int(bn.attrs.get("training_mode", 0)):
        return "training_mode=1 (batch statistics); left alone"
    if any(o.name and (o.outputs or is_graph_output(ctx.graph, o)) for o in bn.outputs[1:]):
        return "training outputs (running mean/var) are used; left alone"
    if "spatial" in bn.attrs and not int(bn.attrs["spatial"]):
        return "spatial=0 (per-activation statistics) is not supported; left alone"
    values = []
    for i, what in enumerate(("scale", "B", "mean", "var"), start=1):
        v = ctx.const(input_at(bn, i))
        if v is None:
            return f"{what} is not a constant (or is a graph input); left alone"
        values.append(v.astype(np.float64).reshape(-1))
    gamma, beta, mean, var = values
    if not (len(gamma) == len(beta) == len(mean) == len(var)):
        return "parameter lengths differ; left alone"
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _params(ctx: FoldContext, bn: gs.Node, rule_name: str) -> Union[tuple, str, None]:
    """bn_params; a BN left alone is reported by the first enabled BN rule only."""
    params = bn_params(ctx, bn)
    if isinstance(params, str) and rule_name != next(r for r in BN_RULES if r in ctx.active):
        return None
    return params


def _bn_match(ctx: FoldContext, bn: gs.Node, rule_name: str, locate, build) -> Union[Match, str, None]:
    """The match of a BN fold: ``build(s, t, found)`` where ``locate(ctx, bn, s)`` found the layer
    to fold into; a BN left alone gives its reason (first enabled BN rule only); one ``locate``
    refuses, None (bn_standalone says why it stays)."""
    params = _params(ctx, bn, rule_name)
    if not isinstance(params, tuple):
        return params
    found = locate(ctx, bn, params[0])
    return None if isinstance(found, str) else build(params[0], params[1], found)


def _backward(ctx: FoldContext, bn: gs.Node, s: np.ndarray):
    """The layer before ``bn`` it folds into, or why not."""
    unit = unit_for(ctx, bn.inputs[0], need_axis1=True)
    if not isinstance(unit, str) and len(s) != unit.channels:
        return f"{len(s)} channels vs {unit.channels} output channels of {node_label(unit.node)}"
    return unit


def _fold_rewrite(graph, m: Match, ctx: FoldContext) -> None:
    m.note = fold(ctx, m.data["unit"], m.data["s"], m.data["t"], m.output.inputs[0])


@rule("bn_into_layer", "BatchNormalization -> folded into the Conv/ConvTranspose/Gemm/MatMul before it",
      exact=True, anchors=("BatchNormalization",), rewrite=_fold_rewrite, priority=10, family="bnfuse")
def match_bn_into_layer(graph, node, ctx):
    return _bn_match(ctx, node, "bn_into_layer", _backward, lambda s, t, unit: Match(
        node.outputs[0], {"unit": unit, "s": s, "t": t}, change=f"bn_folded_into_{unit.kind.lower()}"))


def _affine(node: gs.Node, vec: np.ndarray) -> Union[tuple, str]:
    """(s, t) of a constant per-channel Mul/Add/Sub/Div, or why not."""
    if node.op == "Mul":
        return vec, np.zeros_like(vec)
    if node.op == "Div":
        return "divides by zero" if np.any(vec == 0) else (1.0 / vec, np.zeros_like(vec))
    return (np.ones_like(vec), vec) if node.op == "Add" else (np.ones_like(vec), -vec)


@rule("affine_into_layer", "constant per-channel Mul/Add/Sub/Div -> folded into the Conv/ConvTranspose/Gemm/MatMul before it",
      exact=True, anchors=("Mul", "Add", "Sub", "Div"), rewrite=_fold_rewrite, priority=20, family="bnfuse")
def match_affine_into_layer(graph, node, ctx):
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for xi, ci in ([(0, 1)] if node.op in ("Sub", "Div") else [(0, 1), (1, 0)]):
        x, c = node.inputs[xi], node.inputs[ci]
        cv = ctx.const(c)
        if cv is None or len(x.inputs) != 1 or x.inputs[0].op not in LINEAR + ("Add",):
            continue
        unit = unit_for(ctx, x, need_axis1=False)
        if isinstance(unit, str):
            return unit if x.inputs[0].op in LINEAR else None
        if unit.kind == "MatMul" and unit.add is None and node.op == "Add":
            return None  # a bare MatMul + Add is the MatMul's bias; it stays (nothing to fold it into)
        if cv.dtype.kind != "f":
            return None
        vec = per_channel(cv, unit.channels, unit.axis, unit.rank)
        if vec is None:
            return f"constant of shape {list(cv.shape)} is not per-channel for {node_label(unit.node)}"
        st = _affine(node, vec)
        if isinstance(st, str):
            return st
        return Match(node.outputs[0], {"unit": unit, "s": st[0], "t": st[1]},
                     change=f"{node.op.lower()}_folded_into_{unit.kind.lower()}")
    return None


def _forward(ctx: FoldContext, bn: gs.Node, s: np.ndarray) -> Union[dict, str]:
    """The Conv after ``bn`` it folds into (its weight and bias), "" when there is none, or why not."""
    y = bn.outputs[0]
    conv = ctx.sole_consumer(y)
    if conv is None or conv.op != "Conv" or conv.inputs[0] is not y:
        return ""  # nothing after it to fold into (not worth a reason of its own)
    w_t, b_t = input_at(conv, 1), input_at(conv, 2)
    wv = ctx.const(w_t)
    if wv is None or wv.dtype.kind != "f":
        return f"{node_label(conv)} weight is not a floating-point constant (or is a graph input)"
    bv = ctx.const(b_t) if b_t is not None else None
    if b_t is not None and bv is None:
        return f"{node_label(conv)} bias is not a constant"
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(conv.attrs.get("pads", [])) or auto_pad not in ("NOTSET", "VALID"):
        return f"{node_label(conv)} pads its input; folding the BN forward would be inexact at the borders"
    g = int(conv.attrs.get("group", 1))
    if wv.shape[1] * g != len(s):
        return f"{node_label(conv)} has {wv.shape[1] * g} input channels, BN has {len(s)}"
    return {"conv": conv, "w": w_t, "b": b_t, "wv": wv, "bv": bv, "group": g}


def _forward_rewrite(graph, m: Match, ctx: FoldContext) -> None:
    d, s, t = m.data, m.data["s"], m.data["t"]
    conv, wv, g = d["conv"], d["wv"], d["group"]
    cout, cin_g, k = wv.shape[0], wv.shape[1], wv.ndim - 2
    w64 = wv.astype(np.float64).reshape((g, cout // g, cin_g) + wv.shape[2:])
    new_w = (w64 * s.reshape((g, 1, cin_g) + (1,) * k)).reshape(wv.shape)
    extra = (w64 * t.reshape((g, 1, cin_g) + (1,) * k)).reshape(g, cout // g, -1).sum(axis=2).reshape(cout)
    new_b = (d["bv"].astype(np.float64) if d["bv"] is not None else 0.0) + extra
    conv.inputs[1] = ctx.new_const(d["w"], new_w, wv.dtype)
    set_input(conv, 2, ctx.new_const(d["b"] if d["b"] is not None else d["w"], np.asarray(new_b), wv.dtype))
    bn = m.data["bn"]
    x, y = bn.inputs[0], bn.outputs[0]
    remove(ctx, bn)
    conv.inputs[0] = x
    m.note = f"BatchNormalization '{bn.name or y.name}' folded into the following {node_label(conv)}"


@rule("bn_into_following_conv", "BatchNormalization -> folded into the unpadded Conv after it",
      exact=True, anchors=("BatchNormalization",), rewrite=_forward_rewrite, priority=30, family="bnfuse")
def match_bn_into_following_conv(graph, node, ctx):
    # the Conv keeps its output: that is what the rule preserves
    return _bn_match(ctx, node, "bn_into_following_conv", _forward, lambda s, t, found: Match(
        found["conv"].outputs[0], dict(found, s=s, t=t, bn=node), change="bn_folded_into_following_conv"))


def _why_not_folded(ctx: FoldContext, bn: gs.Node, s: np.ndarray) -> str:
    back = _backward(ctx, bn, s)
    why = back if isinstance(back, str) else "bn_into_layer is disabled"
    if "bn_into_following_conv" in ctx.active:
        forward = _forward(ctx, bn, s)
        if isinstance(forward, str) and forward:
            why = f"{why}; following layer: {forward}"
    return why


def _standalone_rewrite(graph, m: Match, ctx: FoldContext) -> None:
    bn, s, t, dtype, rank = m.output.inputs[0], m.data["s"], m.data["t"], m.data["dtype"], m.data["rank"]
    x, y, why = bn.inputs[0], bn.outputs[0], m.data["why"]
    base = bn.name or y.name
    remove(ctx, bn)
    if m.change == "bn_to_depthwise_conv":
        w = gs.Constant(ctx.names(f"{base}_dw_weight"), s.reshape(-1, 1, 1, 1).astype(dtype))
        b = gs.Constant(ctx.names(f"{base}_dw_bias"), t.astype(dtype))
        ctx.add_node("Conv", [x, w, b], [y], {"group": int(len(s)), "kernel_shape": [1, 1]}, base=f"{base}_dwconv")
        m.note = f"BatchNormalization '{base}' -> depthwise 1x1 Conv ({why})"
        return
    note = "" if ctx.options.standalone == "muladd" else f"; input is {rank}-D, not 4-D, so Mul+Add instead of a Conv"
    cshape = (-1,) + (1,) * (rank - 2)
    sc = gs.Constant(ctx.names(f"{base}_scale"), s.reshape(cshape).astype(dtype))
    tc = gs.Constant(ctx.names(f"{base}_shift"), t.reshape(cshape).astype(dtype))
    mid = gs.Variable(ctx.names(f"{base}_scaled"), dtype=dtype)
    ctx.add_node("Mul", [x, sc], [mid], base=f"{base}_mul")
    ctx.add_node("Add", [mid, tc], [y], base=f"{base}_add")
    m.note = f"BatchNormalization '{base}' -> Mul+Add ({why}{note})"


@rule("bn_standalone", "BatchNormalization that cannot be folded -> Mul+Add, or a depthwise 1x1 Conv (bnfuse.standalone)",
      exact=True, anchors=("BatchNormalization",), rewrite=_standalone_rewrite, priority=40, family="bnfuse")
def match_bn_standalone(graph, node, ctx):
    params = _params(ctx, node, "bn_standalone")
    if not isinstance(params, tuple):
        return params
    s, t = params
    why = _why_not_folded(ctx, node, s)
    mode = ctx.options.standalone
    if mode == "keep":
        return f"not folded ({why}); kept (standalone=keep)"
    x = node.inputs[0]
    shape, entry = ctx.shape(x), ctx.shapes.get(x.name)
    if shape is None or len(shape) < 2:
        return f"not folded ({why}); input rank unknown, kept"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(entry[0]) if entry and entry[0] else np.asarray(constant_value(node.inputs[1])).dtype
    change = "bn_to_depthwise_conv" if mode == "conv" and len(shape) == 4 else "bn_to_mul_add"
    return Match(node.outputs[0], {"s": s, "t": t, "why": why, "rank": len(shape), "dtype": dtype}, change=change)
