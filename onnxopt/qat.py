"""Quantization-aware training setup for a float model: ``--qat wXaY`` (micronet's bit choices).

The float model is quantized by the ``qdq`` pass (placement, calibration and the QDQ contract layout
are its job), then trained with its latent weights started from the *float* weights, not from their
PTQ-rounded values. 16-bit quantization is not offered: the qdq pass (and ONNX before opset 21) has
no int16 Q/DQ.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
from onnx import ModelProto, numpy_helper

from . import manager
from .errors import OptionError
from .ir.proto import const_tensors
from .quant.view import QuantInfo, quantized_ops
from .registry import PassContext


def parse_qat(spec: str) -> tuple:
    """'w4a8' -> (4, 8); 'wta8' -> ('ternary', 8); 'wba4' -> ('binary', 4)."""
    m = re.fullmatch(r"w(\d+|t|b)a(\d+)", spec.strip().lower())
    if not m:
        raise OptionError(f"bad --qat '{spec}'.", "write it as wXaY with X in 2..8, t (ternary) or b (binary) and Y in 2..8, e.g. w4a4")
    w, a = m.group(1), int(m.group(2))
    w = {"t": "ternary", "b": "binary"}.get(w, w)
    if w not in ("ternary", "binary"):
        w = int(w)
        if not 2 <= w <= 8:
            raise OptionError(f"--qat weight bits {w} not supported.", "weights: 2..8 bits, t (ternary) or b (binary); 16-bit Q/DQ needs opset 21 and is not offered")
    if not 2 <= a <= 8:
        raise OptionError(f"--qat activation bits {a} not supported.", "activations: 2..8 bits")
    return w, a


def prepare_qat(model: ModelProto, spec: str, calib_data, *, target: str = "tensorrt", per_channel: bool = True,
                symmetric: str = "auto", low_bit: str = "restricted", extra_options: Optional[dict] = None, log=print) -> tuple:
    """Quantize a float ``model`` with the qdq pass for QAT.

    Returns (qdq model, finetune overrides {weight_modes, float_weights}, qdq info)."""
    if quantized_ops(model):
        raise OptionError("--qat given, but the model is already quantized (it has Q/DQ nodes or integer kernels).",
                          "drop --qat to finetune the QDQ model as it is, or give the float model")
    wbits, abits = parse_qat(spec)
    mode, wbits = (wbits, 2) if wbits in ("ternary", "binary") else (None, wbits)
    options = {"target": target, "weight_bits": int(wbits), "activation_bits": int(abits), "per_channel": per_channel,
               "symmetric": symmetric, "low_bit": low_bit,
               # QAT trains every layer quantized: no layer is put back in float before training
               "fallback": "none"}
    options.update(extra_options or {})
    ctx = PassContext(data=calib_data, log=log)
    qmodel, report = manager.apply(model, ["qdq"], {"qdq": options}, verify=False, context=ctx)
    info = report.passes[-1].extra.get("info", {})
    floats = {name: numpy_helper.to_array(t) for name, t in const_tensors(model).items()}
    float_weights, weight_modes = {}, {}
    for layer in QuantInfo.of(info).layers:
        fw = floats.get(layer.float_weight)
        if fw is not None and fw.dtype.kind == "f":
            float_weights[layer.weight_q] = np.asarray(fw, np.float32)
        if mode:
            weight_modes[layer.weight_q] = mode
    return qmodel, {"weight_modes": weight_modes, "float_weights": float_weights}, info
