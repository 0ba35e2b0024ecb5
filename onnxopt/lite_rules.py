"""Rule machinery and the default rules of the ``lite`` pass (embedded-friendly model surgery).

A rule is ``match(graph, node, ctx) -> Match | str | None`` plus ``rewrite(graph, match, ctx)``:
``match`` looks at one *anchor* node (its op type is in ``rule.anchors``) and walks a bounded
neighbourhood through the producer/consumer links onnx-graphsurgeon keeps on every tensor, so a
whole rule scan is linear in the graph size. It returns a :class:`Match`, a *reason* string
when the node is a near-match that must not be rewritten (recorded in the report, onnxscript
rewriter style), or None when the node is not a candidate at all.

Every rewrite keeps the public name of the tensor it replaces: the new node writes the old output
tensor, so downstream consumers and graph outputs are untouched. Nodes left without consumers
are removed at once (walking back from the replaced producer), which keeps consumer counts exact
for the matches that follow.

What each rule preserves (exact = same outputs up to float summation order):

* ``maxpool_ge5_to_cascade`` (exact): a k x k max pool (k >= 5, pads p, stride s) equals a
  cascade of 3 x 3 stride-1 max pools (plus one 2 x 2 when k is even) with the original stride
  on the last one. Window composition: stride-1 windows of sizes k1, k2 compose to k1 + k2 - 1,
  and with the begin pads split over the stages (each stage pad < its kernel) every dropped
  padded position is dominated by a kept one, so the max is the same.
* ``avgpool_ge5_to_cascade`` (approximate): the same cascade for average pooling gives a
  triangular (not box) weighting.
* ``focus_to_conv`` (exact): four stride-2 Slices (row/col offsets (dr, dc)) concatenated on the
  channel axis equal a 2 x 2 stride-2 Conv whose weight is one-hot: W[k*C + c, c, dr_k, dc_k] = 1.
  ``focus_mode=space_to_depth`` uses SpaceToDepth(2) instead; its channel order is
  (dr*2 + dc)*C + c, so when the Concat order differs the input channels of the consuming Conv's
  weight are permuted (or the place is skipped).
* ``conv_even_kernel_to_odd`` (exact): a k (even) kernel becomes k+1 with a zero first row/col and
  the begin pad increased by one: the window starts one step earlier and its first tap is 0.
* ``conv_6x6_to_5x5`` (approximate): the 6 x 6 kernel is cropped to 5 x 5 dropping, per axis, the
  border row/col with the smaller L1 mass; one pad is reduced so every output keeps its position.
* ``conv_gt7_split`` (exact, off): a k x k conv (k > 7) becomes a 3 x 3 one-hot "shift bank"
  (9 copies of every input channel) followed by a ceil(k/3) x ceil(k/3) conv with dilation 3;
  tap (3a + u, 3b + v) of the original kernel is read exactly once. Unlike TI's (re-initialised,
  random-width) split it keeps the weights, at the price of 9x the channels in between.
* ``resize_sizes_to_scales`` (exact): ``Resize(sizes)`` becomes ``Resize(scales = sizes / in)``
  when the input shape is static and float32 scales reproduce the sizes exactly.
* activations -> ReLU (approximate, TI's v2 defaults): SiLU (x*sigmoid(x)), HardSwish (native,
  x*HardSigmoid(x), x*Clip(x+3,0,6)/6 in every operand order), GELU (Erf chain, native Gelu, tanh
  approximation), ReLU6 / Clip(0,6) (attribute or input bounds, or Max/Min pairs), LeakyReLU,
  PRelu (off), standalone HardSigmoid (on, as TI: the output range changes from [0,1] to [0,inf)).
* ``squeeze_and_excite_to_identity`` (approximate): ``x * gate(FC(act(FC(pool(x)))))`` -> x.

Defaults follow TI's v2 table (research note tidl-and-ti-toolkit.md section 1.2) with these
differences: ``focus_to_conv`` is on (TI's ``focus_to_optimized_focus`` is off in v2, but this
rewrite is exact and TIDL does not run strided Slices), ``conv_6x6_to_5x5`` crops the trained
kernel instead of re-initialising it, ``conv_even_kernel_to_odd`` (off, from TI's v3 table) fills
the border with zeros, not ones. Only the main graph is rewritten; If/Loop bodies are left as
they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import onnx_graphsurgeon as gs

from .ir.graph import GraphEditor, attr, constant_value, input_at

# --------------------------------------------------------------------------------- types


@dataclass
class Match:
    """A place a rule will rewrite: ``output`` is the tensor whose producer changes (its name is
    kept); ``data`` holds whatever the rewrite needs. ``preserved`` names the tensors whose values
    an exact rule keeps (default: ``output``); they are what the pass verifies.
    ``data["clip"] = (lo, hi)`` says the rewrite drops a clip of ``output`` at those bounds
    (ReLU6 -> ReLU); the pass records it in the model so that ``qdq`` quantizes ``output`` with a
    range that ends there, clipping where the original did."""

    output: gs.Tensor
    data: dict = field(default_factory=dict)
    preserved: Optional[list] = None


MatchFn = Callable[[gs.Graph, gs.Node, "RuleContext"], Union[Match, str, None]]
RewriteFn = Callable[[gs.Graph, Match, "RuleContext"], None]


@dataclass(frozen=True)
class Rule:
    """One lite rule. ``anchors`` are the op types ``match`` is called on (empty = every node)."""

    name: str
    summary: str
    exact: bool
    default: bool
    anchors: tuple
    match: MatchFn
    rewrite: RewriteFn

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"rule name {self.name!r} must be a non-empty identifier")
        if not callable(self.match) or not callable(self.rewrite):
            raise TypeError(f"rule {self.name}: match and rewrite must be callables")
        object.__setattr__(self, "anchors", tuple(self.anchors or ()))


class RuleContext(GraphEditor):
    """Per-run state shared by the lite rules: the graph editor, the opset, the lite options and
    the names of the rules enabled in this run."""

    def __init__(self, graph: gs.Graph, opset: int, options, active: frozenset = frozenset()):
        super().__init__(graph)
        self.opset = opset
        self.options = options
        self.active = active


# ------------------------------------------------------------------------------- helpers


def producer(t: Optional[gs.Tensor]) -> Optional[gs.Node]:
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def scalar(t: Optional[gs.Tensor]) -> Optional[float]:
    """The value of a one-element numeric constant, else None."""
    v = constant_value(t)
    if v is None or v.size != 1 or v.dtype.kind not in "fiu":
        return None
    return float(np.asarray(v).reshape(-1)[0])


def rank(t: gs.Tensor) -> Optional[int]:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def static_shape(t: gs.Tensor) -> Optional[list]:
    shape = getattr(t, "shape", None)
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def near(a: Optional[float], b: float, rtol: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rtol * max(abs(b), 1e-12)


def _no_broadcast(c: gs.Tensor, x: gs.Tensor) -> bool:
    v = constant_value(c)
    r = rank(x)
    return v is not None and (v.ndim == 0 or (r is not None and v.ndim <= r))


def other_operand(node: gs.Node, t: gs.Tensor) -> Optional[gs.Tensor]:
    """The operand of a binary node that is not ``t`` (``t`` itself for ``node(t, t)``)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is t:
        return b
    if b is t:
        return a
    return None


