"""Large pooling kernels become cascades of 3 x 3 stride-1 pools (plus one 2 x 2 when k is even),
the original stride on the last one. Exact for MaxPool: stride-1 windows of sizes k1, k2 compose to
k1 + k2 - 1, and with the pads split over the stages (each stage pad < its kernel) every dropped
padded position is dominated by a kept one. For AveragePool the weighting becomes triangular.
"""
from __future__ import annotations

import math
from typing import Union

import onnx_graphsurgeon as gs

from .engine import Match, RuleContext, rule
from .patterns import static_shape


def _split_pads(total: int, kernels: list) -> list:
    """Split a pad over cascade stages, each stage's pad < its kernel, as evenly as possible."""
    pads = [0] * len(kernels)
    for _ in range(total):
        cands = [i for i in range(len(kernels)) if pads[i] < kernels[i] - 1]
        i = min(cands, key=lambda j: (pads[j], -j))
        pads[i] += 1
    return pads


def _pool_params(node: gs.Node, ctx: RuleContext) -> Union[dict, str, None]:
    ks = list(node.attrs.get("kernel_shape", []))
    if not ks or max(ks) < 5:
        return None
    r = len(ks)
    if len(set(ks)) != 1:
        return f"non-square kernel {ks}"
    if len(node.outputs) > 1 and (ctx.consumers(node.outputs[1]) or ctx.is_output(node.outputs[1])):
        return "the Indices output is used"
    if any(int(d) != 1 for d in node.attrs.get("dilations", [1] * r)):
        return "dilated pooling"
    if int(node.attrs.get("ceil_mode", 0)):
        return "ceil_mode=1"
    pads = list(node.attrs.get("pads", [0] * 2 * r))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides = list(node.attrs.get("strides", [1] * r))
    if auto_pad in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * r
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = static_shape(node.inputs[0])
        if shape is None:
            return f"auto_pad={auto_pad} with a dynamic input shape"
        for a in range(r):
            L, s, k = shape[2 + a], strides[a], ks[a]
            total = max(0, (math.ceil(L / s) - 1) * s + k - L)
            small, big = total // 2, total - total // 2
            pads[a], pads[a + r] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    if any(p >= ks[0] for p in pads):
        return f"pads {pads} not smaller than the kernel"
    k = ks[0]
    kernels = ([2] if k % 2 == 0 else []) + [3] * ((k - 1) // 2)
    # each pad (begin and end, per axis) split over the stages: stage_pads[stage][pad index]
    stage_pads = [list(p) for p in zip(*(_split_pads(pad, kernels) for pad in pads))]
    return {"kernels": kernels, "pads": stage_pads, "strides": strides, "rank": r}


def rewrite_pool_cascade(graph, m, ctx):
    p, op, cur = m.data["params"], m.data["op"], m.data["x"]
    r, n = p["rank"], len(p["kernels"])
    for st, (k, pads) in enumerate(zip(p["kernels"], p["pads"])):
        attrs = {"kernel_shape": [k] * r, "pads": pads, "strides": p["strides"] if st == n - 1 else [1] * r}
        if op == "AveragePool":
            attrs["count_include_pad"] = m.data["count_include_pad"]
        if st == n - 1:
            ctx.replace_output(m.output, op, [cur], attrs, base=f"{m.output.name}_pool{st}")
        else:
            nxt = ctx.variable(f"{m.output.name}_pool{st}", like=cur)
            ctx.add_node(op, [cur], [nxt], attrs, base=f"{m.output.name}_pool{st}")
            cur = nxt


@rule("maxpool_ge5_to_cascade", "MaxPool k>=5 -> cascade of 3x3 stride-1 pools, original stride last",
      exact=True, anchors=('MaxPool',), rewrite=rewrite_pool_cascade, priority=20)
@rule("avgpool_ge5_to_cascade", "AveragePool k>=5 -> cascade of 3x3 pools (triangular weighting: approximate)",
      exact=False, anchors=('AveragePool',), rewrite=rewrite_pool_cascade, priority=60)
def match_pool_cascade(graph, node, ctx):
    """MaxPool/AveragePool with a square kernel k >= 5 (dilation 1, ceil_mode 0)."""
    p = _pool_params(node, ctx)
    if not isinstance(p, dict):
        return p
    return Match(node.outputs[0], {"x": node.inputs[0], "op": node.op, "params": p,
                                   "count_include_pad": int(node.attrs.get("count_include_pad", 0))})
