"""Verification inputs built from the model (onnxopt.feeds), verification that never blocks the
main job, every opset the installed onnx defines, and the small breakages real exports hit."""
from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import feeds, model_io, opsets, runtime
from onnxopt.errors import OnnxoptError
from onnxopt.registry import PassContext


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8, value_info=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits),
                          value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _token_model():
    """int64 [batch, seq] tokens -> Embedding (Gather of a 50 x 8 table) -> Identity -> mean."""
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["e"]), helper.make_node("Identity", ["e"], ["e2"]),
             helper.make_node("ReduceMean", ["e2"], ["y"], axes=[1], keepdims=0)]
    return _model(nodes, [("tokens", TensorProto.INT64, ["batch", "seq"])], [("y", TensorProto.FLOAT, ["batch", 8])], [emb])


def _image_model(dims=("p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2")):
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Identity", ["c"], ["y"])]
    return _model(nodes, [("x", TensorProto.FLOAT, list(dims))], [("y", TensorProto.FLOAT, ["n", 4, "h2", "w2"])], [w])


def test_token_model_gets_valid_indices_at_two_sequence_lengths():
    plan = feeds.plan_feeds(_token_model())
    assert [s["tokens"] for s in plan.sizes] == [[1, 8], [1, 16]]  # batch 1, two sequence lengths
    for i in range(2):
        f = plan.feed(i, 0)["tokens"]
        assert f.dtype == np.int64 and f.min() >= 0 and f.max() < 50  # valid rows of the table
    out, report = onnxopt.apply(_token_model(), "cleanup,bnfuse")
    ver = report.passes[0].verification
    assert ver["verified"] and ver["passed"] and ver["sizes"] == [{"tokens": [1, 8]}, {"tokens": [1, 16]}]


def test_dynamic_image_model_verified_at_two_spatial_sizes_and_hint_fits_the_input():
    ver = onnxopt.apply(_image_model(), "cleanup")[1].passes[0].verification
    assert ver["passed"] and ver["sizes"] == [{"x": [1, 3, 64, 64]}, {"x": [1, 3, 96, 96]}]
    with pytest.raises(OnnxoptError) as err:
        runtime.input_specs(_image_model())
    assert "--input-shape x:1x3xHxW" in err.value.hint
    with pytest.raises(OnnxoptError) as err:
        runtime.input_specs(_token_model())
    assert "--input-shape tokens:1xSEQ" in err.value.hint and "224" not in err.value.hint


def test_user_shapes_win_and_only_batch_dynamic_is_checked_at_batch_1_and_2():
    plan = feeds.plan_feeds(_image_model(), {"x": [2, 3, 32, 40]})
    assert plan.sizes == [{"x": [2, 3, 32, 40]}]
    plan = feeds.plan_feeds(_image_model(("N", 3, 16, 16)))
    assert [s["x"] for s in plan.sizes] == [[1, 3, 16, 16], [2, 3, 16, 16]]


def test_gather_elements_and_onehot_indices_are_in_range():
    data = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "data")
    depth = numpy_helper.from_array(np.array(5, np.int64), "depth")
    vals = numpy_helper.from_array(np.array([0, 1], np.float32), "vals")
    nodes = [helper.make_node("GatherElements", ["data", "idx"], ["g"], axis=1),
             helper.make_node("OneHot", ["cls", "depth", "vals"], ["oh"])]
    m = _model(nodes, [("idx", TensorProto.INT64, [3, 6]), ("cls", TensorProto.INT64, [7])],
               [("g", TensorProto.FLOAT, [3, 6]), ("oh", TensorProto.FLOAT, [7, 5])], [data, depth, vals], opset=13)
    plan = feeds.plan_feeds(m)
    f = plan.feed(0, 3)
    assert f["idx"].max() < 4 and f["cls"].max() < 5 and f["cls"].min() >= 0


def test_lstm_lengths_masks_and_bools_are_consistent():
    rng = np.random.default_rng(2)
    h, d = 4, 3
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * h, d)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * h, h)).astype(np.float32), "R")]
    nodes = [helper.make_node("Cast", ["lens"], ["lens32"], to=TensorProto.INT32),
             helper.make_node("LSTM", ["X", "W", "R", "", "lens32"], ["Y"], hidden_size=h),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["mf"], ["ms"], keepdims=0),
             helper.make_node("Where", ["flag", "ms", "ms"], ["z"])]
    m = _model(nodes, [("X", TensorProto.FLOAT, ["seq", "batch", d]), ("lens", TensorProto.INT64, ["batch"]),
                       ("attention_mask", TensorProto.INT64, ["batch", "seq"]), ("flag", TensorProto.BOOL, [])],
               [("Y", TensorProto.FLOAT, None), ("z", TensorProto.FLOAT, [])], inits)
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    m.graph.output[0].type.tensor_type.shape.dim.add()
    plan = feeds.plan_feeds(m)
    f = plan.feed(0, 0)
    seq = f["X"].shape[0]
    assert f["lens"].tolist() == [seq] * f["lens"].shape[0]  # lengths = the sequence length
    assert (f["attention_mask"] == 1).all() and f["attention_mask"].shape[1] == seq  # a mask of ones, same seq
    assert f["flag"].dtype == np.bool_ and bool(f["flag"])


