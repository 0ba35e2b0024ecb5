"""The resize rules of the ``lite`` pass: Resize(sizes) to Resize(scales), exact, and skipped on dynamic shapes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_equivalent
from lite_models import GraphBuilder
from rewrite_checks import apply_lite

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
