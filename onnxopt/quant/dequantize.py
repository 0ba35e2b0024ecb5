"""The float graph an already-quantized model stands for, so that it can be quantized again for
another target (``qdq`` on a model whose own encoding fails that target's check).

The arithmetic, per form of quantization onnxruntime (or a QAT export) writes:

* ``DequantizeLinear(q, s, zp)`` is ``(q - zp) * s`` (per tensor, or per channel along ``axis``).
  With a constant ``q`` (a weight, an int32 bias) it is folded into a float initializer computed
  as the operator does it -- the integer difference cast to the scale's type, times ``s`` -- so
  the fold is exact (bit-identical to onnxruntime).
* An activation ``QuantizeLinear(x) -> DequantizeLinear`` pair, and ``DynamicQuantizeLinear(x)``,
  stand for ``x`` rounded to the grid; removing them gives ``x`` back. This is NOT exact: the
  activation's rounding and clipping are dropped, which is what re-quantizing with the new
  target's own ranges wants.
  Where the range begins at 0 (the zero point is the type's minimum) after an op that can be
  negative, the activation onnxruntime removed before such a Q (whose clipping does the job) is
  put back: a Relu, or Clip(0, 6) where the range ends at 6 (a ReLU6 whose calibration reached
  its bound); another range's top is the old calibration's, not kept.
* ``MatMulInteger(a, b, a_zp, b_zp) -> Cast(float) -> Mul(s_a * s_b)`` (onnxruntime's dynamic
  quantization) is ``MatMul(DQ(a), DQ(b))``, ``ConvInteger`` likewise with ``Conv``: equal up to
  the float rounding of the sum. The scales are read from the ``Mul`` of the two scales.
* ``QLinearConv`` / ``QLinearMatMul`` (QOperator format) is ``Q(Conv(DQ(x), DQ(w), bias * s_x *
  s_w), s_y, zp_y)``: the float op, whose output the quantized output stands for.
* Data movement on per-tensor quantized values (Transpose, Reshape, Gather of an embedding...)
  commutes with ``DequantizeLinear``: the op is applied to the float value instead.

A tensor's quantization parameters come from every op that names them (Q, DQ, the kernels'
zero points); tensors linked by data movement share them (a union-find over tensor names). What
cannot be turned back (a quantized graph input, an op reading integer values onnxopt does not
know, scales computed at run time for a constant) is listed in one :class:`DequantizeError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from ..errors import OnnxoptError
from ..ir.graph import GraphEditor, attr, constant_value, export_graph, import_graph, input_at, replace_tensor
from ..ir.unionfind import UnionFind
from .view import quantized_ops

# ops that move or select values without computing on them: DQ(op(q)) == op(DQ(q)) for a
# per-tensor encoding (data input 0; the other inputs are shapes, indices, axes)
MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Gather", "Slice", "Expand", "Tile"}
INTEGER_KERNELS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}
QLINEAR = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul"}
# ops whose output is never negative: a Q at zero after them clips nothing
NONNEGATIVE = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Sqrt"}
# ops whose output is >= 0 when their (data) inputs are
KEEPS_SIGN = {"Add", "Mul", "Concat", "Max", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
              "ReduceMax", "Resize", *MOVES}
# the quantization ops this module turns back; any other one left in the graph is refused
HANDLED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", *INTEGER_KERNELS, *QLINEAR}


class DequantizeError(OnnxoptError):
    """The model holds quantization that cannot be turned back into float; ``reasons`` lists why."""

    def __init__(self, reasons: list):
        self.reasons = list(dict.fromkeys(reasons))
        shown = "; ".join(self.reasons[:5]) + (f"; and {len(self.reasons) - 5} more" if len(self.reasons) > 5 else "")
        super().__init__(f"cannot dequantize the model: {shown}.", "quantize the float model it came from")


class _Refused(Exception):
    """One tensor or node that cannot be dequantized (collected into a DequantizeError)."""


@dataclass
class Dequantized:
    """The float model, and what was turned back: constant DQs folded (weights, biases),
    activation Q/DQ pairs and DynamicQuantizeLinear removed, integer/QLinear kernels replaced."""

    model: ModelProto
    source: str
    weights: int = 0
    activation_pairs: int = 0
    dynamic: int = 0
    kernels: int = 0
    relus: int = 0

    def describe(self) -> str:
        """``onnxruntime QDQ, 18 activation Q/DQ pairs, 19 weights`` and the like."""
        parts = [(self.activation_pairs, "activation Q/DQ pair", "activation Q/DQ pairs"),
                 (self.dynamic, "DynamicQuantizeLinear", "DynamicQuantizeLinear"),
                 (self.kernels, "integer kernel", "integer kernels"), (self.weights, "quantized weight", "quantized weights"),
                 (self.relus, "ReLU/ReLU6 restored", "ReLU/ReLU6 restored")]
        return ", ".join([self.source] + [f"{n} {one if n == 1 else many}" for n, one, many in parts if n])

    def to_dict(self) -> dict:
        return {"source": self.source, "weights": self.weights, "activation_pairs": self.activation_pairs,
                "dynamic_quantizers": self.dynamic, "kernels": self.kernels, "relus_restored": self.relus}


def quantization_format(model: ModelProto) -> str:
    """How the model is quantized: ``QDQ``, ``dynamic`` (integer kernels) or ``QOperator``,
    prefixed by ``onnxruntime`` when its quantization tool wrote it."""
    found = quantized_ops(model)
    if any(op.startswith("QLinear") or op == "QGemm" for op in found):
        kind = "QOperator"
    elif set(found) & {"DynamicQuantizeLinear", *INTEGER_KERNELS}:
        kind = "dynamic"
    else:
        kind = "QDQ"
    return f"onnxruntime {kind}" if model.producer_name == "onnx.quantize" else kind


@dataclass
class _Encoding:
    """A tensor's quantization: scale and zero point tensors (None: unknown / 0), the channel
    axis as written by the op that named it, and the tensor it was named on (a per-channel
    encoding holds only there: data movement changes the axes)."""

    scale: Optional[gs.Tensor]
    zero_point: Optional[gs.Tensor]
    axis: Optional[int]
    on: gs.Tensor


def _same(a: Optional[gs.Tensor], b: Optional[gs.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a is b or a.name == b.name:
        return True
    va, vb = constant_value(a), constant_value(b)
    return va is not None and vb is not None and va.shape == vb.shape and np.array_equal(va, vb)


def _clip_min(node: gs.Node) -> float:
    """A Clip's lower bound (-inf when absent or computed)."""
    lo = constant_value(input_at(node, 1)) if len(node.inputs) > 1 else node.attrs.get("min")
    return float(np.asarray(lo).reshape(-1)[0]) if lo is not None and np.asarray(lo).size else -np.inf


