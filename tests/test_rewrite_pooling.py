"""The pooling rules of the ``lite`` pass: large pools to 3x3 cascades: exact for MaxPool against onnxruntime, reported as approximate for AveragePool."""
from __future__ import annotations

import pytest
from onnx import helper

from helpers import assert_equivalent, op_count
from lite_models import GraphBuilder
from rewrite_checks import apply_lite

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


def test_avgpool_cascade_is_approximate_and_reported():
    b = GraphBuilder()
    b.nodes.append(helper.make_node("AveragePool", ["input"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=1))
    model = b.model([("input", [1, 3, 13, 13])], [("output", [1, 3, 13, 13])])
    res = apply_lite(model)
    assert res.changes == {"avgpool_ge5_to_cascade": 1}
    assert op_count(res.model, "AveragePool") == 2
    err = res.extra["output_error"]
    assert 0 < err["max_abs"] < 10 and "finetune" in res.extra["recommendation"]
