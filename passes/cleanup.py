"""``cleanup`` -- exact graph hygiene: lift constants, fold constants and static shape chains,
remove no-ops and dead code, fold explicit Pad nodes into the Conv/pool that follows.

Every graph output keeps its name, dtype and values: constant folding evaluates exactly the ops the
graph would have run, in onnxruntime, on the same constants. Shapes come from ONNX shape inference
on a copy stripped of the model's own, possibly wrong, value_info; a symbolic dimension (the batch
``N``) is never folded, so the graph stays correct for every batch size. A folded tensor larger
than ``max_fold_elements`` is not created, so weights are never blown up by Expand/Tile/ConstantOfShape.

Rounds (each linear in the graph size) repeat while one folded something and shape inputs are still
computed at run time: folding one chain can make another tensor's shape static. If/Loop/Scan bodies
are left as they are (main-graph tensors they read are renamed for them too); graph inputs that have
an initializer are overridable from IR 4 on and never treated as constants, except the weights of
layers (``weight_inputs=constant``, the default): an export with ``keep_initializers_as_inputs=True``
lists every weight as an input, and TensorRT and onnxruntime's quantizer read them as weights.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.errors import OptionError
from onnxopt.ir.graph import constant_value, drop_detached, drop_graph_inputs, export_graph, import_graph, input_at, is_graph_output, lift_constant, node_label, overridable_inputs, sole_consumer, swap_input
from onnxopt.ir.proto import tensor_types
from onnxopt.model_io import opset_of, subgraphs
from onnxopt.registry import PassContext, PassOptions, PassResult, option, register_pass

MAX_ROUNDS = 6
# When the batched constant-folding session fails, at most this many nodes are retried one
# session each (linear, but a session costs milliseconds).
MAX_NODEWISE_FOLD = 2000

# Never folded, even with constant inputs: Q/DQ (a QDQ model's integer weights are its payload),
# nondeterministic ops, and ops whose outputs are not plain tensors.
_NO_FOLD = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "Constant",
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence",
    "ConcatFromSequence", "SequenceAt", "SequenceLength", "Optional", "OptionalGetElement", "OptionalHasElement",
}
_SHAPE_CONSUMERS = {"Shape", "Size"}


@dataclass
class CleanupOptions(PassOptions):
    """The cleanup pass's options."""

    max_fold_elements: int = option(1 << 20, "Largest tensor (in elements) constant folding may create; bigger results keep "
                                    "their node.")
    fold_constants: bool = option(True, "Evaluate nodes whose inputs are all constants (onnxruntime, once per round).")
    fold_shapes: bool = option(True, "Fold Shape/Size (and Shape->Gather/Slice) of statically known dimensions.")
    remove_noops: bool = option(True, "Remove Identity, inference Dropout, same-type Cast, same-shape Reshape/Expand, "
                                "identity Transpose, x*1, x+0, zero Pad, full Slice, single-input Concat.")
    fold_pads: bool = option(True, "Fold a constant zero (or -inf for MaxPool) Pad into the following "
                             "Conv/AveragePool/MaxPool.")
    lift_constants: bool = option(True, "Turn Constant nodes into initializers.")
    weight_inputs: str = option("constant", "graph inputs that hold a layer's weights (Conv/Gemm/MatMul/normalization/"
                                "PRelu/RNN parameters; exports with keep_initializers_as_inputs=True): constant (drop them "
                                "from the inputs, as TensorRT and onnxruntime's quantizer read them: weights; then bnfuse, "
                                "qdq and prune can use them) or keep (overridable at run time, never folded)",
                                ("constant", "keep"))

    def validate(self, model, ctx) -> None:
        if self.max_fold_elements < 0:
            raise OptionError(f"cleanup.max_fold_elements must be 0 or more, got {self.max_fold_elements}.",
                              "give the largest number of elements a folded constant may have, e.g. 1048576")


