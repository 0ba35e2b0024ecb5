"""``bnfuse`` -- fold BatchNormalization and per-channel constant Mul/Add/Sub/Div into the
neighbouring linear layer (exact, up to float rounding).

Inference BatchNormalization is a per-channel affine map on axis 1::

    BN(x) = gamma * (x - mean) / sqrt(var + eps) + beta = s * x + t
    s = gamma / sqrt(var + eps),   t = beta - mean * s

A constant per-channel ``Mul(m)`` is ``s = m, t = 0``; ``Add(a)`` is ``s = 1, t = a``; ``Sub(c)``
is ``s = 1, t = -c``; ``Div(d)`` is ``s = 1/d, t = 0``. Every fold below is this affine map pushed
into a linear layer ``y = W * x + b`` whose output channel ``o`` it scales:

* **Conv** (W ``[Cout, Cin/g, k...]``, any group / dilation / stride):
  ``W'[o] = s[o] * W[o]``,  ``b'[o] = s[o] * b[o] + t[o]`` (``b = 0`` when absent).
* **ConvTranspose** (W ``[Cin, Cout/g, k...]``): output channel ``o = gi * Cout/g + j`` lives in
  ``W[gi * Cin/g : (gi+1) * Cin/g, j]``, so W is viewed as ``[g, Cin/g, Cout/g, k...]`` and
  scaled by ``s`` viewed as ``[g, 1, Cout/g, 1...]``; ``b' = s * b + t``.
* **Gemm** ``Y = alpha * A * op(B) + beta * C`` (output ``[M, N]``, channel = column ``N``):
  the columns of ``op(B)`` are scaled (rows of B when ``transB=1``, columns when 0),
  ``C' = s * (beta * C) + t`` broadcast against ``[N]`` (so a scalar, ``[N]``, ``[1, N]``,
  ``[M, 1]`` or ``[M, N]`` C stays valid), ``beta' = 1``; ``alpha`` is untouched.
* **MatMul** ``X @ W`` with a constant 2-D ``W [K, N]`` (+ an optional ``Add`` of a constant
  per-column bias): ``W'[:, n] = s[n] * W[:, n]``, ``bias' = s * bias + t`` (a bias ``Add`` is
  created when there was none). A BatchNormalization normalises axis 1, which is the MatMul's
  column axis only for a rank-2 output; a higher-rank MatMul output is skipped with a reason.
* **BN followed by a Conv** (when the BN cannot go backwards): ``Conv(s * x + t)`` equals
  ``Conv'(x)`` with ``W'[o, c] = W[o, c] * s[c]`` and ``b'[o] = b[o] + sum_{c,k} W[o, c, k] * t[c]``
  -- exact only when the Conv does not pad (padding inserts zeros *after* the BN, which the
  fold would turn into ``t``), so a padded Conv is skipped with that reason.
* **Standalone BN** (no fold possible): ``Mul(s) -> Add(t)`` with constants shaped ``[C, 1, ...]``
  (option ``standalone=muladd``), a depthwise 1x1 ``Conv`` with ``W = s`` as ``[C, 1, 1, 1]``,
  ``group = C``, bias ``t`` (``standalone=conv``, 4-D inputs only; others get Mul+Add with a
  note), or left alone (``standalone=keep``).

Arithmetic is float64, cast back to the weight's dtype. Guards: the layer's output must have no
other consumer and not be a graph output; W (and b) must be constants -- initializers or
Constant-node outputs -- and not graph inputs; a BatchNormalization in training mode
(``training_mode=1`` or its mean/var outputs used) is left alone. Folded weights always get a new
name from the NameGenerator (copy-on-write), so a weight shared with another node is never
changed under it. Mul/Add/Sub/Div are folded only when their constant is per-channel (a scalar or
``[C, 1, ...]`` for Conv, ``[N]`` for Gemm/MatMul) and cannot broadcast the output to a larger
shape. Graph output names never change: the layer takes over the folded node's output tensor.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import NameGenerator, can_absorb, constant_value, drop_detached, export_graph, import_graph, input_at, is_graph_output, overridable_inputs, sole_consumer, swap_input
from onnxopt.ir.proto import tensor_types
from onnxopt.registry import PassContext, PassOptions, PassResult, option, register_pass

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_AFFINE = ("Mul", "Add", "Sub", "Div")


@dataclass
class BnfuseOptions(PassOptions):
    """The bnfuse pass's options."""

    standalone: str = option("muladd", "What a BatchNormalization that cannot be folded becomes: muladd (Mul+Add), conv "
                             "(depthwise 1x1 Conv, 4-D inputs) or keep.", ("muladd", "conv", "keep"))
    fold_following: bool = option(True, "Fold a BatchNormalization into the Conv after it when that Conv does not pad "
                                  "(exact).")
    fold_affine: bool = option(True, "Fold constant per-channel Mul/Add/Sub/Div that follow a Conv/ConvTranspose/Gemm/MatMul.")


