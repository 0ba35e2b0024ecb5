"""The float model the quantizer works on, as the ``qdq`` pass and ``onnxopt sensitivity`` both
prepare it, so that a layer ranking describes the layers the pass quantizes.

:func:`float_for_target` takes the float model (a float16 model already widened by
:func:`onnxopt.quant.upcast.float32_twin`) and, each step said in one line through ``tell``: warns
about BatchNormalization the ort target would leave in float and about layer weights listed as
graph inputs (overridable: left float); rewrites the graph for the target at its static input size
(TIDL: cleanup, ReduceMean -> GlobalAveragePool / MatMul, as TI's optimizer does before
quantizing); folds weights and biases computed in the graph (the dynamo exporter's
``CastLike -> Expand`` bias) with the exact cleanup pass.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from onnx import ModelProto

from .. import manager
from ..ir.graph import overridable_inputs
from ..ir.proto import producers
from .options import QdqOptions
from .quantize import static_inputs
from .targets import get_target


def float_for_target(model: ModelProto, options: QdqOptions, data, ctx, tell: Callable[[Optional[str]], None],
                     widened=None) -> ModelProto:
    """``model`` ready for :func:`onnxopt.quant.quantize.quantize_model` (see the module doc);
    ``tell`` receives each note (None: nothing to say)."""
    if widened:
        tell(f"qdq: a float16/bfloat16 model is quantized as its float32 twin ({widened.describe()}); "
             "the layers left in float compute in float32 (a TensorRT engine built with --fp16 runs them in fp16)")
    tell(unfolded_bn_warning(model, options.target))
    tell(weight_inputs_warning(model))
    model = rewrite_for_target(model, options, data, ctx, tell)
    model, note = fold_computed_weights(model, ctx)
    tell(note)
    return model


def rewrite_for_target(model, options: QdqOptions, data, ctx, tell: Callable[[Optional[str]], None]):
    """The float model rewritten for the target (``target_rewrites``: tidl's ``float_rewrites``)
    at its static input size: cleanup, then the target's exact lite rules, each verified. TI's own
    optimizer rewrites only graphs without QuantizeLinear, so this must come before quantization."""
    rules = get_target(options.target)
    if not options.target_rewrites or not rules.float_rewrites:
        return model
    static, note = static_inputs(model, rules, data, ctx)
    tell(note)
    inner = dataclasses.replace(ctx, data=None, data_spec=None, log=lambda msg: ctx.log(f"  (qdq) {msg.strip()}"))
    out, report = manager.apply(static, "cleanup,lite", {"lite": {"rules": list(rules.float_rewrites)}}, context=inner,
                                summarize_layers=False)
    ops_before, ops_after = report.passes[0].before["ops"], report.passes[-1].after["ops"]
    gone = {op: n - ops_after.get(op, 0) for op, n in ops_before.items() if n > ops_after.get(op, 0)}
    if gone:
        note = (f"qdq: the float graph rewritten for {rules.name} before quantization (exact, verified): "
                f"{sum(ops_before.values())} -> {sum(ops_after.values())} nodes, removed "
                + ", ".join(f"{op} x{n}" for op, n in sorted(gone.items(), key=lambda kv: -kv[1])))
        tell(note)
    return out


def fold_computed_weights(model, ctx):
    """(model, note): where a Conv/ConvTranspose/Gemm weight or bias is computed by nodes (the dynamo
    exporter's ``CastLike(Constant, x) -> Expand`` bias), the model after exact cleanup folded them
    (quantization needs constant weights and biases), and a note; else (model, None)."""
    computed_by_nodes = {o for n in model.graph.node if n.op_type != "Constant" for o in n.output}
    computed = [n.name or n.output[0] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")
                and any(i in computed_by_nodes for i in n.input[1:3] if i)]
    if not computed:
        return model, None
    inner = dataclasses.replace(ctx, log=lambda msg: ctx.log(f"  (qdq) {msg.strip()}"))
    cleaned, _ = manager.apply(model, "cleanup", context=inner, summarize_layers=False)
    return cleaned, (f"qdq: {len(computed)} layer(s) compute their weight or bias at run time (e.g. {computed[0]}); "
                     "ran the exact cleanup pass first to fold them into constants")


def unfolded_bn_warning(model, target: str):
    """onnxruntime turns DQ -> Conv -> Q into an int8 kernel only when nothing sits between the
    Conv and its Q, so an unfolded BatchNormalization leaves every such layer in float. TensorRT
    and TIDL fold BN themselves, so only the ort target is warned."""
    if target != "ort":
        return None
    producer = producers(model.graph)
    n_bn = sum(1 for n in model.graph.node
               if n.op_type == "BatchNormalization" and getattr(producer.get(n.input[0]), "op_type", None) in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    if not n_bn:
        return None
    return (f"WARNING: {n_bn} BatchNormalization node(s) follow Conv/Gemm layers; onnxruntime runs those layers in "
            "float, not int8. Fold them first: put bnfuse before qdq (e.g. `onnxopt apply bnfuse,qdq ...`).")


def weight_inputs_warning(model) -> str | None:
    """Layer weights listed as graph inputs (a ``keep_initializers_as_inputs=True`` export, IR >= 4)
    are overridable at run time, so no weight of theirs is quantized: one line that says how to
    make them constants, instead of a model with float weights and a list of skipped layers."""
    overridable = overridable_inputs(model)
    n = sum(1 for node in model.graph.node
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in overridable)
    if not n:
        return None
    return (f"WARNING: {n} layer weight(s) are graph inputs (overridable at run time: an export with "
            "keep_initializers_as_inputs=True), so their layers stay float; run cleanup first, which makes layer weights "
            "constants (e.g. `onnxopt apply cleanup,bnfuse,qdq ...`)")
