"""``equalize``: cross-layer equalization (CLE) and high-bias absorption, exact in float.

CLE (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction";
AIMET's ``cross_layer_equalization``): when the output of a producer layer ``L1`` (Conv of any
group, Gemm) reaches its consumer layers ``L2`` only through ops that are *positively homogeneous
per channel* (``f(y / s) = f(y) / s`` for every per-channel ``s > 0``), the network is unchanged by::

    L2(f(W1 x + b1)) = (W2 S) f((S^-1 W1) x + S^-1 b1)        S = diag(s), s_i > 0

``s_i = sqrt(r1_i / r2_i)`` (``r``: the channel's weight range, max |w|, on each side) makes both
ranges ``sqrt(r1_i r2_i)``, which is what per-tensor weight quantization needs. Pairs share layers
(conv -> depthwise -> conv), hence the sweeps. A squeeze-excite gate (Mul by an unscaled tensor)
passes: its ``GAP -> fc1`` branch starts at the scaled tensor and fc1 absorbs the scale. ReLU6 is
not homogeneous, but ``relu6(y) / s = min(relu(y / s), 6 / s)`` with a per-channel bound
(``clip=split``), which fuses less well (TensorRT / onnxruntime fuse Conv+Clip, not Conv+Relu+Min).

High-bias absorption (``absorb_bias=data``, Nagel et al. §4.1): where ``y -> Relu -> L2`` and a
channel's pre-activation never falls below ``c_i >= 0``, ``relu(y_i) = relu(y_i - c_i) + c_i``, so
``c_i`` moves out of ``b1`` into ``L2``'s bias (``b2 += W2 c``), shrinking the quantized range.
``c_i`` is the per-channel minimum over the user's data less a safety margin: exact on inputs whose
pre-activations stay above it (the pass manager verifies it on that data). BN statistics (the
paper's data-free form) are gone in the BN-folded models this pass runs on. ``L2`` must have no
padding (the absorbed constant would be wrong at zero-padded borders).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.errors import DataError, OptionError
from onnxopt.ir.graph import NameGenerator, constant_value, export_graph, import_graph, input_at, is_graph_output, is_weight, set_input
from onnxopt.ir.proto import infer_shapes
from onnxopt.model_io import drop_activation_bounds, opset_of
from onnxopt.registry import PassOptions, PassResult, option, register_pass
from onnxopt.rewrite.patterns import rank as tensor_rank

# Ops through which a per-channel positive scale passes unchanged (channel axis stays 1).
_HOMOGENEOUS = {"Relu", "LeakyRelu", "Identity", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceSum"}
_SCALE_LIMIT = 1e6  # never scale a channel by more than this (dead/degenerate channels)


@dataclass
class _Pair:
    producer: gs.Node
    absorbers: list = field(default_factory=list)   # (node, kind) kind in {"conv", "gemm"}
    clips: list = field(default_factory=list)       # Clip nodes to split (clip=split)
    channels: int = 0
    relu_only: Optional[gs.Node] = None             # the Relu when y -> Relu -> absorbers only
    total_scale: Optional[np.ndarray] = None
    scaled: list = field(default_factory=list)      # names of the tensors the pair rescales


def _clip_bounds(node: gs.Node, opset: int):
    """(lo, hi) of a Clip as floats (None = unbounded), or a reason string when not constant."""
    if opset < 11:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    inputs = [input_at(node, 1), input_at(node, 2)]
    values = [constant_value(t) for t in inputs]
    if any(t is not None and (v is None or np.asarray(v).size != 1) for t, v in zip(inputs, values)):
        return f"Clip '{node.name}' has non-constant bounds"
    return tuple(default if t is None else float(np.asarray(v).reshape(()))
                 for t, v, default in zip(inputs, values, (-np.inf, np.inf)))


def _reduce_reason(node: gs.Node, t: gs.Tensor, where: str) -> Optional[str]:
    """A reduction over spatial axes only keeps the per-channel scale."""
    rank = tensor_rank(t)
    axes = node.attrs["axes"] if "axes" in node.attrs else constant_value(input_at(node, 1))
    if axes is None or rank is None:
        return f"{where}: axes or rank unknown"
    axes = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
    return f"{where} reduces over the batch/channel axis" if axes & {0, 1} else None


def _reshape_reason(node: gs.Node, t: gs.Tensor, channels: int, where: str) -> Optional[str]:
    """Flatten/Reshape keeps the channel axis only from [N, C, 1..] to [N, C]."""
    shape_in, shape_out = getattr(t, "shape", None), getattr(node.outputs[0], "shape", None)
    if shape_in is None or shape_out is None or len(shape_out) != 2 or len(shape_in) < 2:
        return f"{where}: shapes unknown or not [N, C, 1..] -> [N, C]"
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
        return f"{where}: axis != 1"
    if any(d != 1 for d in shape_in[2:]) or shape_out[1] != channels or shape_in[1] != channels:
        return f"{where}: does not map [N, C, 1..] to [N, C]"
    return None


def _mul_reason(node: gs.Node, t: gs.Tensor, idx: list, where: str) -> Optional[str]:
    """Mul/Div by a tensor that cannot move the channel axis by broadcasting (checked later: not
    scaled by the same pair)."""
    if node.op == "Div" and idx != [0]:
        return f"{where} divides by the scaled tensor"
    if len(idx) != 1:
        return f"{where} multiplies the scaled tensor by itself"
    r_t, r_o = tensor_rank(t), tensor_rank(node.inputs[1 - idx[0]])  # the other operand's rank
    if r_t is None or r_o is None or r_o > r_t:
        return f"{where}: broadcasting could move the channel axis (ranks unknown or larger)"
    return None


def _gemm_b_is_in_out(node: gs.Node) -> bool:
    """A Gemm's B laid out [in, out] (transB=0)."""
    return node.op == "Gemm" and not int(node.attrs.get("transB", 0))


