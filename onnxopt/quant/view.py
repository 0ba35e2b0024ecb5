"""The Q/DQ view of a quantized model and the integer ranges: the leaf of the quant package.

Everything that reads a quantized model back (sensitivity, the recovery steps, the torch converter)
works through this module: integer ranges, per-channel reshaping, :class:`QdqView` (float /
partly-quantized variants of a QDQ model, derived from the qdq pass's ``info`` without
recalibrating) and :func:`quantized_ops`. It imports no other module of ``onnxopt.quant``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Iterable, Optional, Union

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from .. import model_io, runtime, task_metric
from ..errors import OnnxoptError
from ..ir.graph import drop_graph_inputs
from ..ir.proto import const_tensors

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# (qmin, qmax) of each integer tensor type a Q/DQ pair or a quantized initializer can store
INT_RANGE_OF_TYPE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
                     TensorProto.UINT16: (0, 65535), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
                     TensorProto.INT32: (INT32_MIN, INT32_MAX)}


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple:
    """(qmin, qmax) of a ``bits``-bit integer; ``narrow`` drops the most negative value (symmetric)."""
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow else -qmax - 1), qmax
    return 0, 2 ** bits - 1


def channel_rows(a: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """``a`` as [C, -1] with the channels of ``axis`` as rows (per tensor, ``axis`` None: [1, -1])."""
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def weight_range(bits: int, symmetric: bool = True) -> tuple:
    """(qmin, qmax) of ``bits``-bit weights: [-q, q] symmetric (the restricted range TensorRT
    uses), all ``2^bits`` levels asymmetric."""
    return int_range(bits, signed=True, narrow=symmetric)


def along_axis(a: np.ndarray, ndim: int, axis: Optional[int]) -> np.ndarray:
    """A per-channel vector ``a`` (a quantization scale or zero point) shaped to broadcast along
    ``axis`` of a rank-``ndim`` tensor; a per-tensor one (one element, or no axis) as it is."""
    if axis is None or a.size == 1:
        return a.reshape(()) if a.size == 1 else a
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def with_clip_bounds(model: ModelProto, bounds: dict) -> ModelProto:
    """``model`` with a Clip put back on each tensor of ``bounds`` ({tensor: (lo, hi)}, the clips
    ``lite`` removed: :data:`onnxopt.model_io.ACTIVATION_BOUNDS_KEY`), ``model`` itself when empty:
    calibrated on this, a ReLU6 -> ReLU tensor gets a range ending at 6, so the Q/DQ model clips
    where the original did. The tensor keeps its name; the old producer writes ``<name>_unbounded``."""
    present = {o for n in model.graph.node for o in n.output}
    bounds = {t: b for t, b in bounds.items() if t in present}
    if not bounds:
        return model
    out = ModelProto()
    out.CopyFrom(model)
    out.graph.ClearField("node")
    taken = present | {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    elem = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    opset = model_io.opset_of(model)
    for src in model.graph.node:   # each Clip right after its producer: the order stays topological
        node = out.graph.node.add()
        node.CopyFrom(src)
        for i, t in enumerate(src.output):
            if t not in bounds:
                continue
            raw = t + "_unbounded"
            while raw in taken:
                raw += "_"
            taken.add(raw)
            node.output[i] = raw
            lo, hi = bounds[t]
            if opset >= 11:
                dtype = np.float16 if elem.get(t) == TensorProto.FLOAT16 else np.float32
                out.graph.initializer.extend([numpy_helper.from_array(np.asarray(lo, dtype), raw + "_min"),
                                              numpy_helper.from_array(np.asarray(hi, dtype), raw + "_max")])
                clip = helper.make_node("Clip", [raw, raw + "_min", raw + "_max"], [t], name=raw + "_Clip")
            else:
                clip = helper.make_node("Clip", [raw], [t], name=raw + "_Clip", min=float(lo), max=float(hi))
            out.graph.node.append(clip)
    return out


def fast_session(model: ModelProto):
    """An onnxruntime session with every graph optimization off, as the verification oracle: even
    the basic level changes the numbers of a graph with activation Q/DQ pairs. Speed comes from
    folding the weight DQ nodes ourselves (``QdqView.variant(fold_weights=True)``)."""
    return runtime.session(model, optimize=False)


def rel_error(ref: list, cand: list) -> float:
    """||cand - ref|| / ||ref|| over lists of output arrays."""
    num = sum(float(np.sum((c.astype(np.float64) - r.astype(np.float64)) ** 2)) for r, c in zip(ref, cand))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return math.sqrt(num / max(den, 1e-30))


def _known_fields(cls, d: dict) -> dict:
    """The entries of report dict ``d`` that are fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in known}


