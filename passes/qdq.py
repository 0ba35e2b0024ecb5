"""``qdq``: insert QuantizeLinear/DequantizeLinear for TensorRT, onnxruntime or TIDL, calibrated on data.

Approximate pass: the output is the float model with simulated int8 (or fewer bits) arithmetic.
It keeps the graph's inputs, outputs and every float op; it only adds Q/DQ pairs on activations,
replaces float weights by integer initializers followed by DQ, and, for ort/tidl, a Conv/Gemm bias
by an int32 initializer with scale ``s_in * s_w`` (the engine: :mod:`onnxopt.quant.quantize`). The
output passes ``onnxopt check --target <target>``; the pass reports the check in ``extra["check"]``.
A float16 model is quantized as its float32 twin (:mod:`onnxopt.quant.upcast`), its float16
inputs and outputs kept.

Calibration data is required (``--calib-data``); ``--calib-data random`` is accepted explicitly,
with a loud warning, because ranges from random inputs are meaningless for real data.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
from onnx import helper, numpy_helper

from onnxopt import runtime, stats
from onnxopt.data import RANDOM_SAMPLES
from onnxopt.errors import OnnxoptError
from onnxopt.quant import check as qcheck
from onnxopt.quant import recovery
from onnxopt.quant.dequantize import DequantizeError, dequantize, quantization_format
from onnxopt.quant.options import CalibrationOptions, QdqOptions
from onnxopt.quant.prepare import float_for_target
from onnxopt.quant.quantize import limit_samples, quantize_model, to_static_batch
from onnxopt.quant.targets import get_target
from onnxopt.quant.upcast import float32_twin
from onnxopt.quant.view import already_quantized_message, quantized_ops
from onnxopt.registry import PassResult, register_pass
from onnxopt.quant.calib_search import SEARCH_SAMPLES
from onnxopt.task_metric import HeldIn


def _tell(ctx, warns: list, note) -> None:
    """Log ``note`` and keep it for the report's warnings; nothing when there is no note."""
    if note:
        ctx.log(note)
        warns.append(note)


def _calibration_data(options: CalibrationOptions, ctx):
    """The data callable to calibrate on (``options.validate`` has checked that there is one);
    random data warns loudly."""
    warns = []
    data = ctx.data
    source = getattr(ctx.data_spec, "source", None) if ctx.data_spec is not None else None
    n = options.calib_samples
    if source == "random":
        msg = ("WARNING: calibrating on RANDOM data (--calib-data random): the activation ranges do not reflect "
               "real inputs and the quantized model's accuracy is meaningless. Use real calibration data.")
        warnings.warn(msg, UserWarning, stacklevel=2)
        _tell(ctx, warns, msg)
        if not n and getattr(ctx.data_spec, "max_samples", None) is None:
            n = RANDOM_SAMPLES  # a DataSource caps generated inputs itself; other data callables may not
    if n:
        data = limit_samples(data, n)
    # the samples the calibration reads are kept (up to a cap) for the calibration search and
    # fallback=auto to measure on, without reading the data again when it all fit
    return HeldIn(data, limit=SEARCH_SAMPLES, max_mb=64), warns


def _dequantized_input(model, found: dict, target: str):
    """An already-quantized input (a QAT export, onnxruntime's quantize_static/dynamic): None when its
    encoding passes the target's check (it is left as it is), else (the float model its quantization
    stands for, the console note, the report record); what cannot be dequantized is refused."""
    bad = qcheck.failing(qcheck.check_model(model, target))
    if not bad:
        return None
    fmt = quantization_format(model)
    rules = ", ".join(sorted({v.rule for v in bad}))
    failing = f"its encoding fails {target}'s check ({len(bad)} violation(s): {rules})"
    try:
        deq = dequantize(model)
    except DequantizeError as exc:
        raise OnnxoptError(f"the input is already quantized ({fmt}) and {failing}; it cannot be re-quantized: "
                           + "; ".join(exc.reasons) + ".", "quantize the float model it came from") from None
    note = (f"qdq: input was already quantized ({deq.describe()}); {failing}: re-quantized for {target} from its "
            "dequantized weights")
    return deq.model, note, {**deq.to_dict(), "input_violations": len(bad), "first_violation": str(bad[0])}


