"""Tests of the ``lite`` pass: every encoding each rule matches, near-matches that must stay,
exact rules against onnxruntime (max abs error 0 where the math is exact), the report, user rules,
and the real YOLOX-nano model (opt-in, ../shared)."""
from __future__ import annotations

import collections
import math
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from helpers import assert_equivalent, op_count, rand, run
from onnxopt.registry import PassContext
from lite_models import GraphBuilder, mobilenetv3_like, yolox_like
from onnxopt.errors import OptionError, VerificationError
from onnxopt.passes import lite
from onnxopt.passes.lite import Match, Rule, options_with, run_lite
from rewrite_checks import apply_lite, ops, relu_reference

# ------------------------------------------------------------------------------ MobileNetV3


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_mobilenetv3_everything_replaced_nothing_else_touched(opset):
    model = mobilenetv3_like(opset=opset, gelu="native")
    res = apply_lite(model)
    assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
    assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})
    # every non-SE conv is kept as it was (same inputs, weights, attributes)
    se_convs = 2
    before = [n for n in model.graph.node if n.op_type == "Conv"]
    after = {tuple(n.output): n for n in res.model.graph.node if n.op_type == "Conv"}
    kept = [n for n in before if tuple(n.output) in after]
    assert len(kept) == len(before) - se_convs
    inits0 = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    inits1 = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    for n in kept:
        m = after[tuple(n.output)]
        assert list(m.input[1:]) == list(n.input[1:]) and m.attribute == n.attribute
        for t in n.input[1:]:
            np.testing.assert_array_equal(inits0[t], inits1[t])
    # every Relu reads a Conv output directly
    conv_outs = {n.output[0] for n in res.model.graph.node if n.op_type == "Conv"}
    assert all(n.input[0] in conv_outs for n in res.model.graph.node if n.op_type == "Relu")
    assert res.extra["output_error"]["inputs"] == "generated" and math.isfinite(res.extra["output_error"]["max_abs"])
    again = apply_lite(res.model)  # idempotent: a lite model has nothing left to rewrite
    assert not again.changes and ops(again.model) == ops(res.model)


def test_mobilenetv3_torch_export_if_torch_available():
    torch = pytest.importorskip("torch")
    from lite_models import torch_mobilenetv3_onnx

    for opset in (13, 17, 20):
        model = torch_mobilenetv3_onnx(opset=opset)
        # the onnx.helper twin the other tests use writes the same encodings
        assert ops(model) == ops(mobilenetv3_like(opset=opset, gelu="native")), torch.__version__
        res = apply_lite(model)
        assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
        assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})


