"""The squeeze_excite rules of the ``lite`` pass: squeeze-and-excite blocks to identity, and the near-matches that must stay."""
from __future__ import annotations

import collections

import pytest
from onnx import helper

from helpers import rand
from lite_models import GraphBuilder
from rewrite_checks import apply_lite, ops, producer_of, unchanged

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
    unchanged(model, res)
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