@dataclass
class LayerQuant:
    """One quantized weighted layer (Conv/ConvTranspose/Gemm/MatMul) as the qdq pass wrote it: the
    names of the tensors that hold its quantization. ``to_dict`` is its entry in the pass report
    (``extra["info"]["layers"]``), ``of`` reads such an entry back."""
    # the layer: its node name and op type
    node: str
    op: str
    # its weight: the integer initializer, the scale and zero point of its DequantizeLinear, the
    # per-channel axis (None: per tensor) and the integer range the stored values keep to
    weight_q: str
    weight_scale: str
    weight_zero_point: str
    axis: Optional[int]
    qmin: int
    qmax: int
    # its bias: the float bias tensor (None: no bias); bias_is_int: replaced by an int32
    # initializer bias_q with scale bias_scale (s_in * s_w)
    bias: Optional[str]
    bias_is_int: bool
    bias_scale: Optional[str]
    # its links: the DequantizeLinear output it reads (None: its input is not quantized) and
    # the float weight it was quantized from (the name in the float model)
    input_dq: Optional[str]
    float_weight: str
    bias_q: Optional[str] = None

    def to_dict(self) -> dict:
        """The report entry: every field, ``bias_q`` only for an int32 bias."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bias_q" or self.bias_is_int}

    @classmethod
    def of(cls, layer: Union["LayerQuant", dict]) -> "LayerQuant":
        """``layer`` itself, or the one a report entry describes."""
        return layer if isinstance(layer, cls) else cls(**_known_fields(cls, layer))


@dataclass
class QuantInfo:
    """What the qdq pass quantized and how (:func:`onnxopt.quant.quantize.quantize_model`); the
    view reads the model back through it. ``to_dict`` is the pass report's ``extra["info"]``,
    ``of`` reads such a report back (fields it lacks keep their defaults)."""
    # the format: target, bits (weight_bits_by_layer: the layers whose weight bits differ) and
    # the arithmetic choices
    target: str = ""
    activation_bits: int = 8
    weight_bits: int = 8
    weight_bits_by_layer: dict = field(default_factory=dict)
    symmetric: bool = True
    weight_symmetric: bool = True
    power_of_two: bool = False
    # what was quantized: the weighted layers, the activation Q/DQ pairs (one dict each: tensor,
    # scale, zero_point, q_node, dq_node, group, values, axis, dtype, range), the nodes kept in
    # float and the number of scale groups
    layers: list = field(default_factory=list)
    activations: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    groups: int = 0
    # how it was prepared and calibrated: notes, what placement skipped, the tensors clipped to
    # the bounds lite removed, the calibration cache ({path, state}), the calibration report,
    # the tensors with per-channel activation ranges
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    clip_bounds: list = field(default_factory=list)
    calib_cache: Optional[dict] = None
    calibration: dict = field(default_factory=dict)
    per_channel_activations: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "layers": [l.to_dict() for l in self.layers]}

    @classmethod
    def of(cls, info: Union["QuantInfo", dict]) -> "QuantInfo":
        """``info`` itself, or the one a report's ``info`` describes."""
        if isinstance(info, cls):
            return info
        return cls(**{**_known_fields(cls, info), "layers": [LayerQuant.of(l) for l in info.get("layers", [])]})


def sqnr_db(rel: float) -> float:
    return float("inf") if rel <= 0 else -20.0 * math.log10(rel)


