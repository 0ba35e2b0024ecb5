"""cleanup: constant/shape folding, no-op removal, Pad folding, dead code -- against onnxruntime.

Every positive case checks structure (what is gone) and numerics (the shared oracle); every
negative case is a near-match that must stay, usually with a reason in ``skipped``.
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


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    """helpers.make_model with output shapes given as None filled in by shape inference."""
    def vi(n, s, t=TensorProto.FLOAT):
        return helper.make_tensor_value_info(n, t, s)
    ins = [vi(*i) for i in inputs]
    loose = helper.make_graph(list(nodes), "probe", ins, [helper.make_empty_tensor_value_info(o[0]) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(loose, opset_imports=[helper.make_opsetid("", opset)]))
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    outs = [vi(*o) if o[1] is not None else known[o[0]] for o in outputs]
    return _make_model(nodes, ins, outs, initializers, opset=opset)


def run_cleanup(model, **options):
    info = get_pass("cleanup")
    result = info.run(onnxopt.load_model(model), info.resolve(options), PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


def const_node(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def ops(model):
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------- constants and folding
def test_constant_nodes_are_lifted_and_dead_code_removed():
    nodes = [const_node("w", rand(4, 3, 3, 3, seed=1)), const_node("unused_c", np.ones(3, np.float32)),
             helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["x"], ["dead"])]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], [("unused_init", np.zeros(2, np.float32))])
    result = run_cleanup(model)
    assert ops(result.model) == ["Conv"]
    names = {i.name for i in result.model.graph.initializer}
    assert names == {"w"}
    assert result.changes["constants_lifted"] == 1  # the unused Constant goes with the dead code first
    assert result.changes["dead_nodes_removed"] == 2 and result.changes["unused_initializers_removed"] == 1
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_static_shape_chain_is_folded():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape: all static, folds to one Reshape constant.
    nodes = [helper.make_node("Shape", ["x"], ["s"]), const_node("i0", np.array(0, np.int64)),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0), const_node("ax", np.array([0], np.int64)),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), const_node("rest", np.array([-1], np.int64)),
             helper.make_node("Concat", ["n1", "rest"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", None)])
    result = run_cleanup(model)
    assert ops(result.model) == ["Reshape"]
    reshape_shape = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}[result.model.graph.node[0].input[1]]
    assert reshape_shape.tolist() == [2, -1]
    assert_equivalent(model, result.model, rtol=0, atol=0)


def _dynamic_batch_chain():
    # Gather(0) reads the dynamic batch dim N (must stay), Gather(1) a static dim (folds).
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             const_node("i0", np.array([0], np.int64)), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             const_node("i1", np.array([1], np.int64)), helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
             const_node("m1", np.array([-1], np.int64)),
             helper.make_node("Concat", ["n", "c", "m1"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    return make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 16])])


def test_shape_chain_on_dynamic_batch_folds_only_static_dims():
    model = _dynamic_batch_chain()
    result = run_cleanup(model)
    assert op_count(result.model, "Shape") == 1 and op_count(result.model, "Gather") == 1
    assert result.changes["shapes_folded"] == 1
    feeds = [{"x": rand(b, 3, 4, 4, seed=b)} for b in (1, 2, 5)]
    assert_equivalent(model, result.model, feeds, rtol=0, atol=0)


def test_scalar_gather_of_a_static_dim_stays_scalar():
    """The torch exporter's attention reshape: Gather with a scalar index picks a static dim of a
    partly dynamic shape, then Unsqueeze -> Concat. The folded value must stay 0-d (it came out
    1-D, the Unsqueeze made it 2-D and the Concat failed shape inference)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             const_node("i0", np.array(0, np.int64)), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             const_node("i1", np.array(1, np.int64)), helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
             const_node("ax", np.array([0], np.int64)),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Unsqueeze", ["c", "ax"], ["c1"]),
             const_node("m1", np.array([-1], np.int64)),
             helper.make_node("Concat", ["n1", "c1", "m1"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 16])])
    result = run_cleanup(model)
    assert result.changes["shapes_folded"] >= 1 and op_count(result.model, "Gather") == 1
    onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    feeds = [{"x": rand(b, 3, 4, 4, seed=b)} for b in (1, 2, 5)]
    assert_equivalent(model, result.model, feeds, rtol=0, atol=0)


