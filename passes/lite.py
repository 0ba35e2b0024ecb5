"""``lite``: embedded-friendly model surgery on the ONNX graph (TI's ``convert_to_lite_fx``, on ONNX).

A lite model trades a little float accuracy for speed and quantization-friendliness on TIDL and
TensorRT. The rules, what each preserves and their math are in :mod:`onnxopt.rewrite` (one module
per rule family); the table follows TI's v2 defaults where they apply.

The pass is *approximate* (``exact=False``: the manager does not verify it), so it verifies its
**exact** rules itself, which run first: each on the region it rewrote, or on the whole model when
a region cannot be cut out (dynamic shapes, new tensors). The **approximate** rules follow; the
output error against the input model is reported, and finetuning recommended. Matching is linear
in the graph size: one scan per rule, each match a bounded walk.

User rules (TI's ``replacement_dict``)::

    from onnxopt.passes.lite import register_rule, Match

    def match(graph, node, ctx):          # -> Match | "reason it does not apply" | None
        if node.op != "Softplus":
            return None
        return Match(node.outputs[0], {"x": node.inputs[0]})

    def rewrite(graph, m, ctx):
        ctx.replace_output(m.output, "Relu", [m.data["x"]])

    register_rule("softplus_to_relu", match=match, rewrite=rewrite, exact=False, anchors=("Softplus",))

Put that in ``my_rules.py`` and run ``onnxopt apply lite m.onnx -o out.onnx --rules-module my_rules.py``
(or ``--set lite.rules_module=my_rules.py``). A module may instead define ``RULES`` (a list of
:class:`Rule`) or ``rule_table(default_rules)`` returning the full table to use.
"""
from __future__ import annotations

import contextvars
import dataclasses
import gc
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from onnx import ModelProto

from onnxopt import output_change, runtime
from onnxopt.errors import OnnxoptError, OptionError, VerificationError
from onnxopt.ir.graph import import_graph
from onnxopt.ir.proto import infer_shapes
from onnxopt.rewrite import Match, Rule, RuleContext, default_rules  # noqa: F401 (public API)
from onnxopt.rewrite.runner import (RegionChecker, apply_rule, export, failing_rewrites, judge, new_record, revert_note, rule_help,
                                    select_rules, session, undo_rewrites, within_tolerance, worst_error)
from onnxopt.model_io import opset_of, record_activation_bounds
from onnxopt.registry import PassContext, PassOptions, PassResult, option, register_pass
from onnxopt.userfiles import import_user_file

__all__ = ["Match", "Rule", "RuleContext", "register_rule", "rule_table", "default_rules", "load_rules_module", "run_lite", "options_with"]

_USER_RULES: list = []
_COLLECTING: contextvars.ContextVar = contextvars.ContextVar("lite_rules_collecting", default=None)


def register_rule(name: str, *, match, rewrite, exact: bool, default: bool = True, anchors: Sequence[str] = (),
                  summary: str = "", before: Optional[str] = None) -> Rule:
    """Register a user rule; it joins the table used by every later ``lite`` run in this process
    (or only the run that loads it, when called from a ``rules_module`` file).

    ``anchors`` are the op types ``match`` is called on (empty: every node). ``before`` places
    the rule in front of a named rule of the table (default: at the end of its phase).
    """
    rule = Rule(name, summary or (match.__doc__ or name).strip().splitlines()[0], bool(exact), bool(default),
                tuple(anchors), match, rewrite)
    target = _COLLECTING.get()
    target = _USER_RULES if target is None else target
    target[:] = [r for r in target if r[0].name != name]
    target.append((rule, before))
    return rule


def _merge(table: list, extra: list) -> list:
    table = list(table)
    for rule, before in extra:
        table = [r for r in table if r.name != rule.name]
        idx = next((i for i, r in enumerate(table) if r.name == before), len(table)) if before else len(table)
        table.insert(idx, rule)
    return table


def load_rules_module(path: str) -> list:
    """Import a user rules file and return the rule table it yields (see the module docstring)."""
    collected: list = []
    token = _COLLECTING.set(collected)
    try:
        module = import_user_file(path, "rules module", OptionError,
                                  "give the path of a Python file that calls onnxopt.passes.lite.register_rule(...)")
    finally:
        _COLLECTING.reset(token)
    base = _merge(default_rules(), _USER_RULES)
    if hasattr(module, "rule_table"):
        table = list(module.rule_table(base))
    elif hasattr(module, "RULES"):
        table = list(module.RULES)
    else:
        table = base
    if not all(isinstance(r, Rule) for r in table):
        raise OptionError(f"rules module '{path}': the rule table must hold onnxopt.passes.lite.Rule objects.",
                          "build rules with register_rule(...) or Rule(name, summary, exact, default, anchors, match, rewrite)")
    if not collected and table is base:
        raise OptionError(f"rules module '{path}' registers no rule and defines no RULES / rule_table.",
                          "call onnxopt.passes.lite.register_rule(...) in it")
    return _merge(table, collected)


