"""A look at the float model's outputs on the user's data before the long steps run.

Data read the wrong way (raw 0..255 pixels, BGR, the wrong layout) rarely fails: the model answers
nonsense that calibration and finetuning spend minutes fitting. The signs show on a few samples: one
class for all, an output independent of the input, non-finite values, and the first bounded activation
at its upper bound (EfficientNet-Lite0's first ReLU6: 4 % of values at 6 as preprocessed, 36 % on raw pixels).
"""
from __future__ import annotations

import numpy as np
from onnx import ModelProto, numpy_helper

from . import runtime, task_metric
from .data import DataSource, take_samples
from .errors import OnnxoptError
from .ir.proto import const_tensors

SAMPLES = 16      # samples looked at
MIN_SAMPLES = 8   # fewer than this: one class for every sample may be the data's own
SATURATED = 0.25  # share of the first bounded activation's values at its upper bound that warns


def _first_bound(model: ModelProto):
    """(output tensor, upper bound) of the first Clip in graph order with a constant finite max, or None."""
    consts = const_tensors(model)
    for node in model.graph.node:
        if node.op_type != "Clip":
            continue
        hi = next((a.f for a in node.attribute if a.name == "max"), None)  # opset < 11
        if len(node.input) > 2 and node.input[2] in consts:
            hi = float(numpy_helper.to_array(consts[node.input[2]]).reshape(-1)[0])
        if hi is not None and np.isfinite(hi):
            return node.output[0], hi
        return None
    return None


def check_outputs(model: ModelProto, data: DataSource, samples: int = SAMPLES) -> list:
    """Warnings about the float model's outputs on the first ``samples`` samples of ``data`` ([] if
    nothing looks wrong, or the model cannot run in onnxruntime: the passes say so themselves)."""
    feeds = take_samples(data, samples)
    bound = _first_bound(model)
    graph_outputs = [o.name for o in model.graph.output]
    # an embedding's argmax is no class, nor is a Sigmoid's largest label (each label decides alone, and
    # one label that is always the likeliest is no sign of bad data): nothing to say of them
    no_classes = {name for name, (_, act) in task_metric.logit_tensors(model).items() if act in (task_metric.FEATURES, "Sigmoid")}
    try:
        probe = runtime.with_outputs(model, [bound[0]]) if bound else model
        sess = runtime.session(probe)
        outs = [runtime.run(sess, f) for f in feeds]
    except OnnxoptError:
        return []
    read_as = data.preprocessing.describe(getattr(data, "grey", False)) if data.preprocessing is not None else None
    hint = (f"the data was read with preprocessing {read_as}; check it against the model's training preprocessing "
            "(--preprocess, --mean/--std/--scale, --bgr)" if read_as else
            "check that the data is preprocessed as the model expects (scale, mean/std, channel order, layout)")
    warnings = []
    if bound and outs and bound[0] in outs[0]:
        values = np.concatenate([np.asarray(o[bound[0]], np.float64).reshape(-1) for o in outs])
        share = float(np.mean(values >= bound[1] - 1e-6 * max(abs(bound[1]), 1.0)))
        if share > SATURATED:
            warnings.append(f"{100 * share:.0f} % of the values of the model's first bounded activation ('{bound[0]}', "
                            f"clipped at {bound[1]:g}) sit at its upper bound on the data: the input is probably scaled far "
                            f"beyond what the first layer was trained on; {hint}")
    for name in graph_outputs if outs else ():
        arrays = [np.asarray(o[name]) for o in outs]
        if arrays[0].dtype.kind != "f" or not all(a.ndim and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
            continue
        y = np.concatenate(arrays).astype(np.float64)
        count = len(y)
        if not np.isfinite(y).all():
            warnings.append(f"the float model's output '{name}' holds NaN/Inf on {int((~np.isfinite(y)).any(axis=tuple(range(1, y.ndim))).sum())} "
                            f"of {count} samples of the data: {hint}")
            continue
        if count < 2:
            continue
        flat = y.reshape(count, -1)
        spread = float(flat.std(axis=0).max())
        scale = float(np.abs(flat).max())
        if spread <= 1e-6 * max(scale, 1e-12):
            warnings.append(f"the float model's output '{name}' is the same for all {count} samples of the data "
                            f"(it does not depend on the input as read): {hint}")
            continue
        y = task_metric.as_scores(y)   # [N, C, 1, 1] class scores as [N, C]
        if y.ndim == 2 and y.shape[1] > 1 and count >= MIN_SAMPLES and name not in no_classes:
            classes = np.unique(y.argmax(1))
            if len(classes) == 1:
                warnings.append(f"the float model gives every one of the first {count} samples the same class "
                                f"({int(classes[0])}) on output '{name}': {hint}")
    return warnings