@register_pass("cleanup", "Lift Constant nodes, fold constants and static shape chains, drop no-ops and dead code, fold Pad into Conv/pool.", exact=True, options=CleanupOptions)
def cleanup(model: onnx.ModelProto, options: CleanupOptions, ctx: PassContext) -> PassResult:
    """Exact cleanup: constants lifted and folded, no-ops and dead code removed, Pad folded into Conv/pool."""
    options.validate(model, ctx)
    made_constant = 0
    if options.weight_inputs == "constant":
        model, made_constant = _weight_inputs_to_constants(model)
    state = _State(options, opset_of(model), overridable_inputs(model))
    state.changes["weight_inputs_made_constant"] = made_constant
    state.changes["unused_initializers_removed"] = _count_unused_initializers(model)
    original_value_info = {vi.name for vi in model.graph.value_info}
    nodes_before = len(model.graph.node)
    for round_index in range(MAX_ROUNDS):
        shapes = tensor_types(model, state.skip)
        graph = import_graph(model)
        if round_index == 0:
            n0 = len(graph.nodes)
            graph.cleanup(remove_unused_graph_inputs=False)
            state.changes["dead_nodes_removed"] = n0 - len(graph.nodes)
        state.round_folded = 0
        progress = 0
        if options.lift_constants:
            progress += _lift_constants(graph, state)
        if options.fold_shapes:
            progress += _fold_static_shapes(graph, shapes, state)
        if options.fold_constants:
            _castlike_of_constants(graph, shapes, state)
            progress += _fold_constants(graph, shapes, state)
        if options.remove_noops:
            progress += _remove_noops(graph, shapes, state)
        if options.fold_pads:
            progress += _fold_pads(graph, shapes, state)
        drop_detached(graph)
        model = export_graph(graph, like=model)
        if not progress or not (state.round_folded and _shape_work_left(model)):
            break
    # Intermediate value_info that we did not bring in stays out (shape inference re-derives it);
    # the model's own entries are kept where their tensor still exists.
    own_alive = {o for n in model.graph.node for o in n.output} & original_value_info
    keep = []
    for vi in model.graph.value_info:
        if vi.name in own_alive and _contradicts(vi, shapes.get(vi.name)):
            # a wrong declared shape (real exporters write them) would fail the full checker
            state.details.append(f"dropped value_info '{vi.name}': it contradicts the inferred shape {shapes[vi.name][1]}")
            state.changes["wrong_value_info_dropped"] += 1
        elif vi.name in own_alive:
            keep.append(vi)
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    state.changes["nodes_removed"] = nodes_before - len(model.graph.node)
    return PassResult(model, changes=dict(state.changes), details=state.details, skipped=state.skipped,
                      extra={"rounds": round_index + 1})


# ops whose inputs after the first are parameters: weights, biases, normalization statistics
_WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                   "LayerNormalization", "GroupNormalization", "PRelu", "LSTM", "GRU", "RNN"}


def _weight_inputs_to_constants(model: onnx.ModelProto) -> tuple:
    """(model, count): the overridable graph inputs (an initializer listed as an input, IR >= 4)
    that a layer reads as a parameter, dropped from the inputs so that they are constants. A
    ``keep_initializers_as_inputs=True`` export lists every weight so; left overridable, no pass
    could fold or quantize them (qdq quantized no weight of such an export). Other overridable
    inputs -- a threshold or a scale with a default -- stay the knobs they are."""
    overridable = overridable_inputs(model)
    weights = {i for n in model.graph.node if n.op_type in _WEIGHT_READERS and (n.domain or "") in ("", "ai.onnx")
               for i in n.input[1:] if i in overridable}
    if not weights:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_graph_inputs(out, weights)
    return out, len(weights)


# ------------------------------------------------------------------------------ state, shapes
class _State:
    def __init__(self, options: CleanupOptions, opset: int, overridable: set):
        self.options, self.opset = options, opset
        self.overridable = overridable  # graph inputs with an initializer: NOT constants
        self.changes: Counter = Counter()
        self.details: list = []
        self.skipped: list = []
        self._skip_seen: set = set()
        self.round_folded = 0
        self.excluded: set = set()  # names of tensors whose producer must not be folded (too big)

    def skip(self, where: str, reason: str) -> None:
        key = (where, reason)
        if key not in self._skip_seen:  # rounds revisit nodes; report each reason once
            self._skip_seen.add(key)
            self.skipped.append(f"{where}: {reason}")