@register_pass("bnfuse", "Fold BatchNormalization and constant per-channel Mul/Add into Conv/ConvTranspose/Gemm/MatMul.", exact=True, options=BnfuseOptions)
def bnfuse(model: onnx.ModelProto, options: BnfuseOptions, ctx: PassContext) -> PassResult:
    """Exact BatchNormalization / per-channel affine folding into the neighbouring linear layer."""
    fuser = _Fuser(model, options)
    fuser.run()
    drop_detached(fuser.graph)
    out = export_graph(fuser.graph, like=model)
    return PassResult(out, changes=dict(fuser.changes), details=fuser.details, skipped=fuser.skipped)


def _where(node: gs.Node) -> str:
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} '{node.name or out}'"


class _Unit:
    """A linear layer whose output channels an affine map can be folded into."""

    def __init__(self, kind: str, node: gs.Node, weight: gs.Tensor, bias: Optional[gs.Tensor],
                 out: gs.Tensor, channels: int, axis: int, rank: Optional[int], add: Optional[gs.Node] = None):
        self.kind, self.node, self.weight, self.bias = kind, node, weight, bias
        self.out, self.channels, self.axis, self.rank, self.add = out, channels, axis, rank, add


class _Fuser:
    def __init__(self, model: onnx.ModelProto, options: BnfuseOptions):
        self.options = options
        self.changes: Counter = Counter()
        self.details: list = []
        self.skipped: list = []
        self.shapes = tensor_types(model, self.skip)
        self.graph = import_graph(model)
        self.names = NameGenerator(self.graph)
        # graph inputs with an initializer (dropped from graph.inputs by onnx-graphsurgeon) are not constants
        self.input_names = {t.name for t in self.graph.inputs} | overridable_inputs(model)
        self.private: set = set()  # ids of constants this pass created (safe to overwrite again)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")

    # ------------------------------------------------------------------------------ driver
    def run(self) -> None:
        leftover = []
        for node in list(self.graph.nodes):
            if not node.outputs or not node.inputs:
                continue  # already removed by an earlier fold
            if node.op == "BatchNormalization":
                params = self._bn_params(node)
                if isinstance(params, str):
                    self.skip(_where(node), params)
                    continue
                unit = self._unit_for(node.inputs[0], need_axis1=True)
                if isinstance(unit, _Unit):
                    reason = self._fold(unit, *params, node)
                    if reason is None:
                        self.changes[f"bn_folded_into_{unit.kind.lower()}"] += 1
                        continue
                    unit = reason
                leftover.append((node, params, unit))
            elif node.op in _AFFINE and self.options.fold_affine:
                self._try_affine(node)
        for bn, params, why in leftover:
            if not bn.outputs:
                continue
            if self.options.fold_following:
                reason = self._fold_forward(bn, *params)
                if reason is None:
                    self.changes["bn_folded_into_following_conv"] += 1
                    continue
                if reason:
                    why = f"{why}; following layer: {reason}"
            self._standalone(bn, *params, why)

    # -------------------------------------------------------------------------- BN params
    def _const(self, t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
        """The value of a constant that is not a graph input, else None."""
        if t is None or t.name in self.input_names:
            return None
        v = constant_value(t)
        return None if v is None else np.asarray(v)

    def _bn_params(self, bn: gs.Node):
        if int(bn.attrs.get("training_mode", 0)):
            return "training_mode=1 (batch statistics); left alone"
        if any(o.name and (o.outputs or is_graph_output(self.graph, o)) for o in bn.outputs[1:]):
            return "training outputs (running mean/var) are used; left alone"
        if "spatial" in bn.attrs and not int(bn.attrs["spatial"]):
            return "spatial=0 (per-activation statistics) is not supported; left alone"
        values = []
        for i, what in enumerate(("scale", "B", "mean", "var"), start=1):
            v = self._const(input_at(bn, i))
            if v is None:
                return f"{what} is not a constant (or is a graph input); left alone"
            values.append(v.astype(np.float64).reshape(-1))
        gamma, beta, mean, var = values
        if not (len(gamma) == len(beta) == len(mean) == len(var)):
            return "parameter lengths differ; left alone"
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = gamma / np.sqrt(var + eps)
        return s, beta - mean * s

    # ------------------------------------------------------------------------ unit lookup
    def _unit_for(self, t: gs.Tensor, need_axis1: bool):
        """The linear layer producing ``t`` whose channels may absorb an affine map, or a reason."""
        if t is None or len(t.inputs) != 1:
            return "input is not produced by a node"
        p = t.inputs[0]
        add = None
        if p.op == "Add" and len(p.inputs) == 2:
            # MatMul + bias Add: the Add's constant is the layer's bias.
            for xi in (0, 1):
                x, c = p.inputs[xi], p.inputs[1 - xi]
                if len(x.inputs) == 1 and x.inputs[0].op == "MatMul" and self._const(c) is not None:
                    if can_absorb(self.graph, x) is None:
                        add, p = p, x.inputs[0]
                    break
        if p.op not in _LINEAR:
            return f"producer {p.op} is not Conv/ConvTranspose/Gemm/MatMul"
        for tensor in ([p.outputs[0]] + ([add.outputs[0]] if add is not None else [])):
            reason = can_absorb(self.graph, tensor)
            if reason:
                return f"cannot fold into {_where(p)}: {reason}"
        w_index = 1
        w = input_at(p, w_index)
        if w is not None and w.name in self.input_names:
            return f"cannot fold into {_where(p)}: weight '{w.name}' is a graph input"
        wv = self._const(w)
        if wv is None:
            return f"cannot fold into {_where(p)}: weight is not a constant"
        if wv.dtype.kind != "f":
            return f"cannot fold into {_where(p)}: weight dtype {wv.dtype} is not floating point"
        bias = input_at(p, 2) if p.op in ("Conv", "ConvTranspose", "Gemm") else None
        if bias is not None and self._const(bias) is None:
            return f"cannot fold into {_where(p)}: bias is not a constant (or is a graph input)"
        if p.op == "Conv":
            return _Unit("Conv", p, w, bias, t, wv.shape[0], 1, wv.ndim)
        if p.op == "ConvTranspose":
            return _Unit("ConvTranspose", p, w, bias, t, wv.shape[1] * int(p.attrs.get("group", 1)), 1, wv.ndim)
        if p.op == "Gemm":
            if wv.ndim != 2:
                return f"cannot fold into {_where(p)}: B is not 2-D"
            n = wv.shape[0] if int(p.attrs.get("transB", 0)) else wv.shape[1]
            return _Unit("Gemm", p, w, bias, t, n, 1, 2)
        # MatMul: only X @ W with a constant 2-D W
        if p.inputs[0] is w or wv.ndim != 2:
            return f"cannot fold into {_where(p)}: weight is not a constant 2-D right operand"
        shape = self._shape(p.outputs[0])
        rank = len(shape) if shape is not None else None
        if need_axis1 and rank != 2:
            return f"cannot fold into {_where(p)}: output rank {rank} is not 2 (BN normalises axis 1, the MatMul folds the last axis)"
        bias_t = None
        if add is not None:
            bias_t = add.inputs[1] if add.inputs[0] is p.outputs[0] else add.inputs[0]
            if self._per_channel(self._const(bias_t), wv.shape[1], -1, rank) is None:
                return f"cannot fold into {_where(p)}: the Add after it is not a per-column bias"
        return _Unit("MatMul", p, w, bias_t, t, wv.shape[1], -1, rank, add)

    def _shape(self, t: gs.Tensor) -> Optional[list]:
        entry = self.shapes.get(t.name)
        return entry[1] if entry else None

    @staticmethod
    def _per_channel(c: Optional[np.ndarray], channels: int, axis: int, rank: Optional[int]) -> Optional[np.ndarray]:
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

    # ---------------------------------------------------------------------------- folding
    def _new_const(self, base: gs.Tensor, value: np.ndarray, dtype) -> gs.Constant:
        """Copy-on-write: a fresh, uniquely named constant (never overwrites a shared weight)."""
        if isinstance(base, gs.Constant) and id(base) in self.private and len(base.outputs) <= 1:
            base.values = np.ascontiguousarray(value.astype(dtype))
            return base
        const = gs.Constant(self.names(f"{base.name}_fused" if base is not None and base.name else "fused"),
                            np.ascontiguousarray(value.astype(dtype)))
        self.private.add(id(const))
        return const

    def _fold(self, unit: _Unit, s: np.ndarray, t: np.ndarray, follower: gs.Node) -> Optional[str]:
        """Fold ``y = s * unit(x) + t`` (per output channel) into ``unit``; None or a reason."""
        C = unit.channels
        if len(s) != C or len(t) != C:
            return f"{len(s)} channels vs {C} output channels of {_where(unit.node)}"
        node = unit.node
        w = np.asarray(constant_value(unit.weight))
        w64 = w.astype(np.float64)
        if unit.kind == "Conv":
            new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        elif unit.kind == "ConvTranspose":
            g = int(node.attrs.get("group", 1))
            view = w64.reshape((g, w.shape[0] // g, w.shape[1]) + w.shape[2:])
            new_w = (view * s.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
        elif unit.kind == "Gemm":
            new_w = w64 * (s[:, None] if int(node.attrs.get("transB", 0)) else s[None, :])
        else:  # MatMul
            new_w = w64 * s[None, :]
        b = None if unit.bias is None else np.asarray(constant_value(unit.bias)).astype(np.float64)
        if unit.kind == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            new_b = (beta * b if b is not None else 0.0) * s + t
            new_b = np.asarray(new_b, dtype=np.float64)
        else:
            new_b = (b if b is not None else 0.0) * s + t
        new_b = np.asarray(new_b)  # broadcasting keeps a [1, N] / [M, N] bias shape, a scalar becomes [N]
        # ---- commit (no failure past this point)
        node.inputs[1] = self._new_const(unit.weight, new_w, w.dtype)
        bias_base = unit.bias if unit.bias is not None else unit.weight
        bias_const = self._new_const(bias_base, new_b, w.dtype) if unit.bias is not None else \
            gs.Constant(self.names(f"{unit.weight.name}_bias_fused"), np.ascontiguousarray(new_b.astype(w.dtype)))
        self.private.add(id(bias_const))
        if unit.kind in ("Conv", "ConvTranspose", "Gemm"):
            if unit.kind == "Gemm":
                node.attrs["beta"] = 1.0
            if len(node.inputs) >= 3:
                node.inputs[2] = bias_const
            else:
                node.inputs.append(bias_const)
        elif unit.add is not None:
            swap_input(unit.add, unit.bias, bias_const)
        what = _where(follower)
        self._take_output(unit.add or node, follower, bias_const if unit.kind == "MatMul" and unit.add is None else None)
        self.details.append(f"{what} folded into {_where(node)}")
        return None

    def _take_output(self, layer: gs.Node, follower: gs.Node, new_bias: Optional[gs.Constant]) -> None:
        """Remove ``follower``; ``layer`` (or a new bias Add after a bare MatMul) writes its output."""
        y = follower.outputs[0]
        follower.inputs.clear()
        follower.outputs.clear()
        if new_bias is None:
            layer.outputs[0] = y
            return
        add = gs.Node("Add", self.names(f"{layer.name or y.name}_bias"), inputs=[layer.outputs[0], new_bias], outputs=[y])
        self.graph.nodes.append(add)

    def _try_affine(self, node: gs.Node) -> None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return
        sides = [(0, 1)] if node.op in ("Sub", "Div") else [(0, 1), (1, 0)]
        for xi, ci in sides:
            x, c = node.inputs[xi], node.inputs[ci]
            cv = self._const(c)
            if cv is None or len(x.inputs) != 1 or x.inputs[0].op not in _LINEAR + ("Add",):
                continue
            unit = self._unit_for(x, need_axis1=False)
            if isinstance(unit, str):
                if x.inputs[0].op in _LINEAR:
                    self.skip(_where(node), unit)
                return
            if unit.kind == "MatMul" and unit.add is None and node.op == "Add":
                # a bare MatMul + Add is the MatMul's bias; it stays (nothing to fold it into)
                return
            if cv.dtype.kind != "f":
                return
            vec = self._per_channel(cv, unit.channels, unit.axis, unit.rank)
            if vec is None:
                self.skip(_where(node), f"constant of shape {list(cv.shape)} is not per-channel for {_where(unit.node)}")
                return
            if node.op == "Mul":
                s, t = vec, np.zeros_like(vec)
            elif node.op == "Div":
                if np.any(vec == 0):
                    self.skip(_where(node), "divides by zero")
                    return
                s, t = 1.0 / vec, np.zeros_like(vec)
            elif node.op == "Add":
                s, t = np.ones_like(vec), vec
            else:
                s, t = np.ones_like(vec), -vec
            reason = self._fold(unit, s, t, node)
            if reason:
                self.skip(_where(node), reason)
            else:
                self.changes[f"{node.op.lower()}_folded_into_{unit.kind.lower()}"] += 1
            return

    # ------------------------------------------------------------------- following Conv
    def _fold_forward(self, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> Optional[str]:
        y = bn.outputs[0]
        conv = sole_consumer(self.graph, y)
        if conv is None or conv.op != "Conv" or conv.inputs[0] is not y:
            return ""  # nothing after it to fold into (not worth a reason of its own)
        w_t = input_at(conv, 1)
        wv = self._const(w_t)
        if wv is None or wv.dtype.kind != "f":
            return f"{_where(conv)} weight is not a floating-point constant (or is a graph input)"
        b_t = input_at(conv, 2)
        bv = self._const(b_t) if b_t is not None else None
        if b_t is not None and bv is None:
            return f"{_where(conv)} bias is not a constant"
        auto_pad = conv.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if any(conv.attrs.get("pads", [])) or auto_pad not in ("NOTSET", "VALID"):
            return f"{_where(conv)} pads its input; folding the BN forward would be inexact at the borders"
        g = int(conv.attrs.get("group", 1))
        cout, cin_g = wv.shape[0], wv.shape[1]
        if cin_g * g != len(s):
            return f"{_where(conv)} has {cin_g * g} input channels, BN has {len(s)}"
        k = wv.ndim - 2
        w64 = wv.astype(np.float64).reshape((g, cout // g, cin_g) + wv.shape[2:])
        s_v = s.reshape((g, 1, cin_g) + (1,) * k)
        t_v = t.reshape((g, 1, cin_g) + (1,) * k)
        new_w = (w64 * s_v).reshape(wv.shape)
        extra = (w64 * t_v).reshape(g, cout // g, -1).sum(axis=2).reshape(cout)
        new_b = (bv.astype(np.float64) if bv is not None else 0.0) + extra
        conv.inputs[1] = self._new_const(w_t, new_w, wv.dtype)
        bias_const = self._new_const(b_t if b_t is not None else w_t, np.asarray(new_b), wv.dtype)
        if len(conv.inputs) >= 3:
            conv.inputs[2] = bias_const
        else:
            conv.inputs.append(bias_const)
        x = bn.inputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.inputs[0] = x
        self.details.append(f"BatchNormalization '{bn.name or y.name}' folded into the following {_where(conv)}")
        return None

    # ----------------------------------------------------------------------- standalone
    def _standalone(self, bn: gs.Node, s: np.ndarray, t: np.ndarray, why: str) -> None:
        mode = self.options.standalone
        where = _where(bn)
        if mode == "keep":
            self.skip(where, f"not folded ({why}); kept (standalone=keep)")
            return
        x, y = bn.inputs[0], bn.outputs[0]
        shape = self._shape(x)
        entry = self.shapes.get(x.name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(entry[0]) if entry and entry[0] else np.asarray(constant_value(bn.inputs[1])).dtype
        if shape is None or len(shape) < 2:
            self.skip(where, f"not folded ({why}); input rank unknown, kept")
            return
        rank = len(shape)
        base = bn.name or y.name
        if mode == "conv" and rank == 4:
            w = gs.Constant(self.names(f"{base}_dw_weight"), s.reshape(-1, 1, 1, 1).astype(dtype))
            b = gs.Constant(self.names(f"{base}_dw_bias"), t.astype(dtype))
            bn.inputs.clear()
            bn.outputs.clear()
            conv = gs.Node("Conv", self.names(f"{base}_dwconv"), attrs={"group": int(len(s)), "kernel_shape": [1, 1]},
                           inputs=[x, w, b], outputs=[y])
            self.graph.nodes.append(conv)
            self.changes["bn_to_depthwise_conv"] += 1
            self.details.append(f"{where} -> depthwise 1x1 Conv ({why})")
            return
        note = "" if mode == "muladd" else f"; input is {rank}-D, not 4-D, so Mul+Add instead of a Conv"
        cshape = (-1,) + (1,) * (rank - 2)
        sc = gs.Constant(self.names(f"{base}_scale"), s.reshape(cshape).astype(dtype))
        tc = gs.Constant(self.names(f"{base}_shift"), t.reshape(cshape).astype(dtype))
        mid = gs.Variable(self.names(f"{base}_scaled"), dtype=dtype)
        bn.inputs.clear()
        bn.outputs.clear()
        self.graph.nodes.append(gs.Node("Mul", self.names(f"{base}_mul"), inputs=[x, sc], outputs=[mid]))
        self.graph.nodes.append(gs.Node("Add", self.names(f"{base}_add"), inputs=[mid, tc], outputs=[y]))
        self.changes["bn_to_mul_add"] += 1
        self.details.append(f"{where} -> Mul+Add ({why}{note})")
