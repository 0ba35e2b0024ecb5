"""Activation rules: every supported activation becomes ReLU (approximate, TI's v2 defaults):
SiLU, HardSwish, GELU, ReLU6 / Clip(0,6), LeakyReLU, PRelu (off), standalone HardSigmoid (on, as
TI: the output range changes from [0,1] to [0,inf)); each rule's summary names the forms matched.
A ReLU6 rewrite records the clip it drops (``Match.data["clip"]``) for ``qdq``'s range.
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Optional, Union

import onnx_graphsurgeon as gs

from ..ir.graph import attr, constant_value, input_at
from .engine import Match, RuleContext, rule
from .patterns import near, producer, rank, scalar

_SQRT2 = math.sqrt(2.0)
HardSigmoidForm = namedtuple("HardSigmoidForm", "x alpha beta")  # hardsigmoid(x) = clip(alpha * x + beta, 0, 1)


def _no_broadcast(c: gs.Tensor, x: gs.Tensor) -> bool:
    v = constant_value(c)
    r = rank(x)
    return v is not None and (v.ndim == 0 or (r is not None and v.ndim <= r))


def other_operand(node: gs.Node, t: gs.Tensor) -> Optional[gs.Tensor]:
    """The operand of a binary node that is not ``t`` (``t`` itself for ``node(t, t)``)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is t else a if b is t else None


def binary_with_const(node: Optional[gs.Node], op: str, value: float, rtol: float = 1e-4) -> Optional[gs.Tensor]:
    """If ``node`` is ``op(x, value)`` (either order for commutative ops), return x."""
    if node is None or node.op != op or len(node.inputs) != 2:
        return None
    for i in (1,) if op in ("Div", "Sub") else (0, 1):  # x / c, x - c: the constant is the second operand
        c, x = node.inputs[i], node.inputs[1 - i]
        if constant_value(x) is None and near(scalar(c), value, rtol) and _no_broadcast(c, x):
            return x
    return None


def clip_bounds(node: gs.Node, opset: int) -> Union[tuple, str]:
    """(lo, hi) of a Clip node (attributes before opset 11, constant inputs after), or a reason."""
    if node.op != "Clip":
        return "not a Clip"
    if opset < 11:
        return (float(node.attrs.get("min", -3.4028234663852886e38)), float(node.attrs.get("max", 3.4028234663852886e38)))
    lo_t, hi_t = input_at(node, 1), input_at(node, 2)
    lo = -math.inf if lo_t is None else scalar(lo_t)
    hi = math.inf if hi_t is None else scalar(hi_t)
    if lo is None or hi is None:
        return "Clip bounds are not constants"
    return (lo, hi)


def relu6_input(out: gs.Tensor, ctx: RuleContext) -> Union[gs.Tensor, str, None]:
    """If ``out`` = clip(x, 0, 6) (Clip, or Max(0)/Relu then Min(6), or Min(6) then Max(0)), return x."""
    n = producer(out)
    if n is None or n.op not in ("Clip", "Min", "Max"):
        return None
    if n.op == "Clip":
        b = clip_bounds(n, ctx.opset)
        if isinstance(b, str):
            return b
        return n.inputs[0] if b == (0.0, 6.0) else f"Clip({b[0]:g}, {b[1]:g}) is not Clip(0, 6)"
    # outer Min(6) reads Max(0) or Relu; outer Max(0) reads Min(6)
    outer, inner_op, inner_value = (6.0, "Max", 0.0) if n.op == "Min" else (0.0, "Min", 6.0)
    t = binary_with_const(n, n.op, outer)
    inner = producer(t)
    if t is None or inner is None or ctx.sole_consumer(t) is not n:
        return None
    if inner.op == "Relu" and n.op == "Min":
        return inner.inputs[0]
    return binary_with_const(inner, inner_op, inner_value)


def hardsigmoid_of(g: gs.Tensor, ctx: RuleContext) -> Union[HardSigmoidForm, str, None]:
    """If ``g`` = hardsigmoid(x): native HardSigmoid, or Clip(x + 3, 0, 6) / 6 (Div 6 or Mul 1/6)
    whose intermediate tensors have no other reader."""
    n = producer(g)
    if n is not None and n.op == "HardSigmoid":
        alpha, beta = attr(n, "alpha"), attr(n, "beta")
        return HardSigmoidForm(n.inputs[0], 0.2 if alpha is None else float(alpha), 0.5 if beta is None else float(beta))
    c = binary_with_const(n, "Div", 6.0) if n is not None and n.op == "Div" else binary_with_const(n, "Mul", 1 / 6)
    if c is None:
        return None
    x = _add3_clip_input(c, ctx)
    if not isinstance(x, gs.Tensor):
        return x
    if ctx.sole_consumer(c) is not n:
        return f"'{c.name}' (relu6(x+3)) has other readers"
    return HardSigmoidForm(x, 1 / 6, 0.5)


