"""onnxopt finetune: distillation / supervised / QAT training, checkpoints, DDP, CLI, optional torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import make_model, rand, run

ROOT = Path(__file__).resolve().parents[1]


def tiny_classifier(seed=0, noise=0.0):
    """Conv-BN-Relu-Conv-Relu-GAP-Flatten-Gemm, 10 classes, input [N,3,8,8] (dynamic batch)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * (0.4 + noise)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc")]
    inits = [("w1", w(8, 3, 3, 3)), ("b1", w(8)), ("g", 1 + 0.1 * w(8)), ("be", w(8)), ("mu", 0.1 * w(8)),
             ("var", np.abs(w(8)) + 0.5), ("w2", w(8, 8, 3, 3)), ("b2", w(8)), ("fc", w(10, 8)), ("fcb", w(10))]
    return make_model(nodes, [("input", ["N", 3, 8, 8])], [("logits", ["N", 10])], inits)


def perturbed(model, scale=0.3, seed=1):
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in ("w1", "w2", "fc"):
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a + scale * rng.standard_normal(a.shape) * np.abs(a).mean()).astype(np.float32), t.name))
    return out


def data_file(tmp_path, n=64, labels=None):
    p = tmp_path / "train.npz"
    arrays = {"input": rand(n, 3, 8, 8, seed=7)}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(p, **arrays)
    return p


def open_ds(path, model):
    from onnxopt.data import DataSpec, open_data
    return open_data(DataSpec(str(path), batch_size=16), model)


def kl_to_teacher(student, teacher, x):
    s, t = run(student, {"input": x})["logits"], run(teacher, {"input": x})["logits"]
    ps = np.exp(s - s.max(1, keepdims=True)); ps /= ps.sum(1, keepdims=True)
    pt = np.exp(t - t.max(1, keepdims=True)); pt /= pt.sum(1, keepdims=True)
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())


def test_distillation_moves_student_to_teacher_and_writes_back(tmp_path):
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = tiny_classifier()
    student = perturbed(teacher)
    path = data_file(tmp_path)
    x = rand(32, 3, 8, 8, seed=99)
    before = kl_to_teacher(student, teacher, x)
    res = finetune(student, open_ds(path, student), teacher=teacher,
                   config=FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1))
    onnx.checker.check_model(res.model, full_check=True)
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in student.graph.node]  # same graph
    after = kl_to_teacher(res.model, teacher, x)
    assert after < 0.5 * before, (before, after)
    assert res.parity["max_abs"] <= 1e-4
    assert len(res.history) == 6 and res.samples_per_second > 0


def _embedding(model):
    """``model`` with its logits L2-normalized (LpNormalization): an embedding, not class scores."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node[-1].output[0] = "raw"
    out.graph.node.append(helper.make_node("LpNormalization", ["raw"], ["logits"], axis=1, p=2, name="l2"))
    onnx.checker.check_model(out, full_check=True)
    return out


def test_an_embedding_model_is_distilled_by_its_distance_to_the_teacher(tmp_path):
    """A model ending in LpNormalization (an embedding) converts to torch and is distilled with the
    MSE of its output, not a KL between softmaxes of its dimensions (onnxopt.task_metric.FEATURES:
    an embedding's dimensions are no classes)."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = _embedding(tiny_classifier())
    student = perturbed(teacher, scale=0.5)
    x = rand(64, 3, 8, 8, seed=99)

    def distance(m):
        s, t = run(m, {"input": x})["logits"], run(teacher, {"input": x})["logits"]
        return float(np.mean(np.sum((s - t) ** 2, axis=1)))
    before = distance(student)
    res = finetune(student, open_ds(data_file(tmp_path), student), teacher=teacher,
                   config=FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1))
    assert distance(res.model) < 0.5 * before, (before, distance(res.model))
    from onnxopt.torch.train import distill_loss
    torch = pytest.importorskip("torch")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert float(distill_loss(s, t, 4.0, class_scores=False)) == pytest.approx(float(torch.mean((s - t) ** 2)))
    # [N, C, 1, 1] scores (a classifier ending in a 1x1 conv) are distilled as their [N, C]: softmax KL
    assert float(distill_loss(s[:, :, None, None], t[:, :, None, None], 4.0)) == pytest.approx(float(distill_loss(s, t, 4.0)))


