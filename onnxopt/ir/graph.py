"""The onnx-graphsurgeon side of the graph-editing layer every pass shares: import/export, the
rewrite guards, the edit helpers, constant lookup and the collision-free name generator.

The guards encode what real models break (STYLE, "conventions" 2-3): a *weight* is an initializer
or a ``Constant`` output and never a graph input (one with an initializer may be overridden at run
time); a tensor may only be rewritten away when it has one consumer and is not a graph output;
optional inputs may be absent and node names missing or duplicated; attributes fall back to
their schema defaults.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, helper

from ..model_io import subgraphs


# --------------------------------------------------------------------------------------- I/O
def import_graph(model: ModelProto) -> gs.Graph:
    """The model's main graph as an onnx-graphsurgeon Graph. gs drops graph inputs that have an
    initializer: their names are kept (``overridable_inputs``) for :func:`is_weight` and export. A
    ``value_info`` entry of a graph input/output is left out: gs lets a shape-less one overwrite the
    type, and the exported model would fail the checker."""
    io_names = {vi.name for vi in model.graph.input} | {vi.name for vi in model.graph.output}
    saved = list(model.graph.value_info)
    keep = [vi for vi in saved if vi.name not in io_names]
    if len(keep) < len(saved):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        try:
            graph = gs.import_onnx(model)
        finally:
            del model.graph.value_info[:]
            model.graph.value_info.extend(saved)
    else:
        graph = gs.import_onnx(model)
    graph.overridable_inputs = overridable_inputs(model)
    return graph


def export_graph(graph: gs.Graph, like: ModelProto, *, sort: bool = True) -> ModelProto:
    """Export ``graph`` back to a ModelProto, keeping ``like``'s opsets, IR version and metadata; dead
    nodes are removed and the nodes sorted (``sort=False``: the caller guarantees the order)."""
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
    restore_graph_inputs(model, like)
    return model


def drop_detached(graph: gs.Graph) -> None:
    """Remove the nodes a rewrite disconnected (no outputs left) in one linear sweep: gs's cleanup
    formats every removed node for its log (each Constant's whole array), slow on large graphs."""
    keep = []
    for node in graph.nodes:
        if node.outputs:
            keep.append(node)
        else:
            node.inputs.clear()
            node.attrs.clear()
    graph.nodes = keep


def overridable_inputs(model: ModelProto) -> set:
    """Names of graph inputs with an initializer, which from IR 4 on may be overridden at run time
    (no constants); below IR 4 every initializer is listed as an input and cannot be fed: empty."""
    if model.ir_version < 4:
        return set()
    return {vi.name for vi in model.graph.input} & {i.name for i in model.graph.initializer}


def drop_graph_inputs(model: ModelProto, names) -> None:
    """Remove ``names`` from ``model``'s graph inputs, in place: initializers listed as inputs
    (IR < 4, ``keep_initializers_as_inputs``) that are to be constants, or that are gone."""
    names = set(names)
    kept = [vi for vi in model.graph.input if vi.name not in names]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)


