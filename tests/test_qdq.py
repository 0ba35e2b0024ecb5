"""qdq pass: placement per target, weight/bias arithmetic, numerics, options, data handling.

Graphs are tiny and calibrated with minmax on a handful of generated samples, so every test is
fast; the real-model test is marked ``shared``.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, rand, run
from onnxopt import manager
from onnxopt.data import DataSpec
from onnxopt.errors import DataError, OnnxoptError, OptionError
from onnxopt.quant import check as qcheck
from onnxopt.quant.quantize import activation_params, quantize_weight, weight_scales
from onnxopt.quant.targets import get_target
from onnxopt.registry import PassContext, get_pass

TARGETS = ["tensorrt", "ort", "tidl", "tidl-tda4vm"]


# ------------------------------------------------------------------------------ builders
def conv_node(name, x, w, b, y, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def conv_relu_conv(opset=17, batch=1):
    nodes = [
        conv_node("conv1", "x", "w1", "b1", "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv_node("conv2", "r1", "w2", "b2", "y", pads=[1, 1, 1, 1]),
    ]
    inits = [("w1", rand(8, 3, 3, 3, seed=1, scale=0.3)), ("b1", rand(8, seed=2, scale=0.1)),
             ("w2", rand(4, 8, 3, 3, seed=3, scale=0.2)), ("b2", rand(4, seed=4, scale=0.1))]
    return make_model(nodes, [("x", [batch, 3, 8, 8])], [("y", [batch, 4, 8, 8])], inits, opset=opset)


def residual():
    nodes = [
        conv_node("conv1", "x", "w1", "b1", "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv_node("conv2", "r1", "w2", "b2", "c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu2"),
    ]
    inits = [("w1", rand(8, 3, 3, 3, seed=1, scale=0.3)), ("b1", rand(8, seed=2, scale=0.1)),
             ("w2", rand(8, 8, 3, 3, seed=3, scale=0.2)), ("b2", rand(8, seed=4, scale=0.1))]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])], inits)


def concat_pool():
    nodes = [
        conv_node("conv_a", "x", "wa", "ba", "ca"),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        conv_node("conv_b", "x", "wb", "bb", "cb"),
        helper.make_node("Concat", ["ra", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        conv_node("conv_c", "mp", "wc", "bc", "cc"),
        helper.make_node("GlobalAveragePool", ["cc"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = [("wa", rand(4, 3, 1, 1, seed=1)), ("ba", rand(4, seed=2)), ("wb", rand(4, 3, 1, 1, seed=3, scale=3.0)),
             ("bb", rand(4, seed=4)), ("wc", rand(6, 8, 1, 1, seed=5)), ("bc", rand(6, seed=6)),
             ("wg", rand(5, 6, seed=7)), ("bg", rand(5, seed=8))]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 5])], inits)


def matmul_model(trans_b=0, batch=1):
    w = rand(6, 5, seed=1) if not trans_b else rand(5, 6, seed=1)
    nodes = [helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="gemm", transB=trans_b),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wm"], ["y"], name="matmul")]
    inits = [("wg", w), ("bg", rand(5, seed=2)), ("wm", rand(5, 7, seed=3))]
    return make_model(nodes, [("x", [batch, 6])], [("y", [batch, 7])], inits)


def feeds_for(model, n=6, seed=0, shapes=None):
    from onnxopt import runtime
    return [runtime.generate_inputs(model, seed=seed + i, overrides=shapes) for i in range(n)]


def quantize(model, feeds=None, ctx_kwargs=None, **opts):
    feeds = feeds if feeds is not None else feeds_for(model)
    opts.setdefault("calib_method", "minmax")
    # placement tests: every layer quantized (on these few-layer graphs with no decision on their
    # outputs, fallback=auto may keep the layer that makes most of the noise; tested in test_recovery)
    opts.setdefault("fallback", "none")
    ctx = PassContext(data=lambda: iter(feeds), progress=False, **(ctx_kwargs or {}))
    q, report = manager.apply(model, "qdq", {"qdq": opts}, context=ctx, summarize_layers=False)
    return q, report.passes[0]


def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def input_producer(model, node_name, index):
    return producers(model).get(node(model, node_name).input[index])


def quantized_tensors(model):
    """Tensors (original names) that feed a QuantizeLinear."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


# ------------------------------------------------------------------------------ placement
def test_tensorrt_conv_relu_conv_inputs_only():
    q, rec = quantize(conv_relu_conv(), target="tensorrt")
    assert quantized_tensors(q) == {"x", "r1"}          # inputs of both convs, never conv outputs
    for conv in ("conv1", "conv2"):
        assert input_producer(q, conv, 0).op_type == "DequantizeLinear"
        wdq = input_producer(q, conv, 1)
        assert wdq.op_type == "DequantizeLinear" and helper.get_attribute_value(wdq.attribute[0]) == 0
        assert node(q, conv).input[2] in inits(q)          # float bias for TensorRT
        assert inits(q)[node(q, conv).input[2]].dtype == np.float32
    i = inits(q)
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = i[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    assert qcheck.check_model(q, "tensorrt") == []
    assert rec.extra["check"]["violations"] == 0


def test_ort_absorbs_relu_and_uses_int32_bias():
    q, _ = quantize(conv_relu_conv(), target="ort")
    qt = quantized_tensors(q)
    assert "r1" in qt and "c1" not in qt                 # Q after the ReLU, not between Conv and ReLU
    assert "y" not in qt                                 # graph outputs stay float
    i = inits(q)
    for conv in ("conv1", "conv2"):
        b = input_producer(q, conv, 2)
        assert b.op_type == "DequantizeLinear" and i[b.input[0]].dtype == np.int32
    assert i["r1_zero_point"].dtype == np.uint8
    assert qcheck.check_model(q, "ort") == []


def test_ort_output_fuses_into_qlinearconv():
    """onnxruntime turns the ort layout into int8 kernels (QLinearConv) with optimizations on."""
    import onnxruntime as ort
    q, _ = quantize(conv_relu_conv(), target="ort")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    import tempfile, os
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "QLinearConv" in ops and "Relu" not in ops


@pytest.mark.parametrize("flags, target, opts, noted", [
    ({"avx2"}, "ort", {}, True),                                          # AVX2 without VNNI, 8-bit weights
    ({"avx2", "avx512_vnni"}, "ort", {}, False),                          # VNNI sums into int32
    ({"avx2", "avx_vnni"}, "ort", {}, False),
    ({"avx2"}, "ort", {"weight_bits": 7}, False),                         # reduce_range: no saturation
    ({"avx2"}, "ort", {"weight_bits": 4, "first_last_weight_bits": 8}, True),
    ({"avx2"}, "tensorrt", {}, False),                                    # not run by onnxruntime's CPU kernels
    (set(), "ort", {}, False),                                            # flags unknown (not Linux/x86)
])
def test_saturation_note_on_cpus_without_vnni(monkeypatch, flags, target, opts, noted):
    """8-bit ort weights saturate onnxruntime's fused u8 x s8 kernels on AVX2 CPUs without VNNI:
    the pass says so (log and report) and leaves the model as it is."""
    from onnxopt import runtime
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(flags))
    logged = []
    q, rec = quantize(conv_relu_conv(), ctx_kwargs={"log": logged.append}, target=target, **opts)
    notes = [w for w in rec.extra["warnings"] if "no VNNI" in w]
    assert bool(notes) == noted
    assert bool([m for m in logged if "no VNNI" in m]) == noted
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    q2, _ = quantize(conv_relu_conv(), target=target, **opts)
    assert q.graph == q2.graph  # a note, not a change