def _ending_in(model, op):
    """``model`` with ``op`` (Softmax / LogSoftmax / Sigmoid, or ArgMax: class ids out) after its
    logits, or an Identity (None)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node[-1].output[0] = "raw"
    attrs = {"axis": 1} if op in ("Softmax", "LogSoftmax") else {"axis": 1, "keepdims": 0} if op == "ArgMax" else {}
    out.graph.node.append(helper.make_node(op or "Identity", ["raw"], ["logits"], name="last", **attrs))
    if op == "ArgMax":
        out.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["N"]))
    return out


def test_a_final_softmax_or_sigmoid_is_trained_on_its_logits(tmp_path):
    """Distillation and labels read the logits before a final Softmax / LogSoftmax (the tensor its
    input holds), not the probabilities: the model with its Softmax learns exactly the weights of
    the model without one. Before, the KL between softmaxes of probabilities (nearly uniform at
    T = 4) left the student 2.4x further from its teacher, and a model exported with its ArgMax
    stopped with a torch traceback (an MSE of int64 class ids). A Sigmoid's labels get each
    label's Bernoulli KL, and 0 / 1 labels its binary cross entropy."""
    torch = pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune, label_loss, logit_distill_loss, logit_pairs

    labels = np.random.default_rng(3).integers(0, 10, 64)
    weights = {}
    for op in (None, "Softmax", "LogSoftmax", "ArgMax"):
        teacher = _ending_in(tiny_classifier(), op)
        student = perturbed(teacher)
        res = finetune(student, open_ds(data_file(tmp_path, labels=labels), student), teacher=teacher,
                       config=FinetuneConfig(epochs=3, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1))
        onnx.checker.check_model(res.model, full_check=True)
        assert [n.op_type for n in res.model.graph.node][-1] == (op or "Identity")
        weights[op] = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert set(logit_pairs(_ending_in(tiny_classifier(), "Softmax"), None)) == {"logits"}
    for op in ("Softmax", "LogSoftmax", "ArgMax"):
        for name, w in weights[None].items():
            np.testing.assert_allclose(weights[op][name], w, rtol=1e-4, atol=1e-5, err_msg=f"{op}: {name}")
    # a Sigmoid: Bernoulli KL per label (summed over the labels, mean over the samples), binary CE on labels
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    by_hand = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(1).mean() * 4
    assert float(logit_distill_loss(s, t, "Sigmoid", 2.0)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(logit_distill_loss(t, t, "Sigmoid", 2.0)) == pytest.approx(0.0, abs=1e-6)
    # a class per position (a segmentation map's labels): CE over the classes on axis 1, 255 ignored
    maps, truth = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    truth[0, 0] = 255
    assert float(label_loss(maps, truth, "ArgMax")) == pytest.approx(
        float(torch.nn.functional.cross_entropy(maps, truth, ignore_index=255)), rel=1e-6)
    from onnxopt.errors import DataError
    with pytest.raises(DataError, match="do not fit"):
        label_loss(maps, truth[:, :2], None)
    scores, classes = torch.randn(4, 3), torch.tensor([2, 0, 1, 2])   # one-hot labels: their classes
    assert float(label_loss(scores, torch.nn.functional.one_hot(classes, 3), None)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(scores, classes)), rel=1e-6)
    y = torch.tensor([0, 1, 1, 0])
    one = torch.randn(4, 1)
    assert float(label_loss(one, y, "Sigmoid")) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(one[:, 0], y.float())), rel=1e-6)
    teacher = _ending_in(tiny_classifier(), "Sigmoid")
    student = perturbed(teacher)
    x = rand(32, 3, 8, 8, seed=99)

    def bernoulli_kl(m):
        from onnxopt import runtime
        a, b = (runtime.run(runtime.session(runtime.with_outputs(k, ["raw"])), {"input": x})["raw"] for k in (teacher, m))
        return float(logit_distill_loss(torch.from_numpy(b), torch.from_numpy(a), "Sigmoid", 1.0))
    res = finetune(student, open_ds(data_file(tmp_path), student), teacher=teacher,
                   config=FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1))
    assert bernoulli_kl(res.model) < 0.2 * bernoulli_kl(student)