def _add3_clip_input(c: gs.Tensor, ctx: RuleContext) -> Union[gs.Tensor, str, None]:
    """If ``c`` = relu6(x + 3) with a single-reader (x + 3), return x."""
    a = relu6_input(c, ctx)
    if not isinstance(a, gs.Tensor):
        return None if a is None or "Clip(" not in a else a
    x = binary_with_const(producer(a), "Add", 3.0)
    if x is None:
        return None
    if ctx.sole_consumer(a) is None:
        return f"'{a.name}' (x+3) has other readers"
    return x


def _relu_rewrite(graph: gs.Graph, m: Match, ctx: RuleContext) -> None:
    ctx.replace_output(m.output, "Relu", [m.data["x"]], base=f"{m.output.name}_relu")


@rule("hardswish_to_relu", "HardSwish (native, x*HardSigmoid(x), x*Clip(x+3,0,6)/6) -> Relu",
      exact=False, anchors=('HardSwish', 'Mul', 'Div'), rewrite=_relu_rewrite, priority=90)
def match_hardswish(graph, node, ctx):
    """HardSwish(x); Mul(x, hardsigmoid(x)); Div/Mul(Mul(x, relu6(x + 3)), 6 or 1/6) -- any operand order."""
    out = node.outputs[0]
    if node.op == "HardSwish":
        return Match(out, {"x": node.inputs[0]})
    if node.op == "Mul" and len(node.inputs) == 2:
        near_reason = None
        for i in (0, 1):
            x, g = node.inputs[1 - i], node.inputs[i]
            hs = hardsigmoid_of(g, ctx)
            if not isinstance(hs, HardSigmoidForm):  # a near-miss's reason, or None
                near_reason = near_reason or hs
                continue
            if hs.x is not x:
                near_reason = near_reason or f"Mul multiplies hardsigmoid('{hs.x.name}') by '{x.name}' (not HardSwish)"
                continue
            if not (near(hs.alpha, 1 / 6, 1e-3) and near(hs.beta, 0.5, 1e-3)):
                near_reason = f"x*HardSigmoid(x) with alpha={hs.alpha:g}, beta={hs.beta:g} is not HardSwish"
                continue
            if ctx.sole_consumer(g) is not node:
                near_reason = f"the hard-sigmoid '{g.name}' has other readers"
                continue
            return Match(out, {"x": x})
        if near_reason:
            return near_reason
    # (x * relu6(x + 3)) / 6  or  * (1/6)
    m = binary_with_const(node, "Div", 6.0) if node.op == "Div" else binary_with_const(node, "Mul", 1 / 6)
    mul = producer(m)
    if m is None or mul is None or mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    for i in (0, 1):
        x, c = mul.inputs[i], mul.inputs[1 - i]
        xin = _add3_clip_input(c, ctx)
        if isinstance(xin, str):
            return xin
        if xin is None:
            continue
        if xin is not x:
            return f"Mul multiplies relu6('{xin.name}'+3) by '{x.name}' (not HardSwish)"
        if ctx.sole_consumer(c) is not mul or ctx.sole_consumer(m) is not node:
            return f"an intermediate of the HardSwish at '{out.name}' has other readers"
        return Match(out, {"x": x})
    return None


@rule("silu_to_relu", "SiLU (Sigmoid -> Mul(x)) -> Relu",
      exact=False, anchors=('Sigmoid',), rewrite=_relu_rewrite, priority=100)
def match_silu(graph, node, ctx):
    """Sigmoid(x) -> Mul(x, s) or Mul(s, x)."""
    x, s = node.inputs[0], node.outputs[0]
    if ctx.is_output(s):
        return "the sigmoid output is a graph output"
    readers = ctx.consumers(s)
    muls = [r for r in readers if r.op == "Mul"]
    if not muls:
        ops = ",".join(sorted({r.op for r in readers})) or "nothing"
        return f"sigmoid feeds {ops}, not x*sigmoid(x): kept"
    if len(readers) != 1:
        return f"sigmoid output has {len(readers)} readers"
    mul = muls[0]
    other = other_operand(mul, s)
    if other is not x:
        return f"Mul multiplies the sigmoid by '{getattr(other, 'name', '?')}', not by its input '{x.name}' (not SiLU)"
    return Match(mul.outputs[0], {"x": x})


def _product_chain(start: gs.Tensor, x: gs.Tensor, ctx: RuleContext, nodes_limit: int = 3) -> Union[gs.Tensor, str]:
    """Follow single-reader Muls from ``start`` collecting factors; succeed when the product is
    start * x * 0.5 (0.5 may also come from a side ``Mul(x, 0.5)``). Returns the final tensor."""
    cur, xs, k = start, 0, 1.0
    for _ in range(nodes_limit):
        mul = ctx.sole_consumer(cur)
        if mul is None or mul.op != "Mul":
            break
        other = other_operand(mul, cur)
        s = scalar(other)
        if other is x:
            xs += 1
        elif s is not None and _no_broadcast(other, x):
            k *= s
        elif binary_with_const(producer(other), "Mul", 0.5) is x:
            xs += 1
            k *= 0.5
        else:
            return f"'{start.name}' is multiplied by '{getattr(other, 'name', '?')}', not x/0.5"
        cur = mul.outputs[0]
        if xs == 1 and near(k, 0.5, 1e-3):
            return cur
    return f"no x*0.5*(1+...) product after '{start.name}'"


