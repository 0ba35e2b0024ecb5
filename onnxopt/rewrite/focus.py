"""``focus_to_conv`` (exact): the YOLOv5 Focus stem, four stride-2 Slices (row/col offsets
(dr, dc)) concatenated on the channel axis, equals a 2 x 2 stride-2 Conv whose weight is one-hot:
W[k*C + c, c, dr_k, dc_k] = 1. ``focus_mode=space_to_depth`` uses SpaceToDepth(2) instead; its
channel order differs from the Concat's unless the consuming Conv's input channels are permuted.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at
from .engine import Match, RuleContext, rule
from .patterns import producer, rank, static_shape

_BIG = 2**31 - 1


def _slice_params(node: gs.Node, ctx: RuleContext, r: int) -> Optional[list]:
    """[(axis, start, step)] of a Slice whose ends run to the end, or None."""
    if ctx.opset < 10:
        return None
    starts, ends, axes, steps = [constant_value(input_at(node, i)) for i in range(1, 5)]
    if starts is None or ends is None or (input_at(node, 3) is not None and axes is None) or (input_at(node, 4) is not None and steps is None):
        return None
    starts, ends = [int(v) for v in np.asarray(starts).reshape(-1)], [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(a) % r for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.asarray(steps).reshape(-1)]
    shape = getattr(node.inputs[0], "shape", None)
    out = []
    for a, s0, e, st in zip(axes, starts, ends, steps):
        dim = shape[a] if shape is not None and isinstance(shape[a], (int, np.integer)) else None
        if e < _BIG // 2 and (dim is None or e < dim):
            return None
        out.append((a, s0, st))
    return out


def match_focus_s2d_ok(m: Match, ctx: RuleContext) -> Optional[str]:
    """In space_to_depth mode, the reason the Focus cannot become SpaceToDepth (None when it can)."""
    if ctx.options.focus_mode != "space_to_depth" or m.data["offsets"] == [(0, 0), (0, 1), (1, 0), (1, 1)]:
        return None
    reader = ctx.sole_consumer(m.output)
    if reader is None or reader.op != "Conv" or int(reader.attrs.get("group", 1)) != 1 or constant_value(reader.inputs[1]) is None:
        return ("SpaceToDepth orders channels (dr*2+dc)*C+c, unlike this Focus concat, and the Focus output is not "
                "read by a single group-1 Conv with constant weights whose input channels could be permuted")
    # The Focus tensor itself changes channel order; the Conv reading it keeps its values.
    m.preserved = [reader.outputs[0].name]
    return None


def rewrite_focus(graph, m, ctx):
    x, offsets, C = m.data["x"], m.data["offsets"], m.data["C"]
    if ctx.options.focus_mode == "space_to_depth":
        if offsets != [(0, 0), (0, 1), (1, 0), (1, 1)]:
            conv = ctx.sole_consumer(m.output)
            w = constant_value(conv.inputs[1])
            # Focus channel k*C + c holds offset offsets[k]; SpaceToDepth puts it at (dr*2+dc)*C + c.
            perm = np.empty(4 * C, dtype=np.int64)
            for k, (dr, dc) in enumerate(offsets):
                perm[(dr * 2 + dc) * C + np.arange(C)] = k * C + np.arange(C)
            conv.inputs[1] = ctx.constant(f"{conv.inputs[1].name}_s2d", np.ascontiguousarray(w[:, perm]))
        ctx.replace_output(m.output, "SpaceToDepth", [x], {"blocksize": 2}, base=f"{m.output.name}_s2d")
        return
    w = np.zeros((4 * C, C, 2, 2), dtype=np.dtype(x.dtype))
    for k, (dr, dc) in enumerate(offsets):
        w[k * C + np.arange(C), np.arange(C), dr, dc] = 1
    wt = ctx.constant(f"{m.output.name}_focus_w", w)
    ctx.replace_output(m.output, "Conv", [x, wt], {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]},
                       base=f"{m.output.name}_focus_conv")


@rule("focus_to_conv", "Focus stem (4 strided Slices -> Concat) -> one-hot 2x2 stride-2 Conv (or SpaceToDepth)",
      exact=True, anchors=('Concat',), rewrite=rewrite_focus, priority=10)
def match_focus(graph, node, ctx):
    """Concat(axis=1) of four x[..., dr::2, dc::2] slices (one or two Slice nodes each)."""
    if len(node.inputs) != 4:
        return None
    axis = int(node.attrs.get("axis", 0))
    src, offsets = None, []
    for t in node.inputs:
        chain_axes, cur = {}, t
        for _ in range(2):
            sl = producer(cur)
            if sl is None or sl.op != "Slice":
                break
            params = _slice_params(sl, ctx, rank(sl.inputs[0]) or 4)
            if params is None:
                return "a Slice of the candidate Focus has non-constant or bounded parameters"
            for a, s0, st in params:
                if a in chain_axes:
                    return "a Focus branch slices one axis twice"
                chain_axes[a] = (s0, st)
            cur = sl.inputs[0]
            if set(chain_axes) == {2, 3}:
                break
        if not chain_axes:
            return None
        if set(chain_axes) != {2, 3} or any(st != 2 or s0 not in (0, 1) for s0, st in chain_axes.values()):
            return f"Concat input '{t.name}' is not x[:, :, {{0,1}}::2, {{0,1}}::2]"
        if src is None:
            src = cur
        elif cur is not src:
            return "the four slices read different tensors"
        offsets.append((chain_axes[2][0], chain_axes[3][0]))
    if rank(src) != 4 or axis % 4 != 1:
        return "Focus needs a rank-4 input and a channel-axis Concat"
    if sorted(offsets) != [(0, 0), (0, 1), (1, 0), (1, 1)]:
        return f"slice offsets {offsets} do not cover the 2x2 grid"
    c = src.shape[1]  # rank 4: the shape is known
    if not isinstance(c, (int, np.integer)):
        return "the Focus input has an unknown channel count"
    sh = static_shape(src)
    if sh is not None and (sh[2] % 2 or sh[3] % 2):
        return "odd spatial size"
    if src.dtype is None or np.dtype(src.dtype).kind != "f":
        return "the Focus input is not floating point"
    m = Match(node.outputs[0], {"x": src, "offsets": offsets, "C": int(c)})
    return match_focus_s2d_ok(m, ctx) or m
