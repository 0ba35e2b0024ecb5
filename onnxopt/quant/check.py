"""Rule checker for QDQ models: does this model load and quantize the way its target expects?

:func:`check_model` lists every violation (never stops at the first). Rules:

All targets
  * scales and zero points of Q/DQ are constants; scales finite and > 0; scale scalar or 1-D, a
    1-D scale's length equal to the quantized axis's size;
  * a Q's output is read only by DQs with the same scale, zero point and axis (mismatched pairs);
  * per-channel weight DQs use the layer's output-channel axis (Conv 0, ConvTranspose 1, Gemm 0
    with transB=1 else 1, MatMul last); a bias DQ uses axis 0;
  * per-axis Q/DQ needs opset >= 13.
tensorrt (onnx-tensorrt parser): every zero point 0 and int8 (uint8 rejected); no per-axis
  activation quantization; no int32 DQ; no QOperator ops (QLinearConv, ConvInteger, ...).
ort: a Conv/Gemm whose inputs are DQs must take an int32 bias DQ with scale s_in*s_w, or
  onnxruntime will not fuse it. Weight zero points may be non-zero (``weight_symmetric=false``):
  onnxruntime fuses per-channel asymmetric int8 weights into QLinearConv / QGemm / QLinearMatMul.
tidl: opset <= 18 (validated releases), static input shapes, uint8 activations, int8 weights,
  int32 bias DQ with scale s_in*s_w and zero point 0, per-tensor activations, plus the operator
  constraints of edgeai-tidl-tools (:func:`_tidl_ops`).
tidl-tda4vm: all of tidl, plus power-of-two scales, zero points 0, per-tensor weights.

Two kinds of violation: ``format`` (the Q/DQ encoding is wrong: the target refuses or misreads
the model) and ``op-support`` (a node the target's accelerator lacks; in TIDL's OSRT flow such
nodes run on ARM through ONNX Runtime: the model deploys and runs, those nodes are slower). So
:func:`failing` fails a model on its encoding, and on op support only when asked (``strict``: a
flow that needs every node on the accelerator, e.g. TIDL-RT's standalone import).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from ..errors import OptionError
from ..ir.proto import const_tensors, input_uses, node_attr, producers

TARGETS = ("tensorrt", "ort", "tidl", "tidl-tda4vm")
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm"}


@dataclass
class Violation:
    rule: str
    node: str
    message: str
    kind: str = "format"   # "format": the QDQ encoding is wrong; "op-support": an op the target lacks (runs elsewhere)
    op: str = ""           # the node's op type ("" for model-level rules)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


class _Model:
    """Lookups built once: constants, producers, consumers, attributes."""

    def __init__(self, model: ModelProto):
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.tensors = const_tensors(model)  # initializers and Constant values, with their element types
        self.producer = producers(g)
        self.consumers = input_uses(g)  # tensor -> [(node, input index)]
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name for i in g.input if i.name not in self.inits}
        self.opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._cache: dict = {}

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of an initializer or Constant node (None for anything else, "" included)."""
        if name and name not in self._cache:
            value = None
            if name in self.inits:
                value = numpy_helper.to_array(self.inits[name])
            elif name in self.const_nodes:
                for a in self.const_nodes[name].attribute:
                    if a.name == "value":
                        value = numpy_helper.to_array(a.t)
                    elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                        value = np.asarray(helper.get_attribute_value(a))
            self._cache[name] = value
        return self._cache.get(name)

    def elem_type(self, name: str) -> Optional[int]:
        t = self.tensors.get(name)
        return None if t is None else t.data_type

    def shape_of(self, name: str):
        """Static shape of a constant, or of a DQ/Identity output of a constant."""
        p = self.producer.get(name)
        if p is not None and p.op_type in ("DequantizeLinear", "Identity") and p.input:
            name = p.input[0]
        v = self.const(name)
        return None if v is None else list(v.shape)


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _name(node) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _is_pow2(x: np.ndarray) -> bool:
    mantissa, _ = np.frexp(np.asarray(x, np.float64))
    return bool(np.all(mantissa == 0.5))