def _count_unused_initializers(model: onnx.ModelProto) -> int:
    used = set()

    def walk(g: onnx.GraphProto):
        for n in g.node:
            used.update(n.input)
            for sub in subgraphs(n):
                walk(sub)
        used.update(o.name for o in g.output)

    walk(model.graph)
    return sum(1 for i in model.graph.initializer if i.name not in used)


# Inputs that carry shapes/indices: when one is still computed at run time after a round, the next
# round's shape inference may now resolve it.
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Pad": 1, "Slice": 1, "Resize": 1,
                 "Range": 0, "Unsqueeze": 1, "Squeeze": 1, "Split": 1, "ReduceMean": 1, "ReduceSum": 1}


def _shape_work_left(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in _SHAPE_CONSUMERS:
            return True
        first = _SHAPE_INPUTS.get(n.op_type)
        if first is not None and any(name and name not in inits for name in n.input[first:]):
            return True
    return False


def _contradicts(vi: onnx.ValueInfoProto, inferred) -> bool:
    """True when a declared value_info disagrees with what shape inference derived."""
    if inferred is None or not vi.type.HasField("tensor_type"):
        return False
    tt = vi.type.tensor_type
    elem, dims = inferred
    if elem and tt.elem_type and elem != tt.elem_type:
        return True
    if dims is None or not tt.HasField("shape"):
        return False
    declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return len(declared) != len(dims) or any(a is not None and b is not None and a != b for a, b in zip(declared, dims))


def _shape_of(t: gs.Tensor, shapes: dict) -> Optional[list]:
    """Static-or-partial shape of ``t`` ([int|None]) or None when even the rank is unknown."""
    if isinstance(t, gs.Constant):
        return list(t.shape)
    entry = shapes.get(t.name)
    return list(entry[1]) if entry and entry[1] is not None else None


def _elem_type_of(t: gs.Tensor, shapes: dict) -> int:
    if isinstance(t, gs.Constant):
        return helper.np_dtype_to_tensor_dtype(np.asarray(constant_value(t)).dtype)
    entry = shapes.get(t.name)
    return entry[0] if entry else 0


def _static(shape: Optional[list]) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _const(t: Optional[gs.Tensor], input_names: set) -> Optional[np.ndarray]:
    """The value of ``t`` when it is a constant that is not a graph input, else None (absent too)."""
    return None if t is None or t.name in input_names else constant_value(t)


def _is_const(t: Optional[gs.Tensor], input_names: set) -> bool:
    if isinstance(t, gs.Constant):
        return t.name not in input_names
    # an absent optional input, or a Constant-node output (when lift_constants is off)
    return t is None or constant_value(t) is not None


# ------------------------------------------------------------------------------ 1. constants
def _lift_constants(graph: gs.Graph, state: _State) -> int:
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out):
            state.skip(node_label(node), "writes a graph output; kept as a node")
            continue
        if constant_value(out) is None:
            state.skip(node_label(node), "sparse or unsupported Constant attribute; kept as a node")
            continue
        if lift_constant(graph, out) is not None:
            lifted += 1
    state.changes["constants_lifted"] += lifted
    return lifted


# ----------------------------------------------------------------------- 2. static shapes
def _to_constant(tensor: gs.Variable, value: np.ndarray) -> None:
    tensor.inputs.clear()
    tensor.to_constant(np.require(value, requirements="C"))  # (np.ascontiguousarray makes a scalar 1-D)


