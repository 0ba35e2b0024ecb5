"""onnxopt.quant.dequantize: the float graph an already-quantized model stands for, and qdq
re-quantizing such a model for a target its own encoding fails.

Oracles: folding a constant DequantizeLinear is exact (bit-identical to onnxruntime running the
DQ); removing activation Q/DQ pairs is checked against the quantized model with each pair
replaced by the clip to its range without the rounding (on the calibration samples, where the
ranges hold every value), and against the float model the test quantized (a measured bound);
dynamic quantization is checked on inputs DynamicQuantizeLinear represents exactly.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, rand, run
from onnxopt import model_io
from onnxopt.quant import check as qcheck
from onnxopt.quant.dequantize import DequantizeError, dequantize
from onnxopt.quant.view import quantized_ops
from test_cli import subprocess_cli
from test_qdq import conv_relu_conv, quantize

quantization = pytest.importorskip("onnxruntime.quantization")


def _max_rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ------------------------------------------------------------------- constant DequantizeLinear
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("wtype", [np.int8, np.uint8])
def test_weight_and_bias_folds_are_exact(per_channel, wtype):
    """Conv(x, DQ(w_q), DQ(b_int32)) -> Conv(x, w, b): bit-identical outputs (the fold computes
    what the operator computes), every quantization op gone, full checker."""
    rng = np.random.default_rng(0)
    lo, hi = np.iinfo(wtype).min, np.iinfo(wtype).max
    w_q = rng.integers(lo, hi + 1, (4, 3, 3, 3)).astype(wtype)
    shape = (4,) if per_channel else ()
    s_w = (rng.uniform(0.001, 0.05, shape)).astype(np.float32)
    zp = rng.integers(lo // 4 if lo else 100, hi // 4 if lo else 150, shape).astype(wtype)
    b_q, s_b = rng.integers(-5000, 5000, 4).astype(np.int32), np.full(shape or (), 0.0007, np.float32)
    axis = {"axis": 0} if per_channel else {}
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp"], ["w"], **axis),
             helper.make_node("DequantizeLinear", ["b_q", "s_b", "b_zp"], ["b"], **axis),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                   [("w_q", w_q), ("s_w", s_w), ("zp", zp), ("b_q", b_q), ("s_b", s_b), ("b_zp", np.zeros(shape, np.int32))])
    d = dequantize(m)
    onnx.checker.check_model(d.model, full_check=True)
    assert not quantized_ops(d.model) and d.weights == 2 and not d.activation_pairs
    x = {"x": rand(1, 3, 8, 8)}
    np.testing.assert_array_equal(run(d.model, x)["y"], run(m, x)["y"])


# ------------------------------------------------------------------------ onnxruntime QDQ
def _float_cnn():
    """Conv -> Relu -> Conv -> Clip(0, 6) -> Add(residual) -> GAP -> Gemm: ReLU/Clip are removed by
    onnxruntime's QDQ quantizer, whose Q ranges at 0 then clip in their place."""
    rng = np.random.default_rng(1)
    inits = [("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)), ("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
             ("w2", rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)), ("b2", rng.normal(0, 0.1, 8).astype(np.float32)),
             ("fc", rng.normal(0, 0.3, (5, 8)).astype(np.float32)), ("fcb", np.zeros(5, np.float32)),
             ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]), helper.make_node("Add", ["r1", "r2"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("logits", [1, 5])], inits, opset=17)


class _Reader:
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _quantized(tmp_path, float_model, feeds, fmt):
    src, out = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(float_model, src)
    quantization.quantize_static(str(src), str(out), _Reader(feeds), quant_format=fmt, per_channel=True,
                                 activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8)
    return model_io.load_model(out)


def _pairs_as_clips(q: onnx.ModelProto) -> onnx.ModelProto:
    """The oracle: ``q`` with every activation Q -> DQ pair replaced by the clip to the pair's
    range, without the rounding (the weights' DQs are kept and run by onnxruntime)."""
    consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    nodes, inits = [], list(q.graph.initializer)
    for n in q.graph.node:
        qn = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if n.op_type == "QuantizeLinear":
            continue
        if qn is None or qn.op_type != "QuantizeLinear":
            nodes.append(n)
            continue
        s, zp = float(consts[qn.input[1]]), consts[qn.input[2]]
        info = np.iinfo(zp.dtype)
        lo, hi = (info.min - int(zp)) * s, (info.max - int(zp)) * s
        inits += [numpy_helper.from_array(np.array(lo, np.float32), n.output[0] + "_lo"),
                  numpy_helper.from_array(np.array(hi, np.float32), n.output[0] + "_hi")]
        nodes.append(helper.make_node("Clip", [qn.input[0], n.output[0] + "_lo", n.output[0] + "_hi"], [n.output[0]]))
    g = helper.make_graph(nodes, "oracle", q.graph.input, q.graph.output, inits)
    return helper.make_model(g, opset_imports=q.opset_import, ir_version=q.ir_version)