def _expected_weight_axis(consumer, index: int, rank: int) -> Optional[int]:
    op = consumer.op_type
    if index == 1 and op == "Gemm":
        return 0 if int(attrs(consumer).get("transB", 0)) else 1
    if index == 1:
        return {"Conv": 0, "ConvTranspose": 1, "MatMul": rank - 1}.get(op)
    if index == 2 and op in ("Conv", "ConvTranspose", "Gemm"):
        return 0
    return None


@dataclass
class _QdqFacts:
    """What the target rules read of one QuantizeLinear/DequantizeLinear."""
    node: onnx.NodeProto
    scale_name: str
    zp_name: str
    scale: np.ndarray
    zp: Optional[np.ndarray]
    zp_type: Optional[int]
    per_axis: bool
    axis: int
    data_is_const: bool
    data_type: Optional[int]

    @property
    def is_bias(self) -> bool:
        return self.data_is_const and self.data_type == onnx.TensorProto.INT32

    @property
    def is_weight(self) -> bool:
        return self.data_is_const and not self.is_bias


def _qdq_facts(m: _Model, node: onnx.NodeProto, v) -> Optional[_QdqFacts]:
    """The scale, zero point and data of a Q/DQ node, checked for what every target needs; None
    when its scale is not a constant (nothing else can be checked)."""
    op, a = node.op_type, attrs(node)
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""
    scale = m.const(scale_name)
    if scale is None:
        v("constant-scale", node, f"scale '{scale_name}' is not a constant")
        return None
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        v("scale-positive", node, f"scale '{scale_name}' has values <= 0 or non-finite (values {np.asarray(scale).reshape(-1)[:4].tolist()})")
    if scale.ndim > 1:
        v("scale-shape", node, f"scale '{scale_name}' has rank {scale.ndim}; only per-tensor and per-axis are handled (block quantization not checked)")
    per_axis = scale.ndim == 1 and scale.size > 1
    zp = zp_type = None
    if zp_name:
        zp, zp_type = m.const(zp_name), m.elem_type(zp_name)
        if zp is None:
            v("constant-zero-point", node, f"zero point '{zp_name}' is not a constant")
        elif zp.shape != scale.shape:
            v("zero-point-shape", node, f"zero point shape {list(zp.shape)} differs from scale shape {list(scale.shape)}")
    elif op == "DequantizeLinear":
        zp_type = m.elem_type(node.input[0])
    if per_axis and m.opset < 13:
        v("opset", node, f"per-axis quantization needs opset >= 13 (model has {m.opset})")
    data_is_const = op == "DequantizeLinear" and m.const(node.input[0]) is not None
    data_type = m.elem_type(node.input[0]) if data_is_const else None
    if op == "QuantizeLinear" and zp_name == "" and "output_dtype" not in a:
        zp_type = onnx.TensorProto.UINT8
    return _QdqFacts(node, scale_name, zp_name, scale, zp, zp_type, per_axis, int(a.get("axis", 1)), data_is_const, data_type)


def _target_types(f: _QdqFacts, target: str, v) -> None:
    """Zero points and types per target."""
    node, tidl, tda4vm, trt = f.node, target.startswith("tidl"), target == "tidl-tda4vm", target == "tensorrt"
    if f.zp is not None and (trt or tda4vm) and np.any(f.zp != 0):
        v("zero-point-zero", node, f"zero point '{f.zp_name}' is not all zeros ({target} needs symmetric quantization)")
    if trt:
        if f.zp_type == onnx.TensorProto.UINT8 or f.data_type == onnx.TensorProto.UINT8:
            v("trt-uint8", node, "uint8 quantization: TensorRT accepts only int8 (also int4/fp8) zero points and data")
        if f.is_bias:
            v("trt-int32", node, "int32 DequantizeLinear (quantized bias): TensorRT takes a float bias")
        if f.per_axis and not f.data_is_const:
            v("trt-per-axis-activation", node, "per-axis quantization of an activation; TensorRT only takes per-axis weights")
    if not tidl:
        return
    if f.per_axis and not f.data_is_const:
        v("tidl-per-axis-activation", node, "per-axis activation quantization; TIDL supports only the default axis per-tensor")
    if f.is_weight and f.data_type != onnx.TensorProto.INT8:
        v("tidl-weight-type", node, f"weights are {onnx.TensorProto.DataType.Name(f.data_type)}; TIDL expects int8")
    if not f.data_is_const and node.op_type == "QuantizeLinear" and not tda4vm and f.zp_type not in (None, onnx.TensorProto.UINT8):
        v("tidl-activation-type", node, "activation quantized to a signed type; TIDL expects uint8 activations")
    if tda4vm:
        scale = f.scale
        if not _is_pow2(scale[np.isfinite(scale) & (scale > 0)] if scale.size else scale):
            v("tda4vm-power-of-two", node, f"scale '{f.scale_name}' is not a power of two (TDA4VM needs power-of-two scales)")
        if f.is_weight and f.per_axis:
            v("tda4vm-per-tensor", node, "per-channel weights; TDA4VM supports per-tensor weights only")