def _weight_error(q, model, conv):
    """(squared error of the dequantized weight of ``conv`` against float, its DQ's inputs)."""
    dq = input_producer(q, conv, 1)
    i = inits(q)
    wq, s, zp = (i[n].astype(np.float64) for n in dq.input)
    w = inits(model)[node(model, conv).input[1]].astype(np.float64)
    deq = (wq - zp.reshape(-1, 1, 1, 1)) * s.reshape(-1, 1, 1, 1)
    return float(((deq - w) ** 2).sum()), (wq, s, zp, w, deq)


def test_asymmetric_weights_take_all_levels_and_still_fuse():
    """weight_symmetric=false (ort): per-channel zero points, all 16 levels [-8, 7] at 4 bits,
    every weight within half a step of float (no clipping), less weight error than symmetric;
    onnxruntime still fuses QLinearConv, and the ort check is clean."""
    import onnxruntime as ort
    m = conv_relu_conv()
    qa, _ = quantize(m, target="ort", weight_bits=4, weight_symmetric=False)
    qs, _ = quantize(m, target="ort", weight_bits=4)
    for conv in ("conv1", "conv2"):
        err_a, (wq, s, zp, w, deq) = _weight_error(qa, m, conv)
        err_s, _ = _weight_error(qs, m, conv)
        assert wq.min() >= -8 and wq.max() <= 7 and zp.any() and err_a < err_s
        assert np.all(np.abs(deq - w) <= 0.5 * s.reshape(-1, 1, 1, 1) * (1 + 1e-6))
    assert qcheck.check_model(qa, "ort") == []
    import tempfile, os
    fused = []
    for q in (qa, qs):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
            ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
            fused.append([n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node].count("QLinearConv"))
    assert fused[0] == fused[1] >= 1        # as many int8 kernels as with symmetric weights


def test_asymmetric_weights_leave_8_bit_layers_symmetric():
    """8-bit layers keep zero point 0 under weight_symmetric=false: onnxruntime's u8 x s8 kernels
    on AVX2 CPUs saturate on stored weights beyond +-64, which an asymmetric 8-bit layer fills."""
    q, _ = quantize(conv_relu_conv(), target="ort", weight_bits=4, first_last_weight_bits=8, weight_symmetric=False)
    i = inits(q)
    for conv in ("conv1", "conv2"):          # the first and the last layer: both at 8 bits here
        dq = input_producer(q, conv, 1)
        assert not i[dq.input[2]].any() and np.abs(i[dq.input[0]]).max() <= 127


@pytest.mark.parametrize("target", ["tensorrt", "tidl", "tidl-tda4vm"])
def test_asymmetric_weights_refused_where_the_target_needs_zero_points_0(target):
    with pytest.raises(OptionError, match="weight_symmetric"):
        quantize(conv_relu_conv(), target=target, weight_symmetric=False)


def test_tensorrt_residual_add_quantizes_only_the_residual():
    q, _ = quantize(residual(), target="tensorrt")
    qt = quantized_tensors(q)
    assert "r1" in qt and "c2" not in qt                 # conv2 fuses the Add; residual r1 is int8
    add = node(q, "add")
    assert producers(q)[add.input[0]].op_type == "Conv"
    assert producers(q)[add.input[1]].op_type == "DequantizeLinear"
    assert qcheck.check_model(q, "tensorrt") == []


def test_concat_and_maxpool_share_one_scale():
    for target in ("tensorrt", "ort"):
        q, _ = quantize(concat_pool(), target=target)
        qt = quantized_tensors(q)
        assert {"ra", "cb", "cat", "mp"} <= qt if target == "ort" else {"ra", "cb", "mp"} <= qt
        scale_of = {n.input[0]: n.input[1] for n in q.graph.node if n.op_type == "QuantizeLinear"}
        assert scale_of["ra"] == scale_of["cb"] == scale_of["mp"]     # Concat inputs/MaxPool in/out: one scale
        assert "gap" in qt or "flat" in qt                           # the Gemm's input path is quantized
        assert qcheck.check_model(q, target) == []


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_matmul_per_channel_axis(trans_b):
    q, rec = quantize(matmul_model(trans_b), target="tensorrt")
    gdq = input_producer(q, "gemm", 1)
    assert helper.get_attribute_value(gdq.attribute[0]) == (0 if trans_b else 1)
    assert inits(q)[gdq.input[1]].shape == (5,)
    mdq = input_producer(q, "matmul", 1)
    assert helper.get_attribute_value(mdq.attribute[0]) == 1 and inits(q)[mdq.input[1]].shape == (7,)
    assert qcheck.check_model(q, "tensorrt") == []


def test_fixed_batch_two_model_quantizes():
    m = matmul_model(batch=2)
    q, _ = quantize(m, target="ort")
    f = feeds_for(m, 1)[0]
    assert run(q, f)["y"].shape == (2, 7)


def test_convtranspose_axis_one():
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2], kernel_shape=[2, 2])]
    m = make_model(nodes, [("x", [1, 4, 4, 4])], [("y", [1, 6, 8, 8])], [("w", rand(4, 6, 2, 2, seed=1)), ("b", rand(6, seed=2))])
    q, _ = quantize(m, target="tensorrt")
    wdq = input_producer(q, "deconv", 1)
    assert helper.get_attribute_value(wdq.attribute[0]) == 1 and inits(q)[wdq.input[1]].shape == (6,)
    assert qcheck.check_model(q, "tensorrt") == []