def restore_graph_inputs(out: ModelProto, source: ModelProto) -> None:
    """Put back the graph inputs onnx-graphsurgeon drops on import (those with an initializer),
    idempotently: IR >= 4 in their place with their initializer; IR < 4 (every initializer must be
    an input) the real inputs followed by one entry per remaining initializer."""
    inits = {i.name: i for i in source.graph.initializer}
    if not any(vi.name in inits for vi in source.graph.input):
        return
    present = {vi.name: vi for vi in out.graph.input}
    if out.ir_version < 4:
        declared = {vi.name: vi for vi in source.graph.input}
        ordered = [present[vi.name] for vi in source.graph.input if vi.name not in inits and vi.name in present]
        listed = {vi.name for vi in ordered}
        ordered += [vi for vi in out.graph.input if vi.name not in listed and vi.name not in inits]
        ordered += [declared.get(init.name) or helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                    for init in out.graph.initializer]
        del out.graph.input[:]
        out.graph.input.extend(ordered)
        return
    keep = overridable_inputs(source)
    ordered = [present.get(vi.name, vi) if vi.name in keep else present[vi.name]
               for vi in source.graph.input if vi.name in keep or vi.name in present]
    names = {vi.name for vi in ordered}
    ordered += [vi for vi in out.graph.input if vi.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(ordered)
    have = {i.name for i in out.graph.initializer}
    for vi in source.graph.input:
        if vi.name in keep and vi.name not in have:
            out.graph.initializer.append(inits[vi.name])


# ------------------------------------------------------------------------------- constants
def constant_value(tensor: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    """The value of ``tensor`` if it is a constant (initializer or Constant-node output), else None."""
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
    if tensor is None or tensor.name in getattr(graph, "overridable_inputs", ()) or constant_value(tensor) is None:
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
        # a graph output stays a node output (an initializer of the same name would break SSA)
        return None
    const = gs.Constant(tensor.name, np.asarray(value))
    # Rewire every consumer to the new constant; the Constant node dies in cleanup.
    for consumer in list(tensor.outputs):
        swap_input(consumer, tensor, const)
    tensor.inputs.clear()
    return const


def swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` read ``new`` wherever it reads ``old``, index by index: gs's synchronized lists
    reject slice assignment, and this keeps both tensors' consumer lists consistent."""
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


def set_input(node: gs.Node, index: int, value: gs.Tensor) -> None:
    """Set the (optional, maybe absent) input ``index`` of ``node``, padding with empty inputs."""
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = value


def node_label(node: gs.Node) -> str:
    """``Op 'name'`` (the first output's name when the node has none), for messages."""
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} '{node.name or out}'"


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
            for sub in subgraphs(n):
                self._collect_proto(sub)

    def _collect_gs(self, graph: gs.Graph) -> None:
        self._used.update(graph.tensors().keys())
        for n in graph.nodes:
            self._used.add(n.name)
            for sub in n.attrs.values():
                if isinstance(sub, gs.Graph):
                    self._collect_gs(sub)

    def __call__(self, base: str) -> str:
        """A fresh name derived from ``base``: ``base`` itself if free, else ``base_1``, ``base_2``..."""
        base = base or "t"
        name, counter = base, self._counters.setdefault(base, itertools.count(1))
        while name in self._used:
            name = f"{base}_{next(counter)}"
        self._used.add(name)
        return name


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` read ``new`` instead (graph outputs included, keeping the output name)."""
    if is_graph_output(graph, old) and any(inp is new for inp in graph.inputs):
        # renaming a graph input to the output's name would silently change the model's interface
        raise ValueError(f"replace_tensor: graph output '{old.name}' cannot become graph input '{new.name}'; keep an Identity there")
    for consumer in list(old.outputs):
        swap_input(consumer, old, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            # Keep the public output name: the producer of ``new`` now writes the old name.
            old.name, new.name = old.name + "__replaced", old.name
            # a graph output must carry a type, which an intermediate tensor often lacks: inherit it
            if isinstance(new, gs.Variable):
                if new.dtype is None:
                    new.dtype = old.dtype
                if new.shape is None:
                    new.shape = old.shape
            graph.outputs[i] = new


class GraphEditor:
    """An onnx-graphsurgeon graph being rewritten node by node: it owns the name generator, an index
    of the graph outputs (which never change here) and the nodes removed so far, so the queries
    stay O(1) and exact while a rewrite loop runs (``compact`` drops the removed nodes once)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.names = NameGenerator(graph)
        # id -> node; holding the node keeps CPython from recycling its id for a new node
        self.dead: dict = {}
        self._output_ids = {id(t) for t in graph.outputs}
        self._output_names = {t.name for t in graph.outputs}
        self.added: Optional[list] = None  # when a list: the nodes added (a rule's verification reads it)

    # ---- queries
    def is_output(self, t: gs.Tensor) -> bool:
        return id(t) in self._output_ids or t.name in self._output_names

    def consumers(self, t: gs.Tensor) -> list:
        return [n for n in t.outputs if id(n) not in self.dead]

    def sole_consumer(self, t: gs.Tensor) -> Optional[gs.Node]:
        """:func:`sole_consumer` without the removed nodes."""
        if self.is_output(t):
            return None
        c = self.consumers(t)
        return c[0] if len(c) == 1 else None

    # ---- edits
    def add_node(self, op: str, inputs: list, outputs: list, attrs: Optional[dict] = None, base: str = "") -> gs.Node:
        node = gs.Node(op, name=self.names(base or op.lower()), attrs=attrs or {}, inputs=inputs, outputs=outputs)
        self.graph.nodes.append(node)
        if self.added is not None:
            self.added.append(node)
        return node

    def variable(self, base: str, like: Optional[gs.Tensor] = None) -> gs.Variable:
        return gs.Variable(self.names(base), dtype=getattr(like, "dtype", None))

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(base), np.require(value, requirements="C"))  # keeps a scalar 0-d

    def replace_output(self, out: gs.Tensor, op: str, inputs: list, attrs: Optional[dict] = None, base: str = "") -> gs.Node:
        """Make a new ``op`` node produce ``out`` (keeping its name) and drop what became unused."""
        old = out.inputs[0] if out.inputs else None
        if old is not None:
            idx = next(i for i, t in enumerate(old.outputs) if t is out)
            old.outputs[idx] = gs.Variable(self.names(out.name + "_unused"))
        node = self.add_node(op, inputs, [out], attrs, base or f"{out.name}_{op.lower()}")
        if old is not None:
            self.kill(old)
        return node

    def reroute(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Every reader of ``old`` reads ``new``; a graph output gets an Identity (its name is public)."""
        if self.is_output(old):
            self.replace_output(old, "Identity", [new])
            return
        prod = old.inputs[0] if old.inputs else None
        for consumer in list(old.outputs):
            swap_input(consumer, old, new)
        if prod is not None:
            self.kill(prod)

    def kill(self, node: gs.Node) -> None:
        """Remove ``node`` if none of its outputs is used, then its producers likewise (iterative)."""
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in self.dead or n.op in ("If", "Loop", "Scan"):
                continue
            if any(self.is_output(t) or self.consumers(t) for t in n.outputs):
                continue
            inputs = list(n.inputs)
            n.inputs.clear()
            n.outputs.clear()
            self.dead[id(n)] = n
            for t in inputs:
                if t.inputs:
                    stack.append(t.inputs[0])

    def compact(self) -> None:
        """Drop dead nodes from the graph's node list (once per rule: linear)."""
        if self.dead:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.dead]