def _weights_as_constant_nodes(model):
    """Move every initializer into a Constant node (as Paddle exports do)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_weights_in_constant_nodes_and_dynamic_batch():
    model = _weights_as_constant_nodes(mobilenetv3_like(opset=17))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    res = apply_lite(model)
    assert res.changes == {"squeeze_and_excite_to_identity": 1, "hardswish_to_relu": 3, "gelu_to_relu": 1, "relu6_to_relu": 1}
    assert ops(res.model) == collections.Counter({"Conv": 6, "Relu": 5})
    model = _weights_as_constant_nodes(yolox_like())
    res = apply_lite(model, rules="focus_to_conv,maxpool_ge5_to_cascade")
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3}
    assert assert_equivalent(model, res.model, atol=0, rtol=0) == 0.0
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Conv", ["input", b.init(rand(8, 4, 4, 4))], ["output"], kernel_shape=[4, 4], pads=[1, 1, 2, 2]))
    model = _weights_as_constant_nodes(b.model([("input", [1, 4, 9, 9])], [("output", [1, 8, 9, 9])]))
    res = apply_lite(model, rules="conv_even_kernel_to_odd")
    assert res.changes == {"conv_even_kernel_to_odd": 1}
    assert_equivalent(model, res.model, atol=1e-5, rtol=1e-5)


def test_subgraph_reads_a_rewritten_tensor():
    b = GraphBuilder(17)
    y = b.silu(b.conv("input", 3, 8, 3))
    then_g = helper.make_graph([helper.make_node("Sigmoid", [y], ["ts"]), helper.make_node("Mul", [y, "ts"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", [y], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])])
    b.nodes.append(helper.make_node("If", ["cond"], ["output"], then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
                                             helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 8, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res = apply_lite(model)
    assert res.changes == {"silu_to_relu": 1}  # the main-graph SiLU; the If body is left as it is
    feed = {"input": rand(1, 3, 8, 8), "cond": np.array(False)}
    got = run(res.model, feed)["output"]
    ref = run(relu_reference(), {"input": feed["input"]})["output"]
    np.testing.assert_allclose(got, -ref, rtol=0, atol=0)


def test_ir3_model_keeps_initializers_as_graph_inputs():
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3, 3, 3])
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2])]
    graph = helper.make_graph(nodes, "ir3", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 9, 9]), w],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 4, 9, 9])],
                              [onnx.numpy_helper.from_array(rand(4, 3, 3, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    res = apply_lite(model)  # full checker: IR 3 needs every initializer listed as an input
    assert res.changes == {"maxpool_ge5_to_cascade": 1}
    assert "w" in [i.name for i in res.model.graph.input]


# ------------------------------------------------------------------------------ YOLOX-like


@pytest.mark.parametrize("fused", [False, True])
def test_yolox_like(fused):
    model = yolox_like(fused_slices=fused)
    res = apply_lite(model)
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3, "silu_to_relu": 3}
    assert op_count(res.model, "Sigmoid") == 2  # the head's objectness/class sigmoids stay
    assert sum("feeds Concat" in s for s in res.skipped) == 2
    ver = res.extra["exact_verification"]["rules"]
    assert ver["focus_to_conv"]["max_abs"] == 0.0 and ver["maxpool_ge5_to_cascade"]["max_abs"] == 0.0
    only_exact = apply_lite(model, rules="focus_to_conv,maxpool_ge5_to_cascade")
    assert assert_equivalent(model, only_exact.model, atol=0, rtol=0) == 0.0


def test_uses_user_data_for_the_report():
    from onnxopt.registry import PassContext

    model = yolox_like()
    batches = [{"input": rand(1, 3, 32, 32, seed=s) * 50} for s in range(3)]
    res = run_lite(model, options_with(), PassContext(data=lambda: iter(batches)))
    assert res.extra["output_error"]["inputs"] == "data" and res.extra["output_error"]["batches"] == 2


# ------------------------------------------------------------------------------ options and user rules


def test_unknown_rule_names_are_option_errors():
    model = yolox_like()
    with pytest.raises(OptionError, match="unknown lite rule 'silu'"):
        apply_lite(model, rules="silu")
    with pytest.raises(OptionError, match="valid rules"):
        apply_lite(model, disable="nope")
    res = apply_lite(model, disable="silu_to_relu")
    assert "silu_to_relu" not in res.changes and op_count(res.model, "Sigmoid") == 5


SOFTPLUS_RULES = textwrap.dedent('''
    from onnxopt.passes.lite import Match, register_rule

    def match(graph, node, ctx):
        """Softplus(x)"""
        if node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Relu":
            return "already after a Relu"
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Relu", [m.data["x"]])

    register_rule("softplus_to_relu", match=match, rewrite=rewrite, exact=False, anchors=("Softplus",))
''')


def _softplus_model():
    b = GraphBuilder()
    y = b.op("Softplus", [b.conv("input", 3, 8, 3)])
    z = b.op("Softplus", [b.op("Relu", [y])])
    b.nodes.append(helper.make_node("Identity", [z], ["output"]))
    return b.model([("input", [1, 3, 8, 8])], [("output", [1, 8, 8, 8])])


def test_rules_module_registers_a_user_rule(tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text(SOFTPLUS_RULES)
    model = _softplus_model()
    res = apply_lite(model, rules_module=str(path))
    assert res.changes == {"softplus_to_relu": 1} and op_count(res.model, "Softplus") == 1
    assert any("already after a Relu" in s for s in res.skipped)
    assert not res.extra["rules"]["softplus_to_relu"]["exact"]
    # registration inside a rules module does not leak into later runs
    assert "softplus_to_relu" not in [r.name for r in lite.rule_table()]
    res = apply_lite(model, rules_module=str(path), disable="softplus_to_relu")
    assert not res.changes


def test_rules_module_custom_table_and_errors(tmp_path):
    path = tmp_path / "table.py"
    path.write_text(SOFTPLUS_RULES.replace('register_rule("softplus_to_relu"', 'RULE = register_rule("softplus_to_relu"')
                    + "\nRULES = []\n")
    # RULES replaces the table; the registered rule still joins it
    model = _softplus_model()
    res = apply_lite(model, rules_module=str(path))
    assert list(res.extra["rules"]) == ["softplus_to_relu"]
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(OptionError, match="failed to import: RuntimeError: boom"):
        apply_lite(model, rules_module=str(bad))
    with pytest.raises(OptionError, match="does not exist"):
        apply_lite(model, rules_module=str(tmp_path / "missing.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(OptionError, match="registers no rule"):
        apply_lite(model, rules_module=str(empty))


def test_python_api_custom_table_and_exact_verification_catches_a_wrong_exact_rule():
    def match(graph, node, ctx):
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Sigmoid", [m.data["x"]])

    wrong = Rule("relu_to_sigmoid", "claims to be exact but is not", True, True, ("Relu",), match, rewrite)
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Relu", ["input"], ["output"]))
    model = b.model([("input", [1, 3, 4, 4])], [("output", [1, 3, 4, 4])])
    with pytest.raises(VerificationError, match="relu_to_sigmoid"):
        run_lite(model, options_with(), table=[wrong])
    res = run_lite(model, options_with(verify=False), table=[wrong])
    assert res.changes == {"relu_to_sigmoid": 1} and "exact_verification" not in res.extra


def test_exact_rule_on_a_dynamic_region_is_verified_on_the_whole_model():
    from onnxopt.registry import PassContext

    b = GraphBuilder()
    b.nodes.append(helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    graph = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res = run_lite(model, options_with(), PassContext(input_shapes={"input": [2, 3, 11, 7]}))
    ver = res.extra["exact_verification"]["rules"]["maxpool_ge5_to_cascade"]
    assert ver["max_abs"] == 0.0 and "whole model" in ver["inputs"]
    assert "no static shape" in res.extra["rules"]["maxpool_ge5_to_cascade"]["region_check"]
    # without shapes for the dynamic input, inputs are generated from the model (batch 1, sizes
    # that run): the rule is verified on them, with no flags
    ver = run_lite(model, options_with()).extra["exact_verification"]["rules"]["maxpool_ge5_to_cascade"]
    assert ver["max_abs"] == 0.0 and ver["inputs"] == "generated (whole model)"
    assert run_lite(model, options_with(verify=False)).changes == {"maxpool_ge5_to_cascade": 1}


def test_matching_visits_each_anchor_once_per_rule():
    calls = collections.Counter()
    table = []
    for rule in lite.default_rules():
        def counted(graph, node, ctx, _m=rule.match, _n=rule.name):
            calls[(_n, id(node))] += 1
            return _m(graph, node, ctx)
        table.append(Rule(rule.name, rule.summary, rule.exact, rule.default, rule.anchors, counted, rule.rewrite))
    model = mobilenetv3_like()
    run_lite(model, options_with(verify=False), table=table)
    assert calls and max(calls.values()) == 1


def test_register_rule_api_adds_to_the_table():
    def match(graph, node, ctx):
        return None

    try:
        lite.register_rule("noop_rule", match=match, rewrite=lambda g, m, c: None, exact=True, before="silu_to_relu")
        names = [r.name for r in lite.rule_table()]
        assert names.index("noop_rule") == names.index("silu_to_relu") - 1
    finally:
        lite._USER_RULES[:] = [r for r in lite._USER_RULES if r[0].name != "noop_rule"]


def test_cli_rules_module(tmp_path):
    from click.testing import CliRunner

    from onnxopt.cli import cli

    path = tmp_path / "my_rules.py"
    path.write_text(SOFTPLUS_RULES)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_softplus_model(), src)
    result = CliRunner().invoke(cli, ["apply", "lite", str(src), "-o", str(out), "--rules-module", str(path), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert op_count(onnx.load(out), "Softplus") == 1


# ------------------------------------------------------------------------------ real model


@pytest.mark.shared
def test_yolox_nano(shared):
    from onnxopt.model_io import load_model

    model = load_model(shared("models", "yolox_nano.onnx"))
    sig_mul = sum(1 for n in model.graph.node if n.op_type == "Sigmoid")
    res = apply_lite(model)
    assert res.changes == {"focus_to_conv": 1, "maxpool_ge5_to_cascade": 3, "silu_to_relu": 104}
    assert sig_mul == 110 and op_count(res.model, "Sigmoid") == 6  # the head's objectness/class sigmoids
    assert op_count(res.model, "Slice") == 0 and op_count(res.model, "MaxPool") == 12
    ver = res.extra["exact_verification"]["rules"]
    assert ver["maxpool_ge5_to_cascade"]["max_abs"] == 0.0 and ver["focus_to_conv"]["max_abs"] == 0.0
    only_pool = apply_lite(model, rules="maxpool_ge5_to_cascade")
    feed = {"images": rand(1, 3, 416, 416, scale=50.0)}
    np.testing.assert_array_equal(run(model, feed)["output"], run(only_pool.model, feed)["output"])
    assert run(res.model, feed)["output"].shape == (1, 3549, 85)


def test_cli_exits_cleanly_when_no_rule_fires(tmp_path):
    """The input model's reference outputs are computed in a thread while the rules run. When no
    rule fired, nothing joined it: the process exited during onnxruntime's session setup and
    aborted with exit code 134 after writing the model."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "m.onnx"
    onnx.save(mobilenetv3_like(), src)
    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "onnxopt", "apply", "lite", str(src), "-o", str(tmp_path / "out.onnx"),
                               "--set", "lite.rules=focus_to_conv"], cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr


def test_lite_pass_reverts_only_the_rewrites_that_fail_verification(monkeypatch):
    """A rule wrong on one of its two matches: that rewrite is undone (listed with its error), the
    other kept, and the output equals the input model's."""
    def match(graph, node, ctx):
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):  # LeakyRelu(alpha=0) is Relu; alpha=0.5 on 'r2' is a bug
        ctx.replace_output(m.output, "LeakyRelu", [m.data["x"]], {"alpha": 0.5 if m.output.name == "r2" else 0.0})

    wrong = Rule("relu_to_leaky", "exact except on r2", True, True, ("Relu",), match, rewrite)
    monkeypatch.setattr(lite, "rule_table", lambda rules_module=None: [wrong])  # (leakyrelu_to_relu would undo it)
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Relu", [b.conv("input", 3, 4, 3)], ["r1"]))
    b.nodes.append(helper.make_node("Relu", [b.conv("r1", 4, 4, 3)], ["r2"]))
    b.nodes.append(helper.make_node("Identity", ["r2"], ["output"]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 4, 8, 8])])
    logs = []
    out, report = onnxopt.apply(model, "lite", context=PassContext(log=logs.append))
    rec = report.passes[0]
    assert rec.changes == {"relu_to_leaky": 1}
    assert sorted(n.op_type for n in out.graph.node if n.op_type in ("Relu", "LeakyRelu")) == ["LeakyRelu", "Relu"]
    assert next(n for n in out.graph.node if n.op_type == "Relu").output == ["r2"]
    assert rec.extra["reverted_rewrites"] == {"relu_to_leaky": ["r2"]}
    assert any(s.startswith("reverted 1 rewrite(s) of exact rule relu_to_leaky") and "at r2 (max abs" in s for s in rec.skipped)
    assert sum("relu_to_leaky" in line and "reverted" in line for line in logs) == 1
    assert rec.extra["exact_verification"]["rules"]["relu_to_leaky"]["passed"]
    assert_equivalent(model, out, rtol=1e-5, atol=1e-5)


