"""Channel dependency analysis and the ``prune`` pass.

The strongest oracle is the *zero-channel* check: make a set of channel groups exactly zero
(producers' rows and biases, BN gamma/beta), then prune those groups; the pruned model must give
the original (zeroed) model's outputs to fp32 rounding. A missed coupling shows up as a shape
error or a numeric difference. It runs on every small graph shape and on the real models.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import prune_models as pm
from helpers import assert_equivalent, make_model, rand, run
from onnxopt import runtime
from onnxopt.passes.prune import channels
from onnxopt.errors import OptionError
from onnxopt.manager import apply
from onnxopt.registry import PassContext

# tiny test widths: exact ratios; ratio counts channels, residual streams pruned, the mean fold:
# the mechanics these tests check (the user-facing defaults have their own tests below)
FAST = {"latency_runs": 0, "eval_batches": 1, "round_to": 1, "ratio_of": "channels", "residual": True, "compensate": "mean",
        "round_narrow": False}


def _prune(model, **opts):
    options = dict(FAST)
    options.update(opts)
    out, report = apply(model, "prune", options={"prune": options})
    return out, report.passes[0]


def _root(an, tensor, i):
    return an.uf.find(int(an.slots[tensor].ids[i]))


def _weights(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return inits


def _conv_out_channels(model):
    w = _weights(model)
    return {n.output[0]: w[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"}


def _kill_and_prune(model, frac=0.4, seed=0):
    """Zero ``frac`` of the prunable groups of every class, then prune exactly those."""
    an = channels.analyze(model)
    rng = np.random.default_rng(seed)
    removed = set()
    for roots in an.classes().values():
        if len(roots) >= 2:
            removed.update(rng.choice(roots, size=max(1, int(len(roots) * frac)), replace=False).tolist())
    an.kill(removed)
    killed = an.export()
    pruned = an.rewrite(removed)  # same analysis: component ids are per analysis
    return killed, pruned, removed


# ------------------------------------------------------------------------ dependency groups
def test_residual_add_ties_producers():
    m = pm.residual()
    an = channels.analyze(m)
    convs = [p for p in an.producers if p.op == "Conv"]
    stem, b1c1, b1c2, b2c1, b2c2 = convs
    for i in range(8):
        r = an.uf.find(int(stem.out_ids[i]))
        assert an.uf.find(int(b1c2.out_ids[i])) == r and an.uf.find(int(b2c2.out_ids[i])) == r
    # the stream's channels are distinct groups, and the blocks' inner channels are not tied to it
    assert len({an.uf.find(int(x)) for x in stem.out_ids}) == 8
    assert not {an.uf.find(int(x)) for x in b1c1.out_ids} & {an.uf.find(int(x)) for x in stem.out_ids}
    assert not {an.uf.find(int(x)) for x in b1c1.out_ids} & {an.uf.find(int(x)) for x in b2c1.out_ids}


def test_concat_offsets_and_split():
    m = pm.concat_split()
    an = channels.analyze(m)
    a, c = an.producers[0], an.producers[1]
    cat = next(n for n in an.graph.nodes if n.op == "Concat").outputs[0].name
    assert an.slots[cat].ids.tolist() == a.out_ids.tolist() + c.out_ids.tolist()
    split = next(n for n in an.graph.nodes if n.op == "Split")
    s1, s2 = (an.slots[o.name].ids.tolist() for o in split.outputs)
    assert s1 == a.out_ids[:3].tolist() and s2 == a.out_ids[3:].tolist() + c.out_ids.tolist()
    # the two branch outputs meet in an Add: their producers are tied channel by channel
    y1, y2 = an.producers[2], an.producers[3]
    assert [an.uf.find(int(x)) for x in y1.out_ids] == [an.uf.find(int(x)) for x in y2.out_ids]
    # prune channel 1 of conv b (offset 4+1 in the Concat, 4+1-3 = 2 in the second Split output)
    removed = {an.uf.find(int(c.out_ids[1]))}
    an.kill(removed)
    killed = an.export()
    pruned = an.rewrite(removed)  # same analysis: component ids are per analysis
    assert_equivalent(killed, pruned)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    assert _weights(pruned)[split.input[1]].tolist() == [3, 6]


def test_depthwise_ties_input_and_output():
    m = pm.depthwise()
    an = channels.analyze(m)
    expand, dw = an.producers[1], an.producers[2]
    assert [an.uf.find(int(x)) for x in expand.out_ids] == [an.uf.find(int(x)) for x in dw.out_ids]
    killed, pruned, removed = _kill_and_prune(m, 0.5)
    assert_equivalent(killed, pruned)
    node = next(n for n in pruned.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    group = next(a.i for a in node.attribute if a.name == "group")
    assert group == _weights(pruned)[node.input[1]].shape[0] < 12


def test_depthwise_multiplier_removes_whole_groups():
    m = pm.depthwise(2)
    an = channels.analyze(m)
    expand, dw = an.producers[1], an.producers[2]
    for k in range(12):
        r = an.uf.find(int(expand.out_ids[k]))
        assert an.uf.find(int(dw.out_ids[2 * k])) == r == an.uf.find(int(dw.out_ids[2 * k + 1]))
    killed, pruned, _ = _kill_and_prune(m, 0.5, seed=3)
    assert_equivalent(killed, pruned)


def test_grouped_conv_keeps_group_structure():
    m = pm.grouped()
    an = channels.analyze(m)
    stem, g = an.producers[0], an.producers[1]
    for t in range(4):  # input position t of group 0 is tied to position t of group 1
        assert an.uf.find(int(stem.out_ids[t])) == an.uf.find(int(stem.out_ids[4 + t]))
    for s in range(3):
        assert an.uf.find(int(g.out_ids[s])) == an.uf.find(int(g.out_ids[3 + s]))
    killed, pruned, _ = _kill_and_prune(m, 0.5)
    assert_equivalent(killed, pruned)
    gnode = next(n for n in pruned.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 2 for a in n.attribute))
    w = _weights(pruned)[gnode.input[1]]
    assert w.shape[0] % 2 == 0 and w.shape[0] < 6 and w.shape[1] < 4


def test_option_a_pad_amounts_rewritten():
    m = pm.option_a()
    an = channels.analyze(m)
    pad = next(n for n in an.graph.nodes if n.op == "Pad")
    ids = an.slots[pad.outputs[0].name].ids
    x_ids = an.slots[pad.inputs[0].name].ids
    assert len(ids) == 16 and ids[4:12].tolist() == x_ids.tolist()
    # stage-1 channel i is stage-2 channel 4+i; the padded channels are tied to the strided block
    block = an.producers[4]
    assert [an.uf.find(int(x)) for x in ids] == [an.uf.find(int(x)) for x in an.slots[pad.outputs[0].outputs[0].outputs[0].name].ids]
    assert an.uf.find(int(block.out_ids[0])) == an.uf.find(int(ids[0]))
    # prune padded channels 0 and 15 and stage-1 channel 2 (stage-2 channel 6)
    removed = {an.uf.find(int(ids[0])), an.uf.find(int(ids[15])), an.uf.find(int(x_ids[2]))}
    an.kill(removed)
    killed = an.export()
    pruned = an.rewrite(removed)  # same analysis: component ids are per analysis
    assert_equivalent(killed, pruned)
    pnode = next(n for n in pruned.graph.node if n.op_type == "Pad")
    assert _weights(pruned)[pnode.input[1]].tolist() == [0, 3, 0, 0, 0, 3, 0, 0]


def test_gap_flatten_gemm_and_reshape():
    m = pm.flatten_gemm()
    an = channels.analyze(m)
    conv = an.producers[0]
    flat = next(n for n in an.graph.nodes if n.op == "Flatten").outputs[0].name
    assert an.slots[flat].ids.tolist() == np.repeat(conv.out_ids, 4).tolist()
    reshaped = next(n for n in an.graph.nodes if n.op == "Reshape").outputs[0].name
    assert an.slots[reshaped].ids.tolist() == conv.out_ids.tolist()
    killed, pruned, removed = _kill_and_prune(m, 0.5)
    assert removed
    assert_equivalent(killed, pruned)
    gemm_w = [_weights(pruned)[n.input[1]] for n in pruned.graph.node if n.op_type == "Gemm"]
    assert gemm_w[0].shape[1] == 4 * _conv_out_channels(pruned)[conv.node.outputs[0].name]


def test_reshape_that_mixes_channels_is_unprunable():
    m = pm.reshape_mixing()
    pruned, rec = _prune(m, ratio=0.5, keep_first_last=False)
    before, after = _conv_out_channels(m), _conv_out_channels(pruned)
    conv_out = next(n.output[0] for n in m.graph.node if n.op_type == "Conv")
    assert after[conv_out] == before[conv_out] == 6  # the conv feeding the mixing Reshape
    assert sum(after.values()) < sum(before.values())  # the independent branch was pruned
    assert any("Reshape mixes channels" in s for s in rec.skipped)


def test_unknown_consumer_is_unprunable():
    m = pm.unknown_consumer()
    pruned, rec = _prune(m, ratio=0.5, keep_first_last=False)
    assert rec.changes["channels_removed"] == 0
    assert any("DepthToSpace" in s for s in rec.skipped)
    assert_equivalent(m, pruned)


def test_non_constant_weight_is_unprunable():
    m = pm.residual()
    w = next(n.input[1] for n in m.graph.node if n.op_type == "Conv")
    m.graph.input.append(onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, list(_weights(m)[w].shape)))
    an = channels.analyze(m)
    # the stem conv (weight now a graph input, overridable at run time) creates no prunable channels
    assert all(p.node.inputs[1].name != w for p in an.producers)
    assert any("not a constant" in why for _, why in an.reasons)
    pruned, _ = _prune(m, ratio=0.5, keep_first_last=False)
    assert _conv_out_channels(pruned)[m.graph.node[0].output[0]] == 8


# ------------------------------------------------------------------ exactness of the rewrite
@pytest.mark.parametrize("name", sorted(pm.BUILDERS))
def test_pruning_zeroed_channels_is_exact(name):
    m = pm.BUILDERS[name]()
    killed, pruned, removed = _kill_and_prune(m, 0.4, seed=1)
    assert removed
    assert_equivalent(killed, pruned, atol=2e-5)
    assert len(pruned.SerializeToString()) < len(killed.SerializeToString())


@pytest.mark.parametrize("name", ["residual", "option_a", "yolo_like", "mobilenet_like"])
def test_pass_removes_zeroed_channels_first(name):
    """Through the public pass: zeroed groups score 0 under l1, so ratio r removes exactly them."""
    m = pm.BUILDERS[name]()
    an = channels.analyze(m)
    removed = set()
    for roots in an.classes().values():
        k = min(int(round(0.25 * len(roots))), len(roots) - 1)
        removed.update(roots[:k])
    an.kill(removed)
    killed = an.export()
    pruned, rec = _prune(killed, ratio=0.25, keep_first_last=False, max_layer_ratio=1.0)
    assert rec.changes["channels_removed"] > 0
    assert_equivalent(killed, pruned, atol=2e-5)


@pytest.mark.parametrize("name", sorted(pm.BUILDERS))
def test_ratio_zero_is_equivalent(name):
    m = pm.BUILDERS[name]()
    pruned, rec = _prune(m, ratio=0.0)
    assert rec.changes["channels_removed"] == 0
    assert_equivalent(m, pruned)


def test_dynamic_batch_and_runs():
    m = pm.residual(batch="N")
    pruned, rec = _prune(m, ratio=0.5, keep_first_last=False)
    assert rec.changes["channels_removed"] > 0
    out = run(pruned, {"input": np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)})
    assert out["logits"].shape == (3, 5)


# ---------------------------------------------------------------------------- ratio options
def test_round_to_and_min_channels():
    m = pm.residual()
    pruned, _ = _prune(m, ratio=0.5, round_to=4, keep_first_last=False)
    counts = _conv_out_channels(pruned)
    assert all(c % 4 == 0 for c in counts.values()) and sum(counts.values()) < sum(_conv_out_channels(m).values())
    pruned, _ = _prune(m, ratio=0.75, min_channels=3, max_layer_ratio=1.0, keep_first_last=False)
    assert min(_conv_out_channels(pruned).values()) == 3


def test_max_layer_ratio_caps_every_class():
    m = pm.mobilenet_like()
    pruned, rec = _prune(m, ratio=0.7, max_layer_ratio=0.25, keep_first_last=False)
    for row in rec.extra["classes"]:
        assert row["removed"] <= int(0.25 * row["channels"])
    assert rec.changes["channels_removed"] > 0


def test_global_mode_removes_the_overall_ratio():
    m = pm.yolo_like()
    pruned, rec = _prune(m, ratio=0.3, mode="global", keep_first_last=False)
    total = sum(r["channels"] for r in rec.extra["classes"])
    removed = sum(r["removed"] for r in rec.extra["classes"])
    assert abs(removed - round(0.3 * total)) <= 1
    fractions = {round(r["removed"] / r["channels"], 2) for r in rec.extra["classes"]}
    assert len(fractions) > 1  # not uniform
    assert run(pruned, runtime.generate_inputs(pruned))["output"].shape == (1, 80, 8)


def test_protect_by_name_and_regex():
    m = pm.yolo_like()
    protected = [n.output[0] for n in m.graph.node if n.op_type == "Conv"][2]
    pruned, _ = _prune(m, ratio=0.5, protect=[protected], keep_first_last=False)
    assert _conv_out_channels(pruned)[protected] == _conv_out_channels(m)[protected]
    pruned, rec = _prune(m, ratio=0.5, protect=["conv_.*"], keep_first_last=False)
    assert rec.changes["channels_removed"] == 0
    with pytest.raises(OptionError):
        _prune(m, protect=["conv_("])


def test_keep_first_last_protects_private_groups_only():
    m = pm.mobilenet_like()
    head = [n.output[0] for n in m.graph.node if n.op_type == "Conv"][-1]
    kept, _ = _prune(m, ratio=0.5)
    free, _ = _prune(m, ratio=0.5, keep_first_last=False)
    assert _conv_out_channels(kept)[head] == 32 > _conv_out_channels(free)[head]
    g = pm.grouped()  # the stem's outputs are private to the first layer -> protected
    stem = g.graph.node[0].output[0]
    assert _conv_out_channels(_prune(g, ratio=0.5)[0])[stem] == 8
    # a residual stream shared by many layers stays prunable even though the stem feeds it
    r = pm.residual()
    assert _conv_out_channels(_prune(r, ratio=0.5)[0])[r.graph.node[0].output[0]] < 8


# ------------------------------------------------------------------------------- importance
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_gamma", "fpgm"])
def test_importance_criteria_run(importance):
    m = pm.yolo_like()
    pruned, rec = _prune(m, ratio=0.3, importance=importance)
    assert rec.changes["channels_removed"] > 0 and rec.extra["importance"] == importance
    onnx.checker.check_model(pruned, full_check=True)


def test_bn_gamma_removes_the_smallest_gammas():
    m = pm.grouped()
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization" and n.input[0] == m.graph.node[3].output[0])
    gamma = next(i for i in m.graph.initializer if i.name == bn.input[1])
    g = numpy_helper.to_array(gamma).copy()
    g[[1, 4]] = 1e-3  # position 1 of both groups
    gamma.CopyFrom(numpy_helper.from_array(g, gamma.name))
    pruned, _ = _prune(m, ratio=0.34, importance="bn_gamma", keep_first_last=False)
    np.testing.assert_array_equal(_bn_gamma_after(pruned, bn.input[0]), g[[0, 2, 3, 5]])


def _bn_gamma_after(model, conv_out):
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization" and n.input[0] == conv_out)
    return _weights(model)[bn.input[1]]


def test_score_file(tmp_path):
    m = pm.residual()
    inner = [n for n in m.graph.node if n.op_type == "Conv"][1]
    scores = {inner.output[0]: [5, 4, 0.1, 3, 0.2, 6]}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(scores))
    pruned, rec = _prune(m, ratio=0.34, scores=str(path))
    np.testing.assert_array_equal(_bn_gamma_after(pruned, inner.output[0]), _bn_gamma_after(m, inner.output[0])[[0, 1, 3, 5]])
    assert rec.extra["importance_fallback_l1"]  # the other layers fell back to l1
    path.write_text(json.dumps({inner.output[0]: [1, 2]}))
    with pytest.raises(OptionError, match="6 output channels"):
        _prune(m, scores=str(path))
    with pytest.raises(OptionError, match="does not exist"):
        _prune(m, scores=str(tmp_path / "missing.json"))
    with pytest.raises(OptionError):
        _prune(m, importance="file")
    with pytest.raises(OptionError):
        _prune(m, ratio=1.5)


def test_shared_weight_is_copied_not_edited():
    m = pm.shared_weight()
    readers = [n.input[1] for n in m.graph.node if n.op_type == "Conv"]
    w_name = next(w for w in readers if readers.count(w) == 2)
    original = _weights(m)[w_name].copy()
    pruned, rec = _prune(m, ratio=0.5, keep_first_last=False)
    assert rec.changes["channels_removed"] > 0
    np.testing.assert_array_equal(_weights(m)[w_name], original)
    onnx.checker.check_model(pruned, full_check=True)


# ----------------------------------------------------------------------------------- report
def test_report_has_params_macs_latency_and_error():
    m = pm.residual()
    feed = runtime.generate_inputs(m, seed=5)
    out, report = apply(m, "prune", options={"prune": {"ratio": 0.5, "latency_runs": 2, "keep_first_last": False, "round_to": 1}},
                        context=PassContext(data=lambda: [feed]))
    ex = report.passes[0].extra
    assert ex["params"]["after"] < ex["params"]["before"] and ex["macs"]["after"] < ex["macs"]["before"]
    assert ex["latency_ms"]["before"] > 0 and ex["latency_ms"]["after"] > 0
    assert all(r["latency_ms_before"] > 0 and r["latency_ms_after"] > 0 for r in ex["layers"])
    assert ex["output_error"]["inputs"] == "data" and ex["output_error"]["max_abs"] > 0
    assert 0.0 <= ex["output_error"]["top1_agreement"] <= 1.0
    layer = next(r for r in ex["layers"] if r["channels_after"] < r["channels_before"])
    assert layer["macs_after"] < layer["macs_before"] and layer["params_after"] < layer["params_before"]
    assert not report.passes[0].exact


# ------------------------------------------------------------------------------ real models
@pytest.mark.shared
def test_resnet20_zeroed_channels_exact(shared):
    from onnxopt.model_io import load_model
    m = load_model(shared("models", "resnet20_cifar10.onnx"))
    killed, pruned, removed = _kill_and_prune(m, 0.3, seed=2)
    assert len(removed) > 50
    assert_equivalent(killed, pruned, rtol=1e-4, atol=1e-4)


@pytest.mark.shared
def test_resnet56_mac_reduction(shared):
    pruned, rec = _prune(str(shared("models", "resnet56_cifar10.onnx")), ratio=0.3)
    assert rec.extra["macs"]["reduction"] >= 0.45
    assert rec.extra["params"]["after"] < rec.extra["params"]["before"]
    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["efficientnet_lite0", "yolox_nano"])
def test_real_models_prune_and_stay_exact_on_zeroed_channels(shared, name):
    from onnxopt.model_io import load_model
    m = load_model(shared("models", f"{name}.onnx"))
    killed, pruned, removed = _kill_and_prune(m, 0.3, seed=4)
    assert removed
    feed = [runtime.generate_inputs(m, seed=0)]
    assert_equivalent(killed, pruned, feeds=feed, rtol=1e-4, atol=1e-4)
    out, rec = _prune(m, ratio=0.3)
    assert rec.extra["macs"]["reduction"] > 0.3
    assert set(run(out, feed[0])) == set(run(m, feed[0]))


def test_mean_compensation_keeps_a_constant_channel(tmp_path):
    """A channel whose filters are zero but whose BN shift is not is a constant feature map: pruning
    it with compensate=mean folds that constant into the (unpadded 1x1) consumer exactly."""
    b = pm.B(12)
    x = b.cbr("input", 3, 6)
    b.conv(x, 6, 4, k=1, name="out")
    m = b.model([("input", [1, 3, 5, 5])], [("out", [1, 4, 5, 5])])
    conv = m.graph.node[0]
    w = next(i for i in m.graph.initializer if i.name == conv.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[2] = 0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    bn = m.graph.node[1]
    beta = next(i for i in m.graph.initializer if i.name == bn.input[2])
    bv = numpy_helper.to_array(beta).copy()
    bv[2] = 0.7
    beta.CopyFrom(numpy_helper.from_array(bv, beta.name))
    path = tmp_path / "s.json"
    path.write_text(json.dumps({conv.output[0]: [1, 1, 0, 1, 1, 1]}))
    exact, rec = _prune(m, ratio=0.17, scores=str(path), keep_first_last=False)
    assert rec.changes["channels_removed"] == 1 and rec.extra["compensated_layers"] == 1
    assert_equivalent(m, exact, atol=1e-5)
    off, _ = _prune(m, ratio=0.17, scores=str(path), keep_first_last=False, compensate="none")
    feed = runtime.generate_inputs(m)
    assert np.abs(run(off, feed)["out"] - run(m, feed)["out"]).max() > 1e-2


def test_refit_compensation_recovers_a_redundant_channel(tmp_path):
    """A removed channel that is a multiple of a kept one (ReLU(2a) = 2 ReLU(a)) is reproduced
    exactly by compensate=refit (least squares on the consumer's patches, here a padded stride-2
    3x3 conv); the mean fold cannot do it."""
    b = pm.B(5)
    feat = b.conv("input", 3, 6, k=3, name="feat")
    r = b.node("Relu", [feat])
    b.conv(r, 6, 4, k=3, stride=2, name="out")
    m = b.model([("input", [1, 3, 16, 16])], [("out", [1, 4, 8, 8])])
    conv = m.graph.node[0]
    for idx in (1, 2):   # filter and bias of channel 2 = 2 x channel 0
        t = next(i for i in m.graph.initializer if i.name == conv.input[idx])
        arr = numpy_helper.to_array(t).copy()
        arr[2] = 2 * arr[0]
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"feat": [1, 1, 0, 1, 1, 1]}))
    feeds = [runtime.generate_inputs(m, seed=s) for s in range(4)]
    ctx = PassContext(data=lambda: iter(feeds))
    common = {**FAST, "ratio": 0.17, "scores": str(path), "keep_first_last": False, "eval_batches": 4}
    refit, rep = apply(m, "prune", options={"prune": {**common, "compensate": "refit", "refit_ridge": 1e-9}}, context=ctx)
    mean, _ = apply(m, "prune", options={"prune": {**common, "compensate": "mean"}}, context=ctx)
    assert rep.passes[0].changes["channels_removed"] == 1 and rep.passes[0].extra["compensated_layers"] == 1
    feed = runtime.generate_inputs(m, seed=9)
    ref = run(m, feed)["out"]
    assert np.abs(run(refit, feed)["out"] - ref).max() < 1e-3 * np.abs(ref).max()
    assert np.abs(run(mean, feed)["out"] - ref).max() > 1e-2 * np.abs(ref).max()
    # one 16x16 sample gives 64 patches for 46 unknowns per output: too few, the mean fold is used
    few, _ = apply(m, "prune", options={"prune": {**common, "compensate": "refit", "refit_samples": 1}}, context=ctx)
    assert np.array_equal(run(few, feed)["out"], run(mean, feed)["out"])


def test_default_rounds_widths_to_8():
    m = pm.yolo_like()
    out, report = apply(m, "prune", options={"prune": {"ratio": 0.3, "latency_runs": 0, "keep_first_last": False, "ratio_of": "channels",
                                                       "residual": True, "round_narrow": False}})
    rec = report.passes[0]
    assert rec.extra["round_to"] == 8
    before, after = _conv_out_channels(m), _conv_out_channels(out)
    changed = [k for k in after if after[k] != before[k]]
    assert changed and all(after[k] % 8 == 0 for k in changed)


def test_outer_tensor_read_by_a_subgraph_is_unprunable():
    m = pm.if_subgraph()
    an = channels.analyze(m)
    x = next(n for n in m.graph.node if n.op_type == "If").attribute[0].g.node[0].input[0]
    assert all(an.uf.find(int(i)) == channels.POISON for i in an.slots[x].ids)
    assert any(why == "used inside a subgraph" for _, why in an.reasons)


@pytest.mark.parametrize("opts, why", [
    ({"ratio": 0.0}, "prune.ratio is 0"),
    ({"keep_first_last": True, "protect": [".*"]}, "every channel group is protected"),
    ({"ratio": 0.01, "round_to": 8}, "leaves no channel to remove"),
])
def test_a_run_that_removes_nothing_says_why(opts, why):
    m = pm.residual()
    out, rec = _prune(m, **opts)
    assert out.graph == m.graph and not any(rec.changes.values())
    assert any(s.startswith("nothing pruned") and why in s for s in rec.skipped), rec.skipped


def test_no_prunable_layer_says_why():
    """A single Conv whose output is the graph output: nothing has channels to remove."""
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [("x", [1, 3, 8, 8])], [("y", [1, 4, 6, 6])],
                   [("w", rand(4, 3, 3, 3))])
    out, rec = _prune(m)
    assert out.graph == m.graph
    assert any("no Conv/ConvTranspose/Gemm/MatMul layer has output channels" in s for s in rec.skipped), rec.skipped


def test_dynamic_height_width_with_data_measures_latency_on_the_data():
    """A model with dynamic H/W has no shape to generate inputs from: with data given, the
    latency report runs on the data (it used to fail asking for --input-shape)."""
    m = pm.residual()
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "HW"
    feeds = [{m.graph.input[0].name: rand(1, *[3 if i == 0 else 8 for i in range(3)], seed=s)} for s in range(3)]
    out, report = apply(m, "prune", options={"prune": dict(FAST, latency_runs=2)}, context=PassContext(data=lambda: iter(feeds)))
    lat = report.passes[0].extra["latency_ms"]
    assert lat["before"] > 0 and "data inputs" in lat["note"]


# ------------------------------------------------------------------- user-facing defaults (issue 23)
def _apply_defaults(model, context=None, **opts):
    options = {"latency_runs": 0, "eval_batches": 1}
    options.update(opts)
    out, report = apply(model, "prune", options={"prune": options}, context=context)
    return out, report.passes[0]


def test_residual_streams_are_kept_unless_asked():
    """Default: the channels that meet in the residual Adds (stem and both blocks' second convs)
    keep their width; only the inner convs shrink. residual=true prunes the streams too."""
    m = pm.residual()
    stream = [n.output[0] for n in m.graph.node if n.op_type == "Conv"][0::2]   # stem, block convs 2
    kept, rec = _apply_defaults(m, ratio=0.5, ratio_of="channels", round_to=1, keep_first_last=False)
    before, after = _conv_out_channels(m), _conv_out_channels(kept)
    assert all(after[t] == before[t] for t in stream)
    assert any(after[t] < before[t] for t in before if t not in stream)
    assert rec.extra["residual_channels_kept"] == 8
    pruned, _ = _apply_defaults(m, ratio=0.5, ratio_of="channels", round_to=1, keep_first_last=False, residual=True)
    assert any(_conv_out_channels(pruned)[t] < before[t] for t in stream)


@pytest.mark.parametrize("make, target", [(pm.yolo_like, 0.6), (pm.mobilenet_like, 0.7), (pm.residual, 0.8)])
def test_target_macs_is_met_by_the_real_count(make, target):
    """target_macs: the pruned model's MACs (counted on the rewritten graph) are at most the
    target and within the rounding of it; ratio (of the MACs, the default) means the same."""
    from onnxopt import stats
    m = make()
    out, rec = _apply_defaults(m, target_macs=target, round_to=1, keep_first_last=False, residual=True)
    kept = stats.total_macs(out) / stats.total_macs(m)
    assert kept <= target + 1e-9 and kept > target - 0.08, kept
    assert rec.extra["target_macs"]["kept"] == pytest.approx(kept, abs=1e-4)
    same, _ = _apply_defaults(m, ratio=round(1 - target, 6), round_to=1, keep_first_last=False, residual=True)
    assert stats.total_macs(same) == stats.total_macs(out)
    onnx.checker.check_model(out, full_check=True)


def test_ratio_of_the_macs_counts_the_recurrent_layers_prune_leaves():
    """A CRNN (convs into a GRU): "ratio 0.3" means 30 % of the whole model's MACs, the GRU's
    included (a quarter here), though prune leaves the GRU and the channels feeding it as they are;
    before the GRU was counted, the pruned share was of the conv MACs only."""
    from onnxopt import stats
    m = pm.crnn()
    gru = 16 * 3 * 32 * (64 + 32)   # steps x gates * hidden x (input + hidden)
    assert [r["macs"] for r in stats.layer_macs(m) if r["op"] == "GRU"] == [gru]
    out, rec = _apply_defaults(m, ratio=0.3, round_to=1, keep_first_last=False)
    kept = stats.total_macs(out) / stats.total_macs(m)
    assert 0.6 < kept <= 0.7 + 1e-9, kept
    assert [r["macs"] for r in stats.layer_macs(out) if r["op"] == "GRU"] == [gru]
    assert rec.extra["macs"]["reduction"] == pytest.approx(1 - kept, abs=1e-3)
    onnx.checker.check_model(out, full_check=True)


def test_narrow_classes_round_to_a_smaller_multiple():
    """round_to=8 on a 16-channel class at 30 %: 12 kept (multiple of 4), not 8 (halved);
    round_narrow=false gives the old multiple of 8."""
    b = pm.B(7)
    x = b.cbr("input", 3, 16)
    y = b.cbr(x, 16, 16)
    b.conv(y, 16, 4, name="out")
    m = b.model([("input", [1, 3, 8, 8])], [("out", [1, 4, 8, 8])])
    mid = m.graph.node[3].output[0]
    out, _ = _apply_defaults(m, ratio=0.3, ratio_of="channels", keep_first_last=False)
    assert _conv_out_channels(out)[mid] == 12
    old, _ = _apply_defaults(m, ratio=0.3, ratio_of="channels", keep_first_last=False, round_narrow=False)
    assert _conv_out_channels(old)[mid] == 8


def test_compensation_follows_the_data_and_the_cost_is_said():
    """compensate=auto: no data -> none (means of generated inputs mislead), data -> refit; the
    console gets one line with the MACs/params before and after and what the options meant (the
    manager's summary adds the output change)."""
    m = pm.residual()
    said = []
    _, rec = _apply_defaults(m, ratio=0.3, keep_first_last=False, context=PassContext(log=said.append))
    assert rec.extra["compensate"] == "none" and rec.extra["compensated_layers"] == 0
    line = [s for s in said if s.startswith("prune:")]
    assert len(line) == 1 and "counts MACs" in line[0] and "residual streams kept" in line[0] and "nothing compensated" in line[0]
    macs = rec.extra["macs"]
    assert f"keeps {1 - macs['reduction']:.1%}" in line[0] and f"{macs['before'] / 1e6:.1f}M -> {macs['after'] / 1e6:.1f}M MACs" in line[0]
    feeds = [runtime.generate_inputs(m, seed=s) for s in range(8)]
    _, rec = _apply_defaults(m, ratio=0.3, keep_first_last=False, refit_samples=8,
                             context=PassContext(data=lambda: iter(feeds)))
    assert rec.extra["compensate"] == "refit"


def test_target_macs_out_of_range_is_refused():
    with pytest.raises(OptionError, match="target_macs"):
        _apply_defaults(pm.residual(), target_macs=1.5)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["resnet56_cifar10", "efficientnet_lite0"])
def test_target_macs_half_on_real_models(shared, name):
    from onnxopt import stats
    m = str(shared("models", f"{name}.onnx"))
    out, rec = _apply_defaults(m, target_macs=0.5)
    kept = stats.total_macs(out) / stats.total_macs(onnxopt_load(m))
    assert abs(kept - 0.5) <= 0.03 * 0.5, kept
    onnx.checker.check_model(out, full_check=True)


def onnxopt_load(path):
    from onnxopt.model_io import load_model
    return load_model(path)
