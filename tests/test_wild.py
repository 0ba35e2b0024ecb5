"""The wild zoo (tests/wild_zoo.py: models shaped like real exports, built once per session):
every exact chain runs with no flags and matches the original at two concrete sizes; the
approximate chains run; qdq's output passes its target's check."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import feeds, model_io, runtime, stats
from onnxopt.data import DataSpec, open_data
from onnxopt.manager import VERIFY_ATOL, VERIFY_RTOL
from onnxopt.quant import check as qcheck
from onnxopt.registry import PassContext

pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from wild_zoo import BUILDERS, QUANTIZED, build_zoo  # noqa: E402

EXACT_CHAINS = ["cleanup,bnfuse", "cleanup,bnfuse,equalize"]
# The TorchScript exporter bakes the example's sequence length (8) into the attention's Reshape:
# those exports themselves run at seq 8 only, so one size is all a verification can use.
ONE_SIZE = {"transformer", "transformer_ort_dynamic"}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    built = build_zoo(tmp_path_factory.mktemp("wild_zoo"))
    assert not build_zoo.missing, build_zoo.missing
    return built


def _matches_at_two_sizes(src: onnx.ModelProto, out: onnx.ModelProto) -> list:
    """The sizes both models were compared at (asserting they match at each)."""
    plan = feeds.plan_feeds(src)
    s_ref, s_out = runtime.session(src), runtime.session(out)
    for i in range(len(plan.sizes)):
        f = plan.feed(i, 7)
        err = runtime.output_error(runtime.run(s_ref, f), runtime.run(s_out, f))
        rtol = max(VERIFY_RTOL, err["rtol_floor"])   # a float16 output: a few of its ulps, as the manager allows
        assert err["max_abs"] <= VERIFY_ATOL or err["max_rel"] <= rtol, (plan.sizes[i], err)
    return plan.sizes


@pytest.mark.parametrize("name", list(BUILDERS))
def test_exact_chains_run_with_no_flags_and_match_at_two_sizes(zoo, name):
    src = model_io.load_model(zoo[name])
    for chain in EXACT_CHAINS:
        out, report = onnxopt.apply(str(zoo[name]), chain)
        model_io.check_model(out, full=True)
        for rec in report.passes:
            if rec.verification is not None:  # verified by the manager at every size it found
                assert rec.verification["verified"] and rec.verification["passed"], (chain, rec.name, rec.verification)
        sizes = _matches_at_two_sizes(src, out)
        if name in ONE_SIZE:
            assert sizes == [{"tokens": [1, 8]}]
            with pytest.raises(onnxopt.OnnxoptError, match="Reshape"):  # the export itself fails at seq 16
                runtime.run(runtime.session(src, quiet=True), {"tokens": np.zeros((1, 16), np.int64)})
        else:
            assert len(sizes) == 2 and sizes[0] != sizes[1], sizes  # every zoo model has a dynamic dim


def test_exact_chains_do_their_job_on_the_exports(zoo):
    """Not only 'nothing broke': BN is folded in the TorchScript (training=PRESERVE) export, and in
    the dynamo export with optimize=False the CastLike -> Expand bias chains become constants."""
    for name in ("cnn_torchscript", "cnn_dynamo_noopt", "cnn_opset24", "cnn_external_data"):
        out, _ = onnxopt.apply(str(zoo[name]), "cleanup,bnfuse")
        ops = [n.op_type for n in out.graph.node]
        assert "BatchNormalization" not in ops and "CastLike" not in ops and "Expand" not in ops, (name, ops)
        inits = {i.name for i in out.graph.initializer}
        assert all(len(n.input) > 2 and n.input[2] in inits for n in out.graph.node if n.op_type == "Conv"), name
    src = onnx.load(str(zoo["cnn_dynamo_noopt"]))
    assert any(n.op_type == "CastLike" for n in src.graph.node)  # the zoo really has the chain


@pytest.mark.parametrize("name", [n for n in BUILDERS if n not in QUANTIZED])
def test_lite_chain_runs_with_no_flags(zoo, name):
    out, report = onnxopt.apply(str(zoo[name]), "cleanup,lite,bnfuse")
    model_io.check_model(out, full=True)
    plan = feeds.plan_feeds(out)
    for i in range(len(plan.sizes)):
        assert all(np.isfinite(v).all() for v in runtime.run(runtime.session(out), plan.feed(i, 0)).values())


@pytest.mark.parametrize("name,target", [("cnn_dynamo_noopt", "ort"), ("cnn_dynamo_noopt", "tidl"),
                                         ("transformer_dynamo", "tensorrt"), ("transformer_dynamo", "tidl"),
                                         ("gru_opset25", "tidl"), ("cnn_fp16", "ort"), ("cnn_fp16", "tensorrt"),
                                         ("cnn_fp16", "tidl"), ("cnn_select", "ort"), ("cnn_select", "tensorrt"),
                                         ("cnn_embedding", "ort"), ("cnn_embedding", "tensorrt"),
                                         ("cnn_ir3", "ort"), ("cnn_ir3", "tidl")])
def test_qdq_on_generated_calibration_data_passes_its_target_check(zoo, name, target):
    """Strictly: for tidl, the float graph is rewritten before quantization (static shapes, the
    shape arithmetic folded, ReduceMean -> GlobalAveragePool/MatMul), so no node is left for ARM."""
    src = model_io.load_model(zoo[name])
    data = open_data(DataSpec("random", max_samples=4), src, None)
    out, report = onnxopt.apply(src, "qdq", {"qdq": {"target": target}},
                                context=PassContext(data=data, data_spec=data.spec))
    assert report.passes[0].changes["weights_quantized"] > 0
    assert qcheck.check_model(out, target) == []
    if target == "tidl" and name != "gru_opset25":
        assert any("rewritten for tidl before quantization" in w for w in report.passes[0].extra["warnings"])


@pytest.mark.parametrize("name", ["gru_text", "lstm_text"])
def test_qdq_says_recurrent_layers_stay_float(zoo, name):
    """The recurrent layers get no Q/DQ: the pass says so, with their share of the MACs (counted
    per time step by ``stats``), so "weights quantized" is not read as an int8 model. The sequence
    length is fixed first: with it symbolic the MACs are unknown, and no share is given."""
    src = model_io.load_model(zoo[name])
    src.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 6   # tokens [batch, seq]
    data = open_data(DataSpec("random", max_samples=4), src, None)
    out, report = onnxopt.apply(src, "qdq", {"qdq": {"target": "ort"}}, context=PassContext(data=data, data_spec=data.spec))
    op = "GRU" if name == "gru_text" else "LSTM"
    assert op in {n.op_type for n in out.graph.node} and report.passes[0].changes["weights_quantized"] > 0
    rows = stats.layer_macs(src)
    share = 100 * sum(r["macs"] for r in rows if r["op"] == op) / sum(r["macs"] for r in rows)
    assert 0 < share < 100
    assert f"1 {op} node(s) stay float, {share:.0f} % of the MACs" in " ".join(report.passes[0].skipped)


def test_apply_summary_does_not_count_dynamic_layers_as_added_macs(zoo, tmp_path, capsys):
    """qdq for tidl fixes a dynamic input size: the layers whose MACs were unknown before (symbolic
    shapes) must not read as MACs the pass added (it printed "MACs +28800 %")."""
    from onnxopt.cli import main as cli_main

    try:
        code = cli_main(["apply", "qdq", str(zoo["cnn_dynamo_noopt"]), "-o", str(tmp_path / "q.onnx"),
                         "--calib-data", "random", "--target", "tidl"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert not code, out.out + out.err
    assert "MACs not compared (layers with dynamic shapes)" in out.out and "MACs +" not in out.out


@pytest.mark.parametrize("name", ["cnn_dynamo_noopt", "transformer_dynamo"])
def test_sensitivity_ranks_the_layers_qdq_quantizes_for_tidl(zoo, name, tmp_path):
    """sensitivity prepares the float model as the qdq pass does (onnxopt.quant.prepare): for TIDL
    the graph is rewritten at its static size first. Before, it stopped on the unoptimized dynamo
    export ("could not convert the model from opset 20 to 17") and ranked 5 of the transformer's
    6 quantized layers."""
    from click.testing import CliRunner

    from onnxopt.cli import cli
    res = CliRunner().invoke(cli, ["sensitivity", str(zoo[name]), "--calib-data", "random", "--target", "tidl",
                                   "--samples", "4", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    ranked = json.loads((tmp_path / "s.json").read_text())["layers"]
    src = model_io.load_model(zoo[name])
    data = open_data(DataSpec("random", max_samples=4), src, None)
    _, report = onnxopt.apply(src, "qdq", {"qdq": {"target": "tidl", "fallback": "none"}},
                              context=PassContext(data=data, data_spec=data.spec))
    assert len(ranked) == report.passes[0].changes["weights_quantized"] > 0


@pytest.mark.parametrize("name", ["gru_text", "lstm_text", "transformer", "transformer_dynamo", "cnn_select", "cnn_dynamo_noopt"])
def test_finetune_runs_on_text_models_and_in_graph_selection(zoo, name):
    """finetune converts the recurrent text models (GRU / LSTM), the transformers (their Mod), the
    unoptimized dynamo export (CastLike) and the CNN that selects its boxes in the graph (NonZero /
    GatherND) -- each stopped with "the torch
    converter does not support" -- and reproduces onnxruntime before training. The transformer's
    sequence-first attention tensors are left out of the feature loss, and the selection's
    data-dependent output out of the distillation: both crashed the teacher cache."""
    from onnxopt.torch.train import FinetuneConfig, finetune
    model = model_io.load_model(zoo[name])
    said = []
    data = open_data(DataSpec("random", max_samples=12, batch_size=4), model)
    res = finetune(model, data, teacher=model, config=FinetuneConfig(
        epochs=1, lr=1e-4, batch_size=4, feature_loss=("auto",), progress=False, log=said.append, threads=1))
    assert res.parity["max_abs"] <= 1e-4 + 1e-5 * res.parity["max_ref"], res.parity   # the written model, torch vs onnxruntime
    onnx.checker.check_model(res.model, full_check=True)
    if name.startswith("transformer"):
        note = next(s for s in said if "left out, their axis 0 is not the samples" in s)
        tensor = note.rsplit("(e.g. ", 1)[1].rstrip(")")
        with pytest.raises(onnxopt.errors.OptionError, match="without the samples on axis 0"):   # named: refused
            finetune(model, data, teacher=model, config=FinetuneConfig(epochs=1, batch_size=4, feature_loss=[tensor],
                                                                       progress=False, log=said.append, threads=1))
    if name == "cnn_select":   # its selected boxes have no rows per sample: the other outputs are distilled
        assert any("their length depends on the data" in s for s in said), said
