"""Where Q/DQ go: a placement algorithm that emits *commands*, applied later by ``quantize``.

Nothing here edits the graph: :func:`plan` reads a shape-inferred onnx-graphsurgeon graph (every
node uniquely named) and returns a :class:`Plan` of :class:`WeightCommand` (a weighted op's weight,
with the bias the target stores as int32) and :class:`ActivationCommand` (a ``Q -> DQ`` pair on a
tensor, read by all its readers but excluded nodes). Tensors in one *scale group* share one
scale/zero point (union-find): the inputs and output of Concat and of data-movement ops (Reshape,
Transpose, MaxPool, Resize, ...), so the runtime can move Q/DQ across them (TensorRT propagates DQ
forward and Q backward only across equal scales; onnxruntime drops the Q/DQ around such ops only
when scales match).

Two placement families (``TargetRules.placement``):

* ``inputs`` (TensorRT): Q/DQ on the data inputs of weighted ops and on the residual input of an Add
  whose other input is a weighted op's output (which fuses the Add as its epilogue), then propagated
  backward through data-movement ops, Concat and pooling so they run in int8; never on the outputs of
  weighted ops (TensorRT: "don't quantize the outputs of weighted-operations").
* ``ops`` (onnxruntime, TIDL): Q/DQ on the float inputs and the output of every quantizable op, the
  output Q after a Relu/Clip that is the output's only reader (onnxruntime absorbs it into the
  quantized range; TI's export puts ReLU between Conv and Q), never on graph outputs; then the same
  backward propagation.

Each decision is linear in the graph: consumer maps and topological order are built once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import OptionError
from ..ir.graph import constant_value, input_at, is_graph_output, is_weight, sole_consumer
from ..ir.unionfind import UnionFind
from .options import PlacementOptions
from .targets import WEIGHTED_OPS, TargetRules, weight_axis

# Ops whose output is a rearrangement/subset of input values: same scale in and out.
PASS_THROUGH_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice",
                    "Identity", "DepthToSpace", "SpaceToDepth", "Upsample"}
# Averaging pools: int8 kernels exist, output scale may differ from the input's.
AVG_POOL_OPS = {"AveragePool", "GlobalAveragePool"}
# Ops onnxruntime (and TIDL) run in int8 when their inputs and output carry Q/DQ.
OPS_QUANTIZABLE = set(WEIGHTED_OPS) | {"Add", "Mul", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
# Activations absorbed into the quantized range of the op before them.
ABSORBABLE = {"Relu", "Clip"}
# Ops between a tensor and the graph's outputs that hand its values on as they are (or through a
# monotone terminal activation): what the tensor holds is what the user reads (output_tail).
TAIL_OPS = PASS_THROUGH_OPS | {"Concat", "Split", "Sigmoid", "Softmax", "LogSoftmax"}
FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16)}


@dataclass
class WeightCommand:
    node: str
    op: str
    input_index: int
    tensor: str                 # float weight tensor name
    axis: Optional[int]         # per-channel axis, None = per-tensor
    data_tensor: Optional[str]  # the layer's data (activation) input
    bias_index: Optional[int] = None
    bias_tensor: Optional[str] = None


@dataclass
class ActivationCommand:
    tensor: str
    group: str                  # representative tensor of its scale group
    axis: Optional[int] = None  # per-channel axis (depthwise inputs on ort), None = per-tensor


@dataclass
class Plan:
    weights: list = field(default_factory=list)
    activations: list = field(default_factory=list)
    groups: dict = field(default_factory=dict)        # representative -> [tensors]
    excluded: set = field(default_factory=set)        # node names kept in float
    skipped: list = field(default_factory=list)

    def activation_tensors(self) -> list:
        return [a.tensor for a in self.activations]


def _is_float_activation(graph: gs.Graph, t: Optional[gs.Tensor]) -> bool:
    if t is None or not isinstance(t, gs.Variable) or constant_value(t) is not None:
        return False
    try:
        return t.dtype is not None and np.dtype(t.dtype) in FLOAT_DTYPES
    except TypeError:
        return False


def excluded_nodes(graph: gs.Graph, options: PlacementOptions, weighted: list) -> tuple:
    """Node names kept in float by exclude_nodes / exclude_op_types / exclude_regex / keep_first_last."""
    names, op_types, regex = set(options.exclude_nodes), set(options.exclude_op_types), options.exclude_regex
    try:
        pattern = re.compile(regex) if regex else None
    except re.error as exc:
        raise OptionError(f"bad qdq.exclude_regex {regex!r}: {exc}.", "give a Python regular expression matched against node names") from None
    out = {n.name for n in graph.nodes
           if n.name in names or n.op in op_types or (pattern is not None and pattern.search(n.name))}
    reasons = [f"exclude_nodes: no node named '{u}'" for u in sorted(names - {n.name for n in graph.nodes})]
    if options.keep_first_last and weighted:
        first, last = first_last_layers(graph, weighted)
        out |= first | last
    return out, reasons


def first_last_layers(graph: gs.Graph, weighted: list) -> tuple:
    """Weighted nodes with no weighted ancestor (first) / no weighted descendant (last). Linear."""
    wset = {n.name for n in weighted}
    order = list(graph.nodes)
    above: dict = {}   # tensor name -> a weighted node lies upstream
    first = set()
    for n in order:
        up = any(above.get(t.name, False) for t in n.inputs if t is not None)
        if n.name in wset and not up:
            first.add(n.name)
        for o in n.outputs:
            above[o.name] = up or n.name in wset
    below: dict = {}
    last = set()
    for n in reversed(order):
        down = any(below.get(o.name, False) for o in n.outputs)
        if n.name in wset and not down:
            last.add(n.name)
        for t in n.inputs:
            if t is not None:
                below[t.name] = below.get(t.name, False) or down or n.name in wset
    return first, last


def _weighted_layout(graph: gs.Graph, node: gs.Node):
    """(weight index, data inputs, bias index) of a weighted node whose weight is constant, or a reason."""
    op = node.op
    if op in ("Conv", "ConvTranspose"):
        w = input_at(node, 1)
        if not is_weight(graph, w):
            if w is not None and w.name in getattr(graph, "overridable_inputs", ()):
                return None, (f"{node.name}: {op} weight '{w.name}' is a graph input (overridable at run time): "
                              "run cleanup first, which makes layer weights constants")
            return None, f"{node.name}: {op} weight is not a constant"
        return (1, [input_at(node, 0)], 2 if input_at(node, 2) is not None else None), None
    if op in ("Gemm", "MatMul"):
        # A is the data input (Gemm's transA only changes its layout; activations are per-tensor anyway).
        if is_weight(graph, input_at(node, 1)):
            return (1, [input_at(node, 0)], 2 if op == "Gemm" and input_at(node, 2) is not None else None), None
        return (None, [input_at(node, 0), input_at(node, 1)], None), None
    return None, f"{node.name}: not a weighted op"


def _weight_command(n: gs.Node, widx: int, data: list, bidx: Optional[int], per_channel: bool) -> Union[WeightCommand, str]:
    """How the weight of layer ``n`` is quantized, or why it stays float."""
    w = n.inputs[widx]
    wval = constant_value(w)
    if wval is None or np.dtype(wval.dtype) not in FLOAT_DTYPES:
        return f"{n.name}: weight '{w.name}' is not a float constant"
    axis = weight_axis(n.op, n.attrs, wval.ndim, int(n.attrs.get("group", 1))) if per_channel else None
    if n.op == "Gemm" and wval.ndim != 2:
        axis = None
    bias = n.inputs[bidx] if bidx is not None else None
    if bias is not None and (constant_value(bias) is None or constant_value(bias).ndim != 1):
        bias = None  # broadcast/non-constant Gemm C stays float
    data_t = data[0] if data else None
    return WeightCommand(n.name, n.op, widx, w.name, axis, data_t.name if data_t is not None else None,
                         bidx if bias is not None else None, bias.name if bias is not None else None)


def _mark_all_ops(graph: gs.Graph, nodes: list, layer_data: dict, active, excluded: set, rules: TargetRules, mark,
                  skipped: list) -> None:
    """Placement ``ops`` (onnxruntime, TIDL): the inputs and output of every active layer and quantizable op."""
    for n in nodes:
        if not active(n) or n.op not in OPS_QUANTIZABLE:
            continue
        if n.op in WEIGHTED_OPS:
            if n.name not in layer_data:
                continue
            ins = layer_data[n.name]
        else:
            ins = [t for t in n.inputs if t is not None]
            if any(constant_value(t) is not None for t in ins):
                if _is_float_activation(graph, n.outputs[0]):
                    skipped.append(f"{n.name}: {n.op} with a constant operand stays float")
                continue
        for t in ins:
            mark(t)
        out = _absorbed_output(graph, n, excluded) if rules.absorb_activations else n.outputs[0]
        if not is_graph_output(graph, out):
            mark(out)


def plan(graph: gs.Graph, rules: TargetRules, options: PlacementOptions, per_channel: bool = True, *,
         ignore_exclusions: bool = False) -> Plan:
    """Decide weight and activation quantization for ``graph`` under ``rules`` and ``options``
    (``per_channel``: the format's choice, which a per-tensor target overrides)."""
    result = Plan()
    nodes = list(graph.nodes)
    op_filter = set(options.op_types)
    weighted = [n for n in nodes if n.op in WEIGHTED_OPS and (not op_filter or n.op in op_filter)]
    if not ignore_exclusions:
        result.excluded, reasons = excluded_nodes(graph, options, weighted)
        result.skipped.extend(reasons)
    excluded = result.excluded

    def active(n: gs.Node) -> bool:
        return n.name not in excluded and (not op_filter or n.op in op_filter)

    quant: dict = {}          # tensor name -> gs.Tensor, insertion-ordered
    uf = UnionFind()

    def mark(t: Optional[gs.Tensor]) -> bool:
        if not _is_float_activation(graph, t):
            return False
        if t.name not in quant:
            quant[t.name] = t
            uf.find(t.name)
        return True

    # ---- weighted layers ------------------------------------------------------------------
    layer_data: dict = {}
    for n in weighted:
        if n.name in excluded:
            continue
        layout, reason = _weighted_layout(graph, n)
        if layout is None:
            result.skipped.append(reason)
            continue
        widx, data, bidx = layout
        if widx is not None:
            command = _weight_command(n, widx, data, bidx, rules.per_channel and per_channel)
            if isinstance(command, str):
                result.skipped.append(command)
                continue
            result.weights.append(command)
        layer_data[n.name] = data

    # ---- activations ------------------------------------------------------------------------
    if rules.placement == "inputs":
        for data in layer_data.values():   # in the order of ``weighted``
            for t in data:
                mark(t)
        _residual_adds(graph, nodes, excluded, active, layer_data, mark)
    else:
        _mark_all_ops(graph, nodes, layer_data, active, excluded, rules, mark, result.skipped)

    _propagate_backward(graph, nodes, quant, uf, active, mark, rules)

    for name in quant:
        rep = uf.find(name)
        result.groups.setdefault(rep, []).append(name)
        result.activations.append(ActivationCommand(name, rep))
    return result


def output_tail(graph: gs.Graph) -> set:
    """Names of the tensors whose every path to a graph output runs through :data:`TAIL_OPS` only
    (graph outputs included): a detector's box offsets and class scores on their way to the output
    Concat. No later layer absorbs what is done to them, so calibration keeps their full range
    (clipping YOLOX's class scores at 0.24 left no detection). Linear: one reverse topological pass."""
    outputs = {t.name for t in graph.outputs}
    tail: dict = {}
    for node in reversed(list(graph.nodes)):   # graph.nodes is topologically sorted
        for t in node.inputs:
            if t is None or not isinstance(t, gs.Variable):
                continue
            readers = t.outputs
            tail[t.name] = t.name in outputs or (bool(readers) and all(
                r.op in TAIL_OPS and all(o.name in outputs or tail.get(o.name, False) for o in r.outputs) for r in readers))
    return {name for name, is_tail in tail.items() if is_tail} | outputs


def depthwise_per_channel(graph: gs.Graph, result: Plan) -> list:
    """Put the data input of every depthwise Conv on a per-channel (axis 1) quantizer, as NNCF
    does: the channels entering a depthwise conv can differ by decades (BatchNorm folded with very
    different statistics). Only a tensor alone in its scale group is changed; returns those."""
    commands = {a.tensor: a for a in result.activations}
    changed = []
    for n in graph.nodes:
        if not _is_depthwise(n) or n.name in result.excluded:
            continue
        cmd = commands.get(n.inputs[0].name)
        # every reader a depthwise conv: a full conv's int32 bias cannot take per-input-channel scales
        if cmd is None or not all(_is_depthwise(r) for r in n.inputs[0].outputs):
            continue
        if len(result.groups.get(cmd.group, [])) == 1 and cmd.axis is None:
            cmd.axis = 1
            changed.append(cmd.tensor)
    return changed


def _is_depthwise(n: gs.Node) -> bool:
    """A Conv with one input channel per group and one output channel per group."""
    if n.op != "Conv" or not n.inputs:
        return False
    w = constant_value(input_at(n, 1))
    group = int(n.attrs.get("group", 1))
    return w is not None and group > 1 and w.ndim >= 3 and w.shape[0] == group and w.shape[1] == 1


def _absorbed_output(graph: gs.Graph, node: gs.Node, excluded: set) -> gs.Tensor:
    """The tensor whose Q ends ``node``'s quantized region: after one following Relu/Clip. An
    unfused BatchNormalization right after a weighted op is stepped over (it folds into the layer
    at deployment); run bnfuse first for onnxruntime, which fuses only folded layers."""
    out = node.outputs[0]
    nxt = sole_consumer(graph, out)
    if nxt is not None and nxt.op == "BatchNormalization" and node.op in WEIGHTED_OPS and nxt.name not in excluded:
        out = nxt.outputs[0]
        nxt = sole_consumer(graph, out)
    if nxt is None or nxt.op not in ABSORBABLE or nxt.name in excluded:
        return out
    if nxt.op == "Clip" and any(input_at(nxt, i) is not None and constant_value(input_at(nxt, i)) is None for i in (1, 2)):
        return out  # a run-time clip range cannot be folded into the quantized range
    return nxt.outputs[0]


def _producer_fuses(graph: gs.Graph, t: gs.Tensor, layer_data: dict) -> bool:
    """True when ``t`` is the sole-consumer output of a quantized weighted op (possibly via BN)."""
    if sole_consumer(graph, t) is None or len(t.inputs) != 1:
        return False
    p = t.inputs[0]
    if p.op == "BatchNormalization" and len(p.inputs) and len(p.inputs[0].inputs) == 1 and len(p.inputs[0].outputs) == 1:
        p = p.inputs[0].inputs[0]
    return p.op in WEIGHTED_OPS and p.name in layer_data


def _residual_adds(graph, nodes, excluded, active, layer_data, mark) -> None:
    """TensorRT: quantize the residual input of Add(conv_branch, residual) so the conv fuses the Add."""
    for n in nodes:
        if n.op != "Add" or not active(n) or len(n.inputs) != 2:
            continue
        a, b = n.inputs
        fa, fb = _producer_fuses(graph, a, layer_data), _producer_fuses(graph, b, layer_data)
        if fa:
            mark(b)  # when both branches are convs, one fuses the Add and the other is its int8 input
        elif fb:
            mark(a)


def _propagate_backward(graph, nodes, quant, uf, active, mark, rules) -> None:
    """Quantize inputs of data-movement ops, Concat and pools whose output is quantized."""
    for n in reversed(nodes):
        if not active(n) or not n.outputs:
            continue
        out = n.outputs[0]
        if out.name not in quant:
            continue
        if n.op in PASS_THROUGH_OPS or n.op == "Concat":
            # (a linear Resize interpolates, but stays within its input's range: same scale too)
            for src in (n.inputs if n.op == "Concat" else [input_at(n, 0)]):
                if mark(src):
                    uf.union(out.name, src.name)
        elif n.op in AVG_POOL_OPS:
            mark(input_at(n, 0))


NONNEG_OPS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp"}


def nonnegative_tensors(graph: gs.Graph) -> set:
    """Tensors that are >= 0 by construction (ReLU/Clip(min>=0)/Sigmoid outputs and what only
    rearranges or pools them); symmetric targets quantize them unsigned. One topological pass."""
    nonneg: set = set()
    for n in graph.nodes:
        if not n.outputs:
            continue
        ok = n.op in NONNEG_OPS
        if n.op == "Clip":
            lo = constant_value(input_at(n, 1)) if input_at(n, 1) is not None else n.attrs.get("min")
            ok = lo is not None and float(np.asarray(lo).reshape(-1)[0]) >= 0.0
        elif n.op in PASS_THROUGH_OPS or n.op in AVG_POOL_OPS:
            src = input_at(n, 0)
            ok = src is not None and src.name in nonneg
        elif n.op == "Concat":
            ok = all(t is not None and t.name in nonneg for t in n.inputs)
        if ok:
            nonneg.update(o.name for o in n.outputs)
    return nonneg
