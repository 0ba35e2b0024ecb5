"""Convolution kernels TIDL runs poorly become ones it runs well.

* ``conv_even_kernel_to_odd`` (exact): a zero first row/col and the begin pad + 1: the window
  starts one step earlier and its first tap is 0.
* ``conv_6x6_to_5x5`` (approximate): per axis, the border row/col with the smaller L1 mass is
  dropped; one pad is reduced so every output keeps its position.
* ``conv_gt7_split`` (exact, off): a 3 x 3 one-hot "shift bank" and a dilation-3 conv read each tap
  (3a + u, 3b + v) of the k x k kernel exactly once. Unlike TI's (re-initialised, random-width)
  split it keeps the weights, at the price of 9x the channels in between.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at
from .engine import Match, RuleContext, rule
from .patterns import static_shape


def _conv_geometry(node: gs.Node, wanted) -> Union[dict, str, None]:
    """Weight, kernel, pads, strides of a Conv whose constant weight passes ``wanted``; a reason, or None."""
    w = constant_value(input_at(node, 1))
    if w is None or not wanted(w):
        return None
    r = w.ndim - 2
    if any(int(d) != 1 for d in node.attrs.get("dilations", [1] * r)):
        return "dilated convolution"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad}"
    pads = [0] * 2 * r if auto_pad == "VALID" else list(node.attrs.get("pads", [0] * 2 * r))
    return {"w": w, "r": r, "ks": list(w.shape[2:]), "pads": pads, "strides": list(node.attrs.get("strides", [1] * r))}


def _rebuild_conv(m: Match, ctx: RuleContext, w: np.ndarray, pads: list) -> None:
    node = m.data["node"]
    attrs = {k: v for k, v in node.attrs.items() if k not in ("kernel_shape", "pads", "auto_pad")}
    attrs.update(kernel_shape=list(w.shape[2:]), pads=pads)
    wt = ctx.constant(f"{node.inputs[1].name}_k{w.shape[2]}", w.astype(m.data["w"].dtype))
    ctx.replace_output(m.output, "Conv", [node.inputs[0], wt] + list(node.inputs[2:]), attrs, base=f"{m.output.name}_conv")


def rewrite_even_kernel(graph, m, ctx):
    w, ks, pads = m.data["w"], m.data["ks"], m.data["pads"]
    front = [1 - k % 2 for k in ks]  # a zero tap before an even kernel: its window starts one step earlier
    nw = np.pad(w, [(0, 0), (0, 0)] + [(f, 0) for f in front])
    _rebuild_conv(m, ctx, nw, [p + f for p, f in zip(pads, front)] + pads[len(ks):])


@rule("conv_even_kernel_to_odd", "even conv kernel -> odd kernel with a zero border, begin pad +1",
      exact=True, anchors=('Conv',), rewrite=rewrite_even_kernel, priority=40, default=False)
def match_even_kernel(graph, node, ctx):
    """Conv with an even kernel size on some axis (6x6 is left to conv_6x6_to_5x5 when that is on)."""
    geo = _conv_geometry(node, lambda w: any(d % 2 == 0 for d in w.shape[2:]))
    if not isinstance(geo, dict):
        return geo
    if "conv_6x6_to_5x5" in ctx.active and geo["ks"] == [6, 6]:
        return "6x6 kernel left to conv_6x6_to_5x5"
    return Match(node.outputs[0], {"node": node, **geo})


def rewrite_conv6(graph, m, ctx):
    w, pads, plan = m.data["w"], list(m.data["pads"]), m.data["plan"]
    sl = [slice(None), slice(None)]
    for a, how in enumerate(plan):
        if how == "first":
            sl.append(slice(1, 6))
            pads[a] -= 1
        else:
            sl.append(slice(0, 5))
            if how == "last":
                pads[a + 2] -= 1
    _rebuild_conv(m, ctx, np.ascontiguousarray(w[tuple(sl)]), pads)


@rule("conv_6x6_to_5x5", "6x6 conv -> 5x5 (border row/col with the least weight dropped)",
      exact=False, anchors=('Conv',), rewrite=rewrite_conv6, priority=70)
def match_conv6(graph, node, ctx):
    """A 2-D Conv with a 6x6 kernel."""
    geo = _conv_geometry(node, lambda w: list(w.shape[2:]) == [6, 6])
    if not isinstance(geo, dict):
        return geo
    w = geo["w"]
    shape = static_shape(node.inputs[0])
    plan = []
    for a in range(2):
        pb, pe = geo["pads"][a], geo["pads"][a + 2]
        first = float(np.abs(np.take(w, 0, axis=2 + a)).sum())
        last = float(np.abs(np.take(w, 5, axis=2 + a)).sum())
        options = []
        if pb >= 1:
            options.append((first, "first"))
        if pe >= 1:
            options.append((last, "last"))
        if not options:
            if shape is None:
                return "no pad to give up and a dynamic input shape: the output size could change"
            # out = floor(n / s) + 1 with the 6-tap kernel, floor((n + 1) / s) + 1 with 5 taps
            n = shape[2 + a] + pb + pe - 6
            if (n + 1) % geo["strides"][a] == 0:
                return "cropping to 5x5 without padding would change the output size"
            options.append((last, "last_nopad"))
        plan.append(min(options)[1])
    return Match(node.outputs[0], {"node": node, "plan": plan, **geo})


def rewrite_conv_gt7(graph, m, ctx):
    """k x k -> a 3x3 one-hot shift bank (channel c*9 + 3u + v: x shifted by (u, v)) and a q x q conv
    with dilation 3, after zero-extending the kernel at the front to 3q (the even-kernel trick)."""
    node, w, pads, strides = m.data["node"], m.data["w"], m.data["pads"], m.data["strides"]
    O, Cg, k, _ = w.shape
    q = -(-k // 3)
    ext = 3 * q - k
    w = np.pad(w, [(0, 0), (0, 0), (ext, 0), (ext, 0)])
    pads = [pads[0] + ext, pads[1] + ext, pads[2], pads[3]]
    x = node.inputs[0]
    C = Cg * int(node.attrs.get("group", 1))
    bank = np.zeros((9 * C, C, 3, 3), dtype=w.dtype)
    w2 = np.zeros((O, 9 * Cg, q, q), dtype=w.dtype)
    for u in range(3):
        for v in range(3):
            bank[np.arange(C) * 9 + 3 * u + v, np.arange(C), u, v] = 1
            w2[:, np.arange(Cg) * 9 + 3 * u + v] = w[:, :, u::3, v::3]
    mid = ctx.variable(f"{m.output.name}_shiftbank", like=x)
    ctx.add_node("Conv", [x, ctx.constant(f"{m.output.name}_shiftbank_w", bank)], [mid],
                 {"kernel_shape": [3, 3], "pads": pads, "strides": [1, 1]}, base=f"{m.output.name}_shiftbank")
    attrs = {a: v for a, v in node.attrs.items() if a not in ("kernel_shape", "pads", "auto_pad", "dilations")}
    attrs.update(kernel_shape=[q, q], dilations=[3, 3], strides=strides, pads=[0, 0, 0, 0])
    ctx.replace_output(m.output, "Conv", [mid, ctx.constant(f"{m.output.name}_dilated_w", w2)] + list(node.inputs[2:]),
                       attrs, base=f"{m.output.name}_dilated")


@rule("conv_gt7_split", "square conv kernel > 7 -> 3x3 one-hot shift bank + dilation-3 conv (exact; 9x channels between; off)",
      exact=True, anchors=('Conv',), rewrite=rewrite_conv_gt7, priority=80, default=False)
def match_conv_gt7(graph, node, ctx):
    """A 2-D Conv with a square kernel larger than 7."""
    geo = _conv_geometry(node, lambda w: w.ndim == 4 and max(w.shape[2:]) > 7)
    if not isinstance(geo, dict):
        return geo
    if geo["ks"][0] != geo["ks"][1]:
        return f"non-square kernel {geo['ks']}"
    return Match(node.outputs[0], {"node": node, **geo})