def _constant_axis(m: _Model, f: _QdqFacts, v) -> None:
    """The axis of a per-axis quantized constant: its length, and the output channels of its readers."""
    node, axis = f.node, f.axis
    shape = m.shape_of(node.input[0]) or []
    ax = axis + len(shape) if axis < 0 else axis
    if ax >= len(shape) or shape[ax] != f.scale.size:
        v("per-axis-length", node, f"scale length {f.scale.size} does not match dimension {axis} of the quantized tensor {shape}")
    for consumer, idx in m.consumers.get(node.output[0], []):
        want = _expected_weight_axis(consumer, idx, len(shape))
        if want is not None and ax != want:
            v("per-channel-axis", node, f"per-channel axis {axis} for input {idx} of {consumer.op_type} '{_name(consumer)}'; "
                                        f"expected axis {want} (output channels)")


def _q_pairing(m: _Model, f: _QdqFacts, v) -> None:
    """A QuantizeLinear is read only by DequantizeLinears with its scale, zero point and axis."""
    node, scale, zp = f.node, f.scale, f.zp
    readers = m.consumers.get(node.output[0], [])
    if not readers and node.output[0] not in m.graph_outputs:
        v("dangling-q", node, "QuantizeLinear output is not read")
    for reader, _ in readers:
        if reader.op_type != "DequantizeLinear":
            v("q-without-dq", node, f"QuantizeLinear output is read by {reader.op_type} '{_name(reader)}', not a DequantizeLinear")
            continue
        rs = m.const(reader.input[1]) if len(reader.input) > 1 else None
        rz = m.const(reader.input[2]) if len(reader.input) > 2 and reader.input[2] else None
        ra = int(attrs(reader).get("axis", 1))
        same_scale = rs is not None and rs.shape == scale.shape and np.array_equal(rs, scale)
        same_zp = (rz is None and zp is None) or (rz is not None and zp is not None and rz.shape == zp.shape
                                                 and np.array_equal(rz, zp) and rz.dtype == zp.dtype)
        if not same_scale or not same_zp or (f.per_axis and ra != f.axis):
            v("mismatched-pair", node, f"Q/DQ pair with '{_name(reader)}' uses different scale/zero point/axis")


def _bias_rules(model: ModelProto, m: _Model, target: str, v) -> None:
    """ort and tidl: a Conv/Gemm with DQ inputs takes an int32 bias DQ with scale s_in * s_w, zero point 0."""
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        px, pw = m.producer.get(node.input[0]), m.producer.get(node.input[1])
        if any(getattr(p, "op_type", None) != "DequantizeLinear" for p in (px, pw)):
            continue
        pb = m.producer.get(node.input[2])
        if pb is None or pb.op_type != "DequantizeLinear" or m.elem_type(pb.input[0]) != onnx.TensorProto.INT32:
            v("int32-bias", node, f"{node.op_type} with DQ inputs has a float bias; {target} needs an int32 bias DQ with scale s_in*s_w")
            continue
        s_in, s_w, s_b = m.const(px.input[1]), m.const(pw.input[1]), m.const(pb.input[1])
        zb = m.const(pb.input[2]) if len(pb.input) > 2 and pb.input[2] else None
        if s_in is None or s_w is None or s_b is None:
            continue
        want = (np.asarray(s_in, np.float64) * np.asarray(s_w, np.float64)).reshape(-1)
        got = np.asarray(s_b, np.float64).reshape(-1)
        if want.size == 1 and got.size > 1:
            want = np.full_like(got, want[0])
        if want.shape != got.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
            v("bias-scale", node, "int32 bias scale differs from s_in * s_w")
        if zb is not None and np.any(zb != 0):
            v("bias-zero-point", node, "int32 bias zero point is not 0")