def rule_table(rules_module: Optional[str] = None) -> list:
    """The rule table: the defaults plus registered user rules, or what ``rules_module`` yields."""
    return load_rules_module(rules_module) if rules_module else _merge(default_rules(), _USER_RULES)


# ------------------------------------------------------------------------------ running


def _feeds(model: ModelProto, pctx: PassContext, n: int) -> tuple:
    if pctx.data is not None:
        feeds = list(itertools.islice(pctx.data(), n))
        if feeds:
            return feeds, "data"
    plan = pctx.feed_plan(model)  # built from the model: valid indices, sizes that run
    return [plan.feed(0, s) for s in range(n)], "generated"


def run_lite(model: ModelProto, options: Optional[LiteOptions] = None, pctx: Optional[PassContext] = None, table: Optional[list] = None,
             reverted: Optional[dict] = None) -> PassResult:
    """The lite pass on ``model`` with a given rule ``table`` (default: :func:`rule_table`),
    leaving alone the rewrites in ``reverted`` (rule -> matched tensors; see ``RuleContext.reverted``)."""
    # onnx-graphsurgeon allocates several objects per node and tensor, all in reference cycles:
    # with the cyclic GC on, its full collections make a 20k-node run superlinear. The garbage
    # of the pass is collected when the GC is switched back on.
    enabled = gc.isenabled()
    gc.disable()
    reference = None
    try:
        pctx = pctx or PassContext()
        options = LiteOptions.build("lite", options)
        t0 = time.perf_counter()
        table = table if table is not None else rule_table(options.rules_module)
        active = select_rules(table, options.rules, options.disable, "lite")
        # The input model's reference outputs are computed in a background thread while the rules
        # run: onnxruntime releases the GIL, and its session setup dominates on large graphs.
        reference = _Reference(model, pctx, options.batches) if options.verify else None
        return _apply_rules(model, options, table, active, reference, t0, reverted or {})
    finally:
        if reference is not None:
            # the thread must not outlive the pass: a process that exits while it is still in
            # onnxruntime's session setup aborts ("terminate called", exit code 134)
            reference.close()
        if enabled:
            gc.enable()


def _apply_rules(model: ModelProto, options: LiteOptions, table: list, active: list, reference: Optional["_Reference"],
                 t0: float, reverted: dict) -> PassResult:
    opset = opset_of(model)
    active = [r for r in active if r.applies_to(opset)]  # a rule declares the opsets it knows
    shaped, _ = infer_shapes(model)  # shapes only sharpen the guards; rules that need them say so
    graph = import_graph(shaped)
    ctx = RuleContext(graph, opset, options, frozenset(r.name for r in active))
    ctx.reverted = reverted
    records = {r.name: new_record(r, r in active) for r in table}
    skipped, details = [], []
    clips: dict = {}   # tensor -> the clip bounds a rule dropped there (model_io.ACTIVATION_BOUNDS_KEY)

    exact_rules = [r for r in active if r.exact]
    approx_rules = [r for r in active if not r.exact]
    checker = RegionChecker(shaped, model) if options.verify else None
    local, pending = {}, []
    for rule in exact_rules:
        ctx.added = []
        rewrites = apply_rule(rule, ctx, records[rule.name], skipped, details, clips)
        added, ctx.added = ctx.added, None
        if checker is not None and records[rule.name]["count"]:
            res = checker.check(graph, ctx, added, records[rule.name]["preserved"])
            if isinstance(res, str):
                pending.append(rule.name)  # verified on the whole model below
                records[rule.name]["region_check"] = res
            else:
                if not within_tolerance(res):
                    res["failing"] = failing_rewrites(checker, graph, ctx, rewrites)
                local[rule.name] = res
    exact_fired = [r.name for r in exact_rules if records[r.name]["count"]]
    # The whole model after the exact rules is only needed when a rule could not be verified on
    # its region; the approximate rules continue on the same graph (export only cleans and sorts).
    model_exact = export(graph, model) if pending else None
    for rule in approx_rules:
        apply_rule(rule, ctx, records[rule.name], skipped, details, clips)
    approx_fired = [r.name for r in approx_rules if records[r.name]["count"]]
    if approx_fired or exact_fired:
        final = model_exact if model_exact is not None and not approx_fired else export(graph, model)
    else:
        final = model
    seconds_rules = time.perf_counter() - t0
    produced = {o for n in final.graph.node for o in n.output} if clips else set()
    clips = {t: b for t, b in clips.items() if t in produced}   # a later rule may have removed the tensor
    if clips:
        record_activation_bounds(final, clips)

    extra = {"rules": records, "rule_seconds": round(seconds_rules, 3), "clip_bounds_recorded": len(clips)}
    extra["region_check_seconds"] = round(checker.seconds, 3) if checker is not None else 0.0
    if options.verify and (exact_fired or approx_fired):
        t1 = time.perf_counter()
        extra.update(_measure(model, model_exact, final, pending, local, reference, records, skipped))
        extra["measure_seconds"] = round(time.perf_counter() - t1, 3)
    if approx_fired:
        extra["recommendation"] = (f"approximate rules changed the model ({', '.join(approx_fired)}): finetune the lite "
                                   "model (a few epochs at a low learning rate) to recover its accuracy before deployment")
    changes = {name: rec["count"] for name, rec in records.items() if rec["count"]}
    return PassResult(final, changes=changes, details=details, skipped=skipped, extra=extra)


