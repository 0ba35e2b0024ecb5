"""The activations rules of the ``lite`` pass: every activation encoding that becomes ReLU, opset variants, and the near-matches that must stay."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from helpers import op_count
from lite_models import GraphBuilder
from onnxopt import model_io
from rewrite_checks import apply_lite, assert_became_relu, conv_act, unchanged

# ------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("encoding", [
    ("hardswish_native", {}), ("hardswish_hsig", {"order": "xg"}), ("hardswish_hsig", {"order": "gx"}),
    ("hardswish_decomposed", {"order": "mul_then_div"}), ("hardswish_decomposed", {"order": "div_then_mul"}),
    ("hardswish_decomposed", {"order": "mul_sixth", "add_order": "3x"}),
    ("hardswish_decomposed", {"clip": "minmax"}),
    ("silu", {"order": "xs"}), ("silu", {"order": "sx"}),
    ("gelu", {"how": "erf"}), ("gelu", {"how": "erf_half_first"}), ("gelu", {"how": "tanh"}),
    ("relu6", {"how": "inputs"}), ("relu6", {"how": "minmax"}),
], ids=lambda e: e[0] + "-" + "-".join(map(str, e[1].values())))
def test_activation_encodings_become_relu(encoding):
    act, kw = encoding
    model, y, out = conv_act(act, **kw)
    res = apply_lite(model)
    assert sum(res.changes.values()) == 1
    assert_became_relu(model, res, y, out)
    (detail,) = res.details
    assert detail["tensor"] == out and detail["now"] == "Relu"
    # the dropped clip is recorded for qdq (a HardSwish has no upper bound to record)
    assert model_io.activation_bounds(res.model) == ({out: (0.0, 6.0)} if act == "relu6" else {})
    assert res.extra["clip_bounds_recorded"] == (act == "relu6")


@pytest.mark.parametrize("opset,act,kw,rule", [
    (10, "relu6", {"how": "attrs"}, "relu6_to_relu"),
    (10, "hardswish_decomposed", {"clip": "attrs"}, "hardswish_to_relu"),
    (20, "gelu", {"how": "native"}, "gelu_to_relu"),
    (13, "hardswish_hsig", {}, "hardswish_to_relu"),
])
def test_activation_opset_variants(opset, act, kw, rule):
    model, y, out = conv_act(act, opset=opset, **kw)
    res = apply_lite(model)
    assert res.changes == {rule: 1}
    assert_became_relu(model, res, y, out, opset)


def test_leakyrelu_on_prelu_off_by_default():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    a = b.op("LeakyRelu", [y], alpha=0.1)
    p = b.op("PRelu", [a, b.init(np.full((8, 1, 1), 0.2, np.float32))])
    b.nodes.append(helper.make_node("Identity", [p], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert res.changes == {"leakyrelu_to_relu": 1} and op_count(res.model, "PRelu") == 1
    res = apply_lite(model, rules="prelu_to_relu,leakyrelu_to_relu")
    assert res.changes == {"leakyrelu_to_relu": 1, "prelu_to_relu": 1} and op_count(res.model, "Relu") == 2


def test_standalone_hardsigmoid_is_on_and_range_changing():
    model, y, out = conv_act("raw")
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    g = b.op("HardSigmoid", [y], alpha=0.2, beta=0.5)
    b.nodes.append(helper.make_node("Identity", [g], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert res.changes == {"hardsigmoid_to_relu": 1}
    assert not res.extra["rules"]["hardsigmoid_to_relu"]["exact"]
    assert "range" in res.extra["rules"]["hardsigmoid_to_relu"]["summary"]
    assert_became_relu(model, res, y, g)


# ------------------------------------------------------------------------------ near-misses


def test_sigmoid_times_something_else_is_not_silu():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    z = b.conv("input", 3, 8, 3)
    out = b.op("Mul", [b.op("Sigmoid", [y]), z])
    b.nodes.append(helper.make_node("Identity", [out], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert not res.changes
    unchanged(model, res)
    assert any("silu_to_relu" in s and "not by its input" in s for s in res.skipped)


def test_silu_whose_sigmoid_has_two_readers_or_is_an_output_stays():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    s = b.op("Sigmoid", [y])
    m = b.op("Mul", [y, s])
    b.nodes.append(helper.make_node("Add", [m, s], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert not res.changes and any("2 readers" in r for r in res.skipped)
    unchanged(model, res)
    # the sigmoid itself is a graph output
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    b.nodes.append(helper.make_node("Sigmoid", [y], ["sig"]))
    b.nodes.append(helper.make_node("Mul", [y, "sig"], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8]), ("sig", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert not res.changes and any("graph output" in r for r in res.skipped)


@pytest.mark.parametrize("case", ["other_tensor", "alpha", "shared_add", "clip01", "gelu_div2", "gelu_no_half"])
def test_activation_near_misses_stay(case):
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    z = b.conv("input", 3, 8, 3)
    extra_out = None
    rules = None
    if case == "other_tensor":  # y * hardsigmoid(z)
        out = b.op("Mul", [y, b.op("HardSigmoid", [z], alpha=1 / 6, beta=0.5)])
        rules = "hardswish_to_relu"
    elif case == "alpha":  # x * HardSigmoid(x) with torch.nn.Hardsigmoid's ONNX default alpha 0.2: not HardSwish
        out = b.op("Mul", [y, b.op("HardSigmoid", [y], alpha=0.2, beta=0.5)])
        rules = "hardswish_to_relu"
    elif case == "shared_add":  # x + 3 is also read elsewhere
        a = b.op("Add", [y, b.const(3.0)])
        out = b.op("Div", [b.op("Mul", [y, b.relu6(a)]), b.const(6.0)])
        out = b.op("Add", [out, a])
        rules = "hardswish_to_relu"
    elif case == "clip01":
        out = b.clip(y, 0.0, 1.0)
    elif case == "gelu_div2":  # x/2 instead of x/sqrt(2)
        e = b.op("Erf", [b.op("Div", [y, b.const(2.0)])])
        out = b.op("Mul", [b.op("Mul", [y, b.op("Add", [e, b.const(1.0)])]), b.const(0.5)])
    else:  # 1 + erf(x/sqrt2) times x but no 0.5
        e = b.op("Erf", [b.op("Div", [y, b.const(math.sqrt(2))])])
        out = b.op("Mul", [y, b.op("Add", [e, b.const(1.0)])])
    b.nodes.append(helper.make_node("Identity", [out], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model, rules=rules) if rules else apply_lite(model)
    assert not res.changes, res.changes
    unchanged(model, res)
    if case in ("other_tensor", "alpha", "shared_add", "clip01", "gelu_no_half"):
        assert res.skipped, "a near-match must say why it was left alone"