class QdqView:
    """The quantized model plus what is needed to derive per-layer variants of it."""

    def __init__(self, float_model: ModelProto, qmodel: ModelProto, info: Union[QuantInfo, dict]):
        self.qmodel = qmodel
        self.info = info = QuantInfo.of(info)
        self.layers = {l.node: l for l in info.layers}
        self.acts = {a["dq_node"]: a for a in info.activations}
        self.nodes = {n.name: n for n in qmodel.graph.node}
        missing = [n for n in self.layers if n not in self.nodes]
        if missing:
            raise OnnxoptError(f"the quantization info names layer '{missing[0]}', which is not in the quantized model.",
                               "pass the info returned together with this quantized model")
        self.dq_output_to_act = {n.output[0]: self.acts[n.name] for n in qmodel.graph.node
                                 if n.op_type == "DequantizeLinear" and n.name in self.acts}
        self.q_consts = const_tensors(qmodel)
        self._deq_cache = {}   # weight DQ output -> its folded float initializer (_fold_weight_dq)
        # the clips lite removed and qdq calibrated with (quantize.with_clip_bounds): every variant,
        # the float reference included, has them, so that it computes what the Q/DQ model approximates
        capped = set(info.clip_bounds)
        self.clip_bounds = {t: b for t, b in model_io.activation_bounds(qmodel).items() if t in capped}
        f_consts = const_tensors(float_model) if float_model is not None else {}
        # The float layer of each quantized one: the float model's node reading the float weight
        # (its bias is the float bias, which recovery may since have corrected in the QDQ model).
        f_layer = {}
        for n in float_model.graph.node if float_model is not None else ():
            if len(n.input) > 1 and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                f_layer.setdefault(n.input[1], n)
        self.float_weight = {}
        self.float_bias = {}  # layer -> float bias array, or None when the float layer has none
        for name, l in self.layers.items():
            t = f_consts.get(l.float_weight)
            self.float_weight[name] = numpy_helper.to_array(t) if t is not None else self.dequantized_weight(name)
            fnode = f_layer.get(l.float_weight)
            if fnode is not None and fnode.op_type == l.op:
                b = fnode.input[2] if len(fnode.input) > 2 else ""
                if not b or b in f_consts:   # no bias, or a constant one (a computed bias is left as it is)
                    self.float_bias[name] = numpy_helper.to_array(f_consts[b]) if b else None
            elif l.bias_is_int:
                self.float_bias[name] = self.dequantized_int_bias(name)

    # ------------------------------------------------------------------ arrays
    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.q_consts[name])

    def dequantized_weight(self, layer: str) -> np.ndarray:
        l = self.layers[layer]
        wq = self.array(l.weight_q).astype(np.float64)
        s = along_axis(self.array(l.weight_scale).astype(np.float64), wq.ndim, l.axis)
        zp = along_axis(self.array(l.weight_zero_point).astype(np.float64), wq.ndim, l.axis)
        return ((wq - zp) * s).astype(np.float32)

    def dequantized_int_bias(self, layer: str) -> np.ndarray:
        l = self.layers[layer]
        return (self.array(l.bias_q).astype(np.float64) * self.array(l.bias_scale).astype(np.float64)).astype(np.float32)

    def layer_input(self, layer: str) -> tuple:
        """(float tensor, tensor the quantized layer reads) of ``layer``'s data input."""
        x = self.nodes[layer].input[0]
        act = self.dq_output_to_act.get(x)
        return (act["tensor"] if act else x), x

    def input_quantizer(self, layer: str):
        """``x -> DQ(Q(x))`` with the scale/zero point of ``layer``'s input activation (None when unquantized)."""
        act = self.dq_output_to_act.get(self.nodes[layer].input[0])
        if act is None:
            return None
        s_arr, zp_arr = self.array(act["scale"]), self.array(act["zero_point"])
        axis = act.get("axis")
        bits = int(self.info.activation_bits)
        # below 8 bits, the restricted range (the quantizer clips before Q)
        lo, hi = map(float, int_range(bits, zp_arr.dtype != np.uint8, narrow=True) if bits < 8
                     else (np.iinfo(zp_arr.dtype).min, np.iinfo(zp_arr.dtype).max))

        def fq(x):
            # round half to even, as QuantizeLinear does; a per-channel quantizer along its axis
            s = along_axis(s_arr.astype(np.float64), x.ndim, axis)
            zp = along_axis(zp_arr.astype(np.float64), x.ndim, axis)
            return ((np.clip(np.rint(x / s) + zp, lo, hi) - zp) * s).astype(np.float32)

        return fq

    # ---------------------------------------------------------------- variants
    def variant(self, float_layers: Iterable[str] = (), float_inputs: Iterable[str] = (), bypass_all: bool = False,
                keep_acts_of: Optional[set] = None, fold_weights: bool = False, float_acts: Iterable[str] = (),
                keep_acts: Iterable[str] = ()) -> ModelProto:
        """A copy of the quantized model with ``float_layers`` given float weights/biases and
        ``float_inputs`` (layer names) reading their float input. ``bypass_all`` removes every
        activation Q/DQ except those feeding layers in ``keep_acts_of``. ``fold_weights`` replaces
        weight DQ nodes by their float output (same values; for fast evaluation only)."""
        m = ModelProto()
        m.CopyFrom(self.qmodel)
        g = m.graph
        # in the order given, not a set's: a set of strings iterates in a per-process order, and the
        # initializers appended below would make the same model differ in bytes from run to run
        float_layers, float_inputs = list(dict.fromkeys(float_layers)), list(dict.fromkeys(float_inputs))
        by_name = {n.name: n for n in g.node}
        new_inits = []
        for name in float_layers:
            node = by_name[name]
            node.input[1] = f"{name}__float_weight"
            new_inits.append(numpy_helper.from_array(self.float_weight[name], node.input[1]))
            if name in self.float_bias:   # the float bias, or none where the float layer has none
                del node.input[2:]
                if self.float_bias[name] is not None:
                    node.input.append(f"{name}__float_bias")
                    new_inits.append(numpy_helper.from_array(self.float_bias[name], node.input[-1]))
        # A layer's input Q/DQ may also feed nodes that are not layers (the residual Add beside the
        # next block's conv): with the layer in float they read the float tensor too, or the pair
        # would stay in the graph with no fallback unit to remove it. (``bypass_all`` names what it
        # keeps itself.)
        shared_dq = set() if bypass_all else {read for real, read in map(self.layer_input, float_inputs) if read != real}
        for name in float_inputs:   # the float tensor its input DQ dequantizes, where it has one
            by_name[name].input[0] = self.layer_input(name)[0]
        if bypass_all:
            keep = {dq for dq, a in self.dq_output_to_act.items() if a["tensor"] in set(keep_acts)}
            keep |= {by_name[name].input[0] for name in keep_acts_of or ()}
            rewire = {dq: a["tensor"] for dq, a in self.dq_output_to_act.items() if dq not in keep}
        else:
            # activation Q/DQ pairs put back in float by their tensor (``float_acts``): every reader
            # of the DQ output reads the float tensor instead (no layer needed)
            float_acts = set(float_acts)
            rewire = {dq: a["tensor"] for dq, a in self.dq_output_to_act.items() if a["tensor"] in float_acts}
        # (a graph output that is a DQ output is left as it is: rare, kept quantized)
        for node in g.node:
            if bypass_all and node.op_type == "QuantizeLinear":
                continue
            for i, inp in enumerate(node.input):
                if inp in rewire:
                    node.input[i] = rewire[inp]
                elif inp in shared_dq and node.name not in self.layers:   # quantized sibling layers keep theirs
                    node.input[i] = self.dq_output_to_act[inp]["tensor"]
        g.initializer.extend(new_inits)
        if fold_weights:
            self._fold_weight_dq(m)
        prune_unused(m)
        return with_clip_bounds(m, self.clip_bounds)

    def _fold_weight_dq(self, m: ModelProto) -> None:
        """Replace every weight DequantizeLinear by a float initializer of its (identical) output,
        so that evaluating many variants does not dequantize every weight on every run."""
        weight_q = {l.weight_q: name for name, l in self.layers.items()}
        keep, inits = [], []
        for node in m.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in weight_q:
                out = node.output[0]
                if out not in self._deq_cache:
                    # float32 (q - zp) * s, the arithmetic DequantizeLinear itself does
                    l = self.layers[weight_q[node.input[0]]]
                    q = self.array(l.weight_q).astype(np.int32)
                    s_ = along_axis(self.array(l.weight_scale).astype(np.float32), q.ndim, l.axis)
                    zp = along_axis(self.array(l.weight_zero_point).astype(np.int32), q.ndim, l.axis)
                    self._deq_cache[out] = numpy_helper.from_array(((q - zp).astype(np.float32) * s_).astype(np.float32), out)
                inits.append(self._deq_cache[out])
            else:
                keep.append(node)
        _replace(m.graph.node, keep)
        m.graph.initializer.extend(inits)

    def float_reference(self) -> ModelProto:
        return self.variant(float_layers=self.layers, float_inputs=self.layers, bypass_all=True)

    def only_layer(self, layer: str, fold_weights: bool = True) -> ModelProto:
        others = [n for n in self.layers if n != layer]
        return self.variant(float_layers=others, float_inputs=others, bypass_all=True, keep_acts_of={layer}, fold_weights=fold_weights)

    def activation_only_units(self) -> list:
        """Tensors whose activation Q/DQ feeds no quantized layer's data input (residual Adds, SE
        Muls, pooling ...): their error is in none of the layers' ``only`` variants."""
        layer_inputs = {self.nodes[l].input[0] for l in self.layers}
        return [a["tensor"] for dq, a in self.dq_output_to_act.items() if dq not in layer_inputs]

    def only_activation(self, tensor: str, fold_weights: bool = True) -> ModelProto:
        """Only the activation Q/DQ of ``tensor`` quantized; every layer and other activation in float."""
        return self.variant(float_layers=self.layers, float_inputs=self.layers, bypass_all=True, keep_acts=[tensor],
                            fold_weights=fold_weights)

    def all_but_layer(self, layer: str, fold_weights: bool = True) -> ModelProto:
        return self.variant(float_layers=[layer], float_inputs=[layer], fold_weights=fold_weights)


