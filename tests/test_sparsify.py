"""The ``sparsify`` pass: N:M patterns hold exactly in every group, unstructured ratios are met."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import prune_models as pm
from helpers import make_model, rand, run
from onnxopt import runtime
from onnxopt.errors import OptionError
from onnxopt.manager import apply


def _sparsify(model, **opts):
    out, report = apply(model, "sparsify", options={"sparsify": dict(opts, eval_batches=1)})
    return out, report.passes[0]


def _weights(model):
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            w[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return w


def _layer_weights(model):
    w = _weights(model)
    return [(n, w[n.input[1]]) for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input[1] in w]


def _wide_model(opset=17):
    """Conv 64->8 (3x3), Gemm transB=0 [128, 10], MatMul [8, 64] and ConvTranspose 8->4."""
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "tw"], ["t"], strides=[2, 2]),
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Reshape", ["f", "shape"], ["f2"]),
        helper.make_node("Gemm", ["f2", "gw"], ["g"]),
        helper.make_node("MatMul", ["m_in", "mw"], ["m"]),
    ]
    inits = [("cw", rand(8, 64, 3, 3, seed=1)), ("cb", rand(8, seed=2)), ("tw", rand(8, 4, 2, 2, seed=3)),
             ("shape", np.array([-1, 128], np.int64)), ("gw", rand(128, 10, seed=4)), ("mw", rand(8, 64, seed=5))]
    return make_model(nodes, [("x", [1, 64, 2, 2]), ("m_in", [3, 8])], [("t", [1, 4, 4, 4]), ("g", [2, 10]), ("m", [3, 64])],
                      inits, opset=opset)


def _groups_along_input(node, w, m):
    in_axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}.get(node.op_type)
    if node.op_type == "Gemm":
        in_axis = 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
    moved = np.moveaxis(w, in_axis, -1)
    return moved.reshape(-1, m)


@pytest.mark.parametrize("builder", ["yolo_like", "mobilenet_like", "residual_const_nodes"])
def test_2_4_pattern_holds_in_every_group(builder):
    m = pm.BUILDERS[builder]()
    out, rec = _sparsify(m)
    assert rec.changes["layers_sparsified"] > 0
    done = {r["weight"] for r in rec.extra["layers"]}
    checked = 0
    for node, w in _layer_weights(out):
        if node.input[1] not in done:
            continue
        groups = _groups_along_input(node, w, 4)
        assert (np.count_nonzero(groups, axis=1) == 2).all()
        checked += 1
    assert checked == rec.changes["layers_sparsified"]
    if builder != "yolo_like":  # a 3-channel stem / depthwise convs cannot hold 2:4: skipped with the reason
        assert any("not a multiple of 4" in s for s in rec.skipped)
    onnx.checker.check_model(out, full_check=True)
    assert set(run(out, runtime.generate_inputs(m))) == set(run(m, runtime.generate_inputs(m)))
    if builder == "residual_const_nodes":  # the replaced Constant nodes are gone, not left dangling
        consts = lambda model: sum(n.op_type == "Constant" for n in model.graph.node)  # noqa: E731
        assert consts(out) == consts(m) - checked


def test_nm_keeps_the_largest_magnitudes():
    m = _wide_model()
    out, _ = _sparsify(m)
    before = dict((n.output[0], w) for n, w in _layer_weights(m))
    for node, w in _layer_weights(out):
        ref = _groups_along_input(node, before[node.output[0]], 4)
        got = _groups_along_input(node, w, 4)
        kept = np.sort(np.abs(ref), axis=1)[:, 2:]
        np.testing.assert_array_equal(np.sort(np.abs(got), axis=1)[:, 2:], kept)
        assert ((got == 0) | (got == ref)).all()


def test_ti_41_64_along_input_channels():
    m = _wide_model()
    out, rec = _sparsify(m, nm="41:64", nm_convention="prune")
    names = {r["layer"] for r in rec.extra["layers"]}
    assert names == {"c", "g"}  # Conv (64 inputs), Gemm (K 128); MatMul and ConvTranspose (K 8) are skipped
    for node, w in _layer_weights(out):
        if node.op_type in ("Conv", "Gemm"):
            assert (np.count_nonzero(_groups_along_input(node, w, 64), axis=1) == 23).all()
    assert any("group dimension 8 is not a multiple of 64" in s for s in rec.skipped)


def test_flat_layout_groups_each_filter():
    m = _wide_model()
    out, _ = _sparsify(m, nm="1:4", nm_layout="flat")
    conv_w = next(w for n, w in _layer_weights(out) if n.op_type == "Conv")
    assert (np.count_nonzero(conv_w.reshape(8, -1).reshape(8, -1, 4), axis=2) == 1).all()


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_unstructured_per_layer_reaches_the_ratio(ratio):
    m = _wide_model()
    out, rec = _sparsify(m, method="unstructured", ratio=ratio)
    for node, w in _layer_weights(out):
        assert np.count_nonzero(w == 0) == int(round(ratio * w.size))
    assert abs(rec.extra["sparsity"]["all_layer_weights"] - ratio) < 0.01


def test_unstructured_global_threshold():
    m = _wide_model()
    out, rec = _sparsify(m, method="unstructured", ratio=0.5, scope="global")
    after = {n.output[0]: w for n, w in _layer_weights(out)}
    before = {n.output[0]: w for n, w in _layer_weights(m)}
    total = sum(w.size for w in after.values())
    assert sum(np.count_nonzero(w == 0) for w in after.values()) == int(round(0.5 * total))
    # one threshold: every surviving magnitude is >= every zeroed original magnitude
    orig = np.concatenate([np.abs(before[k]).ravel() for k in sorted(before)])
    new = np.concatenate([after[k].ravel() for k in sorted(before)])
    assert np.abs(new[new != 0]).min() >= orig[new == 0].max()
    per_layer = {round(r["sparsity"], 2) for r in rec.extra["layers"]}
    assert len(per_layer) > 1


def test_shared_weight_sparsified_once_and_original_kept():
    m = pm.shared_weight()
    readers = [n.input[1] for n in m.graph.node if n.op_type == "Conv"]
    shared = next(w for w in readers if readers.count(w) == 2)
    original = _weights(m)[shared].copy()
    out, rec = _sparsify(m, method="unstructured", ratio=0.5)
    row = next(r for r in rec.extra["layers"] if r["readers"] == 2)
    new_readers = [n.input[1] for n in out.graph.node if n.op_type == "Conv"]
    assert new_readers.count(row["weight"]) == 2
    np.testing.assert_array_equal(_weights(m)[shared], original)


def test_protect_and_options():
    m = _wide_model()
    out, rec = _sparsify(m, protect=["c", "g"])
    assert {r["layer"] for r in rec.extra["layers"]} == {"m", "t"}
    assert sum("protected" in s for s in rec.skipped) == 2
    for bad in ("2-4", "4:2", "0:4"):
        with pytest.raises(OptionError):
            _sparsify(m, nm=bad)
    with pytest.raises(OptionError):
        _sparsify(m, method="unstructured", ratio=1.5)
    with pytest.raises(OptionError):
        _sparsify(m, protect=["("])


def test_non_constant_weight_is_left_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    m = make_model(nodes, [("x", [1, 4, 3, 3]), ("w", [4, 4, 1, 1])], [("y", [1, 4, 3, 3])])
    out, rec = _sparsify(m)
    assert rec.changes["layers_sparsified"] == 0 and "not a constant" in rec.skipped[0]


def test_report_error_and_not_exact():
    m = pm.yolo_like()
    out, rec = _sparsify(m, method="unstructured", ratio=0.2)
    assert rec.extra["output_error"]["max_abs"] > 0 and rec.extra["output_error"]["inputs"] == "generated"
    assert not rec.exact
    assert 0.19 < rec.extra["sparsity"]["sparsified_layers"] < 0.21


@pytest.mark.shared
def test_resnet20_2_4(shared):
    out, rec = _sparsify(str(shared("models", "resnet20_cifar10.onnx")))
    assert rec.changes["layers_sparsified"] == 19  # 18 convs and the classifier; the 3-channel stem is skipped
    assert rec.extra["sparsity"]["sparsified_layers"] == 0.5
