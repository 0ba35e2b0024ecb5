"""The task-aware error metric (onnxopt.task_metric), calib_method=auto and the default fallback."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

import se_models
from helpers import make_model, nms_detector, rand, run
from onnxopt import manager, task_metric
from onnxopt.registry import PassContext


def _classifier(softmax: bool = True, through_flatten: bool = True):
    """x [N, 8] -> Gemm -> Softmax (-> Flatten): the output is probabilities, the logits inside."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc", transB=1)]
    last = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["prob"], name="sm", axis=1))
        last = "prob"
    if through_flatten:
        nodes.append(helper.make_node("Flatten", [last], ["flat"], name="flat", axis=1))
        last = "flat"
    return make_model(nodes, [("x", ["N", 8])], [(last, ["N", 5])], [("w", rand(5, 8, seed=1)), ("b", rand(5, seed=2))])


def test_logits_found_before_a_terminal_softmax():
    m = _classifier()
    assert task_metric.logit_tensors(m) == {"flat": ("logits", "Softmax")}
    aug, mapping = task_metric.with_logit_outputs(m)
    assert mapping == {"flat": "logits"} and [o.name for o in aug.graph.output] == ["flat", "logits"]
    plain = _classifier(softmax=False, through_flatten=False)
    assert task_metric.logit_tensors(plain) == {"logits": ("logits", None)}
    assert task_metric.with_logit_outputs(plain)[0] is plain


def test_agreement_kl_and_sqnr_by_hand():
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    cand = ref.copy()
    cand[1] = [0.0, 0.0, 1.0]  # one flipped top-1 of four
    e = task_metric.measure([ref], [cand], ["y"])
    o = e.outputs[0]
    assert o.classifier and o.top1_agreement == 0.75 and math.isclose(o.agreement_loss, 25.0)
    lp = ref[1] - np.log(np.exp(ref[1]).sum())
    lq = cand[1] - np.log(np.exp(cand[1]).sum())
    assert math.isclose(o.kl, float(np.sum(np.exp(lp) * (lp - lq))) / 4, rel_tol=1e-9)
    err2 = float(np.sum((cand - ref) ** 2))
    assert math.isclose(o.sqnr_db, 10 * math.log10(float(np.sum(ref ** 2)) / err2), rel_tol=1e-9)
    assert not e.within(task_metric.Budget(max_agreement_loss=1.0)) and e.within(task_metric.Budget(max_agreement_loss=25.0))
    # the calibration search's measure: the noise-to-signal ratio |r-c|^2/|r|^2, summed over outputs
    assert math.isclose(e.noise(), err2 / float(np.sum(ref ** 2)), rel_tol=1e-9)
    two = task_metric.measure([ref, ref], [cand, ref], ["y", "z"])
    assert math.isclose(two.noise(), e.noise(), rel_tol=1e-12)
    # a detector-like output: no agreement, error figures only; a non-finite candidate is an infinite error
    box = rand(1, 6, 4)
    bad = box.copy()
    bad[0, 0, 0] = np.inf
    d = task_metric.measure([box], [bad], ["boxes"]).outputs[0]
    assert not d.classifier and d.top1_agreement is None and d.rel_error == math.inf and d.sqnr_db == -math.inf


def test_softmax_hides_what_the_logits_show():
    """Logits shrunk 4x keep every top-1 but change the probabilities a lot; logits shifted by a
    constant change nothing a classifier sees: the metric on the logits says both, the relative
    error of the Softmax output does not."""
    m = _classifier()
    feeds = [{"x": rand(16, 8, seed=s, scale=3)} for s in range(3)]
    ev = task_metric.Evaluator(m, feeds)
    shrunk = _classifier()
    for t in shrunk.graph.initializer:
        t.CopyFrom(__import__("onnx").numpy_helper.from_array(__import__("onnx").numpy_helper.to_array(t) * 0.25, t.name))
    e = ev.error(shrunk)
    assert e.outputs[0].measured == "logits" and e.outputs[0].activation == "Softmax"
    assert e.agreement_loss == 0.0 and e.outputs[0].kl > 0.01 and e.rel_error > 0.5
    assert ev.error(_classifier()).objective() == 0.0
    one = task_metric.task_error(m, shrunk, feeds)
    assert one.agreement_loss == 0.0 and math.isclose(one.outputs[0].kl, e.outputs[0].kl) and "top-1 agreement 100.00 %" in one.summary()


def test_held_in_samples_replay_without_reading_again():
    reads = []

    def data():
        for s in range(3):
            reads.append(s)
            yield {"x": rand(2, 8, seed=s)}

    held = task_metric.HeldIn(data, limit=16)
    assert len(list(held())) == 3 and held.complete and len(reads) == 3
    assert len(list(held())) == 3 and len(reads) == 3          # replayed
    small = task_metric.HeldIn(data, limit=3)                  # 6 samples do not fit in 3
    list(small())
    assert not small.complete and len(list(small())) == 3 and len(reads) == 9


def test_each_evaluation_frees_the_candidates_before_it():
    """A candidate built through the graph IR is a reference cycle holding its weights; the
    evaluator collects such garbage after each measurement, so a search's memory does not grow
    with its evaluations (it kept one EfficientNet-Lite0 copy per evaluation)."""
    import weakref

    class Node:   # stands in for an IR graph: nodes <-> tensors
        pass

    ev = task_metric.Evaluator(_classifier(), [{"x": rand(4, 8)}])
    a, b = Node(), Node()
    a.peer, b.peer, a.weights = b, a, np.zeros(1 << 20, np.float32)
    alive = weakref.ref(a)
    del a, b
    ev.error(_classifier())
    assert alive() is None