@rule("gelu_to_relu", "GELU (Erf chain, native Gelu, tanh approximation) -> Relu",
      exact=False, anchors=('Gelu', 'Erf', 'Tanh'), rewrite=_relu_rewrite, priority=110)
def match_gelu(graph, node, ctx):
    """Gelu (opset 20); 0.5*x*(1+erf(x/sqrt2)); 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    if node.op == "Gelu":
        return Match(node.outputs[0], {"x": node.inputs[0]})
    p = producer(node.inputs[0])
    if node.op == "Erf":
        x = binary_with_const(p, "Div", _SQRT2) if p is not None and p.op == "Div" else binary_with_const(p, "Mul", 1 / _SQRT2)
    else:  # Tanh
        inner = binary_with_const(p, "Mul", math.sqrt(2 / math.pi))
        add = producer(inner)
        if inner is None or add is None or add.op != "Add" or len(add.inputs) != 2:
            return None
        x = None
        for i in (0, 1):
            cand, cube3 = add.inputs[i], add.inputs[1 - i]
            cube = binary_with_const(producer(cube3), "Mul", 0.044715, 1e-3)
            if cube is not None and _cube_of(cube) is cand:
                x = cand
    if x is None:
        return None
    e = node.outputs[0]
    add1 = ctx.sole_consumer(e)
    if add1 is None or binary_with_const(add1, "Add", 1.0) is not e:
        return f"'{e.name}' is not followed by +1 (not GELU)"
    out = _product_chain(add1.outputs[0], x, ctx)
    if isinstance(out, str):
        return out
    return Match(out, {"x": x})


def _cube_of(t: gs.Tensor) -> Optional[gs.Tensor]:
    n = producer(t)
    if n is None:
        return None
    if n.op == "Pow" and near(scalar(n.inputs[1]), 3.0):
        return n.inputs[0]
    if n.op == "Mul" and len(n.inputs) == 2:
        for i in (0, 1):
            a, b = n.inputs[i], n.inputs[1 - i]
            sq = producer(b)
            if sq is not None and sq.op == "Mul" and len(sq.inputs) == 2 and sq.inputs[0] is a and sq.inputs[1] is a:
                return a
    return None


@rule("relu6_to_relu", "ReLU6 / Clip(0,6) -> Relu",
      exact=False, anchors=('Clip', 'Min', 'Max'), rewrite=_relu_rewrite, priority=120)
def match_relu6(graph, node, ctx):
    """Clip(x, 0, 6) (bounds as attributes or constant inputs), Min(Max(x,0)|Relu(x), 6), Max(Min(x,6), 0)."""
    out = node.outputs[0]
    x = relu6_input(out, ctx)
    if isinstance(x, gs.Tensor):
        return Match(out, {"x": x, "clip": (0.0, 6.0)})
    if isinstance(x, str) and node.op == "Clip" and not x.startswith("Clip bounds"):
        b = clip_bounds(node, ctx.opset)
        if isinstance(b, tuple) and b[0] == 0.0:
            return f"{x}: only ReLU6 is rewritten"
        return None
    return x


@rule("leakyrelu_to_relu", "LeakyRelu -> Relu (slope dropped)",
      exact=False, anchors=('LeakyRelu',), rewrite=_relu_rewrite, priority=130)
@rule("prelu_to_relu", "PRelu -> Relu (learned slopes dropped; off by default)",
      exact=False, anchors=('PRelu',), rewrite=_relu_rewrite, priority=140, default=False)
def match_input(graph, node, ctx):
    """LeakyRelu(x) or PRelu(x, slope): the anchor itself."""
    return Match(node.outputs[0], {"x": node.inputs[0]})


@rule("hardsigmoid_to_relu", "standalone HardSigmoid -> Relu (range changes from [0,1] to [0,inf), as TI)",
      exact=False, anchors=('HardSigmoid', 'Div', 'Mul'), rewrite=_relu_rewrite, priority=150)
def match_hardsigmoid(graph, node, ctx):
    """A standalone hard sigmoid: native HardSigmoid (any alpha/beta) or Clip(x+3,0,6)/6."""
    hs = hardsigmoid_of(node.outputs[0], ctx)
    if not isinstance(hs, HardSigmoidForm):
        return hs if node.op == "HardSigmoid" else None
    return Match(node.outputs[0], {"x": hs.x})