def test_unverifiable_pass_runs_and_says_why_unless_verification_is_required():
    """No runnable feed (a sequence input): the pass runs, the report says verified: false + why."""
    nodes = [helper.make_node("SequenceAt", ["s", "i0"], ["t"]), helper.make_node("Identity", ["t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.array(0, np.int64), "i0")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    lines = []
    out, report = onnxopt.apply(m, "cleanup", context=PassContext(log=lines.append))
    ver = report.passes[0].verification
    assert ver["verified"] is False and "not a tensor" in ver["reason"]
    assert [op.op_type for op in out.graph.node] == ["SequenceAt"]
    assert sum("not verified" in line for line in lines) == 1
    with pytest.raises(OnnxoptError, match="cannot be verified"):
        onnxopt.apply(m, "cleanup", context=PassContext(require_verify=True))


def test_shapeless_value_info_for_a_graph_output_does_not_break_passes():
    m = _token_model()
    m.graph.value_info.append(helper.make_empty_tensor_value_info("y"))  # real exports write these
    out, report = onnxopt.apply(m, "cleanup,bnfuse")
    model_io.check_model(out, full=True)
    assert out.graph.output[0].type.tensor_type.HasField("shape")
    assert report.passes[0].verification["passed"]


@pytest.mark.parametrize("opset", [24, 25, opsets.max_opset()])
def test_every_opset_the_installed_onnx_defines(opset):
    m = onnx.version_converter.convert_version(_image_model(), opset) if opset <= 25 else _image_model()
    m.opset_import[0].version = opset
    out, report = onnxopt.apply(m, "cleanup,bnfuse")
    assert model_io.opset_of(out) == opset and report.passes[0].verification["passed"]


def test_an_op_whose_semantics_changed_after_the_review_is_left_alone():
    """Range gained an attribute at opset 27: the passes leave it alone (it stays in the graph)."""
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("a", 0), ("b", 4), ("c", 1))]
    m = _model(nodes, [("x", TensorProto.FLOAT, [4])], [("y", TensorProto.FLOAT, [4])], inits, opset=27, ir=11)
    assert not opsets.known_semantics("Range", "", 27) and opsets.known_semantics("Range", "", 26)
    assert opsets.known_semantics("Reshape", "", 25)  # newer version, only wider types
    out, report = onnxopt.apply(m, "cleanup")
    assert [n.op_type for n in out.graph.node] == ["Range", "Add"]
    assert any("Range" in s for s in report.passes[0].skipped)
    m.opset_import[0].version = 26  # at 26 Range is known: cleanup folds it
    out, _ = onnxopt.apply(m, "cleanup")
    assert [n.op_type for n in out.graph.node] == ["Add"]


def test_model_without_default_domain_opset():
    nodes = [helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    out, _ = onnxopt.apply(m, "cleanup,bnfuse")
    assert [n.op_type for n in out.graph.node] == ["Binarizer"]


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = model_io.save_model(_token_model(), tmp_path / "out.onnx")
        big = model_io.save_model(_token_model(), tmp_path / "ext.onnx", external_data=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ext.onnx.data").stat().st_mode) == 0o644 and stat.S_IMODE(big.stat().st_mode) == 0o644


def _dynamo_bias_model():
    """What torch.onnx.export(dynamo=True, optimize=False) writes for a Conv bias: the bias is
    Expand(CastLike(Constant, x), Expand(Shape(weight)...)), so it is no constant until folded."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([4], np.int64), "n4")]
    nodes = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.25, np.float64))),
             helper.make_node("CastLike", ["zero", "x"], ["zero_f"]),
             helper.make_node("Expand", ["zero_f", "n4"], ["bias"]),
             helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                  [("y", TensorProto.FLOAT, ["batch", 4, "height", "width"])], inits, opset=20, ir=9)


def test_cleanup_folds_the_dynamo_castlike_expand_bias_chain():
    out, report = onnxopt.apply(_dynamo_bias_model(), "cleanup")
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    bias = next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[2])
    assert numpy_helper.to_array(bias).dtype == np.float32 and np.allclose(numpy_helper.to_array(bias), 0.25)
    assert report.passes[0].changes["castlike_of_constant_to_cast"] == 1 and report.passes[0].verification["passed"]


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_qdq_folds_computed_biases_and_its_output_passes_its_target_check(target):
    from onnxopt.data import DataSpec, open_data
    from onnxopt.quant import check as qcheck

    m = _dynamo_bias_model()
    data = open_data(DataSpec("random", max_samples=4), m, None)  # dynamic H/W: sizes from the model
    logs = []
    out, report = onnxopt.apply(m, "qdq", {"qdq": {"target": target}},
                                context=PassContext(data=data, data_spec=data.spec, log=logs.append))
    assert qcheck.check_model(out, target) == []
    assert any("ran the exact cleanup pass first" in line for line in logs)


def test_cli_refuses_to_write_a_qdq_model_failing_its_own_target_check(tmp_path, monkeypatch):
    """Never exit 0 with a model the target rejects: the run fails listing the violations and the
    model is not written (the pass itself records and warns them; see test_qdq)."""
    from click.testing import CliRunner

    import onnxopt.passes.qdq as qdq_pass
    from onnxopt.cli import cli
    from onnxopt.quant import check as qcheck

    src = tmp_path / "m.onnx"
    onnx.save(_image_model(("N", 3, 16, 16)), src)
    planted = qcheck.Violation("weight-dq", "conv_a", "planted violation")
    monkeypatch.setattr(qdq_pass.qcheck, "check_model", lambda model, target: [planted])
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["apply", "qdq", str(src), "-o", str(out), "--target", "tensorrt", "--data", "random",
                                   "--report", str(tmp_path / "r.json")])
    assert res.exit_code != 0 and "fails `onnxopt check --target tensorrt`" in res.output
    assert "[weight-dq] conv_a: planted violation" in res.output and not out.exists()
    assert (tmp_path / "r.json").exists()


def test_output_error_equal_infinities_and_the_float16_floor():
    r = {"y": np.array([-np.inf, 1.0, 2.0], np.float32)}
    assert runtime.output_error(r, {"y": r["y"].copy()})["max_abs"] == 0.0  # a masked -inf in both is no error
    h = {"y": np.array([1.0, 2.0], np.float16)}
    off = {"y": (h["y"] + np.float16(2 ** -10) * h["y"]).astype(np.float16)}  # one fp16 ulp
    err = runtime.output_error(h, off)
    assert 1e-4 < err["max_rel"] <= err["rtol_floor"] == 4 * float(np.finfo(np.float16).eps)


def test_tensor_error_is_the_one_rule_for_nans_infinities_and_shapes():
    """One tensor pair's error, shared by the pass verification and the rewrite-region checks."""
    inf = np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)
    assert runtime.tensor_error(inf, inf.copy()) == (0.0, 0.0)       # equal infinities, NaN vs NaN
    one_sided = inf.copy()
    one_sided[3] = np.nan
    assert runtime.tensor_error(inf, one_sided)[0] == np.inf       # a NaN on one side only
    assert runtime.tensor_error(np.zeros(3), np.zeros(4)) == (np.inf, np.inf)
    assert runtime.tensor_error(np.array([4.0, 2.0]), np.array([4.0, 1.0])) == (1.0, 0.25)


def test_a_failed_exact_verification_reverts_the_faulty_rule_and_keeps_the_rest():
    """An exact pass with two rules, one wrong: the manager finds it, runs the pass without it,
    keeps (and verifies) the other rule's rewrites and lists what was reverted and by how much."""
    from dataclasses import dataclass

    from fixtures.testpasses import temporary_pass
    from onnxopt.registry import PassOptions, PassResult, option

    @dataclass
    class TwoRules(PassOptions):
        drop_identity: bool = option(True, "remove the Identity (exact)")
        corrupt: bool = option(True, "add 0.5 to the embedding table (wrong)")

    def two_rules(model, options, ctx):
        changes = {}
        if options.drop_identity:
            ident = next(n for n in model.graph.node if n.op_type == "Identity")
            for n in model.graph.node:
                n.input[:] = [ident.input[0] if i == ident.output[0] else i for i in n.input]
            model.graph.node.remove(ident)
            changes["identity_removed"] = 1
        if options.corrupt:
            init = model.graph.initializer[0]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.5), init.name))
            changes["corrupted"] = 1
        return PassResult(model, changes=changes)

    lines = []
    with temporary_pass("t_two_rules", two_rules, exact=True, options=TwoRules):
        out, report = onnxopt.apply(_token_model(), "t_two_rules", context=PassContext(log=lines.append))
    rec = report.passes[0]
    assert [n.op_type for n in out.graph.node] == ["Gather", "ReduceMean"]  # the exact rule is kept
    assert rec.changes == {"identity_removed": 1} and rec.options["corrupt"] is False
    assert rec.verification["passed"] and rec.verification["max_abs"] == 0.0
    (rv,) = rec.verification["reverted"]
    assert rv["rule"] == "corrupt" and rv["max_abs"] == pytest.approx(0.5, rel=1e-3)
    assert any("reverted corrupt" in line for line in lines)