def _tidl_model_level(model: ModelProto, m: _Model, v) -> None:
    if m.opset > 18:
        v("opset", "model", f"opset {m.opset}: TIDL is validated up to opset 18 (onnxopt writes 17 for tidl)")
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in m.inits and any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims):
            v("static-shapes", vi.name, "input has dynamic dimensions; TIDL needs static shapes")


def check_model(model: ModelProto, target: str) -> list:
    """Every violation of ``target``'s rules in ``model`` (empty list = clean)."""
    if target not in TARGETS:
        raise OptionError(f"unknown target '{target}'.", f"valid targets: {', '.join(TARGETS)}")
    m = _Model(model)
    out: list = []

    def v(rule, node, msg, kind="format"):
        out.append(Violation(rule, _name(node) if not isinstance(node, str) else node, msg, kind,
                             "" if isinstance(node, str) else node.op_type))

    tidl = target.startswith("tidl")
    if tidl:
        _tidl_model_level(model, m, v)
    for node in model.graph.node:
        op = node.op_type
        if target == "tensorrt" and op in QOPERATOR_OPS:
            v("trt-qoperator", node, f"{op} is a QOperator-format op TensorRT does not support (use QDQ)")
        if op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        facts = _qdq_facts(m, node, v)
        if facts is None:
            continue
        _target_types(facts, target, v)
        if facts.data_is_const and facts.per_axis:
            _constant_axis(m, facts, v)
        if op == "QuantizeLinear":
            _q_pairing(m, facts, v)
    if target == "ort" or tidl:
        _bias_rules(model, m, target, v)
    if tidl:
        _tidl_ops(model, m, lambda rule, node, msg: v(rule, node, msg, "op-support"))
    return out


