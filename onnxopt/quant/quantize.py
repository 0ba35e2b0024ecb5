"""Apply a placement plan: quantized weight initializers + DQ, activation Q/DQ pairs, bias handling.

Entry point :func:`quantize_model` (the qdq pass's engine; :mod:`onnxopt.quant.view` reads its layout
back): prepare the model for the target, plan placement twice -- without exclusions (the calibration
tensor set, so that the calibration cache does not depend on exclusion options) and with them --,
calibrate through :func:`onnxopt.quant.calibrate.calibrate`, rewrite.

The math (per tensor, ``b`` bits; each function below has its details):

* activations: symmetric ``s = amax / qmax``, ``zp = 0``, signed, or unsigned (``[0, 2^b - 1]``) for a
  non-negative tensor on uint8 targets and, below 8 bits, on every target (``act_unsigned_low_bit``:
  a 4-bit ReLU output gets [0, 15], not [-7, 7]); asymmetric over the range widened to contain 0
  (exact zero padding), ``zp = round(-lo / s)``; power of two: ``s`` rounded up, as TI's observers do;
* weights: symmetric, ``s_w[c] = max|w[c]| / qmax`` per channel (an all-zero channel gets 1), round
  half to even; with ``weight_symmetric=false`` (ort, layers below 8 bits) each channel's
  [min(w, 0), max(w, 0)] takes all ``2^b`` levels with its own zero point;
* int32 bias (ort, tidl): ``s_b[c] = s_in * s_w[c]``, a weight scale raised where needed so that
  ``|b_q| < 2^31``.

Below 8 bits values are stored in int8/uint8 restricted to ``[qmin, qmax]`` (activations get a Clip
before their Q, since Q itself saturates only at the 8-bit limits), or, with ``low_bit=int4`` and
4-bit weights, as INT4 initializers at opset >= 21.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, TensorProto, helper, numpy_helper, version_converter

from .. import model_io
from ..data import feed_samples
from ..errors import InternalError, OnnxoptError, OptionError
from ..input_dims import shape_hint
from ..ir.graph import NameGenerator, constant_value, drop_graph_inputs, export_graph, import_graph, swap_input
from ..ir.proto import infer_shapes
from . import calib_search
from . import calibrate as calib
from . import placement as placement_mod
from .options import CalibrationOptions, FormatOptions, QdqOptions
from .targets import TargetRules, get_target
from .view import (INT32_MAX, LayerQuant, QuantInfo, along_axis, already_quantized_message, channel_rows, int_range,
                   quantized_ops, weight_range, with_clip_bounds)

MIN_SCALE = 1e-30


@dataclass
class QuantResult:
    model: ModelProto
    info: QuantInfo
    ranges: dict = field(default_factory=dict)


@dataclass
class ActParams:
    scale: float
    zero_point: int
    signed: bool
    qmin: int
    qmax: int
    scale_const: Any = None
    zp_const: Any = None
    axis: Optional[int] = None   # per-channel: scale and zero_point are vectors along this axis


# ------------------------------------------------------------------------------------ prepare
def name_nodes(model: ModelProto) -> int:
    """Give every main-graph node a unique name (info and exclusions refer to node names)."""
    names = NameGenerator(model)
    seen: set = set()
    renamed = 0
    for node in model.graph.node:
        if not node.name or node.name in seen:
            node.name = names((node.name or node.op_type.lower()) + ("" if not node.name else "_dup"))
            renamed += 1
        seen.add(node.name)
    return renamed


def _fix_downgraded_reduce(model: ModelProto) -> None:
    """version_converter 18->17 leaves Reduce* with axes as an input and noop_with_empty_axes."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    for node in model.graph.node:
        if not node.op_type.startswith("Reduce") or node.op_type == "ReduceSum":
            continue
        attrs = {a.name: a for a in node.attribute}
        if "noop_with_empty_axes" in attrs:
            if helper.get_attribute_value(attrs["noop_with_empty_axes"]) != 0:
                raise OnnxoptError(f"cannot convert {node.name} ({node.op_type} with noop_with_empty_axes=1) to opset 17.", "export the model at opset 17")
            node.attribute.remove(attrs["noop_with_empty_axes"])
        if len(node.input) > 1 and node.input[1]:
            name = node.input[1]
            if name in inits:
                axes = numpy_helper.to_array(inits[name])
            elif name in consts:
                axes = numpy_helper.to_array(consts[name].attribute[0].t)
            else:
                raise OnnxoptError(f"cannot convert {node.name}: its axes are computed at run time.", "export the model at opset 17")
            del node.input[1:]
            node.attribute.append(helper.make_attribute("axes", [int(a) for a in np.asarray(axes).reshape(-1)]))