@pytest.fixture(scope="module")
def se_case():
    m = se_models.mobilenetv3_se(bad_scale=2.0)
    return m, se_models.image_like_inputs(48)


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_calib_auto_reports_each_tensor_and_takes_the_least_noisy_method(se_case, target):
    m, feeds = se_case
    logs = []
    ctx = PassContext(data=lambda: iter(feeds), progress=False, log=logs.append)
    q, report = manager.apply(m, "qdq", {"qdq": {"target": target, "fallback": "none"}}, context=ctx, summarize_layers=False)
    rec = report.passes[0]
    cal = rec.extra["info"]["calibration"]
    placed = {a["tensor"] for a in rec.extra["info"]["activations"]}
    assert cal["method"] == "auto" and cal["search"] == "uniform" and set(cal["choices"]) == placed
    # one method for every tensor: the one whose Q/DQ model has the least output noise on the held-in samples
    best = min(cal["uniform_objective"], key=cal["uniform_objective"].get)
    assert set(cal["choices"].values()) == {best} and cal["evaluations"] == 4
    assert cal["objective_end"] == cal["uniform_objective"][best] == min(cal["uniform_objective"].values())
    # ... measured as the report says: the output noise of that model against the float one on those samples
    fixed, _ = manager.apply(m, "qdq", {"qdq": {"target": target, "fallback": "none", "bias_correction": "none", "calib_method": best}},
                             context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    noise = task_metric.Evaluator(m, feeds, limit=cal["samples"]).error(fixed).noise()
    assert math.isclose(noise, cal["objective_end"], rel_tol=1e-6)
    assert any(line.startswith("calibration auto:") for line in logs)
    assert rec.extra["check"]["violations"] == 0


def test_calib_auto_per_tensor_search_refines_from_the_best_uniform_method(se_case):
    m, feeds = se_case[0], se_models.image_like_inputs(160)   # the budget: 2 evaluated samples per sample read
    ctx = PassContext(data=lambda: iter(feeds), progress=False)
    _, report = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "fallback": "none", "calib_search": "per_tensor"}},
                              context=ctx, summarize_layers=False)
    cal = report.passes[0].extra["info"]["calibration"]
    assert cal["search"] == "per_tensor" and cal["chunks"] > 0 and cal["evaluations"] > 4
    assert set(cal["choices"].values()) <= {"minmax", "percentile", "entropy", "mse"}
    # greedy from the best uniform method, keeping only moves that lower the measure
    assert cal["objective_end"] <= min(cal["uniform_objective"].values())


def test_default_fallback_meets_the_agreement_budget():
    """4-bit weights lose many agreement points; the default fallback=auto keeps the fewest layers
    in float that bring the loss within 1 point on the calibration samples, and says so."""
    m, feeds = se_models.mobilenetv3_se(bad_scale=1.0), se_models.image_like_inputs(48)
    logs = []
    ctx = PassContext(data=lambda: iter(feeds), progress=False, log=logs.append)
    q, report = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "weight_bits": 4, "calib_method": "minmax"}},
                              context=ctx, summarize_layers=False)
    fb = report.passes[0].extra["recovery"]["fallback"]
    assert fb["agreement_loss_before"] > 1.0 and fb["met"] and fb["agreement_loss_after"] <= 1.0
    info = report.passes[0].extra["info"]
    assert 0 < len(fb["high_precision_layers"]) < len(info["layers"]) + len(info["activations"])
    assert report.passes[0].extra["check"]["violations"] == 0
    line = next(l for l in logs if l.startswith("fallback: "))
    kept, units = map(int, re.match(r"fallback: (\d+) of (\d+) unit\(s\) kept in float \(", line).groups())
    assert kept == len(fb["high_precision_layers"]) < units <= len(info["layers"]) + len(info["activations"])
    assert f"{100 * fb['high_precision_mac_share']:.0f} % of the MACs" in line
    # no "kept all" / "not reachable" warning; the one about a costly fallback exactly when it is costly
    assert not any("kept all" in line or "is not reachable" in line for line in logs)
    assert ("warning" in fb) == (fb["high_precision_mac_share"] > 0.5)
    assert sum("fallback=auto: the budget" in line for line in logs) == ("warning" in fb)
    # off with fallback=none
    q2, r2 = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "weight_bits": 4, "calib_method": "minmax", "fallback": "none"}},
                           context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    assert "fallback" not in r2.passes[0].extra.get("recovery", {})


