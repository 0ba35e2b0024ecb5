"""Small-graph builders and the numeric oracle every pass test uses.

``assert_equivalent`` is the oracle for exact passes: onnxruntime with all graph optimizations
disabled, tight fp32 tolerances, plus ``onnx.checker`` full check of the candidate.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runtime


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: Optional[int] = None) -> onnx.ModelProto:
    """A model from node protos; ``inputs``/``outputs`` are (name, shape[, elem_type]) tuples or ValueInfos;
    ``initializers`` are (name, ndarray) tuples or TensorProtos."""
    def vi(spec):
        if isinstance(spec, onnx.ValueInfoProto):
            return spec
        name, shape, *rest = spec
        return helper.make_tensor_value_info(name, rest[0] if rest else TensorProto.FLOAT, shape)

    inits = [t if isinstance(t, onnx.TensorProto) else numpy_helper.from_array(np.asarray(t[1]), t[0]) for t in initializers]
    graph = helper.make_graph(list(nodes), "test", [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(model.ir_version, 9)
    onnx.checker.check_model(model, full_check=True)
    return model


def rand(*shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def run(model: onnx.ModelProto, feed: dict) -> dict:
    return runtime.run(runtime.session(model), feed)


def assert_equivalent(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Optional[Sequence[dict]] = None,
                      rtol: float = 1e-5, atol: float = 1e-5, input_shapes: Optional[dict] = None) -> float:
    """Full checker on ``after``, then same outputs on the same inputs; returns the max abs error."""
    onnx.checker.check_model(after, full_check=True)
    feeds = feeds or [runtime.generate_inputs(before, seed=s, overrides=input_shapes) for s in (0, 1, 2)]
    worst = 0.0
    for feed in feeds:
        ref, got = run(before, feed), run(after, feed)
        assert set(ref) == set(got), f"outputs differ: {sorted(ref)} vs {sorted(got)}"
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=f"output {name}")
            worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - ref[name]))) if ref[name].size else 0.0)
    return worst


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def if_branch_model() -> onnx.ModelProto:
    """conv -> If (both branches read the conv output from the outer scope) -> conv2: a model
    whose If bodies read a main-graph tensor that no main-graph node lists as an input."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["c"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Conv", ["i", "w2"], ["y"], name="conv2")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.float32(0), "zero")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