def _encode_float_biases(qmodel) -> list:
    """Re-encode, in place, the float constant biases of Conv/Gemm layers whose input and weight
    come through DequantizeLinear as ``DQ(int32, scale=s_in*s_w, zp=0)`` (the ort/tidl bias rule);
    a recovery step that writes a corrected float bias leaves such biases. Returns the layers fixed."""
    g = qmodel.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = Counter(name for n in g.node for name in n.input)

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    fixed, new_nodes = [], []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        px, pw = producer.get(node.input[0]), producer.get(node.input[1])
        if px is None or pw is None or px.op_type != "DequantizeLinear" or pw.op_type != "DequantizeLinear":
            continue
        bias = const(node.input[2])
        s_in, s_w = const(px.input[1]), const(pw.input[1])
        if bias is None or s_in is None or s_w is None or bias.dtype.kind != "f" or s_in.size != 1:
            continue
        scale = (np.float64(s_in.reshape(-1)[0]) * s_w.astype(np.float64).reshape(-1)).astype(np.float32)
        if scale.size not in (1, bias.size) or np.any(scale <= 0):
            continue
        q = np.clip(np.round(bias.astype(np.float64) / np.broadcast_to(scale, bias.shape)), -2**31, 2**31 - 1).astype(np.int32)
        base = f"{node.input[2]}_int32"
        names = [base, base + "_scale", base + "_zero_point", base + "_dq"]
        taken = set(inits) | set(producer)
        names = [n if n not in taken else f"{n}_{len(fixed)}" for n in names]
        g.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int32), names[2])])
        attrs = {"axis": 0} if scale.size > 1 else {}
        new_nodes.append(helper.make_node("DequantizeLinear", names[:3], [names[3]], name=names[3], **attrs))
        old = node.input[2]
        node.input[2] = names[3]
        if readers[old] == 1:
            g.initializer.remove(inits[old])
        fixed.append(node.name or node.output[0])
    if new_nodes:  # DQ of constants: put them first, ahead of their readers
        nodes = new_nodes + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    return fixed


def _saturation_note(info) -> str | None:
    """The ort target's 8-bit weights lose accuracy in onnxruntime's fused kernels on AVX2 CPUs
    without VNNI (README); the model may be deployed on another CPU, so this is only a note."""
    if (info.target != "ort" or 8 not in {info.weight_bits, *info.weight_bits_by_layer.values()}
            or not runtime.int8_kernels_saturate()):
        return None
    return ("NOTE: this CPU has AVX2 but no VNNI, where onnxruntime's fused int8 kernels saturate on 8-bit weights. "
            "To deploy on such a CPU, use 7-bit weights (--set qdq.weight_bits=7, or first_last_weight_bits=7 where "
            "those layers are at 8: onnxruntime's reduce_range); keep 8 bits for VNNI CPUs.")


def _target_check(qmodel, target: str, strict: bool, ctx, warns: list) -> dict:
    """``extra["check"]``: the output checked against its target's rules (a float bias a recovery
    step wrote is re-encoded first). Failing violations are warned; nodes the target runs on its
    fallback (TIDL: ARM through ONNX Runtime) are one note."""
    violations = qcheck.check_model(qmodel, target)
    if any(v.rule == "int32-bias" for v in violations):
        fixed = _encode_float_biases(qmodel)
        if fixed:
            note = (f"qdq: {len(fixed)} float bias(es) written after quantization (e.g. {fixed[0]}) re-encoded as int32 "
                    f"with scale s_in*s_w, as {target} requires")
            _tell(ctx, warns, note)
            violations = qcheck.check_model(qmodel, target)
    bad = qcheck.failing(violations, strict)
    elsewhere = None if strict else qcheck.fallback_summary(violations, target)
    if bad:  # the model is written (or refused, by the CLI), but the user must hear that it fails its own target's check
        msg = (f"WARNING: the quantized model fails `onnxopt check --target {target}{' --strict' if strict else ''}`: "
               f"{len(bad)} violation(s), first {bad[0]}" + (f" (and {len(bad) - 1} more in the report)" if len(bad) > 1 else ""))
        warnings.warn(msg, UserWarning, stacklevel=3)
        _tell(ctx, warns, msg)
    if elsewhere:
        _tell(ctx, warns,
              f"qdq: {qcheck.describe_fallback(elsewhere)} (`onnxopt check OUT --target {target} --json` lists them)")
    return {"target": target, "strict": strict, "violations": len(bad),
            "format_violations": sum(1 for v in bad if v.kind == "format"), "fallback": elsewhere,
            "first": [v.to_dict() for v in bad[:10]]}