def test_pass_summaries_measure_the_logits_behind_a_softmax():
    """The manager's per-pass output change (onnxopt.output_change) is the task metric: a change of
    the logits that a saturated Softmax hides is reported at its real size."""
    from onnx import numpy_helper

    from onnxopt import output_change

    before, after = _classifier(), _classifier()
    wb = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer}
    for init in after.graph.initializer:
        if init.name == "w":  # scaled weights: the same argmax, very different logits
            init.CopyFrom(numpy_helper.from_array(3.0 * wb["w"], "w"))
    x = 4.0 * rand(16, 8, seed=3)
    change = output_change.measure(before, after, [{"x": x}])
    ref = x.astype(np.float64) @ wb["w"].T + wb["b"]
    cand = x.astype(np.float64) @ (3.0 * wb["w"]).T + wb["b"]
    out = change["outputs"]["flat"]
    assert out["measured"] == "logits" and out["activation"] == "Softmax"
    assert out["rel_error"] == pytest.approx(np.linalg.norm(cand - ref) / np.linalg.norm(ref), rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert out["kl"] > 0 and "on the logits before the final Softmax" in output_change.describe(change)


def test_fallback_that_keeps_everything_in_float_says_so():
    """W4A4: no layer can be quantized within a 1-point budget; the default fallback then returns
    (nearly) the float model, and one warning line says so and names the ways out."""
    m, feeds = se_models.mobilenetv3_se(bad_scale=1.0), se_models.image_like_inputs(48)
    logs = []
    _, report = manager.apply(m, "qdq", {"qdq": {"target": "ort", "weight_bits": 4, "activation_bits": 4, "calib_method": "minmax"}},
                              context=PassContext(data=lambda: iter(feeds), progress=False, log=logs.append), summarize_layers=False)
    fb = report.passes[0].extra["recovery"]["fallback"]
    info = report.passes[0].extra["info"]
    assert len(fb["high_precision_layers"]) >= len(info["layers"])
    lines = [line for line in logs if line.startswith("WARNING: fallback=auto: the budget")]
    assert len(lines) == 1 and "qdq.fallback=none" in lines[0] and "max_agreement_loss" in lines[0]
    assert lines[0] in report.passes[0].extra["warnings"]


def test_a_check_that_misses_the_agreement_budget_stops_early_with_the_same_verdict():
    m = _classifier()
    feeds = [{"x": rand(1, 8, seed=100 + i)} for i in range(200)]
    ev = task_metric.Evaluator(m, feeds)
    budget = task_metric.Budget(max_agreement_loss=1.0, confidence=0.84)
    for noise in (0.0, 0.02, 0.3, 1.0):
        cand = _classifier()
        w = next(t for t in cand.graph.initializer if t.name == "w")
        w.CopyFrom(helper.make_tensor("w", w.data_type, w.dims, (rand(5, 8, seed=1) + noise * rand(5, 8, seed=9)).ravel()))
        full, early = ev.error(cand), ev.error(cand, budget=budget)
        assert early.within(budget) == full.within(budget)
        assert not full.stopped_early
        if full.within(budget):   # a passing check reads every sample and gives the full figures
            assert not early.stopped_early and early.outputs[0].samples == 200 and early.agreement_loss == full.agreement_loss
        elif noise >= 0.3:        # many disagreements: decided long before the last sample
            assert early.stopped_early and early.outputs[0].samples < 100
    # the first samples only (as the ranking reads them) are never cut short
    assert not ev.error(cand, samples=32, budget=budget).stopped_early


# ------------------------------------------------------------------------------ data-dependent outputs
def _shifted(model, noise: float):
    """``model`` with noise on its box/score conv weights, as quantization adds: the NMS keeps a
    different number of boxes on some inputs."""
    import onnx
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == "w2":
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(w + rand(*w.shape, seed=9, scale=noise * float(w.std())), t.name))
    return out


def _detector_feeds():
    return [{"x": rand(1, 3, 32, 32, seed=s)} for s in range(8)]


def test_a_selection_output_is_measured_on_what_it_selects_from():
    """A detector exported with its NMS: the selected indices and scores change length between the
    float model and a quantized one (before, every measurement refused the pair: "output 'sel' has
    shape [27, 3] in the reference but [28, 3]"). The boxes and scores the NMS reads are compared."""
    m = nms_detector(end2end=True)
    assert task_metric.logit_tensors(m) == {"sel:NonMaxSuppression[0]": ("boxes", "NonMaxSuppression"),
                                            "sel:NonMaxSuppression[1]": ("scores", "NonMaxSuppression")}
    assert task_metric.data_dependent_outputs(m) == {"sel", "det_scores"}
    feeds = _detector_feeds()
    cand = _shifted(m, 0.05)
    lengths = [(run(m, f)["sel"].shape[0], run(cand, f)["sel"].shape[0]) for f in feeds]
    assert any(a != b for a, b in lengths), lengths        # the pair really selects differently
    e = task_metric.Evaluator(m, feeds).error(cand)
    assert [o.measured for o in e.outputs] == ["boxes", "scores"]
    boxes = e.outputs[0]
    assert 0 < boxes.rel_error < 0.1 and math.isfinite(boxes.sqnr_db)   # 5 % weight noise: a few % box error
    assert "('boxes', read by NonMaxSuppression)" in e.summary()
    # when the detector also outputs its boxes and scores, those are measured (on the logits before
    # the Sigmoid), once; the selection adds nothing
    plain = nms_detector(end2end=False)
    assert task_metric.logit_tensors(plain) == {"scores": ("cls", "Sigmoid"), "boxes": ("boxes", task_metric.FEATURES)}
    assert task_metric.data_dependent_outputs(plain) == {"sel"}


