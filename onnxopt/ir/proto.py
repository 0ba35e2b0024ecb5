"""The protobuf side of the graph-editing layer: producer/consumer indexes and the one way onnxopt
runs shape inference, never fatal here: each caller says what it does without shapes."""
from __future__ import annotations

from typing import Callable, Optional

import onnx
from onnx import GraphProto, ModelProto

from ..model_io import MAX_PROTO_BYTES


def producers(graph: GraphProto) -> dict:
    """{tensor name: the node writing it} of ``graph``'s own nodes (subgraphs not entered)."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: GraphProto) -> dict:
    """{tensor name: [nodes reading it, in graph order]} (a node reading a tensor twice is listed once)."""
    readers: dict = {}
    for n in graph.node:
        for i in dict.fromkeys(n.input):
            if i:
                readers.setdefault(i, []).append(n)
    return readers


def input_uses(graph: GraphProto) -> dict:
    """{tensor name: [(node, input index) for every input slot reading it]}, in graph order."""
    uses: dict = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name:
                uses.setdefault(name, []).append((n, i))
    return uses


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (strings decoded), or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def produced(graph: GraphProto) -> set:
    """Names of the tensors ``graph``'s nodes write."""
    return {o for n in graph.node for o in n.output if o}


def const_tensors(model: ModelProto) -> dict:
    """{name: TensorProto} of the graph's constants: initializers and ``Constant`` nodes' ``value``."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
    return out


def without_declared_shapes(model: ModelProto) -> ModelProto:
    """A copy of ``model`` without its value_info and its outputs' declared shapes (real exports
    sometimes get them wrong), for shape inference from the inputs and weights alone."""
    probe = ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for o in probe.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    return probe


def infer_shapes(model: ModelProto, *, data_prop: bool = False, trust_declared: bool = True) -> tuple:
    """``(inferred copy of model, None)``, or ``(model, reason)`` when ONNX shape inference fails.
    ``trust_declared=False``: :func:`without_declared_shapes` first; ``data_prop`` propagates shape values."""
    if model.ByteSize() >= MAX_PROTO_BYTES:
        return model, "the model is over protobuf's 2 GB limit"
    probe = model if trust_declared else without_declared_shapes(model)
    try:
        return onnx.shape_inference.infer_shapes(probe, data_prop=data_prop), None
    except Exception as exc:  # noqa: BLE001  inference rejects what it does not know; the caller decides
        return model, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def value_infos(model: ModelProto) -> dict:
    """{tensor name: ValueInfoProto} of the graph's inputs, outputs and value_info."""
    g = model.graph
    return {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}


def tensor_types(model: ModelProto, skip: Optional[Callable[[str, str], None]] = None) -> dict:
    """{tensor name: (elem_type or 0, [dim int or None] or None)} inferred from the inputs and weights
    alone, initializers included; when inference fails, {} and ``skip(where, reason)`` reports it."""
    inferred, why = infer_shapes(model, data_prop=True, trust_declared=False)
    if why is not None:
        if skip is not None:
            skip("shape inference", f"failed ({why[:200]}); static-shape rules disabled this round")
        return {}
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            dims = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
            shapes[vi.name] = (tt.elem_type, dims if tt.HasField("shape") else None)
    for init in inferred.graph.initializer:
        shapes.setdefault(init.name, (init.data_type, list(init.dims)))
    return shapes