def convert_opset(model: ModelProto, target: int) -> ModelProto:
    current = model_io.opset_of(model)
    if current == target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
        if target < current:
            _fix_downgraded_reduce(converted)
        # the converter keeps the IR version: an IR 3 model (opset 9, every initializer listed as
        # a graph input) would carry opset 13 at IR 3, and the checker then asks every new
        # initializer (a scale, a quantized weight) to be a graph input too
        if converted.ir_version < 4:
            # and IR 3's weights-as-inputs stay inputs at IR 4+: onnxruntime then treats them as
            # overridable, not constant, and does not fold or fuse the int8 layers around them
            drop_graph_inputs(converted, (t.name for t in converted.graph.initializer))
        converted.ir_version = max(converted.ir_version,
                                   helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True))
        onnx.checker.check_model(converted, full_check=True)
    except OnnxoptError:
        raise
    except Exception as exc:
        relabelled = _relabel_down(model, current, target) if target < current else None
        if relabelled is not None:
            return relabelled
        raise OnnxoptError(f"could not convert the model from opset {current} to {target}: {str(exc).strip().splitlines()[0][:300]}",
                           f"re-export the model at opset {target}") from None
    return converted


def _relabel_down(model: ModelProto, current: int, target: int) -> Optional[ModelProto]:
    """The model at opset ``target`` by relabelling, when onnx's converter has no adapter (none down
    from 24/25 for ops whose newer versions only added types): every operator must keep its
    attributes and inputs/outputs, and the model pass the full checker at ``target``. None otherwise."""
    def nodes(graph):
        for n in graph.node:
            yield n
            for g in model_io.subgraphs(n):
                yield from nodes(g)

    for n in nodes(model.graph):
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            new, old = onnx.defs.get_schema(n.op_type, current, ""), onnx.defs.get_schema(n.op_type, target, "")
        except onnx.defs.SchemaError:
            return None
        if new.since_version != old.since_version and (
                set(new.attributes) != set(old.attributes)
                or (len(new.inputs), len(new.outputs)) != (len(old.inputs), len(old.outputs))):
            return None
    out = ModelProto()
    out.CopyFrom(model)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = target
    try:
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return None
    return out


def prepare_model(model: ModelProto, rules: TargetRules, fmt: FormatOptions) -> tuple:
    """(prepared model, notes): named nodes, target opset, inferred types (static input shapes,
    for tidl, are fixed before: :func:`static_inputs`)."""
    notes = []
    model = model_io.load_model(model, check=False)
    opset = model_io.opset_of(model)
    want = rules.fixed_opset if rules.fixed_opset is not None else max(opset, rules.min_opset)
    if fmt.low_bit == "int4":
        want = max(want, 21)
    if want != opset:
        model = convert_opset(model, want)
        notes.append(f"opset {opset} -> {want}")
    renamed = name_nodes(model)
    if renamed:
        notes.append(f"named {renamed} unnamed/duplicate nodes")
    model, why = infer_shapes(model, data_prop=True)
    if why is not None:
        raise OnnxoptError(f"shape inference failed on the model: {why}",
                           "the qdq pass needs tensor types; run the cleanup pass first or fix the export")
    return model, notes


def _make_static(model: ModelProto, rules: TargetRules, input_shapes: Optional[dict]) -> None:
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]
        if vi.name in inits or not dynamic:
            continue
        if not input_shapes or vi.name not in input_shapes:
            raise OnnxoptError(
                f"target {rules.name} needs static shapes, but input '{vi.name}' has dynamic dimension(s) {dynamic}.",
                f"give the deployment shape with --input-shape {shape_hint(vi)} (your real sizes), "
                "or export with static shapes")
        shape = list(input_shapes[vi.name])
        if len(shape) != len(dims):
            raise OptionError(f"--input-shape for '{vi.name}' has rank {len(shape)}, the input has rank {len(dims)}.", "give every dimension")
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = int(v)


def static_inputs(model: ModelProto, rules: TargetRules, data, ctx) -> tuple:
    """(model, note): for a static-shape target (tidl), a copy of ``model`` whose dynamic input dims
    are fixed from --input-shape or, on generated data, the data's size (the note says so), or an
    error naming the input; ``model`` itself otherwise."""
    if not rules.static_shapes:
        return model, None
    input_shapes = getattr(ctx, "input_shapes", None)
    note = None
    if data is not None and getattr(getattr(ctx, "data_spec", None), "source", None) == "random":
        input_shapes, note = _static_shapes_from_data(model, input_shapes, data)
    model = model_io.load_model(model, check=False)
    _make_static(model, rules, input_shapes)
    return model, note