class _Reference:
    """Feeds (user data or generated) and the input model's outputs on them, computed in a thread."""

    def __init__(self, model: ModelProto, pctx: PassContext, batches: int):
        self.require_verify = pctx.require_verify
        self.error: Optional[OnnxoptError] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        try:
            self.feeds, self.source = _feeds(model, pctx, max(1, batches))
        except OnnxoptError as exc:
            self.error, self.feeds, self.source = exc, [], None
            return
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._refs = self._pool.submit(self._run, model)

    def _run(self, model: ModelProto) -> list:
        sess = session(model)
        return [runtime.run(sess, f) for f in self.feeds]

    def outputs(self) -> list:
        """The input model's outputs (an error of the thread is raised here)."""
        self.close()
        return self._refs.result()

    def close(self) -> None:
        """Wait for the thread."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _measure(model, model_exact, final, pending, local, reference: _Reference, records, skipped) -> dict:
    """Exact-rule verification and the lite model's output error against the input model."""
    out = {}
    ver = {name: judge(name, res, records) for name, res in local.items()}
    if ver:
        out["exact_verification"] = {"rules": ver}
    if reference.error is not None:
        exc = reference.error
        skipped.append(f"verification: not run on the whole model: {exc.message} ({exc.hint})")
        out["verification_skipped"] = exc.message
        if pending and reference.require_verify:
            raise VerificationError(f"lite rules {', '.join(pending)} could not be verified: {exc.message}", exc.hint) from None
        if pending:  # verification never blocks the main job: the rules stay, marked unverified
            ver.update({name: {"verified": False, "reason": exc.message} for name in pending})
            out["exact_verification"] = {"rules": ver}
        return out
    feeds, source = reference.feeds, reference.source
    if pending:
        exact_tensors = [t for name in pending for t in records[name]["preserved"]]
        s_ref = session(runtime.with_outputs(model, exact_tensors))
        s_ex = session(runtime.with_outputs(model_exact, exact_tensors))
        for name in pending:
            pairs = [(runtime.run(s_ref, f, exact_tensors), runtime.run(s_ex, f, exact_tensors)) for f in feeds]
            mx, rel = worst_error(pairs, records[name]["preserved"])
            ver[name] = judge(name, {"max_abs": mx, "max_rel": rel, "tensors": len(records[name]["preserved"]),
                                      "inputs": f"{source} (whole model)"}, records)
        out["exact_verification"] = {"rules": ver}
    fin_sess = session(final)
    got = [runtime.run(fin_sess, f) for f in feeds]
    pairs = list(zip(reference.outputs(), got))
    per = {o.name: dict(zip(("max_abs", "max_rel"), worst_error(pairs, [o.name]))) for o in model.graph.output}
    out["output_error"] = {"inputs": source, "batches": len(feeds),
                           "max_abs": max((v["max_abs"] for v in per.values()), default=0.0),
                           "max_rel": max((v["max_rel"] for v in per.values()), default=0.0), "outputs": per}
    return out


_RULE_HELP = rule_help(default_rules())

@dataclass
class LiteOptions(PassOptions):
    """The lite pass's options."""

    rules: Optional[list] = option(None, "apply only these rules (comma-separated); default: the default-on ones. "
                                   f"Rules (~ approximate, (off) off by default): {_RULE_HELP}")
    disable: Optional[list] = option(None, "rules to switch off (comma-separated names)")
    rules_module: Optional[str] = option(None, "a Python file registering user rules with onnxopt.passes.lite.register_rule "
                                         "(or defining RULES)", flag="--rules-module", path=True)
    focus_mode: str = option("conv", "what the Focus stem becomes: a one-hot 2x2/s2 Conv, or SpaceToDepth (TIDL-friendly "
                             "when the next conv's weights can absorb the channel order)", ("conv", "space_to_depth"))
    verify: bool = option(True, "verify exact rules and measure the lite model's output error in onnxruntime")
    batches: int = option(2, "how many data batches (or generated inputs) the verification uses")
    max_error: float = option(0.0, "skip an approximate rule whose own output change (relative L2 error of the outputs, measured "
                              "on the data in hand against the input model) exceeds this, e.g. 0.1; 0 = no budget")

    def validate(self, model, ctx) -> None:
        if self.max_error < 0:
            raise OptionError(f"lite.max_error must be 0 (no budget) or more, got {self.max_error}.", "e.g. --set lite.max_error=0.1")
        select_rules(rule_table(self.rules_module), self.rules, self.disable, "lite")  # unknown rules, a bad rules module


