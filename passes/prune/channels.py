"""Channel dependency analysis on an ONNX graph, and the rewrite that physically removes channels.

Every tensor that carries channels gets an array of *slot* ids, one per position along its channel
axis. Slots that must be removed together are merged with a union-find; a *component* (one root)
is the smallest unit that can be pruned. Rules per operator, applied in one topological traversal:

* producers (Conv, ConvTranspose, Gemm/MatMul with a constant weight) create fresh output slots;
  their data input's slots are *consumed* (input channels of the weight);
* per-channel ops (BN, activations, pools, Resize, Dropout, Cast...) alias their input's slots;
  Transpose / Squeeze / Unsqueeze / keepdims=0 reductions move the channel axis;
* broadcasting elementwise ops (Add/Mul/Sub/Div/Max/Where/PRelu...) union the slots of operands of
  the same width (residual Adds tie their producers); a constant operand with a full channel dim is
  sliced with the output; a width-1 operand is broadcast and left alone;
* Concat on the channel axis concatenates slot arrays (the offsets come for free), Split and a
  step-1 Slice on the channel axis take sub-arrays (their sizes / starts / ends are rewritten);
* a channel-axis constant Pad (the CIFAR ResNet "option A" shortcut) adds fresh slots for the padded
  channels; the Pad amounts are rewritten, also when they were computed by a constant shape chain;
* depthwise convs (Cin/group == 1) tie input channel k to the outputs of group k (whole groups are
  removed and ``group`` shrinks); other grouped convs tie the same position across all groups on
  each side, so every group keeps the same size and ``group`` is unchanged;
* Flatten / Reshape that merge the channel axis with the trailing dims (GAP -> Flatten -> Gemm)
  repeat each slot over the merged positions; a Reshape that splits a feature axis into
  channels x rest unions each row; any other Reshape is not understood.

Anything not understood -- an unknown consumer, a graph output, a non-constant weight, an outer
tensor used inside a subgraph, an unknown shape -- *poisons* the slots involved: they are merged
with slot 0, and the component of slot 0 is never pruned. The result is never a wrong graph.

Weights in ``Constant`` nodes count as weights (``graph.constant_value``); parameter inputs
computed from constants only (Unsqueeze/Concat/Shape chains) are evaluated once in onnxruntime.
The analysis is linear in the graph size plus the total channel width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, helper

from onnxopt.errors import OnnxoptError
from onnxopt.ir.graph import NameGenerator, constant_value, export_graph, import_graph, input_at, is_weight, set_input
from onnxopt.ir.proto import producers
from onnxopt.ir.unionfind import UnionFind
from onnxopt.model_io import opset_of, subgraph_reads
from onnxopt.runtime import run
from onnxopt.stats import static_shapes

POISON = 0

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Identity", "Cast",
    "Floor", "Ceil", "Round", "Sign", "Gelu", "Mish", "ThresholdedRelu", "Clip", "Sin", "Cos", "Not",
    "IsNaN", "IsInf", "Dropout", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Resize", "Upsample", "Shrink", "CastLike",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
               "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
# parameter inputs whose values the rules need (evaluated when computed from constants only)
PARAM_INPUTS = {"Slice": (1, 2, 3, 4), "Pad": (1, 3), "Reshape": (1,), "Split": (1,), "Resize": (1, 2, 3),
                "Upsample": (1,), "Squeeze": (1,), "Unsqueeze": (1,), **{r: (1,) for r in REDUCE}}
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class SlotSets(UnionFind):
    """The union-find over integer channel slots, numbered densely from 0 by :meth:`new`; the
    smaller slot of two sets names the merged one, so slot 0 (POISON) always stays a root."""

    def __init__(self):
        super().__init__()
        self.parent[POISON] = POISON

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.update((i, i) for i in range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(int(a)), self.find(int(b))
        return super().union(min(ra, rb), max(ra, rb))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def poison(self, ids: np.ndarray) -> None:
        for x in ids.tolist():
            self.union(x, POISON)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(x) for x in ids.tolist()), dtype=np.int64, count=len(ids))


@dataclass
class Slots:
    """The channel slots of one tensor: ``ids[i]`` is the slot of position i along ``axis``."""

    axis: int
    rank: int
    ids: np.ndarray


@dataclass
class Analysis:
    """The result of :func:`analyze`; :meth:`rewrite` removes the components it is given."""

    model: ModelProto
    graph: gs.Graph
    uf: SlotSets
    slots: dict
    producers: list   # the LayerActions: the layers that create channels
    actions: list   # of the *Action classes below, in graph order
    reasons: list = field(default_factory=list)   # (where, why) for every poisoning
    params: dict = field(default_factory=dict)    # parameter values computed from constant chains

    # ----------------------------------------------------------------------- components
    def classes(self) -> dict:
        """Group the components by the set of tensors they appear in: {class key: [roots]}, POISON left out.

        Components of one class have the same "shape role" (e.g. the channels of one conv's output, or the
        residual stream of one stage): ratios, ``round_to`` and minimums apply per class."""
        rng = np.random.default_rng(12345)
        sig: dict = {}  # root -> (sum of its tensors' random keys, tensor count)
        for name, s in sorted(self.slots.items()):
            key = int(rng.integers(1, 2**62))
            for r in set(self.roots(s.ids).tolist()):
                a, n = sig.get(r, (0, 0))
                sig[r] = ((a + key) % (2**63), n + 1)
        classes: dict = {}
        for r, k in sig.items():
            if r != POISON:
                classes.setdefault(k, []).append(r)
        return {k: sorted(roots) for k, roots in classes.items()}

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The component root of each slot (the union-find is final once the analysis is built)."""
        cache = self.__dict__.get("_root_array")
        if cache is None or len(cache) != len(self.uf.parent):
            cache = self.uf.roots(np.arange(len(self.uf.parent), dtype=np.int64))
            self.__dict__["_root_array"] = cache
        return cache[np.asarray(ids, dtype=np.int64)]

    def dead_mask(self, removed) -> np.ndarray:
        """A boolean array over slots' roots: True where the component is in ``removed``."""
        if isinstance(removed, np.ndarray):
            return removed
        dead = np.zeros(len(self.uf.parent), dtype=bool)
        dead[np.array([int(r) for r in removed if int(r) != POISON], dtype=np.int64)] = True
        return dead

    def keep_mask(self, ids: np.ndarray, removed) -> np.ndarray:
        """True for the positions of ``ids`` that stay; ``removed`` is a set of roots or a dead_mask."""
        return ~self.dead_mask(removed)[self.roots(ids)]

    # --------------------------------------------------------------------------- rewrite
    def rewrite(self, removed: set) -> ModelProto:
        """Remove every channel whose component root is in ``removed`` and return the new model. Weights
        are never edited in place: every changed parameter becomes a new constant of the node that uses
        it, so a weight shared with another node stays intact."""
        removed = set(int(r) for r in removed) - {POISON}
        if removed:
            removed = self.dead_mask(removed)
            names = NameGenerator(self.graph)
            for act in self.actions:
                act.apply(self, lambda ids: self.keep_mask(ids, removed), names)
            tensors = self.graph.tensors()
            for name, s in self.slots.items():
                if name in tensors and not self.keep_mask(s.ids, removed).all():
                    tensors[name].shape = None
            self._sweep()
        return self.export()

    def _sweep(self) -> None:
        """Drop the nodes the rewrite left without readers (replaced Constant nodes, Pad-amount
        chains) in one reverse pass, so that the export's cleanup has nothing left to remove
        (onnx-graphsurgeon formats every node it removes, printing whole weight arrays)."""
        live = {t.name for t in self.graph.outputs} | _subgraph_outer_names(self.model.graph)
        keep = []
        for node in reversed(self.graph.nodes):
            has_sub = any(isinstance(v, gs.Graph) for v in node.attrs.values())
            if has_sub or any(o.name in live for o in node.outputs):
                keep.append(node)
                live.update(t.name for t in node.inputs if t is not None)
            else:
                node.inputs.clear()
                node.outputs.clear()
        self.graph.nodes = keep[::-1]

    def kill(self, roots: set) -> None:
        """Make the channels of ``roots`` exactly zero without removing them (test oracle helper): the
        producers' output rows and biases, the following BN's gamma and beta, additive constants on them;
        ``export()`` must then give the outputs of ``rewrite(roots)`` on this same analysis."""
        roots = self.dead_mask(set(int(r) for r in roots))
        names = NameGenerator(self.graph)
        for p in self.producers:
            dead = ~self.keep_mask(p.out_ids, roots)
            if not dead.any():
                continue
            node = p.node
            node.inputs[1] = gs.Constant(names("killed_w"), _zeroed(constant_value(node.inputs[1]), p.out_axis, dead))
            b = input_at(node, 2)
            bv = None if b is None else constant_value(b)
            if bv is not None and bv.ndim >= 1 and bv.shape[-1] == len(dead):
                node.inputs[2] = gs.Constant(names("killed_b"), _zeroed(bv, bv.ndim - 1, dead))
            if p.bn is not None:
                for i in (1, 2):
                    p.bn.inputs[i] = gs.Constant(names("killed_bn"), _zeroed(constant_value(p.bn.inputs[i]), 0, dead))
        for act in self.actions:
            if isinstance(act, ConstAction) and act.node.op in ("Add", "Sub"):
                dead = ~self.keep_mask(act.ids, roots)
                if dead.any():
                    v = _zeroed(constant_value(act.node.inputs[act.index]), act.axis, dead)
                    act.node.inputs[act.index] = gs.Constant(names("killed_c"), v)

    def export(self) -> ModelProto:
        return export_graph(self.graph, like=self.model)


