"""The ``bnfuse`` rules (onnxopt/rewrite/batchnorm.py) one by one: each rule alone (``bnfuse.rules``)
and switched off (``bnfuse.disable``), its region check, the rounds that fold a chain whatever
its order, and the revert of a rule whose rewrites change the output."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from helpers import assert_equivalent, op_count, rand
from onnxopt.registry import PassContext, get_pass
from onnxopt.rewrite import batchnorm, bnfuse_rules
from test_bnfuse import bn_inits, bn_node, make_model

RULES = ["bn_into_layer", "affine_into_layer", "bn_into_following_conv", "bn_standalone"]


def run(model, **options):
    info = get_pass("bnfuse")
    result = info.run(onnxopt.load_model(model), info.resolve(options), PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


def conv_then(nodes, inits=(), pads=1, c=4):
    """x -> Conv (3x3, ``pads``) -> c -> ``nodes`` -> y."""
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[pads] * 4)
    return make_model([conv, *nodes], [("x", [2, 3, 6, 6])], [("y", None)],
                      [("w", rand(c, 3, 3, 3, seed=1)), ("b", rand(c, seed=2)), *inits])


def test_the_rule_table_and_its_options():
    assert [r.name for r in bnfuse_rules()] == RULES and all(r.exact and r.default for r in bnfuse_rules())
    help_text = next(o.help for o in get_pass("bnfuse").options if o.name == "rules")
    assert all(name in help_text for name in RULES)
    with pytest.raises(onnxopt.OnnxoptError, match="unknown bnfuse rule 'bn_fold'"):
        get_pass("bnfuse").resolve({"disable": ["bn_fold"]}).validate(None, PassContext())


def test_bn_into_layer_alone_is_exact_on_its_region():
    model = conv_then([bn_node("c", "y")], bn_inits("bn", 4))
    res = run(model, rules=["bn_into_layer"])
    assert res.changes == {"bn_folded_into_conv": 1} and op_count(res.model, "BatchNormalization") == 0
    check = res.extra["exact_verification"]["rules"]["bn_into_layer"]
    assert check["passed"] and check["max_rel"] <= 1e-5 and check["region_nodes"] == {"before": 2, "after": 1}
    assert res.extra["rules"]["bn_into_layer"]["count"] == 1 and not res.extra["rules"]["bn_standalone"]["enabled"]
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)


def test_bn_into_layer_disabled_leaves_the_bn_to_bn_standalone():
    model = conv_then([bn_node("c", "y")], bn_inits("bn", 4))
    res = run(model, disable=["bn_into_layer"])
    assert res.changes == {"bn_to_mul_add": 1} and op_count(res.model, "Conv") == 1
    assert any("bn_into_layer is disabled" in d for d in res.details)
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)
    kept = run(model, disable=["bn_into_layer", "bn_standalone"])
    assert kept.changes == {} and op_count(kept.model, "BatchNormalization") == 1


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_affine_into_layer_alone_and_disabled(op):
    k = (np.abs(rand(4, 1, 1, seed=3)) + 0.5).astype(np.float32)
    model = conv_then([helper.make_node(op, ["c", "k"], ["y"])], [("k", k)])
    res = run(model, rules=["affine_into_layer"])
    assert res.changes == {f"{op.lower()}_folded_into_conv": 1} and op_count(res.model, op) == 0
    assert res.extra["exact_verification"]["rules"]["affine_into_layer"]["passed"]
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)
    off = run(model, disable=["affine_into_layer"])
    assert off.changes == {} and op_count(off.model, op) == 1


def test_bn_into_following_conv_alone():
    nodes = [bn_node("x", "t"), helper.make_node("Conv", ["t", "w"], ["y"])]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", None)], [("w", rand(4, 3, 3, 3, seed=1)), *bn_inits("bn", 3)])
    res = run(model, rules=["bn_into_following_conv"])
    assert res.changes == {"bn_folded_into_following_conv": 1} and op_count(res.model, "BatchNormalization") == 0
    assert res.extra["exact_verification"]["rules"]["bn_into_following_conv"]["passed"]
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)
    off = run(model, disable=["bn_into_following_conv"])
    assert off.changes == {"bn_to_mul_add": 1}


@pytest.mark.parametrize("first", ["Mul", "Add"])
def test_a_chain_folds_whole_whatever_its_order(first):
    """Conv -> Mul/Add -> BN: the BN's producer is a Mul until the affine rule folds it, so the
    two rules run in rounds until neither fires."""
    k = (np.abs(rand(4, 1, 1, seed=3)) + 0.5).astype(np.float32)
    model = conv_then([helper.make_node(first, ["c", "k"], ["m"]), bn_node("m", "y")], [("k", k), *bn_inits("bn", 4)])
    res = run(model)
    assert res.changes == {f"{first.lower()}_folded_into_conv": 1, "bn_folded_into_conv": 1}
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)


def test_a_rule_that_changes_its_region_is_reverted(monkeypatch):
    """A broken fold (s off by 1 %) fails its region check; the pass reruns without that rule and
    keeps the others."""
    real = batchnorm._affine
    monkeypatch.setattr(batchnorm, "_affine", lambda node, vec: tuple(v * 1.01 if i == 0 else v for i, v in enumerate(real(node, vec))))
    k = (np.abs(rand(4, 1, 1, seed=3)) + 0.5).astype(np.float32)
    model = conv_then([bn_node("c", "m"), helper.make_node("Mul", ["m", "k"], ["y"])], [("k", k), *bn_inits("bn", 4)])
    res = run(model)
    assert res.changes == {"bn_folded_into_conv": 1} and op_count(res.model, "Mul") == 1
    assert [r["rule"] for r in res.extra["reverted"]] == ["affine_into_layer"] and res.extra["reverted"][0]["max_abs"] > 1e-3
    assert any("reverted rule affine_into_layer" in s for s in res.skipped)
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)


def test_the_manager_reverts_a_rule_table_pass_by_its_disable_option():
    from onnxopt import manager
    opts = get_pass("bnfuse").resolve({"disable": ["bn_standalone"]})
    assert manager._rule_switches(opts, {"rules": {"bn_into_layer": {"count": 2}, "affine_into_layer": {"count": 0}}}) == ["bn_into_layer"]
    assert manager._switched_off(opts, ("bn_into_layer",)).disable == ["bn_standalone", "bn_into_layer"]


def test_only_the_fold_that_changes_its_region_is_reverted(monkeypatch):
    """Two Mul folds on two branches, one broken: that one Mul stays, the other is folded, and
    the output is the input model's."""
    real = batchnorm._affine
    monkeypatch.setattr(batchnorm, "_affine", lambda node, vec: tuple(v * 1.01 if i == 0 and node.outputs[0].name == "m2" else v
                                                                  for i, v in enumerate(real(node, vec))))
    k1, k2 = ((np.abs(rand(4, 1, 1, seed=s)) + 0.5).astype(np.float32) for s in (3, 4))
    conv2 = helper.make_node("Conv", ["x", "w2"], ["c2"], pads=[1] * 4)
    model = conv_then([helper.make_node("Mul", ["c", "k1"], ["m1"]), conv2, helper.make_node("Mul", ["c2", "k2"], ["m2"]),
                       helper.make_node("Add", ["m1", "m2"], ["y"])], [("k1", k1), ("k2", k2), ("w2", rand(4, 3, 3, 3, seed=5))])
    res = run(model)
    assert res.changes == {"mul_folded_into_conv": 1} and op_count(res.model, "Mul") == 1
    assert next(n for n in res.model.graph.node if n.op_type == "Mul").output == ["m2"]
    (rv,) = res.extra["reverted"]
    assert rv["rule"] == "affine_into_layer" and rv["tensors"] == ["m2"] and rv["max_abs"] > 1e-3
    assert any(s.startswith("reverted 1 rewrite(s) of exact rule affine_into_layer") for s in res.skipped)
    assert res.extra["exact_verification"]["rules"]["affine_into_layer"]["passed"]
    assert_equivalent(model, res.model, rtol=1e-5, atol=1e-5)
