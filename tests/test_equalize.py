"""equalize: cross-layer equalization and high-bias absorption (exact in float)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from helpers import assert_equivalent, make_model, op_count, rand, run as run_model
from onnxopt.errors import DataError
from onnxopt.registry import PassContext
import se_models


def _init(model, name):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[name]


def _weights_of(model, node_name):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    node = next(n for n in model.graph.node if n.name == node_name)
    return [inits.get(i, consts.get(i)) for i in node.input[1:]]


def _conv(name, x, w, b, y, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def _badly_scaled(rng, c_out, c_in, k=1, spread=3.0):
    w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
    return w * (10.0 ** rng.uniform(-spread / 2, spread / 2, (c_out, 1, 1, 1))).astype(np.float32)


def _equalize(model, **opts):
    return onnxopt.apply(model, "equalize", {"equalize": opts} if opts else None)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_relu_conv_balances_ranges_and_is_exact(opset, bias):
    rng = np.random.default_rng(0)
    w1, w2 = _badly_scaled(rng, 8, 3, 3), rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    inits = [("w1", w1), ("w2", w2)] + ([("b1", rand(8, seed=1)), ("b2", rand(4, seed=2))] if bias else [])
    nodes = [_conv("c1", "x", "w1", "b1" if bias else None, "y1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu"),
             _conv("c2", "r1", "w2", "b2" if bias else None, "out", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("x", [1, 3, 8, 8])], [("out", [1, 4, 8, 8])], inits, opset=opset)
    out, rep = _equalize(m)
    assert rep.passes[0].changes["pairs_equalized"] == 1
    assert rep.passes[0].verification["passed"]
    assert_equivalent(m, out, rtol=1e-4, atol=1e-5)
    nw1, *_ = _weights_of(out, "c1")
    nw2, *_ = _weights_of(out, "c2")
    r1 = np.abs(nw1).reshape(8, -1).max(1)
    r2 = np.abs(nw2).transpose(1, 0, 2, 3).reshape(8, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # the defining property of CLE
    before = np.abs(w1).reshape(8, -1).max(1)
    assert before.max() / before.min() > 30 and r1.max() / r1.min() < before.max() / before.min() / 5


def test_depthwise_triplet_converges():
    """conv -> relu -> depthwise -> relu -> conv: both pairs balanced after the sweeps."""
    rng = np.random.default_rng(1)
    w1 = _badly_scaled(rng, 16, 4)
    wdw = _badly_scaled(rng, 16, 1, 3)
    w3 = rng.standard_normal((8, 16, 1, 1)).astype(np.float32)
    nodes = [_conv("c1", "x", "w1", "b1", "y1"), helper.make_node("Relu", ["y1"], ["r1"]),
             _conv("dw", "r1", "wdw", "bdw", "y2", group=16, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y2"], ["r2"]),
             _conv("c3", "r2", "w3", "b3", "out")]
    m = make_model(nodes, [("x", [1, 4, 8, 8])], [("out", [1, 8, 8, 8])],
                   [("w1", w1), ("b1", rand(16, seed=3)), ("wdw", wdw), ("bdw", rand(16, seed=4)), ("w3", w3), ("b3", rand(8, seed=5))])
    out, rep = _equalize(m)
    rec = rep.passes[0]
    assert rec.changes["pairs_equalized"] == 2 and rec.extra["last_max_log_scale"] <= 1e-4 and rec.extra["sweeps"] > 1
    assert_equivalent(m, out, rtol=1e-4, atol=1e-5)
    a, _ = _weights_of(out, "c1")
    d, _ = _weights_of(out, "dw")
    c, _ = _weights_of(out, "c3")
    r_a, r_d = np.abs(a).reshape(16, -1).max(1), np.abs(d).reshape(16, -1).max(1)
    r_c = np.abs(c).transpose(1, 0, 2, 3).reshape(16, -1).max(1)
    # converged: W1 out == DW (as the consumer of c1) and DW out == W3 in, channel by channel
    np.testing.assert_allclose(r_a, r_d, rtol=1e-3)
    np.testing.assert_allclose(r_d, r_c, rtol=1e-3)


def test_weights_in_constant_nodes_and_shared_weight():
    """Weights given by Constant nodes, and a weight shared with a layer outside the pair."""
    rng = np.random.default_rng(2)
    w1, w2 = _badly_scaled(rng, 6, 3), rng.standard_normal((5, 6, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1v")),
             _conv("c1", "x", "w1", None, "y1"), helper.make_node("Relu", ["y1"], ["r1"]),
             _conv("c2", "r1", "w2", None, "out"),
             _conv("c_other", "x", "w1", None, "other")]  # shares w1, must keep the original
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("out", [1, 5, 4, 4]), ("other", [1, 6, 4, 4])], [("w2", w2)])
    out, rep = _equalize(m)
    assert rep.passes[0].changes["pairs_equalized"] == 1
    assert_equivalent(m, out, rtol=1e-4, atol=1e-5)
    assert np.array_equal(_weights_of(out, "c_other")[0], w1)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_relu_gemm(trans_b):
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((10, 6)) * 10.0 ** rng.uniform(-1.5, 1.5, (10, 1))).astype(np.float32)  # [out, in]
    w2 = rng.standard_normal((4, 10)).astype(np.float32)
    b1 = w1 if trans_b else w1.T.copy()
    b2 = w2 if trans_b else w2.T.copy()
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["y1"], name="g1", transB=trans_b, alpha=0.5),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "c2"], ["out"], name="g2", transB=trans_b)]
    m = make_model(nodes, [("x", [2, 6])], [("out", [2, 4])],
                   [("w1", b1), ("c1", rand(1, 10, seed=1)), ("w2", b2), ("c2", rand(4, seed=2))])
    out, rep = _equalize(m)
    assert rep.passes[0].changes["pairs_equalized"] == 1
    assert_equivalent(m, out, rtol=1e-4, atol=1e-5)


def test_squeeze_excite_branch_is_absorbed():
    """dw -> relu -> {GAP -> fc1 -> relu -> fc2 -> HardSigmoid} * x -> project: exact through the gate."""
    m = se_models.mobilenetv3_se(seed=3)
    out, rep = _equalize(m)
    rec = rep.passes[0]
    se_pairs = [d for d in rec.details if len(d["consumers"]) == 2]  # project + SE fc1
    assert se_pairs, rec.details
    assert_equivalent(m, out, se_models.image_like_inputs(3), rtol=1e-4, atol=1e-4)
    # HardSwish / Add / HardSigmoid stop pairs and are reported
    assert any("HardSwish" in s for s in rec.skipped) and any("Add" in s for s in rec.skipped)


@pytest.mark.parametrize("between", ["HardSwish", "Add", "Sigmoid", "output"])
def test_not_homogeneous_left_unchanged(between):
    rng = np.random.default_rng(4)
    w1, w2 = _badly_scaled(rng, 4, 3), rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [_conv("c1", "x", "w1", "b1", "y1")]
    outputs = [("out", [1, 2, 4, 4])]
    if between == "Add":
        nodes += [helper.make_node("Add", ["y1", "y1"], ["a"])]
    elif between == "output":
        nodes += [helper.make_node("Relu", ["y1"], ["a"])]
        outputs.append(("a", [1, 4, 4, 4]))
    else:
        nodes += [helper.make_node(between, ["y1"], ["a"])]
    nodes += [_conv("c2", "a", "w2", None, "out")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], outputs, [("w1", w1), ("b1", rand(4)), ("w2", w2)])
    out, rep = _equalize(m)
    assert rep.passes[0].changes["pairs_equalized"] == 0
    assert rep.passes[0].skipped
    assert np.array_equal(_weights_of(out, "c1")[0], w1)


def _relu6_model(rng, lo=0.0, hi=6.0):
    w1, w2 = _badly_scaled(rng, 6, 3, 3, spread=2), rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [_conv("c1", "x", "w1", "b1", "y1", pads=[1, 1, 1, 1]), helper.make_node("Clip", ["y1", "lo", "hi"], ["r1"], name="clip"),
             _conv("c2", "r1", "w2", "b2", "out")]
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("out", [1, 4, 6, 6])],
                      [("w1", w1 * 3), ("b1", rand(6, seed=1)), ("w2", w2), ("b2", rand(4, seed=2)),
                       ("lo", np.array(lo, np.float32)), ("hi", np.array(hi, np.float32))])


def test_relu6_skipped_by_default_split_exact():
    m = _relu6_model(np.random.default_rng(5))
    out, rep = _equalize(m)
    assert rep.passes[0].changes["pairs_equalized"] == 0 and "ReLU6" in rep.passes[0].skipped[0]
    out, rep = _equalize(m, clip="split")
    assert rep.passes[0].changes == {"pairs_equalized": 1, "clips_split": 1, "biases_absorbed": 0}
    assert op_count(out, "Clip") == 0 and op_count(out, "Min") == 1 and op_count(out, "Relu") == 1
    feeds = [{"x": rand(1, 3, 6, 6, seed=s, scale=4.0)} for s in range(3)]  # large inputs: the clip is active
    assert_equivalent(m, out, feeds, rtol=1e-4, atol=1e-5)
    # a Clip with a non-zero lower bound is never split
    out, rep = _equalize(_relu6_model(np.random.default_rng(5), lo=-1.0), clip="split")
    assert rep.passes[0].changes["pairs_equalized"] == 0


def test_high_bias_absorption_on_data():
    rng = np.random.default_rng(6)
    w1 = (0.5 * rng.standard_normal((6, 3, 1, 1))).astype(np.float32)
    b1 = np.array([10, 12, 9, 0.1, -3, 11], np.float32)  # large positive biases: channels always active
    w2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [_conv("c1", "x", "w1", "b1", "y1"), helper.make_node("Relu", ["y1"], ["r1"]), _conv("c2", "r1", "w2", None, "out")]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("out", [1, 4, 5, 5])], [("w1", w1), ("b1", b1), ("w2", w2)])
    feeds = [{"x": rand(1, 3, 5, 5, seed=s)} for s in range(8)]
    with pytest.raises(DataError):
        _equalize(m, absorb_bias="data")
    ctx = PassContext(data=lambda: iter(feeds))
    out, rep = onnxopt.apply(m, "equalize", {"equalize": {"absorb_bias": "data"}}, context=ctx)
    assert rep.passes[0].changes["biases_absorbed"] == 1 and rep.passes[0].verification["inputs"] == "data"
    assert_equivalent(m, out, feeds, rtol=1e-4, atol=1e-4)
    # the always-active channels now reach 0 on the data: their constant part moved into c2
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(helper.make_empty_tensor_value_info("y1"))
    orig = onnx.ModelProto()
    orig.CopyFrom(m)
    orig.graph.output.append(helper.make_empty_tensor_value_info("y1"))

    def minima(model):
        y = np.concatenate([run_model(model, f)["y1"] for f in feeds])
        return y.transpose(1, 0, 2, 3).reshape(6, -1).min(1)

    before, after = minima(orig), minima(probe)
    active = before > 0
    assert active.sum() >= 3
    np.testing.assert_allclose(after[active], 0.0, atol=1e-4)
    assert np.all(after[~active] < 0)  # channels that reach the ReLU's kink keep their bias
    assert len(next(n for n in out.graph.node if n.name == "c2").input) == 3  # c2 got a bias


def test_high_bias_absorption_skips_padded_consumer():
    rng = np.random.default_rng(7)
    nodes = [_conv("c1", "x", "w1", "b1", "y1"), helper.make_node("Relu", ["y1"], ["r1"]),
             _conv("c2", "r1", "w2", "b2", "out", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("out", [1, 4, 5, 5])],
                   [("w1", rng.standard_normal((6, 3, 1, 1)).astype(np.float32)), ("b1", np.full(6, 5, np.float32)),
                    ("w2", rng.standard_normal((4, 6, 3, 3)).astype(np.float32)), ("b2", rand(4))])
    feeds = [{"x": rand(1, 3, 5, 5, seed=s)} for s in range(4)]
    out, rep = onnxopt.apply(m, "equalize", {"equalize": {"absorb_bias": "data"}}, context=PassContext(data=lambda: iter(feeds)))
    assert rep.passes[0].changes["biases_absorbed"] == 0 and any("pads" in s for s in rep.passes[0].skipped)
    assert_equivalent(m, out, feeds, rtol=1e-4, atol=1e-5)


def test_se_network_per_tensor_recovers():
    """The issue's figure in small: W8A8 per-tensor collapses on badly scaled depthwise weights,
    equalize brings it back (toy labels: within 1 point of float; see tools/bench_recovery.py)."""
    m = se_models.mobilenetv3_se(bad_scale=3.0)
    feeds = se_models.image_like_inputs(400)
    calib, ev = feeds[:100], feeds[100:]
    out, _ = _equalize(m)
    q_plain, _ = se_models.reference_qdq(m, calib, per_channel=False)
    q_eq, _ = se_models.reference_qdq(out, calib, per_channel=False)
    plain, eq = se_models.top1_agreement(m, q_plain, ev), se_models.top1_agreement(m, q_eq, ev)
    assert plain < 0.5 < 0.9 < eq, (plain, eq)


@pytest.mark.shared
def test_efficientnet_lite0_split_is_exact(shared):
    path = shared("models", "efficientnet_lite0.onnx")
    m = onnx.load(str(path))
    out, rep = _equalize(m)
    rec = rep.passes[0]
    # only the linear project -> expand pairs qualify; every ReLU6 pair is skipped and reported
    assert rec.changes["pairs_equalized"] == 2 and sum("ReLU6" in s for s in rec.skipped) >= 30
    out, rep = _equalize(m, clip="split")
    rec = rep.passes[0]
    assert rec.changes["pairs_equalized"] >= 30 and rec.verification["passed"], rec.verification
