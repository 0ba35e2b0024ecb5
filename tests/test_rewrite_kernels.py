"""The kernels rules of the ``lite`` pass: convolution kernels: even to odd, 6x6 to 5x5, > 7 split, exact where the math is."""
from __future__ import annotations

import pytest
from onnx import helper

from helpers import assert_equivalent, op_count, rand, run
from lite_models import GraphBuilder
from rewrite_checks import apply_lite

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