def test_onnxruntime_qdq_model_is_its_float_graph(tmp_path):
    float_model = _float_cnn()
    feeds = [{"x": rand(1, 3, 16, 16, seed=s)} for s in range(4)]
    q = _quantized(tmp_path, float_model, feeds, quantization.QuantFormat.QDQ)
    assert not any(n.op_type in ("Relu", "Clip") for n in q.graph.node)  # onnxruntime let the Q ranges clip
    d = dequantize(q)
    onnx.checker.check_model(d.model, full_check=True)
    assert not quantized_ops(d.model) and d.source == "onnxruntime QDQ"
    assert d.activation_pairs == sum(n.op_type == "QuantizeLinear" for n in q.graph.node) and d.relus == 2
    oracle = _pairs_as_clips(q)
    for f in feeds:  # the calibration samples: every activation inside its range; the oracle's clip
        # at the top of the ReLU6's range is 255 * (6 / 255) in float32, not 6: measured 2.3e-5
        # (without the ReLU/ReLU6 put back: 5e-3)
        np.testing.assert_allclose(run(d.model, f)["logits"], run(oracle, f)["logits"], rtol=1e-4, atol=1e-4)
    # against the float model it came from: only the weights' quantization error is left
    # (measured 0.3-0.6 % of the largest logit; the quantized model itself: about 1 %)
    for f in feeds + [{"x": rand(1, 3, 16, 16, seed=9)}]:
        assert _max_rel(run(d.model, f)["logits"], run(float_model, f)["logits"]) < 0.02


def test_onnxruntime_qoperator_model(tmp_path):
    """QLinearConv / QLinearMatMul become Conv / MatMul with the float weights and bias; other
    QOperator ops are refused by name."""
    rng = np.random.default_rng(2)
    inits = [("w", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)), ("b", rng.normal(0, 0.1, 8).astype(np.float32)),
             ("m", rng.normal(0, 0.3, (16, 4)).astype(np.float32)), ("shape", np.array([1, 8, 16], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["rs"]), helper.make_node("MatMul", ["rs", "m"], ["y"])]
    float_model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 8, 4])], inits)
    feeds = [{"x": rand(1, 3, 4, 4, seed=s)} for s in range(4)]
    q = _quantized(tmp_path, float_model, feeds, quantization.QuantFormat.QOperator)
    assert {"QLinearConv", "QLinearMatMul"} <= set(quantized_ops(q))
    d = dequantize(q)
    onnx.checker.check_model(d.model, full_check=True)
    assert not quantized_ops(d.model) and d.kernels == 2 and d.source == "onnxruntime QOperator"
    for f in feeds:
        assert _max_rel(run(d.model, f)["y"], run(float_model, f)["y"]) < 0.02
    add = helper.make_node("QLinearAdd", ["a", "s", "z", "a", "s", "z", "s", "z"], ["o"], domain="com.microsoft")
    with pytest.raises(DequantizeError, match="does not dequantize QLinearAdd"):
        dequantize(helper.make_model(helper.make_graph(
            [add], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2])],
            [helper.make_tensor_value_info("o", TensorProto.UINT8, [2])],
            [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]))