def _static_shapes_from_data(model: ModelProto, input_shapes: Optional[dict], data) -> tuple:
    """(input shapes, note): on generated data (``--data random``, a smoke test) a dynamic input
    with no --input-shape takes the data's size (batch 1, a size the model runs at), and says so.
    With real data the deployment size is the user's to state: --input-shape is still asked for."""
    inits = {i.name for i in model.graph.initializer}
    missing = [vi.name for vi in model.graph.input if vi.name not in inits and vi.name not in (input_shapes or {})
               and any(not (d.HasField("dim_value") and d.dim_value > 0) for d in vi.type.tensor_type.shape.dim)]
    if not missing:
        return input_shapes, None
    source = data.batches() if hasattr(data, "batches") else data()
    first = next(iter(source), None)
    if first is None:
        return input_shapes, None
    shapes = dict(input_shapes or {})
    for name in missing:
        if name in first and getattr(first[name], "ndim", 0):
            shapes[name] = [1] + [int(d) for d in first[name].shape[1:]]
    fixed = ", ".join(f"{n}:{'x'.join(map(str, shapes[n]))}" for n in missing if n in shapes)
    note = (f"static shapes: the target needs them and no --input-shape was given, so the dynamic inputs are fixed at "
            f"the calibration data's size {fixed}; give --input-shape NAME:DIMS for your deployment size")
    return shapes, note


