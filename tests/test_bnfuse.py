"""bnfuse: BatchNormalization / per-channel affine folding, checked against onnxruntime.

Positive cases are parametrized over opset, bias, groups, dilation and layer type; negative cases
are near-matches that must stay unchanged (with a reason); numerics go through the shared oracle
``assert_equivalent`` (onnxruntime with optimizations off, full checker).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_equivalent, op_count, rand
from helpers import make_model as _make_model

import onnxopt
from onnxopt.registry import PassContext, get_pass

RTOL, ATOL = 1e-5, 1e-5


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    """helpers.make_model, with output shapes (given as None) filled in by shape inference."""
    loose = helper.make_graph(list(nodes), "probe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_empty_tensor_value_info(n) for n, _ in outputs],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    probe = helper.make_model(loose, opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(probe)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    outs = [(n, s) if s is not None else known[n] for n, s in outputs]
    return _make_model(nodes, inputs, outs, initializers, opset=opset)


def run_bnfuse(model, **options):
    info = get_pass("bnfuse")
    result = info.run(onnxopt.load_model(model), info.resolve(options), PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


def bn_inits(prefix, c, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (f"{prefix}_g", (rng.standard_normal(c) * 0.5 + 1).astype(np.float32)),
        (f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
        (f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
        (f"{prefix}_v", (rng.random(c) + 0.2).astype(np.float32)),
    ]


def bn_node(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            epsilon=1e-3, **attrs)


def initializer_names(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# --------------------------------------------------------------------------- Conv + BN
@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,dilation", [(1, 1), (2, 1), (8, 1), (1, 2)])
def test_conv_bn_folds(opset, bias, groups, dilation):
    cin, cout = 8, 8
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [("w", rand(cout, cin // groups, 3, 3, seed=1))] + ([("b", rand(cout, seed=2))] if bias else [])
    nodes = [helper.make_node("Conv", inputs, ["c"], group=groups, dilations=[dilation, dilation], pads=[1, 1, 1, 1]),
             bn_node("c", "y")]
    model = make_model(nodes, [("x", [2, cin, 9, 9])], [("y", None)], inits + bn_inits("bn", cout), opset=opset)
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert op_count(result.model, "Conv") == 1
    assert result.changes["bn_folded_into_conv"] == 1
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_conv_bn_weights_in_constant_nodes():
    w = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rand(4, 3, 3, 3, seed=1)))
    params = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v)) for n, v in bn_inits("bn", 4)]
    nodes = [w, *params, helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", None)])
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_convtranspose_bn_folds(groups, bias):
    cin, cout = 4, 6
    inits = [("w", rand(cin, cout // groups, 3, 3, seed=3))] + ([("b", rand(cout, seed=4))] if bias else [])
    nodes = [helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["c"], group=groups, strides=[2, 2]),
             bn_node("c", "y")]
    model = make_model(nodes, [("x", [1, cin, 5, 5])], [("y", None)], inits + bn_inits("bn", cout))
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert result.changes["bn_folded_into_convtranspose"] == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [], [6], [1, 6], [3, 6], [3, 1]])
def test_gemm_bn_folds(trans_b, c_shape):
    k, n = 5, 6
    b = rand(n, k, seed=5) if trans_b else rand(k, n, seed=5)
    inits = [("B", b)] + ([("C", rand(*c_shape, seed=6))] if c_shape is not None else [])
    gemm = helper.make_node("Gemm", ["x", "B"] + (["C"] if c_shape is not None else []), ["g"],
                            transB=trans_b, alpha=0.7, beta=1.3)
    model = make_model([gemm, bn_node("g", "y")], [("x", [3, k])], [("y", None)], inits + bn_inits("bn", n))
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert result.changes["bn_folded_into_gemm"] == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_bn_folds(with_add):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    inits = [("W", rand(5, 6, seed=7))]
    src = "m"
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "bias"], ["a"]))
        inits.append(("bias", rand(6, seed=8)))
        src = "a"
    nodes.append(bn_node(src, "y"))
    model = make_model(nodes, [("x", [4, 5])], [("y", None)], inits + bn_inits("bn", 6))
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert op_count(result.model, "MatMul") == 1 and op_count(result.model, "Add") == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_matmul_rank3_bn_not_folded_into_matmul():
    # BN normalises axis 1 (T), the MatMul's columns are the last axis: not foldable into W.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [("x", [2, 6, 5])], [("y", None)], [("W", rand(5, 6, seed=7))] + bn_inits("bn", 6))
    result = run_bnfuse(model)
    assert "bn_folded_into_matmul" not in result.changes
    assert result.changes["bn_to_mul_add"] == 1
    assert any("rank 3" in s for s in result.skipped) or any("rank 3" in d for d in result.details)
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ BN -> following Conv
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_folds_into_following_conv(groups, bias):
    inits = [("w", rand(6, 6 // groups, 3, 3, seed=9))] + ([("b", rand(6, seed=10))] if bias else [])
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"] + (["b"] if bias else []), ["y"], group=groups)]
    model = make_model(nodes, [("x", [1, 6, 7, 7])], [("y", None)], inits + bn_inits("bn", 6))
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0 and op_count(result.model, "Mul") == 0
    assert result.changes["bn_folded_into_following_conv"] == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=1e-4)


def test_bn_not_folded_into_padded_following_conv():
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 4, 7, 7])], [("y", None)], [("w", rand(4, 4, 3, 3, seed=9))] + bn_inits("bn", 4))
    result = run_bnfuse(model, standalone="keep")
    assert op_count(result.model, "BatchNormalization") == 1
    assert any("pads its input" in s for s in result.skipped)
    # with the default the BN becomes Mul+Add and the result is still exact
    result = run_bnfuse(model)
    assert result.changes["bn_to_mul_add"] == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------------- standalone
@pytest.mark.parametrize("mode,shape", [("muladd", [2, 5, 4, 4]), ("conv", [2, 5, 4, 4]), ("muladd", [3, 5]),
                                        ("conv", [2, 5, 6]), ("muladd", [1, 5, 2, 3, 3])])
def test_standalone_bn(mode, shape):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    model = make_model(nodes, [("x", shape)], [("y", None)], bn_inits("bn", 5))
    result = run_bnfuse(model, standalone=mode)
    assert op_count(result.model, "BatchNormalization") == 0
    if mode == "conv" and len(shape) == 4:
        assert op_count(result.model, "Conv") == 1 and result.changes["bn_to_depthwise_conv"] == 1
    else:
        assert op_count(result.model, "Mul") == 1 and op_count(result.model, "Add") == 1
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_standalone_keep_and_dynamic_batch():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    model = make_model(nodes, [("x", ["N", 5, 4, 4])], [("y", None)], bn_inits("bn", 5))
    assert op_count(run_bnfuse(model, standalone="keep").model, "BatchNormalization") == 1
    fused = run_bnfuse(model).model
    feeds = [{"x": rand(b, 5, 4, 4, seed=b)} for b in (1, 3)]
    assert_equivalent(model, fused, feeds, rtol=RTOL, atol=ATOL)


def test_standalone_option_is_validated():
    with pytest.raises(onnxopt.OnnxoptError, match="bnfuse.standalone"):
        get_pass("bnfuse").resolve({"standalone": "fuse"})


# ------------------------------------------------------------------------- Mul/Add fold
@pytest.mark.parametrize("op,const_shape,swap", [
    ("Mul", [], False), ("Mul", [4, 1, 1], True), ("Add", [1, 4, 1, 1], False), ("Add", [4, 1, 1], True),
    ("Sub", [4, 1, 1], False), ("Div", [], False), ("Div", [4, 1, 1], False)])
def test_affine_after_conv_folds(op, const_shape, swap):
    c = (np.abs(rand(*const_shape, seed=11)) + 0.5).astype(np.float32)
    ins = ["k", "c"] if not swap else ["c", "k"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["k"], pads=[1, 1, 1, 1]), helper.make_node(op, ins, ["y"])]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], [("w", rand(4, 3, 3, 3, seed=12)), ("c", c)])
    result = run_bnfuse(model)
    assert op_count(result.model, op) == 0, result.skipped
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("op,const_shape", [("Mul", [6]), ("Add", [1, 6]), ("Mul", [])])
def test_affine_after_gemm_folds(op, const_shape):
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node(op, ["g", "c"], ["y"])]
    inits = [("B", rand(6, 5, seed=13)), ("C", rand(6, seed=14)), ("c", rand(*const_shape, seed=15))]
    model = make_model(nodes, [("x", [3, 5])], [("y", None)], inits)
    result = run_bnfuse(model)
    assert op_count(result.model, op) == 0
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_chain_conv_bn_mul_add_folds_completely():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["k"]), bn_node("k", "n"),
             helper.make_node("Mul", ["n", "m"], ["p"]), helper.make_node("Add", ["p", "a"], ["y"])]
    inits = [("w", rand(4, 3, 1, 1, seed=1)), ("b", rand(4, seed=2)), ("m", rand(4, 1, 1, seed=3)), ("a", rand(1, 4, 1, 1, seed=4))]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], inits + bn_inits("bn", 4))
    result = run_bnfuse(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_affine_not_per_channel_is_skipped():
    nodes = [helper.make_node("Conv", ["x", "w"], ["k"]), helper.make_node("Mul", ["k", "c"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], [("w", rand(4, 3, 1, 1, seed=1)), ("c", rand(1, 4, 4, 4, seed=2))])
    result = run_bnfuse(model)
    assert op_count(result.model, "Mul") == 1
    assert any("not per-channel" in s for s in result.skipped)
    assert_equivalent(model, result.model, rtol=0, atol=0)


# ---------------------------------------------------------------------------- negatives
def _conv_bn(extra_nodes=(), outputs=(("y", None),), inputs=(("x", [1, 3, 6, 6]),), w_init=True):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y"), *extra_nodes]
    inits = ([("w", rand(4, 3, 3, 3, seed=1))] if w_init else []) + bn_inits("bn", 4)
    return make_model(nodes, list(inputs), list(outputs), inits)


def test_conv_output_with_two_consumers_is_not_folded():
    model = _conv_bn([helper.make_node("Relu", ["c"], ["r"])], outputs=[("y", None), ("r", None)])
    result = run_bnfuse(model)
    assert "bn_folded_into_conv" not in result.changes
    assert any("2 consumers" in s for s in result.details + result.skipped)
    assert np.array_equal(initializer_names(result.model)["w"], initializer_names(model)["w"])
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_conv_output_that_is_a_graph_output_is_not_folded():
    model = _conv_bn(outputs=[("y", None), ("c", None)])
    result = run_bnfuse(model, standalone="keep")
    assert op_count(result.model, "BatchNormalization") == 1
    assert any("graph output" in s for s in result.skipped)
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_weight_that_is_a_graph_input_is_not_folded():
    w = numpy_helper.from_array(rand(4, 3, 3, 3, seed=1), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [w] + [numpy_helper.from_array(v, n) for n, v in bn_inits("bn", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = run_bnfuse(model, standalone="keep")
    assert op_count(result.model, "BatchNormalization") == 1
    assert any("graph input" in s for s in result.skipped)
    # the overridable input survives, with its initializer, and overriding it still works
    assert [i.name for i in result.model.graph.input] == ["x", "w"]
    assert "w" in initializer_names(result.model)
    feeds = [{"x": rand(1, 3, 6, 6, seed=3)}, {"x": rand(1, 3, 6, 6, seed=3), "w": rand(4, 3, 3, 3, seed=4)}]
    assert_equivalent(model, result.model, feeds, rtol=0, atol=0)


def test_ir3_initializer_inputs_are_constants():
    # Below IR 4 every initializer is listed as an input and cannot be fed: they are weights.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    inits = [("w", rand(4, 3, 3, 3, seed=1))] + bn_inits("bn", 4)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])] +
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inits],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(v, n) for n, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    inputs = [i.name for i in result.model.graph.input]
    assert inputs[0] == "x" and set(inputs[1:]) == {i.name for i in result.model.graph.initializer}
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_shared_weight_is_copied_not_corrupted():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y"),
             helper.make_node("Conv", ["x", "w"], ["z"])]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None), ("z", None)],
                       [("w", rand(4, 3, 3, 3, seed=1))] + bn_inits("bn", 4))
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 0
    inits = initializer_names(result.model)
    assert np.array_equal(inits["w"], initializer_names(model)["w"])  # the other Conv still reads the original
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert {n.input[1] for n in convs} == {"w", next(n.input[1] for n in convs if n.output[0] == "y")}
    assert len({n.input[1] for n in convs}) == 2
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", ["training_mode", "mean_output_used"])
def test_training_bn_is_left_alone(variant):
    if variant == "training_mode":  # opset 14+: batch statistics
        bn = helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv"], training_mode=1)
        outputs, opset = [("y", [2, 4, 4, 4])], 17
    else:  # opset 9-13: the running-mean output is read, so the node is a training BN
        bn = helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv", "sm", "sv"])
        outputs, opset = [("y", [2, 4, 4, 4]), ("rm", [4])], 13
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], outputs, [("w", rand(4, 3, 3, 3, seed=1))] + bn_inits("bn", 4), opset=opset)
    result = run_bnfuse(model)
    assert op_count(result.model, "BatchNormalization") == 1
    assert result.changes == {}
    assert any("training" in s for s in result.skipped)


def test_bn_as_graph_output_keeps_its_name_and_the_manager_verifies():
    model = _conv_bn()
    out, report = onnxopt.apply(model, "bnfuse")
    assert [o.name for o in out.graph.output] == ["y"]
    assert report.passes[0].verification["passed"]
    assert report.passes[0].verification["max_abs"] < 1e-4


def test_mul_add_after_matmul_fold_for_any_rank():
    # Mul/Add per column act on the last axis, which is the MatMul's output channel at every rank.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["p"]), helper.make_node("Sub", ["p", "c"], ["y"])]
    inits = [("W", rand(5, 6, seed=1)), ("bias", rand(6, seed=2)), ("k", rand(6, seed=3)), ("c", rand(1, 1, 6, seed=4))]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", None)], inits)
    result = run_bnfuse(model)
    assert ops_of(result.model) == ["MatMul", "Add"]
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)


def test_matmul_with_activation_weight_is_not_folded():
    nodes = [helper.make_node("Relu", ["z0"], ["z"]), helper.make_node("MatMul", ["x", "z"], ["m"]), bn_node("m", "y")]
    model = make_model(nodes, [("x", [4, 5]), ("z0", [5, 6])], [("y", None)], bn_inits("bn", 6))
    result = run_bnfuse(model, standalone="keep")
    assert op_count(result.model, "BatchNormalization") == 1
    assert any("weight is not a constant" in s for s in result.skipped)


def test_model_with_subgraph_survives():
    then_g = helper.make_graph([helper.make_node("Add", ["c", "k"], ["o1"])], "then", [],
                               [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [1, 4, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["c", "k"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1, 4, 4, 4])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"]), bn_node("c0", "c"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(v, n) for n, v in [("w", rand(4, 3, 3, 3, seed=1)), ("k", np.float32(2.0))] + bn_inits("bn", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = onnxopt.apply(model, "cleanup,bnfuse")
    assert op_count(out, "BatchNormalization") == 0
    feeds = [{"x": rand(1, 3, 6, 6, seed=2), "cond": np.array(c)} for c in (True, False)]
    assert_equivalent(model, out, feeds, rtol=RTOL, atol=ATOL)


def ops_of(model):
    return [n.op_type for n in model.graph.node]


def test_mul_after_grouped_convtranspose_folds():
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["k"], group=2, strides=[2, 2], dilations=[2, 1]),
             helper.make_node("Mul", ["k", "m"], ["y"])]
    inits = [("w", rand(4, 3, 3, 3, seed=1)), ("b", rand(6, seed=2)), ("m", rand(6, 1, 1, seed=3))]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", None)], inits)
    result = run_bnfuse(model)
    assert ops_of(result.model) == ["ConvTranspose"]
    assert result.changes["mul_folded_into_convtranspose"] == 1
    assert_equivalent(model, result.model, rtol=RTOL, atol=ATOL)
