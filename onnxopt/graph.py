"""Graph helpers every pass shares: import/export through onnx-graphsurgeon, the rewrite guards,
constant lookup and the collision-free name generator.

The guards encode what real models break (STYLE, "conventions" 2-3):

* a *weight* is a constant -- an initializer **or** the output of a ``Constant`` node -- and is
  never a graph input (a graph input with an initializer may be overridden at run time);
* a tensor may only be rewritten away when nothing else consumes it and it is not a graph output;
* optional inputs may be absent (empty name) and node names may be missing or duplicated;
* attributes fall back to their schema defaults.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, helper


# --------------------------------------------------------------------------------------- I/O
def import_graph(model: ModelProto) -> gs.Graph:
    """The model's main graph as an onnx-graphsurgeon Graph.

    onnx-graphsurgeon drops graph inputs that also have an initializer. From IR 4 on such an
    input may be fed at run time, so it is no weight: its name is remembered on the graph
    (``overridable_inputs``) for :func:`is_weight`, and :func:`export_graph` restores the input.

    A ``value_info`` entry for a graph input or output name is left out of the import: onnx-
    graphsurgeon lets it overwrite the input's/output's type, and a shape-less entry (real
    exports write them) then makes the exported output fail the checker ("Field 'shape' of
    'type' is required"). The model itself is left as it was.
    """
    io_names = {vi.name for vi in model.graph.input} | {vi.name for vi in model.graph.output}
    shadowing = [k for k, vi in enumerate(model.graph.value_info) if vi.name in io_names]
    if shadowing:
        saved = list(model.graph.value_info)
        keep = [vi for k, vi in enumerate(saved) if k not in set(shadowing)]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        try:
            graph = gs.import_onnx(model)
        finally:
            del model.graph.value_info[:]
            model.graph.value_info.extend(saved)
    else:
        graph = gs.import_onnx(model)
    inits = {i.name for i in model.graph.initializer}
    graph.overridable_inputs = {i.name for i in model.graph.input if i.name in inits} if model.ir_version >= 4 else set()
    return graph


def export_graph(graph: gs.Graph, like: ModelProto, *, sort: bool = True) -> ModelProto:
    """Export ``graph`` back to a ModelProto, keeping ``like``'s opsets, IR version and metadata.

    Dead nodes/tensors are removed and the nodes sorted topologically on the way out
    (``sort=False``: the caller guarantees the node list is already in topological order).
    """
    graph.cleanup(remove_unused_graph_inputs=False)
    if sort:
        graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    _restore_initializer_inputs(model, like)
    return model


def _restore_initializer_inputs(model: ModelProto, like: ModelProto) -> None:
    """Put back the initializer-backed graph inputs onnx-graphsurgeon dropped, in their original order."""
    inits = {i.name for i in model.graph.initializer}
    present = {i.name for i in model.graph.input}
    like_inits = {i.name for i in like.graph.initializer}
    wanted = [vi for vi in like.graph.input if vi.name in like_inits and vi.name in inits and vi.name not in present]
    if not wanted:
        return
    order = {vi.name: k for k, vi in enumerate(like.graph.input)}
    merged = list(model.graph.input) + wanted
    merged.sort(key=lambda vi: order.get(vi.name, len(order)))
    del model.graph.input[:]
    model.graph.input.extend(merged)


# ------------------------------------------------------------------------------- constants
def constant_value(tensor: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    """The value of ``tensor`` if it is a constant (initializer or Constant-node output), else None.

    A graph input is never a constant, even when it has an initializer of the same name.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        # gs.Constant.values loads lazily-stored values itself (gs has no top-level LazyValues)
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        attrs = node.attrs
        if "value" in attrs:
            v = attrs["value"]
            return v.values if isinstance(v, gs.Constant) else np.asarray(v)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in attrs:
                return np.array(attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in attrs:
                return np.array(list(attrs[key]), dtype=dtype)
    return None


def is_weight(graph: gs.Graph, tensor: Optional[gs.Tensor]) -> bool:
    """True when ``tensor`` is a constant that is not a graph input (safe to fold into)."""
    if tensor is None or constant_value(tensor) is None:
        return False
    if tensor.name in getattr(graph, "overridable_inputs", ()):
        return False
    return all(inp.name != tensor.name for inp in graph.inputs)


def lift_constant(graph: gs.Graph, tensor: gs.Tensor) -> Optional[gs.Constant]:
    """Return ``tensor`` as a gs.Constant, turning a Constant-node output into an initializer."""
    if isinstance(tensor, gs.Constant):
        return tensor
    value = constant_value(tensor)
    if value is None:
        return None
    if is_graph_output(graph, tensor):
        # A graph output stays a node output (checked before any rewiring: an initializer and a
        # node output of the same name would break SSA).
        return None
    const = gs.Constant(tensor.name, np.asarray(value))
    # Rewire every consumer to the new constant; the Constant node dies in cleanup.
    for consumer in list(tensor.outputs):
        _swap_input(consumer, tensor, const)
    tensor.inputs.clear()
    return const


def _swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` read ``new`` wherever it reads ``old``.

    Index by index: onnx-graphsurgeon's synchronized lists do not support slice assignment
    (``node.inputs[:] = ...`` raises), and per-index assignment keeps both tensors' consumer
    lists consistent, also when the node reads ``old`` several times.
    """
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def input_at(node: gs.Node, index: int) -> Optional[gs.Tensor]:
    """The node's ``index``-th input, or None when absent (missing or an empty optional input)."""
    if index >= len(node.inputs):
        return None
    t = node.inputs[index]
    if t is None or (isinstance(t, gs.Variable) and t.name == "" and not t.inputs):
        return None
    return t


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(o is tensor or o.name == tensor.name for o in graph.outputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> Optional[gs.Node]:
    """The only node reading ``tensor``, or None when it has zero/several readers or is a graph output."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def can_absorb(graph: gs.Graph, tensor: gs.Tensor) -> Optional[str]:
    """None when ``tensor`` may be rewritten away (one consumer, not a graph output), else the reason."""
    if is_graph_output(graph, tensor):
        return f"tensor '{tensor.name}' is a graph output"
    if len(tensor.outputs) != 1:
        return f"tensor '{tensor.name}' has {len(tensor.outputs)} consumers"
    return None


# ------------------------------------------------------------------------------ attributes
def attr(node: gs.Node, name: str, opset: int | None = None):
    """Attribute ``name`` of ``node``, or the default its operator schema declares (None if none)."""
    if name in node.attrs:
        return node.attrs[name]
    try:
        schema = onnx.defs.get_schema(node.op, opset or onnx.defs.onnx_opset_version(), node.domain or "")
    except onnx.defs.SchemaError:  # a custom-domain op: no schema, no defaults
        return None
    a = schema.attributes.get(name)
    if a is None or not a.default_value.name and a.default_value.type == 0:
        return None
    return helper.get_attribute_value(a.default_value)


# ----------------------------------------------------------------------------------- names
class NameGenerator:
    """New tensor/node names that never collide with any name in the model, subgraphs included."""

    def __init__(self, graph_or_model):
        self._used: set[str] = set()
        if isinstance(graph_or_model, ModelProto):
            self._collect_proto(graph_or_model.graph)
        else:
            self._collect_gs(graph_or_model)
        self._counters: dict[str, itertools.count] = {}

    def _collect_proto(self, g: onnx.GraphProto) -> None:
        self._used.update(t.name for t in itertools.chain(g.input, g.output, g.initializer, g.value_info))
        for n in g.node:
            self._used.add(n.name)
            self._used.update(n.input)
            self._used.update(n.output)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self._collect_proto(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        self._collect_proto(sub)

    def _collect_gs(self, graph: gs.Graph) -> None:
        self._used.update(graph.tensors().keys())
        for n in graph.nodes:
            self._used.add(n.name)
            for sub in n.attrs.values():
                if isinstance(sub, gs.Graph):
                    self._collect_gs(sub)

    def reserve(self, name: str) -> None:
        self._used.add(name)

    def __call__(self, base: str) -> str:
        """A fresh name derived from ``base``: ``base`` itself if free, else ``base_1``, ``base_2``..."""
        base = base or "t"
        if base not in self._used:
            self._used.add(base)
            return base
        counter = self._counters.setdefault(base, itertools.count(1))
        while True:
            name = f"{base}_{next(counter)}"
            if name not in self._used:
                self._used.add(name)
                return name


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` read ``new`` instead (graph outputs included, keeping the output name)."""
    if is_graph_output(graph, old) and any(inp is new for inp in graph.inputs):
        # renaming a graph input to the output's name would silently change the model's interface
        raise ValueError(f"replace_tensor: graph output '{old.name}' cannot become graph input '{new.name}'; keep an Identity there")
    for consumer in list(old.outputs):
        _swap_input(consumer, old, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            # Keep the public output name: the producer of ``new`` now writes the old name.
            new_name = old.name
            old.name = old.name + "__replaced"
            new.name = new_name
            # a graph output must carry a type: an intermediate tensor often has none, so it
            # inherits the replaced output's dtype/shape
            if isinstance(new, gs.Variable):
                if new.dtype is None:
                    new.dtype = old.dtype
                if new.shape is None:
                    new.shape = old.shape
            graph.outputs[i] = new


