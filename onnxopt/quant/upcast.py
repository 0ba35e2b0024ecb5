"""The float32 twin of a float16 / bfloat16 model, which ``qdq`` quantizes.

A model exported in half precision (``model.half()`` before ``torch.onnx.export``, or a float16
conversion) cannot be quantized as it is: a QuantizeLinear on a float16 tensor needs opset 19,
onnxruntime fuses only float32 Q/DQ into int8 kernels, and TIDL imports float32 graphs. So the
model is widened first, and nothing else changes:

* every float16/bfloat16 weight, Constant and ConstantOfShape value becomes float32 -- exact,
  every such value is a float32 value;
* a Cast (or a Random*/EyeLike ``dtype``) to float16/bfloat16 produces float32 instead;
* the graph's own inputs and outputs keep their type: a Cast after each such input and before
  each such output, so the model's interface is the one the user exported.

The float ops then compute in float32 where the original rounded to float16, so the twin is the
model the float16 one approximates; a TensorRT engine built with ``--fp16`` runs the layers
left without Q/DQ in float16 again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from ..ir.graph import NameGenerator
from ..model_io import all_tensors, subgraphs

LOW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_DTYPE_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Bernoulli"}


@dataclass
class Upcast:
    """What the widening did, for the console note and the report."""

    weights: int = 0          # initializers and constant values widened
    casts: int = 0            # Cast/dtype attributes that now give float32
    boundary: int = 0         # graph inputs/outputs kept in their type by a Cast

    def describe(self) -> str:
        return (f"{self.weights} float16/bfloat16 constant(s) widened exactly, {self.casts} cast(s) to float32, "
                f"{self.boundary} graph input/output(s) kept in their type by a Cast")

    def to_dict(self) -> dict:
        return {"weights": self.weights, "casts": self.casts, "boundary": self.boundary}


def _graphs(graph: GraphProto):
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _graphs(sub)


def _is_low(value_info) -> bool:
    return value_info.type.HasField("tensor_type") and value_info.type.tensor_type.elem_type in LOW_FLOATS


def _widen_tensor(t: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name)


def has_low_precision_floats(model: ModelProto) -> bool:
    """True when any tensor the graph declares or holds is float16/bfloat16."""
    if any(t.data_type in LOW_FLOATS for t in all_tensors(model)):
        return True
    for g in _graphs(model.graph):
        if any(_is_low(v) for v in (*g.input, *g.output, *g.value_info)):
            return True
        if any(a.name in ("to", "dtype") and a.type == a.INT and a.i in LOW_FLOATS for n in g.node for a in n.attribute):
            return True
    return False


def _rename_reads(graph: GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and its subgraphs (outer-scope reads included) reads ``new``."""
    for g in _graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


def float32_twin(model: ModelProto) -> tuple:
    """(the widened copy, :class:`Upcast`), or (``model``, None) when it has no float16/bfloat16."""
    if not has_low_precision_floats(model):
        return model, None
    out, done = copy.deepcopy(model), Upcast()
    for t in all_tensors(out):   # initializers and Constant/ConstantOfShape values, subgraphs included
        if t.data_type in LOW_FLOATS:
            t.CopyFrom(_widen_tensor(t))
            done.weights += 1
    for g in _graphs(out.graph):
        for node in g.node:
            for attr in node.attribute:
                if attr.type == attr.INT and attr.i in LOW_FLOATS and (
                        node.op_type == "Cast" and attr.name == "to" or node.op_type in _DTYPE_OPS and attr.name == "dtype"):
                    attr.i = TensorProto.FLOAT
                    done.casts += 1
        inner = g is not out.graph   # a subgraph's own inputs/outputs are no interface
        for v in (*g.value_info, *((*g.input, *g.output) if inner else ())):
            if _is_low(v):
                v.type.tensor_type.elem_type = TensorProto.FLOAT
    graph = out.graph
    names = NameGenerator(out)
    inits = {t.name for t in graph.initializer}
    head, tail = [], []
    for v in graph.input:
        if _is_low(v) and v.name in inits:   # an initializer listed as an input (IR < 4): no interface, widened
            v.type.tensor_type.elem_type = TensorProto.FLOAT
        elif _is_low(v):
            wide = names(f"{v.name}_float32")
            _rename_reads(graph, v.name, wide)
            head.append(helper.make_node("Cast", [v.name], [wide], name=names(f"{v.name}_to_float32"),
                                         to=TensorProto.FLOAT))
            done.boundary += 1
    inputs = {v.name for v in graph.input}
    for v in graph.output:
        if not _is_low(v) or v.name in inputs:   # an input passed straight through keeps its own type
            continue
        wide = names(f"{v.name}_float32")
        _rename_reads(graph, v.name, wide)
        for node in graph.node:
            node.output[:] = [wide if o == v.name else o for o in node.output]
        for t in graph.initializer:
            if t.name == v.name:
                t.name = wide
        for vi in graph.value_info:
            if vi.name == v.name:
                vi.name = wide
        tail.append(helper.make_node("Cast", [wide], [v.name], name=names(f"{v.name}_to_original_type"),
                                     to=v.type.tensor_type.elem_type))
        done.boundary += 1
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return out, done