def _still_quantized(qmodel, info) -> tuple:
    """(layers, activation count) of ``info`` whose Q/DQ the written model still holds. ``info``
    is what the quantizer wrote; fallback=auto then puts some units back in high precision, and
    the summary line must count the model the user gets (it said "weights_quantized=50" of a model
    with 44 of its 50 layers back in float)."""
    dq_reads = {n.input[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    nodes = {n.name for n in qmodel.graph.node}
    return ([l for l in info.layers if l.weight_q in dq_reads],
            sum(1 for a in info.activations if a["dq_node"] in nodes))


def _float_recurrent_note(model) -> list:
    """One line when GRU/LSTM/RNN nodes stay float (no target here takes them as int8 Q/DQ: TensorRT
    and onnxruntime run recurrent layers in float), with their share of the MACs, so that nobody
    reads "weights quantized" as "the model runs in int8" when most of its work is recurrent."""
    if not any(n.op_type in stats.RECURRENT_OPS for n in model.graph.node):
        return []
    rows = stats.layer_macs(model)
    rec = [r for r in rows if r["op"] in stats.RECURRENT_OPS]
    total = sum(r["macs"] or 0 for r in rows)
    share = (f", {100 * sum(r['macs'] or 0 for r in rec) / total:.0f} % of the MACs"
             if total and all(r["macs"] is not None for r in rec) else "")
    ops = ", ".join(f"{sum(1 for r in rec if r['op'] == op)} {op}" for op in sorted({r["op"] for r in rec}))
    return [f"{ops} node(s) stay float{share}: recurrent ops get no Q/DQ (TensorRT and onnxruntime run them in float)"]


@register_pass("qdq", "Int8 Q/DQ quantization with calibration, laid out for TensorRT, onnxruntime or TIDL.", exact=False, options=QdqOptions)
def qdq(model, options: QdqOptions, ctx):
    """Insert Q/DQ per the target's rules, calibrated on --calib-data; see `onnxopt check`."""
    found = quantized_ops(model)
    requant = _dequantized_input(model, found, options.target) if found else None
    if found and requant is None:  # a QAT export or a model quantized before, that the target takes: leave it, say so
        return PassResult(model, skipped=[already_quantized_message(found) + f"; its own encoding passes `onnxopt check "
                                          f"--target {options.target}`, so it is left unchanged"])
    model = requant[0] if requant else model
    model, widened = float32_twin(model)
    options.validate(model, ctx)
    data, warns = _calibration_data(options.calibration, ctx)
    if requant:
        _tell(ctx, warns, requant[1])
    model = float_for_target(model, options, data, ctx, lambda note: _tell(ctx, warns, note), widened)
    float_model = model
    result = quantize_model(model, options, data, ctx)
    qmodel, info = result.model, result.info
    check_data = ctx.check_data
    if check_data is not None and options.recovery.fallback != "auto":
        _tell(ctx, warns, f"qdq: the check data is read by fallback=auto only (qdq.fallback={options.recovery.fallback} "
                          "here): it was not used")
    if get_target(info.target).static_shapes:   # recovery runs the static model too
        data = to_static_batch(data, qmodel) if data is not None else None
        check_data = to_static_batch(check_data, qmodel) if check_data is not None else None
    if info.calib_cache:
        c = info.calib_cache
        ctx.log(f"calibration cache '{c['path']}': " + ("reused (model, data and settings match)" if c["state"] == "reused"
                                                        else "written"))
    _tell(ctx, warns, _saturation_note(info))
    extra = {"target": info.target, "notes": info.notes, "groups": info.groups, "excluded": info.excluded, "warnings": warns,
             **({"requantized": requant[2]} if requant else {}), **({"widened": widened.to_dict()} if widened else {})}
    if options.recovery.requested:
        qmodel, rep = recovery.recover(float_model, qmodel, info, options.recovery, data, ctx, options.calibration.calib_samples,
                                       check_data=check_data)
        extra["recovery"] = rep
        if (rep.get("fallback") or {}).get("warning"):
            warns.append(rep["fallback"]["warning"])
    extra["check"] = _target_check(qmodel, info.target, options.strict_check, ctx, warns)
    extra["info"] = info.to_dict()   # the report: plain JSON
    layers, acts = _still_quantized(qmodel, info)
    changes = {"weights_quantized": len(layers), "activations_quantized": acts,
               "int32_biases": sum(1 for l in layers if l.bias_is_int), "nodes_kept_float": len(info.excluded)}
    fb = (extra.get("recovery") or {}).get("fallback")
    if fb:   # the units fallback=auto put back, in the precision the target runs them in
        changes[f"units_kept_{fb['precision']}"] = len(fb["high_precision_layers"])
    details = [f"{l.node} ({l.op}): weight axis {l.axis}, bias {'int32' if l.bias_is_int else 'float'}" for l in layers]
    skipped = list(info.skipped) + _float_recurrent_note(float_model)
    if not info.layers and not info.activations:   # (not a fallback that kept every unit: it says so itself)
        skipped.append("nothing quantized: " + ("every quantizable node is kept in float (exclude_*, keep_first_last, op_types)"
                                                if info.excluded else
                                                "the model has no Conv/ConvTranspose/Gemm/MatMul with a constant float weight, "
                                                "nor another op the target quantizes"))
    extra["ways_out"] = ("keep the most sensitive layers in float (--set qdq.fallback=auto --set qdq.max_error=...; "
                         "onnxopt sensitivity ranks them), recovery (qdq.bias_correction=empirical, qdq.rounding=adaround), "
                         "another --calib-method, or quantization-aware training (onnxopt finetune OUT --teacher MODEL --data DATA)")
    return PassResult(qmodel, changes=changes, details=details, skipped=skipped, extra=extra)
