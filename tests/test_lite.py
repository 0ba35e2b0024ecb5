"""Tests of the ``lite`` pass: every encoding each rule matches, near-matches that must stay,
exact rules against onnxruntime (max abs error 0 where the math is exact), the report, user rules,
and the real YOLOX-nano model (opt-in, ../shared)."""
from __future__ import annotations

import collections
import math
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_equivalent, op_count, rand, run
from lite_models import GraphBuilder, focus, mobilenetv3_like, yolox_like
from onnxopt import model_io
from onnxopt.errors import OptionError, VerificationError
from onnxopt.passes import lite
from onnxopt.passes.lite import Match, Rule, options_with, run_lite


def apply_lite(model, **opts):
    res = run_lite(model, options_with(**opts))
    onnx.checker.check_model(res.model, full_check=True)
    return res


def ops(model):
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")


def producer_of(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def conv_act(act, opset=17, seed=0, **kw):
    """input -> Conv -> <act> -> output (the activation's output is the graph output's producer input)."""
    b = GraphBuilder(opset, seed)
    y = b.conv("input", 3, 8, 3)
    out = getattr(b, act)(y, **kw) if act != "raw" else y
    b.nodes.append(helper.make_node("Identity", [out], ["output"], name="out"))
    return b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])]), y, out


def relu_reference(opset=17, seed=0):
    b = GraphBuilder(opset, seed)
    y = b.conv("input", 3, 8, 3)
    b.nodes.append(helper.make_node("Relu", [y], ["output"], name="out"))
    return b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])


def assert_became_relu(model, res, conv_out, act_out, opset=17):
    """The activation is now exactly Relu(conv output), writing the same tensor name; numerics = relu(conv)."""
    new = res.model
    relus = [n for n in new.graph.node if n.op_type == "Relu"]
    assert len(relus) == 1 and list(relus[0].input) == [conv_out] and list(relus[0].output) == [act_out]
    assert ops(new) == collections.Counter({"Conv": 1, "Relu": 1, "Identity": 1})
    assert_equivalent(relu_reference(opset), new, atol=0, rtol=0)


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


def _unchanged(model, res):
    assert ops(res.model) == ops(model)
    assert_equivalent(model, res.model, atol=0, rtol=0)


