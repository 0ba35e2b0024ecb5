"""Per-target quantization rules: what each deployment runtime accepts in a QDQ model.

A :class:`TargetRules` says how activations and weights are quantized, how the bias is stored,
which opset the output must have and which placement family is used (see
:mod:`onnxopt.quant.placement`). Why the targets differ:

* ``tensorrt`` -- TensorRT explicit quantization (onnx-tensorrt parser rules): int8 only, every
  zero point 0; Q/DQ on the *inputs* of weighted ops and on the residual input of Adds
  (TensorRT's placement guidance), never on their outputs; opset >= 13 (per-axis Q/DQ).
* ``ort`` -- onnxruntime's fast CPU layout: an int32 bias (``DequantizeLinear`` with scale
  ``s_in*s_w``) because onnxruntime only fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` when every
  input -- the bias included -- is a DQ; the output Q placed after a following Relu/Clip so
  onnxruntime absorbs the activation into the quantized range. Per-channel (axis 1) activation
  Q/DQ run too (unfused), so ``depthwise_per_channel`` is offered here only.
* ``tidl`` -- what TI's QAT exports and TIDL imports pre-quantized: int8 per-channel symmetric
  weights, uint8 per-tensor activations, int32 bias, opset 17, static shapes; before Q/DQ placement
  the float graph is rewritten exactly at the static input size (cleanup folds the shape
  arithmetic, ReduceMean becomes GlobalAveragePool/MatMul).
* ``tidl-tda4vm`` -- the TDA4VM (MMAv1) scheme: per-tensor symmetric power-of-two scales for
  weights and activations (zero point 0; uint8 for non-negative activations, int8 otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import OptionError

# Ops with a weight input that is quantized per channel (the "weighted" layers).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class TargetRules:
    name: str
    placement: str                  # "inputs" (TensorRT style) or "ops" (onnxruntime/TIDL style)
    act_signed: bool                # int8 activations (True) or uint8 (False)
    act_symmetric: bool             # default symmetry of activations
    allow_asymmetric: bool          # may the user ask for asymmetric activations?
    allow_asymmetric_weights: bool  # ... and for weights with zero points (onnxruntime's int8 kernels take them)
    per_channel: bool               # per-channel weights by default / at all
    power_of_two: bool              # scales forced to powers of two
    int_bias: bool                  # bias stored as int32 + DQ(scale = s_in * s_w)
    min_opset: int
    fixed_opset: Optional[int]      # convert to exactly this opset (tidl: 17)
    static_shapes: bool             # refuse dynamic input shapes
    allow_int4_weights: bool        # int4 weight initializers (opset >= 21) accepted
    absorb_activations: bool        # move the output Q past a following Relu/Clip
    per_channel_activations: bool   # per-axis activation Q/DQ accepted (onnxruntime; TensorRT and TIDL refuse it)
    default_method: str             # calibration method for "auto" (measured: tools/bench_qdq.py)
    float_rewrites: tuple = ()      # exact lite rules run on the float graph before Q/DQ placement
                                    # (qdq.target_rewrites), after cleanup at the static input size


# TIDL takes no ReduceMean alone (TI's model optimizer converts it, but only in graphs without
# QuantizeLinear: the rewrite must come before Q/DQ placement).
TIDL_REWRITES = ("reducemean_to_pool", "reducemean_to_matmul")

TARGETS = {
    "tensorrt": TargetRules(name="tensorrt", placement="inputs", act_signed=True, act_symmetric=True,
        allow_asymmetric=False, allow_asymmetric_weights=False, per_channel=True, power_of_two=False, int_bias=False,
        min_opset=13, fixed_opset=None, static_shapes=False, allow_int4_weights=True, absorb_activations=False,
        per_channel_activations=False, default_method="percentile"),
    "ort": TargetRules(name="ort", placement="ops", act_signed=False, act_symmetric=False, allow_asymmetric=True,
        allow_asymmetric_weights=True, per_channel=True, power_of_two=False, int_bias=True, min_opset=13,
        fixed_opset=None, static_shapes=False, allow_int4_weights=True, absorb_activations=True,
        per_channel_activations=True, default_method="mse"),
    "tidl": TargetRules(name="tidl", placement="ops", act_signed=False, act_symmetric=False, allow_asymmetric=True,
        allow_asymmetric_weights=False, per_channel=True, power_of_two=False, int_bias=True, min_opset=17,
        fixed_opset=17, static_shapes=True, allow_int4_weights=False, absorb_activations=True,
        per_channel_activations=False, default_method="mse", float_rewrites=TIDL_REWRITES),
    "tidl-tda4vm": TargetRules(name="tidl-tda4vm", placement="ops", act_signed=False, act_symmetric=True,
        allow_asymmetric=False, allow_asymmetric_weights=False, per_channel=False, power_of_two=True, int_bias=True,
        min_opset=17, fixed_opset=17, static_shapes=True, allow_int4_weights=False, absorb_activations=True,
        per_channel_activations=False, default_method="mse", float_rewrites=TIDL_REWRITES),
}

TARGET_NAMES = tuple(TARGETS)


def get_target(name: str) -> TargetRules:
    if name not in TARGETS:
        raise OptionError(f"unknown quantization target '{name}'.", f"valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def weight_axis(op: str, attrs: dict, weight_rank: int, group: int = 1) -> Optional[int]:
    """The per-channel (output-feature) axis of the weight of ``op``, or None for per-tensor: Conv
    [M, C/g, k...] -> 0; ConvTranspose [C, M/g, k...] -> 1 (its output channels; ORT and ModelOpt
    use 1) only when group == 1, since axis 1 then holds M/g, not M; Gemm's B [K, N] ([N, K] with
    transB=1) -> the N axis; MatMul's B [..., K, N] -> the last axis."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if group == 1 else None
    if op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return weight_rank - 1 if weight_rank >= 2 else None
    return None