def _zeroed(v: np.ndarray, axis: int, dead: np.ndarray) -> np.ndarray:
    """A copy of ``v`` with the positions ``dead`` along ``axis`` set to zero."""
    v = np.array(v, copy=True)
    v[(slice(None),) * axis + (dead,)] = 0
    return v


# ================================================================================= analysis
def analyze(model: ModelProto) -> Analysis:
    """Build the channel dependency analysis of ``model`` (which it does not modify)."""
    shapes = static_shapes(model)
    params = _evaluate_params(model)
    graph = import_graph(model)
    if not _is_sorted(model.graph):  # the checker requires order; a model loaded unchecked may lack it
        graph.toposort()
    a = _Analyzer(model, graph, shapes, params)
    a.run()
    return Analysis(model=model, graph=graph, uf=a.uf, slots=a.slots, producers=a.producers,
                    actions=a.actions, reasons=a.reasons, params=params)


def _is_sorted(g: onnx.GraphProto) -> bool:
    produced_later = {o for n in g.node for o in n.output if o}
    for n in g.node:
        if any(i in produced_later for i in n.input if i):
            return False
        produced_later.difference_update(n.output)
    return True


def _evaluate_params(model: ModelProto) -> dict:
    """Values of parameter inputs (Slice starts, Pad pads, Reshape shapes...) that a chain of
    constant-only nodes computes, evaluated together in one onnxruntime run."""
    g = model.graph
    const = {i.name for i in g.initializer} - {i.name for i in g.input}
    producer = producers(g)
    derivable = set(const)
    for node in g.node:  # nodes of a valid model are topologically sorted
        if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "If", "Loop", "Scan"):
            continue
        if all(i == "" or i in derivable for i in node.input):
            derivable.update(o for o in node.output if o)
    inputs = [node.input[i] for node in g.node for i in PARAM_INPUTS.get(node.op_type, ()) if i < len(node.input)]
    # those a chain of nodes computes (a Constant node's value is read as it is)
    wanted = list(dict.fromkeys(t for t in inputs if t and t in derivable and t not in const
                                and t in producer and producer[t].op_type != "Constant"))
    if not wanted:
        return {}
    needed, stack = set(), list(wanted)
    while stack:
        t = stack.pop()
        p = producer.get(t)
        if p is None or id(p) in needed:
            continue
        needed.add(id(p))
        stack.extend(i for i in p.input if i)
    nodes = [n for n in g.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    sub = helper.make_graph(nodes, "params", [], [helper.make_empty_tensor_value_info(w) for w in wanted],
                            [i for i in g.initializer if i.name in used])
    m = helper.make_model(sub, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    try:
        return run(m, {}, wanted)
    except OnnxoptError:  # a chain onnxruntime cannot load or evaluate leaves the parameter unknown (poisons)
        return {}


def _on_slots(handler):
    """A rule that acts only when the node's first input carries channel slots: ``handler(self, node, s)``."""
    def run(self, node: gs.Node) -> None:
        s = self.S(node.inputs[0]) if node.inputs else None
        if s is not None:
            handler(self, node, s)
    return run


class _Analyzer:
    def __init__(self, model: ModelProto, graph: gs.Graph, shapes: dict, params: dict):
        self.model, self.graph, self.shapes, self.params = model, graph, shapes, params
        self.opset = opset_of(model)
        self.uf = SlotSets()
        self.slots: dict[str, Slots] = {}
        self.actions: list = []   # the *Action records, in graph order
        self.reasons: list = []   # (where, why) of every poisoning
        # onnx-graphsurgeon drops initializer-backed graph inputs from graph.inputs, so
        # graph.is_weight cannot see them: a weight the user may override at run time is no weight
        self.input_names = {i.name for i in model.graph.input}

    # ----------------------------------------------------------------------- utilities
    def weight(self, t) -> bool:
        return t is not None and t.name not in self.input_names and is_weight(self.graph, t)

    def S(self, t) -> Optional[Slots]:
        return None if t is None else self.slots.get(t.name)

    def poison(self, t, why: str, where: gs.Node | None = None) -> None:
        s = self.S(t)
        if s is not None:
            self.uf.poison(s.ids)
            self.reasons.append((where.name if where is not None and where.name else t.name, why))

    def shape(self, t) -> Optional[list]:
        """The static shape, else a constant's (None: unknown)."""
        s = None if t is None else self.shapes.get(t.name)
        v = constant_value(t) if t is not None and s is None else None
        return s if v is None else list(v.shape)

    def rank(self, t) -> Optional[int]:
        s = self.S(t)
        if s is not None:
            return s.rank
        shp = self.shape(t)
        return None if shp is None else len(shp)

    def value(self, t) -> Optional[np.ndarray]:
        return _value(self.params, t)

    def axes(self, node: gs.Node) -> Optional[list]:
        """The ``axes`` attribute, else the constant value of input 1 (None when neither is given)."""
        axes = node.attrs.get("axes")
        if axes is None and input_at(node, 1) is not None:
            v = self.value(input_at(node, 1))
            if v is None:
                raise _NotUnderstood(f"{node.op} axes are not constant")
            axes = v.tolist()
        return axes

    def set(self, t, axis: int, rank: int, ids: np.ndarray) -> None:
        self.slots[t.name] = Slots(axis, rank, np.asarray(ids, dtype=np.int64))

    # --------------------------------------------------------------------------- driver
    def run(self) -> None:
        outer = _subgraph_outer_names(self.model.graph)
        for node in list(self.graph.nodes):
            if node.op == "Constant":
                continue
            native = (node.domain or "") in ("", "ai.onnx")
            handler = getattr(self, "_op_" + node.op, None) if native else None
            try:
                if handler is not None:
                    handler(node)
                elif node.op in UNARY:
                    self._unary(node)
                elif node.op in ELEMENTWISE:
                    self._elementwise(node)
                elif node.op in REDUCE:
                    self._reduce(node)
                else:
                    for t in node.inputs:
                        self.poison(t, f"{node.op} is not understood by the channel analysis", node)
            except _NotUnderstood as exc:
                n_reasons = len(self.reasons)
                for t in [*node.inputs, *node.outputs]:
                    self.poison(t, str(exc), node)
                if len(self.reasons) == n_reasons:  # nothing slotted yet: still say why
                    self.reasons.append((node.name or node.outputs[0].name, str(exc)))
        for o in self.graph.outputs:
            self.poison(o, "graph output")
        for name in outer:
            if name in self.slots:
                self.uf.poison(self.slots[name].ids)
                self.reasons.append((name, "used inside a subgraph"))
        self.producers = [a for a in self.actions if isinstance(a, LayerAction)]
        for p in self.producers:  # a BatchNormalization with constant parameters that follows the layer
            out = p.node.outputs[0]
            if len(out.outputs) == 1 and out.outputs[0].op == "BatchNormalization" and out.outputs[0].inputs[0] is out:
                bn = out.outputs[0]
                if all(constant_value(input_at(bn, i)) is not None for i in range(1, 5)):
                    p.bn = bn

    # ---------------------------------------------------------------------------- rules
    def _unary(self, node: gs.Node) -> None:
        s = self.S(node.inputs[0]) if node.inputs else None
        for t in node.inputs[1:]:
            self.poison(t, f"{node.op} parameter input carries channels", node)
        if s is None:
            return
        if node.op == "Resize" or node.op == "Upsample":
            self._resize(node, s)
        for extra in node.outputs[1:]:
            if extra.outputs or any(o is extra for o in self.graph.outputs):
                raise _NotUnderstood(f"{node.op} second output is used")
        if node.op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxPool", "AveragePool", "LpPool") and s.axis != 1:
            raise _NotUnderstood(f"{node.op} channel axis is not 1")
        self.set(node.outputs[0], s.axis, s.rank, s.ids)

    def _resize(self, node: gs.Node, s: Slots) -> None:
        if node.op == "Upsample" or self.opset < 11:
            idx_scales, idx_sizes = (1 if len(node.inputs) > 1 else None), None
        else:
            idx_scales, idx_sizes = 2, 3
        scales = self.value(input_at(node, idx_scales)) if idx_scales is not None else (
            np.array(node.attrs["scales"]) if "scales" in node.attrs else None)
        sizes = self.value(input_at(node, idx_sizes)) if idx_sizes is not None else None
        if "axes" in node.attrs:
            raise _NotUnderstood("Resize with axes")
        if sizes is not None and sizes.size:
            self.actions.append(ShapeAction(node, s.axis, "same", 1, s.ids, sizes.tolist(), idx_sizes))
        elif scales is not None and scales.size:
            if abs(float(scales[s.axis]) - 1.0) > 0:
                raise _NotUnderstood("Resize scales the channel axis")
        else:
            raise _NotUnderstood("Resize scales/sizes are not constant")

    def _elementwise(self, node: gs.Node) -> None:
        # the operands present (an omitted optional input is None or an empty, unproduced Variable)
        ins = [(i, t) for i, t in enumerate(node.inputs)
               if t is not None and not (isinstance(t, gs.Variable) and t.name == "" and not t.inputs)]
        slotted = [(i, t, self.S(t)) for i, t in enumerate(node.inputs) if self.S(t) is not None]
        if not slotted:
            return
        ranks = [self.rank(t) for _, t in ins]
        if any(r is None for r in ranks):
            raise _NotUnderstood(f"{node.op} operand of unknown rank")
        out_rank = max(ranks)
        offs = {s.rank - s.axis for _, _, s in slotted}
        if len(offs) != 1:
            raise _NotUnderstood(f"{node.op} operands have their channels on different axes")
        p = offs.pop()  # channel position counted from the right
        width = max(len(s.ids) for _, _, s in slotted)
        ref = next(s for _, _, s in slotted if len(s.ids) == width)
        for i, t in ins:
            s = self.S(t)
            if s is not None:
                if len(s.ids) == width:
                    if s is not ref:
                        self.uf.union_arrays(ref.ids, s.ids)
                elif len(s.ids) == 1:
                    self.poison(t, f"{node.op} broadcasts a 1-channel operand", node)
                else:
                    raise _NotUnderstood(f"{node.op} operands of different channel widths")
                continue
            shp = self.shape(t)
            if shp is None:
                raise _NotUnderstood(f"{node.op} operand '{t.name}' has an unknown shape")
            ax = len(shp) - p
            d = shp[ax] if ax >= 0 else 1
            if d != 1 and d == width and self.weight(t):  # a constant operand is sliced with the output
                self.actions.append(ConstAction(node, i, ax, ref.ids))
            elif d != 1:
                why = ("does not broadcast along channels" if d != width
                       else "is a full-width runtime tensor without channel slots")
                raise _NotUnderstood(f"{node.op} operand '{t.name}' {why}")
        self.set(node.outputs[0], out_rank - p, out_rank, ref.ids)

    @_on_slots
    def _reduce(self, node: gs.Node, s: Slots) -> None:
        axes = self.axes(node)
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                self.set(node.outputs[0], s.axis, s.rank, s.ids)
                return
            raise _NotUnderstood(f"{node.op} reduces over all axes, channels included")
        axes = sorted(int(a) % s.rank for a in axes)
        if s.axis in axes:
            raise _NotUnderstood(f"{node.op} reduces over the channel axis")
        keep = int(node.attrs.get("keepdims", 1))
        axis = s.axis if keep else s.axis - sum(1 for a in axes if a < s.axis)
        self.set(node.outputs[0], axis, s.rank if keep else s.rank - len(axes), s.ids)

    @_on_slots
    def _op_Softmax(self, node: gs.Node, s: Slots) -> None:
        axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1)) % s.rank
        if axis == s.axis or (self.opset < 13 and axis <= s.axis):
            raise _NotUnderstood(f"{node.op} normalizes over the channel axis")
        self.set(node.outputs[0], s.axis, s.rank, s.ids)

    _op_LogSoftmax = _op_Hardmax = _op_Softmax

    @_on_slots
    def _op_Shape(self, node: gs.Node, s: Slots) -> None:
        start = int(node.attrs.get("start", 0)) % (s.rank + 1) if "start" in node.attrs else 0
        end = node.attrs.get("end")
        end = s.rank if end is None else (int(end) if int(end) >= 0 else int(end) + s.rank)
        if start <= s.axis < end:
            raise _NotUnderstood("Shape reads the channel count")

    @_on_slots
    def _op_BatchNormalization(self, node: gs.Node, s: Slots) -> None:
        if s.axis != 1 or any(not self.weight(input_at(node, i)) for i in range(1, 5)):
            raise _NotUnderstood("BatchNormalization with runtime parameters or channels not on axis 1")
        if any(o.outputs for o in node.outputs[1:]) or int(node.attrs.get("training_mode", 0)):
            raise _NotUnderstood("BatchNormalization in training mode")
        self.actions.extend(ConstAction(node, i, 0, s.ids) for i in (1, 2, 3, 4))
        self.set(node.outputs[0], s.axis, s.rank, s.ids)

    @_on_slots
    def _op_InstanceNormalization(self, node: gs.Node, s: Slots) -> None:
        if s.axis != 1 or any(not self.weight(input_at(node, i)) for i in (1, 2)):
            raise _NotUnderstood("InstanceNormalization with runtime parameters")
        self.actions.extend(ConstAction(node, i, 0, s.ids) for i in (1, 2))
        self.set(node.outputs[0], s.axis, s.rank, s.ids)

    def _op_Conv(self, node: gs.Node) -> None:
        x, w, b = node.inputs[0], input_at(node, 1), input_at(node, 2)
        sx = self.S(x)
        if not self.weight(w) or (b is not None and not self.weight(b)):
            raise _NotUnderstood("Conv weight or bias is not a constant")
        wv = constant_value(w)
        if sx is not None and sx.axis != 1:
            self.poison(x, "Conv input channels not on axis 1", node)
            sx = None
        g = int(node.attrs.get("group", 1))
        cout, cin_g = int(wv.shape[0]), int(wv.shape[1])
        out = self.uf.new(cout)
        mode = "dense" if g <= 1 else "depthwise" if cin_g == 1 and sx is not None else "grouped"
        if mode == "depthwise":  # input k feeds the outputs of group k
            self.uf.union_arrays(np.repeat(sx.ids[:g], cout // g), out)
        elif mode == "grouped":  # the same position is tied across all groups, on each side
            b_g = cout // g
            for k in range(1, g):
                self.uf.union_arrays(out[:b_g], out[k * b_g:(k + 1) * b_g])
                if sx is not None:
                    self.uf.union_arrays(sx.ids[:cin_g], sx.ids[k * cin_g:(k + 1) * cin_g])
        self.set(node.outputs[0], 1, self.rank(x) or wv.ndim, out)
        self.actions.append(LayerAction("conv", node, None if sx is None else sx.ids, out, mode))

    def _op_ConvTranspose(self, node: gs.Node) -> None:
        x, w, b = node.inputs[0], input_at(node, 1), input_at(node, 2)
        if not self.weight(w) or (b is not None and not self.weight(b)):
            raise _NotUnderstood("ConvTranspose weight or bias is not a constant")
        if int(node.attrs.get("group", 1)) != 1:
            raise _NotUnderstood("grouped ConvTranspose")
        sx = self.S(x)
        if sx is not None and sx.axis != 1:
            raise _NotUnderstood("ConvTranspose input channels not on axis 1")
        wv = constant_value(w)
        out = self.uf.new(int(wv.shape[1]))
        self.set(node.outputs[0], 1, self.rank(x) or wv.ndim, out)
        self.actions.append(LayerAction("convT", node, None if sx is None else sx.ids, out))

    def _op_Gemm(self, node: gs.Node) -> None:
        a, w, c = node.inputs[0], input_at(node, 1), input_at(node, 2)
        sa = self.S(a)
        if not self.weight(w):
            raise _NotUnderstood("Gemm weight is not a constant")
        if sa is not None and (int(node.attrs.get("transA", 0)) or sa.axis != 1):
            raise _NotUnderstood("Gemm reads its features along another axis (transA)")
        wv = constant_value(w)
        n = int(wv.shape[0] if int(node.attrs.get("transB", 0)) else wv.shape[1])
        out = self.uf.new(n)
        sc = self.S(c)
        if sc is not None:
            if sc.rank - sc.axis != 1 or len(sc.ids) != n:
                raise _NotUnderstood("Gemm C operand carries channels on another axis")
            self.uf.union_arrays(out, sc.ids)
        elif c is not None:
            cshape = self.shape(c)
            if cshape is None:
                raise _NotUnderstood("Gemm C of unknown shape")
            if cshape and cshape[-1] == n and n > 1:
                if not self.weight(c):
                    raise _NotUnderstood("Gemm C is a runtime tensor")
                self.actions.append(ConstAction(node, 2, len(cshape) - 1, out))
        self.set(node.outputs[0], 1, 2, out)
        self.actions.append(LayerAction("gemm", node, None if sa is None else sa.ids, out))

    def _op_MatMul(self, node: gs.Node) -> None:
        a, w = node.inputs[0], node.inputs[1]
        sa = self.S(a)
        constant = self.weight(w) and constant_value(w).ndim == 2
        if self.S(w) is not None or (sa is not None and not constant):
            raise _NotUnderstood("MatMul with a runtime right operand")
        if not constant:  # no layer, and no channels to follow
            return
        ra = self.rank(a)
        if ra is None or ra < 2:
            raise _NotUnderstood("MatMul left operand of unknown or vector rank")
        if sa is not None and sa.axis != ra - 1:  # rows and batch dims pass through unchanged
            self.set(node.outputs[0], sa.axis, ra, sa.ids)
            return
        out = self.uf.new(int(constant_value(w).shape[1]))
        self.set(node.outputs[0], ra - 1, ra, out)
        self.actions.append(LayerAction("matmul", node, None if sa is None else sa.ids, out))

    def _op_Concat(self, node: gs.Node) -> None:
        ss = [self.S(t) for t in node.inputs]
        if all(s is None for s in ss):
            return
        rank = next(s.rank for s in ss if s is not None)
        axis = int(node.attrs["axis"]) % rank
        if all(s is None or s.axis == axis for s in ss):
            parts = []
            for t, s in zip(node.inputs, ss):
                if s is None:  # fresh slots, poisoned: a tensor without slots never changes width
                    shp = self.shape(t)
                    if shp is None or shp[axis] is None:
                        raise _NotUnderstood(f"Concat input '{t.name}' of unknown width")
                    s = Slots(axis, rank, self.uf.new(int(shp[axis])))
                    self.uf.poison(s.ids)
                parts.append(s.ids)
            self.set(node.outputs[0], axis, rank, np.concatenate(parts))
            return
        if any(s is None for s in ss) or len({(s.axis, len(s.ids)) for s in ss}) != 1:
            raise _NotUnderstood("Concat mixes channel layouts")
        for s in ss[1:]:
            self.uf.union_arrays(ss[0].ids, s.ids)
        self.set(node.outputs[0], ss[0].axis, rank, ss[0].ids)

    @_on_slots
    def _op_Split(self, node: gs.Node, s: Slots) -> None:
        axis = int(node.attrs.get("axis", 0)) % s.rank
        outs = node.outputs
        if axis != s.axis:
            for o in outs:
                self.set(o, s.axis, s.rank, s.ids)
            return
        if "split" in node.attrs:
            sizes = [int(v) for v in node.attrs["split"]]
        elif input_at(node, 1) is not None:
            v = self.value(input_at(node, 1))
            if v is None:
                raise _NotUnderstood("Split sizes are not constant")
            sizes = [int(x) for x in v.tolist()]
        else:
            n, k = len(s.ids), len(outs)
            size = -(-n // k)
            sizes = [min(size, n - i * size) for i in range(k)]
        if sum(sizes) != len(s.ids) or len(sizes) != len(outs):
            raise _NotUnderstood("Split sizes do not match the channel count")
        parts = np.split(s.ids, np.cumsum(sizes)[:-1])
        for o, part in zip(outs, parts):
            self.set(o, s.axis, s.rank, part)
        self.actions.append(SplitAction(node, parts))

    @_on_slots
    def _op_Slice(self, node: gs.Node, s: Slots) -> None:
        if self.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes = node.attrs.get("axes", list(range(len(starts or []))))
            steps = [1] * len(starts or [])
        else:
            vals = [self.value(input_at(node, i)) for i in range(1, 5)]  # starts, ends, axes, steps
            if vals[0] is None or vals[1] is None or any(
                    vals[i - 1] is None and input_at(node, i) is not None for i in (3, 4)):  # axes, steps given
                raise _NotUnderstood("Slice parameters are not constant")
            starts, ends = vals[0].tolist(), vals[1].tolist()
            axes = vals[2].tolist() if vals[2] is not None else list(range(len(starts)))
            steps = vals[3].tolist() if vals[3] is not None else [1] * len(starts)
        if starts is None or ends is None:
            raise _NotUnderstood("Slice parameters are not constant")
        axes = [int(a) % s.rank for a in axes]
        if s.axis not in axes:
            self.set(node.outputs[0], s.axis, s.rank, s.ids)
            return
        j = axes.index(s.axis)
        if int(steps[j]) != 1:
            raise _NotUnderstood("Slice with a step on the channel axis")
        n = len(s.ids)
        lo, hi, _ = slice(int(max(min(starts[j], 2**62), -2**62)), int(max(min(ends[j], 2**62), -2**62))).indices(n)
        hi = max(hi, lo)
        self.set(node.outputs[0], s.axis, s.rank, s.ids[lo:hi])
        self.actions.append(SliceAction(node, j, s.ids, lo, hi))

    @_on_slots
    def _op_Pad(self, node: gs.Node, s: Slots) -> None:
        if self.opset < 11:
            pads = np.array(node.attrs.get("pads", node.attrs.get("paddings")), dtype=np.int64)
        else:
            pads = self.value(input_at(node, 1))
            if pads is None:
                raise _NotUnderstood("Pad amounts are not constant")
            if input_at(node, 3) is not None:
                axes = self.value(input_at(node, 3))
                if axes is None:
                    raise _NotUnderstood("Pad axes are not constant")
                full = np.zeros(2 * s.rank, dtype=np.int64)
                for k, ax in enumerate(int(v) % s.rank for v in axes.tolist()):
                    full[ax], full[ax + s.rank] = pads[k], pads[k + len(axes)]
                pads = full
        pads = np.asarray(pads, dtype=np.int64).reshape(-1)
        if len(pads) != 2 * s.rank:
            raise _NotUnderstood("Pad amounts of the wrong length")
        pb, pe = int(pads[s.axis]), int(pads[s.axis + s.rank])
        if pb == 0 and pe == 0:
            self.set(node.outputs[0], s.axis, s.rank, s.ids)
            return
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant" or pb < 0 or pe < 0:
            raise _NotUnderstood(f"Pad of the channel axis in mode {mode} / negative")
        before, after = self.uf.new(pb), self.uf.new(pe)
        self.set(node.outputs[0], s.axis, s.rank, np.concatenate([before, s.ids, after]))
        self.actions.append(PadAction(node, s.axis, s.rank, pads, before, after))

    @_on_slots
    def _op_Transpose(self, node: gs.Node, s: Slots) -> None:
        perm = node.attrs.get("perm") or list(range(s.rank))[::-1]
        self.set(node.outputs[0], list(perm).index(s.axis), s.rank, s.ids)

    @_on_slots
    def _op_Squeeze(self, node: gs.Node, s: Slots) -> None:
        axes = self.axes(node)
        if axes is None:
            shp = self.shape(node.inputs[0])
            if shp is None:
                raise _NotUnderstood("Squeeze of unknown shape")
            axes = [i for i, d in enumerate(shp) if d == 1]
        axes = [int(a) % s.rank for a in axes]
        if s.axis in axes:
            raise _NotUnderstood("Squeeze removes the channel axis")
        self.set(node.outputs[0], s.axis - sum(1 for a in axes if a < s.axis), s.rank - len(axes), s.ids)

    @_on_slots
    def _op_Unsqueeze(self, node: gs.Node, s: Slots) -> None:
        axes = self.axes(node)
        if axes is None:
            raise _NotUnderstood("Unsqueeze axes are not constant")
        r = s.rank + len(axes)
        axes = set(int(a) % r for a in axes)
        rest = [i for i in range(r) if i not in axes]
        self.set(node.outputs[0], rest[s.axis], r, s.ids)

    @_on_slots
    def _op_Flatten(self, node: gs.Node, s: Slots) -> None:
        axis = int(node.attrs.get("axis", 1)) % (s.rank + 1) if s.rank else 1
        shp = self.shape(node.inputs[0])
        if shp is None or len(shp) != s.rank:
            raise _NotUnderstood("Flatten of unknown shape")
        if axis == s.axis and all(d is not None for d in shp[s.axis + 1:]):
            self.set(node.outputs[0], 1, 2, np.repeat(s.ids, int(np.prod(shp[s.axis + 1:]))))
            return
        if axis > s.axis and all(d == 1 for d in shp[:s.axis]) and all(d == 1 for d in shp[s.axis + 1:axis]):
            raise _NotUnderstood("Flatten moves channels into the outer dimension")
        raise _NotUnderstood("Flatten mixes channels with other dimensions")

    @_on_slots
    def _op_Reshape(self, node: gs.Node, s: Slots) -> None:
        target = self.value(input_at(node, 1))
        ishp, oshp = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if target is None or ishp is None or oshp is None or None in ishp or None in oshp or len(ishp) != s.rank:
            raise _NotUnderstood("Reshape with a non-constant shape or unknown shapes")
        target = [int(v) for v in target.tolist()]
        allowzero = int(node.attrs.get("allowzero", 0))
        a, w = s.axis, len(s.ids)
        prefix = int(np.prod(ishp[:a])) if a else 1
        k_in = int(np.prod(ishp[a + 1:])) if a + 1 < len(ishp) else 1
        if not allowzero and a < min(len(target), len(oshp)) and target[a] == 0 and oshp[a] != w:
            raise _NotUnderstood("Reshape copies the channel width into another position")
        # the output axis that takes the channels: the leading dims must keep their product; with
        # leading 1s several positions qualify, so prefer a pure move, then a merge, then a split
        cands = []  # (preference, output axis, mode, factor)
        acc = 1
        for b in range(len(oshp)):
            if acc == prefix:
                d = oshp[b]
                k_out = int(np.prod(oshp[b + 1:])) if b + 1 < len(oshp) else 1
                if d == w and k_in == k_out:
                    cands.append((0, b, "same", 1))
                elif d % w == 0 and k_in % k_out == 0 and d == w * (k_in // k_out):
                    cands.append((1, b, "merge", d // w))
                elif d > 1 and w % d == 0 and k_out == k_in * (w // d):
                    cands.append((2, b, "split", w // d))
            acc *= oshp[b]
            if acc > prefix:
                break
        if not cands:
            raise _NotUnderstood("Reshape mixes channels with other dimensions")
        _, b, mode, factor = min(cands)  # the first axis of the preferred kind
        if b < len(target) and target[b] == 0 and not allowzero and not (b == a and mode == "same"):
            raise _NotUnderstood("Reshape copies a dimension into the channel position")
        if mode == "same":
            ids = s.ids
        elif mode == "merge":
            ids = np.repeat(s.ids, factor)
        else:
            rows = s.ids.reshape(-1, factor)
            self.uf.union_arrays(np.repeat(rows[:, 0], factor), rows.reshape(-1))  # each row becomes one channel
            ids = rows[:, 0].copy()
        self.set(node.outputs[0], b, len(oshp), ids)
        if b < len(target) and target[b] != -1 and not (target[b] == 0 and not allowzero and b == a and mode == "same"):
            self.actions.append(ShapeAction(node, b, mode, factor, s.ids, target))


class _NotUnderstood(Exception):
    pass


def _subgraph_outer_names(g: onnx.GraphProto) -> set:
    """Names read inside subgraphs (If/Loop/Scan bodies) -- outer tensors they may capture."""
    return set().union(*(subgraph_reads(node) for node in g.node))


# ================================================================================== rewrite
def _take(arr: np.ndarray, axis: int, mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.compress(mask, arr, axis=axis))


def _set_pruned(node: gs.Node, index: int, value: np.ndarray, names: NameGenerator, base: str) -> None:
    old = node.inputs[index]
    node.inputs[index] = gs.Constant(names((old.name or base) + "_pruned"), np.require(value, requirements="C"))


# --------------------------------------------------------------------------------- actions
# What pruning a set of channel components does to one node; recorded while the analysis walks
# the graph, applied by Analysis.rewrite with ``keep(ids)`` -> the boolean keep mask of those slots.


@dataclass
class LayerAction:
    """A weighted layer (``kind`` conv, convT, gemm or matmul), a *producer* of channels: its output
    channel c has slot ``out_ids[c]``; pruning slices its weight's input and output channels (and the
    bias). ``in_ids`` None: its input has no slots (a graph input); ``mode`` (conv): dense, grouped or
    depthwise; ``bn``: the BatchNormalization that follows it, if any."""

    kind: str
    node: gs.Node
    in_ids: Optional[np.ndarray]
    out_ids: np.ndarray
    mode: Optional[str] = None
    bn: Optional[gs.Node] = None

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def out_axis(self) -> int:
        """The weight axis of the output channels (Conv, Gemm with transB: 0; ConvTranspose, MatMul: 1)."""
        return 0 if self.op == "Conv" or (self.op == "Gemm" and int(self.node.attrs.get("transB", 0))) else 1

    def filters(self) -> np.ndarray:
        """The weight as [out_channels, -1] rows (BN-folded when a BN follows)."""
        w = constant_value(self.node.inputs[1]).astype(np.float64)
        rows = np.moveaxis(w, self.out_axis, 0).reshape(w.shape[self.out_axis], -1)
        if self.bn is not None:
            gamma, var = (constant_value(self.bn.inputs[i]).astype(np.float64) for i in (1, 4))
            rows = rows * (gamma / np.sqrt(var + float(self.bn.attrs.get("epsilon", 1e-5))))[:, None]
        return rows

    def bn_gamma(self) -> Optional[np.ndarray]:
        return None if self.bn is None else np.abs(constant_value(self.bn.inputs[1]).astype(np.float64))

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        node = self.node
        w = constant_value(node.inputs[1])
        out_axis, in_axis = self.out_axis, 1 - self.out_axis
        new, ko = w, keep(self.out_ids)
        ki = None if self.in_ids is None else keep(self.in_ids)
        if ki is not None and not ki.all():
            if self.mode == "depthwise":  # whole groups go
                node.attrs["group"] = int(ki.sum())
            else:  # a grouped conv's weight holds the positions of one group
                new = _take(new, in_axis, ki[: w.shape[1]] if self.mode == "grouped" else ki)
        if not ko.all():
            new = _take(new, out_axis, ko)
        if new is not w:
            _set_pruned(node, 1, new, names, "w")
        b = input_at(node, 2)
        if self.kind in ("conv", "convT") and b is not None and not ko.all():  # Gemm's C is a ConstAction
            _set_pruned(node, 2, _take(constant_value(b), 0, ko), names, "b")


@dataclass
class ConstAction:
    """A constant input (``index``) with a full channel dimension on ``axis``: an elementwise operand,
    Gemm's C or a normalization's per-channel parameter."""

    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        k = keep(self.ids)
        if not k.all():
            _set_pruned(self.node, self.index, _take(constant_value(self.node.inputs[self.index]), self.axis, k), names, "c")


@dataclass
class SplitAction:
    """A Split along the channel axis: each part's size shrinks by its removed channels."""

    node: gs.Node
    parts: list

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        node = self.node
        sizes = [int(keep(p).sum()) for p in self.parts]
        if sizes == [len(p) for p in self.parts]:
            return
        if "split" in node.attrs:
            node.attrs["split"] = sizes
            return
        node.attrs.pop("num_outputs", None)
        arr = np.array(sizes, dtype=np.int64)
        if input_at(node, 1) is not None:
            _set_pruned(node, 1, arr, names, "split")
        else:
            set_input(node, 1, gs.Constant(names("split_sizes"), arr))


@dataclass
class SliceAction:
    """A Slice of channels [lo, hi) on its ``j``-th axis entry: the bounds move to the kept ones."""

    node: gs.Node
    j: int
    ids: np.ndarray
    lo: int
    hi: int

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        node, j = self.node, self.j
        k = keep(self.ids)
        if k.all():
            return
        new_lo = int(k[:self.lo].sum())
        new_hi = new_lo + int(k[self.lo:self.hi].sum())
        if "starts" in node.attrs:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            starts[j], ends[j] = new_lo, new_hi
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            st = np.array(_value(an.params, node.inputs[1]), dtype=np.int64).copy()
            en = np.array(_value(an.params, node.inputs[2]), dtype=np.int64).copy()
            st[j], en[j] = new_lo, new_hi
            _set_pruned(node, 1, st.astype(_value(an.params, node.inputs[1]).dtype), names, "starts")
            _set_pruned(node, 2, en.astype(_value(an.params, node.inputs[2]).dtype), names, "ends")


@dataclass
class PadAction:
    """A Pad on the channel axis: the padded channels ``before`` / ``after`` that are kept."""

    node: gs.Node
    axis: int
    rank: int
    pads: list
    before: np.ndarray
    after: np.ndarray

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        node = self.node
        nb, ne = int(keep(self.before).sum()), int(keep(self.after).sum())
        if nb == len(self.before) and ne == len(self.after):
            return
        new = np.array(self.pads, dtype=np.int64).copy()
        new[self.axis], new[self.axis + self.rank] = nb, ne
        if opset_of(an.model) < 11:
            node.attrs["pads" if "pads" in node.attrs else "paddings"] = [int(v) for v in new]
            return
        if input_at(node, 3) is not None:  # Pad with axes: write the full-rank form instead
            node.inputs[3] = gs.Variable.empty()
            while node.inputs and isinstance(node.inputs[-1], gs.Variable) and node.inputs[-1].name == "":
                node.inputs.pop()
        node.inputs[1] = gs.Constant(names("pads_pruned"), new)


@dataclass
class ShapeAction:
    """A shape input (``index``: Reshape's shape, Resize's sizes) whose entry ``axis`` takes the kept
    channel count: as it is (``same``), or times (``merge``) or divided by (``split``) ``factor``."""

    node: gs.Node
    axis: int
    mode: str
    factor: int
    ids: np.ndarray
    target: list
    index: int = 1

    def apply(self, an: "Analysis", keep, names: NameGenerator) -> None:
        k = keep(self.ids)
        if k.all():
            return
        kept = int(k.sum())
        new = list(self.target)
        new[self.axis] = kept if self.mode == "same" else (kept * self.factor if self.mode == "merge" else kept // self.factor)
        _set_pruned(self.node, self.index, np.array(new, dtype=np.int64), names, "shape")


def _value(params: dict, t) -> Optional[np.ndarray]:
    """A parameter's value: a constant, or one the analysis computed from a constant chain (None: neither)."""
    if t is None:
        return None
    v = constant_value(t)
    if v is None:
        v = params.get(t.name)
    return None if v is None else np.asarray(v)