# ------------------------------------------------------------------------------ arithmetic
def test_weights_are_round_w_over_s_clipped_and_bias_scale():
    m = conv_relu_conv()
    q, rec = quantize(m, target="ort", bias_correction="none")  # the bias as stored, before any correction
    info = rec.extra["info"]
    i, f = inits(q), inits(m)
    layer = next(l for l in info["layers"] if l["node"] == "conv2")
    s = i[layer["weight_scale"]]
    w = f["w2"]
    np.testing.assert_allclose(s, np.abs(w).reshape(4, -1).max(1) / 127, rtol=1e-6)
    want = np.clip(np.rint(w / s.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(i[layer["weight_q"]], want)
    s_in = next(a for a in info["activations"] if a["tensor"] == "r1")["scale_value"]
    assert layer["bias_is_int"]
    np.testing.assert_allclose(i[layer["bias_scale"]], s_in * s, rtol=1e-6)
    np.testing.assert_array_equal(i[layer["bias_q"]], np.rint(f["b2"].astype(np.float64) / (s_in * s.astype(np.float64))).astype(np.int32))
    assert layer["float_weight"] == "w2" and layer["input_dq"] == "r1_dequantized"


def test_activation_params_math():
    rules = get_target("ort")
    p = activation_params(-1.0, 3.0, 8, rules, symmetric=False, power_of_two=False)
    assert p.scale == pytest.approx(4 / 255) and p.zero_point == round(1 / (4 / 255)) and not p.signed
    p = activation_params(0.5, 3.0, 8, rules, symmetric=False, power_of_two=False)   # widened to contain 0
    assert p.zero_point == 0 and p.scale == pytest.approx(3 / 255)
    trt = get_target("tensorrt")
    p = activation_params(-2.0, 1.0, 8, trt, symmetric=True, power_of_two=False)
    assert p.scale == pytest.approx(2 / 127) and p.zero_point == 0 and p.signed
    p = activation_params(0.0, 6.0, 8, get_target("tidl-tda4vm"), symmetric=True, power_of_two=True)
    assert p.scale == 2.0 ** np.ceil(np.log2(6 / 255)) and not p.signed and p.zero_point == 0
    p = activation_params(0.0, 0.0, 8, trt, symmetric=True, power_of_two=False)      # dead tensor: valid scale
    assert p.scale > 0


def test_zero_weight_channel_gets_valid_scale():
    w = rand(3, 2, 3, 3)
    w[1] = 0
    s = weight_scales(w, 0, 8, False)
    assert np.all(s > 0) and s[1] == 1.0
    assert not quantize_weight(w, s, 0, 8)[1].any()


@pytest.mark.parametrize("target", TARGETS)
def test_numerics_close_to_float_and_checker_clean(target):
    m = residual()
    feeds = feeds_for(m, 8)
    q, rec = quantize(m, feeds, target=target)
    assert qcheck.check_model(q, target) == [], qcheck.check_model(q, target)
    for f in feeds[:3]:
        ref, got = run(m, f)["y"], run(q, f)["y"]
        rel = np.abs(ref - got).max() / np.abs(ref).max()
        # 8-bit per-tensor activations over 3 quantized layers: a few quantization steps of error;
        # power-of-two scales (tda4vm) are up to 2x coarser.
        assert rel < (0.08 if target == "tidl-tda4vm" else 0.04), (target, rel)


def test_tda4vm_power_of_two_per_tensor():
    q, rec = quantize(conv_relu_conv(), target="tidl-tda4vm")
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s = inits(q)[n.input[1]]
            assert np.all(np.frexp(s)[0] == 0.5)
            if inits(q).get(n.input[0]) is not None and inits(q)[n.input[0]].dtype == np.int8:
                assert s.size == 1                          # per-tensor weights
    assert q.opset_import[0].version == 17


# ------------------------------------------------------------------------------ opset / shapes
def test_opset_conversion():
    m = conv_relu_conv(opset=11)
    q, rec = quantize(m, target="tensorrt")
    assert q.opset_import[0].version == 13 and "opset 11 -> 13" in rec.extra["notes"]
    q, rec = quantize(m, target="tidl")
    assert q.opset_import[0].version == 17
    q, _ = quantize(conv_relu_conv(opset=18), target="ort")
    assert q.opset_import[0].version == 18               # ort keeps a newer opset


def test_tidl_refuses_dynamic_shapes_unless_given():
    nodes = [conv_node("conv1", "x", "w1", None, "y")]
    m = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])], [("w1", rand(4, 3, 1, 1))])
    feeds = feeds_for(m, 3)
    with pytest.raises(OnnxoptError, match="static shapes"):
        quantize(m, feeds, target="tidl")
    q, _ = quantize(m, feeds, target="tidl", ctx_kwargs={"input_shapes": {"x": [1, 3, 8, 8]}})
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert qcheck.check_model(q, "tidl") == []
    q, _ = quantize(m, feeds, target="tensorrt")          # tensorrt takes dynamic batch
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def half_precision_model():
    """A float16 export's shapes: float16 weights, a float16 Constant, a Cast to float16, an If whose
    branches read the graph input from the outer scope, float16 inputs and outputs."""
    f16 = TensorProto.FLOAT16

    def half(name, *shape, seed, scale=0.3):
        return numpy_helper.from_array(rand(*shape, seed=seed, scale=scale).astype(np.float16), name)

    pooled = [1, 3, 1, 1]
    then_g = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", f16, pooled)])
    else_g = helper.make_graph([helper.make_node("GlobalMaxPool", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", f16, pooled)])
    nodes = [conv_node("conv1", "x", "w1", "b1", "c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.array(0.5, np.float16))),
             helper.make_node("Mul", ["r1", "k"], ["m1"], name="mul"),
             helper.make_node("Cast", ["m1"], ["h1"], name="cast", to=f16),
             conv_node("conv2", "h1", "w2", "b2", "c2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], name="fc", transB=1),
             helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", keepdims=0),
             helper.make_node("Greater", ["mean", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["pool"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [half("w1", 8, 3, 3, 3, seed=1), half("b1", 8, seed=2, scale=0.1), half("w2", 6, 8, 3, 3, seed=3),
             half("b2", 6, seed=4, scale=0.1), half("wg", 5, 6, seed=5), half("bg", 5, seed=6, scale=0.1),
             numpy_helper.from_array(np.array(0, np.float16), "zero")]
    return make_model(nodes, [("x", [1, 3, 8, 8], f16)], [("y", [1, 5], f16), ("pool", pooled, f16)], inits)


def test_float32_twin_of_a_float16_model_keeps_its_interface_and_outputs():
    from onnxopt.quant.upcast import float32_twin
    m = half_precision_model()
    twin, done = float32_twin(m)
    onnx.checker.check_model(twin, full_check=True)
    assert (done.weights, done.casts, done.boundary) == (8, 1, 3)   # 7 initializers + the Constant; x, y, pool
    assert [v.type.tensor_type.elem_type for v in (*twin.graph.input, *twin.graph.output)] == [TensorProto.FLOAT16] * 3
    assert all(t.data_type == TensorProto.FLOAT for t in twin.graph.initializer)
    assert [n.op_type for n in twin.graph.node].count("Cast") == 4   # the model's own, now to float32, and 3 at the edges
    for seed in (0, 1):   # both If branches: the input's mean is positive on one seed, negative on the other
        feed = {"x": (rand(1, 3, 8, 8, seed=seed) + (0.5 if seed else -0.5)).astype(np.float16)}
        ref, got = run(m, feed), run(twin, feed)
        for name in ("y", "pool"):
            assert got[name].dtype == np.float16
            np.testing.assert_allclose(got[name].astype(np.float32), ref[name].astype(np.float32), rtol=4e-3, atol=4e-3)
    assert float32_twin(conv_relu_conv())[1] is None            # a float32 model is not touched
    listed = half_precision_model()   # an initializer also listed as a graph input (IR < 4 exports): widened with it
    listed.graph.input.append(helper.make_tensor_value_info("zero", TensorProto.FLOAT16, []))
    onnx.checker.check_model(float32_twin(listed)[0], full_check=True)


@pytest.mark.parametrize("target", ["ort", "tensorrt", "tidl"])
def test_float16_model_is_quantized_as_its_float32_twin(target):
    """QuantizeLinear on float16 needs opset 19 and onnxruntime fuses only float32 Q/DQ: the pass
    quantizes the float32 twin (before, onnxruntime refused the pass's own output) and keeps the
    float16 interface."""
    m = half_precision_model()
    feeds = [{"x": (rand(1, 3, 8, 8, seed=s)).astype(np.float16)} for s in range(8)]
    q, rec = quantize(m, feeds, target=target, fallback="none")   # every layer quantized: a random model's
    onnx.checker.check_model(q, full_check=True)                    # top-1 is too fragile for the budget
    assert qcheck.failing(qcheck.check_model(q, target)) == []
    assert rec.changes["weights_quantized"] == 3 and rec.extra["widened"]["weights"] == 8
    assert any("float16/bfloat16 model is quantized as its float32 twin" in w for w in rec.extra["warnings"])
    assert [v.type.tensor_type.elem_type for v in (*q.graph.input, *q.graph.output)] == [TensorProto.FLOAT16] * 3
    for feed in feeds[:2]:
        ref, got = run(m, feed), run(q, feed)
        y, yq = ref["y"].astype(np.float32), got["y"].astype(np.float32)
        assert np.linalg.norm(yq - y) <= 0.05 * np.linalg.norm(y)    # int8 noise, not a broken model


# ------------------------------------------------------------------------------ options
def test_exclusions_by_name_type_regex_and_keep_first_last():
    m = concat_pool()
    q, rec = quantize(m, target="tensorrt", exclude_nodes=["conv_c"])
    assert input_producer(q, "conv_c", 1) is None        # float weight initializer
    assert "conv_c" in rec.extra["excluded"]
    q, _ = quantize(m, target="tensorrt", exclude_op_types=["Gemm"])
    assert input_producer(q, "fc", 1) is None
    q, _ = quantize(m, target="tensorrt", exclude_regex="^conv_[ab]$")
    assert input_producer(q, "conv_a", 1) is None and input_producer(q, "conv_b", 1) is None
    assert input_producer(q, "conv_c", 1).op_type == "DequantizeLinear"
    q, rec = quantize(m, target="ort", keep_first_last=True)
    assert set(rec.extra["excluded"]) == {"conv_a", "conv_b", "fc"}
    assert input_producer(q, "conv_a", 0) is None        # the first layers read the float input
    assert input_producer(q, "conv_c", 1).op_type == "DequantizeLinear"
    with pytest.raises(OptionError):
        quantize(m, target="tensorrt", exclude_regex="(")
    _, rec = quantize(m, target="tensorrt", exclude_nodes=["nope"])
    assert any("nope" in s for s in rec.skipped)


def test_op_types_filter():
    q, _ = quantize(matmul_model(), target="tensorrt", op_types=["MatMul"])
    assert input_producer(q, "gemm", 1) is None
    assert input_producer(q, "matmul", 1).op_type == "DequantizeLinear"


def test_first_and_last_layers_at_their_own_weight_bits():
    m = concat_pool()     # conv_a and conv_b read the input (first), fc is last, conv_c in between
    q, rec = quantize(m, target="tensorrt", weight_bits=4, first_last_weight_bits=8)
    info = rec.extra["info"]
    assert info["weight_bits_by_layer"] == {"conv_a": 8, "conv_b": 8, "fc": 8}
    for l in info["layers"]:
        w = inits(q)[l["weight_q"]]
        qmax = 127 if l["node"] in ("conv_a", "conv_b", "fc") else 7
        assert (l["qmin"], l["qmax"]) == (-qmax, qmax) and np.abs(w).max() == qmax   # per-channel minmax reaches the edge
    assert qcheck.check_model(q, "tensorrt") == []
    q, rec = quantize(m, target="ort", weight_bits=4, first_last_weight_bits=8, low_bit="int4")
    int4 = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    assert {l["node"] for l in rec.extra["info"]["layers"] if l["weight_q"] in int4} == {"conv_c"}
    run(q, feeds_for(m, 1)[0])
    _, rec = quantize(m, target="tensorrt", weight_bits=4, first_last_weight_bits=8, keep_first_last=True)
    assert rec.extra["info"]["weight_bits_by_layer"] == {}   # first/last stay float; conv_c keeps 4 bits
    with pytest.raises(OptionError):
        quantize(m, target="tensorrt", weight_bits=4, first_last_weight_bits=9)


def test_four_bit_relu_activations_unsigned_on_int8_target():
    """Below 8 bits a ReLU output takes [0, 15] (int8, zero point 0), not [-7, 7]: the symmetric
    range would leave the negative half of its 15 levels unused."""
    m = conv_relu_conv()
    f = feeds_for(m, 1)[0]
    errs = {}
    for unsigned in (True, False):
        q, rec = quantize(m, target="tensorrt", weight_bits=8, activation_bits=4, act_unsigned_low_bit=unsigned)
        acts = {a["tensor"]: a for a in rec.extra["info"]["activations"]}
        clip = {n.input[0]: (float(inits(q)[n.input[1]]), float(inits(q)[n.input[2]])) for n in q.graph.node if n.op_type == "Clip"}
        s = acts["r1"]["scale_value"]
        assert acts["r1"]["zero_point_value"] == 0 and acts["r1"]["dtype"] == "int8"
        assert clip["r1"] == pytest.approx((0.0, 15 * s) if unsigned else (-7 * s, 7 * s), rel=1e-6)
        assert clip["x"] == pytest.approx((-7 * acts["x"]["scale_value"], 7 * acts["x"]["scale_value"]), rel=1e-6)  # signed input
        assert qcheck.check_model(q, "tensorrt") == []
        errs[unsigned] = np.abs(run(q, f)["y"] - run(m, f)["y"]).max()
    assert errs[True] < errs[False]


def test_four_bit_restricted_range_and_int4():
    m = conv_relu_conv()
    q, rec = quantize(m, target="tensorrt", weight_bits=4, activation_bits=4)
    for l in rec.extra["info"]["layers"]:
        w = inits(q)[l["weight_q"]]
        assert w.dtype == np.int8 and w.min() >= -7 and w.max() <= 7 and (l["qmin"], l["qmax"]) == (-7, 7)
    clips = [n for n in q.graph.node if n.op_type == "Clip" and n.name.endswith("_Clip")]
    assert len(clips) == len(quantized_tensors(q))       # 4-bit activations: range enforced before Q
    assert qcheck.check_model(q, "tensorrt") == []
    f = feeds_for(m, 1)[0]
    rel = np.abs(run(q, f)["y"] - run(m, f)["y"]).max() / np.abs(run(m, f)["y"]).max()
    assert rel < 0.6                                      # 4-bit: coarse but sane
    q, _ = quantize(m, target="ort", weight_bits=4, low_bit="int4")
    assert q.opset_import[0].version == 21
    types = {t.data_type for t in q.graph.initializer}
    assert onnx.TensorProto.INT4 in types
    run(q, f)
    with pytest.raises(OptionError):
        quantize(m, target="tidl", weight_bits=4, low_bit="int4")
    with pytest.raises(OptionError):
        quantize(m, target="tensorrt", weight_bits=9)
    with pytest.raises(OptionError):
        quantize(m, target="tensorrt", symmetric="false")


def test_constant_node_and_shared_weights():
    w = rand(4, 4, 1, 1, seed=3)
    nodes = [helper.make_node("Constant", [], ["wc"], name="const", value=numpy_helper.from_array(w, "wc")),
             conv_node("conv1", "x", "wc", None, "c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             conv_node("conv2", "r1", "wc", None, "y")]
    m = make_model(nodes, [("x", [1, 4, 4, 4])], [("y", [1, 4, 4, 4])])
    q, rec = quantize(m, target="tensorrt")
    d1, d2 = input_producer(q, "conv1", 1), input_producer(q, "conv2", 1)
    assert d1.op_type == "DequantizeLinear" and d1.name == d2.name   # one quantized copy of the shared weight
    assert not any(n.op_type == "Constant" for n in q.graph.node)
    names = [n.name for n in q.graph.node]
    assert len(names) == len(set(names)) and all(names)


def test_unnamed_and_duplicate_nodes_get_unique_names():
    m = conv_relu_conv()
    for n in m.graph.node:
        n.name = "" if n.op_type == "Relu" else "dup"
    q, rec = quantize(m, target="ort")
    names = [n.name for n in q.graph.node]
    assert len(names) == len(set(names)) and all(names)
    assert len({l["node"] for l in rec.extra["info"]["layers"]}) == 2


def test_missing_data_is_an_error_and_random_warns():
    m = conv_relu_conv()
    with pytest.raises(DataError, match="calibration data"):
        manager.apply(m, "qdq", context=PassContext(progress=False))
    from onnxopt.data import open_data
    spec = DataSpec("random")
    ds = open_data(spec, m)
    logs = []
    ctx = PassContext(data=ds, data_spec=spec, progress=False, log=logs.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, report = manager.apply(m, "qdq", {"qdq": {"calib_method": "minmax"}}, context=ctx, summarize_layers=False)
    assert any("RANDOM" in str(w.message) for w in caught)
    assert any("RANDOM" in s for s in logs)
    assert report.passes[0].extra["warnings"]


def test_recovery_options_declared():
    # automatic mixed precision (1 point of top-1 agreement) and the checked analytical bias
    # correction are on by default; the learned rounding is off
    opts = {o.name: o.default for o in get_pass("qdq").options}
    assert opts["bias_correction"] == "analytical" and opts["fallback"] == "auto" and opts["max_error"] == 0.0
    assert opts["max_agreement_loss"] == 1.0
    assert opts["fallback_precision"] == "auto" and opts["rounding"] == "nearest" and opts["adaround_iters"] == 500


def test_info_layout_matches_contract():
    q, rec = quantize(concat_pool(), target="tidl")
    info = rec.extra["info"]
    keys = {"node", "op", "weight_q", "weight_scale", "weight_zero_point", "axis", "qmin", "qmax", "bias", "bias_is_int",
            "bias_scale", "input_dq", "float_weight"}
    node_names = {n.name for n in q.graph.node}
    for l in info["layers"]:
        assert keys <= set(l)
        assert l["node"] in node_names
    for a in info["activations"]:
        assert {"tensor", "scale", "zero_point", "q_node", "dq_node"} <= set(a)
        assert a["q_node"] in node_names and a["dq_node"] in node_names
    import json
    json.dumps(info)


# ------------------------------------------------------------------------------ real model
@pytest.mark.shared
def test_real_efficientnet_all_targets(shared):
    from onnxopt import model_io
    from onnxopt.data import open_data
    path = shared("models", "efficientnet_lite0.onnx")
    shared("data", "imagenet")
    m = model_io.load_model(path)
    ds = open_data(str(path.parent.parent / "data" / "imagenet"), m, image=dict(size=256, crop=224, mean=[127.0], std=[128.0]),
                   max_samples=4)
    feeds = list(ds.samples())
    for target in ("tensorrt", "ort"):
        q, rec = quantize(m, feeds, target=target)
        assert qcheck.check_model(q, target) == []
        ref, got = run(m, feeds[0]), run(q, feeds[0])
        name = m.graph.output[0].name
        assert np.argmax(ref[name]) == np.argmax(got[name])


def test_calibration_cache_and_trt_table_are_routed(tmp_path):
    m = conv_relu_conv()
    feeds = feeds_for(m, 4)
    cache, table = tmp_path / "calib.json", tmp_path / "calib.table"
    logged = []
    q1, rec1 = quantize(m, feeds, ctx_kwargs={"log": logged.append}, target="tensorrt", calib_cache=str(cache), trt_calib_table=str(table))
    assert cache.is_file() and table.is_file()
    assert "x" in table.read_text() and "r1" in table.read_text()
    # the cache does not depend on placement options: an exclusion reuses it and gives the same scales
    q2, rec2 = quantize(m, feeds, ctx_kwargs={"log": logged.append}, target="tensorrt", calib_cache=str(cache), exclude_nodes=["conv2"])
    assert [r.extra["info"]["calib_cache"]["state"] for r in (rec1, rec2)] == ["written", "reused"]
    assert [line for line in logged if line.startswith("calibration cache")] == [
        f"calibration cache '{cache}': written", f"calibration cache '{cache}': reused (model, data and settings match)"]
    s1 = {t.name: numpy_helper.to_array(t) for t in q1.graph.initializer if t.name == "x_scale"}
    s2 = {t.name: numpy_helper.to_array(t) for t in q2.graph.initializer if t.name == "x_scale"}
    assert s1 == s2 and s1


def test_calibration_cache_of_calib_auto_names_its_search(tmp_path):
    """calib_method=auto's ranges depend on its search: a cache written by one is refused by the other."""
    m = conv_relu_conv()
    feeds = feeds_for(m, 4)
    cache = tmp_path / "calib.json"
    quantize(m, feeds, target="tensorrt", fallback="none", calib_method="auto", calib_cache=str(cache))
    assert json.loads(cache.read_text())["settings"]["search"] == "uniform, by noise-to-signal"
    with pytest.raises(OnnxoptError, match=r"stale: .*search: 'uniform, by noise-to-signal' -> 'per_tensor, by noise-to-signal'"):
        quantize(m, feeds, target="tensorrt", fallback="none", calib_method="auto", calib_cache=str(cache), calib_search="per_tensor")


def test_calib_samples_limits_data():
    m = conv_relu_conv()
    seen = []

    def data():
        for f in feeds_for(m, 10):
            seen.append(1)
            yield f

    ctx = PassContext(data=data, progress=False)
    manager.apply(m, "qdq", {"qdq": {"calib_method": "minmax", "calib_samples": 3}}, context=ctx, summarize_layers=False)
    assert len(seen) <= 4
    with pytest.raises(OptionError, match="calib_samples must be 0 .all. or a positive count, got -3"):
        manager.apply(m, "qdq", {"qdq": {"calib_samples": -3}}, context=ctx, summarize_layers=False)


def test_ort_warns_when_batchnorm_is_not_folded():
    nodes = [conv_node("conv1", "x", "w1", "b1", "c1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu1")]
    inits = [("w1", rand(8, 3, 3, 3, seed=1)), ("b1", rand(8, seed=2)), ("g", rand(8, seed=3) + 2), ("beta", rand(8, seed=4)),
             ("mu", rand(8, seed=5)), ("var", np.abs(rand(8, seed=6)) + 0.5)]
    m = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])], inits)
    _, rec = quantize(m, target="ort")
    assert any("1 BatchNormalization" in w and "bnfuse" in w for w in rec.extra["warnings"])
    _, rec = quantize(m, target="tensorrt")          # TensorRT folds BN itself
    assert not rec.extra["warnings"]
    folded, _ = manager.apply(m, "bnfuse", summarize_layers=False)
    _, rec = quantize(folded, target="ort")
    assert not [w for w in rec.extra["warnings"] if "BatchNormalization" in w]  # (the CPU's saturation note may remain)



# ------------------------------------------------------------------------------ clip bounds lite removed
def conv_relu6_conv(how="inputs"):
    """x -> Conv -> ReLU6 -> Conv, with pre-activations well above 6 (so the clip matters)."""
    from lite_models import GraphBuilder
    b = GraphBuilder(17, seed=3)
    y = b.conv("x", 3, 8, 3)
    r = b.relu6(b.op("Mul", [y, b.const(8.0)]), how)
    out = b.conv(r, 8, 4, 3)
    return b.model([("x", [1, 3, 8, 8])], [(out, [1, 4, 8, 8])]), r


def activation_scale(qmodel, tensor):
    q = next(n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(inits(qmodel)[q.input[1]])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("how", ["inputs", "minmax"])
def test_lite_relu6_bound_makes_the_quantized_lite_model_the_quantized_original(target, how):
    """ReLU6 -> ReLU, then qdq: the activation's range ends at 6, so the Q/DQ clips where the ReLU6
    did and the quantized lite model computes what the quantized original does."""
    from onnxopt import model_io
    from onnxopt.passes.lite import options_with, run_lite
    original, r = conv_relu6_conv(how)
    lite = run_lite(original, options_with(verify=False)).model
    assert model_io.activation_bounds(lite) == {r: (0.0, 6.0)}
    feeds = feeds_for(original, n=8)
    q_orig, _ = quantize(original, feeds, target=target)
    q_lite, rec = quantize(lite, feeds, target=target)
    q_free, _ = quantize(lite, feeds, target=target, clip_bounds=False)
    assert rec.extra["info"]["clip_bounds"] == [r]
    if target != "tidl-tda4vm":   # (power-of-two scales round the range up: the Q clips at 8, not 6)
        assert activation_scale(q_lite, r) == pytest.approx(activation_scale(q_orig, r), rel=1e-6)
    assert activation_scale(q_free, r) > 2 * activation_scale(q_lite, r)     # unbounded ReLU: a much coarser grid
    y = original.graph.output[0].name
    for f in feeds:
        want = run(q_orig, f)[y]
        err, err_free = (float(np.abs(run(m, f)[y] - want).max()) for m in (q_lite, q_free))
        if target == "tidl-tda4vm":
            assert err < 0.5 * err_free
        else:
            assert err <= 1e-5 * np.abs(want).max()
        assert err_free > 0.1 * np.abs(want).max()
    assert rec.extra["check"]["violations"] == 0


def test_clip_bounds_cap_every_method_and_the_trt_table(tmp_path):
    from onnxopt import model_io
    from onnxopt.quant.trt_table import read_trt_calibration_table
    model = conv_relu_conv()
    model_io.record_activation_bounds(model, {"r1": (0.0, 0.05), "gone": (0.0, 1.0)})
    feeds = feeds_for(model)
    for method in ("minmax", "percentile", "entropy", "mse"):
        table = tmp_path / f"{method}.cache"
        q, rec = quantize(model, feeds, target="tensorrt", calib_method=method, trt_calib_table=str(table))
        assert rec.extra["info"]["clip_bounds"] == ["r1"]
        assert 0.02 / 127 < activation_scale(q, "r1") <= 0.05 / 127 * (1 + 1e-6)
        assert read_trt_calibration_table(table)["r1"] <= 0.05 * (1 + 1e-3)
        assert [n.op_type for n in q.graph.node].count("Clip") == 0      # the Q/DQ does the clipping
    q, _ = quantize(model, feeds, target="tensorrt")
    assert activation_scale(q, "r1") == pytest.approx(0.05 / 127)


def test_equalize_drops_the_bounds_of_tensors_it_rescales():
    from onnxopt import model_io
    model = conv_relu_conv()
    model_io.record_activation_bounds(model, {"r1": (0.0, 6.0), "x": (-1.0, 1.0)})
    out, report = manager.apply(model, "equalize", context=PassContext(progress=False))
    assert model_io.activation_bounds(out) == {"x": (-1.0, 1.0)}
    assert report.passes[0].extra["clip_bounds_dropped"] == ["r1"]


def test_recovery_references_the_bounded_float_model():
    """Sensitivity/recovery compare the Q/DQ model against its float reference: with the recorded
    clips put back, that reference is the original (ReLU6) model, not the unbounded lite one."""
    from onnxopt.passes.lite import options_with, run_lite
    from onnxopt.quant.view import QdqView
    original, r = conv_relu6_conv()
    lite = run_lite(original, options_with(verify=False)).model
    feeds = feeds_for(original, n=8)
    q, rec = quantize(lite, feeds, target="ort")
    y = original.graph.output[0].name
    ref = QdqView(lite, q, rec.extra["info"]).float_reference()
    for f in feeds:
        np.testing.assert_allclose(run(ref, f)[y], run(original, f)[y], rtol=1e-6, atol=1e-6)
    q_bc, rec_bc = quantize(lite, feeds, target="ort", bias_correction="empirical")
    err = lambda m: max(float(np.abs(run(m, f)[y] - run(original, f)[y]).max()) for f in feeds)  # noqa: E731
    assert err(q_bc) <= err(q) * 1.01    # corrected towards the original, never away from it


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_already_quantized_model_is_left_as_it_is(target):
    """A QDQ model (a QAT export, or qdq's own output) whose encoding passes the target's check
    would get a second quantization stacked on the first: the pass leaves it unchanged and says
    why. (One the target's check fails is quantized again: tests/test_dequantize.py.)"""
    from onnxopt.quant.quantize import quantize_model
    q, _ = quantize(conv_relu_conv(), target=target)
    q2, rec = quantize(q, target=target)
    assert q2.graph == q.graph and not any(rec.changes.values())
    assert any("already quantized" in s and "QuantizeLinear" in s and f"passes `onnxopt check --target {target}`" in s
               and "left unchanged" in s for s in rec.skipped)
    with pytest.raises(OnnxoptError, match="already quantized"):  # what sensitivity calls
        quantize_model(q, get_pass("qdq").resolve({"target": target}), lambda: iter(feeds_for(q)), None)


def test_integer_kernel_model_counts_as_quantized():
    x = np.zeros((1, 3, 8, 8), np.uint8)
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="ci")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, list(x.shape))],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 4, 6, 6])],
                          [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, rec = quantize(m, feeds=[{"x": x}], target="ort")
    assert q.graph == m.graph and any("1 ConvInteger" in s for s in rec.skipped)


def test_nothing_quantized_says_why():
    m = conv_relu_conv()
    q, rec = quantize(m, target="ort", exclude_op_types=["Conv"])
    assert not rec.changes["weights_quantized"] and any("every quantizable node is kept in float" in s for s in rec.skipped)
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    plain = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])], [])
    q, rec = quantize(plain, target="tensorrt")
    assert q.graph.node[0].op_type == "Relu" and len(q.graph.node) == 1
    assert any(s.startswith("nothing quantized: the model has no Conv") for s in rec.skipped), rec.skipped


