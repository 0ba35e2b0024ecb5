"""The task-aware error of a candidate model against its float reference -- one metric for all.

``compare``, ``sensitivity``, ``qdq``'s ``fallback=auto`` and ``calib_method=auto`` and the pass
summaries measure quantization error with this module, so that a budget means the same thing
everywhere.

Where it is measured
    On the *logits*: when a graph output is written by a terminal Softmax, LogSoftmax or Sigmoid,
    or is class ids written by an ArgMax or a TopK (through Identity/Flatten/Reshape/Squeeze/Unsqueeze/Cast,
    found on the graph), the input of that op is measured instead, exposed as an extra graph
    output (:func:`with_logit_outputs`). Probabilities hide what quantization did: on a
    HardSwish/SE classifier the relative L2 error of the Softmax output was 0.6 % where top-1 fell
    17 points; class ids hide it until a class changes.

    An output whose shape depends on the data (it comes after a NonMaxSuppression, NonZero,
    Unique or Compress: a detector's selected boxes) cannot be compared element by element, and
    the candidate may select one box more. It is measured on the float tensors that op reads (the
    boxes and scores before the selection), one entry each, keyed ``output:Op[input index]``.

    An output of *features* is no classifier's scores, whatever its shape: an L2-normalized
    output (``F.normalize``, LpNormalization: an embedding), or one named as features or values
    (``image_embeds``, ``pooler_output``, ``bbox_pred``...). The argmax of an embedding decides
    nothing, and a budget on it kept a third of a ResNet's MACs in float for no reason.

What is measured, per graph output
    * classifier-shaped outputs (``[N, C]``, ``C > 1``, not features): top-1 agreement with the
      reference and the KL divergence ``KL(softmax(ref) || softmax(cand))`` (nats, mean per sample)
      of the logits;
    * a Sigmoid's outputs ``[N, C]`` or ``[N]`` (a binary or multi-label classifier: each label a
      yes/no of its own): the share of samples whose every label decision (logit > 0) agrees with
      the reference, and the Bernoulli KL summed over the labels. Its argmax says nothing (a
      binary classifier's ``[N, 1]`` has none to take), and a softmax over independent labels
      is no distribution of the model's;
    * more axes with a Softmax / LogSoftmax / ArgMax naming the class axis (:func:`class_axes`: a
      segmentation map ``[N, C, H, W]`` exported with its ArgMax, a text recogniser's ``[N, T, C]``),
      or a Sigmoid's mask ``[N, 1, H, W]`` (each element a yes/no): the share of positions whose
      class (element whose decision) agrees, and the KL per position. The positions are the
      count the budget's confidence bound reads: on thousands of pixels it is the count itself;
    * every output: cosine similarity, SQNR (``10 log10(|r|^2 / |r - c|^2)`` dB) and the relative
      L2 error ``|r - c| / |r|``.
    Multi-output models (detectors) get one entry per output; a budget (:class:`Budget`) holds
    when it holds for each; :meth:`TaskError.objective` is the smooth figure searches minimise.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Iterable, Optional

import ctypes
import ctypes.util
import gc

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto

from . import runtime
from .ir.proto import infer_shapes, tensor_types
from .data import feed_samples
from .errors import DataError, OnnxoptError

TERMINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")
# an output of features, not class scores (found on the graph: it is L2-normalized, or its name says
# so): no top-1 there, the argmax of an embedding decides nothing
FEATURES = "features"
# names of outputs that hold features or values, matched as whole words of the name
# (``image_embeds``, ``pooler_output``, ``last_hidden_state``, ``bbox_pred``, ``fc1_feat``)
_FEATURE_NAME = re.compile(r"(^|[^a-z])(embed\w*|emb|feat\w*|descriptors?|pool(er|ed)\w*|hidden\w*|b?box(es)?\w*"
                           r"|landmarks?|keypoints?|kpts?|regress\w*|depth)($|[^a-z])", re.IGNORECASE)
# ops between an L2 norm and the Div by it (eps clamps, broadcasts)
_NORM_PLUMBING = ("Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Sqrt", "Cast", "Identity")
# ops whose output shape depends on the input values
DATA_DEPENDENT_SHAPE = ("NonMaxSuppression", "NonZero", "Unique", "Compress")
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
# ops between a terminal activation and the graph output that do not change which class wins
_PASS_THROUGH = ("Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast")
# what a classifier's logits feed at its end: the measured tensor is their input (the logits)
LOGIT_READERS = TERMINAL_ACTIVATIONS + ("ArgMax", "TopK")
# a sample's decision on an output (:func:`decision_kind`): the top-1 class of class scores, every
# label's yes/no of a Sigmoid's outputs (binary and multi-label classifiers), or the class of each
# position along the other axes (a segmentation map's pixels, a sequence's steps)
TOP1, LABELS, POSITIONS = "top-1", "labels", "positions"
# the ops that name a class axis (:func:`class_axes`)
_CLASS_AXIS_OPS = ("Softmax", "LogSoftmax", "ArgMax")


# ------------------------------------------------------------------------------ the graph side
def _selection_sources(model: ModelProto, producer: dict) -> dict:
    """{graph output: [(key, float tensor, op)]} for each output after an op of
    :data:`DATA_DEPENDENT_SHAPE`: the float tensors computed before that op which it reads,
    directly or through non-float tensors (``NonZero(Greater(scores, t))`` reads ``scores``). The
    key names the place by graph position (``sel:NonMaxSuppression[1]``), so that the same place
    has the same key in a quantized copy, whose tensor names differ there."""
    if not any(n.op_type in DATA_DEPENDENT_SHAPE for n in model.graph.node):
        return {}
    elem = {name: t for name, (t, _) in tensor_types(model).items()}

    def floats_read(node, key: str, depth: int, selector: str) -> list:
        found = []
        for i, t in enumerate(node.input):
            src = producer.get(t)
            if not t or src is None:          # a weight, a threshold, a graph input: nothing to measure
                continue
            if elem.get(t) in _FLOATS:
                found.append((f"{key}{node.op_type}[{i}]", t, selector))
            elif depth > 0:
                found += floats_read(src, f"{key}{node.op_type}[{i}]:", depth - 1, selector)
        return found

    out = {}
    for vo in model.graph.output:
        stack, seen, points = [vo.name], set(), []
        while stack:   # the output's ancestors, up to the first data-dependent op on each path
            node = producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in DATA_DEPENDENT_SHAPE:
                points += floats_read(node, f"{vo.name}:", 3, node.op_type)
            else:
                stack.extend(node.input)
        if points:
            out[vo.name] = points
    return out


def data_dependent_outputs(model: ModelProto) -> set:
    """The graph outputs whose shape depends on the data (after a NonMaxSuppression, NonZero...)."""
    return set(_selection_sources(model, {o: n for n in model.graph.node for o in n.output if o}))


def _l2_normalized(node, producer: dict) -> bool:
    """Whether ``node`` writes an L2-normalized tensor: ``LpNormalization`` (p=2), or ``x / d`` with
    ``d`` computed from the L2 norm of the same ``x`` (``F.normalize``: ReduceL2 -> Clip -> Expand ->
    Div; or Sqrt(ReduceSum(x * x)), ReduceSumSquare), possibly through eps clamps and broadcasts."""
    if node.op_type == "LpNormalization":
        return next((a.i for a in node.attribute if a.name == "p"), 2) == 2
    if node.op_type != "Div" or len(node.input) != 2:
        return False
    x, stack, steps = node.input[0], [node.input[1]], 0
    while stack and steps < 16:   # the divisor's ancestry, back to what it reads of x
        src = producer.get(stack.pop())
        steps += 1
        if src is None or not src.input:
            continue
        if src.op_type in ("ReduceL2", "ReduceSumSquare", "Pow") and src.input[0] == x:
            return True                              # |x|, |x|^2, x^2 (then summed)
        if src.op_type == "Mul" and list(src.input) == [x, x]:
            return True
        if src.op_type in _NORM_PLUMBING + ("ReduceSum", "Pow"):
            stack.extend(src.input)
    return False


def _through_pass_through(node, producer: dict, readers: Counter):
    """``node``, or the first node before it that is not a pass-through op read only by the next."""
    while node is not None and node.op_type in _PASS_THROUGH and node.input and readers[node.input[0]] == 1:
        node = producer.get(node.input[0])
    return node


def class_id_outputs(model: ModelProto) -> set:
    """The graph outputs written by an ArgMax (through pass-through ops): class ids, whose
    agreement and accuracy ``compare`` counts directly."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers = Counter(i for n in model.graph.node for i in n.input)
    return {vo.name for vo in model.graph.output
            if getattr(_through_pass_through(producer.get(vo.name), producer, readers), "op_type", None) == "ArgMax"}