def binary_with_const(node: Optional[gs.Node], op: str, value: float, rtol: float = 1e-4) -> Optional[gs.Tensor]:
    """If ``node`` is ``op(x, value)`` (either order for commutative ops), return x."""
    if node is None or node.op != op or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        c, x = node.inputs[i], node.inputs[1 - i]
        if op in ("Div", "Sub") and i == 0:
            continue
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
    if n is None:
        return None
    if n.op == "Clip":
        b = clip_bounds(n, ctx.opset)
        if isinstance(b, str):
            return b
        return n.inputs[0] if b == (0.0, 6.0) else f"Clip({b[0]:g}, {b[1]:g}) is not Clip(0, 6)"
    if n.op == "Min":
        t = binary_with_const(n, "Min", 6.0)
        inner = producer(t)
        if t is not None and inner is not None and ctx.sole_consumer(t) is n:
            if inner.op == "Relu":
                return inner.inputs[0]
            x = binary_with_const(inner, "Max", 0.0)
            if x is not None:
                return x
    if n.op == "Max":
        t = binary_with_const(n, "Max", 0.0)
        inner = producer(t)
        if t is not None and ctx.sole_consumer(t) is n:
            x = binary_with_const(inner, "Min", 6.0)
            if x is not None:
                return x
    return None