def test_tidl_static_batch_splits_larger_calibration_batches(tmp_path):
    """tidl makes a dynamic-batch model static at --input-shape's batch 1, while --batch-size 4
    asked the data for batches of 4: they are split for calibration and recovery (onnxruntime
    refused the batch-4 feeds on the static model)."""
    from onnxopt.data import open_data

    m = conv_relu_conv(batch="N")
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    shapes = {m.graph.input[0].name: [1, 3, 8, 8]}
    src = open_data(str(tmp_path / "x.npy"), m, shapes, batch_size=4)
    assert next(iter(src.batches()))[m.graph.input[0].name].shape[0] == 4
    q, report = manager.apply(m, "qdq", {"qdq": {"target": "tidl", "calib_method": "minmax", "bias_correction": "empirical"}},
                              context=PassContext(data=src, input_shapes=shapes, progress=False), summarize_layers=False)
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert qcheck.check_model(q, "tidl") == []


def test_own_check_violations_are_warned_not_only_recorded(monkeypatch):
    """A quantized model that fails its own target's check is said on the console (the run's log
    and a warning), besides extra["check"]."""
    import onnxopt.passes.qdq as qdq_pass

    q, rec = quantize(concat_pool(), target="tensorrt")
    assert rec.extra["check"]["violations"] == 0 and not any("fails `onnxopt check" in w for w in rec.extra["warnings"])
    planted = qcheck.Violation("weight-dq", "conv_a", "planted violation")
    monkeypatch.setattr(qdq_pass.qcheck, "check_model", lambda model, target: [planted, planted])
    logs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, rec = quantize(concat_pool(), target="tensorrt", ctx_kwargs={"log": logs.append})
    words = "fails `onnxopt check --target tensorrt`: 2 violation(s), first [weight-dq] conv_a: planted violation"
    assert any(words in s for s in logs) and any(words in str(w.message) for w in caught)
    assert any(words in w for w in rec.extra["warnings"]) and rec.extra["check"]["violations"] == 2