def _by_group(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """A weight [out, in/group, ...] viewed as [group, out/group, in/group, k] (Gemm: group 1)."""
    g = int(node.attrs.get("group", 1))
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


class _Equalizer:
    def __init__(self, graph: gs.Graph, opset: int, clip_mode: str):
        self.g, self.opset, self.clip_mode = graph, opset, clip_mode
        self.weights: dict = {}   # id(node) -> [node, W (float64), b (float64 or None)]

    # ------------------------------------------------------------------- layer params
    def _params(self, node: gs.Node):
        """[node, W, b] in float64, W laid out [out, in, ...] (a Gemm's B transposed when transB=0),
        so that a Gemm is scaled as a 1x1 Conv; :func:`_write_params` restores the layout."""
        key = id(node)
        if key not in self.weights:
            w = np.array(constant_value(input_at(node, 1)), dtype=np.float64)
            b = constant_value(input_at(node, 2))
            w = w.T if _gemm_b_is_in_out(node) else w
            self.weights[key] = [node, w, None if b is None else np.array(b, dtype=np.float64)]
        return self.weights[key]

    def _layer_reason(self, node: gs.Node) -> Optional[str]:
        """None when ``node`` is a Conv/Gemm whose weight (and bias) are float constants."""
        where = f"{node.op} '{node.name}'"
        w_t = input_at(node, 1)
        if w_t is None or not is_weight(self.g, w_t):
            return f"{where}: weight is not a constant"
        w = constant_value(w_t)
        if np.asarray(w).dtype.kind != "f":
            return f"{where}: weight is not float"
        b_t = input_at(node, 2)
        if b_t is not None and not is_weight(self.g, b_t):
            return f"{where}: bias is not a constant"
        if node.op not in ("Conv", "Gemm"):
            return f"{where}: not a Conv/Gemm"
        if node.op == "Conv":
            return f"{where}: weight rank < 3" if np.asarray(w).ndim < 3 else None
        if int(node.attrs.get("transA", 0)) != 0 or np.asarray(w).ndim != 2:
            return f"{where}: transA=1 or non-2D B"
        n_out = self._channels(node)[1]
        if b_t is not None and np.asarray(constant_value(b_t)).shape not in ((), (1,), (n_out,), (1, n_out)):
            return f"{where}: bias C is not per output feature"
        return None

    def _channels(self, node: gs.Node) -> tuple:
        """(input, output) channels of a Conv/Gemm."""
        w = constant_value(input_at(node, 1))
        if node.op == "Conv":
            return int(w.shape[1]) * int(node.attrs.get("group", 1)), int(w.shape[0])
        c_in, c_out = w.shape if _gemm_b_is_in_out(node) else w.shape[::-1]
        return int(c_in), int(c_out)

    # --------------------------------------------------------------------- traversal
    def find_pair(self, producer: gs.Node):
        """The pair starting at ``producer``, or a reason string why its output cannot be scaled."""
        reason = self._layer_reason(producer)
        if reason:
            return reason
        y = producer.outputs[0]
        pair = _Pair(producer, channels=self._channels(producer)[1])
        scaled, queue, muls = {id(y): y}, [y], []
        while queue:
            t = queue.pop()
            if is_graph_output(self.g, t):
                return f"'{t.name}' (scaled by {producer.op} '{producer.name}') is a graph output"
            if not t.outputs:
                return f"'{t.name}' has no consumer"
            for node in t.outputs:
                idx = [i for i, inp in enumerate(node.inputs) if inp is t]
                r = self._step(node, t, idx, pair, muls)
                if isinstance(r, str):
                    return r
                for out in r:
                    if id(out) not in scaled:
                        scaled[id(out)] = out
                        queue.append(out)
        for node, t in muls:
            others = [inp for inp in node.inputs if inp is not t]
            if any(id(o) in scaled for o in others) or len(others) != 1:
                return f"{node.op} '{node.name}' multiplies two tensors scaled by the same pair"
        pair.scaled = [t.name for t in scaled.values()]
        if not pair.absorbers:
            return f"no Conv/Gemm absorbs the output of {producer.op} '{producer.name}'"
        # y -> Relu -> absorbers only (high-bias absorption candidates)
        if len(y.outputs) == 1 and not is_graph_output(self.g, y) and y.outputs[0].op == "Relu":
            relu = y.outputs[0]
            if all(c.op in ("Conv", "Gemm") for c in relu.outputs[0].outputs) and len(pair.absorbers) == len(relu.outputs[0].outputs):
                pair.relu_only = relu
        return pair

    def _step(self, node: gs.Node, t: gs.Tensor, idx: list, pair: _Pair, muls: list):
        """Outputs of ``node`` that become scaled when its input ``t`` is, [] when it absorbs, or a reason."""
        op = node.op
        where = f"{op} '{node.name}'"
        if node.domain not in ("", "ai.onnx", None):
            return f"{where} (custom domain) consumes a scaled tensor"
        if op in ("Conv", "Gemm"):
            return self._absorb_reason(node, t, idx, pair, where) or []
        if len(node.outputs) != 1 and not (op in ("MaxPool", "Dropout") and all(not o.outputs for o in node.outputs[1:])):
            return f"{where} has several used outputs"
        if op in _HOMOGENEOUS:
            reason = f"{where}: unexpected input" if op == "LeakyRelu" and idx != [0] else None
        elif op == "Clip":
            reason = self._clip_reason(node, idx, pair, where)
        elif op in _REDUCE:
            reason = _reduce_reason(node, t, where)
        elif op == "Pad":
            reason = self._pad_reason(node, where)
        elif op in ("Flatten", "Reshape"):
            reason = _reshape_reason(node, t, pair.channels, where)
        elif op in ("Mul", "Div"):
            reason = _mul_reason(node, t, idx, where)
            if reason is None:
                muls.append((node, t))
        else:
            reason = f"{where} consumes a scaled tensor and is not positively homogeneous per channel"
        return reason or [node.outputs[0]]

    def _absorb_reason(self, node: gs.Node, t: gs.Tensor, idx: list, pair: _Pair, where: str) -> Optional[str]:
        """Why the Conv/Gemm ``node`` cannot absorb the scale on its input; None: it is the pair's absorber now."""
        op = node.op
        if idx != [0]:
            return f"{where} takes the scaled tensor '{t.name}' as a weight/bias"
        reason = self._layer_reason(node)
        if reason:
            return reason
        n_in = self._channels(node)[0]
        if n_in != pair.channels:
            return f"{where}: {n_in} input channels, producer has {pair.channels}"
        if op == "Conv" and tensor_rank(t) is not None and tensor_rank(t) < 3:
            return f"{where}: input rank < 3"
        if op == "Gemm" and tensor_rank(t) not in (2, None):
            return f"{where}: input is not 2-D"
        if node is pair.producer or any(a is node for a, _ in pair.absorbers):
            return f"{where} reached twice"
        pair.absorbers.append((node, op.lower()))
        return None

    def _clip_reason(self, node: gs.Node, idx: list, pair: _Pair, where: str) -> Optional[str]:
        """Clip(0, inf) passes a positive scale; Clip(0, hi) only with per-channel bounds (clip=split)."""
        if idx != [0]:
            return f"{where} takes the scaled tensor as a bound"
        bounds = _clip_bounds(node, self.opset)
        if isinstance(bounds, str):
            return bounds
        lo, hi = bounds
        if lo == 0.0 and np.isinf(hi):
            return None
        if lo == 0.0 and np.isfinite(hi) and hi > 0 and self.clip_mode == "split":
            if tensor_rank(node.outputs[0]) is None:
                return f"{where}: unknown rank (needed for the per-channel bound)"
            pair.clips.append(node)
            return None
        if lo == 0.0 and np.isfinite(hi):
            return f"{where} is Clip(0, {hi:g}) (ReLU6): scaling is exact only with per-channel bounds (clip=split)"
        return f"{where} is Clip({lo:g}, {hi:g}): not positively homogeneous"

    def _pad_reason(self, node: gs.Node, where: str) -> Optional[str]:
        """A constant zero Pad of the spatial axes keeps the per-channel scale."""
        if node.attrs.get("mode", "constant") != "constant":
            return f"{where}: mode is not constant"
        if self.opset >= 11:
            pads = constant_value(input_at(node, 1))
            value = constant_value(input_at(node, 2)) if input_at(node, 2) is not None else 0.0
            if input_at(node, 3) is not None:
                return f"{where}: Pad with axes"
        else:
            pads = node.attrs.get("pads")
            value = node.attrs.get("value", 0.0)
        if pads is None or value is None or float(np.asarray(value).reshape(-1)[0] if np.asarray(value).size else 0.0) != 0.0:
            return f"{where}: non-constant or non-zero padding"
        pads = np.asarray(pads).reshape(-1)
        r = len(pads) // 2
        if r < 2 or pads[0] or pads[1] or pads[r] or pads[r + 1]:
            return f"{where} pads the batch/channel axis"
        return None

    # --------------------------------------------------------------------- scaling
    def equalize(self, pair: _Pair) -> float:
        """One CLE step on ``pair``; returns max |log s| (0 when already balanced)."""
        producer = self._params(pair.producer)
        absorbers = [self._params(a) for a, _ in pair.absorbers]
        w1 = producer[1]
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)  # range of each output channel
        r2 = np.max([np.abs(_by_group(node, w)).max(axis=(1, 3)).reshape(-1) for node, w, _ in absorbers], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(r1 / r2)
        s = np.where(np.isfinite(s) & (r1 > 0) & (r2 > 0), s, 1.0)
        s = np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)
        producer[1] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
        b = producer[2]
        if b is not None:
            b = np.broadcast_to(b, (len(s),)) if b.size == 1 else b
            producer[2] = (b.reshape(-1) / s).reshape(b.shape if b.size == len(s) else (len(s),))
        for entry in absorbers:
            w2 = _by_group(entry[0], entry[1])
            entry[1] = (w2 * s.reshape(w2.shape[0], 1, w2.shape[2], 1)).reshape(entry[1].shape)
        pair.total_scale = s if pair.total_scale is None else pair.total_scale * s
        return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def _write_params(graph: gs.Graph, eq: _Equalizer, names: NameGenerator) -> None:
    """New constants for every touched layer (never overwrite a weight another node may share)."""
    for node, w, b in eq.weights.values():
        w = w.T if _gemm_b_is_in_out(node) else w
        for i, value in ((1, w), (2, b)):
            if value is not None:
                old = input_at(node, i)
                node.inputs[i] = gs.Constant(names(f"{old.name}_eq"), value.astype(constant_value(old).dtype))