def _fold_static_shapes(graph: gs.Graph, shapes: dict, state: _State) -> int:
    folded = 0
    for node in list(graph.nodes):
        if (node.op not in _SHAPE_CONSUMERS or not node.outputs or not node.inputs
                or is_graph_output(graph, node.outputs[0])):
            continue
        out = node.outputs[0]
        shape = _shape_of(node.inputs[0], shapes)
        if shape is None:
            continue
        if node.op == "Size":
            if _static(shape):
                _to_constant(out, np.array(int(np.prod(shape)), dtype=np.int64))
                folded += 1
            continue
        rank = len(shape)
        dims = shape[slice(*_clamp_slice(int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank)), 1, rank))]
        if _static(dims):
            _to_constant(out, np.array(dims, dtype=np.int64))
            folded += 1
            continue
        # Partially static: fold the Gather/Slice readers that only pick static dimensions.
        for reader in list(out.outputs):
            value = _static_pick(reader, out, dims, graph)
            if value is not None and not is_graph_output(graph, reader.outputs[0]):
                _to_constant(reader.outputs[0], value)
                folded += 1
    state.changes["shapes_folded"] += folded
    state.round_folded += folded
    return folded


def _static_pick(reader: gs.Node, shape_out: gs.Tensor, dims: list, graph: gs.Graph) -> Optional[np.ndarray]:
    """Value of ``reader`` (a Gather/Slice of a shape vector) when it selects only static dims."""
    if not reader.inputs or reader.inputs[0] is not shape_out or len(reader.outputs) != 1:
        return None
    index = np.arange(len(dims))
    if reader.op == "Gather" and int(reader.attrs.get("axis", 0)) == 0:
        idx = constant_value(input_at(reader, 1))
        idx = None if idx is None else np.asarray(idx).astype(np.int64)
        if idx is None or np.any(idx < -len(dims)) or np.any(idx >= len(dims)):
            return None
        picked = index[idx]
    elif reader.op == "Slice":
        if "starts" in reader.attrs:  # opset < 10
            starts, ends = reader.attrs["starts"], reader.attrs["ends"]
            axes, steps = reader.attrs.get("axes", [0]), [1]
        else:
            starts, ends = constant_value(input_at(reader, 1)), constant_value(input_at(reader, 2))
            axes = constant_value(input_at(reader, 3)) if input_at(reader, 3) is not None else [0]
            steps = constant_value(input_at(reader, 4)) if input_at(reader, 4) is not None else [1]
            if starts is None or ends is None or axes is None or steps is None:
                return None
        starts, ends, axes, steps = (np.asarray(v).reshape(-1).astype(np.int64) for v in (starts, ends, axes, steps))
        if len(starts) != 1 or int(axes[0]) not in (0, -1) or steps[0] == 0:
            return None
        picked = index[slice(*_clamp_slice(int(starts[0]), int(ends[0]), int(steps[0]), len(dims)))]
    else:
        return None
    values = [dims[i] for i in np.asarray(picked).reshape(-1)]
    return np.array(values, dtype=np.int64).reshape(np.asarray(picked).shape) if _static(values) else None


