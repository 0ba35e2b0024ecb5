"""The ReduceMean rules of the ``lite`` pass (off by default; qdq --target tidl runs them):
ReduceMean -> GlobalAveragePool / MatMul, exact against onnxruntime at every opset encoding of
the axes, both keepdims, and left alone (with the reason) where they do not apply."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_equivalent
from lite_models import GraphBuilder
from rewrite_checks import apply_lite, ops

RULES = "reducemean_to_pool,reducemean_to_matmul"


def reducemean(shape, axes, keepdims, opset, dims=None):
    """input -> ReduceMean(axes, keepdims) -> output, axes as an attribute (< 18) or an input."""
    b = GraphBuilder(opset)
    kw = {"keepdims": keepdims}
    ins = ["input"]
    if opset >= 18:
        ins.append(b.init(np.array(axes, np.int64), "axes"))
    else:
        kw["axes"] = axes
    b.nodes.append(helper.make_node("ReduceMean", ins, ["output"], name="mean", **kw))
    inp = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, dims or shape)
    out = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(b.nodes, "t", [inp], [out], b.inits), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])  # the output's shape, as inferred
    return model


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("shape,axes,rule,new_ops", [
    ([1, 8, 6, 5], [2, 3], "reducemean_to_pool", {"GlobalAveragePool"}),
    ([2, 8, 6, 5], [-1, -2], "reducemean_to_pool", {"GlobalAveragePool"}),
    ([1, 7, 9], [2], "reducemean_to_pool", {"GlobalAveragePool"}),
    ([2, 5, 12], [1], "reducemean_to_matmul", {"Transpose", "MatMul"}),
    ([1, 8, 6, 5], [-1], "reducemean_to_matmul", {"MatMul"}),
    ([1, 8, 6, 5], [2], "reducemean_to_matmul", {"Transpose", "MatMul"}),
    ([6, 10], [0], "reducemean_to_matmul", {"Transpose", "MatMul"}),
])
def test_reducemean_rules_are_exact(shape, axes, rule, new_ops, keepdims, opset):
    model = reducemean(shape, axes, keepdims, opset)
    res = apply_lite(model, rules=RULES)
    assert res.changes == {rule: 1}
    got = set(ops(res.model)) - {"Flatten", "Squeeze"}
    assert got == new_ops and "ReduceMean" not in ops(res.model)
    assert assert_equivalent(model, res.model, rtol=1e-5, atol=1e-6) < 1e-5


@pytest.mark.parametrize("shape,axes,dims,reason", [
    ([1, 8, 6, 5], [1], None, "only one of the last two axes"),
    ([1, 8, 6, 5], [1, 2, 3], None, "only one of the last two axes"),
    ([1, 8, 6], [2], [1, 8, "w"], None),          # rank 3 over axis 2: the pool rule needs no static size
    ([1, 8, 6], [1], [1, "c", 6], "no static size"),
])
def test_reducemean_rules_leave_what_they_cannot_rewrite(shape, axes, dims, reason):
    model = reducemean(shape, axes, 1, 13, dims)
    res = apply_lite(model, rules=RULES)
    if reason is None:
        assert res.changes == {"reducemean_to_pool": 1}
        return
    assert not res.changes and any(reason in s for s in res.skipped), res.skipped
    assert ops(res.model) == ops(model)


def test_reducemean_rules_are_off_in_the_default_table():
    model = reducemean([1, 8, 6, 5], [2, 3], 1, 13)
    assert not apply_lite(model).changes