def test_lite_pass_reverts_an_exact_rule_that_fails_verification(monkeypatch):
    """Through the pass (the manager, the CLI), a wrong exact rule is switched off and the pass
    rerun without it, the other rules kept; --require-verify keeps the error."""
    def match(graph, node, ctx):
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Sigmoid", [m.data["x"]])

    wrong = Rule("relu_to_sigmoid", "claims to be exact but is not", True, True, ("Relu",), match, rewrite)
    monkeypatch.setattr(lite, "rule_table", lambda rules_module=None: [wrong] + lite.default_rules())
    b = GraphBuilder()
    y = b.conv("input", 3, 4, 3)
    b.nodes.append(helper.make_node("Relu", [y], ["r"]))
    b.nodes.append(helper.make_node("MaxPool", ["r"], ["output"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    model = b.model([("input", [1, 3, 8, 8])], [("output", [1, 4, 8, 8])])
    logs = []
    out, report = onnxopt.apply(model, "lite", context=PassContext(log=logs.append))
    rec = report.passes[0]
    assert rec.changes == {"maxpool_ge5_to_cascade": 1} and "Relu" in {n.op_type for n in out.graph.node}
    assert any(s.startswith("reverted exact rule relu_to_sigmoid") for s in rec.skipped)
    assert sum("reverted exact rule relu_to_sigmoid" in line for line in logs) == 1
    with pytest.raises(VerificationError, match="relu_to_sigmoid"):
        onnxopt.apply(model, "lite", context=PassContext(require_verify=True))