def logit_tensors(model: ModelProto) -> dict:
    """{measured name: (tensor to measure, op or None)}, per graph output: the input of a terminal
    Softmax/LogSoftmax/Sigmoid or ArgMax/TopK writing the output (through pass-through ops read only
    by the next op; an ArgMax of a Softmax: the Softmax's input), else the output itself (op
    :data:`FEATURES` when it holds features, not class scores);
    for an output whose shape depends on the data, the float tensors
    its selection reads instead (:func:`_selection_sources`), each under its own key. Found on each
    model's own graph, so a quantized model whose Softmax reads a dequantized tensor is measured on
    what its Softmax actually receives."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers = Counter(i for n in model.graph.node for i in n.input)
    selected = _selection_sources(model, producer)
    plain = {vo.name for vo in model.graph.output if vo.name not in selected}
    out = {}
    for vo in model.graph.output:
        if vo.name in selected:
            for key, t, op in selected[vo.name]:
                if t not in plain and t not in {v[0] for v in out.values()}:   # each tensor once
                    out[key] = (t, op)
            continue
        t, act = vo.name, None
        node = _through_pass_through(producer.get(t), producer, readers)
        if node is not None and node.op_type in ("ArgMax", "TopK") and node.input and node.input[0]:
            # class ids (and a TopK's sorted scores): measured on the scores they were taken from
            # (and before their Softmax)
            t, act = node.input[0], node.op_type
            node = _through_pass_through(producer.get(t), producer, readers)
        if node is not None and node.op_type in TERMINAL_ACTIVATIONS and node.input and node.input[0]:
            # an ArgMax of a Sigmoid still decides by its top-1: it keeps its own name
            t, act = node.input[0], (act if act in ("ArgMax", "TopK") and node.op_type == "Sigmoid" else node.op_type)
            if act == "Sigmoid" and _FEATURE_NAME.search(vo.name):
                act = FEATURES   # boxes or keypoints squashed into 0..1 (DETR's pred_boxes): values, no labels
        elif (node is not None and _l2_normalized(node, producer)) or _FEATURE_NAME.search(vo.name):
            act = FEATURES
        out[vo.name] = (t, act)
    return out


def class_axes(model: ModelProto) -> dict:
    """{graph output: axis} for the outputs written by a Softmax / LogSoftmax / ArgMax (through
    pass-through ops; an ArgMax's own axis when it reads a Softmax): the axis holding the classes.
    Where the measured tensor has more than two axes (``[N, C, H, W]`` of a segmentation model
    exported with its ArgMax, ``[N, T, C]`` of a CTC text recogniser), each position along the
    others is a decision of its own (:data:`POSITIONS`). A raw ``[N, C, H, W]`` output has no such
    op and stays a map of values: a backbone's features are no classes."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers = Counter(i for n in model.graph.node for i in n.input)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    out = {}
    for vo in model.graph.output:
        node = _through_pass_through(producer.get(vo.name), producer, readers)
        if node is None or node.op_type not in _CLASS_AXIS_OPS:
            continue
        default = 0 if node.op_type == "ArgMax" else (-1 if opset >= 13 else 1)
        out[vo.name] = next((a.i for a in node.attribute if a.name == "axis"), default)
    return out


def output_readings(model: ModelProto) -> dict:
    """{graph output: how the task metric reads it}, one phrase each, for ``onnxopt info``: what
    ``fallback=auto``'s agreement budget holds on it, if anything. The measured tensor's rank comes
    from the graph (shape inference); where it is unknown, its shape decides at run time."""
    found, axes = logit_tensors(model), class_axes(model)
    inferred, _ = infer_shapes(model)
    # the measured tensors' shapes, an unknown dimension standing for any size over one
    shapes = {vi.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2
                             for d in vi.type.tensor_type.shape.dim)
              for vi in (*inferred.graph.value_info, *inferred.graph.output)
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    selected = _selection_sources(model, {o: n for n in model.graph.node for o in n.output if o})
    out = {}
    for vo in model.graph.output:
        if vo.name in selected:
            ops = sorted({op for _, _, op in selected[vo.name]})
            out[vo.name] = f"its length depends on the data ({'/'.join(ops)}): measured on the boxes and scores it selects from"
            continue
        tensor, act = found[vo.name]
        before = f" of the logits before the {act}" if act in LOGIT_READERS else ""
        if act == FEATURES:
            out[vo.name] = "features or values: cosine, SQNR; no decision (budget it with qdq.max_error)"
            continue
        shape = shapes.get(tensor)
        if shape is None:
            out[vo.name] = f"by its shape at run time{before}"
            continue
        kind = decision_kind(shape, act, axes.get(vo.name))
        out[vo.name] = {
            TOP1: f"class scores: top-1 agreement, KL{before}",
            LABELS: f"labels: every label's yes/no (logit > 0), Bernoulli KL{before}",
            POSITIONS: (f"a class per position (classes on axis {axes.get(vo.name)}): agreement per position{before}"
                        if act != "Sigmoid" else f"a yes/no per element (a mask): agreement per element{before}"),
        }.get(kind, "values: SQNR, cosine; no decision (budget it with qdq.max_error)")
    return out


def features_outputs(model: ModelProto) -> set:
    """The graph outputs that hold features or values, not class scores (:data:`FEATURES`): no
    top-1, no class statistics, no KL distillation for them, whatever their shape."""
    return {name for name, (_, act) in logit_tensors(model).items() if act == FEATURES}


def with_logit_outputs(model: ModelProto, found: Optional[dict] = None) -> tuple:
    """(model, {graph output: measured tensor}): a copy of ``model`` that also outputs the logits
    of each terminal activation (see :func:`logit_tensors`; ``found``: its result, when the caller
    holds it); ``model`` itself when it has none."""
    found = logit_tensors(model) if found is None else found
    extra = list(dict.fromkeys(t for name, (t, _) in found.items() if t != name))
    mapping = {name: t for name, (t, _) in found.items()}
    return (runtime.with_outputs(model, extra) if extra else model), mapping


def comparable_outputs(model: ModelProto) -> tuple:
    """(model, [tensor per place]): the graph outputs as they are, except that an output whose shape
    depends on the data is replaced by the float tensors its selection reads (exposed as extra
    outputs): what a relative error over all outputs can compare between a model and its quantized
    copy, in the same order for both."""
    outputs = {vo.name for vo in model.graph.output}
    names = [key if key in outputs else t for key, (t, _) in logit_tensors(model).items()]
    extra = [n for n in names if n not in outputs]
    return (runtime.with_outputs(model, extra) if extra else model), names


# ------------------------------------------------------------------------------ the numbers
def scores_shape(shape: tuple) -> tuple:
    """``[N, C, 1, 1]`` (or NHWC's ``[N, 1, 1, C]``) as ``[N, C]``: a
    classifier that ends in a 1x1 conv without flattening (Caffe2 and Caffe exports of the ONNX
    model zoo: DenseNet-121's ``[1, 1000, 1, 1]``; an NHWC export's ``[N, 1, 1, C]``) gives one score
    per class and sample, as ``[N, C]`` does; any other shape unchanged."""
    shape = tuple(shape)
    if len(shape) >= 3 and all(d == 1 for d in shape[2:]):
        return shape[:2]
    if len(shape) == 4 and shape[1] == shape[2] == 1:   # NHWC (an [N, 1, T] signal stays as it is)
        return (shape[0], shape[3])
    return shape


def as_scores(a: np.ndarray) -> np.ndarray:
    """``a`` reshaped to :func:`scores_shape` (a view)."""
    return a.reshape(scores_shape(a.shape)) if a.ndim >= 3 else a


def decision_kind(shape: tuple, activation: Optional[str], axis: Optional[int] = None) -> Optional[str]:
    """What a sample decides on an output of ``shape`` (samples first) whose measured tensor is read
    by ``activation`` (:func:`logit_tensors`' op): :data:`LABELS` for a Sigmoid's ``[N, C]`` or
    ``[N]`` (every label's yes/no), :data:`TOP1` for other ``[N, C]`` scores with ``C > 1``,
    :data:`POSITIONS` for more axes when a Softmax / LogSoftmax / ArgMax names the class ``axis``
    (:func:`class_axes`) or a Sigmoid's mask takes a yes/no at each element (``axis`` None), None
    where no decision is taken (features, what a selection reads, maps of values)."""
    if activation in DATA_DEPENDENT_SHAPE + (FEATURES,):
        return None
    shape = scores_shape(shape)   # (callers read such an output through as_scores)
    if activation == "Sigmoid":   # more axes: a mask, each element its own yes/no (no class axis)
        return LABELS if len(shape) in (1, 2) else POSITIONS
    if len(shape) == 2:
        return TOP1 if shape[1] > 1 else None
    if len(shape) >= 3 and axis is not None and activation in _CLASS_AXIS_OPS:
        a = axis % len(shape)
        return POSITIONS if a != 0 and shape[a] > 1 else None
    return None


def agreement_name(decision: Optional[str]) -> str:
    """What the agreement of a ``decision`` kind is called on the console and in reports."""
    return {LABELS: "label agreement", POSITIONS: "per-position agreement"}.get(decision, "top-1 agreement")


def positions(shape: tuple, axis: Optional[int]) -> int:
    """The decisions a :data:`POSITIONS` output of ``shape`` holds: every element but the classes
    (``axis`` None: a Sigmoid's mask, every element)."""
    return int(np.prod(shape)) // (1 if axis is None else max(1, int(shape[axis % len(shape)])))


def agreeing(ref: np.ndarray, cand: np.ndarray, kind: str, threshold: float = 0.0, axis: Optional[int] = 1) -> int:
    """How many decisions are the same (:func:`decision_kind`) in ``ref`` and ``cand``: samples with
    the same top-1 class, or with every label on the same side of ``threshold`` (0 on logits, 0.5
    on a Sigmoid's probabilities); positions whose class along ``axis`` is the same (``axis``
    None: elements on the same side of ``threshold``)."""
    if kind == TOP1:
        return int(np.count_nonzero(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))
    if kind == POSITIONS:
        if axis is None:
            return int(np.count_nonzero((ref > threshold) == (cand > threshold)))
        return int(np.count_nonzero(np.argmax(ref, axis=axis) == np.argmax(cand, axis=axis)))
    n = ref.shape[0] if ref.ndim else 1
    same = (ref > threshold).reshape(n, -1) == (cand > threshold).reshape(n, -1)
    return int(np.count_nonzero(same.all(axis=1)))


def _kl_sum(ref: np.ndarray, cand: np.ndarray, kind: str, axis: Optional[int] = 1) -> float:
    """KL(ref || cand) of the logits, summed over the decisions: between softmaxes (over ``axis``
    for positions) for top-1 scores and positions, between each label's (element's, ``axis`` None)
    Bernoulli for labels and masks."""
    if kind == TOP1 or (kind == POSITIONS and axis is not None):
        axis = 1 if kind == TOP1 else axis
        lp, lq = _log_softmax(ref, axis), _log_softmax(cand, axis)
        return float(np.sum(np.exp(lp) * (lp - lq)))
    # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x), stable for any logit
    lp, lq, l1p, l1q = -np.logaddexp(0, -ref), -np.logaddexp(0, -cand), -np.logaddexp(0, ref), -np.logaddexp(0, cand)
    return float(np.sum(np.exp(lp) * (lp - lq) + np.exp(l1p) * (l1p - l1q)))


@dataclass
class OutputError:
    """The error of one graph output (measured on its logits when it has a terminal activation)."""

    name: str
    measured: str                       # the tensor compared (the logits, or the output itself)
    # Softmax / LogSoftmax / Sigmoid, when the logits were measured; FEATURES, or the selecting op
    activation: Optional[str] = None
    classifier: bool = False            # the output takes decisions (:attr:`decision`): agreement and KL apply
    samples: int = 0
    # fraction of samples (positions) taking the same decision (:data:`decision`), classifier outputs only
    top1_agreement: Optional[float] = None
    kl: Optional[float] = None               # nats per sample (position), classifier outputs only
    # TOP1, LABELS (a Sigmoid's) or POSITIONS (``samples`` then counts the positions), classifier outputs only
    decision: Optional[str] = None
    cosine: float = 1.0
    sqnr_db: float = math.inf
    rel_error: float = 0.0

    @property
    def agreement_loss(self) -> Optional[float]:
        """Agreement points lost (100 * (1 - agreement)); None for outputs that take no decision."""
        return None if self.top1_agreement is None else 100.0 * (1.0 - self.top1_agreement)

    def to_dict(self) -> dict:
        return {"name": self.name, "measured": self.measured, "activation": self.activation, "classifier": self.classifier,
                "decision": self.decision, "samples": self.samples, "top1_agreement": self.top1_agreement,
                "agreement_loss_pts": self.agreement_loss, "kl": self.kl, "cosine": self.cosine, "sqnr_db": self.sqnr_db,
                "rel_error": self.rel_error}


@dataclass
class Budget:
    """What ``fallback=auto`` must reach on every output: at most ``max_agreement_loss`` agreement
    points lost (1: 99 % of the decisions stay: the samples' top-1 class or every label of a
    Sigmoid, the positions' classes of a map), and a relative L2 error of the logits of at most
    ``max_rel_error`` (the only budget on outputs that take no decision)."""

    max_agreement_loss: float = 1.0   # agreement points, outputs that take decisions (inf = unconstrained)
    max_rel_error: float = 0.0        # relative L2 error of every output's logits; 0 = unconstrained
    # the agreement limit holds, with this one-sided confidence, on data beyond the samples it is
    # measured on (:func:`agreement_bound`); 0.5: on the samples' own count
    confidence: float = 0.5

    def agreement_missed(self, loss_pts: float, samples: int) -> bool:
        """Whether ``loss_pts`` agreement points lost on ``samples`` samples miss the limit: its upper
        bound at :attr:`confidence` is over it. Zero disagreements always pass: with too few samples
        for the bound to reach the limit, that is the most the data can show."""
        return (loss_pts > 1e-9
                and agreement_bound(loss_pts, samples, self.confidence) > self.max_agreement_loss + 1e-9)

    def missed_already(self, partial: "TaskError", samples: int) -> bool:
        """Whether ``partial``, measured on the first of ``samples`` samples, misses the agreement
        limit whatever the rest hold: its disagreements alone, counted over all ``samples``, put the
        upper bound above the limit (the bound only grows with more disagreements)."""
        # (an output's positions are no samples: its share cannot be scaled to the rest, it is checked at the end)
        return any(o.classifier and o.decision != POSITIONS
                   and self.agreement_missed(o.agreement_loss * o.samples / samples, samples)
                   for o in partial.outputs)

    def describe(self) -> str:
        parts = []
        if math.isfinite(self.max_agreement_loss):
            bound = f" (upper bound at {100 * self.confidence:g} % confidence)" if self.confidence > 0.5 else ""
            parts.append(f"<= {self.max_agreement_loss:g} pt decision agreement lost{bound}")
        if self.max_rel_error > 0:
            parts.append(f"relative error <= {self.max_rel_error:g}")
        return ", ".join(parts) or "none"


def agreement_bound(loss_pts: float, samples: int, confidence: float) -> float:
    """One-sided upper bound (points) on the agreement loss of the population the ``samples``
    were drawn from, given ``loss_pts`` measured on them: the Wilson score bound, sound for the
    few disagreements a good quantization leaves (where the normal approximation is not)."""
    if confidence <= 0.5 or samples <= 0:
        return loss_pts
    z = NormalDist().inv_cdf(confidence)
    n, p = samples, loss_pts / 100.0
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * (p + z * z / (2 * n) + half) / (1 + z * z / n)


@dataclass
class TaskError:
    """The task-aware error of a candidate, one :class:`OutputError` per graph output."""

    outputs: list = field(default_factory=list)
    # measured on the first samples only: the measurement stopped once it missed the budget it was
    # given (:meth:`Evaluator.error`), so it is not within that budget and its figures are partial
    stopped_early: bool = False

    @property
    def classifier(self) -> bool:
        return any(o.classifier for o in self.outputs)

    @property
    def agreement_loss(self) -> Optional[float]:
        """The worst classifier output's lost agreement points (None without classifier outputs)."""
        return max((o.agreement_loss for o in self.outputs if o.agreement_loss is not None), default=None)

    @property
    def rel_error(self) -> float:
        return max((o.rel_error for o in self.outputs), default=0.0)

    def objective(self) -> float:
        """A smooth figure to minimise (agreement moves in steps of one sample): KL for classifier
        outputs, |r-c|^2/|r|^2 for the others, summed."""
        return sum((o.kl if o.classifier and o.kl is not None else o.rel_error ** 2 for o in self.outputs), 0.0)

    def noise(self) -> float:
        """The outputs' noise-to-signal ratios ``|r-c|^2/|r|^2``, summed (classifiers: of the logits).
        On a few dozen samples it ranks candidates more reliably than KL, whose mean is carried by
        the few samples near a decision boundary (measured for ``calib_method=auto``, see
        :mod:`onnxopt.quant.calib_search`)."""
        return sum(o.rel_error ** 2 for o in self.outputs)

    def within(self, budget: Budget) -> bool:
        """Whether every output meets ``budget``: the agreement limit on the upper bound at the
        budget's confidence (:meth:`Budget.agreement_missed`), and the relative error."""
        if self.stopped_early:
            return False
        for o in self.outputs:
            if o.classifier and budget.agreement_missed(o.agreement_loss, o.samples):
                return False
            if budget.max_rel_error > 0 and o.rel_error > budget.max_rel_error:
                return False
        return True

    def summary(self) -> str:
        """One line for the console, e.g. ``top-1 agreement 99.2 % (KL 0.004); boxes SQNR 24.1 dB``."""
        parts = []
        for o in self.outputs:
            where = (f" (logits before {o.activation})" if o.activation in LOGIT_READERS else
                     " (not class scores)" if o.activation == FEATURES else
                     f" ('{o.measured}', read by {o.activation})" if o.activation else "")
            what = (f"{agreement_name(o.decision)} {100 * o.top1_agreement:.2f} % (KL {o.kl:.4g}), SQNR {o.sqnr_db:.1f} dB"
                    if o.classifier else f"SQNR {o.sqnr_db:.1f} dB, cosine {o.cosine:.5f}")
            parts.append(f"{o.name}{where}: {what}")
        return "; ".join(parts) if parts else "(no outputs)"

    def to_dict(self) -> dict:
        return {"agreement_loss_pts": self.agreement_loss, "objective": self.objective(),
                "outputs": [o.to_dict() for o in self.outputs]}


def _log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


class Accumulator:
    """Streams batches of (reference, candidate) measured outputs into a :class:`TaskError`; running
    sums only (nothing per sample is kept), so any number of samples fits."""

    def __init__(self, names: list, measured: Optional[dict] = None, activations: Optional[dict] = None,
                 axes: Optional[dict] = None):
        self.names = list(names)
        self.measured = measured or {n: n for n in self.names}
        self.activations = activations or {}
        self.axes = axes or {}   # class_axes: an output whose positions each take a class
        # cls: the decision kind every batch so far agreed on (False: none), None before the first
        self.s = {n: dict(rr=0.0, ee=0.0, cc=0.0, dot=0.0, n=0, agree=0, kl=0.0, cls=None) for n in self.names}

    def update(self, ref: list, cand: list) -> None:
        """``ref`` and ``cand``: one array per name, in the order of ``names``."""
        for name, r, c in zip(self.names, ref, cand):
            st = self.s[name]
            r64, c64 = as_scores(np.asarray(r, np.float64)), as_scores(np.asarray(c, np.float64))
            if r64.shape != c64.shape:
                raise OnnxoptError(f"output '{name}' has shape {list(r64.shape)} in the reference but {list(c64.shape)} in the candidate.",
                                   "the two models are not comparable on this output")
            # a non-finite candidate value is an infinite error, not a NaN that compares false
            c64 = np.where(np.isfinite(c64), c64, np.where(np.isfinite(r64), np.inf, r64))
            d = c64 - r64
            d = np.where(np.isnan(d), 0.0, d)
            st["rr"] += float(np.vdot(np.nan_to_num(r64), np.nan_to_num(r64)))
            st["ee"] += float(np.vdot(d, d))
            cf = np.nan_to_num(c64, posinf=0.0, neginf=0.0)
            st["cc"] += float(np.vdot(cf, cf))
            st["dot"] += float(np.vdot(np.nan_to_num(r64), cf))
            # what a selection reads is scores to threshold, and features are no class scores: no decision there
            axis = self.axes.get(name)
            kind = decision_kind(r64.shape, self.activations.get(name), axis)
            # a batch without a decision (False) leaves none for the output: its counts would miss it
            st["cls"] = (kind or False) if st["cls"] is None else (st["cls"] if st["cls"] == kind else False)
            # the decisions counted: samples, or every position of a segmentation map, mask or sequence
            st["n"] += positions(r64.shape, axis) if kind == POSITIONS else int(r64.shape[0]) if r64.ndim else 1
            if kind:
                axis = None if axis is None else axis % r64.ndim
                st["agree"] += agreeing(r64, c64, kind, axis=axis)
                st["kl"] = _kl_sum(r64, c64, kind, axis) + st["kl"] if np.isfinite(c64).all() else math.inf

    def result(self) -> TaskError:
        outs = []
        for name in self.names:
            st = self.s[name]
            rr, ee, cc = st["rr"], st["ee"], st["cc"]
            if not math.isfinite(ee):  # a non-finite candidate value
                rel, sqnr = math.inf, -math.inf
            else:
                rel = math.sqrt(ee / rr) if rr > 0 else (0.0 if ee == 0 else math.inf)
                sqnr = math.inf if ee == 0 else (-math.inf if rr == 0 else 10.0 * math.log10(rr / ee))
            norm = math.sqrt(rr * cc)
            cos = st["dot"] / norm if norm > 0 else (1.0 if ee == 0 else 0.0)
            cls = bool(st["cls"]) and st["n"] > 0
            outs.append(OutputError(name=name, measured=self.measured.get(name, name), activation=self.activations.get(name),
                                    classifier=cls, decision=st["cls"] if cls else None, samples=st["n"],
                                    top1_agreement=(st["agree"] / st["n"]) if cls else None,
                                    kl=(st["kl"] / st["n"]) if cls else None, cosine=cos, sqnr_db=sqnr, rel_error=rel))
        return TaskError(outs)


def measure(ref: list, cand: list, names: Optional[list] = None) -> TaskError:
    """The task error of ``cand`` against ``ref`` (lists of arrays, one per output, samples on axis 0)."""
    acc = Accumulator(names or [f"output_{i}" for i in range(len(ref))])
    acc.update(ref, cand)
    return acc.result()


# ------------------------------------------------------------------------------ evaluation
def lean_session(model: ModelProto) -> ort.InferenceSession:
    """The verification oracle's session (every graph optimization off) without onnxruntime's CPU
    memory arena: searches build dozens of sessions one after another, and with arenas the
    process kept the memory of each."""
    return runtime.session(model, arena=False)


def _release_memory() -> None:
    """Free the candidates measured so far and hand the heap pages back to the OS: a candidate built
    through the graph IR is a reference cycle (nodes <-> tensors) holding its weights, which only the
    cyclic collector frees, and glibc keeps freed pages otherwise."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Evaluator:
    """Runs candidate models on fixed feeds and measures them against the float reference.

    ``feeds``: a list of batches, or a callable yielding batches (read once, up to ``limit``
    samples and ``max_mb`` of feeds plus reference outputs). ``session`` builds an onnxruntime
    session from a model (default: every graph optimization off, the verification oracle)."""

    def __init__(self, reference: ModelProto, feeds, limit: int = 256, max_mb: float = 160.0,
                 session: Optional[Callable] = None):
        _release_memory()   # what the caller's last step (e.g. a calibration pass) left, before adding ours
        self._session = session or lean_session
        found = logit_tensors(reference)
        ref_model, self.mapping = with_logit_outputs(reference, found)
        self.activations = {k: a for k, (_, a) in found.items() if a}
        self.axes = class_axes(reference)
        self.names = list(self.mapping)   # the graph outputs, or the tensors a data-dependent selection reads
        sess = self._session(ref_model)
        self.feeds, self.ref = [], []
        self.memory_capped = False   # stopped at max_mb, not at the data's end or the limit
        used, count = 0, 0
        for feed in (feeds() if callable(feeds) else feeds):
            if count >= limit:
                break
            b = feed_samples(feed)
            if count + b > limit:   # the batch's first samples, up to the limit
                b = limit - count
                feed = {k: (np.asarray(v)[:b] if np.asarray(v).ndim else v) for k, v in feed.items()}
            outs = sess.run([self.mapping[n] for n in self.names], feed)
            size = sum(np.asarray(v).nbytes for v in feed.values()) + sum(o.nbytes for o in outs)
            if self.feeds and (used + size) / 2**20 > max_mb:
                self.memory_capped = True
                break
            self.feeds.append(feed)
            self.ref.append(outs)
            used += size
            count += b
        if not self.feeds:
            raise DataError("the data yielded no samples.", "check --calib-data")
        self.samples = count

    def outputs(self, model: ModelProto, samples: Optional[int] = None) -> Iterable[list]:
        """The candidate's measured outputs, batch by batch (the first ``samples`` samples only, when given)."""
        cand, mapping = with_logit_outputs(model)
        missing = [n for n in self.names if n not in mapping]
        if missing:
            raise OnnxoptError(f"the candidate model has no place matching '{missing[0]}' of the reference's outputs.",
                               "the two models are not comparable; check that the candidate was derived from the reference")
        sess = self._session(cand)
        fetch = [mapping[n] for n in self.names]
        seen = 0
        for feed in self.feeds:
            if samples is not None and seen >= samples:
                return
            seen += feed_samples(feed)
            yield sess.run(fetch, feed)

    def error(self, model: ModelProto, samples: Optional[int] = None, budget: Optional[Budget] = None) -> TaskError:
        """The task error of ``model`` on the evaluation feeds (the first ``samples`` samples when given,
        rounded up to whole batches). With a ``budget`` (on all the samples), the measurement stops
        once the disagreements so far miss its agreement limit, and the result, on the samples read,
        is marked ``stopped_early``: a search's failing checks cost a fraction of a full run."""
        acc = Accumulator(self.names, self.mapping, self.activations, self.axes)
        read = 0
        for feed, ref, cand in zip(self.feeds, self.ref, self.outputs(model, samples)):
            acc.update(ref, cand)
            read += feed_samples(feed)
            if budget is not None and samples is None and read < self.samples and budget.missed_already(acc.result(), self.samples):
                break
        _release_memory()
        result = acc.result()
        result.stopped_early = samples is None and read < self.samples
        return result


class HeldIn:
    """Calibration data that keeps its first samples while it streams (the held-in samples).

    The qdq pass reads the data once to calibrate; the calibration search and ``fallback=auto``
    then measure on the same samples. Up to ``limit`` samples and ``max_mb`` are kept; when the
    whole data fit, calling this object replays them without reading the data again, otherwise
    it reads the data again. Every other attribute (``spec``, ``count`` ...) is the source's."""

    def __init__(self, source, limit: int = 256, max_mb: float = 160.0):
        self._source = source
        self.limit, self.max_bytes = int(limit), float(max_mb) * 2**20
        self.kept: list = []
        self.complete = False
        self.read: Optional[int] = None   # samples in the last complete read (the calibration's count)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def _read(self, batch_size=None):
        batches = getattr(self._source, "batches", None)
        return batches(batch_size) if callable(batches) else self._source()

    def batches(self, batch_size=None):
        if self.complete and batch_size is None:
            self.read = sum(feed_samples(f) for f in self.kept)
            yield from self.kept
            return
        kept, used, count, whole, total = [], 0, 0, True, 0
        for feed in self._read(batch_size):
            total += feed_samples(feed)
            if whole:
                size = sum(np.asarray(v).nbytes for v in feed.values())
                b = feed_samples(feed)
                if count + b > self.limit or used + size > self.max_bytes:
                    whole = False
                else:
                    kept.append(feed)
                    used, count = used + size, count + b
            yield feed
        # only a read to the end tells that every sample was kept
        self.kept, self.complete, self.read = kept, whole, total

    def __call__(self):
        return self.batches()


def task_error(reference: ModelProto, candidate: ModelProto, feeds, limit: int = 256) -> TaskError:
    """The one call for a summary line: the task-aware error of ``candidate`` against
    ``reference`` on ``feeds`` (a list of batches or a callable yielding them; up to ``limit``
    samples), e.g. ``task_error(float_model, int8_model, feeds).summary()``."""
    return Evaluator(reference, feeds, limit=limit).error(candidate)