def _split_clip(graph: gs.Graph, clip: gs.Node, bound: np.ndarray, names: NameGenerator, opset: int) -> None:
    """Clip(0, hi) -> Relu then Min(., bound) with a per-channel bound of shape [C, 1, ..]."""
    rank = tensor_rank(clip.outputs[0])
    dtype = constant_value(input_at(clip, 2)).dtype if opset >= 11 else np.float32
    const = gs.Constant(names(f"{clip.name or 'clip'}_bound"), bound.astype(dtype).reshape((-1,) + (1,) * (rank - 2)))
    mid = gs.Variable(names(f"{clip.outputs[0].name}_relu"), dtype=clip.outputs[0].dtype, shape=clip.outputs[0].shape)
    relu = gs.Node("Relu", names(f"{clip.name or 'clip'}_relu"), inputs=[clip.inputs[0]], outputs=[mid])
    out = clip.outputs[0]
    clip.outputs.clear()
    clip.inputs.clear()
    graph.nodes.extend([relu, gs.Node("Min", names(f"{relu.name}_min"), inputs=[mid, const], outputs=[out])])


def _pre_activation_minimum(model: onnx.ModelProto, tensors: list, data) -> dict:
    """Per-channel minimum (axis 1) of ``tensors`` over every batch of ``data``."""
    sess = runtime.session(runtime.with_outputs(model, tensors))
    mins: dict = {}
    for feed in data():
        for name, v in runtime.run(sess, feed, tensors).items():
            v = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).min(axis=1).astype(np.float64)
            mins[name] = v if name not in mins else np.minimum(mins[name], v)
    return mins


