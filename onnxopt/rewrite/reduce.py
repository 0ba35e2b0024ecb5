"""ReduceMean becomes ops TIDL runs (TIDL does not take a ReduceMean alone; TI's model optimizer
runs ``convert_reducemean_to_matmul`` before quantization). Both rules are exact and off in
lite's default table (``reducemean_to_matmul`` up to float summation order); ``qdq --target tidl``
runs them on the float graph before placing Q/DQ.
"""
from __future__ import annotations

import functools
from typing import Union

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at
from .engine import Match, RuleContext, rule
from .patterns import rank

_FLOATS = (np.float16, np.float32, np.float64)


def _reduced_axes(node: gs.Node, ctx: RuleContext, r: int) -> Union[list, str]:
    """The sorted, non-negative axes ``node`` averages over, or why they are not known."""
    if ctx.opset >= 18:
        axes_t = input_at(node, 1)
        value = constant_value(axes_t)
        if axes_t is not None and value is None:
            return "axes are computed at run time"
        axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        if axes == [] and int(node.attrs.get("noop_with_empty_axes", 0)):
            return "empty axes with noop_with_empty_axes=1 (an identity: cleanup's job)"
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return "reduces every axis"
    return sorted({int(a) % r for a in axes})


def _on_mean(match):
    """Call ``match(node, x, rank, axes)`` for a ReduceMean of a float tensor x of known rank and
    axes; otherwise say why it is left alone."""
    @functools.wraps(match)
    def checked(graph, node: gs.Node, ctx: RuleContext):
        x = node.inputs[0]
        dtype = getattr(x, "dtype", None)
        if dtype is None or np.dtype(dtype).type not in _FLOATS:
            return f"input type {dtype} (only float16/32/64)"
        r = rank(x)
        if r is None:
            return "the input rank is unknown"
        axes = _reduced_axes(node, ctx, r)
        return axes if isinstance(axes, str) else match(node, x, r, axes)
    return checked


def rewrite_pool(graph, m, ctx):
    x = m.data["x"]
    if m.data["keepdims"]:
        ctx.replace_output(m.output, "GlobalAveragePool", [x], base=f"{m.output.name}_gap")
        return
    pooled = ctx.variable(f"{m.output.name}_gap", like=x)
    ctx.add_node("GlobalAveragePool", [x], [pooled], base=f"{m.output.name}_gap")
    ctx.replace_output(m.output, "Flatten", [pooled], {"axis": 1}, base=f"{m.output.name}_flatten")


@rule("reducemean_to_pool", "ReduceMean over every axis after N, C -> GlobalAveragePool (+ Flatten for keepdims=0)",
      exact=True, anchors=("ReduceMean",), rewrite=rewrite_pool, priority=32, default=False)
@_on_mean
def match_pool(node, x, r, axes):
    """ReduceMean of a float tensor of rank >= 3 over axes 2..rank-1."""
    if r < 3 or axes != list(range(2, r)):
        return None  # reducemean_to_matmul's case, or neither
    return Match(node.outputs[0], {"x": x, "keepdims": int(node.attrs.get("keepdims", 1))})


def rewrite_matmul(graph, m, ctx):
    x, r, n, last, keep = m.data["x"], m.data["rank"], m.data["n"], m.data["last"], m.data["keepdims"]
    name = m.output.name
    swap = list(range(r - 2)) + [r - 1, r - 2]
    if not last:
        swapped = ctx.variable(f"{name}_swapped", like=x)
        ctx.add_node("Transpose", [x], [swapped], {"perm": swap}, base=f"{name}_transpose")
        x = swapped
    vector = ctx.constant(f"{name}_mean_vector", np.full((n, 1), 1.0 / n, dtype=np.dtype(m.data["dtype"])))
    if last and keep:
        ctx.replace_output(m.output, "MatMul", [x, vector], base=f"{name}_matmul")
        return
    product = ctx.variable(f"{name}_matmul", like=x)
    ctx.add_node("MatMul", [x, vector], [product], base=f"{name}_matmul")
    if keep:
        ctx.replace_output(m.output, "Transpose", [product], {"perm": swap}, base=f"{name}_transpose_back")
    elif ctx.opset >= 13:
        ctx.replace_output(m.output, "Squeeze", [product, ctx.constant(f"{name}_axes", np.array([-1], np.int64))],
                           base=f"{name}_squeeze")
    else:
        ctx.replace_output(m.output, "Squeeze", [product], {"axes": [-1]}, base=f"{name}_squeeze")


@rule("reducemean_to_matmul", "ReduceMean over the last or second-to-last axis -> MatMul with a 1/n vector",
      exact=True, anchors=("ReduceMean",), rewrite=rewrite_matmul, priority=34, default=False)
@_on_mean
def match_matmul(node, x, r, axes):
    """ReduceMean of a float tensor over one of its last two axes, whose size is static."""
    if len(axes) != 1 or r < 2 or axes[0] < r - 2:
        return f"mean over axes {axes} of a rank-{r} tensor: only one of the last two axes maps to a MatMul"
    n = x.shape[axes[0]]
    if not isinstance(n, (int, np.integer)) or n <= 0:
        return f"axis {axes[0]} has no static size"
    return Match(node.outputs[0], {"x": x, "rank": r, "n": int(n), "last": axes[0] == r - 1,
                                   "keepdims": int(node.attrs.get("keepdims", 1)), "dtype": np.dtype(x.dtype)})
