"""Squeeze-and-excite removal (approximate): ``x * gate(FC(act(FC(pool(x)))))`` -> x."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at
from .activations import HardSigmoidForm, hardsigmoid_of
from .engine import Match, RuleContext, rule
from .patterns import producer, rank, static_shape

_SE_ALLOWED = {
    "GlobalAveragePool", "ReduceMean", "Conv", "Gemm", "MatMul", "Add", "Mul", "Div", "Sub",
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Min", "Max", "LeakyRelu", "PRelu",
    "Tanh", "Erf", "Elu", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Constant",
    "Shape", "Gather", "Concat", "Slice", "Cast", "BatchNormalization",
}
_SE_LIMIT = 48


def _gate_input(g: gs.Tensor, ctx: RuleContext) -> Optional[gs.Tensor]:
    """The pre-activation of an SE gate: Sigmoid(s), HardSigmoid(s) or Clip(s+3,0,6)/6."""
    n = producer(g)
    if n is not None and n.op == "Sigmoid":
        return n.inputs[0]
    hs = hardsigmoid_of(g, ctx)
    return hs.x if isinstance(hs, HardSigmoidForm) else None


def _is_spatial_pool(n: gs.Node, ctx: RuleContext) -> bool:
    if n.op == "GlobalAveragePool":
        return True
    if n.op != "ReduceMean" or not int(n.attrs.get("keepdims", 1)):
        return False
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1:
        v = constant_value(input_at(n, 1))
        axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    r = rank(n.inputs[0])
    if not axes or r is None or r < 3:
        return False
    return sorted(a % r for a in axes) == list(range(2, r))


def _is_fc(n: gs.Node) -> bool:
    if n.op not in ("Gemm", "MatMul", "Conv"):
        return False
    w = constant_value(n.inputs[1])
    return w is not None and (n.op != "Conv" or all(d == 1 for d in w.shape[2:]))  # a Conv FC is 1x1


def rewrite_identity(graph, m, ctx):
    ctx.reroute(m.output, m.data["x"])


@rule("squeeze_and_excite_to_identity", "x * gate(FC(act(FC(pool(x))))) -> x",
      exact=False, anchors=('Mul',), rewrite=rewrite_identity, priority=50)
def match_se(graph, node, ctx):
    """Mul(x, gate) where gate = Sigmoid/HardSigmoid(FC(act(FC(pool(x))))) -> x."""
    if len(node.inputs) != 2:
        return None
    reason = None
    for i in (0, 1):
        x, g = node.inputs[1 - i], node.inputs[i]
        s = _gate_input(g, ctx)
        if s is None or producer(s) is None:
            continue
        r = _check_se(x, g, node, ctx)
        if isinstance(r, str):
            reason = reason or r
        elif r is True:
            return Match(node.outputs[0], {"x": x})
    return reason


def _check_se(x: gs.Tensor, g: gs.Tensor, mul: gs.Node, ctx: RuleContext) -> Union[bool, str, None]:
    """True when ``mul(x, g)`` is an SE block, a reason for a near-match, None when not one."""
    region: dict = {}
    stack = [producer(g)]
    while stack:
        n = stack.pop()
        if id(n) in region:
            continue
        region[id(n)] = n
        if len(region) > _SE_LIMIT:
            return None  # too large to be an SE block: not a candidate
        for t in n.inputs:
            if t is x or constant_value(t) is not None and producer(t) is None:
                continue
            p = producer(t)
            if p is None:
                return None  # depends on another graph input: not an SE gate
            stack.append(p)
    nodes = list(region.values())
    if {n.op for n in nodes} - _SE_ALLOWED:
        return None
    x_readers = [n for n in nodes if any(t is x for t in n.inputs)]
    pools = [n for n in x_readers if _is_spatial_pool(n, ctx)]
    if len(pools) != 1 or any(n.op != "Shape" for n in x_readers if n is not pools[0]):
        return None
    # The main chain: nodes reachable from the pool inside the region.
    main, frontier = {id(pools[0]): pools[0]}, [pools[0]]
    while frontier:
        n = frontier.pop()
        for t in n.outputs:
            for c in ctx.consumers(t):
                if id(c) in region and id(c) not in main:
                    main[id(c)] = c
                    frontier.append(c)
    fcs = [n for n in main.values() if _is_fc(n)]
    if len(fcs) != 2:
        return f"gate of '{mul.outputs[0].name}' has {len(fcs)} FC layers, an SE block has 2"
    for n in main.values():
        for t in n.outputs:
            if t is not g and (ctx.is_output(t) or any(id(c) not in region for c in ctx.consumers(t))):
                return f"SE intermediate '{t.name}' is also read outside the block"
    if ctx.is_output(g) or len(ctx.consumers(g)) != 1:
        return f"SE gate '{g.name}' feeds {len(ctx.consumers(g)) + ctx.is_output(g)} consumers"
    xs, os_ = static_shape(x), static_shape(mul.outputs[0])
    if xs is not None and os_ is not None and xs != os_:
        return f"the gated output shape {os_} differs from the input shape {xs}"
    return True