def test_compare_and_qdq_take_a_detector_with_its_nms():
    from onnxopt.compare import compare_models
    m = nms_detector(end2end=True)
    res = compare_models(m, _shifted(m, 0.05), data=None, runs=0, generated_samples=8)
    rows = {o["name"]: o for o in res["outputs"]}
    assert rows["sel"]["data_dependent"] and rows["sel"]["shape_changes"] > 0 and rows["sel"]["top1_agreement"] is None
    feeds = _detector_feeds()
    for target in ("ort", "tensorrt"):
        q, report = manager.apply(m, "qdq", {"qdq": {"target": target}},
                                  context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
        rec = report.passes[0]
        assert rec.changes["weights_quantized"] == 2
        change = rec.output_change
        assert set(change["outputs"]) == {"sel:NonMaxSuppression[0]", "sel:NonMaxSuppression[1]"}, change
        assert change["cosine"] > 0.99


def _normalized_embedding(exporter: str, tmp_path):
    """A torch CNN ending in F.normalize (a retrieval / face-recognition embedding), exported as users do."""
    torch = pytest.importorskip("torch")

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 16)

        def forward(self, x):
            return torch.nn.functional.normalize(self.fc(torch.relu(self.conv(x)).mean((2, 3))), dim=1)

    path = tmp_path / f"embed_{exporter}.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Embed().eval(), (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"], output_names=["out"],
                          opset_version=18 if exporter == "dynamo" else 17, dynamo=exporter == "dynamo",
                          **({} if exporter == "dynamo" else {"dynamic_axes": {"x": {0: "N"}}}))
    return onnx.load(str(path))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_l2_normalized_embedding_is_measured_as_features_not_class_scores(exporter, tmp_path):
    """The argmax of an embedding decides nothing: an L2-normalized output gets error figures only,
    and fallback=auto's agreement budget does not keep layers in float for it."""
    m = _normalized_embedding(exporter, tmp_path)
    assert task_metric.logit_tensors(m) == {"out": ("out", task_metric.FEATURES)}
    feeds = [{"x": rand(2, 3, 16, 16, seed=s)} for s in range(8)]   # the dynamo export's batch is fixed
    err = task_metric.task_error(m, m, feeds)
    assert not err.classifier and err.outputs[0].top1_agreement is None and "out (not class scores)" in err.summary()
    logs = []
    q, report = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "weight_bits": 4}},
                              context=PassContext(data=lambda: iter(feeds), progress=False, log=logs.append), summarize_layers=False)
    fb = report.passes[0].extra["recovery"]["fallback"]
    assert fb["agreement_loss_before"] is None and fb["high_precision_layers"] == [] and "features" in fb["note"]
    assert "out (not class scores): SQNR" in next(line for line in logs if line.startswith("fallback: "))
    # compare: no top-1 column, and the data check has no "every sample gets the same class" to say
    from onnxopt.compare import compare_models
    from onnxopt.sanity import check_outputs
    res = compare_models(m, q, data=None, runs=0, generated_samples=8)
    assert res["outputs"][0]["top1_agreement"] is None and res["outputs"][0]["cosine"] > 0.9
    # an embedding whose first dimension always dominates is no model that gives every input one class
    from onnxopt.data import DataSpec, open_data
    biased = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["f"], transB=1),
                         helper.make_node("LpNormalization", ["f"], ["out"], axis=1, p=2)], [("x", ["N", 8])], [("out", ["N", 6])],
                        [("w", rand(6, 8, seed=1)), ("b", np.array([50, 0, 0, 0, 0, 0], np.float32))])
    np.save(tmp_path / "x.npy", rand(32, 8, seed=2))
    assert not check_outputs(biased, open_data(DataSpec(str(tmp_path / "x.npy"), batch_size=4), biased))
    scores = make_model(biased.graph.node[:1], [("x", ["N", 8])], [("f", ["N", 6])], biased.graph.initializer)
    assert any("same class" in w for w in check_outputs(scores, open_data(DataSpec(str(tmp_path / "x.npy"), batch_size=4), scores)))