# -------------------------------------------------------------------- onnxruntime dynamic
def test_onnxruntime_dynamic_model(tmp_path):
    """Embedding (weight-only Gather) -> MatMul -> Add -> Relu -> MatMul, through quantize_dynamic:
    DynamicQuantizeLinear + MatMulInteger + Cast/Mul chains back to MatMul. On activations
    DynamicQuantizeLinear represents exactly (a grid of 0.5 spanning 0..127.5) the float graph
    equals the quantized one to float rounding."""
    rng = np.random.default_rng(3)
    inits = [("emb", rng.normal(0, 1, (20, 16)).astype(np.float32)), ("w1", rng.normal(0, 0.3, (16, 12)).astype(np.float32)),
             ("b1", rng.normal(0, 0.1, 12).astype(np.float32)), ("w2", rng.normal(0, 0.3, (12, 3)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("MatMul", ["x", "w1"], ["z"])]
    float_model = make_model(nodes, [("tokens", [1, 6], TensorProto.INT64), ("x", [1, 16])], [("y", [1, 6, 3]), ("z", [1, 12])], inits)
    src, out = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(float_model, src)
    quantization.quantize_dynamic(str(src), str(out))
    q = model_io.load_model(out)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(quantized_ops(q))
    d = dequantize(q)
    onnx.checker.check_model(d.model, full_check=True)
    assert not quantized_ops(d.model) and d.kernels == 3 and d.source == "onnxruntime dynamic"
    x = (rng.integers(0, 256, (1, 16)) * 0.5).astype(np.float32)
    x[0, :2] = 0.0, 127.5
    f = {"tokens": rng.integers(0, 20, (1, 6)), "x": x}
    got, ref = run(d.model, f), run(q, f)
    np.testing.assert_allclose(got["z"], ref["z"], rtol=1e-5, atol=1e-4 * np.abs(ref["z"]).max())
    assert _max_rel(got["y"], run(float_model, f)["y"]) < 0.03  # the weights' quantization error, measured ~1 %
    # each weight got its own scale (read by name from the Mul of the scales): within half a step of the float one
    weights = {t.name: numpy_helper.to_array(t) for t in d.model.graph.initializer}
    for name, w in inits[:2]:
        step = float(numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == f"{name}_scale")))
        assert np.abs(weights[name] - w).max() <= step / 2 + 1e-6


def test_quantized_graph_input_is_refused():
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["xf"]), helper.make_node("Relu", ["xf"], ["y"])]
    m = make_model(nodes, [("x", [1, 4], TensorProto.UINT8)], [("y", [1, 4])],
                   [("s", np.array(0.1, np.float32)), ("zp", np.array(3, np.uint8))])
    with pytest.raises(DequantizeError, match="graph input 'x' takes quantized values"):
        dequantize(m)


# ------------------------------------------------------------------------------ the qdq pass
@pytest.mark.parametrize("source,target", [("ort", "tensorrt"), ("tensorrt", "ort"), ("tensorrt", "tidl")])
def test_qdq_requantizes_for_a_target_the_encoding_fails(source, target):
    """onnxopt's own model for one target, asked for another whose check it fails: quantized again
    from its dequantized weights; the output passes the target's check, the report says what."""
    float_model = conv_relu_conv()
    q, _ = quantize(float_model, target=source)
    assert qcheck.failing(qcheck.check_model(q, target))
    q2, rec = quantize(q, target=target)
    assert not qcheck.failing(qcheck.check_model(q2, target)) and rec.extra["check"]["violations"] == 0
    assert rec.changes["weights_quantized"] > 0 and rec.extra["requantized"]["input_violations"] > 0
    assert any(w.startswith("qdq: input was already quantized") and f"re-quantized for {target}" in w
               for w in rec.extra["warnings"])


def test_cli_requantizes_or_refuses(tmp_path):
    """The console line and exit 0 when re-quantized; a model that cannot be dequantized and fails
    the target's check: exit 1, one error line with the reason, no traceback."""
    feeds = [{"x": rand(1, 3, 16, 16, seed=s)} for s in range(4)]
    q = _quantized(tmp_path, _float_cnn(), feeds, quantization.QuantFormat.QDQ)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in feeds]))
    onnx.save(q, tmp_path / "q.onnx")
    proc = subprocess_cli("apply", "qdq", tmp_path / "q.onnx", "-o", tmp_path / "trt.onnx", "--target", "tensorrt",
                          "--calib-data", tmp_path / "calib.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "input was already quantized" in ln)
    assert "onnxruntime QDQ" in line and "fails tensorrt's check" in line and "re-quantized for tensorrt" in line
    assert not qcheck.failing(qcheck.check_model(onnx.load(tmp_path / "trt.onnx"), "tensorrt"))
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["xf"]), helper.make_node("Relu", ["xf"], ["y"])]
    bad = make_model(nodes, [("x", [1, 4], TensorProto.UINT8)], [("y", [1, 4])],
                     [("s", np.array(0.1, np.float32)), ("zp", np.array(3, np.uint8))])
    onnx.save(bad, tmp_path / "bad.onnx")
    proc = subprocess_cli("apply", "qdq", tmp_path / "bad.onnx", "-o", tmp_path / "bad.out.onnx", "--target", "tensorrt",
                          "--calib-data", "random", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not (tmp_path / "bad.out.onnx").exists()
    assert proc.stderr.count("error:") == 1 and "cannot be re-quantized: graph input 'x' takes quantized values" in proc.stderr
