"""onnxopt.compare: model_info, compare_models (metrics checked against NumPy), gates, latency."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from fixtures import models
from helpers import make_model, rand, run
from onnxopt import compare_models, measure_latency, model_info
from onnxopt.compare import check_gates, file_size_bytes, gate_failures
from onnxopt.errors import DataError, GateFailure, OnnxoptError, OptionError


def _data(tmp_path, n=10, labels=None):
    x = np.random.default_rng(3).standard_normal((n, 3, 8, 8)).astype(np.float32)
    arrays = {"input": x}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz", x


def _expected(ref, cand, x):
    r = run(ref, {"input": x})["logits"].astype(np.float64)
    c = run(cand, {"input": x})["logits"].astype(np.float64)
    e = r - c
    return {
        "max_abs": np.abs(e).max(),
        "cosine": (r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum()),
        "sqnr_db": 10 * np.log10((r * r).sum() / (e * e).sum()),
        "agreement": np.mean(r.argmax(1) == c.argmax(1)),
        "ref_top1": r.argmax(1), "cand_top1": c.argmax(1),
        "min_cos": min((a @ b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(r, c)),
    }


# ------------------------------------------------------------------------------------- info
def test_model_info_tiny_cnn(tmp_path):
    model = models.tiny_cnn()
    model.metadata_props.add(key="k", value="v")
    path = models.save(model, tmp_path / "m.onnx")
    info = model_info(path, per_layer=True)
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 3, 8, 8]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["N", 5],
                                "measured_as": "class scores: top-1 agreement, KL"}]
    assert info["opsets"] == {"ai.onnx": 17} and info["ir_version"] == model.ir_version
    assert info["ops"] == {"BatchNormalization": 1, "Conv": 1, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 1}
    assert info["params"] == models.TINY_CNN_PARAMS
    assert info["macs"] == models.TINY_CNN_MACS
    assert [(r["name"], r["op"], r["macs"]) for r in info["layers"]] == [("conv", "Conv", 4 * 8 * 8 * 27), ("fc", "Gemm", 20)]
    assert math.isclose(sum(r["share"] for r in info["layers"]), 1.0)
    assert info["size_bytes"] == path.stat().st_size and info["external_data_bytes"] == 0
    assert info["metadata"] == {"k": "v"}
    assert "layers" not in model_info(path)


def test_macs_of_each_layer_kind():
    """MACs by hand: ConvTranspose scatters Cout/g*k*k per input element; depthwise Conv;
    Gemm without transB (K from B's rows); batched MatMul (K from A's last dim); batch N counts 1."""
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["t"], group=2, name="deconv"),    # [N,4,5,5] -> [N,6,7,7]
        helper.make_node("Conv", ["t", "wd"], ["d"], group=6, pads=[1, 1, 1, 1], name="dw"),  # -> [N,6,7,7]
        helper.make_node("Gemm", ["a", "b"], ["g"], name="fc"),                         # [2,4] x [4,3]
        helper.make_node("MatMul", ["m", "k"], ["mm"], name="mm"),                      # [2,3,4] x [4,5]
    ]
    model = make_model(nodes, [("x", ["N", 4, 5, 5]), ("a", [2, 4]), ("m", [2, 3, 4])], [("d", ["N", 6, 7, 7]), ("g", [2, 3]), ("mm", [2, 3, 5])],
                       [("wt", np.ones((4, 3, 3, 3), np.float32)), ("wd", np.ones((6, 1, 3, 3), np.float32)),
                        ("b", np.ones((4, 3), np.float32)), ("k", np.ones((4, 5), np.float32)),
                        ("scalar", np.float32(2.0)), ("shape", np.array([1, 2], np.int64))])
    info = model_info(model, per_layer=True)
    got = {r["name"]: r["macs"] for r in info["layers"]}
    assert got == {"deconv": 4 * 5 * 5 * 3 * 9, "dw": 6 * 7 * 7 * 9, "fc": 2 * 3 * 4, "mm": 2 * 3 * 5 * 4}
    assert info["macs"] == sum(got.values())
    assert info["params"] == 4 * 3 * 9 + 6 * 9 + 12 + 20  # float weights; the scalar and the int64 shape do not count


def test_macs_of_recurrent_layers():
    """GRU/LSTM/RNN count every step's input and hidden-state products (W and R) for every sequence,
    whichever axis holds the batch (``layout``) and however many directions; an optional
    output left empty does not hide the layer."""
    seq, batch, inp, hid = 7, 3, 5, 4
    nodes = [
        helper.make_node("GRU", ["x", "wg", "rg"], ["yg"], hidden_size=hid, name="gru"),                 # [seq, batch, inp]
        helper.make_node("LSTM", ["xb", "wl", "rl"], ["", "hl"], hidden_size=hid, direction="bidirectional",
                         layout=1, name="lstm"),                                                        # [batch, seq, inp]
        helper.make_node("RNN", ["x", "wr", "rr"], ["yr"], hidden_size=hid, name="rnn"),
    ]
    model = make_model(nodes, [("x", [seq, "N", inp]), ("xb", ["N", seq, inp])],
                       [("yg", [seq, 1, "N", hid]), ("hl", ["N", 2, hid]), ("yr", [seq, 1, "N", hid])],
                       [("wg", np.ones((1, 3 * hid, inp), np.float32)), ("rg", np.ones((1, 3 * hid, hid), np.float32)),
                        ("wl", np.ones((2, 4 * hid, inp), np.float32)), ("rl", np.ones((2, 4 * hid, hid), np.float32)),
                        ("wr", np.ones((1, hid, inp), np.float32)), ("rr", np.ones((1, hid, hid), np.float32))])
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = batch   # a fixed batch on the seq-first input
    got = {r["name"]: r["macs"] for r in model_info(model, per_layer=True)["layers"]}
    assert got == {"gru": seq * batch * 3 * hid * (inp + hid), "lstm": seq * 2 * 4 * hid * (inp + hid),  # N counts 1
                   "rnn": seq * batch * hid * (inp + hid)}


def test_model_info_counts_external_data(tmp_path):
    path = models.save(models.big_weight_model(), tmp_path / "m.onnx", external=True)
    info = model_info(path)
    assert info["external_data_bytes"] == 4096 * 4
    assert info["size_bytes"] == path.stat().st_size + 4096 * 4
    assert info["external_data_files"] == ["m.onnx.data"]
    assert file_size_bytes(path)["total"] == info["size_bytes"]


def test_model_info_of_a_proto():
    info = model_info(models.tiny_cnn(batch=1))
    assert info["path"] is None and info["inputs"][0]["shape"] == [1, 3, 8, 8]
    assert info["size_bytes"] == models.tiny_cnn(batch=1).ByteSize()


# ---------------------------------------------------------------------------------- compare
def test_identical_models(tmp_path):
    path, _ = _data(tmp_path)
    res = compare_models(models.tiny_cnn(), models.tiny_cnn(), data=str(path), runs=3)
    (out,) = res["outputs"]
    assert out["max_abs"] == 0 and out["cosine"] == pytest.approx(1.0) and out["sqnr_db"] == math.inf
    assert out["top1_agreement"] == 1.0 and out["equal_fraction"] == 1.0 and out["classifier"]
    assert res["data"] == {"source": str(path), "generated": False, "samples": 10, "labels": False, "label_dims": None}
    assert res["passed"] and res["gates"] == []


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_metrics_match_numpy_whatever_the_batching(tmp_path, batch_size):
    path, x = _data(tmp_path, n=10)
    ref, cand = models.tiny_cnn(), models.tiny_cnn(noise=0.3)
    res = compare_models(ref, cand, data=str(path), runs=0, batch_size=batch_size)
    exp = _expected(ref, cand, x)
    out = res["outputs"][0]
    assert out["max_abs"] == pytest.approx(exp["max_abs"], rel=1e-6)
    assert out["cosine"] == pytest.approx(exp["cosine"], rel=1e-9)
    assert out["sqnr_db"] == pytest.approx(exp["sqnr_db"], rel=1e-6)
    assert out["top1_agreement"] == pytest.approx(exp["agreement"])
    assert out["min_sample_cosine"] == pytest.approx(exp["min_cos"], rel=1e-6)
    assert 0 < exp["agreement"] < 1  # the perturbation is big enough to flip some classes
    assert res["reference"]["latency"] is None


def test_accuracy_from_the_data_labels_and_from_a_labels_file(tmp_path):
    ref, cand = models.tiny_cnn(), models.tiny_cnn(noise=0.3)
    _, x = _data(tmp_path, n=10)
    exp = _expected(ref, cand, x)
    labels = exp["ref_top1"].copy()
    labels[:3] = (labels[:3] + 1) % 5  # the reference is right on 7 of 10
    path, _ = _data(tmp_path, n=10, labels=labels)
    res = compare_models(ref, cand, data=str(path), runs=0, batch_size=4)
    out = res["outputs"][0]
    assert out["ref_accuracy"] == pytest.approx(0.7)
    assert out["cand_accuracy"] == pytest.approx(np.mean(exp["cand_top1"] == labels))
    assert res["reference"]["accuracy"] == out["ref_accuracy"] and res["candidate"]["accuracy"] == out["cand_accuracy"]
    assert any("labels taken from the data source" in n for n in res["notes"])
    # a separate labels file overrides the data's own
    np.save(tmp_path / "y.npy", exp["ref_top1"])
    res = compare_models(ref, cand, data=str(path), labels=str(tmp_path / "y.npy"), runs=0)
    assert res["outputs"][0]["ref_accuracy"] == 1.0
    res = compare_models(ref, cand, data=str(path), labels=exp["ref_top1"], runs=0)
    assert res["reference"]["accuracy"] == 1.0
    # a ready DataSource (library use) with and without a labels file
    from onnxopt.data import open_data

    source = open_data(str(path), ref, batch_size=3)
    assert compare_models(ref, cand, data=source, runs=0)["reference"]["accuracy"] == pytest.approx(0.7)
    assert compare_models(ref, cand, data=source, labels=str(tmp_path / "y.npy"), runs=0)["reference"]["accuracy"] == 1.0


def test_too_few_labels(tmp_path):
    path, _ = _data(tmp_path, n=6)
    with pytest.raises(DataError, match="there are 4 labels"):
        compare_models(models.tiny_cnn(), models.tiny_cnn(), data=str(path), labels=np.arange(4), runs=0)


def test_generated_inputs_say_so():
    res = compare_models(models.tiny_cnn(), models.tiny_cnn(noise=0.01), runs=0, max_samples=5)
    assert res["data"]["generated"] and res["data"]["samples"] == 5
    assert any("generated inputs" in n for n in res["notes"])


def _feature_model():
    """Outputs that are not classifier-shaped: a [N,4,3] map and a [N,1] score."""
    return make_model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
                      [("x", ["N", 4, 3])], [("y", ["N", 4, 3]), ("s", [])])


def test_non_classifier_and_several_outputs():
    res = compare_models(models.two_input_model(), models.two_input_model(), runs=2)
    assert [o["name"] for o in res["outputs"]] == ["y", "z"]
    assert all(o["classifier"] and o["top1_agreement"] == 1.0 for o in res["outputs"])  # [N, 4]: classifier-shaped
    assert res["candidate"]["latency"]["runs"] == 2
    m = _feature_model()
    res = compare_models(m, m, runs=0)
    assert all(not o["classifier"] and o["top1_agreement"] is None for o in res["outputs"])


def test_outputs_matched_by_position_when_names_differ():
    ref = models.tiny_cnn()
    cand = models.tiny_cnn()
    cand.graph.node[-1].output[0] = "scores"
    cand.graph.output[0].name = "scores"
    res = compare_models(ref, cand, runs=0)
    assert res["outputs"][0]["candidate_name"] == "scores" and res["outputs"][0]["max_abs"] == 0
    assert any("matched by position" in n for n in res["notes"])


def test_incomparable_models():
    other = make_model([helper.make_node("Relu", ["x"], ["logits"])], [("x", ["N", 5])], [("logits", ["N", 5])])
    with pytest.raises(OnnxoptError, match="different inputs"):
        compare_models(models.tiny_cnn(), other, runs=0)
    with pytest.raises(OnnxoptError, match="shape"):
        compare_models(models.tiny_cnn(), models.tiny_cnn(classes=4), runs=0)
    with pytest.raises(OnnxoptError, match="fix different batch sizes|shape"):
        compare_models(models.tiny_cnn(batch=1), models.tiny_cnn(batch=2), runs=0)


def test_nonfinite_candidate_outputs():
    ref = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    cand = make_model([helper.make_node("Log", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    res = compare_models(ref, cand, runs=0, max_samples=2)
    out = res["outputs"][0]
    assert out["cand_nonfinite"] > 0 and out["max_abs"] == math.inf


# ------------------------------------------------------------------------------------- gates
def test_gates_pass_and_fail(tmp_path):
    ref, cand = models.tiny_cnn(), models.tiny_cnn(noise=0.3)
    _, x = _data(tmp_path, n=10)
    exp = _expected(ref, cand, x)
    path, _ = _data(tmp_path, n=10, labels=exp["ref_top1"])  # reference 100 %, candidate less
    drop = 100 * (1 - np.mean(exp["cand_top1"] == exp["ref_top1"]))
    res = compare_models(ref, cand, data=str(path), runs=2,
                         gates={"max_size_mb": 1, "max_latency_ms": 1e4, "min_agreement": 100, "max_drop": drop - 1})
    verdict = {g["gate"]: g["passed"] for g in res["gates"]}
    assert verdict == {"max_size_mb": True, "max_latency_ms": True, "min_agreement": False, "max_drop": False}
    assert not res["passed"]
    drop_gate = next(g for g in res["gates"] if g["gate"] == "max_drop")
    assert drop_gate["value"] == pytest.approx(drop)
    failed = gate_failures(res)
    assert len(failed) == 2 and "min_agreement" in failed[0] and "max_drop" in failed[1]
    with pytest.raises(GateFailure) as err:
        check_gates(res)
    assert err.value.exit_code == 3 and "2 acceptance gate(s) failed" in err.value.message
    res = compare_models(ref, cand, runs=1, gates={"max_size_mb": 1e-6, "max_latency_ms": 1e-9})
    assert [g["passed"] for g in res["gates"]] == [False, False]
    check_gates(compare_models(ref, ref, runs=0, gates={"min_agreement": 100}))  # passes silently


@pytest.mark.parametrize("kwargs, words", [
    ({"gates": {"max_drop": 1}}, "needs labels"),
    ({"gates": {"min_agreement": 0.99}}, "percentage"),
    ({"gates": {"min_agreement": 101}}, "percentage"),
    ({"gates": {"max_size_mb": -1}}, "non-negative"),
    ({"gates": {"max_speed": 1}}, "unknown gate"),
    ({"gates": {"max_latency_ms": 5}, "runs": 0}, "--runs is 0"),
    ({"labels": np.arange(3)}, "labels were given without data"),
    ({"runs": -1}, "--runs"),
    ({"max_samples": 0}, "--max-samples"),
])
def test_gate_and_argument_errors(kwargs, words):
    with pytest.raises(OptionError, match=words):
        compare_models(models.tiny_cnn(), models.tiny_cnn(), **kwargs)


def test_input_shape_overrides():
    dynamic = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", "C"])], [("y", ["N", "C"])])
    # without data or shapes, the sizes the model runs at (as apply's verification finds them): a
    # dynamic export no longer needs --input-shape to be compared
    res = compare_models(dynamic, dynamic, runs=0)
    assert res["outputs"][0]["shape"][0] == 1 and res["data"]["generated"]
    assert any("generated inputs at [x:1x" in n and "sizes the model runs at" in n for n in res["notes"]), res["notes"]
    res = compare_models(dynamic, dynamic, runs=2, input_shapes={"x": [1, 7]})
    assert res["outputs"][0]["shape"] == [1, 7]
    with pytest.raises(OptionError, match="'xx', which is not an input"):
        compare_models(dynamic, dynamic, runs=0, input_shapes={"xx": [1, 7]})


def test_min_agreement_needs_a_classifier():
    m = _feature_model()
    with pytest.raises(OptionError, match="takes decisions"):
        compare_models(m, m, runs=0, gates={"min_agreement": 99})


# ------------------------------------------------------------------------------------ latency
def test_measure_latency(tmp_path):
    model = models.tiny_cnn(batch=1)
    lat = measure_latency(model, runs=5)
    assert lat["runs"] == 5 and lat["threads"] == 1
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    path = models.save(model, tmp_path / "m.onnx")
    assert measure_latency(path, {"input": np.zeros((1, 3, 8, 8), np.float32)}, runs=1, warmup=0)["runs"] == 1
    with pytest.raises(OptionError):
        measure_latency(model, runs=0)
    with pytest.raises(DataError, match="cannot run"):
        measure_latency(model, {"input": np.zeros((1, 3, 9, 9), np.float32)}, runs=1)


# ------------------------------------------------------------------------------- real models
@pytest.mark.shared
def test_info_resnet20(shared):
    info = model_info(shared("models", "resnet20_cifar10.onnx"), per_layer=True)
    assert info["ops"]["BatchNormalization"] == 19 and info["ops"]["Conv"] == 19
    assert info["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert sum(1 for r in info["layers"] if r["op"] == "Conv") == 19
    assert info["macs_unknown_layers"] == 0 and 35e6 < info["macs"] < 45e6  # ResNet20 is ~41 M MACs


@pytest.mark.shared
def test_compare_efficientnet_folded_vs_unfolded(shared):
    res = compare_models(shared("models", "efficientnet_lite0.onnx"), shared("models", "efficientnet_lite0_bn.onnx"),
                         data=str(shared("data", "imagenet")), max_samples=8, runs=2,
                         image={"size": 256, "crop": 224, "mean": [127.0], "std": [128.0]},
                         gates={"min_agreement": 100, "max_drop": 0})
    out = res["outputs"][0]
    assert out["max_abs"] <= 1e-3 and out["top1_agreement"] == 1.0 and out["cosine"] > 0.999999
    assert res["data"]["labels"] and res["passed"]


def test_info_of_a_dynamically_quantized_model_counts_weighted_layers_only(tmp_path):
    """onnxruntime's quantize_dynamic turns the weighted MatMul into MatMulInteger with a
    DynamicQuantizeLinear; the product of two activations (attention's QK^T) has no weight and is
    not a layer that stayed float."""
    from onnxruntime import quantization

    from onnxopt.cli.info import render_info

    w = rand(16, 16, seed=1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores")]
    src = make_model(nodes, [("x", [1, 8, 16])], [("y", [1, 8, 8])], [("w", w)])
    assert "quantization" not in model_info(src)
    onnx.save(src, tmp_path / "f.onnx")
    quantization.quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"))
    info = model_info(tmp_path / "q.onnx")
    q = info["quantization"]
    assert (q["weighted_layers"], q["quantized_layers"], q["quantized_mac_share"]) == (1, 1, 1.0)
    assert q["dynamic_quantizers"] >= 1 and q["activation_qdq"] == 0 and set(q["weight_types"]) <= {"int8", "uint8"}
    line = next(l for l in render_info(info).splitlines() if l.startswith("quantized"))
    assert "1 of 1 weighted layers (100 % of the MACs)" in line and "DynamicQuantizeLinear" in line and "float" not in line


def test_labels_at_chance_for_the_reference_are_called_misnumbered(tmp_path):
    """Labels numbered otherwise than the model's classes (class folders in another order, a
    1001-class TF model's background class at 0) give the reference model chance accuracy, and
    every accuracy figure is then wrong: compare says so. Labels it mostly gets right say nothing."""
    model = models.tiny_cnn(classes=12)
    x = np.random.default_rng(3).standard_normal((60, 3, 8, 8)).astype(np.float32)
    pred = np.argmax(run(model, {"input": x})["logits"], axis=1)
    for labels, noted in ((pred, False), ((pred + 1) % 12, True)):
        np.savez(tmp_path / "d.npz", input=x, labels=labels)
        res = compare_models(model, model, data=str(tmp_path / "d.npz"), runs=0)
        said = [n for n in res["notes"] if "numbered otherwise than the model's classes" in n]
        assert bool(said) == noted, res["notes"]
    assert said[0].startswith("the reference model gets 0.00 % of the labels right, about chance for 12 classes")