def _clamp_slice(start: int, end: int, step: int, dim: int) -> tuple:
    """ONNX Slice clamping turned into Python slice bounds."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return max(0, min(dim, start)), max(0, min(dim, end)), step
    start, end = max(-1, min(dim - 1, start)), max(-1, min(dim - 1, end))
    return start, (None if end < 0 else end), step


# --------------------------------------------------------------------- 3. constant folding
def _castlike_of_constants(graph: gs.Graph, shapes: dict, state: _State) -> None:
    """``CastLike(constant, x)`` -> ``Cast(constant, to=dtype of x)`` where x's dtype is known: the
    dynamo exporter writes Conv biases and Clip bounds as ``CastLike(Constant, x) -> Expand``, which
    the constant folding that follows then folds whole (into an initializer bnfuse, lite and prune use)."""
    input_names = {t.name for t in graph.inputs} | state.overridable
    for node in graph.nodes:
        if (node.op != "CastLike" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) != 2
                or not _is_const(node.inputs[0], input_names)):
            continue
        target = node.inputs[1]
        elem = _elem_type_of(target, shapes)
        if not elem and getattr(target, "dtype", None) is not None:
            try:
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(target.dtype))
            except (TypeError, KeyError, ValueError):
                elem = 0
        if not elem:
            continue
        node.op = "Cast"
        node.attrs = {"to": int(elem), **{k: v for k, v in node.attrs.items() if k in ("saturate", "round_mode")}}
        del node.inputs[1]
        state.changes["castlike_of_constant_to_cast"] += 1


def _fold_constants(graph: gs.Graph, shapes: dict, state: _State) -> int:
    limit = int(state.options.max_fold_elements)
    input_names = {t.name for t in graph.inputs} | state.overridable
    total = 0
    for _attempt in range(3):  # a too-big result found only at run time excludes its node and retries
        fold_nodes, produced = [], set()  # produced: ids of the tensors the fold set produces
        for node in graph.nodes:
            if not _foldable_op(node) or not node.outputs or any(is_graph_output(graph, o) for o in node.outputs):
                continue
            if not all(_is_const(t, input_names) or (t is not None and id(t) in produced) for t in _inputs_of(node)):
                continue
            too_big = False
            for o in node.outputs:
                shape = _shape_of(o, shapes)
                n = int(np.prod(shape)) if _static(shape) else None
                if o.name in state.excluded or (n is not None and n > limit):
                    too_big = True
                    state.skip(node_label(node), f"folding would create a {n if n is not None else 'large'}-element constant "
                                             f"(max_fold_elements={limit})")
            if too_big:
                continue
            fold_nodes.append(node)
            produced.update(id(o) for o in node.outputs)
        fold_ids = {id(n) for n in fold_nodes}
        frontier = [o for node in fold_nodes for o in node.outputs
                    if o.name and any(id(c) not in fold_ids for c in o.outputs)]
        if not frontier:
            return total
        try:
            values = _run_fold_set(fold_nodes, frontier, state.opset, graph)
        except Exception as exc:  # some op onnxruntime cannot run: find it node by node
            if len(fold_nodes) > MAX_NODEWISE_FOLD:
                state.skip("constant folding", f"onnxruntime could not evaluate the constant subgraph "
                                               f"({_first_line(exc)}); {len(fold_nodes)} nodes left unfolded")
                return total
            total += _fold_node_by_node(fold_nodes, graph, state, limit, input_names)
            break
        too_big = {name for name, v in values.items() if not isinstance(v, np.ndarray) or v.size > limit}
        if too_big:
            state.excluded |= too_big
            continue
        for t in frontier:
            _to_constant(t, values[t.name])
        for node in fold_nodes:
            node.outputs.clear()  # dead now; export's cleanup drops it
        total += len(fold_nodes)
        break
    state.changes["nodes_folded"] += total
    state.round_folded += total
    return total


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _fold_node_by_node(nodes: list, graph: gs.Graph, state: _State, limit: int, input_names: set) -> int:
    """Fallback when the batched session fails: one session per node, in topological order, so
    the node onnxruntime cannot run stays (with its reason) and everything else still folds."""
    done = 0
    for node in nodes:
        if not all(_is_const(t, input_names) for t in _inputs_of(node)):
            continue  # an input's producer could not be folded
        outs = [o for o in node.outputs if o.name]
        try:
            values = _run_fold_set([node], outs, state.opset, graph)
        except Exception as exc:
            state.excluded.update(o.name for o in outs)
            state.skip(node_label(node), f"onnxruntime cannot evaluate it for folding ({_first_line(exc)})")
            continue
        if any(not isinstance(v, np.ndarray) or v.size > limit for v in values.values()):
            state.excluded.update(o.name for o in outs)
            state.skip(node_label(node), f"folding would create a non-tensor or more than {limit} elements (max_fold_elements)")
            continue
        for o in outs:
            _to_constant(o, values[o.name])
        node.outputs.clear()
        done += 1
    return done


def _inputs_of(node: gs.Node) -> list:
    return [input_at(node, i) for i in range(len(node.inputs))]


def _foldable_op(node: gs.Node) -> bool:
    if (node.domain or "") not in ("", "ai.onnx") or node.op in _NO_FOLD or not node.inputs:
        return False
    return not any(isinstance(v, gs.Graph) for v in node.attrs.values())


def _run_fold_set(nodes: list, frontier: list, opset: int, graph: gs.Graph) -> dict:
    """Evaluate the constant subgraph ``nodes`` once in onnxruntime; {frontier name: value}."""
    produced = {o.name for n in nodes for o in n.outputs}
    outer = {t.name: t for n in nodes for t in n.inputs if t is not None and t.name and t.name not in produced}
    inits = [OnnxExporter.export_tensor_proto(t) if isinstance(t, gs.Constant)
             else numpy_helper.from_array(np.asarray(constant_value(t)), t.name)  # a Constant-node output
             for t in outer.values()]
    g = helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "fold", [],
                          [helper.make_empty_tensor_value_info(t.name) for t in frontier], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 9)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a failure is reported by the pass (skipped), not logged by onnxruntime
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [t.name for t in frontier]
    return dict(zip(names, sess.run(names, {})))


# ------------------------------------------------------------------------------ 4. no-ops
def _bypass(graph: gs.Graph, node: gs.Node, inp: gs.Tensor, out: gs.Tensor, state: _State) -> bool:
    """Remove ``node`` (out == inp in value). Graph output names never change."""
    keep_out = is_graph_output(graph, out)
    producer = inp.inputs[0] if len(inp.inputs) == 1 else None
    if keep_out and (producer is None or isinstance(inp, gs.Constant) or is_graph_output(graph, inp)
                     or any(t is inp for t in graph.inputs)):
        state.skip(node_label(node), "no-op writes a graph output fed by a graph input/constant/output; kept to keep the output name")
        return False
    node.inputs.clear()
    node.outputs.clear()
    old, new = (inp, out) if keep_out else (out, inp)  # consumers move to the tensor that stays
    for c in list(old.outputs):
        swap_input(c, old, new)
    if keep_out:
        idx = next(i for i, t in enumerate(producer.outputs) if t is inp)
        producer.outputs[idx] = out
    return True


def _remove_noops(graph: gs.Graph, shapes: dict, state: _State) -> int:
    input_names = {t.name for t in graph.inputs} | state.overridable
    removed = 0
    for node in list(graph.nodes):
        if not node.outputs or not node.inputs or (node.domain or "") not in ("", "ai.onnx"):
            continue
        data = _noop_input(node, graph, shapes, state, input_names)
        if data is not None and _bypass(graph, node, data, node.outputs[0], state):
            state.changes[f"noop_{node.op.lower()}_removed"] += 1
            removed += 1
    return removed


def _noop_input(node: gs.Node, graph: gs.Graph, shapes: dict, state: _State, input_names: set) -> Optional[gs.Tensor]:
    """The tensor ``node`` passes through unchanged, or None when it is not a no-op."""
    op = node.op
    x = input_at(node, 0)
    if x is None:
        return None
    extra_outputs = [o for o in node.outputs[1:] if o.name and (o.outputs or is_graph_output(graph, o))]
    if op == "Identity":
        return x
    if op == "Dropout":
        if extra_outputs:
            state.skip(node_label(node), "its mask output is used")
            return None
        training = input_at(node, 2)
        tv = _const(training, input_names)
        if training is not None and (tv is None or bool(np.asarray(tv).reshape(-1)[0])):
            state.skip(node_label(node), "training_mode is not a constant false")
            return None
        return x
    if extra_outputs:
        return None
    out = node.outputs[0]
    if op == "Cast":
        to = node.attrs.get("to")
        et = _elem_type_of(x, shapes)
        return x if et and to is not None and int(to) == et else None
    if op in ("Reshape", "Expand"):
        s_in, s_out = _shape_of(x, shapes), _shape_of(out, shapes)
        return x if _static(s_in) and _static(s_out) and s_in == s_out else None
    if op == "Transpose":
        perm = node.attrs.get("perm")
        shape = _shape_of(x, shapes)
        if perm is None:
            return x if shape is not None and len(shape) <= 1 else None
        return x if list(perm) == list(range(len(perm))) else None
    if op == "Concat":
        return x if len(node.inputs) == 1 else None
    if op in ("Mul", "Div", "Add", "Sub"):
        return _neutral_operand(node, graph, shapes, input_names)
    if op == "Pad":
        pads = node.attrs.get("pads") if "pads" in node.attrs else _const(input_at(node, 1), input_names)
        return x if pads is not None and np.all(np.asarray(pads) == 0) else None
    if op == "Slice":
        return x if _slice_takes_all(node, x, shapes, input_names) else None
    return None


def _neutral_operand(node: gs.Node, graph: gs.Graph, shapes: dict, input_names: set) -> Optional[gs.Tensor]:
    if len(node.inputs) != 2:
        return None
    neutral = 1 if node.op in ("Mul", "Div") else 0
    sides = [(0, 1)] if node.op in ("Sub", "Div") else [(0, 1), (1, 0)]
    for xi, ci in sides:
        x, c = node.inputs[xi], node.inputs[ci]
        if not _is_const(c, input_names) or c is None:
            continue
        value = np.asarray(constant_value(c))
        if value.size == 0 or not np.all(value == neutral):
            continue
        if value.ndim == 0:
            return x
        xs = _shape_of(x, shapes)
        if xs is None or value.ndim > len(xs):
            continue
        # Broadcast-safe: every constant dim is 1 or equal to x's static dim, so the result has x's shape.
        tail = xs[len(xs) - value.ndim:]
        if all(cd == 1 or (xd is not None and cd == xd) for cd, xd in zip(value.shape, tail)):
            return x
    return None


def _slice_takes_all(node: gs.Node, x: gs.Tensor, shapes: dict, input_names: set) -> bool:
    shape = _shape_of(x, shapes)
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = [_const(input_at(node, i), input_names) for i in range(1, 5)]
        if any(v is None and input_at(node, i) is not None for i, v in enumerate(vals, 1)):
            return False
        starts, ends, axes, steps = (None if v is None else np.asarray(v).reshape(-1).astype(np.int64) for v in vals)
        if starts is None or ends is None:
            return False
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        s, e, a, st = int(s), int(e), int(a), int(st)
        if st != 1:
            return False
        dim = None
        if shape is not None:
            a = a + len(shape) if a < 0 else a
            if not 0 <= a < len(shape):
                return False
            dim = shape[a]
        # Unknown extent: only the canonical "everything" slice [0, INT_MAX) is known to take all.
        takes_all = (s == 0 and e >= 2**31 - 1) if dim is None else _clamp_slice(s, e, 1, dim)[:2] == (0, dim)
        if not takes_all:
            return False
    return True


# --------------------------------------------------------------------------- 5. Pad folding
def _pad_spec(node: gs.Node, shapes: dict, input_names: set) -> tuple:
    """(per-axis begin pads, per-axis end pads, pad value) for a constant-mode Pad, or a reason str."""
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"mode '{mode}' is not constant"
    if "pads" in node.attrs:  # opset < 11
        pads = np.asarray(node.attrs["pads"], dtype=np.int64)
        value = float(node.attrs.get("value", 0.0))
        axes = None
    else:
        pads = _const(input_at(node, 1), input_names)
        if pads is None:
            return "pads are not constant"
        pads = np.asarray(pads).astype(np.int64).reshape(-1)
        v, a = _const(input_at(node, 2), input_names), _const(input_at(node, 3), input_names)
        if input_at(node, 2) is not None and v is None:
            return "pad value is not constant"
        if input_at(node, 3) is not None and a is None:
            return "axes are not constant"
        value = float(np.asarray(v).reshape(-1)[0]) if v is not None and np.asarray(v).size else 0.0
        axes = None if a is None else np.asarray(a).astype(np.int64).reshape(-1)
    shape = _shape_of(node.inputs[0], shapes)
    rank = len(pads) // 2 if axes is None else (len(shape) if shape is not None else None)
    if rank is None:
        return "input rank unknown"
    begin, end = [0] * rank, [0] * rank
    axes = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
    for i, a in enumerate(axes):
        begin[a], end[a] = int(pads[i]), int(pads[len(axes) + i])
    return begin, end, value


def _fold_pads(graph: gs.Graph, shapes: dict, state: _State) -> int:
    input_names = {t.name for t in graph.inputs} | state.overridable
    folded = 0
    for pad in list(graph.nodes):
        if pad.op != "Pad" or not pad.outputs or not pad.inputs:
            continue
        out = pad.outputs[0]
        consumer = sole_consumer(graph, out)
        if consumer is None or consumer.op not in ("Conv", "AveragePool", "MaxPool") or consumer.inputs[0] is not out:
            continue
        spec = _pad_spec(pad, shapes, input_names)
        if isinstance(spec, str):
            state.skip(node_label(pad), f"not folded into {consumer.op}: {spec}")
            continue
        begin, end, value = spec
        reason = _pad_fold_reason(pad, consumer, begin, end, value, graph, input_names)
        if reason:
            state.skip(node_label(pad), f"not folded into {node_label(consumer)}: {reason}")
            continue
        k = len(begin) - 2
        own = list(consumer.attrs.get("pads", [0] * (2 * k)))
        new = [own[i] + begin[2 + i] for i in range(k)] + [own[k + i] + end[2 + i] for i in range(k)]
        if consumer.op != "Conv":
            # onnxruntime's rule, and it guarantees every window sees a real element
            kernel = list(consumer.attrs["kernel_shape"])
            if any(new[i] >= kernel[i] or new[k + i] >= kernel[i] for i in range(k)):
                state.skip(node_label(pad), f"not folded into {node_label(consumer)}: resulting pads {new} not below kernel {kernel}")
                continue
            if consumer.op == "AveragePool":
                consumer.attrs["count_include_pad"] = 1  # the explicit zeros were counted
        consumer.attrs["pads"] = new
        consumer.attrs["auto_pad"] = "NOTSET"
        swap_input(consumer, out, pad.inputs[0])
        pad.outputs.clear()
        folded += 1
        state.changes[f"pads_folded_into_{consumer.op.lower()}"] += 1
        state.details.append(f"Pad '{out.name}' folded into {node_label(consumer)}: pads {new}")
    return folded


def _pad_fold_reason(pad: gs.Node, consumer: gs.Node, begin: list, end: list, value: float,
                     graph: gs.Graph, input_names: set) -> Optional[str]:
    if len(begin) < 3:
        return "Pad input has rank < 3"
    if begin[0] or begin[1] or end[0] or end[1]:
        return "pads the batch or channel axis"
    if min(begin + end) < 0:
        return "negative pads (a crop)"
    auto_pad = consumer.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad}"
    if consumer.op == "Conv":
        return None if value == 0.0 else f"pad value {value} is not 0"
    if int(consumer.attrs.get("ceil_mode", 0)):
        return "ceil_mode=1"
    if consumer.op == "AveragePool":
        if value != 0.0:
            return f"pad value {value} is not 0"
        if not int(consumer.attrs.get("count_include_pad", 0)) and any(consumer.attrs.get("pads", [])):
            return "count_include_pad=0 with own padding (explicit zeros would count, pool pads would not)"
        return None
    # MaxPool
    if any(o.name and (o.outputs or is_graph_output(graph, o)) for o in consumer.outputs[1:]):
        return "its Indices output is used"
    if any(d != 1 for d in consumer.attrs.get("dilations", [])):
        return "dilated MaxPool"
    if int(consumer.attrs.get("storage_order", 0)):
        return "storage_order=1"
    if value == float("-inf") or (value == 0.0 and _non_negative(pad.inputs[0], input_names)):
        return None
    return f"pad value {value} is neither -inf nor 0 on a provably non-negative input"


def _non_negative(t: gs.Tensor, input_names: set) -> bool:
    prod = t.inputs[0] if len(t.inputs) == 1 else None
    if prod is None:
        return False
    if prod.op == "Relu":
        return True
    if prod.op == "Clip":
        lo = prod.attrs["min"] if "min" in prod.attrs else _const(input_at(prod, 1), input_names)
        return lo is not None and float(np.asarray(lo).reshape(-1)[0]) >= 0.0
    return False