# ------------------------------------------------------------------------------- calibration
def to_static_batch(data, model: ModelProto):
    """``data`` in batches of the static model's batch 1 (tidl fixes it, while --batch-size may
    have asked for larger batches: those are split); unchanged when the batch is not fixed at 1."""
    batch = {vi.type.tensor_type.shape.dim[0].dim_value for vi in model.graph.input
             if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")}
    if batch != {1}:
        return data

    def gen():
        source = data.batches() if hasattr(data, "batches") else data()
        for feed in source:
            n = feed_samples(feed)
            if n <= 1:
                yield feed
                continue
            for i in range(n):
                yield {k: (v[i:i + 1] if getattr(v, "ndim", 0) else v) for k, v in feed.items()}
    return gen


def limit_samples(data: Callable, n: int) -> Callable:
    """A data callable yielding at most ``n`` samples (batches trimmed on axis 0)."""
    def gen():
        count = 0
        for feed in data():
            if count >= n:
                return
            b = feed_samples(feed)
            if count + b > n:
                feed = {k: (v[: n - count] if getattr(v, "ndim", 0) else v) for k, v in feed.items()}
                b = n - count
            count += b
            yield feed
    return gen


def run_calibration(model: ModelProto, tensors: list, data, options: CalibrationOptions, fmt: FormatOptions,
                    rules: TargetRules, progress: bool, nonneg: Optional[set] = None, bounds: Optional[dict] = None,
                    choose=None, unclipped: Iterable[str] = ()) -> dict:
    """Ranges of ``tensors``; with ``calib_method=auto``, ``choose`` picks each tensor's method
    (:func:`onnxopt.quant.calibrate.calibrate`); without it, auto is the target's default method."""
    method = rules.default_method if options.calib_method == "auto" and choose is None else options.calib_method
    cfg = calib.CalibConfig(method=method, search=options.calib_search, percentile=options.calib_percentile,
                            num_bins=options.calib_bins, workers=options.calib_workers, progress=progress,
                            cache=options.calib_cache or None, trt_table=options.trt_calib_table or None)
    symmetric = fmt.act_symmetric(rules)
    # "unsigned" makes the calibrator clip at 0: only for symmetric quantization with zero point 0 of
    # tensors that are non-negative by construction (ReLU/Clip/Sigmoid outputs) -- uint8 on uint8
    # targets, and below 8 bits on int8 targets too (see activation_params). Asymmetric ranges keep lo.
    bits = fmt.activation_bits
    zero_based = not rules.act_signed or fmt.unsigned_low_bit(bits)
    unsigned = {t: bool(symmetric and zero_based and t in (nonneg or ())) for t in tensors}
    return calib.calibrate(with_clip_bounds(model, bounds or {}), list(tensors), data, cfg,
                           symmetric=symmetric, unsigned=unsigned, bits=bits, choose=choose, unclipped=unclipped)


# ----------------------------------------------------------------------------------- scales
def pow2(scale: np.ndarray) -> np.ndarray:
    return np.exp2(np.ceil(np.log2(np.maximum(scale, MIN_SCALE))))


def activation_params(lo: float, hi: float, bits: int, rules: TargetRules, symmetric: bool, power_of_two: bool,
                      low_bit_unsigned: bool = False) -> ActParams:
    """Scale / zero point / type of a per-tensor activation quantizer for range [lo, hi];
    ``low_bit_unsigned`` (below 8 bits): a symmetric range with ``lo >= 0`` takes [0, 2^b - 1] with
    zero point 0 in the target's own type (int8 on TensorRT), see :func:`unsigned_low_bit`."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise OnnxoptError(f"calibration returned a non-finite range [{lo}, {hi}].", "check the calibration data for overflowing activations")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        # uint8 targets keep zero point 0 for non-negative tensors (uint8) and fall back to int8
        # with zero point 0 for signed ones; int8 targets (TensorRT) are always int8.
        unsigned = (not rules.act_signed) and lo >= 0.0
        zero_based = unsigned or (low_bit_unsigned and bits < 8 and lo >= 0.0)
        qmin, qmax = int_range(bits, signed=not zero_based, narrow=not zero_based)
        scale, signed = (amax / qmax if amax > 0 else 1.0), not unsigned
    else:
        qmin, qmax = int_range(bits, signed=rules.act_signed)
        scale, signed = ((hi - lo) / (qmax - qmin) if hi > lo else 1.0), rules.act_signed
    if power_of_two:
        scale = float(pow2(np.float64(scale)))
    scale = max(scale, MIN_SCALE)
    zp = 0 if symmetric else int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return ActParams(scale, zp, signed, qmin, qmax)


def weight_scales(w: np.ndarray, axis: Optional[int], bits: int, power_of_two: bool, symmetric: bool = True) -> np.ndarray:
    """Scales per channel on ``axis`` (shape [C]) or per tensor (scalar): ``max|w| / qmax``, or,
    asymmetric, the channel's range widened to hold 0 over all ``2^bits`` levels."""
    rows = channel_rows(w.astype(np.float64), axis)
    if not rows.size:
        rows = np.zeros((rows.shape[0], 1))
    qmin, qmax = weight_range(bits, symmetric)
    if symmetric:
        span, levels = np.abs(rows).max(axis=1), qmax
    else:
        span, levels = np.maximum(rows.max(axis=1), 0) - np.minimum(rows.min(axis=1), 0), qmax - qmin
    scale = np.where(span > 0, span / levels, 1.0)
    scale = scale.reshape(()) if axis is None else scale
    if power_of_two:
        scale = pow2(scale)
    return np.maximum(scale, MIN_SCALE)


def weight_zero_points(w: np.ndarray, scale: np.ndarray, axis: Optional[int], bits: int) -> np.ndarray:
    """Asymmetric weight zero points (int8, the shape of ``scale``): the level ``min(w, 0)`` maps to."""
    qmin, qmax = weight_range(bits, symmetric=False)
    rows = channel_rows(w.astype(np.float64), axis)
    lo = np.minimum(rows.min(axis=1), 0) if rows.size else np.zeros(rows.shape[0])
    zp = np.clip(np.rint(qmin - lo / np.asarray(scale, np.float64).reshape(-1)), qmin, qmax)
    return zp.astype(np.int8).reshape(np.asarray(scale).shape)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: Optional[int], bits: int,
                    zero_point: Optional[np.ndarray] = None) -> np.ndarray:
    """int8 ``clip(round(w / s) + zp, qmin, qmax)``; ``zero_point`` None: symmetric, zp 0."""
    qmin, qmax = weight_range(bits, zero_point is None)
    s = along_axis(np.asarray(scale), w.ndim, axis)
    zp = 0 if zero_point is None else along_axis(zero_point, w.ndim, axis).astype(np.float64)
    return np.clip(np.rint(w.astype(np.float64) / s) + zp, qmin, qmax).astype(np.int8)