def test_features_are_recognised_by_the_norm_on_the_graph_or_by_name():
    x_in, w = ("x", ["N", 8]), [("w", rand(6, 8, seed=1))]
    fc = helper.make_node("Gemm", ["x", "w"], ["f"], transB=1)
    by_hand = {   # Sqrt(ReduceSum(f * f)) with an eps clamp; LpNormalization; ReduceSumSquare -> Sqrt
        "sqrt_sum": [helper.make_node("Mul", ["f", "f"], ["sq"]), helper.make_node("ReduceSum", ["sq", "ax"], ["ss"], keepdims=1),
                     helper.make_node("Sqrt", ["ss"], ["n"]), helper.make_node("Max", ["eps", "n"], ["nc"]),
                     helper.make_node("Div", ["f", "nc"], ["y"])],
        "lp": [helper.make_node("LpNormalization", ["f"], ["y"], axis=1, p=2)],
        "sum_square": [helper.make_node("ReduceSumSquare", ["f", "ax"], ["ss"], keepdims=1),
                       helper.make_node("Sqrt", ["ss"], ["n"]), helper.make_node("Div", ["f", "n"], ["y"])],
    }
    consts = [("ax", np.array([1], np.int64)), ("eps", np.array([1e-12], np.float32))]
    for name, nodes in by_hand.items():
        m = make_model([fc] + nodes, [x_in], [("y", ["N", 6])], w + consts, opset=18)
        assert task_metric.logit_tensors(m)["y"] == ("y", task_metric.FEATURES), name
    # dividing by something else (a temperature, another tensor's norm) is no normalization
    other = make_model([fc, helper.make_node("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1), helper.make_node("Div", ["f", "n"], ["y"])],
                       [x_in], [("y", ["N", 6])], w, opset=17)
    assert task_metric.logit_tensors(other)["y"] == ("y", None)
    # by name, as whole words: embeddings, pooled / hidden states, box and landmark regressions
    for out, features in (("image_embeds", True), ("pooler_output", True), ("last_hidden_state", True), ("bbox_pred", True),
                          ("fc1_feat", True), ("landmarks", True), ("emb", True), ("logits", False), ("output", False),
                          ("prob", False), ("scores", False), ("495", False), ("depthwise_out", False)):
        m = make_model([helper.make_node("Gemm", ["x", "w"], [out], transB=1)], [x_in], [(out, ["N", 6])], w)
        assert (task_metric.logit_tensors(m)[out][1] == task_metric.FEATURES) is features, out


def test_class_ids_from_an_argmax_are_measured_on_the_scores_they_come_from(tmp_path):
    """A classifier exported with its ArgMax (class ids out, as deployment exports do): the metric,
    the calibration search and the fallback read the logits before it (and before a Softmax under
    it); compare counts the ids' agreement and accuracy against labels."""
    from onnxopt.compare import compare_models

    def with_argmax(softmax: bool):
        m = _classifier(softmax=softmax, through_flatten=False)
        last = m.graph.output[0].name
        m.graph.node.extend([helper.make_node("ArgMax", [last], ["ids"], axis=1, keepdims=1),
                             helper.make_node("Cast", ["ids"], ["label"], to=onnx.TensorProto.INT32)])
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info("label", onnx.TensorProto.INT32, ["N", 1]))
        return m

    assert task_metric.logit_tensors(with_argmax(False)) == {"label": ("logits", "ArgMax")}
    m = with_argmax(True)
    assert task_metric.logit_tensors(m) == {"label": ("logits", "Softmax")}
    assert task_metric.class_id_outputs(m) == {"label"}
    from onnx import numpy_helper
    cand = onnx.ModelProto()
    cand.CopyFrom(m)
    for init in cand.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + rand(5, 8, seed=9, scale=0.3), "w"))
    x = rand(64, 8, seed=4)
    ref_ids, cand_ids = run(m, {"x": x})["label"].reshape(-1), run(cand, {"x": x})["label"].reshape(-1)
    assert 0 < np.sum(ref_ids != cand_ids) < 64
    err = task_metric.task_error(m, cand, [{"x": x}])
    assert err.outputs[0].top1_agreement == pytest.approx(np.mean(ref_ids == cand_ids))
    labels = ref_ids.copy()
    labels[:5] = (labels[:5] + 1) % 5     # the float model is right on 59 of 64
    np.save(tmp_path / "x.npy", x)
    res = compare_models(m, cand, data=str(tmp_path / "x.npy"), labels=labels, runs=0)
    row = res["outputs"][0]
    assert row["classifier"] and row["top1_agreement"] == pytest.approx(np.mean(ref_ids == cand_ids))
    assert res["reference"]["accuracy"] == pytest.approx(59 / 64)
    assert res["candidate"]["accuracy"] == pytest.approx(np.mean(cand_ids == labels))
    assert "label (logits before Softmax): top-1 agreement" in res["task_summary"]
    plain = _classifier(softmax=False, through_flatten=False)   # one-hot labels (Keras' to_categorical): their classes
    np.save(tmp_path / "onehot.npy", np.eye(5, dtype=np.int64)[labels])
    res = compare_models(plain, plain, data=str(tmp_path / "x.npy"), labels=str(tmp_path / "onehot.npy"), runs=0)
    assert res["reference"]["accuracy"] == pytest.approx(np.mean(ref_ids == labels))
    # a top-5 export: TopK's sorted scores (whose argmax is always 0) and indices, both read on the logits
    top = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1),
                      helper.make_node("TopK", ["logits", "k"], ["top_s", "top_i"], axis=1)],
                     [("x", ["N", 8])], [("top_s", ["N", 3]), ("top_i", ["N", 3], onnx.TensorProto.INT64)],
                     [("w", rand(5, 8, seed=1)), ("b", rand(5, seed=2)), ("k", np.array([3], np.int64))])
    assert task_metric.logit_tensors(top) == {"top_s": ("logits", "TopK"), "top_i": ("logits", "TopK")}


def _binary_se(seed: int = 0):
    """The SE test network as a binary classifier: the margin of its two classes' logits, then a
    Sigmoid, output ``prob`` [N, 1] (no argmax to take)."""
    from onnx import numpy_helper
    m = se_models.mobilenetv3_se(bad_scale=1.0, classes=2, seed=seed)
    m.graph.initializer.append(numpy_helper.from_array(np.array([[-1.0], [1.0]], np.float32), "versus"))
    m.graph.node.extend([helper.make_node("MatMul", ["logits", "versus"], ["margin"], name="versus"),
                         helper.make_node("Sigmoid", ["margin"], ["prob"], name="sig")])
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("prob", onnx.TensorProto.FLOAT, [1, 1]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_sigmoid_output_is_measured_by_each_label_decision():
    """Binary and multi-label classifiers end in a Sigmoid: each label is a yes/no of its own. A
    sample agrees when every label's decision (logit > 0) is the same; the KL is the Bernoulli one
    summed over the labels. The argmax read before missed a flipped label that is not the largest,
    and a binary classifier's [N, 1] had no agreement at all."""
    ref = np.array([[2.0, -1.0], [-1.0, 0.5], [0.3, 0.2]])
    cand = ref.copy()
    cand[0, 1] = 0.5          # the second label flips; the argmax (label 0) does not move
    acc = task_metric.Accumulator(["y"], activations={"y": "Sigmoid"})
    acc.update([ref], [cand])
    o = acc.result().outputs[0]
    assert o.classifier and o.decision == task_metric.LABELS and o.top1_agreement == pytest.approx(2 / 3)
    p, q = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-cand))
    bernoulli = np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))
    assert o.kl == pytest.approx(bernoulli / 3, rel=1e-9)
    assert task_metric.measure([ref], [cand]).outputs[0].top1_agreement == 1.0   # read as class scores: unseen
    # a binary classifier, [N, 1] or [N]
    for shape in ((3, 1), (3,)):
        acc = task_metric.Accumulator(["y"], activations={"y": "Sigmoid"})
        acc.update([np.array([1.0, -2.0, 0.1]).reshape(shape)], [np.array([1.2, -1.0, -0.1]).reshape(shape)])
        assert acc.result().outputs[0].agreement_loss == pytest.approx(100 / 3)
    # a mask [N, 1, H, W]: each element its own yes/no, with its Bernoulli KL
    mask, flipped = np.full((2, 1, 2, 2), -1.0), np.full((2, 1, 2, 2), -1.0)
    flipped[1, 0, 0, 1] = 0.5
    acc = task_metric.Accumulator(["m"], activations={"m": "Sigmoid"})
    acc.update([mask], [flipped])
    o = acc.result().outputs[0]
    assert o.decision == task_metric.POSITIONS and o.samples == 8 and o.top1_agreement == pytest.approx(7 / 8)
    p, q = 1 / (1 + np.exp(1.0)), 1 / (1 + np.exp(-0.5))
    assert o.kl == pytest.approx((p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))) / 8, rel=1e-9)
    # on the graph: an ArgMax of a Sigmoid decides by its top-1; boxes squashed into 0..1 are values
    m = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["raw"], transB=1),
                    helper.make_node("Sigmoid", ["raw"], ["pred_boxes"]),
                    helper.make_node("Sigmoid", ["raw"], ["s2"]),
                    helper.make_node("ArgMax", ["s2"], ["ids"], axis=1, keepdims=0)],
                   [("x", ["N", 8])], [("pred_boxes", ["N", 4]), ("ids", ["N"], onnx.TensorProto.INT64)],
                   [("w", rand(4, 8, seed=1)), ("b", rand(4, seed=2))])
    assert task_metric.logit_tensors(m) == {"pred_boxes": ("raw", task_metric.FEATURES), "ids": ("raw", "ArgMax")}


