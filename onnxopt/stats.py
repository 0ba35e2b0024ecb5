"""Model statistics: op histogram, parameter count, MACs (total and per layer), size. A layer whose
shapes are unknown is listed with ``macs=None`` so nobody mistakes it for free."""
from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto

from .errors import OnnxoptError
from .ir.proto import const_tensors, infer_shapes
from .runtime import intermediate_shapes


def op_histogram(model: ModelProto) -> dict:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def param_count(model: ModelProto) -> int:
    """Number of elements in float weights (initializers and Constant nodes), excluding scalars."""
    total = 0
    for t in const_tensors(model).values():
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                           onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and n > 1:
            total += n
    return total


def static_shapes(model: ModelProto, needed=None) -> dict:
    """Tensor shapes per sample (a symbolic axis 0 of an input counts as 1): ONNX shape inference,
    then one onnxruntime run for the ``needed`` tensors (default: every node output) it leaves
    unknown at dynamic shape chains. A model that cannot run keeps its unknown shapes (None)."""
    probe = ModelProto()
    probe.CopyFrom(model)
    for inp in probe.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred, _ = infer_shapes(probe, data_prop=True)  # a convenience: unknown shapes are filled below
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    for name, t in const_tensors(model).items():
        shapes[name] = list(t.dims)
    if needed is None:
        needed = (o for n in model.graph.node if n.op_type != "Constant" for o in n.output)
    missing = [t for t in needed if t and _prod(shapes.get(t)) is None]
    if missing:
        try:
            shapes.update(intermediate_shapes(probe, missing))
        except OnnxoptError:  # a model onnxruntime cannot load or run keeps its unknown shapes (macs=None)
            pass
    return shapes


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
RECURRENT_OPS = ("GRU", "LSTM", "RNN")


def _prod(dims) -> Optional[int]:
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims)) if dims else 1


def _times(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else a * b


def layer_macs(model: ModelProto) -> list:
    """Per-layer MACs: [{"name", "op", "output", "macs"}] for Conv/ConvTranspose/Gemm/MatMul(+Integer)
    and GRU/LSTM/RNN nodes."""
    needed = [t for n in model.graph.node if n.op_type in _COUNTED + RECURRENT_OPS
              for t in list(n.input[:3 if n.op_type in RECURRENT_OPS else 2]) + [n.output[0]] if t]
    shapes = static_shapes(model, needed)  # the shapes around the costly layers only
    rows = []
    for i, node in enumerate(model.graph.node):
        op = node.op_type
        if op in RECURRENT_OPS:
            rows.append({"name": node.name or f"{op}_{i}", "op": op, "output": node.output[0] if node.output else "",
                         "macs": _recurrent_macs(node, shapes)})
            continue
        if op not in _COUNTED:
            continue
        w_index = 3 if op.startswith("QLinear") else 1
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
        macs = None
        if out is not None and w is not None:
            if op in ("Conv", "ConvInteger", "QLinearConv"):
                # each output element needs Cin/group * prod(kernel) MACs; w is [Cout, Cin/g, k...]
                macs = _times(_prod(out), _prod(w[1:]))
            elif op == "ConvTranspose":
                # every input element scatters Cout/g * k MACs
                macs = _times(_prod(shapes.get(node.input[0])), _prod(w[1:]))
            elif op == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                macs = _times(_prod(out), w[1] if trans_b else w[0])
            else:  # MatMul family: out [..., M, N], K from A's last dim
                a = shapes.get(node.input[0])
                macs = _times(_prod(out), a[-1] if a else None)
        rows.append({"name": node.name or f"{op}_{i}", "op": op, "output": node.output[0], "macs": macs})
    return rows


def _recurrent_macs(node, shapes: dict) -> Optional[int]:
    """A GRU/LSTM/RNN's MACs: every time step of every sequence multiplies the step's input by W
    ([directions, gates * hidden, input]) and the hidden state by R ([directions, gates * hidden,
    hidden]); X is [seq, batch, input] or [batch, seq, input], either way seq * batch = X's size
    over its last axis. The gates' elementwise products are not counted, as for Conv's activation."""
    x = shapes.get(node.input[0])
    steps = _prod(x) // x[-1] if x and x[-1] and _prod(x) is not None else None
    w, r = (_prod(shapes.get(node.input[i])) if len(node.input) > i else None for i in (1, 2))
    return None if steps is None or w is None or r is None else steps * (w + r)


INTEGER_LAYERS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


def quantization(model: ModelProto, layers: list) -> Optional[dict]:
    """What a quantized model holds, for ``onnxopt info``: of the weighted layers (rows of
    :func:`layer_macs` whose weight is a constant, directly or through a DequantizeLinear; not a
    MatMul of two activations), those that read an integer weight, their share of the MACs and
    weight types, and the activation Q/DQ pairs (a QuantizeLinear of a computed tensor). A
    mixed-precision model (qdq's fallback) shows here what stayed in float. None for a model with
    no QuantizeLinear / DequantizeLinear / integer kernel."""
    nodes = model.graph.node
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") + INTEGER_LAYERS for n in nodes):
        return None
    consts = const_tensors(model)
    dq_of_const = {n.output[0]: consts[n.input[0]] for n in nodes
                   if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    by_output = {n.output[0]: n for n in nodes if n.output}
    weighted, quantized, types = [], [], collections.Counter()
    for r in layers:
        node = by_output.get(r["output"])
        w_index = 3 if r["op"].startswith("QLinear") else 1
        if node is None or len(node.input) <= w_index:
            continue
        w = node.input[w_index]
        stored = dq_of_const[w] if w in dq_of_const else consts.get(w)
        if stored is None:   # a product of two computed tensors (attention): no weight to quantize
            continue
        weighted.append(r)
        if (w in dq_of_const and r["op"] not in RECURRENT_OPS) or r["op"] in INTEGER_LAYERS:   # (no target quantizes GRU/LSTM)
            quantized.append(r)
            types[onnx.helper.tensor_dtype_to_np_dtype(stored.data_type).name] += 1
    total = sum(r["macs"] or 0 for r in weighted)
    known = total and all(r["macs"] is not None for r in weighted)   # a share of unknown MACs would mislead
    return {"weighted_layers": len(weighted), "quantized_layers": len(quantized),
            "quantized_mac_share": round(sum(r["macs"] or 0 for r in quantized) / total, 4) if known else None,
            "weight_types": dict(sorted(types.items())),
            "activation_qdq": sum(1 for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] not in consts),
            "dynamic_quantizers": sum(1 for n in nodes if n.op_type == "DynamicQuantizeLinear")}


def total_macs(model: ModelProto) -> int:
    return mac_totals(layer_macs(model))["macs"]


def mac_totals(layers: list) -> dict:
    """``macs`` (the sum over :func:`layer_macs` rows) and ``macs_unknown_layers`` (rows not counted)."""
    return {"macs": int(sum(r["macs"] or 0 for r in layers)),
            "macs_unknown_layers": sum(1 for r in layers if r["macs"] is None)}


def summarize(model: ModelProto, per_layer: bool = False) -> dict:
    """A JSON-able summary used by reports and ``onnxopt info``."""
    layers = layer_macs(model)
    summary = {"nodes": len(model.graph.node), "ops": op_histogram(model), "params": param_count(model),
               **mac_totals(layers), "size_bytes": model.ByteSize()}
    if per_layer:
        summary["layers"] = layers
    return summary