def layer_weight_bits(graph: gs.Graph, plan, nodes: dict, wbits: int, first_last_bits: int) -> dict:
    """Weight bits per quantized node: ``first_last_bits`` (when set) for the first and last weighted
    layers, ``wbits`` elsewhere. Low-bit PTQ keeps those two at 8 bits by convention (AdaRound, BRECQ):
    the first sees raw pixels through few weights per channel, the last decides the classes."""
    bits = {wc.node: wbits for wc in plan.weights}
    if first_last_bits and first_last_bits != wbits and bits:
        # layers kept in float count too: with keep_first_last the first/last stay float and
        # their quantized neighbours keep weight_bits
        kept = [n for n in plan.excluded if n in nodes and nodes[n].op in placement_mod.WEIGHTED_OPS]
        first, last = placement_mod.first_last_layers(graph, [nodes[n] for n in list(bits) + kept])
        bits.update({n: first_last_bits for n in (first | last) if n in bits})
    return bits


# ------------------------------------------------------------------------------------- apply
def quantize_model(model: ModelProto, options: QdqOptions, data, ctx) -> QuantResult:
    """Quantize ``model`` per ``options`` (the qdq pass's options) with calibration ``data``."""
    found = quantized_ops(model)
    if found:
        raise OnnxoptError(already_quantized_message(found) + ".", "quantize the float model it came from")
    rules = get_target(options.target)
    fmt, calibration = options.format, options.calibration
    fmt.check(rules)
    progress = bool(getattr(ctx, "progress", False))
    bounds = model_io.activation_bounds(model) if calibration.clip_bounds else {}
    model, static_note = static_inputs(model, rules, data, ctx)
    model, notes = prepare_model(model, rules, fmt)
    if static_note:
        notes.append(static_note)
        if ctx is not None:
            ctx.log(static_note)
    if rules.static_shapes and data is not None:
        data = to_static_batch(data, model)
    graph = import_graph(model)
    full_plan = placement_mod.plan(graph, rules, options.placement, fmt.per_channel, ignore_exclusions=True)
    the_plan = placement_mod.plan(graph, rules, options.placement, fmt.per_channel)
    tensors = list(dict.fromkeys(full_plan.activation_tensors() + the_plan.activation_tensors()))
    nonneg = placement_mod.nonnegative_tensors(graph)
    # only a tensor that gets a Q/DQ is clipped in the result, so only there is the clip put back
    bounds = {t: b for t, b in bounds.items() if t in tensors}
    cache = calibration.calib_cache or None
    # a cache that exists is either reused (model, data and settings match) or refused as stale
    cache_state = ("reused" if Path(cache).exists() else "written") if cache and tensors else None
    # per-channel depthwise inputs take per-channel minmax ranges, measured first: the auto search uses them
    per_channel = placement_mod.depthwise_per_channel(graph, the_plan) if options.placement.depthwise_axis(rules, fmt.activation_bits) else []
    channel = calib.channel_ranges(with_clip_bounds(model, bounds), per_channel, data) if per_channel else {}
    choose, search = None, {}
    if calibration.calib_method == "auto" and tensors:
        choose = _range_chooser(model, the_plan, tensors, data, rules, fmt, bounds, search, getattr(ctx, "log", None),
                                channel, per_tensor=calibration.calib_search == "per_tensor")
    # what reaches the outputs through data movement only keeps its full range: nothing after it
    # absorbs a clip (a detector's scores, its box offsets)
    tail = placement_mod.output_tail(graph) if calibration.calib_method != "minmax" else set()
    tail = [t for t in tensors if t in tail]
    if tail:
        notes.append(f"calibration: {len(tail)} tensor(s) that reach the graph outputs through data movement only "
                     f"(e.g. '{tail[0]}') keep their full range (minmax): no later layer absorbs a clip there")
    ranges = run_calibration(model, tensors, data, calibration, fmt, rules, progress, nonneg, bounds, choose,
                             unclipped=tail) if tensors else {}
    ranges.update(channel)
    missing = [t for t in the_plan.activation_tensors() if t not in ranges]
    if missing:
        raise InternalError(f"calibration returned no range for {len(missing)} tensor(s), e.g. '{missing[0]}' "
                            "(placement and calibration disagree)")
    qmodel, info = apply_plan(model, graph, the_plan, ranges, rules, fmt)
    info.notes = notes
    info.skipped = the_plan.skipped
    info.clip_bounds = sorted(bounds)
    info.calib_cache = {"path": str(cache), "state": cache_state} if cache_state else None
    info.calibration = search.get("report") or {"method": calibration.calib_method if not choose else "auto"}
    info.per_channel_activations = per_channel
    return QuantResult(qmodel, info, {k: _range_value(v) for k, v in ranges.items()})


def _range_value(r) -> tuple:
    """(lo, hi) as floats, or as lists for a per-channel range."""
    return tuple(float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist() for v in r[:2])