def prune_unused(model: ModelProto) -> None:
    """Drop nodes and initializers nothing reads (bypassed Q/DQ pairs, replaced weights)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(model_io.subgraph_reads(node))  # an If/Loop body may read outer tensors
    _replace(g.node, keep[::-1])
    dropped = {t.name for t in g.initializer if t.name not in needed}
    _replace(g.initializer, [t for t in g.initializer if t.name in needed])
    # IR < 4 lists every initializer as a graph input too: a dropped one would be left as an input
    # with no value, which onnxruntime then requires ("Required inputs ... are missing")
    drop_graph_inputs(model, dropped)


def _replace(field, items: list) -> None:
    """Set the repeated proto ``field`` to ``items``, a subset of it in order (untouched when it is all of it)."""
    if len(items) != len(field):
        del field[:]
        field.extend(items)


class Evaluator:
    """Runs model variants on fixed feeds and compares their outputs with the float reference."""

    def __init__(self, reference: ModelProto, feeds: list):
        self.feeds = feeds
        self.ref = self.outputs(reference)

    def outputs(self, model: ModelProto) -> list:
        # a detector's selected boxes (after NonMaxSuppression) differ in number between the two
        # models: the boxes and scores before the selection are compared instead
        comparable, names = task_metric.comparable_outputs(model)
        sess = fast_session(comparable)
        runs = (runtime.run(sess, feed, names) for feed in self.feeds)
        return [r[n] for r in runs for n in names]

    def error(self, model: ModelProto) -> float:
        return rel_error(self.ref, self.outputs(model))


def truncated(model: ModelProto, outputs) -> ModelProto:
    """``model`` with ``outputs`` as its only outputs and only the nodes they need (each wave
    runs the model just up to its layers' inputs)."""
    m = runtime.with_outputs(model, outputs)
    _replace(m.graph.output, [o for o in m.graph.output if o.name in set(outputs)])
    prune_unused(m)
    return m


def layer_depths(model: ModelProto, layers) -> dict:
    """Longest chain of quantized layers ending at each layer (0 = no quantized layer upstream)."""
    layers = set(layers)
    depth_of_tensor, depths = {}, {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        d = max((depth_of_tensor.get(i, 0) for i in node.input if i), default=0)
        if node.name in layers:
            depths[node.name] = d
            d += 1
        for o in node.output:
            depth_of_tensor[o] = d
    return depths


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "MatMulNBits"}


def quantized_ops(model: ModelProto) -> dict:
    """{op type: count} of the quantization ops already in the main graph (Q/DQ pairs, integer or
    QLinear kernels): quantizing such a model again would stack a second quantization on the first."""
    return dict(Counter(n.op_type for n in model.graph.node
                        if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")))


def already_quantized_message(found: dict) -> str:
    listed = ", ".join(f"{c} {op}" for op, c in sorted(found.items()))
    return f"the model is already quantized ({listed}); quantizing it again would stack a second quantization"