def test_tidl_rewrites_the_float_graph_before_quantizing_and_says_so():
    """qdq --target tidl: a ReduceMean head (TIDL takes no ReduceMean alone) becomes a
    GlobalAveragePool before Q/DQ placement and the output passes even `check --strict`; with
    target_rewrites=false the ReduceMean stays, and runs on ARM: counted in extra["check"]["fallback"],
    not a failure (unless strict_check)."""
    nodes = [conv_node("conv_a", "x", "wa", "ba", "ca"), helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
             helper.make_node("ReduceMean", ["ra"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 5])],
                       [("wa", rand(4, 3, 1, 1, seed=1)), ("ba", rand(4, seed=2)), ("wg", rand(5, 4, seed=7)), ("bg", rand(5, seed=8))])
    q, rec = quantize(model, target="tidl", fallback="none")
    assert "ReduceMean" not in {n.op_type for n in q.graph.node} and "GlobalAveragePool" in {n.op_type for n in q.graph.node}
    assert qcheck.check_model(q, "tidl") == [] and rec.extra["check"]["fallback"] is None
    assert any("rewritten for tidl before quantization" in w and "ReduceMean x1" in w for w in rec.extra["warnings"])
    q, rec = quantize(model, target="tidl", fallback="none", target_rewrites=False)
    assert "ReduceMean" in {n.op_type for n in q.graph.node}
    assert rec.extra["check"]["violations"] == 0 and rec.extra["check"]["fallback"]["op_types"] == {"ReduceMean": 1}
    q, rec = quantize(model, target="tidl", fallback="none", target_rewrites=False, strict_check=True)
    assert rec.extra["check"]["violations"] == 1 and rec.extra["check"]["first"][0]["rule"] == "tidl-reducemean"