def tiny_segmenter(seed=0, head="ArgMax"):
    """Conv-Relu-Conv to 4 classes per pixel of an [N, 3, 8, 8] input, then an ArgMax over the
    classes (class ids [N, 8, 8] out) or a Softmax over them."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["scores"], pads=[1, 1, 1, 1])]
    inits = [("w1", (0.4 * rng.standard_normal((8, 3, 3, 3))).astype(np.float32)), ("b1", np.zeros(8, np.float32)),
             ("w2", (0.4 * rng.standard_normal((4, 8, 3, 3))).astype(np.float32)), ("b2", np.zeros(4, np.float32))]
    if head == "ArgMax":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["classes"], axis=1, keepdims=0))
        out = ("classes", ["N", 8, 8], onnx.TensorProto.INT64)
    else:
        nodes.append(helper.make_node("Softmax", ["scores"], ["classes"], axis=1))
        out = ("classes", ["N", 4, 8, 8])
    return make_model(nodes, [("input", ["N", 3, 8, 8])], [out], inits)


def test_a_class_map_is_distilled_per_position(tmp_path):
    """A map whose ArgMax / Softmax names the class axis (a segmentation model's) is distilled by
    the KL of each position's classes, mean over the samples and positions: the task metric's
    per-position KL, blind to a shift of all of a position's logits (softmax is). Before, it was
    the MSE of the logits. Labels per position read the classes on the axis the graph names
    ([N, T, C] of a sequence as well as [N, C, H, W])."""
    torch = pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune, label_loss, logit_distill_loss, logit_pairs

    s, t = torch.randn(2, 4, 3, 5, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)
    by_hand = (p * torch.log(p / q)).sum(1).mean() * 4
    assert float(logit_distill_loss(s, t, "ArgMax", 2.0, axis=1)) == pytest.approx(float(by_hand), rel=1e-9)
    shifted = s + torch.randn(2, 1, 3, 5, dtype=torch.float64)   # every class of a position moved alike
    assert float(logit_distill_loss(shifted, t, "Softmax", 2.0, axis=1)) == pytest.approx(float(by_hand), rel=1e-9)
    seq, steps = torch.randn(2, 5, 4), torch.randint(0, 4, (2, 5))   # [N, T, C] with classes last
    assert float(label_loss(seq, steps, "Softmax", axis=-1)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(seq.movedim(-1, 1), steps)), rel=1e-6)

    for head in ("ArgMax", "Softmax"):
        teacher = tiny_segmenter(head=head)
        assert {k: (v.student, v.axis) for k, v in logit_pairs(teacher, teacher).items()} == {"classes": ("scores", 1)}
        student = perturbed(teacher)
        x = rand(32, 3, 8, 8, seed=99)

        def position_kl(m):
            from onnxopt import runtime
            a, b = (runtime.run(runtime.session(runtime.with_outputs(k, ["scores"])), {"input": x})["scores"] for k in (teacher, m))
            return float(logit_distill_loss(torch.from_numpy(b), torch.from_numpy(a), head, 1.0, axis=1))
        res = finetune(student, open_ds(data_file(tmp_path), student), teacher=teacher,
                       config=FinetuneConfig(epochs=6, lr=1e-2, batch_size=16, progress=False, log=lambda m: None, threads=1))
        onnx.checker.check_model(res.model, full_check=True)
        assert position_kl(res.model) < 0.3 * position_kl(student), head


def _half(model):
    """``model`` exported in float16: weights, BN statistics, input and output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*out.graph.input, *out.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(out, full_check=True)
    return out


def test_a_float16_model_trains_as_its_float32_twin(tmp_path):
    """Trained in float16, Adam's eps (1e-8) is 0 and its first steps made every weight NaN: the
    written model output NaN everywhere, and finetune exited 0 with a parity of 0 (NaN == NaN).
    It trains as its float32 twin, and what it learned is written back into the float16 graph:
    before, the float32 twin itself was written, twice the size of the model given."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = _half(tiny_classifier())
    student = _half(perturbed(tiny_classifier()))
    path = tmp_path / "train.npz"
    np.savez(path, input=rand(64, 3, 8, 8, seed=7).astype(np.float16))
    x = rand(32, 3, 8, 8, seed=99).astype(np.float16)
    logs = []
    res = finetune(student, open_ds(path, student), teacher=teacher,
                   config=FinetuneConfig(epochs=4, lr=3e-3, batch_size=16, progress=False, log=logs.append, threads=1))
    onnx.checker.check_model(res.model, full_check=True)
    assert [v.type.tensor_type.elem_type for v in (*res.model.graph.input, *res.model.graph.output)] == [onnx.TensorProto.FLOAT16] * 2
    assert any("trained as its float32 twin" in m for m in logs)
    got = run(res.model, {"input": x})["logits"]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert kl_to_teacher(res.model, teacher, x) < 0.5 * kl_to_teacher(student, teacher, x)
    assert res.parity["max_abs"] <= 1e-2   # torch in float32 against the model's float16 output
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in student.graph.node]   # no casts added
    assert {t.name: t.data_type for t in res.model.graph.initializer} == {t.name: t.data_type for t in student.graph.initializer}
    assert res.model.ByteSize() < 1.05 * student.ByteSize()
    assert any("written in the model's own float16" in m for m in logs)


def test_qat_w4a4_exports_restricted_qdq_and_matches_torch(tmp_path):
    pytest.importorskip("torch")
    from onnxopt.qat import prepare_qat
    from onnxopt.torch.train import FinetuneConfig, finetune
    base = tiny_classifier()
    ds = open_ds(data_file(tmp_path), base)
    qmodel, overrides, info = prepare_qat(base, "w4a4", ds, log=lambda m: None)
    assert overrides["float_weights"]  # latent weights start from the float weights
    res = finetune(qmodel, ds, teacher=base, config=FinetuneConfig(epochs=2, lr=1e-3, batch_size=16, progress=False,
                                                                   log=lambda m: None, threads=1, **overrides))
    assert res.parity["max_abs"] <= 1e-4   # same rounding in torch and onnxruntime; float sums may differ in order
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for layer in info["layers"]:
        wq = inits[layer["weight_q"]]
        assert wq.dtype == np.int8 and np.abs(wq).max() <= 7
    assert sum(n.op_type == "QuantizeLinear" for n in res.model.graph.node) == sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    # learned scales differ from the calibrated ones
    before = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    assert any(not np.array_equal(before[layer["weight_scale"]], inits[layer["weight_scale"]]) for layer in info["layers"])


@pytest.mark.parametrize("spec,values", [("wta8", {-1, 0, 1}), ("wba8", {-1, 1})])
def test_ternary_and_binary_weights(tmp_path, spec, values):
    pytest.importorskip("torch")
    from onnxopt.qat import prepare_qat
    from onnxopt.torch.train import FinetuneConfig, finetune
    base = tiny_classifier()
    ds = open_ds(data_file(tmp_path, n=32), base)
    qmodel, overrides, info = prepare_qat(base, spec, ds, log=lambda m: None)
    res = finetune(qmodel, ds, teacher=base, config=FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, progress=False,
                                                                   log=lambda m: None, threads=1, **overrides))
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    seen = set()
    for layer in info["layers"]:
        seen |= set(np.unique(inits[layer["weight_q"]]).tolist())
    assert seen <= values and len(seen) >= 2
    assert res.parity["max_abs"] <= 1e-5


def test_bad_qat_spec_and_quantized_input():
    pytest.importorskip("torch")
    from onnxopt.errors import OptionError
    from onnxopt.qat import parse_qat, prepare_qat
    assert parse_qat("w2a8") == (2, 8) and parse_qat("wTa4") == ("ternary", 4)
    for bad in ("w16a16", "w4", "a4w4", "w9a8"):
        with pytest.raises(OptionError):
            parse_qat(bad)
    q = make_model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
                   [("x", [1, 4])], [("y", [1, 4])], [("s", np.array(0.1, np.float32))])
    with pytest.raises(OptionError, match="already quantized"):
        prepare_qat(q, "w8a8", None)


def test_checkpoint_resume_and_fingerprint_guard(tmp_path):
    pytest.importorskip("torch")
    from onnxopt.errors import OptionError
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = tiny_classifier()
    student = perturbed(teacher)
    ds = open_ds(data_file(tmp_path, n=32), student)
    ck = tmp_path / "ck"
    common = dict(lr=1e-3, batch_size=16, progress=False, log=lambda m: None, threads=1, checkpoint=str(ck))
    first = finetune(student, ds, teacher=teacher, config=FinetuneConfig(epochs=1, **common))
    assert (ck / "finetune.pt").is_file() and len(first.history) == 1
    logs = []
    resumed = finetune(student, ds, teacher=teacher, config=FinetuneConfig(epochs=2, resume=True, **{**common, "log": logs.append}))
    assert [h["epoch"] for h in resumed.history] == [1, 2] and any("resumed" in m for m in logs)
    with pytest.raises(OptionError, match="another model"):
        finetune(teacher, ds, teacher=teacher, config=FinetuneConfig(epochs=2, resume=True, **common))


def test_supervised_user_loss_and_nothing_to_learn(tmp_path):
    pytest.importorskip("torch")
    from onnxopt.errors import OptionError
    from onnxopt.torch.train import FinetuneConfig, finetune
    model = tiny_classifier()
    labels = np.arange(32) % 10
    ds = open_ds(data_file(tmp_path, n=32, labels=labels), model)
    loss_py = tmp_path / "myloss.py"
    loss_py.write_text("calls = []\ndef loss(s, t, y, batch):\n    assert y is not None and t is None\n    return 0.0 * s[0].sum()\n")
    res = finetune(model, ds, config=FinetuneConfig(epochs=20, lr=1e-2, batch_size=16, progress=False, log=lambda m: None, threads=1,
                                                    user_loss=f"{loss_py}:loss"))

    def ce(m):
        z = run(m, {"input": rand(32, 3, 8, 8, seed=7)})["logits"].astype(np.float64)
        z -= z.max(1, keepdims=True)
        return float(-(z[np.arange(32), labels] - np.log(np.exp(z).sum(1))).mean())
    assert ce(res.model) < ce(model) - 0.3  # cross entropy on the labels went down
    ds_nolabel = open_ds(data_file(tmp_path, n=32), model)
    with pytest.raises(OptionError, match="nothing to learn"):
        finetune(model, ds_nolabel, config=FinetuneConfig(epochs=1, progress=False, log=lambda m: None))


def test_bn_recalibration_estimates_data_statistics(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxopt.torch.convert import to_torch
    from onnxopt.torch.train import recalibrate_bn
    model = tiny_classifier()
    module = to_torch(model)
    x = torch.from_numpy(rand(64, 3, 8, 8, seed=7))
    recalibrate_bn(module, {"input": x}, 16, torch.device("cpu"))
    with torch.no_grad():
        c1 = torch.nn.functional.conv2d(x, module.value("w1"), module.value("b1"), padding=1)
    np.testing.assert_allclose(module.value("mu").numpy(), c1.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(module.value("var").numpy(), c1.var((0, 2, 3), unbiased=True).numpy(), rtol=1e-4, atol=1e-5)


def test_cli_finetune_distillation(tmp_path):
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from onnxopt.cli import cli
    from onnxopt.errors import OptionError
    teacher, student = tiny_classifier(), perturbed(tiny_classifier())
    onnx.save(teacher, tmp_path / "t.onnx")
    onnx.save(student, tmp_path / "s.onnx")
    data = data_file(tmp_path, n=32)
    r = CliRunner().invoke(cli, ["finetune", str(tmp_path / "s.onnx"), "-o", str(tmp_path / "out.onnx"), "--data", str(data), "--teacher",
                                 str(tmp_path / "t.onnx"), "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--threads", "1",
                                 "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "epoch 2/2" in r.output and "parity" in r.output
    out = onnx.load(tmp_path / "out.onnx")
    assert any(p.key == "onnxopt.finetune" for p in out.metadata_props)
    r2 = CliRunner().invoke(cli, ["finetune", str(tmp_path / "s.onnx"), "-o", str(tmp_path / "o2.onnx"), "--data", str(data)])
    assert isinstance(r2.exception, OptionError) and "nothing to learn" in str(r2.exception)
    assert not (tmp_path / "o2.onnx").exists()


def test_finetune_without_torch_is_a_clear_error(tmp_path):
    """torch is optional: `import onnxopt` and the CLI work without it; finetune says what to install."""
    onnx.save(tiny_classifier(), tmp_path / "m.onnx")
    code = ("import sys; sys.modules['torch'] = None\n"
            "import onnxopt, onnxopt.cli\n"
            f"onnxopt.cli.main(['finetune', {str(tmp_path / 'm.onnx')!r}, '-o', {str(tmp_path / 'o.onnx')!r}, '--data', 'random'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "needs the optional package 'torch'" in r.stderr and "pip install torch" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    pytest.importorskip("torch")
    teacher, student = tiny_classifier(), perturbed(tiny_classifier())
    onnx.save(teacher, tmp_path / "t.onnx")
    onnx.save(student, tmp_path / "s.onnx")
    data = data_file(tmp_path, n=32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous (port 0 is not accepted by torchrun's static rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "onnxopt", "finetune",
           str(tmp_path / "s.onnx"), "-o", str(tmp_path / "ddp.onnx"), "--data", str(data), "--teacher", str(tmp_path / "t.onnx"),
           "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = onnx.load(tmp_path / "ddp.onnx")
    before = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert not np.array_equal(before["fc"], after["fc"])  # trained
    assert r.stderr.count("epoch 1/1") == 1  # only rank 0 logs


def test_feature_loss_with_onnxruntime_teacher(tmp_path):
    pytest.importorskip("torch")
    from onnxopt.errors import OptionError
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = tiny_classifier()
    student = perturbed(teacher)
    ds = open_ds(data_file(tmp_path, n=32), student)
    x = rand(16, 3, 8, 8, seed=5)

    def feature_gap(m):
        from onnx import helper as h
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.append(h.make_empty_tensor_value_info("r1"))
        return run(probe, {"input": x})["r1"]
    before = np.abs(feature_gap(student) - feature_gap(teacher)).mean()
    res = finetune(student, ds, teacher=teacher, config=FinetuneConfig(
        epochs=4, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1, feature_loss=["r1"],
        feature_weight=10.0, teacher_runtime="ort", bn_mode="frozen"))
    assert np.abs(feature_gap(res.model) - feature_gap(teacher)).mean() < before
    with pytest.raises(OptionError, match="not in the model"):
        finetune(student, ds, teacher=teacher, config=FinetuneConfig(epochs=1, progress=False, log=lambda m: None, feature_loss=["nope"]))


def test_auto_features_pick_shared_activations_of_same_shape(tmp_path):
    pytest.importorskip("torch")
    from onnxopt import manager
    from onnxopt.errors import OptionError
    from onnxopt.registry import PassContext
    from onnxopt.torch.train import FinetuneConfig, auto_features, finetune
    teacher = tiny_classifier()
    assert auto_features(teacher, perturbed(teacher)) == ["r1", "r2"]
    pruned = onnx.ModelProto()           # conv1 narrowed to 6 channels: r1 no longer matches the teacher's
    pruned.CopyFrom(teacher)
    arrays = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for name, cut in (("w1", lambda a: a[:6]), ("b1", lambda a: a[:6]), ("g", lambda a: a[:6]), ("be", lambda a: a[:6]),
                      ("mu", lambda a: a[:6]), ("var", lambda a: a[:6]), ("w2", lambda a: a[:, :6])):
        next(t for t in pruned.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(cut(arrays[name]), name))
    assert auto_features(teacher, pruned) == ["r2"]
    qdq, _ = manager.apply(teacher, "qdq", {"qdq": {"calib_method": "minmax"}},
                           context=PassContext(data=lambda: iter([{"input": rand(2, 3, 8, 8, seed=i)} for i in range(4)]), progress=False),
                           summarize_layers=False)
    assert auto_features(teacher, qdq) == ["r1", "r2"]      # Q/DQ after a tensor keeps its name
    ds = open_ds(data_file(tmp_path, n=16), teacher)
    logs = []
    finetune(perturbed(teacher), ds, teacher=teacher, config=FinetuneConfig(epochs=1, progress=False, log=logs.append, threads=1,
                                                                             feature_loss=["auto"]))
    assert any("feature distillation on 2 tensors" in m for m in logs)
    with pytest.raises(OptionError, match="needs a --teacher"):
        finetune(teacher, ds, config=FinetuneConfig(epochs=0, progress=False, log=lambda m: None, feature_loss=["auto"]))


def test_epochs_zero_with_bn_recalib_needs_no_teacher(tmp_path):
    """`--epochs 0 --bn-recalib`: only re-estimate BN statistics (e.g. right after pruning)."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    model = tiny_classifier()
    ds = open_ds(data_file(tmp_path, n=32), model)
    res = finetune(model, ds, config=FinetuneConfig(epochs=0, bn_recalib=True, batch_size=16, progress=False, log=lambda m: None, threads=1))
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert not np.allclose(before["mu"], after["mu"]) and np.array_equal(before["w1"], after["w1"])


def fixed_batch_classifier(tail="reshape"):
    """tiny_classifier exported with a fixed batch of 1: GAP -> Reshape([1, 8]) -> Gemm (what
    EfficientNet-Lite0's export does), or with ``tail="concat"`` a Concat with a constant [1, 0]
    after it: a no-op at batch 1 that also fixes the batch, and is not a Reshape."""
    m = tiny_classifier()
    g = m.graph
    for v in list(g.input) + list(g.output):
        v.type.tensor_type.shape.dim[0].Clear()
        v.type.tensor_type.shape.dim[0].dim_value = 1
    flatten = next(n for n in g.node if n.op_type == "Flatten")
    idx = list(g.node).index(flatten)
    g.node.remove(flatten)
    g.initializer.append(numpy_helper.from_array(np.array([1, 8], np.int64), "flat_shape"))
    new = [helper.make_node("Reshape", ["gap", "flat_shape"], ["flat" if tail == "reshape" else "flat0"], name="reshape")]
    if tail == "concat":
        g.initializer.append(numpy_helper.from_array(np.zeros((1, 0), np.float32), "empty"))
        new.append(helper.make_node("Concat", ["flat0", "empty"], ["flat"], axis=1, name="concat"))
    for k, n in enumerate(new):
        g.node.insert(idx + k, n)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_fixed_batch_export_trains_at_larger_batches(tmp_path):
    """A batch-1 export trains at batch 16 (Reshape shapes follow the running batch); the written
    model keeps its batch-1 interface and matches onnxruntime. Other batch-fixing ops: clear error."""
    pytest.importorskip("torch")
    from onnxopt.errors import OptionError
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = fixed_batch_classifier()
    student = perturbed(teacher)
    path = data_file(tmp_path)
    xs = rand(16, 3, 8, 8, seed=99)
    kl = lambda m: float(np.mean([kl_to_teacher(m, teacher, xs[i:i + 1]) for i in range(len(xs))]))  # noqa: E731
    before = kl(student)
    cfg = FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1)
    res = finetune(student, open_ds(path, student), teacher=teacher, config=cfg)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert kl(res.model) < 0.5 * before
    assert res.parity["max_abs"] <= 1e-4
    bad = fixed_batch_classifier("concat")
    with pytest.raises(OptionError, match="fixes its batch at 1 and cannot run a batch of 16"):
        finetune(bad, open_ds(path, bad), teacher=bad, config=cfg)


