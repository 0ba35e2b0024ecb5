"""The focus rules of the ``lite`` pass: the Focus stem to a one-hot Conv or SpaceToDepth, exact against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import assert_equivalent, op_count, rand
from lite_models import GraphBuilder, focus
from rewrite_checks import apply_lite, unchanged

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
    unchanged(model, res)