@dataclass
class HardSigmoidForm:
    x: gs.Tensor
    alpha: float
    beta: float
    kind: str  # native | decomposed


def hardsigmoid_of(g: gs.Tensor, ctx: RuleContext) -> Union[HardSigmoidForm, str, None]:
    """If ``g`` = hardsigmoid(x): native HardSigmoid, or Clip(x + 3, 0, 6) / 6 (Div 6 or Mul 1/6).

    Intermediate tensors of the decomposed form must have no other reader.
    """
    n = producer(g)
    if n is None:
        return None
    if n.op == "HardSigmoid":
        alpha, beta = attr(n, "alpha"), attr(n, "beta")
        return HardSigmoidForm(n.inputs[0], 0.2 if alpha is None else float(alpha), 0.5 if beta is None else float(beta), "native")
    c = binary_with_const(n, "Div", 6.0) if n.op == "Div" else binary_with_const(n, "Mul", 1 / 6) if n.op == "Mul" else None
    if c is None:
        return None
    x = _add3_clip_input(c, ctx)
    if not isinstance(x, gs.Tensor):
        return x
    if ctx.sole_consumer(c) is not n:
        return f"'{c.name}' (relu6(x+3)) has other readers"
    return HardSigmoidForm(x, 1 / 6, 0.5, "decomposed")


def _add3_clip_input(c: gs.Tensor, ctx: RuleContext) -> Union[gs.Tensor, str, None]:
    """If ``c`` = relu6(x + 3) with a single-reader (x + 3), return x."""
    a = relu6_input(c, ctx)
    if not isinstance(a, gs.Tensor):
        return None if a is None or "Clip(" not in a else a
    add = producer(a)
    x = binary_with_const(add, "Add", 3.0)
    if x is None:
        return None
    if ctx.sole_consumer(a) is None:
        return f"'{a.name}' (x+3) has other readers"
    return x


# ---------------------------------------------------------------------------- activations


def _relu_rewrite(graph: gs.Graph, m: Match, ctx: RuleContext) -> None:
    ctx.replace_output(m.output, "Relu", [m.data["x"]], base=f"{m.output.name}_relu")


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
            if isinstance(hs, str):
                near_reason = near_reason or hs
                continue
            if hs is None:
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


_SQRT2 = math.sqrt(2.0)


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
        else:
            side = producer(other)
            sx = binary_with_const(side, "Mul", 0.5) if side is not None else None
            if sx is x:
                xs += 1
                k *= 0.5
            else:
                return f"'{start.name}' is multiplied by '{getattr(other, 'name', '?')}', not x/0.5"
        cur = mul.outputs[0]
        if xs == 1 and near(k, 0.5, 1e-3):
            return cur
    return f"no x*0.5*(1+...) product after '{start.name}'"