def test_compare_counts_a_multi_label_model_right_on_every_label(tmp_path):
    """Multi-hot labels ([N, C], 0 / 1) for a Sigmoid's [N, C]: a sample is right when every label
    is; the labels agreement counts samples whose every decision agrees."""
    from onnx import numpy_helper
    from onnxopt.compare import compare_models
    m = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["raw"], transB=1), helper.make_node("Sigmoid", ["raw"], ["probs"])],
                   [("x", ["N", 8])], [("probs", ["N", 4])], [("w", rand(4, 8, seed=1)), ("b", rand(4, seed=2))])
    cand = onnx.ModelProto()
    cand.CopyFrom(m)
    cand.graph.initializer[0].CopyFrom(numpy_helper.from_array(rand(4, 8, seed=1) + rand(4, 8, seed=9, scale=0.3), "w"))
    x = rand(64, 8, seed=4)
    ref, got = (run(k, {"x": x})["probs"] > 0.5 for k in (m, cand))
    truth = ref.astype(np.int64)
    truth[:6, 0] = 1 - truth[:6, 0]                   # the float model misses one label of 6 samples
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", truth)
    res = compare_models(m, cand, data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), runs=0)
    assert res["outputs"][0]["decision"] == task_metric.LABELS
    assert res["outputs"][0]["top1_agreement"] == pytest.approx(np.mean((ref == got).all(1)))
    assert res["reference"]["accuracy"] == pytest.approx(58 / 64)
    assert res["candidate"]["accuracy"] == pytest.approx(np.mean((got == (truth != 0)).all(1)))


def test_the_fallback_budget_holds_a_binary_sigmoid_classifier(tmp_path):
    """A binary classifier (Sigmoid, [N, 1]) gets the default agreement budget: 4-bit weights flip
    the decision of 10 % of the samples, and fallback=auto keeps layers in float until it is
    within 1 point (before, the output counted as no classifier and nothing was kept). compare
    shows the label agreement and a binary accuracy against labels 0 / 1."""
    from onnxopt.compare import compare_models
    m, feeds = _binary_se(), se_models.image_like_inputs(48, classes=2)
    q, report = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "weight_bits": 4, "calib_method": "minmax"}},
                              context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    fb = report.passes[0].extra["recovery"]["fallback"]
    assert fb["agreement_loss_before"] > 5 and fb["met"] and fb["agreement_loss_after"] <= 1.0
    assert 0 < len(fb["high_precision_layers"]) and "note" not in fb
    assert "prob (logits before Sigmoid): label agreement" in fb["task_after"]
    x = np.concatenate([f["input"] for f in feeds])
    np.save(tmp_path / "x.npy", x)
    ref = run(m, {"input": x[:1]})["prob"]   # fixed batch 1: compare runs it sample by sample
    decisions = np.array([run(m, {"input": x[i:i + 1]})["prob"].item() > 0.5 for i in range(len(x))])
    labels = decisions.astype(np.int64)
    labels[:4] = 1 - labels[:4]              # the float model is right on 44 of 48
    res = compare_models(m, q, data=str(tmp_path / "x.npy"), labels=labels, runs=0)
    row = res["outputs"][0]
    assert ref.shape == (1, 1) and row["classifier"] and row["decision"] == task_metric.LABELS
    assert res["reference"]["accuracy"] == pytest.approx(44 / 48)
    assert "label agreement" in res["task_summary"]


