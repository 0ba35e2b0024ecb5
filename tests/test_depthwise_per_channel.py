"""qdq.depthwise_per_channel: per-channel (axis 1) activation Q/DQ on depthwise conv inputs (ort only)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, rand, run
from onnxopt import manager
from onnxopt.errors import OptionError
from onnxopt.quant.check import check_model
from onnxopt.registry import PassContext

SPREAD = np.array([1.0, 10.0, 100.0, 1000.0], np.float32)   # the depthwise input's channel ranges, 3 decades apart


def _expand_depthwise(extra_output: bool = False):
    """x -> 1x1 Conv (4 channels, scaled by SPREAD) -> Relu -> depthwise 3x3 Conv (undoing the scale) -> y."""
    w1 = rand(4, 3, 1, 1, seed=1) * SPREAD[:, None, None, None]
    w2 = rand(4, 1, 3, 3, seed=2) / SPREAD[:, None, None, None]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=4)]
    outputs = [("y", ["N", 4, 8, 8])] + ([("r", ["N", 4, 8, 8])] if extra_output else [])
    return make_model(nodes, [("x", ["N", 3, 8, 8])], outputs,
                      [("w1", w1), ("b1", rand(4, seed=3) * SPREAD), ("w2", w2), ("b2", rand(4, seed=4))])


FEEDS = [{"x": rand(2, 3, 8, 8, seed=10 + s)} for s in range(4)]


def _quantize(model, **opts):
    ctx = PassContext(data=lambda: iter(FEEDS), progress=False)
    q, report = manager.apply(model, "qdq", {"qdq": {"calib_method": "minmax", "fallback": "none", **opts}}, context=ctx,
                              summarize_layers=False)
    return q, report.passes[0]


def _rel_error(model, q) -> float:
    num = den = 0.0
    for f in FEEDS:
        ref, got = run(model, f)["y"], run(q, f)["y"]
        num, den = num + float(np.sum((got - ref) ** 2)), den + float(np.sum(ref ** 2))
    return (num / den) ** 0.5


def test_depthwise_input_gets_per_channel_minmax_ranges_on_ort():
    m = _expand_depthwise()
    q, rec = _quantize(m, target="ort", depthwise_per_channel=True)
    assert rec.extra["info"]["per_channel_activations"] == ["r"]
    inits = {t.name: t for t in q.graph.initializer}
    qn = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    assert [a.i for a in qn.attribute if a.name == "axis"] == [1]
    from onnx import numpy_helper
    scale = numpy_helper.to_array(inits[qn.input[1]])
    # oracle: each channel's max over the calibration data (Relu output: min 0) over uint8's 255 steps
    r = np.concatenate([run(_expand_depthwise(extra_output=True), f)["r"] for f in FEEDS])
    np.testing.assert_allclose(scale, r.max(axis=(0, 2, 3)) / 255.0, rtol=1e-6)
    assert check_model(q, "ort") == []
    # the same encoding is refused by the per-tensor-activation targets' checks
    assert any(v.rule == "trt-per-axis-activation" for v in check_model(q, "tensorrt"))
    assert any(v.rule == "tidl-per-axis-activation" for v in check_model(q, "tidl"))
    # one scale per channel keeps the small channels that one per-tensor scale rounds to zero
    per_tensor, _ = _quantize(m, target="ort")
    assert _rel_error(m, q) < 0.1 * _rel_error(m, per_tensor)


@pytest.mark.parametrize("target", ["tensorrt", "tidl"])
def test_per_channel_activations_refused_where_the_target_takes_per_tensor_only(target):
    with pytest.raises(OptionError, match="per-tensor activations only"):
        _quantize(_expand_depthwise(), target=target, depthwise_per_channel=True)


def test_off_by_default():
    q, rec = _quantize(_expand_depthwise(), target="ort")
    assert rec.extra["info"]["per_channel_activations"] == []
    assert not any(a.name == "axis" for n in q.graph.node if n.op_type == "QuantizeLinear" for a in n.attribute)