def test_fixed_batch_teacher_in_onnxruntime_runs_in_slices(tmp_path):
    """--teacher-runtime ort with a batch-1 teacher: onnxruntime takes the batch of 16 in slices
    of 1 (it refused the batch before)."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher = fixed_batch_classifier()
    student = perturbed(teacher)
    path = data_file(tmp_path)
    cfg = FinetuneConfig(epochs=2, lr=3e-3, batch_size=16, progress=False, log=lambda m: None, threads=1, teacher_runtime="ort")
    res = finetune(student, open_ds(path, student), teacher=teacher, config=cfg)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.parity["max_abs"] <= 1e-4


def test_bn_statistics_through_identity_need_cleanup(tmp_path):
    """A training-mode TorchScript export feeds BN running statistics through Identity nodes:
    the converter says to run cleanup (torch refused to normalize with them, with a traceback),
    and after cleanup the model trains; a teacher like that is named as the teacher."""
    pytest.importorskip("torch")
    import onnxopt
    from onnxopt.errors import OnnxoptError
    from onnxopt.torch.train import FinetuneConfig, finetune
    m = tiny_classifier()
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    ids = [helper.make_node("Identity", [bn.input[i]], [f"{bn.input[i]}_alias"], name=f"id{i}") for i in (3, 4)]
    bn.input[3], bn.input[4] = ids[0].output[0], ids[1].output[0]
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(ids + nodes)
    onnx.checker.check_model(m, full_check=True)
    path = data_file(tmp_path)
    cfg = FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, progress=False, log=lambda msg: None, threads=1)
    with pytest.raises(OnnxoptError, match="reads its running statistics from computed tensors"):
        finetune(m, open_ds(path, m), teacher=tiny_classifier(), config=cfg)
    clean, _ = onnxopt.apply(m, "cleanup")
    with pytest.raises(OnnxoptError, match="the teacher cannot run in torch"):
        finetune(clean, open_ds(path, clean), teacher=m, config=cfg)
    res = finetune(clean, open_ds(path, clean), teacher=tiny_classifier(), config=cfg)
    assert res.parity["max_abs"] <= 1e-4


def test_recovery_defaults_follow_the_model_and_the_data():
    """finetune's defaults: a pruned student (fewer parameters than its teacher) gets the larger
    learning rate, a same-shape one the small one; epochs from the data size; augmentation only
    for label-free distillation of images; a held-in split only when there is data to spare."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import MAX_EPOCHS, recovery_defaults
    teacher = tiny_classifier()
    pruned = onnx.ModelProto()
    pruned.CopyFrom(teacher)
    for t in pruned.graph.initializer:
        if t.name in ("w2", "fc"):   # a thinner conv2 would change the shapes; fewer parameters is what counts
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(a[: len(a) // 2], t.name))
    d = recovery_defaults(pruned, teacher, 717, 32)
    assert d["lr"][0] == 1e-3 and d["feature_loss"][0] == ["auto"] and d["augment"][0] and d["val_split"][0] == 0.03
    assert d["epochs"][0] == MAX_EPOCHS - 1   # 10,000 samples / 717 per epoch
    same = recovery_defaults(perturbed(teacher), teacher, 100, 32, labels=True)
    assert same["lr"][0] == 1e-4 and not same["augment"][0] and same["val_split"][0] == 0.0 and same["epochs"][0] == MAX_EPOCHS
    qat = recovery_defaults(teacher, teacher, 50000, 64, qat=True)
    assert qat["feature_loss"][0] == [] and qat["epochs"][0] == 1 and qat["lr"][0] == pytest.approx(1e-4 * 2 ** 0.5, rel=1e-2)


def test_early_stopping_keeps_the_best_held_in_epoch(tmp_path):
    """With a held-in split, every epoch reports its held-in loss, training stops once it has not
    fallen for `patience` epochs, and the written model is the epoch with the lowest one (a too
    large learning rate makes later epochs worse)."""
    pytest.importorskip("torch")
    from onnxopt.torch.train import FinetuneConfig, finetune
    teacher, student = tiny_classifier(), perturbed(tiny_classifier(), scale=1.0)
    data = open_ds(data_file(tmp_path, n=96), student)
    said = []
    cfg = FinetuneConfig(epochs=8, lr=0.3, optimizer="sgd", batch_size=16, val_split=0.25, patience=2, warmup=0.0, progress=False,
                         log=said.append, threads=1, parity_samples=0)
    res = finetune(student, data, teacher=teacher, config=cfg)
    losses = [h["held_in_loss"] for h in res.history]
    best = int(np.argmin(losses))
    assert any(s.startswith("held in 24 of 96") for s in said)
    assert len(losses) == min(8, best + 1 + 2)          # stopped `patience` epochs after the best one
    if best != len(losses) - 1:
        assert any(f"kept the weights of epoch {best + 1}" in s for s in said)
    # the written model is the best epoch's: its loss on the held-in samples is the lowest seen
    import torch
    from onnxopt.torch.train import distill_loss
    order = torch.randperm(96, generator=torch.Generator().manual_seed(cfg.seed + 7919))[:24].numpy()
    x = rand(96, 3, 8, 8, seed=7)[order]
    s, t = (torch.from_numpy(run(m, {"input": x})["logits"]) for m in (res.model, teacher))
    assert float(distill_loss(s, t, cfg.temperature)) == pytest.approx(min(losses), rel=1e-4)