def _segmenter(head: str = "argmax", classes: int = 4, seed: int = 0):
    """The SE test network cut before its pooling, with a 1x1 conv head of ``classes`` per pixel
    ([N, classes, 16, 16]) and, as segmentation exports end (TIDL's included), an ArgMax over the
    classes (``classes`` [N, 16, 16] int64) or a Softmax over them (``probs``); ``sigmoid``: one
    score per pixel and a Sigmoid (``mask`` [N, 1, 16, 16], binary segmentation)."""
    classes = 1 if head == "sigmoid" else classes
    from onnx import numpy_helper
    m = se_models.mobilenetv3_se(bad_scale=1.0, seed=seed)
    g = m.graph
    cut = next(k for k, n in enumerate(g.node) if n.op_type == "GlobalAveragePool")
    feat = g.node[cut].input[0]
    keep = list(g.node[:cut])
    del g.node[:], g.output[:]
    g.node.extend(keep)
    channels = run(_with_output(m, feat), {"input": se_models.image_like_inputs(1)[0]["input"]})[feat].shape[1]
    w = np.random.default_rng(seed + 5).standard_normal((classes, channels, 1, 1)) / np.sqrt(channels)
    g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), "seg_w"),
                          numpy_helper.from_array(np.zeros(classes, np.float32), "seg_b")])
    g.node.append(helper.make_node("Conv", [feat, "seg_w", "seg_b"], ["scores"], name="seg_head"))
    if head == "argmax":
        g.node.append(helper.make_node("ArgMax", ["scores"], ["classes"], axis=1, keepdims=0, name="argmax"))
        g.output.append(helper.make_tensor_value_info("classes", onnx.TensorProto.INT64, [1, None, None]))
    elif head == "sigmoid":
        g.node.append(helper.make_node("Sigmoid", ["scores"], ["mask"], name="sigmoid"))
        g.output.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, [1, 1, None, None]))
    else:
        g.node.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1, name="softmax"))
        g.output.append(helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [1, classes, None, None]))
    used = {x for n in g.node for x in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    onnx.checker.check_model(m, full_check=True)
    return m


def _with_output(model, name):
    """``model`` with ``name`` as one more graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_empty_tensor_value_info(name))
    return out


def test_each_position_of_a_segmentation_map_is_a_decision(tmp_path):
    """A segmentation model exported with its ArgMax (or Softmax) over the classes: each pixel's
    class is a decision (task_metric.POSITIONS), counted in the agreement and the KL, so the
    fallback's budget holds it; a binary mask's (Sigmoid) every pixel's yes/no too. Before, [N, C, H, W] took no decision and the budget did not apply:
    all-int8 kept nothing in float whatever it did to the map. A raw [N, C, H, W] output (no such
    op: a backbone's features) still takes none."""
    from onnxopt.compare import compare_models
    ref = np.zeros((2, 3, 2, 2))
    ref[:, 0] = 1.0                     # class 0 everywhere
    cand = ref.copy()
    cand[1, 2, 1, 1] = 2.0              # one pixel of 8 turns to class 2
    acc = task_metric.Accumulator(["y"], activations={"y": "ArgMax"}, axes={"y": 1})
    acc.update([ref], [cand])
    o = acc.result().outputs[0]
    assert o.decision == task_metric.POSITIONS and o.samples == 8 and o.top1_agreement == pytest.approx(7 / 8)
    lp, lq = ref[1, :, 1, 1] - np.log(np.exp(ref[1, :, 1, 1]).sum()), cand[1, :, 1, 1] - np.log(np.exp(cand[1, :, 1, 1]).sum())
    assert o.kl == pytest.approx(float(np.sum(np.exp(lp) * (lp - lq))) / 8, rel=1e-9)
    assert task_metric.measure([ref], [cand]).outputs[0].top1_agreement is None   # a raw map: no decision
    assert task_metric.decision_kind((2, 3, 2, 2), "Softmax", -1) == task_metric.POSITIONS   # classes last
    assert task_metric.decision_kind((2, 3, 2, 2), "Softmax", 0) is None
    for head, name, op in (("argmax", "classes", "ArgMax"), ("softmax", "probs", "Softmax"), ("sigmoid", "mask", "Sigmoid")):
        m = _segmenter(head)
        assert task_metric.class_axes(m) == ({} if head == "sigmoid" else {name: 1})   # a mask has no class axis
        feeds = se_models.image_like_inputs(48)
        q, report = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "calib_method": "minmax"}},
                                  context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
        fb = report.passes[0].extra["recovery"]["fallback"]
        assert fb["agreement_loss_before"] > 1.0 and fb["met"] and fb["agreement_loss_after"] <= 1.0, fb
        assert f"{name} (logits before {op}): per-position agreement" in fb["task_after"]
    x = np.concatenate([f["input"] for f in feeds[:8]])
    np.save(tmp_path / "x.npy", x)
    m, ids = _segmenter("argmax"), []
    all_int8, _ = manager.apply(m, "qdq", {"qdq": {"target": "tensorrt", "calib_method": "minmax", "fallback": "none"}},
                                context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    for model in (m, all_int8):
        ids.append(np.concatenate([run(model, {"input": x[i:i + 1]})["classes"] for i in range(len(x))]))
    res = compare_models(m, all_int8, data=str(tmp_path / "x.npy"), runs=0)
    row = res["outputs"][0]
    assert row["decision"] == task_metric.POSITIONS and row["top1_agreement"] == pytest.approx(np.mean(ids[0] == ids[1]))
    assert 0 < np.mean(ids[0] != ids[1]) and "per-position agreement" in res["task_summary"]
    # labels with a class per pixel: each model's pixel accuracy and mean IoU (255: ignored)
    truth = ids[0].copy()
    truth[:, :4] = (truth[:, :4] + 1) % 4
    truth[:, -2:] = 255
    np.save(tmp_path / "truth.npy", truth)
    res = compare_models(m, all_int8, data=str(tmp_path / "x.npy"), labels=str(tmp_path / "truth.npy"), runs=0)
    keep = truth != 255

    def miou(pred):
        p, t = pred[keep], truth[keep]
        return np.mean([np.sum((p == k) & (t == k)) / np.sum((p == k) | (t == k)) for k in range(4) if np.any((p == k) | (t == k))])
    for side, pred in (("reference", ids[0]), ("candidate", ids[1])):
        assert res[side]["accuracy"] == pytest.approx(np.mean(pred[keep] == truth[keep]))
        assert res[side]["miou"] == pytest.approx(miou(pred))
    assert res["reference"]["accuracy"] == pytest.approx(1 - 4 / 14)   # 4 of the 14 rows kept were moved
    from onnxopt.cli.compare import render_compare
    assert res["data"]["label_dims"] == 3 and "pixel accuracy" in render_compare(res)
    res["data"]["label_dims"] = 2                                       # [N, T]: a sequence's tokens, no pixels
    assert "position accuracy" in render_compare(res) and "pixel" not in render_compare(res)
    np.save(tmp_path / "crop.npy", truth[:, :5, :5])                     # labels of another size: said, not counted
    res = compare_models(m, all_int8, data=str(tmp_path / "x.npy"), labels=str(tmp_path / "crop.npy"), runs=0)
    assert res["reference"]["accuracy"] is None and any("do not match output 'classes'" in n for n in res["notes"])


def test_info_says_how_each_output_is_measured():
    """``onnxopt info`` names, per output, what the task metric reads there, so a user sees whether
    fallback=auto's agreement budget holds it before quantizing."""
    from onnxopt.compare import model_info
    readings = {}
    for m in (_classifier(), _binary_se(), _segmenter("argmax"), _segmenter("sigmoid")):
        readings.update({o["name"]: o["measured_as"] for o in model_info(m)["outputs"]})
    emb = _classifier(softmax=False, through_flatten=False)
    emb.graph.node.append(helper.make_node("LpNormalization", ["logits"], ["embedding"], axis=1, p=2))
    emb.graph.output[0].name = "embedding"
    readings.update({o["name"]: o["measured_as"] for o in model_info(emb)["outputs"]})
    assert readings["flat"] == "class scores: top-1 agreement, KL of the logits before the Softmax"
    assert readings["prob"].startswith("labels: every label's yes/no")
    assert readings["classes"].startswith("a class per position (classes on axis 1)")
    assert readings["mask"].startswith("a yes/no per element")
    assert readings["embedding"].startswith("features or values")
    score = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["score"], transB=1)], [("x", ["N", 8])], [("score", ["N", 1])],
                       [("w", rand(1, 8, seed=1)), ("b", rand(1, seed=2))])
    assert model_info(score)["outputs"][0]["measured_as"].startswith("values")   # one raw score: no class to take