def test_sigmoid_times_something_else_is_not_silu():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, 3)
    z = b.conv("input", 3, 8, 3)
    out = b.op("Mul", [b.op("Sigmoid", [y]), z])
    b.nodes.append(helper.make_node("Identity", [out], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert not res.changes
    _unchanged(model, res)
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
    _unchanged(model, res)
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
    _unchanged(model, res)
    if case in ("other_tensor", "alpha", "shared_add", "clip01", "gelu_no_half"):
        assert res.skipped, "a near-match must say why it was left alone"


# ------------------------------------------------------------------------------ SE


@pytest.mark.parametrize("fc,pool,gate", [("conv", "gap", "hardsigmoid"), ("conv", "reducemean", "sigmoid"),
                                          ("gemm", "gap", "hardsigmoid"), ("matmul", "reducemean", "decomposed")])
@pytest.mark.parametrize("opset", [13, 18])
def test_se_to_identity(fc, pool, gate, opset):
    b = GraphBuilder(opset)
    x = b.op("Relu", [b.conv("input", 3, 16, 3)])
    s = b.se(x, 16, gate=gate, fc=fc, pool=pool)
    b.nodes.append(helper.make_node("Conv", [s, b.init(rand(8, 16, 1, 1))], ["output"], kernel_shape=[1, 1]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model, rules="squeeze_and_excite_to_identity")
    assert res.changes == {"squeeze_and_excite_to_identity": 1}
    assert ops(res.model) == collections.Counter({"Conv": 2, "Relu": 1})
    head = producer_of(res.model, "output")
    assert head.input[0] == x  # the block output is its input
    assert res.extra["output_error"]["max_abs"] > 0 and "finetune" in res.extra["recommendation"]


def _se_model(gate_two_consumers=False, inner_shared=False, se_out_is_output=False):
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("input", 3, 16, 3)])
    p = b.op("GlobalAveragePool", [x])
    h = b.op("Relu", [b.conv(p, 16, 4, k=1)])
    g = b.op("HardSigmoid", [b.conv(h, 4, 16, k=1)], alpha=1 / 6, beta=0.5)
    y = b.op("Mul", [x, g])
    outs = [("output", [1, 16, 8, 8])]
    if gate_two_consumers:
        y = b.op("Add", [y, b.op("Mul", [b.op("Relu", [x]), g])])
    if inner_shared:
        outs.append(("pooled", [1, 4, 1, 1]))
        b.nodes.append(helper.make_node("Identity", [h], ["pooled"]))
    b.nodes.append(helper.make_node("Identity", [y], ["output"]))
    return b.model([("input", [1, 3, 8, 8])], outs)


@pytest.mark.parametrize("kind", ["gate_two_consumers", "inner_shared"])
def test_se_near_misses_stay(kind):
    model = _se_model(**{kind: True})
    res = apply_lite(model, rules="squeeze_and_excite_to_identity")
    assert not res.changes
    _unchanged(model, res)
    assert any("squeeze_and_excite_to_identity" in s for s in res.skipped)


def test_se_output_that_is_a_graph_output_keeps_its_name():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv("input", 3, 16, 3)])
    s = b.se(x, 16)
    b.nodes.append(helper.make_node("Identity", [s], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 16, 8, 8])])
    model.graph.output[0].name = s  # the SE Mul writes the graph output directly
    model.graph.node.pop()
    res = apply_lite(model, rules="squeeze_and_excite_to_identity")
    assert res.changes == {"squeeze_and_excite_to_identity": 1}
    assert [o.name for o in res.model.graph.output] == [s]
    assert producer_of(res.model, s).op_type == "Identity"


# ------------------------------------------------------------------------------ MobileNetV3


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_mobilenetv3_everything_replaced_nothing_else_touched(opset):
    model = mobilenetv3_like(opset=opset, gelu="native")
    res = apply_lite(model)
    assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
    assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})
    # every non-SE conv is kept as it was (same inputs, weights, attributes)
    se_convs = 2
    before = [n for n in model.graph.node if n.op_type == "Conv"]
    after = {tuple(n.output): n for n in res.model.graph.node if n.op_type == "Conv"}
    kept = [n for n in before if tuple(n.output) in after]
    assert len(kept) == len(before) - se_convs
    inits0 = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    inits1 = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    for n in kept:
        m = after[tuple(n.output)]
        assert list(m.input[1:]) == list(n.input[1:]) and m.attribute == n.attribute
        for t in n.input[1:]:
            np.testing.assert_array_equal(inits0[t], inits1[t])
    # every Relu reads a Conv output directly
    conv_outs = {n.output[0] for n in res.model.graph.node if n.op_type == "Conv"}
    assert all(n.input[0] in conv_outs for n in res.model.graph.node if n.op_type == "Relu")
    assert res.extra["output_error"]["inputs"] == "generated" and math.isfinite(res.extra["output_error"]["max_abs"])
    again = apply_lite(res.model)  # idempotent: a lite model has nothing left to rewrite
    assert not again.changes and ops(again.model) == ops(res.model)


def test_mobilenetv3_torch_export_if_torch_available():
    torch = pytest.importorskip("torch")
    from lite_models import torch_mobilenetv3_onnx

    for opset in (13, 17, 20):
        model = torch_mobilenetv3_onnx(opset=opset)
        # the onnx.helper twin the other tests use writes the same encodings
        assert ops(model) == ops(mobilenetv3_like(opset=opset, gelu="native")), torch.__version__
        res = apply_lite(model)
        assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
        assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})