def _detector_head():
    """conv -> relu -> {box conv, score conv -> Sigmoid} -> Concat -> Reshape -> output: a detector's
    tail, where a few confident scores are the answer and most are near 0."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    wb = (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    ws = (rng.standard_normal((6, 8, 1, 1)) * 0.3).astype(np.float32)
    bs = np.full(6, -4.0, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wb"], ["box"], name="box_conv"),
             helper.make_node("Conv", ["r1", "ws", "bs"], ["logit"], name="score_conv"),
             helper.make_node("Sigmoid", ["logit"], ["score"], name="sigmoid"),
             helper.make_node("Concat", ["box", "score"], ["cat"], axis=1, name="concat"),
             helper.make_node("Reshape", ["cat", "shape"], ["y"], name="reshape")]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 10, 256])],
                      [("w1", w1), ("wb", wb), ("ws", ws), ("bs", bs), ("shape", np.array([1, 10, 256], np.int64))])


def test_the_output_tail_keeps_its_full_range():
    """What reaches the graph outputs through data movement (and a terminal Sigmoid) only is not
    clipped by the calibration method: on YOLOX, entropy clipped the class scores at 0.24 and no
    detection was left."""
    import onnx_graphsurgeon as gs

    from onnxopt.quant import placement

    model = _detector_head()
    tail = placement.output_tail(gs.import_onnx(model))
    assert {"box", "logit", "score", "cat", "y"} <= tail and not {"c1", "r1", "x"} & tail
    feeds = [{"x": rand(1, 3, 16, 16, seed=s) * (3.0 if s % 16 == 0 else 1.0)} for s in range(64)]
    top = max(float(run(model, f)["y"][:, 4:].max()) for f in feeds)
    for method in ("entropy", "percentile", "mse"):
        ctx = PassContext(data=lambda: iter(feeds), progress=False)
        q, rep = manager.apply(model, ["qdq"], {"qdq": {"target": "ort", "calib_method": method, "fallback": "none"}},
                               context=ctx, verify=False, summarize_layers=False)
        got = max(float(run(q, f)["y"][:, 4:].max()) for f in feeds)
        assert got == pytest.approx(top, abs=2 / 255), method       # the top score is not clipped
        assert any("keep their full range" in n for n in rep.passes[-1].extra["notes"])


@pytest.mark.parametrize("target,ir,opset", [("ort", 3, 9), ("tensorrt", 3, 9), ("tidl", 3, 9), ("ort", 7, 13)])
def test_an_ir3_model_with_weights_listed_as_inputs_is_quantized_with_constant_weights(target, ir, opset):
    """Old exports (IR 3, opset 9: the ONNX model zoo's, onnx's own ``light`` models) list every
    initializer as a graph input. The fallback's float reference dropped unused weights but left
    them as inputs, which onnxruntime then required ("Required inputs ... are missing"), so qdq
    refused every such model; raised to opset 13+, the model also takes that opset's IR version,
    and its weights stop being inputs (onnxruntime neither folds nor fuses an overridable weight).
    A newer export with ``keep_initializers_as_inputs`` (IR 7: the weights are overridable inputs)
    gets its layer weights made constants by cleanup; qdq alone leaves those layers float and says
    how to fix it."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "b1": rng.standard_normal(8).astype(np.float32),
             "w2": rng.standard_normal((4, 8)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])] +
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inits.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    feeds = [{"x": rand(1, 3, 8, 8, seed=s)} for s in range(16)]
    if ir >= 4:
        logs = []
        alone, _ = manager.apply(model, "qdq", {"qdq": {"target": target}},
                                 context=PassContext(data=lambda: iter(feeds), progress=False, log=logs.append), summarize_layers=False)
        assert any("2 layer weight(s) are graph inputs" in line and "run cleanup first" in line for line in logs)
    out, report = manager.apply(model, "cleanup,qdq" if ir >= 4 else "qdq", {"qdq": {"target": target}},
                                context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version >= 7 and [i.name for i in out.graph.input] == ["x"]
    assert report.passes[-1].changes["weights_quantized"] == 2 and qcheck.check_model(out, target) == []
    np.testing.assert_allclose(run(out, feeds[0])["y"], run(model, feeds[0])["y"], atol=0.1 * np.abs(run(model, feeds[0])["y"]).max())