def test_shape_slice_of_static_dims_folds():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), const_node("st", np.array([1], np.int64)),
             const_node("en", np.array([4], np.int64)), helper.make_node("Slice", ["s", "st", "en"], ["hw"]),
             const_node("m1", np.array([-1], np.int64)), helper.make_node("Concat", ["m1", "hw"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 4, 4])])
    result = run_cleanup(model)
    assert op_count(result.model, "Shape") == 0 and op_count(result.model, "Slice") == 0
    feeds = [{"x": rand(b, 3, 4, 4, seed=b)} for b in (1, 3)]
    assert_equivalent(model, result.model, feeds, rtol=0, atol=0)


def test_fold_size_bound():
    nodes = [const_node("shape", np.array([64, 64], np.int64)),
             helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"])]
    model = make_model(nodes, [("x", [64, 64])], [("y", None)])
    small = run_cleanup(model, max_fold_elements=1000)
    assert op_count(small.model, "ConstantOfShape") == 1
    assert any("max_fold_elements=1000" in s for s in small.skipped)
    assert_equivalent(model, small.model, rtol=0, atol=0)
    big = run_cleanup(model)
    assert op_count(big.model, "ConstantOfShape") == 0
    assert_equivalent(model, big.model, rtol=0, atol=0)


def test_qdq_weights_are_not_folded():
    wq = np.random.default_rng(0).integers(-127, 127, (4, 3, 1, 1)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]), helper.make_node("Conv", ["x", "w"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], [("wq", wq), ("s", np.float32(0.02))])
    result = run_cleanup(model)
    assert ops(result.model) == ["DequantizeLinear", "Conv"]
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_overridable_input_is_not_folded():
    # An input with an initializer may be overridden at run time: it is not a constant.
    g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["k2"]), helper.make_node("Add", ["k2", "one"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                          [numpy_helper.from_array(np.ones(3, np.float32), "k"), numpy_helper.from_array(np.ones(3, np.float32), "one")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = run_cleanup(model)
    assert ops(result.model) == ["Mul", "Add"]  # Mul by k is NOT a no-op: k is an input
    assert [i.name for i in result.model.graph.input] == ["x", "k"]
    feeds = [{"x": rand(3, seed=1)}, {"x": rand(3, seed=1), "k": rand(3, seed=2)}]
    assert_equivalent(model, result.model, feeds, rtol=0, atol=0)


def test_layer_weights_listed_as_inputs_become_constants_and_knobs_stay_inputs():
    """An export with keep_initializers_as_inputs=True lists every weight as an input: cleanup makes
    the layers' weights constants (as TensorRT and onnxruntime's quantizer read them), keeps an
    input with a default that no layer reads as a weight (a scale knob), and keeps everything with
    weight_inputs=keep."""
    w, k = rand(4, 3, 3, 3, seed=1), np.full(1, 2.0, np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
                           helper.make_tensor_value_info("k", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(k, "k")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = run_cleanup(model)
    assert [i.name for i in result.model.graph.input] == ["x", "k"] and result.changes["weight_inputs_made_constant"] == 1
    assert_equivalent(model, result.model, [{"x": rand(1, 3, 6, 6, seed=2)}], rtol=0, atol=0)
    kept = run_cleanup(model, weight_inputs="keep")
    assert [i.name for i in kept.model.graph.input] == ["x", "w", "k"] and not kept.changes.get("weight_inputs_made_constant")


# ------------------------------------------------------------------------------- no-ops
NOOPS = {
    "identity": ([helper.make_node("Identity", ["r"], ["t"])], []),
    "dropout": ([helper.make_node("Dropout", ["r"], ["t"])], []),
    "cast_same": ([helper.make_node("Cast", ["r"], ["t"], to=TensorProto.FLOAT)], []),
    "reshape_same": ([helper.make_node("Reshape", ["r", "shp"], ["t"])], [("shp", np.array([2, 3, 4, 4], np.int64))]),
    "transpose_identity": ([helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2, 3])], []),
    "mul_one": ([helper.make_node("Mul", ["one", "r"], ["t"])], [("one", np.ones((3, 1, 1), np.float32))]),
    "add_zero": ([helper.make_node("Add", ["r", "zero"], ["t"])], [("zero", np.zeros((1, 3, 1, 4), np.float32))]),
    "sub_zero": ([helper.make_node("Sub", ["r", "zero"], ["t"])], [("zero", np.float32(0))]),
    "div_one": ([helper.make_node("Div", ["r", "one"], ["t"])], [("one", np.float32(1))]),
    "pad_zero": ([helper.make_node("Pad", ["r", "pz"], ["t"])], [("pz", np.zeros(8, np.int64))]),
    "slice_all": ([helper.make_node("Slice", ["r", "st", "en", "ax"], ["t"])],
                  [("st", np.array([0, -100], np.int64)), ("en", np.array([2**62, 4], np.int64)), ("ax", np.array([2, 3], np.int64))]),
    "concat_single": ([helper.make_node("Concat", ["r"], ["t"], axis=1)], []),
    "expand_same": ([helper.make_node("Expand", ["r", "es"], ["t"])], [("es", np.array([1, 3, 1, 1], np.int64))]),
}


@pytest.mark.parametrize("case", sorted(NOOPS))
def test_noop_is_removed(case):
    body, inits = NOOPS[case]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), *body, helper.make_node("Sigmoid", ["t"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", None)], inits)
    result = run_cleanup(model)
    assert ops(result.model) == ["Relu", "Sigmoid"], result.skipped
    assert_equivalent(model, result.model, rtol=0, atol=0)


NEAR_NOOPS = {
    "cast_other": ([helper.make_node("Cast", ["r"], ["t0"], to=TensorProto.FLOAT16), helper.make_node("Cast", ["t0"], ["t"], to=TensorProto.FLOAT)], []),
    "reshape_other": ([helper.make_node("Reshape", ["r", "shp"], ["t"])], [("shp", np.array([2, 3, 16, 1], np.int64))]),
    "transpose_swap": ([helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2])], []),
    "mul_broadcasts": ([helper.make_node("Mul", ["r", "one"], ["t0"]), helper.make_node("ReduceSum", ["t0"], ["t"], keepdims=1)],
                       [("one", np.ones((3, 2, 3, 4, 4), np.float32))]),
    "mul_almost_one": ([helper.make_node("Mul", ["r", "k"], ["t"])], [("k", np.array([1, 1, 1.0001], np.float32).reshape(3, 1, 1))]),
    "slice_step2": ([helper.make_node("Slice", ["r", "st", "en", "ax", "sp"], ["t"])],
                    [("st", np.array([0], np.int64)), ("en", np.array([4], np.int64)), ("ax", np.array([3], np.int64)), ("sp", np.array([2], np.int64))]),
    "slice_partial": ([helper.make_node("Slice", ["r", "st", "en", "ax"], ["t"])],
                      [("st", np.array([1], np.int64)), ("en", np.array([4], np.int64)), ("ax", np.array([2], np.int64))]),
    "pad_nonzero": ([helper.make_node("Pad", ["r", "pz"], ["t"])], [("pz", np.array([0, 0, 0, 1, 0, 0, 0, 0], np.int64))]),
}


@pytest.mark.parametrize("case", sorted(NEAR_NOOPS))
def test_near_noop_is_kept(case):
    body, inits = NEAR_NOOPS[case]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), *body, helper.make_node("Sigmoid", ["t"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", None)], inits)
    result = run_cleanup(model)
    assert ops(result.model) == ops(model)
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_dropout_with_used_mask_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["t", "mask"]), helper.make_node("Relu", ["t"], ["y"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", None), ("mask", [2, 3], TensorProto.BOOL)])
    result = run_cleanup(model)
    assert op_count(result.model, "Dropout") == 1
    assert any("mask" in s for s in result.skipped)


def test_noop_writing_a_graph_output_keeps_the_output_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Sigmoid", ["r"], ["z"])]
    model = make_model(nodes, [("x", [2, 3])], [("y", None), ("z", None)])
    result = run_cleanup(model)
    assert ops(result.model) == ["Relu", "Sigmoid"]
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_identity_from_graph_input_to_graph_output_is_kept():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [2, 3])], [("y", None)])
    result = run_cleanup(model)
    assert ops(result.model) == ["Identity"]
    assert any("graph output" in s for s in result.skipped)


# -------------------------------------------------------------------------- Pad folding
def _pad_inputs(opset, pads, value=None, axes=None):
    """Pad node + initializers for the opset's Pad signature."""
    if opset < 11:
        attrs = {"pads": list(pads)}
        if value is not None:
            attrs["value"] = float(value)
        return helper.make_node("Pad", ["r"], ["p"], **attrs), []
    ins, inits = ["r", "pads"], [("pads", np.array(pads, np.int64))]
    if value is not None or axes is not None:
        ins.append("pv" if value is not None else "")
        if value is not None:
            inits.append(("pv", np.float32(value)))
    if axes is not None:
        ins.append("axes")
        inits.append(("axes", np.array(axes, np.int64)))
    return helper.make_node("Pad", ins, ["p"]), inits


@pytest.mark.parametrize("opset", [10, 13, 18])
def test_pad_folds_into_conv(opset):
    if opset >= 18:
        pad, inits = _pad_inputs(opset, [0, 1, 1, 2], axes=[2, 3])
    else:
        pad, inits = _pad_inputs(opset, [0, 0, 0, 1, 0, 0, 1, 2])
    conv = helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1], strides=[2, 2])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), pad, conv]
    model = make_model(nodes, [("x", [1, 3, 9, 9])], [("y", None)], inits + [("w", rand(4, 3, 3, 3, seed=1))], opset=opset)
    result = run_cleanup(model)
    assert op_count(result.model, "Pad") == 0, result.skipped
    conv_out = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert list(helper.get_attribute_value(next(a for a in conv_out.attribute if a.name == "pads"))) == [1, 1, 1, 3]
    assert_equivalent(model, result.model, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count_include_pad,own_pads,folds", [(1, [1, 1, 1, 1], True), (0, [0, 0, 0, 0], True), (0, [1, 1, 1, 1], False)])
def test_pad_into_average_pool(count_include_pad, own_pads, folds):
    pad, inits = _pad_inputs(13, [0, 0, 1, 1, 0, 0, 1, 0])
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], pads=own_pads, count_include_pad=count_include_pad)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), pad, pool], [("x", [1, 2, 6, 6])], [("y", None)], inits)
    result = run_cleanup(model)
    assert (op_count(result.model, "Pad") == 0) == folds
    if not folds:
        assert any("count_include_pad=0" in s for s in result.skipped)
    assert_equivalent(model, result.model, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("producer,value,folds", [("Relu", 0.0, True), ("Sigmoid", 0.0, False), ("Tanh", -np.inf, True), ("Tanh", -1.0, False)])
def test_pad_into_max_pool(producer, value, folds):
    pad, inits = _pad_inputs(13, [0, 0, 1, 1, 0, 0, 1, 1], value=value)
    pool = helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
    nodes = [helper.make_node(producer, ["x"], ["r"]), pad, pool]
    model = make_model(nodes, [("x", [1, 2, 7, 7])], [("y", None)], inits)
    result = run_cleanup(model)
    assert (op_count(result.model, "Pad") == 0) == folds, result.skipped
    assert_equivalent(model, result.model, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["value_one", "channel_axis", "reflect", "two_consumers", "pool_pad_too_big"])
def test_pad_not_folded(case):
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    value, extra, outputs, mode = None, [], [("y", None)], "constant"
    consumer = helper.make_node("Conv", ["p", "w"], ["y"])
    inits = [("w", rand(4, 3, 3, 3, seed=1))]
    if case == "value_one":
        value = 1.0
    elif case == "channel_axis":
        pads = [0, 1, 1, 1, 0, 0, 1, 1]
        inits = [("w", rand(4, 4, 3, 3, seed=1))]
    elif case == "reflect":
        mode = "reflect"
    elif case == "two_consumers":
        extra, outputs = [helper.make_node("Relu", ["p"], ["z"])], [("y", None), ("z", None)]
    elif case == "pool_pad_too_big":
        pads = [0, 0, 3, 3, 0, 0, 3, 3]
        consumer, inits = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], count_include_pad=1), []
    pad, pad_inits = _pad_inputs(13, pads, value=value)
    if mode != "constant":
        pad = helper.make_node("Pad", ["r", "pads"], ["p"], mode=mode)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), pad, consumer, *extra]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], outputs, pad_inits + inits)
    result = run_cleanup(model)
    assert op_count(result.model, "Pad") == 1
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_tf_same_padding_chain_folds_into_conv():
    """The efficientnet_lite0_bn pattern: Pad fed by ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast."""
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [const_node("four", i64([4])), const_node("pp", i64([0, 1, 0, 1])),
             helper.make_node("ConstantOfShape", ["four"], ["zeros"], value=numpy_helper.from_array(i64([0]))),
             helper.make_node("Concat", ["pp", "zeros"], ["cat"], axis=0),
             const_node("m12", i64([-1, 2])), helper.make_node("Reshape", ["cat", "m12"], ["r2"]),
             const_node("s0", i64([-1])), const_node("e0", i64([-(2**63) + 1])), const_node("a0", i64([0])), const_node("st", i64([-1])),
             helper.make_node("Slice", ["r2", "s0", "e0", "a0", "st"], ["rev"]),
             helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
             const_node("m1", i64([-1])), helper.make_node("Reshape", ["tr", "m1"], ["flat"]),
             helper.make_node("Cast", ["flat"], ["pads"], to=TensorProto.INT64),
             const_node("zero", np.float32(0)), helper.make_node("Pad", ["x", "pads", "zero"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], strides=[2, 2])]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", None)], [("w", rand(4, 3, 3, 3, seed=1))], opset=13)
    result = run_cleanup(model)
    assert ops(result.model) == ["Conv"]
    assert_equivalent(model, result.model, rtol=1e-6, atol=1e-6)


def test_cleanup_is_idempotent_and_options_disable_rules():
    model = _dynamic_batch_chain()
    once = run_cleanup(model).model
    twice = run_cleanup(once)
    assert ops(twice.model) == ops(once)
    off = run_cleanup(model, fold_shapes=False, fold_constants=False, lift_constants=False)
    assert op_count(off.model, "Constant") == op_count(model, "Constant")
    with pytest.raises(onnxopt.OnnxoptError, match="max_fold_elements"):
        get_pass("cleanup").resolve({"max_fold_elements": "lots"})
    with pytest.raises(onnxopt.OnnxoptError, match="max_fold_elements"):
        onnxopt.apply(model, "cleanup", options={"cleanup": {"max_fold_elements": -1}})


def test_second_round_folds_shapes_made_static_by_the_first():
    # Abs is folded by onnxruntime in round 1, which is what makes y's shape static; only round 2's
    # shape inference can then fold Shape(y).
    nodes = [const_node("neg", np.array([-2, -48], np.int64)), helper.make_node("Abs", ["neg"], ["shape"]),
             helper.make_node("Reshape", ["x", "shape"], ["y"]), helper.make_node("Shape", ["y"], ["sy"]),
             const_node("one", np.array([1], np.int64)), helper.make_node("Gather", ["sy", "one"], ["w"], axis=0),
             const_node("m1", np.array([-1], np.int64)), helper.make_node("Concat", ["m1", "w"], ["s2"], axis=0),
             helper.make_node("Reshape", ["y", "s2"], ["z"])]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("z", [2, 48])])
    result = run_cleanup(model)
    assert ops(result.model) == ["Reshape"]  # y -> z is the same shape; the x -> y Reshape remains
    assert result.extra["rounds"] == 2
    assert_equivalent(model, result.model, rtol=0, atol=0)


def test_wrong_declared_shapes_do_not_fool_noop_removal():
    # The exporter claims the Reshape keeps the shape (its value_info says [2, 6]); only shapes
    # inferred from the inputs are trusted, so the real [3, 4] Reshape stays and the wrong
    # value_info is dropped (it would fail the full checker).
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shp"], ["t"]),
             helper.make_node("Sigmoid", ["t"], ["y"])]
    model = _make_model(nodes, [("x", [2, 6])], [("y", [3, 4])], [("shp", np.array([3, 4], np.int64))])
    model.graph.value_info.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 6]))
    result = run_cleanup(model)
    assert ops(result.model) == ["Relu", "Reshape", "Sigmoid"]
    assert result.changes["wrong_value_info_dropped"] == 1
    out = helper_run(result.model, {"x": rand(2, 6, seed=1)})
    assert out["y"].shape == (3, 4)


def helper_run(model, feed):
    from helpers import run
    return run(model, feed)


def test_fold_survives_a_node_onnxruntime_cannot_run():
    # Mod with fmod=0 on floats passes the checker but onnxruntime refuses to run it: the batched
    # folding session fails, the node-by-node fallback folds everything else and reports the Mod.
    nodes = [helper.make_node("Mod", ["a", "b"], ["m"]), helper.make_node("Add", ["x", "m"], ["y0"]),
             helper.make_node("Mul", ["c", "c"], ["c2"]), helper.make_node("Mul", ["y0", "c2"], ["y"])]
    inits = [("a", np.array([5.0, 3.0], np.float32)), ("b", np.array([2.0, 2.0], np.float32)), ("c", np.array([1.5, 2.0], np.float32))]
    model = make_model(nodes, [("x", [2])], [("y", None)], inits)
    result = run_cleanup(model)
    assert ops(result.model) == ["Mod", "Add", "Mul"]
    assert any("Mod" in s and "cannot evaluate" in s for s in result.skipped)
    c2 = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}[result.model.graph.node[2].input[1]]
    np.testing.assert_array_equal(c2, np.array([2.25, 4.0], np.float32))