def _weights_as_constant_nodes(model):
    """Move every initializer into a Constant node (as Paddle exports do)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_weights_in_constant_nodes_and_dynamic_batch():
    model = _weights_as_constant_nodes(mobilenetv3_like(opset=17))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    res = apply_lite(model)
    assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
    assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})
    model = _weights_as_constant_nodes(yolox_like())
    res = apply_lite(model, rules="focus_to_conv,maxpool_ge5_to_cascade")
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3}
    assert assert_equivalent(model, res.model, atol=0, rtol=0) == 0.0
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(8, 4, 4, 4))], ["output"], kernel_shape=[4, 4], pads=[1, 1, 2, 2]))
    model = _weights_as_constant_nodes(b.model([("input", [1, 4, 9, 9])], [("output", [1, 8, 9, 9])]))
    res = apply_lite(model, rules="conv_even_kernel_to_odd")
    assert res.changes == {"conv_even_kernel_to_odd": 1}
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ pools


@pytest.mark.parametrize("k,pads,stride", [(5, [2, 2, 2, 2], 1), (9, [4, 4, 4, 4], 1), (13, [6, 6, 6, 6], 1), (5, [0, 0, 0, 0], 1),
                                           (5, [1, 0, 3, 4], 2), (6, [2, 3, 3, 2], 1), (7, [3, 3, 3, 3], 2), (8, [0, 7, 7, 0], 3)])
def test_maxpool_cascade_is_exact(k, pads, stride):
    b = GraphBuilder()
    y = b.conv("input", 3, 4, 3)
    b.nodes.append(helper.make_node("MaxPool", [y], ["output"], kernel_shape=[k, k], pads=pads, strides=[stride, stride]))
    h = 13
    oh = (h + pads[0] + pads[2] - k) // stride + 1
    ow = (h + pads[1] + pads[3] - k) // stride + 1
    model = b.model([("input", [1, 3, h, h])], [("output", [1, 4, oh, ow])])
    res = apply_lite(model)
    assert res.changes == {"maxpool_ge5_to_cascade": 1}
    pools = [n for n in res.model.graph.node if n.op_type == "MaxPool"]
    assert all(list(helper.get_attribute_value(a)) in ([3, 3], [2, 2]) for n in pools for a in n.attribute if a.name == "kernel_shape")
    assert len(pools) == (k - 1) // 2 + (k % 2 == 0)
    assert assert_equivalent(model, res.model, atol=0, rtol=0) == 0.0
    assert res.extra["exact_verification"]["rules"]["maxpool_ge5_to_cascade"]["max_abs"] == 0.0
    assert "recommendation" not in res.extra


@pytest.mark.parametrize("attrs,reason", [({"ceil_mode": 1}, "ceil_mode"), ({"dilations": [2, 2]}, "dilated")])
def test_maxpool_cascade_near_misses(attrs, reason):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[5, 5], **attrs))
    d = attrs.get("dilations", [1, 1])[0]
    o = 13 - d * 4
    model = b.model([("input", [1, 3, 13, 13])], [("output", [1, 3, o, o])])
    res = apply_lite(model)
    assert not res.changes and any(reason in s for s in res.skipped)
    b = GraphBuilder()
    b.nodes.append(helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[3, 3]))
    model = b.model([("input", [1, 3, 13, 13])], [("output", [1, 3, 11, 11])])
    res = apply_lite(model)
    assert not res.changes and not res.skipped


def test_subgraph_reads_a_rewritten_tensor():
    b = GraphBuilder(17)
    y = b.silu(b.conv("input", 3, 8, 3))
    then_g = helper.make_graph([helper.make_node("Sigmoid", [y], ["ts"]), helper.make_node("Mul", [y, "ts"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", [y], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])])
    b.nodes.append(helper.make_node("If", ["cond"], ["output"], then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
                                             helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 8, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res = apply_lite(model)
    assert res.changes == {"silu_to_relu": 1}  # the main-graph SiLU; the If body is left as it is
    feed = {"input": rand(1, 3, 8, 8), "cond": np.array(False)}
    got = run(res.model, feed)["output"]
    ref = run(relu_reference(), {"input": feed["input"]})["output"]
    np.testing.assert_allclose(got, -ref, rtol=0, atol=0)


def test_ir3_model_keeps_initializers_as_graph_inputs():
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3, 3, 3])
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2])]
    graph = helper.make_graph(nodes, "ir3", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 9, 9]), w],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 4, 9, 9])],
                              [onnx.numpy_helper.from_array(rand(4, 3, 3, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    res = apply_lite(model)  # full checker: IR 3 needs every initializer listed as an input
    assert res.changes == {"maxpool_ge5_to_cascade": 1}
    assert "w" in [i.name for i in res.model.graph.input]


def test_avgpool_cascade_is_approximate_and_reported():
    b = GraphBuilder()
    b.nodes.append(helper.make_node("AveragePool", ["input"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=1))
    model = b.model([("input", [1, 3, 13, 13])], [("output", [1, 3, 13, 13])])
    res = apply_lite(model)
    assert res.changes == {"avgpool_ge5_to_cascade": 1}
    assert op_count(res.model, "AveragePool") == 2
    err = res.extra["output_error"]
    assert 0 < err["max_abs"] < 10 and "finetune" in res.extra["recommendation"]


# ------------------------------------------------------------------------------ Focus


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("order", [((0, 0), (1, 0), (0, 1), (1, 1)), ((0, 0), (0, 1), (1, 0), (1, 1)), ((1, 1), (0, 0), (1, 0), (0, 1))])
def test_focus_to_conv_is_exact(fused, order):
    b = GraphBuilder(13)
    f = focus(b, "input", fused, order)
    b.nodes.append(helper.make_node("Conv", [f, b.init(rand(8, 12, 3, 3))], ["output"], kernel_shape=[3, 3], pads=[1] * 4))
    model = b.model([("input", [1, 3, 16, 16])], [("output", [1, 8, 8, 8])])
    res = apply_lite(model)
    assert res.changes == {"focus_to_conv": 1}
    assert op_count(res.model, "Slice") == 0 and op_count(res.model, "Conv") == 2
    assert assert_equivalent(model, res.model, atol=1e-6, rtol=1e-6) < 1e-5
    assert res.extra["exact_verification"]["rules"]["focus_to_conv"]["max_abs"] == 0.0
    # space-to-depth: the next conv's weights absorb the channel order
    res = apply_lite(model, focus_mode="space_to_depth")
    assert res.changes == {"focus_to_conv": 1} and op_count(res.model, "SpaceToDepth") == 1
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


def test_focus_space_to_depth_needs_a_conv_when_the_order_differs():
    b = GraphBuilder(13)
    f = focus(b, "input")
    b.nodes.append(helper.make_node("Relu", [f], ["output"]))
    model = b.model([("input", [1, 3, 16, 16])], [("output", [1, 12, 8, 8])])
    res = apply_lite(model, focus_mode="space_to_depth")
    assert not res.changes and any("SpaceToDepth" in s for s in res.skipped)
    res = apply_lite(model)  # conv mode has no such constraint
    assert res.changes == {"focus_to_conv": 1}
    assert_equivalent(model, res.model, atol=0, rtol=0)


def _slice2(b, src, dr, dc, step=2):
    big = np.array([2**63 - 1], np.int64)
    r = b.op("Slice", [src, b.init(np.array([dr], np.int64)), b.init(big), b.init(np.array([2], np.int64)), b.init(np.array([step], np.int64))])
    return b.op("Slice", [r, b.init(np.array([dc], np.int64)), b.init(big), b.init(np.array([3], np.int64)), b.init(np.array([2], np.int64))])


@pytest.mark.parametrize("case", ["different_sources", "step1", "three_offsets"])
def test_focus_near_misses(case):
    b = GraphBuilder(13)
    y = b.op("Relu", ["input"])
    if case == "different_sources":
        parts = [_slice2(b, "input", 0, 0), _slice2(b, "input", 1, 0), _slice2(b, y, 0, 1), _slice2(b, y, 1, 1)]
        h = 8
    elif case == "step1":
        parts = [_slice2(b, "input", 0, 0, step=1), _slice2(b, "input", 0, 1, step=1), _slice2(b, "input", 0, 0, step=1),
                 _slice2(b, "input", 0, 1, step=1)]
        h = 16
    else:
        parts = [_slice2(b, "input", 0, 0), _slice2(b, "input", 1, 0), _slice2(b, "input", 0, 1), _slice2(b, "input", 0, 1)]
        h = 8
    b.nodes.append(helper.make_node("Concat", parts, ["output"], axis=1))
    model = b.model([("input", [1, 3, 16, 16])], [("output", [1, 12, h, 8])])
    res = apply_lite(model)
    assert not res.changes
    assert any("focus_to_conv" in s for s in res.skipped)
    _unchanged(model, res)


# ------------------------------------------------------------------------------ convs


@pytest.mark.parametrize("k,stride,pads,group", [(2, 2, [0, 0, 0, 0], 1), (4, 1, [1, 2, 2, 1], 1), (4, 2, [1, 1, 1, 1], 4), (2, 1, [0, 1, 0, 1], 1)])
def test_even_kernel_to_odd_is_exact(k, stride, pads, group):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(8, 4 // group, k, k)), b.init(rand(8))], ["output"],
                                    kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=group))
    o = [(12 + pads[a] + pads[a + 2] - k) // stride + 1 for a in (0, 1)]
    model = b.model([("input", [1, 4, 12, 12])], [("output", [1, 8] + o)])
    res = apply_lite(model, rules="conv_even_kernel_to_odd")
    assert res.changes == {"conv_even_kernel_to_odd": 1}
    (conv,) = [n for n in res.model.graph.node if n.op_type == "Conv"]
    ks = [a for a in conv.attribute if a.name == "kernel_shape"][0].ints
    assert list(ks) == [k + 1, k + 1]
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,stride,ok", [(32, 2, True), (33, 2, False), (20, 1, False)])
def test_conv_6x6_without_padding(size, stride, ok):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(4, 3, 6, 6))], ["output"], kernel_shape=[6, 6], strides=[stride, stride]))
    o = (size - 6) // stride + 1
    model = b.model([("input", [1, 3, size, size])], [("output", [1, 4, o, o])])
    res = apply_lite(model)
    if ok:
        assert res.changes == {"conv_6x6_to_5x5": 1}
        assert run(res.model, {"input": rand(1, 3, size, size)})["output"].shape == (1, 4, o, o)
    else:
        assert not res.changes and any("change the output size" in r for r in res.skipped)


def test_even_kernel_shared_weight_is_not_overwritten():
    b = GraphBuilder()
    w = b.init(rand(4, 4, 4, 4))
    a = b.op("Conv", ["input", w], kernel_shape=[4, 4], pads=[1, 1, 2, 2])
    c = b.op("Conv", ["input", w], kernel_shape=[4, 4], pads=[3, 3, 3, 3], dilations=[2, 2])
    b.nodes.append(helper.make_node("Add", [a, c], ["output"]))
    model = b.model([("input", [1, 4, 9, 9])], [("output", [1, 4, 9, 9])])
    res = apply_lite(model, rules="conv_even_kernel_to_odd")
    assert res.changes == {"conv_even_kernel_to_odd": 1} and any("dilated" in r for r in res.skipped)
    assert w in [i.name for i in res.model.graph.initializer]
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


def test_conv_6x6_to_5x5_keeps_the_output_shape():
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(8, 3, 6, 6)), b.init(rand(8))], ["output"],
                                    kernel_shape=[6, 6], strides=[2, 2], pads=[2, 2, 2, 2]))
    model = b.model([("input", [1, 3, 32, 32])], [("output", [1, 8, 16, 16])])
    res = apply_lite(model)
    assert res.changes == {"conv_6x6_to_5x5": 1}
    (conv,) = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert [a for a in conv.attribute if a.name == "kernel_shape"][0].ints == [5, 5]
    feed = {"input": rand(1, 3, 32, 32)}
    assert run(res.model, feed)["output"].shape == (1, 8, 16, 16)
    assert 0 < res.extra["output_error"]["max_abs"] and "finetune" in res.extra["recommendation"]
    # even-kernel promotion leaves 6x6 to this rule when both are on
    res = apply_lite(model, rules="conv_even_kernel_to_odd,conv_6x6_to_5x5")
    assert res.changes == {"conv_6x6_to_5x5": 1}


@pytest.mark.parametrize("k,stride,pads,group", [(9, 1, [4, 4, 4, 4], 1), (11, 2, [5, 3, 2, 5], 1), (9, 1, [0, 0, 0, 0], 4)])
def test_conv_gt7_split_is_exact(k, stride, pads, group):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(8, 4 // group, k, k, scale=0.1)), b.init(rand(8))], ["output"],
                                    kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=group))
    o = [(20 + pads[a] + pads[a + 2] - k) // stride + 1 for a in (0, 1)]
    model = b.model([("input", [1, 4, 20, 20])], [("output", [1, 8] + o)])
    assert not apply_lite(model).changes  # off by default
    res = apply_lite(model, rules="conv_gt7_split")
    assert res.changes == {"conv_gt7_split": 1}
    assert op_count(res.model, "Conv") == 2
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ Resize


@pytest.mark.parametrize("opset,mode,sizes,axes", [(11, "nearest", [1, 4, 16, 16], None), (13, "linear", [1, 4, 24, 20], None),
                                                   (18, "nearest", [16, 32], [2, 3]), (13, "nearest", [1, 4, 21, 8], None)])
def test_resize_sizes_to_scales_is_exact(opset, mode, sizes, axes):
    b = GraphBuilder(opset)
    roi = b.init(np.zeros(0, np.float32), "roi")
    scales = b.init(np.zeros(0, np.float32), "scales") if opset < 13 else ""
    kw = {"axes": axes} if axes else {}
    b.nodes.append(helper.make_node("Resize", ["input", roi, scales, b.init(np.array(sizes, np.int64), "sizes")], ["output"], mode=mode, **kw))
    out = [1, 4] + (sizes[-2:])
    model = b.model([("input", [1, 4, 8, 8])], [("output", out)])
    res = apply_lite(model)
    assert res.changes == {"resize_sizes_to_scales": 1}
    (rs,) = [n for n in res.model.graph.node if n.op_type == "Resize"]
    assert len(rs.input) == 3
    assert assert_equivalent(model, res.model, atol=0, rtol=0) == 0.0


def test_resize_with_dynamic_shape_is_skipped():
    b = GraphBuilder(13)
    b.nodes.append(helper.make_node("Resize", ["input", "", "", b.init(np.array([1, 4, 16, 16], np.int64))], ["output"], mode="nearest"))
    inp = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 4, "h", "w"])
    graph = helper.make_graph(b.nodes, "t", [inp], [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 4, 16, 16])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    res = apply_lite(model)
    assert not res.changes and any("not static" in s for s in res.skipped)


# ------------------------------------------------------------------------------ YOLOX-like


@pytest.mark.parametrize("fused", [False, True])
def test_yolox_like(fused):
    model = yolox_like(fused_slices=fused)
    res = apply_lite(model)
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3, "silu_to_relu": 3}
    assert op_count(res.model, "Sigmoid") == 2  # the head's objectness/class sigmoids stay
    assert sum("feeds Concat" in s for s in res.skipped) == 2
    ver = res.extra["exact_verification"]["rules"]
    assert ver["focus_to_conv"]["max_abs"] == 0.0 and ver["maxpool_ge5_to_cascade"]["max_abs"] == 0.0
    only_exact = apply_lite(model, rules="focus_to_conv,maxpool_ge5_to_cascade")
    assert assert_equivalent(model, only_exact.model, atol=0, rtol=0) == 0.0


def test_uses_user_data_for_the_report():
    from onnxopt.registry import PassContext

    model = yolox_like()
    batches = [{"input": rand(1, 3, 32, 32, seed=s) * 50} for s in range(3)]
    res = run_lite(model, options_with(), PassContext(data=lambda: iter(batches)))
    assert res.extra["output_error"]["inputs"] == "data" and res.extra["output_error"]["batches"] == 2


# ------------------------------------------------------------------------------ options and user rules


def test_unknown_rule_names_are_option_errors():
    model = yolox_like()
    with pytest.raises(OptionError, match="unknown lite rule 'silu'"):
        apply_lite(model, rules="silu")
    with pytest.raises(OptionError, match="valid rules"):
        apply_lite(model, disable="nope")
    res = apply_lite(model, disable="silu_to_relu")
    assert "silu_to_relu" not in res.changes and op_count(res.model, "Sigmoid") == 5


SOFTPLUS_RULES = textwrap.dedent('''
    from onnxopt.passes.lite import Match, register_rule

    def match(graph, node, ctx):
        """Softplus(x)"""
        if node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Relu":
            return "already after a Relu"
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Relu", [m.data["x"]])

    register_rule("softplus_to_relu", match=match, rewrite=rewrite, exact=False, anchors=("Softplus",))
''')


def _softplus_model():
    b = GraphBuilder()
    y = b.op("Softplus", [b.conv("input", 3, 8, 3)])
    z = b.op("Softplus", [b.op("Relu", [y])])
    b.nodes.append(helper.make_node("Identity", [z], ["output"]))
    return b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])


def test_rules_module_registers_a_user_rule(tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text(SOFTPLUS_RULES)
    model = _softplus_model()
    res = apply_lite(model, rules_module=str(path))
    assert res.changes == {"softplus_to_relu": 1} and op_count(res.model, "Softplus") == 1
    assert any("already after a Relu" in s for s in res.skipped)
    assert not res.extra["rules"]["softplus_to_relu"]["exact"]
    # registration inside a rules module does not leak into later runs
    assert "softplus_to_relu" not in [r.name for r in lite.rule_table()]
    res = apply_lite(model, rules_module=str(path), disable="softplus_to_relu")
    assert not res.changes


def test_rules_module_custom_table_and_errors(tmp_path):
    path = tmp_path / "table.py"
    path.write_text(SOFTPLUS_RULES.replace('register_rule("softplus_to_relu"', 'RULE = register_rule("softplus_to_relu"')
                    + "\nRULES = []\n")
    # RULES replaces the table; the registered rule still joins it
    model = _softplus_model()
    res = apply_lite(model, rules_module=str(path))
    assert list(res.extra["rules"]) == ["softplus_to_relu"]
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(OptionError, match="failed to import: RuntimeError: boom"):
        apply_lite(model, rules_module=str(bad))
    with pytest.raises(OptionError, match="does not exist"):
        apply_lite(model, rules_module=str(tmp_path / "missing.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(OptionError, match="registers no rule"):
        apply_lite(model, rules_module=str(empty))


def test_python_api_custom_table_and_exact_verification_catches_a_wrong_exact_rule():
    def match(graph, node, ctx):
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Sigmoid", [m.data["x"]])

    wrong = Rule("relu_to_sigmoid", "claims to be exact but is not", True, True, ("Relu",), match, rewrite)
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Relu", ["input"], ["output"]))
    model = b.model([("input", [1, 3, 4, 4])], [("output", [1, 3, 4, 4])])
    with pytest.raises(VerificationError, match="relu_to_sigmoid"):
        run_lite(model, options_with(), table=[wrong])
    res = run_lite(model, options_with(verify=False), table=[wrong])
    assert res.changes == {"relu_to_sigmoid": 1} and "exact_verification" not in res.extra


def test_exact_rule_on_a_dynamic_region_is_verified_on_the_whole_model():
    from onnxopt.registry import PassContext

    b = GraphBuilder()
    b.nodes.append(helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    graph = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res = run_lite(model, options_with(), PassContext(input_shapes={"input": [2, 3, 11, 7]}))
    ver = res.extra["exact_verification"]["rules"]["maxpool_ge5_to_cascade"]
    assert ver["max_abs"] == 0.0 and "whole model" in ver["inputs"]
    assert "no static shape" in res.extra["rules"]["maxpool_ge5_to_cascade"]["region_check"]
    # without shapes for the dynamic input, inputs are generated from the model (batch 1, sizes
    # that run): the rule is verified on them, with no flags
    ver = run_lite(model, options_with()).extra["exact_verification"]["rules"]["maxpool_ge5_to_cascade"]
    assert ver["max_abs"] == 0.0 and ver["inputs"] == "generated (whole model)"
    assert run_lite(model, options_with(verify=False)).changes == {"maxpool_ge5_to_cascade": 1}


def test_matching_visits_each_anchor_once_per_rule():
    calls = collections.Counter()
    table = []
    for rule in lite.default_rules():
        def counted(graph, node, ctx, _m=rule.match, _n=rule.name):
            calls[(_n, id(node))] += 1
            return _m(graph, node, ctx)
        table.append(Rule(rule.name, rule.summary, rule.exact, rule.default, rule.anchors, counted, rule.rewrite))
    model = mobilenetv3_like()
    run_lite(model, options_with(verify=False), table=table)
    assert calls and max(calls.values()) == 1


def test_register_rule_api_adds_to_the_table():
    def match(graph, node, ctx):
        return None

    try:
        lite.register_rule("noop_rule", match=match, rewrite=lambda g, m, c: None, exact=True, before="silu_to_relu")
        names = [r.name for r in lite.rule_table()]
        assert names.index("noop_rule") == names.index("silu_to_relu") - 1
    finally:
        lite._USER_RULES[:] = [r for r in lite._USER_RULES if r[0].name != "noop_rule"]


def test_cli_rules_module(tmp_path):
    from click.testing import CliRunner

    from onnxopt.cli import cli

    path = tmp_path / "my_rules.py"
    path.write_text(SOFTPLUS_RULES)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_softplus_model(), src)
    result = CliRunner().invoke(cli, ["apply", "lite", str(src), "-o", str(out), "--rules-module", str(path), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert op_count(onnx.load(out), "Softplus") == 1


# ------------------------------------------------------------------------------ real model


@pytest.mark.shared
def test_yolox_nano(shared):
    from onnxopt.model_io import load_model

    model = load_model(shared("models", "yolox_nano.onnx"))
    sig_mul = sum(1 for n in model.graph.node if n.op_type == "Sigmoid")
    res = apply_lite(model)
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3, "silu_to_relu": 104}
    assert sig_mul == 110 and op_count(res.model, "Sigmoid") == 6  # the head's objectness/class sigmoids
    assert op_count(res.model, "Slice") == 0 and op_count(res.model, "MaxPool") == 12
    ver = res.extra["exact_verification"]["rules"]
    assert ver["maxpool_ge5_to_cascade"]["max_abs"] == 0.0 and ver["focus_to_conv"]["max_abs"] == 0.0
    only_pool = apply_lite(model, rules="maxpool_ge5_to_cascade")
    feed = {"images": rand(1, 3, 416, 416, scale=50.0)}
    np.testing.assert_array_equal(run(model, feed)["output"], run(only_pool.model, feed)["output"])
    assert run(res.model, feed)["output"].shape == (1, 3549, 85)


def test_cli_exits_cleanly_when_no_rule_fires(tmp_path):
    """The input model's reference outputs are computed in a thread while the rules run. When no
    rule fired, nothing joined it: the process exited during onnxruntime's session setup and
    aborted with exit code 134 after writing the model."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "m.onnx"
    onnx.save(mobilenetv3_like(), src)
    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "onnxopt", "apply", "lite", str(src), "-o", str(tmp_path / "out.onnx"),
                               "--set", "lite.rules=focus_to_conv"], cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr
