"""Per-layer sensitivity: variants derived from one quantized model, ranking, CLI, plot."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import se_models
from helpers import if_branch_model, run
from onnxopt.cli import cli
from onnxopt.errors import MissingDependencyError
from onnxopt.quant import sensitivity as sens


@pytest.fixture(scope="module")
def setup():
    m = se_models.mobilenetv3_se(bad_scale=3.0)
    feeds = se_models.image_like_inputs(48)
    q, info = se_models.reference_qdq(m, feeds[:32], per_channel=False)
    return m, q, info, feeds[32:]


def _ops(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def test_variants_structure_and_numerics(setup):
    m, q, info, feeds = setup
    view = sens.QdqView(m, q, info)
    ref = view.float_reference()
    assert not _ops(ref, "QuantizeLinear")
    for f in feeds[:2]:  # the float reference is the float model
        np.testing.assert_allclose(run(ref, f)["logits"], run(m, f)["logits"], rtol=1e-5, atol=1e-5)
    layer = info["layers"][3]["node"]
    only = view.only_layer(layer, fold_weights=False)
    assert len(_ops(only, "QuantizeLinear")) == 1 and len(_ops(only, "DequantizeLinear")) == 2  # its input + its weight
    dq_weight = next(n for n in only.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == info["layers"][3]["weight_q"])
    assert dq_weight.output[0] == next(n for n in only.graph.node if n.name == layer).input[1]
    allbut = view.all_but_layer(layer, fold_weights=False)
    node = next(n for n in allbut.graph.node if n.name == layer)
    assert node.input[1].endswith("__float_weight") and not node.input[0].endswith("_dq")
    assert len(_ops(allbut, "QuantizeLinear")) == len(_ops(q, "QuantizeLinear")) - (
        1 if sum(n.input[0] == next(x for x in q.graph.node if x.name == layer).input[0] for n in q.graph.node) == 1 else 0)
    # folding weight DQ nodes keeps the weights bit for bit; outputs differ only by float rounding
    # (onnxruntime prepacks constant weights, which may reorder the convolution's sums)
    for f in feeds[:2]:
        np.testing.assert_allclose(run(view.variant(fold_weights=True), f)["logits"], run(q, f)["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(run(view.only_layer(layer), f)["logits"], run(only, f)["logits"], rtol=1e-5, atol=1e-5)


def test_ranking_finds_badly_scaled_depthwise(setup):
    m, q, info, feeds = setup
    view = sens.QdqView(m, q, info)
    rep = sens.analyze(view, feeds[:8])
    assert len(rep.layers) == len(info["layers"]) and rep.full_rel > 0
    worst = rep.ranked("only")[0].layer
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in m.graph.node}
    assert groups[worst] > 1, worst  # a per-tensor-quantized, badly scaled depthwise conv
    # all-but: keeping the worst layer float recovers more than keeping the best one
    by = {l.layer: l for l in rep.layers}
    best = rep.ranked("only")[-1].layer
    assert by[worst].all_but_rel < by[best].all_but_rel
    table = sens.format_table(rep, top=3)
    assert worst in table and len(table.splitlines()) == 5
    d = rep.to_dict()
    assert d["layers"][0]["only_sqnr_db"] is not None and d["samples"] == 8


def test_plot_needs_matplotlib(setup, monkeypatch, tmp_path):
    m, q, info, feeds = setup
    rep = sens.SensitivityReport(full_rel=0.1, layers=[sens.LayerSensitivity("a", "Conv", 0.01, 0.05)])
    sens.plot(rep, str(tmp_path / "ok.png"))
    assert (tmp_path / "ok.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="matplotlib"):
        sens.plot(rep, str(tmp_path / "x.png"))


def test_cli(setup, tmp_path):
    m, _, _, feeds = setup
    import onnx

    model_path, data_path = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(m, model_path)
    np.savez(data_path, input=np.concatenate([f["input"] for f in se_models.image_like_inputs(24)]))
    res = CliRunner().invoke(cli, ["sensitivity", str(model_path), "--calib-data", str(data_path), "--target", "ort",
                                   "--samples", "4", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
                                   "--set", "qdq.per_channel=false", "--top", "5"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["target"] == "ort" and len(d["layers"]) == 21 and d["samples"] == 4
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert "only-this SQNR" in res.output
    bad = CliRunner().invoke(cli, ["sensitivity", str(model_path), "--calib-data", str(data_path), "--set", "equalize.clip=split"])
    assert bad.exit_code != 0


def test_subgraph_reads_keep_their_producers():
    """An If body reads the conv output from the outer scope: the derived models must keep the
    conv (they dropped it as unread, and onnxruntime refused the model)."""
    from onnxopt import model_io
    from onnxopt.quant.quantize import quantize_model
    from onnxopt.registry import get_pass

    m = if_branch_model()
    assert model_io.subgraph_reads(next(n for n in m.graph.node if n.op_type == "If")) == {"c"}
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    res = quantize_model(m, get_pass("qdq").resolve({"target": "tensorrt", "calib_method": "minmax"}), lambda: iter(feeds), None)
    view = sens.QdqView(m, res.model, res.info)
    for f in feeds:
        np.testing.assert_allclose(run(view.float_reference(), f)["y"], run(m, f)["y"], rtol=1e-5, atol=1e-5)
    rep = sens.analyze(view, feeds, modes=("only",))
    assert {r["layer"] for r in rep.to_dict()["layers"]} == {"conv", "conv2"}