def _range_chooser(model: ModelProto, plan, tensors: list, data, rules: TargetRules, fmt: FormatOptions, bounds: dict,
                   out: dict, log, fixed: dict, per_tensor: bool = False) -> Callable:
    """The ``choose`` of ``calib_method=auto`` (:mod:`onnxopt.quant.calib_search`): measures the
    Q/DQ model of ``plan`` against the float model with the clips lite removed, the report in
    ``out["report"]``; ``fixed``: ranges not searched (per-channel)."""
    placed = set(plan.activation_tensors()) - set(fixed)
    reference = with_clip_bounds(model, bounds)

    def build(ranges: dict) -> ModelProto:
        return apply_plan(model, import_graph(model), plan, {**ranges, **fixed}, rules, fmt)[0]

    def choose(candidates: dict, seconds: float) -> dict:
        ranges, out["report"] = calib_search.choose_ranges(reference, build, candidates,
                                                           [t for t in tensors if t in placed], data, seconds, log,
                                                           per_tensor=per_tensor)
        return ranges

    return choose


@dataclass
class _PlanWriter:
    """What every Q/DQ insertion of one :func:`apply_plan` call shares."""
    graph: gs.Graph
    names: NameGenerator
    rules: TargetRules
    fmt: FormatOptions
    symmetric: bool
    power_of_two: bool

    def activation_params(self, plan, ranges: dict) -> dict:
        """Quantization parameters (with their scale/zero-point constants) per scale group."""
        tensors, abits = self.graph.tensors(), self.fmt.activation_bits
        group_params: dict = {}
        for rep, members in plan.groups.items():
            if np.ndim(ranges[rep][0]):   # a per-channel quantizer (alone in its group)
                p = self.channel_params(*ranges[rep])
            else:
                lo = min(float(ranges[m][0]) for m in members)
                hi = max(float(ranges[m][1]) for m in members)
                p = activation_params(lo, hi, abits, self.rules, self.symmetric, self.power_of_two, self.fmt.unsigned_low_bit(abits))
            first = tensors[members[0]]
            dtype = np.float16 if first.dtype is not None and np.dtype(first.dtype) == np.float16 else np.float32
            p.scale_const = gs.Constant(self.names(f"{rep}_scale"), np.asarray(p.scale, dtype=dtype))
            p.zp_const = gs.Constant(self.names(f"{rep}_zero_point"), np.asarray(p.zero_point, dtype=np.int8 if p.signed else np.uint8))
            group_params[rep] = p
        return group_params

    def channel_params(self, lo: np.ndarray, hi: np.ndarray) -> ActParams:
        """Per-channel parameters: each channel's per-tensor ones, in one type (signed when any
        channel is, for symmetric activations)."""
        lo, hi = np.minimum(np.asarray(lo, np.float64), 0.0), np.asarray(hi, np.float64)
        if self.symmetric and np.any(lo < 0):
            lo = np.minimum(lo, -MIN_SCALE)
        ps = [activation_params(a, b, self.fmt.activation_bits, self.rules, self.symmetric, self.power_of_two)
              for a, b in zip(lo, hi)]
        p = ps[0]
        return ActParams(np.array([q.scale for q in ps]), np.array([q.zero_point for q in ps]), p.signed, p.qmin, p.qmax, axis=1)

    def clip(self, t: gs.Variable, p) -> gs.Variable:
        """Below 8 bits the tensor is clipped to the quantized range first; returns the clipped tensor."""
        names = self.names
        lo_q, hi_q = (p.qmin - p.zero_point) * p.scale, (p.qmax - p.zero_point) * p.scale
        clipped = gs.Variable(names(f"{t.name}_clipped"), dtype=t.dtype, shape=t.shape)
        fdt = np.float16 if t.dtype is not None and np.dtype(t.dtype) == np.float16 else np.float32
        self.graph.nodes.append(gs.Node("Clip", names(f"{t.name}_Clip"),
                                        inputs=[t, gs.Constant(names(f"{t.name}_clip_min"), np.asarray(lo_q, fdt)),
                                                gs.Constant(names(f"{t.name}_clip_max"), np.asarray(hi_q, fdt))],
                                        outputs=[clipped]))
        return clipped

    def activation(self, t: gs.Variable, p, excluded: set) -> tuple:
        """Q/DQ after ``t``, read by every consumer outside ``excluded``: (Q node, DQ node, DQ output)."""
        names = self.names
        readers = [n for n in list(t.outputs) if n.name not in excluded]
        src = self.clip(t, p) if self.fmt.activation_bits < 8 else t
        q_out = gs.Variable(names(f"{t.name}_quantized"), dtype=np.int8 if p.signed else np.uint8, shape=t.shape)
        dq_out = gs.Variable(names(f"{t.name}_dequantized"), dtype=t.dtype, shape=t.shape)
        attrs = {"axis": p.axis} if p.axis is not None else {}
        qn = gs.Node("QuantizeLinear", names(f"{t.name}_QuantizeLinear"), attrs=dict(attrs),
                     inputs=[src, p.scale_const, p.zp_const], outputs=[q_out])
        dqn = gs.Node("DequantizeLinear", names(f"{t.name}_DequantizeLinear"), attrs=dict(attrs),
                      inputs=[q_out, p.scale_const, p.zp_const], outputs=[dq_out])
        self.graph.nodes.extend([qn, dqn])
        for reader in readers:
            swap_input(reader, t, dq_out)
        return qn, dqn, dq_out

    def dequantize(self, base: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, fdt, shape: list, axis) -> tuple:
        """A DequantizeLinear of constant ``q``: (its output, the q/scale/zero-point constants)."""
        names = self.names
        q_c = gs.Constant(names(f"{base}_quantized"), q)
        s_c = gs.Constant(names(f"{base}_scale"), np.asarray(scale, dtype=fdt))
        z_c = gs.Constant(names(f"{base}_zero_point"), zero_point)
        out = gs.Variable(names(f"{base}_dequantized"), dtype=fdt, shape=shape)
        attrs = {"axis": int(axis)} if axis is not None else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear"),
                                        attrs=attrs, inputs=[q_c, s_c, z_c], outputs=[out]))
        return out, q_c, s_c, z_c