def match_gelu(graph, node, ctx):
    """Gelu (opset 20); 0.5*x*(1+erf(x/sqrt2)); 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    if node.op == "Gelu":
        return Match(node.outputs[0], {"x": node.inputs[0]})
    u = node.inputs[0]
    if node.op == "Erf":
        p = producer(u)
        x = binary_with_const(p, "Div", _SQRT2) if p is not None and p.op == "Div" else binary_with_const(p, "Mul", 1 / _SQRT2)
        if x is None:
            return None
    else:  # Tanh
        p = producer(u)
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


def match_single(op_name: str):
    def match(graph, node, ctx):
        return Match(node.outputs[0], {"x": node.inputs[0]})
    match.__doc__ = f"{op_name}(x)"
    return match


def match_hardsigmoid(graph, node, ctx):
    """A standalone hard sigmoid: native HardSigmoid (any alpha/beta) or Clip(x+3,0,6)/6."""
    out = node.outputs[0]
    hs = hardsigmoid_of(out, ctx)
    if isinstance(hs, HardSigmoidForm):
        return Match(out, {"x": hs.x})
    return hs if node.op == "HardSigmoid" else None


# ------------------------------------------------------------------------- squeeze-excite

_SE_ALLOWED = {
    "GlobalAveragePool", "ReduceMean", "Conv", "Gemm", "MatMul", "Add", "Mul", "Div", "Sub",
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Min", "Max", "LeakyRelu", "PRelu",
    "Tanh", "Erf", "Elu", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Constant",
    "Shape", "Gather", "Concat", "Slice", "Cast", "BatchNormalization",
}
_SE_SHAPE_OPS = {"Shape", "Gather", "Concat", "Slice", "Cast", "Unsqueeze", "Squeeze", "Constant"}
_SE_LIMIT = 48


def _gate_input(g: gs.Tensor, ctx: RuleContext) -> Optional[gs.Tensor]:
    """The pre-activation of an SE gate: Sigmoid(s), HardSigmoid(s) or Clip(s+3,0,6)/6."""
    n = producer(g)
    if n is None:
        return None
    if n.op == "Sigmoid":
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
    if n.op in ("Gemm", "MatMul"):
        return constant_value(n.inputs[1]) is not None
    if n.op == "Conv":
        w = constant_value(n.inputs[1])
        return w is not None and all(d == 1 for d in w.shape[2:])
    return False


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
    bad = sorted({n.op for n in nodes} - _SE_ALLOWED)
    if bad:
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
            if t is g:
                continue
            if ctx.is_output(t) or any(id(c) not in region for c in ctx.consumers(t)):
                return f"SE intermediate '{t.name}' is also read outside the block"
    if ctx.is_output(g) or len(ctx.consumers(g)) != 1:
        return f"SE gate '{g.name}' feeds {len(ctx.consumers(g)) + ctx.is_output(g)} consumers"
    xs, os_ = static_shape(x), static_shape(mul.outputs[0])
    if xs is not None and os_ is not None and xs != os_:
        return f"the gated output shape {os_} differs from the input shape {xs}"
    return True


def rewrite_identity(graph, m, ctx):
    ctx.reroute(m.output, m.data["x"])


# ---------------------------------------------------------------------------------- pools


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
    if auto_pad == "VALID":
        pads = [0] * 2 * r
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = static_shape(node.inputs[0])
        if shape is None:
            return f"auto_pad={auto_pad} with a dynamic input shape"
        pads = [0] * 2 * r
        for a in range(r):
            L, s, k = shape[2 + a], strides[a], ks[a]
            total = max(0, (math.ceil(L / s) - 1) * s + k - L)
            small, big = total // 2, total - total // 2
            pads[a], pads[a + r] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    if any(p >= ks[0] for p in pads):
        return f"pads {pads} not smaller than the kernel"
    k = ks[0]
    kernels = ([2] if k % 2 == 0 else []) + [3] * ((k - 1) // 2)
    stage_pads = [[0] * 2 * r for _ in kernels]
    for a in range(r):
        for side in (0, 1):
            split = _split_pads(pads[a + side * r], kernels)
            for st, p in enumerate(split):
                stage_pads[st][a + side * r] = p
    return {"kernels": kernels, "pads": stage_pads, "strides": strides, "rank": r}


def match_pool_cascade(graph, node, ctx):
    """MaxPool/AveragePool with a square kernel k >= 5 (dilation 1, ceil_mode 0)."""
    p = _pool_params(node, ctx)
    if not isinstance(p, dict):
        return p
    return Match(node.outputs[0], {"x": node.inputs[0], "op": node.op, "params": p,
                                   "count_include_pad": int(node.attrs.get("count_include_pad", 0))})


def rewrite_pool_cascade(graph, m, ctx):
    p, op, cur = m.data["params"], m.data["op"], m.data["x"]
    r = p["rank"]
    n = len(p["kernels"])
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


# ---------------------------------------------------------------------------------- focus

_BIG = 2**31 - 1


def _slice_params(node: gs.Node, ctx: RuleContext, r: int) -> Optional[list]:
    """[(axis, start, step)] of a Slice whose ends run to the end, or None."""
    if ctx.opset < 10:
        return None
    vals = [constant_value(input_at(node, i)) if input_at(node, i) is not None else None for i in range(1, 5)]
    starts, ends, axes, steps = vals
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
            r = rank(sl.inputs[0]) or 4
            params = _slice_params(sl, ctx, r)
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
    shape = getattr(src, "shape", None)
    c = shape[1] if shape is not None else None
    if not isinstance(c, (int, np.integer)):
        return "the Focus input has an unknown channel count"
    sh = static_shape(src)
    if sh is not None and (sh[2] % 2 or sh[3] % 2):
        return "odd spatial size"
    if np.dtype(src.dtype).kind != "f" if src.dtype is not None else True:
        return "the Focus input is not floating point"
    m = Match(node.outputs[0], {"x": src, "offsets": offsets, "C": int(c)})
    return match_focus_s2d_ok(m, ctx) or m


def rewrite_focus(graph, m, ctx):
    x, offsets, C = m.data["x"], m.data["offsets"], m.data["C"]
    dtype = np.dtype(x.dtype)
    mode = ctx.options.focus_mode
    if mode == "space_to_depth":
        _rewrite_focus_s2d(graph, m, ctx)
        return
    w = np.zeros((4 * C, C, 2, 2), dtype=dtype)
    for k, (dr, dc) in enumerate(offsets):
        w[k * C + np.arange(C), np.arange(C), dr, dc] = 1
    wt = ctx.constant(f"{m.output.name}_focus_w", w)
    ctx.replace_output(m.output, "Conv", [x, wt], {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]},
                       base=f"{m.output.name}_focus_conv")


def match_focus_s2d_ok(m: Match, ctx: RuleContext) -> Optional[str]:
    """In space_to_depth mode, the reason the Focus cannot become SpaceToDepth (None when it can)."""
    if ctx.options.focus_mode != "space_to_depth":
        return None
    if m.data["offsets"] == [(0, 0), (0, 1), (1, 0), (1, 1)]:
        return None
    reader = ctx.sole_consumer(m.output)
    if reader is None or reader.op != "Conv" or int(reader.attrs.get("group", 1)) != 1 or constant_value(reader.inputs[1]) is None:
        return ("SpaceToDepth orders channels (dr*2+dc)*C+c, unlike this Focus concat, and the Focus output is not "
                "read by a single group-1 Conv with constant weights whose input channels could be permuted")
    # The Focus tensor itself changes channel order; the Conv reading it keeps its values.
    m.preserved = [reader.outputs[0].name]
    return None


def _rewrite_focus_s2d(graph, m, ctx):
    x, offsets, C = m.data["x"], m.data["offsets"], m.data["C"]
    if offsets != [(0, 0), (0, 1), (1, 0), (1, 1)]:
        conv = ctx.sole_consumer(m.output)
        w = constant_value(conv.inputs[1])
        # Focus channel k*C + c holds offset offsets[k]; SpaceToDepth puts it at (dr*2+dc)*C + c.
        perm = np.empty(4 * C, dtype=np.int64)
        for k, (dr, dc) in enumerate(offsets):
            perm[(dr * 2 + dc) * C + np.arange(C)] = k * C + np.arange(C)
        conv.inputs[1] = ctx.constant(f"{conv.inputs[1].name}_s2d", np.ascontiguousarray(w[:, perm]))
    ctx.replace_output(m.output, "SpaceToDepth", [x], {"blocksize": 2}, base=f"{m.output.name}_s2d")


# ---------------------------------------------------------------------------------- convs


def _conv_geometry(node: gs.Node, ctx: RuleContext) -> Union[dict, str, None]:
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "the weight is not a constant"
    r = w.ndim - 2
    ks = list(w.shape[2:])
    if any(int(d) != 1 for d in node.attrs.get("dilations", [1] * r)):
        return "dilated convolution"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad}"
    pads = [0] * 2 * r if auto_pad == "VALID" else list(node.attrs.get("pads", [0] * 2 * r))
    return {"w": w, "r": r, "ks": ks, "pads": pads, "strides": list(node.attrs.get("strides", [1] * r))}


def _rebuild_conv(m: Match, ctx: RuleContext, w: np.ndarray, pads: list) -> None:
    node = m.data["node"]
    attrs = {k: v for k, v in node.attrs.items() if k not in ("kernel_shape", "pads", "auto_pad")}
    attrs.update(kernel_shape=list(w.shape[2:]), pads=pads)
    wt = ctx.constant(f"{node.inputs[1].name}_k{w.shape[2]}", w.astype(m.data["w"].dtype))
    ctx.replace_output(m.output, "Conv", [node.inputs[0], wt] + list(node.inputs[2:]), attrs, base=f"{m.output.name}_conv")


def match_even_kernel(graph, node, ctx):
    """Conv with an even kernel size on some axis (6x6 is left to conv_6x6_to_5x5 when that is on)."""
    geo = _conv_geometry(node, ctx)
    if geo is None or isinstance(geo, str):
        w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        return geo if w is not None and any(d % 2 == 0 for d in w.shape[2:]) else None
    if not any(k % 2 == 0 for k in geo["ks"]):
        return None
    if "conv_6x6_to_5x5" in ctx.active and geo["ks"] == [6, 6]:
        return "6x6 kernel left to conv_6x6_to_5x5"
    return Match(node.outputs[0], {"node": node, **geo})


def rewrite_even_kernel(graph, m, ctx):
    w, r, ks, pads = m.data["w"], m.data["r"], m.data["ks"], list(m.data["pads"])
    new_shape = list(w.shape[:2]) + [k + (k % 2 == 0) for k in ks]
    nw = np.zeros(new_shape, dtype=w.dtype)
    sl = [slice(None), slice(None)] + [slice(1, None) if k % 2 == 0 else slice(None) for k in ks]
    nw[tuple(sl)] = w
    for a, k in enumerate(ks):
        if k % 2 == 0:
            pads[a] += 1  # the zero tap sits before the window: start it one step earlier
    _rebuild_conv(m, ctx, nw, pads)


def match_conv6(graph, node, ctx):
    """A 2-D Conv with a 6x6 kernel."""
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or list(w.shape[2:]) != [6, 6]:
        return None
    geo = _conv_geometry(node, ctx)
    if isinstance(geo, str):
        return geo
    r = 2
    shape = static_shape(node.inputs[0])
    plan = []
    for a in range(r):
        pb, pe = geo["pads"][a], geo["pads"][a + r]
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


def match_conv_gt7(graph, node, ctx):
    """A 2-D Conv with a square kernel larger than 7."""
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 4 or max(w.shape[2:]) <= 7:
        return None
    geo = _conv_geometry(node, ctx)
    if isinstance(geo, str):
        return geo
    if geo["ks"][0] != geo["ks"][1]:
        return f"non-square kernel {geo['ks']}"
    return Match(node.outputs[0], {"node": node, **geo})


def rewrite_conv_gt7(graph, m, ctx):
    """k x k -> a 3x3 one-hot shift bank followed by a (k'/3) x (k'/3) conv with dilation 3.

    The kernel is first zero-extended at the front to k' = 3q (begin pads grow by k' - k, the
    even-kernel trick). Stage 1 copies every input channel c into 9 channels c*9 + 3u + v holding
    x shifted by (u, v) and carries the original pads; stage 2 (dilation 3, original stride and
    groups, no pads) reads copy (u, v) at offset 3a: tap (3a + u, 3b + v) of the original kernel,
    each exactly once. So the split is exact; its cost is 9x the input channels in between.
    """
    node, w, pads, strides = m.data["node"], m.data["w"], list(m.data["pads"]), m.data["strides"]
    O, Cg, k, _ = w.shape
    q = -(-k // 3)
    if 3 * q != k:
        ext = np.zeros((O, Cg, 3 * q, 3 * q), dtype=w.dtype)
        ext[:, :, 3 * q - k:, 3 * q - k:] = w
        w, pads = ext, [pads[0] + 3 * q - k, pads[1] + 3 * q - k, pads[2], pads[3]]
    x = node.inputs[0]
    group = int(node.attrs.get("group", 1))
    C = Cg * group
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


# --------------------------------------------------------------------------------- resize


def match_resize(graph, node, ctx):
    """Resize with constant ``sizes`` and a static input shape."""
    if ctx.opset < 11:
        return None
    sizes_t = input_at(node, 3)
    if sizes_t is None:
        return None
    sizes = constant_value(sizes_t)
    if sizes is None:
        return "sizes is not a constant"
    policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if policy != "stretch":
        return f"keep_aspect_ratio_policy={policy}"
    shape = static_shape(node.inputs[0])
    if shape is None:
        return "the input shape is not static"
    axes = node.attrs.get("axes")
    axes = list(range(len(shape))) if axes is None else [int(a) % len(shape) for a in axes]
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    scales = []
    for a, s in zip(axes, sizes):
        sc = np.float32(s / shape[a])
        for _ in range(4):  # float32 rounding may put in*scale just below the size: nudge up
            if int(np.floor(np.float32(sc) * np.float32(shape[a]))) == s and int(math.floor(float(sc) * shape[a])) == s:
                break
            sc = np.nextafter(sc, np.float32(np.inf))
        else:
            return f"no float32 scale reproduces size {s} from {shape[a]}"
        scales.append(sc)
    return Match(node.outputs[0], {"node": node, "scales": np.array(scales, np.float32)})


def rewrite_resize(graph, m, ctx):
    node = m.data["node"]
    roi = input_at(node, 1)
    if roi is None:
        roi = ctx.constant(f"{m.output.name}_roi", np.zeros(0, np.float32)) if ctx.opset < 13 else gs.Variable.empty()
    scales = ctx.constant(f"{m.output.name}_scales", m.data["scales"])
    ctx.replace_output(m.output, "Resize", [node.inputs[0], roi, scales], dict(node.attrs), base=f"{m.output.name}_resize")


# ----------------------------------------------------------------------------- the table


def default_rules() -> list:
    """The default rule table, in application order (exact rules run first; see the pass)."""
    R = Rule
    return [
        R("focus_to_conv", "Focus stem (4 strided Slices -> Concat) -> one-hot 2x2 stride-2 Conv (or SpaceToDepth)",
          True, True, ("Concat",), match_focus, rewrite_focus),
        R("maxpool_ge5_to_cascade", "MaxPool k>=5 -> cascade of 3x3 stride-1 pools, original stride last",
          True, True, ("MaxPool",), match_pool_cascade, rewrite_pool_cascade),
        R("resize_sizes_to_scales", "Resize given by sizes -> scales (static shapes)",
          True, True, ("Resize",), match_resize, rewrite_resize),
        R("conv_even_kernel_to_odd", "even conv kernel -> odd kernel with a zero border, begin pad +1",
          True, False, ("Conv",), match_even_kernel, rewrite_even_kernel),
        R("squeeze_and_excite_to_identity", "x * gate(FC(act(FC(pool(x))))) -> x",
          False, True, ("Mul",), match_se, rewrite_identity),
        R("avgpool_ge5_to_cascade", "AveragePool k>=5 -> cascade of 3x3 pools (triangular weighting: approximate)",
          False, True, ("AveragePool",), match_pool_cascade, rewrite_pool_cascade),
        R("conv_6x6_to_5x5", "6x6 conv -> 5x5 (border row/col with the least weight dropped)",
          False, True, ("Conv",), match_conv6, rewrite_conv6),
        R("conv_gt7_split", "square conv kernel > 7 -> 3x3 one-hot shift bank + dilation-3 conv (exact; 9x channels between; off)",
          True, False, ("Conv",), match_conv_gt7, rewrite_conv_gt7),
        R("hardswish_to_relu", "HardSwish (native, x*HardSigmoid(x), x*Clip(x+3,0,6)/6) -> Relu",
          False, True, ("HardSwish", "Mul", "Div"), match_hardswish, _relu_rewrite),
        R("silu_to_relu", "SiLU (Sigmoid -> Mul(x)) -> Relu", False, True, ("Sigmoid",), match_silu, _relu_rewrite),
        R("gelu_to_relu", "GELU (Erf chain, native Gelu, tanh approximation) -> Relu",
          False, True, ("Gelu", "Erf", "Tanh"), match_gelu, _relu_rewrite),
        R("relu6_to_relu", "ReLU6 / Clip(0,6) -> Relu", False, True, ("Clip", "Min", "Max"), match_relu6, _relu_rewrite),
        R("leakyrelu_to_relu", "LeakyRelu -> Relu (slope dropped)", False, True, ("LeakyRelu",), match_single("LeakyRelu"), _relu_rewrite),
        R("prelu_to_relu", "PRelu -> Relu (learned slopes dropped; off by default)", False, False, ("PRelu",), match_single("PRelu"), _relu_rewrite),
        R("hardsigmoid_to_relu", "standalone HardSigmoid -> Relu (range changes from [0,1] to [0,inf), as TI)",
          False, True, ("HardSigmoid", "Div", "Mul"), match_hardsigmoid, _relu_rewrite),
    ]
