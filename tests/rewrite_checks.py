"""Checks the rewrite-rule tests share: run lite with the full checker, count ops, and the
conv -> activation model whose activation must become exactly ReLU."""
from __future__ import annotations

import collections

import onnx
from onnx import helper

from helpers import assert_equivalent
from lite_models import GraphBuilder
from onnxopt.passes.lite import options_with, run_lite


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


def unchanged(model, res):
    """The pass left ``model`` as it was: same ops, bit-identical outputs."""
    assert ops(res.model) == ops(model)
    assert_equivalent(model, res.model, atol=0, rtol=0)