def _absorb_bias(graph: gs.Graph, pairs: list, model: onnx.ModelProto, data, margin: float, names: NameGenerator,
                 details: list, skipped: list) -> int:
    cands = []
    for pair in pairs:
        if pair.relu_only is None:
            continue
        bad = [a for a, _ in pair.absorbers if a.op == "Conv" and (any(int(p) for p in a.attrs.get("pads", [])) or a.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"))]
        if bad:
            skipped.append(f"absorb_bias {pair.producer.name}: consumer '{bad[0].name}' pads its input (the absorbed constant would be wrong at the borders)")
            continue
        cands.append(pair)
    if not cands:
        return 0
    mins = _pre_activation_minimum(model, [p.producer.outputs[0].name for p in cands], data)
    done = 0
    for pair in cands:
        m = mins[pair.producer.outputs[0].name]
        c = np.maximum(0.0, m - margin * np.abs(m))
        if not np.any(c > 0):
            continue
        prod = pair.producer
        b_t = input_at(prod, 2)
        if b_t is None:
            continue  # no bias to move (cannot be absorbed from a bias-free layer)
        b = np.asarray(constant_value(b_t), dtype=np.float64)
        b_new = np.broadcast_to(b.reshape(-1), c.shape) - c if b.size in (1, c.size) else None
        if b_new is None:
            continue
        prod.inputs[2] = gs.Constant(names(f"{b_t.name}_hba"), b_new.astype(np.float32).reshape(b.shape if b.size == c.size else (-1,)))
        for a, kind in pair.absorbers:
            w = np.asarray(constant_value(input_at(a, 1)), dtype=np.float64)
            if kind == "conv":
                wr = _by_group(a, w)
                delta = np.einsum("gokx,gk->go", wr, c.reshape(wr.shape[0], wr.shape[2])).reshape(-1)
            else:
                delta = float(a.attrs.get("alpha", 1.0)) * (w @ c if int(a.attrs.get("transB", 0)) else c @ w)
                if input_at(a, 2) is not None:
                    delta = delta / float(a.attrs.get("beta", 1.0))
                else:
                    a.attrs["beta"] = 1.0
            old = input_at(a, 2)
            base = np.zeros_like(delta) if old is None else np.asarray(constant_value(old), dtype=np.float64)
            new = np.broadcast_to(base.reshape(-1), delta.shape) + delta
            shape = base.shape if base.size == delta.size else delta.shape
            dtype = np.float32 if old is None else np.asarray(constant_value(old)).dtype
            const = gs.Constant(names(f"{old.name if old is not None else a.name}_hba"), new.reshape(shape).astype(dtype))
            set_input(a, 2, const)
        details.append({"absorbed_bias": prod.outputs[0].name, "channels": int(np.sum(c > 0)), "max_c": float(c.max())})
        done += 1
    return done


@dataclass
class EqualizeOptions(PassOptions):
    """The equalize pass's options."""

    iterations: int = option(50, "maximum sweeps over all pairs (conv->depthwise->conv chains need several)")
    tolerance: float = option(0.0001, "stop when every per-channel scale of a sweep is within this of 1 (in log)")
    clip: str = option("skip", "ReLU6/Clip(0,hi) between layers: skip the pair, or split it into Relu + per-channel Min (exact)", ("skip", "split"))
    absorb_bias: str = option("none", "high-bias absorption through Relu: none, or data (needs --data; exact on inputs whose "
                              "pre-activations stay above the observed per-channel minimum)", ("none", "data"))
    absorb_margin: float = option(0.0, "absorb_bias=data: absorb only min - margin*|min| of each channel (safety margin)")

    def validate(self, model, ctx) -> None:
        if self.iterations < 1:
            raise OptionError("equalize.iterations must be at least 1.", "e.g. --set equalize.iterations=50")
        if self.absorb_bias == "data" and ctx.data is None:
            raise DataError("equalize.absorb_bias=data needs data to measure pre-activation minima.",
                            "give --data (the calibration images), or use equalize.absorb_bias=none")


@register_pass("equalize", "Cross-layer equalization of Conv/Gemm pairs (depthwise included) and optional high-bias absorption.", exact=True, options=EqualizeOptions)
def equalize_pass(model: onnx.ModelProto, options: EqualizeOptions, ctx) -> PassResult:
    """Cross-layer equalization (Nagel et al. 2019): per-channel rescaling of consecutive layers
    through positively homogeneous ops, exact in float; see the module docstring for the math."""
    options.validate(model, ctx)
    opset = opset_of(model)
    graph = import_graph(infer_shapes(model)[0])  # only for ranks: without shapes fewer pairs qualify
    eq = _Equalizer(graph, opset, options.clip)
    pairs, skipped = [], []
    for node in list(graph.nodes):
        if node.op not in ("Conv", "Gemm") or len(node.outputs) != 1:
            continue
        r = eq.find_pair(node)
        if not isinstance(r, str):
            pairs.append(r)
        elif eq._layer_reason(node) is None:  # a real candidate producer: say why not
            skipped.append(f"{node.op} '{node.name}' -> {r}")
    sweeps, last = 0, 0.0
    for sweeps in range(1, options.iterations + 1):
        last = max((eq.equalize(p) for p in pairs), default=0.0)
        if last <= options.tolerance:
            break
    details, clip_bounds = [], {}
    for p in pairs:
        s = p.total_scale
        details.append({"producer": p.producer.outputs[0].name, "consumers": [a.outputs[0].name for a, _ in p.absorbers],
                        "channels": p.channels, "scale_min": float(s.min()), "scale_max": float(s.max()),
                        "clips_split": [c.outputs[0].name for c in p.clips]})
        for clip in p.clips:
            _, hi = _clip_bounds(clip, opset)
            entry = clip_bounds.setdefault(id(clip), [clip, np.full(p.channels, hi, dtype=np.float64)])
            entry[1] = entry[1] / s
    names = NameGenerator(graph)
    _write_params(graph, eq, names)
    for clip, bound in clip_bounds.values():
        _split_clip(graph, clip, bound, names, opset)
    out = export_graph(graph, like=model)
    out.graph.ClearField("value_info")  # inferred shapes were only needed for ranks
    absorbed = 0
    if options.absorb_bias == "data" and pairs:
        graph2 = import_graph(infer_shapes(out)[0])
        eq2 = _Equalizer(graph2, opset, "skip")
        pairs2 = [r for n in list(graph2.nodes) if n.op in ("Conv", "Gemm") and len(n.outputs) == 1
                  for r in [eq2.find_pair(n)] if not isinstance(r, str)]
        names2 = NameGenerator(graph2)
        absorbed = _absorb_bias(graph2, pairs2, out, ctx.data, options.absorb_margin, names2, details, skipped)
        if absorbed:
            out = export_graph(graph2, like=model)
            out.graph.ClearField("value_info")
    # a clip bound lite recorded on a rescaled tensor no longer holds (it became per-channel)
    dropped = drop_activation_bounds(out, (t for p in pairs for t in p.scaled))
    if dropped:
        skipped.append(f"{len(dropped)} recorded clip bound(s) dropped (their tensors were rescaled), e.g. '{dropped[0]}': "
                       "qdq calibrates them unbounded")
    return PassResult(out, changes={"pairs_equalized": len(pairs), "clips_split": len(clip_bounds), "biases_absorbed": absorbed},
                      details=details, skipped=skipped, extra={"sweeps": sweeps, "last_max_log_scale": last,
                                                               "clip_bounds_dropped": dropped})
