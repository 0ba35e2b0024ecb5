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


def nms_detector(end2end: bool = True) -> onnx.ModelProto:
    """x [1,3,32,32] -> two convs -> boxes [1,64,4] and Sigmoid scores [1,3,64] -> NonMaxSuppression.
    ``end2end``: the outputs are the selected indices and their scores (both data-dependent in
    length, as in detectors exported with their NMS); else the selection plus boxes and scores."""
    rng = np.random.default_rng(0)
    anchors, classes = 64, 3
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flat"),
             helper.make_node("Split", ["flat", "split"], ["box_t", "cls"], name="split", axis=1),
             helper.make_node("Transpose", ["box_t"], ["boxes"], name="box_t", perm=[0, 2, 1]),
             helper.make_node("Sigmoid", ["cls"], ["scores"], name="sigmoid"),
             helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_k", "iou", "threshold"], ["sel"], name="nms")]
    outputs = [helper.make_tensor_value_info("sel", TensorProto.INT64, ["K", 3])]
    if end2end:
        nodes += [helper.make_node("Gather", ["sel", "two"], ["box_idx"], name="pick", axis=1),
                  helper.make_node("Squeeze", ["scores", "zero"], ["per_class"], name="squeeze"),
                  helper.make_node("ReduceMax", ["per_class"], ["best"], name="best", axes=[0], keepdims=0),
                  helper.make_node("Gather", ["best", "box_idx"], ["det_scores"], name="det_scores", axis=0)]
        outputs.append(helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, ["K"]))
    else:
        outputs += [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes, anchors]),
                    helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, anchors, 4])]
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((4 + classes, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(4 + classes, np.float32), "b2"),
             numpy_helper.from_array(np.array([1, 4 + classes, anchors], np.int64), "shape"),
             numpy_helper.from_array(np.array([4, classes], np.int64), "split"),
             numpy_helper.from_array(np.array([10], np.int64), "max_k"),
             numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
             numpy_helper.from_array(np.array([0.5], np.float32), "threshold"),
             numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array([0], np.int64), "zero")]
    g = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model