def _int_bias_scale(scale, b: np.ndarray, data_scale: float, power_of_two: bool) -> tuple:
    """(scale, fits): the weight scale widened so that the int32 bias (scale data_scale * weight
    scale) cannot overflow; fits is False where the scale's shape does not match the bias's."""
    fits = True
    if scale.ndim == 0:
        need = np.max(np.abs(b) / (np.asarray(data_scale) * (INT32_MAX - 1))) if b.size else 0.0
        scale = np.maximum(scale, need)
    elif scale.shape[0] == b.shape[0]:
        scale = np.maximum(scale, np.abs(b) / (data_scale * (INT32_MAX - 1)))
    else:
        fits = False
    return (pow2(scale) if power_of_two else scale), fits


def _quantize_bias(writer: _PlanWriter, node: gs.Node, wc, b: np.ndarray, scale, data_scale: float, fdt) -> tuple:
    """Replace the bias of ``node`` by an int32 DequantizeLinear; returns (its int32 initializer, its scale)."""
    s_vec = np.broadcast_to(np.asarray(scale, np.float64), b.shape)
    bscale = (data_scale * s_vec).astype(np.float32)
    bq = np.clip(np.rint(b / bscale.astype(np.float64)), -INT32_MAX - 1, INT32_MAX).astype(np.int32)
    b_dq, bq_c, bs_c, _ = writer.dequantize(node.inputs[wc.bias_index].name, bq, bscale.astype(fdt),
                                            np.zeros(b.shape, dtype=np.int32), fdt, list(b.shape), 0)
    node.inputs[wc.bias_index] = b_dq
    return bq_c.name, bs_c.name


