"""Pass registry and manager: option validation, --set / recipes, verification, save-steps, reports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import models
from fixtures.testpasses import SCALE_OPTIONS, scale_outputs, temporary_pass
from helpers import assert_equivalent, make_model, op_count
from onnxopt import apply, manager, registry
from onnxopt.errors import OnnxoptError, OptionError, VerificationError
from onnxopt.registry import Option, PassContext, PassResult


@pytest.fixture
def t_scale():
    with temporary_pass("t_scale", scale_outputs, exact=True, options=SCALE_OPTIONS) as info:
        yield info
    assert "t_scale" not in registry.all_passes()  # cleaned out of the registry


@pytest.fixture
def t_approx():
    with temporary_pass("t_approx", scale_outputs, exact=False, options=SCALE_OPTIONS) as info:
        yield info


# ------------------------------------------------------------------------------------ registry
def test_unknown_pass_lists_the_valid_ones(t_scale):
    with pytest.raises(OptionError) as err:
        manager.parse_pass_list("t_scale,nosuchpass")
    assert "unknown pass 'nosuchpass'" in err.value.message
    assert "t_scale" in err.value.hint
    assert err.value.exit_code == 2
    with pytest.raises(OptionError, match="no pass given"):
        manager.parse_pass_list(" , ")


def test_unknown_option_lists_the_valid_ones(t_scale):
    with pytest.raises(OptionError) as err:
        manager.resolve_options(["t_scale"], {"t_scale": {"factr": "2"}})
    assert "unknown option 'factr'" in err.value.message
    assert err.value.hint == "valid options of t_scale: factor, mode, count, enabled"


def test_options_for_a_pass_outside_the_chain(t_scale):
    with temporary_pass("t_other", scale_outputs, exact=True):
        with pytest.raises(OptionError, match="not in the chain"):
            manager.resolve_options(["t_scale"], {"t_other": {}})
    with pytest.raises(OptionError, match="unknown pass 'ghost'"):
        manager.resolve_options(["t_scale"], {"ghost": {"x": 1}})


@pytest.mark.parametrize("option, value, words", [
    ("factor", "abc", "expected float"),
    ("factor", True, "expected float"),
    ("count", "1.5", "expected int"),
    ("count", 2.5, "expected int"),
    ("enabled", "maybe", "expected bool"),
    ("mode", "pow", "valid values: mul, div"),
])
def test_bad_option_values(t_scale, option, value, words):
    with pytest.raises(OptionError) as err:
        t_scale.resolve({option: value})
    assert f"t_scale.{option}" in err.value.message
    assert words in str(err.value)


def test_option_conversion(t_scale):
    got = t_scale.resolve({"factor": "2", "count": "3", "enabled": "off", "mode": "div"}).to_dict()
    assert got == {"factor": 2.0, "count": 3, "enabled": False, "mode": "div"}
    assert t_scale.resolve(None).to_dict() == {"factor": 1.0, "mode": "mul", "count": 1, "enabled": True}
    listed = Option("ops", list, [], "ops", choices=["Conv", "Gemm"])
    assert listed.convert("p", "Conv, Gemm") == ["Conv", "Gemm"]
    with pytest.raises(OptionError, match="'Relu'"):
        listed.convert("p", ["Conv", "Relu"])


def test_double_registration_is_refused(t_scale):
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register_pass("t_scale", "again", exact=True)(lambda m, o, c: PassResult(m))


# -------------------------------------------------------------------------------- --set, recipe
def test_parse_set_options():
    got = manager.parse_set_options(["a.x=1", "a.y = two ", "b.z=k=v", "c.d.e=3"])
    assert got == {"a": {"x": "1", "y": "two"}, "b": {"z": "k=v"}, "c": {"d.e": "3"}}
    for bad in ("noequals", "nodot=1", "=1"):
        with pytest.raises(OptionError, match="PASS.OPTION=VALUE"):
            manager.parse_set_options([bad])


def test_recipe_yaml_and_json(tmp_path, t_scale):
    (tmp_path / "r.yaml").write_text("passes:\n  - t_scale: {count: 2}\n  - t_scale\noptions:\n  t_scale: {factor: 1.0, mode: mul}\n")
    names, opts = manager.load_recipe(tmp_path / "r.yaml")
    assert names == ["t_scale", "t_scale"] and opts == {"t_scale": {"count": 2, "factor": 1.0, "mode": "mul"}}
    (tmp_path / "r.json").write_text(json.dumps({"passes": "t_scale", "options": {"t_scale": {"count": "3"}}}))
    names, opts = manager.load_recipe(tmp_path / "r.json")
    assert names == ["t_scale"] and opts == {"t_scale": {"count": "3"}}


@pytest.mark.parametrize("text, words", [
    ("just: text", "no 'passes' list"),
    ("passes: [t_scale", "cannot be parsed"),
    ("passes: 3", "must be a list"),
    ("passes:\n  - t_scale: conv\n", "must be a mapping"),
    ("passes: [t_scale]\noptions: [1]\n", "'options' must be a mapping"),
    ("passes:\n  - [a, b]\n", "bad pass entry"),
])
def test_bad_recipes_are_user_errors(tmp_path, text, words):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(OptionError, match=words):
        manager.load_recipe(tmp_path / "r.yaml")
    with pytest.raises(OptionError, match="does not exist"):
        manager.load_recipe(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------- apply, verify
def test_apply_exact_pass_verified_and_input_untouched(tmp_path, t_scale):
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    before = src.read_bytes()
    out, report = apply(src, "t_scale", options={"t_scale": {"count": "2"}})
    assert src.read_bytes() == before
    assert op_count(out, "Mul") == 2
    assert_equivalent(models.tiny_cnn(), out)
    rec = report.passes[0]
    assert rec.verification["passed"] and rec.verification["max_abs"] == 0.0
    assert rec.verification["inputs"] == "generated"
    proto = models.tiny_cnn()
    copy = proto.SerializeToString()
    apply(proto, "t_scale")
    assert proto.SerializeToString() == copy  # a proto given to apply is not modified either


def test_pass_failing_verification_is_undone_and_the_chain_goes_on(t_scale, t_approx):
    """An exact pass with no rule switch that helps (here: wrong everywhere) is reverted: the
    next pass runs on the model as it was, the record keeps the failed verification, the console
    has one line."""
    logs = []
    out, report = apply(models.tiny_cnn(), "t_scale,t_approx", options={"t_scale": {"factor": 1.5}, "t_approx": {"factor": 2}},
                        context=PassContext(log=logs.append))
    first = report.passes[0]
    assert first.verification["reverted_pass"] and not first.verification["passed"] and first.verification["max_abs"] > 0
    assert first.changes == {} and first.after == first.before and any(s.startswith("pass reverted:") for s in first.skipped)
    assert op_count(out, "Mul") == 1 and report.passes[1].changes  # t_scale's Mul is gone, t_approx's is there
    said = [line for line in logs if "reverted" in line]
    assert len(said) == 1 and "t_scale: reverted, the model is kept as it was before the pass" in said[0]


def test_verification_failure_names_the_errors(t_scale):
    with pytest.raises(VerificationError) as err:
        apply(models.tiny_cnn(), "t_scale", options={"t_scale": {"factor": 1.5}}, context=PassContext(require_verify=True))
    msg = err.value.message
    assert "pass 't_scale'" in msg and "'logits'" in msg
    assert "max abs error" in msg and "max rel error" in msg
    assert err.value.hint


def test_deliberately_wrong_exact_pass_registered_in_the_test():
    def wrong(model, options, ctx):
        """Adds 0.01 to the first initializer (a corrupted weight)."""
        init = model.graph.initializer[0]
        value = numpy_helper.to_array(init) + np.float32(0.01)
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        return PassResult(model, changes={"corrupted": 1})

    with temporary_pass("t_wrong", wrong, exact=True):
        with pytest.raises(VerificationError, match=r"max abs error [0-9.e-]+, max rel error [0-9.e-]+"):
            apply(models.tiny_cnn(), "t_wrong", context=PassContext(require_verify=True))
        out, report = apply(models.tiny_cnn(), "t_wrong")  # by default the pass is undone
        assert report.passes[0].verification["reverted_pass"] and report.passes[0].changes == {}
        # --no-verify lets it through (the user asked for it)
        out, report = apply(models.tiny_cnn(), "t_wrong", verify=False)
        assert report.passes[0].verification is None
    assert "t_wrong" not in registry.all_passes()


def test_approximate_passes_are_not_verified(t_approx):
    out, report = apply(models.tiny_cnn(), "t_approx", options={"t_approx": {"factor": 2}})
    assert report.passes[0].verification is None and not report.passes[0].exact


def test_unmodified_model_is_not_verified(t_scale):
    _, report = apply(models.tiny_cnn(), "t_scale", options={"t_scale": {"enabled": False}})
    assert report.passes[0].verification is None and report.passes[0].changes == {}


def test_verification_keeps_the_worst_relative_error_over_feeds():
    """Regression: a later feed with a larger absolute error used to overwrite the worst relative
    error, so a pass off by +0.001 on tiny outputs passed when the next feed had large outputs."""
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])

    def offset(model, options, ctx):
        g = model.graph
        g.node[0].output[0] = "y_pre"
        g.initializer.extend([numpy_helper.from_array(np.array(1.00001, np.float32), "a"),
                              numpy_helper.from_array(np.array(0.001, np.float32), "b")])
        g.node.extend([helper.make_node("Mul", ["y_pre", "a"], ["y_m"]), helper.make_node("Add", ["y_m", "b"], ["y"])])
        return PassResult(model, changes={"offset": 1})

    small = {"x": np.full((1, 4), 1e-4, np.float32)}   # abs err 0.001, rel err 10
    large = {"x": np.full((1, 4), 1e3, np.float32)}    # abs err ~0.011, rel err ~1e-5
    ctx = PassContext(data=lambda: iter([small, large]), require_verify=True)
    with temporary_pass("t_offset", offset, exact=True):
        with pytest.raises(VerificationError):
            apply(model, "t_offset", context=ctx)


def test_verification_on_user_data(t_scale):
    feeds = [{"input": np.ones((2, 3, 8, 8), np.float32)}]
    _, report = apply(models.tiny_cnn(), "t_scale", context=PassContext(data=lambda: iter(feeds)))
    assert report.passes[0].verification["inputs"] == "data"


def test_pass_producing_an_invalid_model_is_an_internal_error():
    def breaks(model, options, ctx):
        model.graph.node[0].input[0] = "ghost"
        return PassResult(model, changes={"broken": 1})

    with temporary_pass("t_breaks", breaks, exact=True):
        with pytest.raises(OnnxoptError, match="internal error: pass 't_breaks' produced an invalid model"):
            apply(models.tiny_cnn(), "t_breaks")


def test_save_steps_and_report(tmp_path, t_scale):
    steps = tmp_path / "steps"
    out, report = apply(models.tiny_cnn(), "t_scale,t_scale", options={"t_scale": {"count": 2}}, save_steps=steps)
    files = sorted(p.name for p in steps.iterdir())
    assert files == ["01_t_scale.onnx", "02_t_scale.onnx"]
    step1 = onnx.load(str(steps / "01_t_scale.onnx"))
    assert op_count(step1, "Mul") == 2 and op_count(out, "Mul") == 4
    onnx.checker.check_model(step1, full_check=True)

    report.write(tmp_path / "r" / "report.json")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.json"]  # no temp file left
    assert data["onnxopt_version"] and data["total_seconds"] >= 0
    assert [p["pass"] for p in data["passes"]] == ["t_scale", "t_scale"]
    first, second = data["passes"]
    assert first["exact"] is True and first["options"] == {"factor": 1.0, "mode": "mul", "count": 2, "enabled": True}
    assert first["before"]["ops"]["BatchNormalization"] == 1 and "Mul" not in first["before"]["ops"]
    assert first["after"]["ops"]["Mul"] == 2 and second["after"]["ops"]["Mul"] == 4
    assert second["before"] == first["after"]
    for key in ("nodes", "params", "macs", "size_bytes"):
        assert key in first["before"] and key in first["after"]
    assert first["before"]["macs"] == models.TINY_CNN_MACS
    assert first["before"]["params"] == models.TINY_CNN_PARAMS
    assert first["after"]["size_bytes"] > first["before"]["size_bytes"]
    assert first["changes"] == {"outputs_scaled": 1} and first["skipped"] == []
    assert first["verification"]["passed"] is True and first["verification"]["max_abs"] == 0.0
    assert first["seconds"] >= 0


def test_skipped_places_are_reported(t_scale):
    model = make_model([helper.make_node("Cast", ["x"], ["i"], to=onnx.TensorProto.INT64),
                        helper.make_node("Relu", ["x"], ["y"])],
                       [("x", [2])], [("i", [2], onnx.TensorProto.INT64), ("y", [2])])
    _, report = apply(model, "t_scale")
    assert report.passes[0].skipped == ["i: not a float output"]
    assert report.passes[0].changes == {"outputs_scaled": 1}