def options_with(**given) -> LiteOptions:
    """The lite options with defaults, ``given`` converted and validated as the CLI would."""
    return LiteOptions.build("lite", given)


@register_pass("lite", "Embedded-friendly surgery: activations->ReLU, SE->identity, pool cascades, Focus->Conv, kernel/Resize fixes.", exact=False, options=LiteOptions)
def lite_pass(model: ModelProto, options: LiteOptions, ctx: PassContext) -> PassResult:
    """The lite pass (rules: ``LiteOptions.rules``' help, :mod:`onnxopt.rewrite`); see the module docstring."""
    options.validate(model, ctx)
    result, options, undo = _run_reverting(model, options, ctx)
    if options.max_error > 0:
        result = _within_budget(model, options, ctx, result, undo)
    fired = [name for name, rec in result.extra.get("rules", {}).items() if not rec["exact"] and rec["count"]]
    if fired:
        # what the pass manager's warning names when the output changed too much
        result.extra["damage_sources"] = fired
        result.extra["ways_out"] = (
            "finetune the lite model against the original (onnxopt finetune OUT --teacher MODEL --data DATA), or keep the "
            f"original activations: --set lite.disable={','.join(fired)}, or let lite skip the rules beyond a budget: "
            "--set lite.max_error=0.1")
    return result


def _run_reverting(model: ModelProto, options: LiteOptions, ctx: PassContext) -> tuple:
    """(result, options, reverted rewrites) of :func:`run_lite`, rerun without the rewrites of an exact rule
    that fail their verification (without the rule when none fails alone), said on the console and in
    ``skipped``, as the manager reverts an exact pass's rules; with ``require_verify`` it stays an error."""
    reverted, undo = [], {}
    while True:
        try:
            result = run_lite(model, options, ctx, reverted=undo)
            break
        except VerificationError as exc:
            rule = getattr(exc, "rule", None)
            if rule is None or ctx.require_verify:
                raise
            failing = getattr(exc, "failing", {})
            if undo_rewrites(undo, rule, failing):  # only some rewrites fail: undo those
                reverted.append(revert_note(rule, failing) + " (please report the model)")
            else:
                reverted.append(f"reverted exact rule {rule}: {exc.message} (please report the model)")
                options = dataclasses.replace(options, disable=list(options.disable or []) + [rule])
            ctx.log(f"  lite: {reverted[-1]}")
    result.skipped.extend(reverted)
    if undo:
        result.extra["reverted_rewrites"] = {rule: sorted(tensors) for rule, tensors in undo.items()}
    return result, options, undo


def _within_budget(model: ModelProto, options: LiteOptions, ctx: PassContext, result: PassResult, undo: dict) -> PassResult:
    """lite.max_error: each approximate rule that fired is measured alone (with the exact rules, against
    the input model, on the data in hand); the pass reruns without the rules over the budget."""
    fired = [name for name, rec in result.extra["rules"].items() if not rec["exact"] and rec["count"]]
    if not fired:
        return result
    feeds, source = output_change.feeds(ctx, model)
    measured = {}
    for rule in fired:
        alone = dataclasses.replace(options, disable=list(options.disable or []) + [r for r in fired if r != rule], verify=False)
        measured[rule] = output_change.measure(model, run_lite(model, alone, ctx, reverted=undo).model, feeds, source)
    over = {r: c for r, c in measured.items() if c.get("rel_error") is not None and c["rel_error"] > options.max_error}
    if over:
        result = run_lite(model, dataclasses.replace(options, disable=list(options.disable or []) + list(over)), ctx, reverted=undo)
        for rule, change in over.items():
            result.skipped.append(f"{rule}: not applied, its {output_change.describe(change)} exceeds lite.max_error={options.max_error:g}")
    result.extra["max_error"] = {"budget": options.max_error, "skipped_rules": list(over),
                                 "per_rule": {r: {k: c.get(k) for k in ("cosine", "rel_error", "top1_agreement", "samples", "inputs")}
                                              for r, c in measured.items()}}
    return result