def _quantize_layer(writer: _PlanWriter, node: gs.Node, wc, bits: int, data_scale: Optional[float], input_dq: Optional[str],
                    shared: dict, int4_names: list) -> LayerQuant:
    """Quantize one layer's weight (and, for an integer-bias target, its bias); returns its record.
    A weight quantized the same way for several layers gets one DequantizeLinear (``shared``)."""
    fmt = writer.fmt
    w_t = node.inputs[wc.input_index]
    w = np.asarray(constant_value(w_t))
    fdt = w.dtype
    # asymmetric only below 8 bits: an 8-bit one fills [-128, 127], and onnxruntime's u8 x s8
    # kernels on AVX2 CPUs without VNNI add pairs of products in int16, which saturates once stored
    # weights pass +-64 (tools/bench_qdq.py saturation); below 8 bits the stored values stay small
    sym_w = fmt.weight_symmetric or bits >= 8
    qmin_w, qmax_w = weight_range(bits, sym_w)
    scale = weight_scales(w, wc.axis, bits, writer.power_of_two, sym_w)
    b = None
    if writer.rules.int_bias and wc.bias_tensor is not None and data_scale is not None:
        b = np.asarray(constant_value(node.inputs[wc.bias_index]), dtype=np.float64)
        scale, fits = _int_bias_scale(scale, b, data_scale, writer.power_of_two)
        b = b if fits else None
    # zero points after any scale change above (asymmetric: they depend on the scale)
    zp = None if sym_w else weight_zero_points(w, scale, wc.axis, bits)
    key = (w_t.name, wc.axis, bits, tuple(np.asarray(scale).reshape(-1).tolist()), sym_w)
    if key not in shared:
        shared[key] = writer.dequantize(w_t.name, quantize_weight(w, scale, wc.axis, bits, zp), scale,
                                        np.zeros(np.asarray(scale).shape, dtype=np.int8) if zp is None else zp,
                                        fdt, list(w.shape), wc.axis)
        if fmt.low_bit == "int4" and bits == 4:
            int4_names.append(shared[key][1].name)
    w_dq, wq_c, ws_c, wz_c = shared[key]
    node.inputs[wc.input_index] = w_dq
    layer = LayerQuant(node=node.name, op=node.op, weight_q=wq_c.name, weight_scale=ws_c.name, weight_zero_point=wz_c.name,
                       axis=wc.axis, qmin=qmin_w, qmax=qmax_w, bias=wc.bias_tensor, bias_is_int=False, bias_scale=None,
                       input_dq=input_dq, float_weight=wc.tensor)
    if b is not None:
        layer.bias_q, layer.bias_scale = _quantize_bias(writer, node, wc, b, scale, data_scale, fdt)
        layer.bias_is_int = True
    return layer


def apply_plan(model: ModelProto, graph: gs.Graph, plan, ranges: dict, rules: TargetRules, fmt: FormatOptions) -> tuple:
    """Rewrite ``graph`` (imported from ``model``) per ``plan``; returns (model, :class:`QuantInfo`)."""
    writer = _PlanWriter(graph, NameGenerator(graph), rules, fmt, fmt.act_symmetric(rules), rules.power_of_two or fmt.power_of_two)
    wbits = fmt.weight_bits
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    # before any Q/DQ is appended: first/last are found by walking the nodes in graph order
    bits_of = layer_weight_bits(graph, plan, nodes, wbits, fmt.first_last_weight_bits)
    group_params = writer.activation_params(plan, ranges)

    activations_info = []
    dq_of: dict = {}
    act_scale_of: dict = {}
    for cmd in plan.activations:
        t = tensors[cmd.tensor]
        p = group_params[cmd.group]
        qn, dqn, dq_out = writer.activation(t, p, plan.excluded)
        dq_of[t.name] = dq_out.name
        act_scale_of[t.name] = p.scale
        activations_info.append({"tensor": t.name, "scale": p.scale_const.name, "zero_point": p.zp_const.name,
                                 "q_node": qn.name, "dq_node": dqn.name, "group": cmd.group,
                                 "scale_value": _range_value((p.scale,))[0], "zero_point_value": _range_value((p.zero_point,))[0],
                                 "axis": p.axis, "dtype": "int8" if p.signed else "uint8", "range": list(_range_value(ranges[t.name]))})

    layers, int4_names, shared = [], [], {}
    for wc in plan.weights:   # data_scale and input_dq are None where the layer's input is not quantized
        layers.append(_quantize_layer(writer, nodes[wc.node], wc, bits_of[wc.node], act_scale_of.get(wc.data_tensor),
                                      dq_of.get(wc.data_tensor), shared, int4_names))

    out = export_graph(graph, like=model)
    if int4_names:
        _to_int4(out, set(int4_names))
    info = QuantInfo(target=rules.name, activation_bits=fmt.activation_bits, weight_bits=wbits,
                     weight_bits_by_layer={n: b for n, b in bits_of.items() if b != wbits}, symmetric=writer.symmetric,
                     weight_symmetric=fmt.weight_symmetric, power_of_two=writer.power_of_two, layers=layers,
                     activations=activations_info, excluded=sorted(plan.excluded), groups=len(plan.groups))
    return out, info


def _to_int4(model: ModelProto, names: set) -> None:
    """Re-type the given int8 initializers (values already in [-8, 7]) and their zero points as INT4."""
    def retype(t: TensorProto) -> None:
        arr = numpy_helper.to_array(t)
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.INT4, arr.shape, arr.reshape(-1).tolist()))

    for t in model.graph.initializer:
        if t.name in names:
            retype(t)
    by_name = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in names and len(node.input) > 2:
            retype(by_name[node.input[2]])