def _nonnegative(t: gs.Tensor, depth: int = 8) -> bool:
    """Whether ``t`` can never be negative, as far as a few producers back show (a Relu, a
    sum/product/pooling/reshaping of such values, a constant >= 0)."""
    value = constant_value(t)
    if value is not None:
        return bool(np.all(value >= 0))
    prod = t.inputs[0] if t.inputs else None
    if prod is None or depth == 0:
        return False
    if prod.op in NONNEGATIVE:
        return True
    if prod.op == "Clip":
        return _clip_min(prod) >= 0
    data = prod.inputs[:1] if prod.op in MOVES else prod.inputs  # a move's other inputs: shapes, indices...
    return prod.op in KEEPS_SIGN and all(_nonnegative(i, depth - 1) for i in data if i.name)


def _named_encodings(graph: gs.Graph) -> list:
    """(tensor, scale, zero point, axis) for every tensor an op names the quantization of."""
    found = []
    for n in graph.nodes:
        i = lambda k: input_at(n, k)  # noqa: E731
        if n.op in ("QuantizeLinear", "DequantizeLinear"):
            t = n.outputs[0] if n.op == "QuantizeLinear" else n.inputs[0]
            found.append((t, i(1), i(2), attr(n, "axis")))
        elif n.op == "DynamicQuantizeLinear":
            found.append((n.outputs[0], n.outputs[1], n.outputs[2], None))
        elif n.op in INTEGER_KERNELS:  # scales come from the Mul after the kernel (_kernel_scales)
            found += [(n.inputs[0], None, i(2), None), (n.inputs[1], None, i(3), -1 if n.op == "MatMulInteger" else 0)]
        elif n.op in QLINEAR:
            w_axis = 0 if n.op == "QLinearConv" else -1
            found += [(n.inputs[0], i(1), i(2), None), (n.inputs[3], i(4), i(5), w_axis), (n.outputs[0], i(6), i(7), None)]
    return found