def _tidl_ops(model: ModelProto, m: _Model, v) -> None:
    """Operator constraints of edgeai-tidl-tools (docs/supported_ops_rts_versions.md)."""
    for node in model.graph.node:
        op, a = node.op_type, attrs(node)
        if op in ("Conv", "ConvTranspose"):
            wshape = m.shape_of(node.input[1]) if len(node.input) > 1 else None
            kernel = list(a.get("kernel_shape", wshape[2:] if wshape else []))
            strides = list(a.get("strides", [1] * len(kernel)))
            group = int(a.get("group", 1))
            if op == "Conv":
                if len(strides) == 2 and strides[0] != strides[1]:
                    v("tidl-conv-stride", node, f"strides {strides}: TIDL needs equal H and W strides")
                if kernel and max(kernel) > 7 and max(strides) == 2:
                    v("tidl-conv-kernel", node, f"kernel {kernel} with stride 2: kernels > 7 with stride 2 are not supported")
                if max(strides or [1]) == 4 and kernel != [11, 11]:
                    v("tidl-conv-stride", node, "stride 4 is only supported with an 11x11 kernel")
                if wshape and group > 1 and wshape[1] == 1 and group == wshape[0] and len(kernel) == 2:
                    ok = {((3, 3), 1), ((3, 3), 2), ((5, 5), 2), ((7, 7), 1), ((7, 7), 2)}
                    if (tuple(kernel), strides[0]) not in ok:
                        v("tidl-depthwise", node, f"depthwise {kernel[0]}x{kernel[1]} stride {strides[0]}: TIDL supports depthwise only for "
                                                 "3x3s1, 3x3s2, 5x5s2, 7x7s1, 7x7s2 (runs on ARM otherwise)")
            elif group != 1 or kernel not in ([4, 4], [2, 2]) or strides != [2, 2]:
                v("tidl-convtranspose", node, f"ConvTranspose kernel {kernel} stride {strides} group {group}: "
                                             "only 4x4 and 2x2 kernels with 2x2 stride and group 1 are supported")
        elif op in ("MaxPool", "AveragePool"):
            kernel = list(a.get("kernel_shape", []))
            strides = list(a.get("strides", [1] * len(kernel)))
            if kernel not in ([3, 3], [2, 2], [1, 1]) or any(s not in (1, 2) for s in strides):
                v("tidl-pool", node, f"{op} kernel {kernel} stride {strides}: validated only for 3x3, 2x2, 1x1 kernels with stride 1 or 2")
            if any(d != 1 for d in a.get("dilations", [1])):
                v("tidl-pool", node, "pooling dilation must be 1")
        elif op == "Resize":
            mode = node_attr(node, "mode", "nearest")
            if mode not in ("nearest", "linear"):
                v("tidl-resize", node, f"Resize mode '{mode}': only nearest and linear are supported")
            if len(node.input) > 3 and node.input[3]:
                v("tidl-resize", node, "Resize with a sizes input: give scales instead (convert_resize_params_size_to_scale)")
            scales = m.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scales is not None and scales.size >= 2:
                hw = np.asarray(scales, np.float64).reshape(-1)[-2:]
                if hw[0] != hw[1] or hw[0] < 1 or not _is_pow2(hw):
                    v("tidl-resize", node, f"Resize scales {hw.tolist()}: H and W scales must be equal powers of two >= 1")
        elif op == "Concat":
            axis = int(a.get("axis", 0))
            if axis not in (-3, -2, -1, 1, 2, 3):
                v("tidl-concat", node, f"Concat axis {axis}: only channel/height/width axes are supported")
        elif op == "Softmax" and int(a.get("axis", -1)) not in (-1, -2, 2, 3):
            v("tidl-softmax", node, "Softmax supported only over width/height")
        elif op == "Gemm":
            if int(a.get("transA", 0)) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                v("tidl-gemm", node, "Gemm needs transA=0, alpha=1, beta=1")
        elif op == "Reshape" and len(node.input) > 1 and m.const(node.input[1]) is None:
            v("tidl-reshape", node, "Reshape with a computed shape: TIDL needs a constant shape")
        elif op == "Slice":
            steps = m.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if steps is not None and np.any(np.asarray(steps) != 1):
                v("tidl-slice", node, "Slice with non-unit steps is not supported")
        elif op == "ReduceMean":
            v("tidl-reducemean", node, "ReduceMean is not supported alone (convert_reducemean_to_matmul / GlobalAveragePool)")
        elif op == "Cast" and not (set(node.input) & m.graph_inputs or set(node.output) & m.graph_outputs):
            v("tidl-cast", node, "Cast is supported only at graph boundaries")
        elif op in ("Dropout", "Identity"):
            v("tidl-unsupported", node, f"{op} is not supported alone; run the cleanup pass")
        elif op == "BatchNormalization" and int(a.get("training_mode", 0)):
            v("tidl-batchnorm", node, "BatchNormalization training_mode=1 is not supported")
        elif op == "Clip":
            lo = m.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = m.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if (lo is not None and float(lo) > 0) or (hi is not None and float(hi) <= 0):
                v("tidl-clip", node, "Clip needs min <= 0 and max > 0")


# Where a target runs the nodes its accelerator lacks (op-support violations), in its usual flow.
FALLBACK = {"tidl": "on ARM through ONNX Runtime", "tidl-tda4vm": "on ARM through ONNX Runtime"}


def failing(violations: list, strict: bool = False) -> list:
    """The violations that fail the check: every encoding ("format") violation, and the op-support
    ones only when ``strict`` (their nodes otherwise run on the target's fallback, module doc)."""
    return [v for v in violations if strict or v.kind == "format"]


def fallback_summary(violations: list, target: str) -> Optional[dict]:
    """``{"nodes": n, "where": ..., "op_types": {op: count}}`` for the nodes with an op-support
    violation (each node once, however many rules it breaks), or None when there are none."""
    nodes: dict = {}
    for v in violations:
        if v.kind != "format":
            nodes.setdefault(v.node, v.op or "?")
    if not nodes:
        return None
    return {"nodes": len(nodes), "where": FALLBACK.get(target, "outside the accelerator"),
            "op_types": dict(Counter(nodes.values()).most_common())}


def describe_fallback(summary: dict) -> str:
    """One line: how many nodes run where, by op type."""
    ops = ", ".join(f"{op} x{n}" for op, n in summary["op_types"].items())
    return f"{summary['nodes']} node(s) run {summary['where']}, not on the accelerator: {ops}"
