"""``bnfuse`` -- fold BatchNormalization and per-channel constant Mul/Add/Sub/Div into the
neighbouring linear layer (exact, up to float rounding).

The folds are rules of the rewrite engine (:mod:`onnxopt.rewrite.batchnorm`, arithmetic in
:mod:`onnxopt.rewrite.fold`), chosen like lite's with ``bnfuse.rules`` / ``bnfuse.disable``. Each
rule that fired is verified on the region it rewrote (random values at the region's inputs); one
beyond the exact-pass tolerance is reverted and the pass rerun without it (see :func:`_without`).
A region that cannot be cut out is covered by the pass manager's check of the whole pass.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import onnx

from onnxopt.ir.graph import drop_detached, export_graph, import_graph
from onnxopt.ir.proto import infer_shapes
from onnxopt.model_io import opset_of
from onnxopt.registry import PassContext, PassOptions, PassResult, option, register_pass
from onnxopt.rewrite import bnfuse_rules
from onnxopt.rewrite.fold import FoldContext
from onnxopt.rewrite.runner import (RegionChecker, apply_rule, failing_rewrites, judge, new_record, revert_note, rule_help,
                                    select_rules, undo_rewrites, within_tolerance)

# run together until neither fires: a chain folds whole whatever the order of its nodes
_TOGETHER = ("bn_into_layer", "affine_into_layer")


@dataclass
class BnfuseOptions(PassOptions):
    """The bnfuse pass's options."""

    rules: Optional[list] = option(None, "apply only these rules (comma-separated); default: all. "
                                   f"Rules: {rule_help(bnfuse_rules())}")
    disable: Optional[list] = option(None, "rules to switch off (comma-separated names)")
    standalone: str = option("muladd", "What a BatchNormalization that cannot be folded becomes: muladd (Mul+Add), conv "
                             "(depthwise 1x1 Conv, 4-D inputs) or keep.", ("muladd", "conv", "keep"))

    def validate(self, model, ctx) -> None:
        select_rules(bnfuse_rules(), self.rules, self.disable, "bnfuse")  # unknown rule names


@register_pass("bnfuse", "Fold BatchNormalization and constant per-channel Mul/Add into Conv/ConvTranspose/Gemm/MatMul.",
               exact=True, options=BnfuseOptions)
def bnfuse(model: onnx.ModelProto, options: BnfuseOptions, ctx: PassContext) -> PassResult:
    """Exact BatchNormalization / per-channel affine folding into the neighbouring linear layer."""
    options.validate(model, ctx)
    return _fold(model, options, ctx, {})


def _fold(model: onnx.ModelProto, options: BnfuseOptions, ctx: PassContext, undo: dict) -> PassResult:
    """The pass, leaving alone the rewrites in ``undo`` (rule -> matched tensors)."""
    opset = opset_of(model)
    table = bnfuse_rules()
    active = [r for r in select_rules(table, options.rules, options.disable, "bnfuse") if r.applies_to(opset)]
    skipped: list = []
    graph = import_graph(model)
    fctx = FoldContext(graph, model, opset, options, frozenset(r.name for r in active),
                       lambda where, reason: skipped.append(f"{where}: {reason}"))
    fctx.reverted = undo
    run = _Run(fctx, {r.name: new_record(r, r in active) for r in table},
               RegionChecker(infer_shapes(model)[0], model))
    together = [r for r in active if r.name in _TOGETHER]
    while True:  # the near-misses of the last round (nothing fired) are the ones reported
        last: list = []
        if not sum(run.apply(r, last) for r in together):
            break
    skipped.extend(last)
    for r in active:
        if r.name not in _TOGETHER:
            run.apply(r, skipped)
    failed = {name: res for name, res in run.verified.items() if not within_tolerance(res)}
    if failed:
        return _without(model, options, ctx, failed, run.failing, undo)
    drop_detached(graph)
    out = export_graph(graph, like=model)
    extra = {"rules": run.records}
    if run.verified:
        extra["exact_verification"] = {"rules": {name: judge(name, res, run.records, "bnfuse") for name, res in run.verified.items()}}
    changes = Counter(d["change"] for d in run.details)
    return PassResult(out, changes=dict(changes), details=[d["note"] for d in run.details], skipped=skipped, extra=extra)


def _without(model: onnx.ModelProto, options: BnfuseOptions, ctx: PassContext, failed: dict, failing: dict,
             undo: dict) -> PassResult:
    """The pass rerun without what failed its region check: the rewrites that fail alone when
    only some of a rule's do, else the whole rule switched off (as the manager reverts a rule
    whose rewrites change the output), saying which and by how much."""
    undo = {rule: set(tensors) for rule, tensors in undo.items()}
    off, notes, reverted = [], [], []
    for name, res in failed.items():
        some = failing.get(name)
        entry = {"rule": name, "max_abs": res["max_abs"], "max_rel": res["max_rel"]}
        if undo_rewrites(undo, name, some):
            entry["tensors"] = sorted(some)
        else:
            off.append(name)
            some = {}
        notes.append(revert_note(name, some, res))
        reverted.append(entry)
    result = _fold(model, dataclasses.replace(options, disable=list(options.disable or []) + off), ctx, undo)
    result.skipped.extend(notes)
    result.extra["reverted"] = reverted + result.extra.get("reverted", [])
    return result


class _Run:
    """One bnfuse run: the rule records, the rewrites in order and each rule's region check
    (the worst over its applications)."""

    def __init__(self, ctx: FoldContext, records: dict, checker: RegionChecker):
        self.ctx, self.records, self.checker = ctx, records, checker
        self.details: list = []
        self.verified: dict = {}
        # rule -> the rewrites that failed their check alone ({tensor: result}); None: the rule as a whole
        self.failing: dict = {}

    def apply(self, rule, skipped: list) -> int:
        """Apply ``rule`` once over the graph and check its region; returns how many rewrites it made."""
        record = self.records[rule.name]
        count, first = record["count"], len(record["preserved"])
        self.ctx.added = []
        rewrites = apply_rule(rule, self.ctx, record, skipped, self.details, {}, "bnfuse")
        added, self.ctx.added = self.ctx.added, None
        fired = record["count"] - count
        if fired:
            res = self.checker.check(self.ctx.graph, self.ctx, added, record["preserved"][first:])
            if isinstance(res, str):
                record["region_check"] = res   # the manager verifies the whole pass
            else:
                if not within_tolerance(res):
                    self._find_failing(rule.name, rewrites)
                old = self.verified.get(rule.name)
                if old is None or res["max_abs"] > old["max_abs"]:
                    self.verified[rule.name] = res
        return fired

    def _find_failing(self, rule: str, rewrites: list) -> None:
        failing = failing_rewrites(self.checker, self.ctx.graph, self.ctx, rewrites)
        if failing and self.failing.get(rule, {}) is not None:
            self.failing.setdefault(rule, {}).update(failing)
        else:
            self.failing[rule] = None