def _merged(listed: list, conflicts: list) -> _Encoding:
    """One encoding for a group of tensors from those named on it: the first scale and zero
    point given; a different one named elsewhere is a conflict (two quantizations of the same
    values), appended to ``conflicts``."""
    with_scale = next((e for e in listed if e.scale is not None), listed[0])
    zp = next((e.zero_point for e in listed if e.zero_point is not None), None)
    for e in listed:
        if (e.scale is not None and not _same(e.scale, with_scale.scale)) or (e.zero_point is not None and not _same(e.zero_point, zp)):
            conflicts.append(f"'{e.on.name}' is quantized with two different scales or zero points")
            break
    return _Encoding(with_scale.scale, zp, with_scale.axis, with_scale.on)


@dataclass
class _Dequantizer:
    graph: gs.Graph
    editor: GraphEditor = field(init=False)
    sets: UnionFind = field(default_factory=UnionFind)
    encodings: dict = field(default_factory=dict)  # set representative -> _Encoding
    quantized: set = field(default_factory=set)    # names of the tensors holding quantized values
    memo: dict = field(default_factory=dict)       # id(quantized tensor) -> its float tensor
    counts: dict = field(default_factory=lambda: {"weights": 0, "activation_pairs": 0, "dynamic": 0, "kernels": 0, "relus": 0})

    def __post_init__(self):
        self.editor = GraphEditor(self.graph)

    # ---- quantization parameters
    def collect(self) -> list:
        """Group the quantized tensors (linked by data movement) and give each group its
        encoding; returns the conflicts found."""
        named: dict = {}
        for t, scale, zp, axis in _named_encodings(self.graph):
            named.setdefault(t.name, []).append(_Encoding(scale, zp, axis, t))
        quantized = set(named)
        moves = [n for n in self.graph.nodes if n.op in MOVES and n.inputs and n.outputs]
        grown = True
        while grown:  # forward (a Transpose of a Q output) and backward (the embedding a Gather reads)
            grown = False
            for n in moves:
                if (n.inputs[0].name in quantized) != (n.outputs[0].name in quantized):
                    quantized |= {n.inputs[0].name, n.outputs[0].name}
                    grown = True
        for n in moves:
            if n.inputs[0].name in quantized:
                self.sets.union(n.inputs[0].name, n.outputs[0].name)
        groups: dict = {}
        for name, listed in named.items():
            groups.setdefault(self.sets.find(name), []).extend(listed)
        conflicts: list = []
        self.encodings = {root: _merged(listed, conflicts) for root, listed in groups.items()}
        self.quantized = quantized
        return conflicts

    def encoding(self, t: gs.Tensor) -> Optional[_Encoding]:
        return self.encodings.get(self.sets.find(t.name)) if t.name in self.quantized else None

    # ---- the float value of a quantized tensor
    def float_of(self, t: gs.Tensor) -> gs.Tensor:
        if id(t) not in self.memo:
            self.memo[id(t)] = self._float_of(t)
        return self.memo[id(t)]

    def _float_of(self, t: gs.Tensor) -> gs.Tensor:
        prod = t.inputs[0] if t.inputs else None
        if constant_value(t) is not None:
            return self._fold(t)
        if prod is None:
            raise _Refused(f"graph input '{t.name}' takes quantized values")
        if prod.op == "QuantizeLinear":
            self.counts["activation_pairs"] += 1
            return self._restore_activation(prod.inputs[0], input_at(prod, 1), input_at(prod, 2))
        if prod.op == "DynamicQuantizeLinear" and prod.outputs[0] is t:
            self.counts["dynamic"] += 1
            return prod.inputs[0]
        if prod.op in MOVES:
            moved = self.float_of(prod.inputs[0])
            out = gs.Variable(self.editor.names(f"{t.name}_float"), dtype=moved.dtype)
            self.editor.add_node(prod.op, [moved, *prod.inputs[1:]], [out], dict(prod.attrs), base=prod.name)
            return out
        if prod.op in QLINEAR:
            return self._qlinear(prod)
        raise _Refused(f"{prod.op} '{prod.name or t.name}' computes on quantized values")

    def _fold(self, t: gs.Tensor) -> gs.Constant:
        """The float initializer ``(q - zp) * s`` of a constant quantized tensor, as DequantizeLinear computes it."""
        enc = self.encoding(t)
        q = constant_value(t)
        scale = constant_value(enc.scale) if enc is not None else None
        if scale is None:
            raise _Refused(f"the scale of the constant '{t.name}' is not a constant")
        zp = constant_value(enc.zero_point)
        zp = np.zeros((), np.int64) if zp is None else zp.astype(np.int64)
        if scale.size > 1 or zp.size > 1:
            if enc.on is not t and enc.on.name != t.name:
                raise _Refused(f"'{t.name}' is moved (transposed, reshaped...) before its per-channel dequantization")
            shape = [1] * q.ndim
            shape[(enc.axis if enc.axis is not None else 1) % q.ndim] = -1
            scale, zp = scale.reshape(shape) if scale.size > 1 else scale, zp.reshape(shape) if zp.size > 1 else zp
        value = (q.astype(np.int64) - zp).astype(scale.dtype) * scale
        self.counts["weights"] += 1
        base = t.name[: -len("_quantized")] if t.name.endswith("_quantized") else f"{t.name}_dequantized"
        return self.editor.constant(base, value)

    def _qlinear(self, node: gs.Node) -> gs.Tensor:
        """The float Conv/MatMul a QLinearConv/QLinearMatMul quantizes (its int32 bias at ``s_x * s_w``)."""
        x, w = self.float_of(node.inputs[0]), self.float_of(node.inputs[3])
        inputs = [x, w]
        bias = input_at(node, 8)
        if bias is not None:
            b, s_x, s_w = constant_value(bias), constant_value(node.inputs[1]), constant_value(node.inputs[4])
            if b is None or s_x is None or s_w is None:
                raise _Refused(f"{node.op} '{node.name}' has a bias or scales computed at run time")
            inputs.append(self.editor.constant(f"{bias.name}_float", (b.astype(np.float32) * (s_x * s_w).reshape(-1)).astype(np.float32)))
        out = gs.Variable(self.editor.names(f"{node.outputs[0].name}_float"), dtype=x.dtype)
        self.editor.add_node(QLINEAR[node.op], inputs, [out], dict(node.attrs), base=node.name)
        self.counts["kernels"] += 1
        return self._restore_activation(out, input_at(node, 6), input_at(node, 7))

    def _restore_activation(self, x: gs.Tensor, scale: Optional[gs.Tensor], zero_point: Optional[gs.Tensor]) -> gs.Tensor:
        """``x``, through the activation onnxruntime removed before a Q whose range begins at 0 (zero
        point = the type's minimum; none: uint8 at 0) when ``x`` can be negative (module doc)."""
        zp = constant_value(zero_point) if zero_point is not None else np.zeros((), np.uint8)
        s = constant_value(scale)
        if (zp is None or s is None or zp.dtype.kind not in "iu" or zp.size != 1 or zp.item() != np.iinfo(zp.dtype).min
                or _nonnegative(x)):
            return x
        top = (int(np.iinfo(zp.dtype).max) - int(zp.item())) * float(s.reshape(-1)[0])
        out = gs.Variable(self.editor.names(f"{x.name}_relu"), dtype=x.dtype)
        if abs(top - 6.0) <= float(s.reshape(-1)[0]) / 2:
            bounds = [self.editor.constant(f"{x.name}_min", np.array(0, np.float32)),
                      self.editor.constant(f"{x.name}_max", np.array(6, np.float32))]
            self.editor.add_node("Clip", [x, *bounds], [out], base=f"{x.name}_relu6")
        else:
            self.editor.add_node("Relu", [x], [out], base=f"{x.name}_relu")
        self.counts["relus"] += 1
        return out

    # ---- rewrites
    def replace_dequantize(self, node: gs.Node) -> None:
        """Every reader of the DQ's output reads the float value; a graph output keeps its name."""
        if attr(node, "block_size"):
            raise _Refused(f"DequantizeLinear '{node.name}' is blocked (block_size)")
        value, out = self.float_of(node.inputs[0]), node.outputs[0]
        if self.editor.is_output(out) and isinstance(value, gs.Variable) and value.inputs and not self.editor.is_output(value):
            replace_tensor(self.graph, out, value)
            node.outputs.clear()
        else:
            self.editor.reroute(out, value)

    def replace_kernel(self, node: gs.Node) -> None:
        """``Kernel(a, b) -> Cast -> Mul(s_a * s_b)`` -> the float op writing the Mul's output."""
        cast = self.editor.sole_consumer(node.outputs[0])
        mul = self.editor.sole_consumer(cast.outputs[0]) if cast is not None and cast.op == "Cast" else None
        if mul is None or mul.op != "Mul":
            raise _Refused(f"{node.op} '{node.name}' is not followed by Cast -> Mul (its output scale)")
        product = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        self._kernel_scales(node, product)
        a, b = self.float_of(node.inputs[0]), self.float_of(node.inputs[1])
        attrs = dict(node.attrs) if node.op == "ConvInteger" else {}
        self.editor.replace_output(mul.outputs[0], INTEGER_KERNELS[node.op], [a, b], attrs, base=node.name)
        self.counts["kernels"] += 1

    def _kernel_scales(self, node: gs.Node, product: gs.Tensor) -> None:
        """Fill in the scales of an integer kernel's inputs from ``Mul(s_a, s_b)`` after it: the
        one already known (a DynamicQuantizeLinear's, a DQ's) tells which factor is the other's."""
        prod = product.inputs[0] if product.inputs else None
        if prod is None or prod.op != "Mul":
            raise _Refused(f"the output scale of {node.op} '{node.name}' is not a product of two scales")
        encs = [self.encoding(node.inputs[0]), self.encoding(node.inputs[1])]
        factors = list(prod.inputs)
        for t, enc in zip(node.inputs[:2], encs):
            if enc.scale is None:  # onnxruntime names a constant's scale after it: w_quantized -> w_scale
                enc.scale = next((f for f in factors if t.name.endswith("_quantized") and f.name == t.name[:-10] + "_scale"), None)
            if enc.scale is not None:
                known = next((f for f in factors if _same(f, enc.scale)), None)
                if known is None:
                    raise _Refused(f"the output scale of {node.op} '{node.name}' is not its inputs' scales' product")
                factors.remove(known)
        unknown = [enc for enc in encs if enc.scale is None]
        if len(unknown) == 2 and not all(constant_value(f) is not None and constant_value(f).size == 1 for f in factors):
            raise _Refused(f"the input scales of {node.op} '{node.name}' cannot be told apart in its output scale")
        for enc in unknown:  # two per-tensor scales: either order gives the same product
            enc.scale = factors.pop(0)
        if node.op == "ConvInteger" and (constant_value(encs[1].scale) is None or constant_value(encs[1].scale).size > 1):
            raise _Refused(f"ConvInteger '{node.name}' has a per-channel or computed weight scale")


def dequantize(model: ModelProto) -> Dequantized:
    """The float model ``model``'s quantization stands for (module docstring); raises
    :class:`DequantizeError` listing every part that cannot be turned back."""
    graph = import_graph(model)
    d = _Dequantizer(graph)
    reasons = d.collect()
    for node in list(graph.nodes):
        try:
            if node.op == "DequantizeLinear":
                d.replace_dequantize(node)
            elif node.op in INTEGER_KERNELS:
                d.replace_kernel(node)
        except _Refused as exc:
            reasons.append(str(exc))
    d.editor.compact()
    out = export_graph(graph, model)
    left = quantized_ops(out)
    unknown = sorted(set(left) - HANDLED)
    if unknown:
        reasons.append(f"onnxopt does not dequantize {', '.join(unknown)}")
    elif left and not reasons:
        reasons.append("quantized values reach the graph's outputs or are read by other ops ("
                       + ", ".join(f"{n} {op}" for op, n in sorted(left.items())) + " left)")
    if reasons:
        raise DequantizeError(reasons)
    return Dequantized(out, quantization_format(model), **d.counts)