def test_class_scores_as_n_c_1_1_are_a_classifier(tmp_path):
    """A classifier that ends in a 1x1 conv without flattening (the ONNX model zoo's Caffe2 exports:
    DenseNet-121 writes [1, 1000, 1, 1]) is measured as its [N, C] scores: top-1 agreement, KL and
    accuracy against [N] labels. It was read as a map of values: no decision, so fallback=auto's
    budget held nothing on it, and compare gave no accuracy."""
    from onnxopt.compare import compare_models, model_info
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "w2", "b2"], ["fc6"], name="fc")]
    m = make_model(nodes, [("x", ["N", 3, 8, 8])], [("fc6", ["N", 5, 1, 1])],
                   [("w1", rand(6, 3, 3, 3, seed=1)), ("w2", rand(5, 6, 1, 1, seed=2)), ("b2", rand(5, seed=3))])
    assert model_info(m)["outputs"][0]["measured_as"] == "class scores: top-1 agreement, KL"
    ref = rand(6, 5, 1, 1, seed=4).astype(np.float64)
    cand = ref.copy()
    cand[2, :, 0, 0] = cand[2, ::-1, 0, 0] + 10 * (np.arange(5) == np.argmin(ref[2, :, 0, 0]))   # another class wins
    o = task_metric.measure([ref], [cand], ["fc6"]).outputs[0]
    flat = task_metric.measure([ref[:, :, 0, 0]], [cand[:, :, 0, 0]], ["fc6"]).outputs[0]
    assert o.decision == task_metric.TOP1 and o.top1_agreement == flat.top1_agreement == 5 / 6
    assert o.kl == pytest.approx(flat.kl) and o.samples == 6
    nhwc = task_metric.measure([ref.transpose(0, 2, 3, 1)], [cand.transpose(0, 2, 3, 1)], ["fc6"]).outputs[0]
    assert nhwc.decision == task_metric.TOP1 and nhwc.top1_agreement == 5 / 6 and nhwc.kl == pytest.approx(flat.kl)
    assert task_metric.decision_kind((6, 1, 5), None) is None   # a one-channel signal [N, 1, T] stays values
    # compare: top-1 accuracy against [N] labels, the output's own shape shown
    x = rand(12, 3, 8, 8, seed=5)
    y = np.argmax(run(m, {"x": x})["fc6"][:, :, 0, 0], axis=1)
    np.savez(tmp_path / "d.npz", x=x, labels=y)
    res = compare_models(m, m, data=str(tmp_path / "d.npz"), runs=0)
    row = res["outputs"][0]
    assert row["decision"] == task_metric.TOP1 and row["top1_agreement"] == 1.0 and row["shape"][1:] == [5, 1, 1]
    assert res["reference"]["accuracy"] == 1.0
