"""The pass manager: apply a chain of passes, validating after each, verifying the exact ones.

After every pass the model must pass ``onnx.checker`` and shape inference. An exact pass is run
against the model before it in onnxruntime (optimizations off) on the user's data, else on inputs
generated from the model (:mod:`onnxopt.feeds`). A difference beyond tolerance first reverts the
rule(s) that caused it, keeping the rest; when no part of the pass verifies, the pass is undone
(``require_verify``: a :class:`VerificationError`). When no input can be generated the pass is kept
unverified and the report says why (``require_verify`` makes that an error).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import yaml
from onnx import ModelProto

from . import model_io, opsets, output_change, runtime, stats
from .errors import InternalError, OnnxoptError, OptionError, VerificationError
from .registry import PassContext, PassInfo, PassResult, get_pass
from .version import __version__

# An exact pass may reorder float arithmetic (e.g. folding a BN scale into a weight): the
# outputs must agree to this relative error (max |diff| / max |ref|) or this absolute error.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5


@dataclass
class PassRecord:
    name: str
    exact: bool
    options: dict
    seconds: float
    before: dict
    after: dict
    changes: dict
    details: list
    skipped: list
    extra: dict
    verification: Optional[dict] = None
    output_change: Optional[dict] = None   # approximate passes: onnxopt.output_change.measure against the model before
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"pass": fields.pop("name"), **fields, "seconds": round(self.seconds, 4)}


@dataclass
class Report:
    """What a chain of passes did, pass by pass; ``to_json()`` is what ``--report`` writes."""

    source: Optional[str]
    passes: list = field(default_factory=list)
    total_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"onnxopt_version": __version__, "source": self.source, "total_seconds": round(self.total_seconds, 4),
                "passes": [p.to_dict() for p in self.passes]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def write(self, path: Union[str, os.PathLike]) -> None:
        """Write the report atomically (temp file + rename)."""
        model_io.write_text_atomic(path, self.to_json())


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def parse_pass_list(passes: Union[str, Sequence[str]]) -> list:
    names = [p.strip() for p in (passes.split(",") if isinstance(passes, str) else passes) if p and p.strip()]
    if not names:
        raise OptionError("no pass given.", "name passes comma-separated, e.g. cleanup,bnfuse; `onnxopt passes` lists them")
    for name in names:
        get_pass(name)  # raises with the list of valid passes
    return names


def parse_set_options(items: Sequence[str]) -> dict:
    """``["bnfuse.standalone=conv", ...]`` -> ``{"bnfuse": {"standalone": "conv"}}`` (values stay strings)."""
    options: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise OptionError(f"bad --set '{item}'.", "write it as PASS.OPTION=VALUE, e.g. --set bnfuse.standalone=conv")
        key, value = item.split("=", 1)
        pass_name, opt = key.split(".", 1)
        options.setdefault(pass_name.strip(), {})[opt.strip()] = value.strip()
    return options


def load_recipe(path: Union[str, os.PathLike]) -> tuple:
    """(pass names, options) of a YAML/JSON recipe ``{"passes": [name | {name: {options}}, ...],
    "options": {pass: {opt: value}}}``."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"recipe '{p}' does not exist.", "give the path of a YAML or JSON recipe")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except Exception as exc:
        raise OptionError(f"recipe '{p}' cannot be parsed: {str(exc).splitlines()[0]}", "check its YAML/JSON syntax") from None
    if not isinstance(data, dict) or "passes" not in data:
        raise OptionError(f"recipe '{p}' has no 'passes' list.", 'write e.g. {"passes": ["cleanup", "bnfuse"], "options": {"bnfuse": {"standalone": "conv"}}}')
    entries = data["passes"]
    if isinstance(entries, str):  # "cleanup,bnfuse" is accepted like the command line's PASSES
        entries = [e.strip() for e in entries.split(",") if e.strip()]
    if not isinstance(entries, list):
        raise OptionError(f"recipe '{p}': 'passes' must be a list, not {type(entries).__name__}.", 'write e.g. passes: [cleanup, bnfuse]')
    names, options = [], {}
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            names.append(name)
            options.setdefault(name, {}).update(_recipe_options(p, name, opts))
        else:
            raise OptionError(f"recipe '{p}': bad pass entry {entry!r}.", "each entry is a pass name or {name: {options}}")
    extra = data.get("options") or {}
    if not isinstance(extra, dict):
        raise OptionError(f"recipe '{p}': 'options' must be a mapping of pass -> {{option: value}}.", 'write e.g. options: {bnfuse: {standalone: conv}}')
    for name, opts in extra.items():
        options.setdefault(name, {}).update(_recipe_options(p, name, opts))
    return names, options


def _recipe_options(path: Path, name: str, opts) -> dict:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise OptionError(f"recipe '{path}': the options of pass '{name}' must be a mapping, not {opts!r}.",
                          f"write e.g. {name}: {{option: value}}; `onnxopt passes` lists the options")
    return opts


def resolve_options(names: Sequence[str], options: Optional[dict]) -> dict:
    """Each pass's typed ``Options`` from ``{pass: {option: value}}``."""
    options = dict(options or {})
    for pass_name in options:
        if pass_name not in names:
            get_pass(pass_name)  # unknown pass name -> error
            raise OptionError(f"options given for pass '{pass_name}', which is not in the chain {','.join(names)}.",
                              f"add {pass_name} to the passes or drop its options")
    return {name: get_pass(name).resolve(options.get(name)) for name in names}


def verify_exact(before: ModelProto, after: ModelProto, ctx: PassContext, *, rtol: float = VERIFY_RTOL, atol: float = VERIFY_ATOL) -> dict:
    """Run both models on the same inputs; return the error (``passed``: within tolerance), or
    ``{"verified": False, "reason": ...}`` when no input can be built or onnxruntime cannot load
    ``before``: the caller decides whether that blocks."""
    try:
        feeds, source = ctx.verification_feeds(before)
        s_ref = runtime.session(before)
    except OnnxoptError as exc:  # no feed can be built (feeds.NoFeedError), or a custom op onnxruntime cannot run
        return {"verified": False, "passed": None, "reason": exc.message, "hint": exc.hint}
    try:
        s_new = runtime.session(after)
    except OnnxoptError as exc:  # the input loads but the output does not: the pass broke it
        raise InternalError(f"onnxruntime cannot load the pass's output model: {exc.message}") from exc
    worst = {"verified": True, "max_abs": 0.0, "max_rel": 0.0, "worst_output": None}
    floor = 0.0
    for feed in feeds:
        try:
            got = runtime.run(s_new, feed)
        except OnnxoptError as exc:  # the input model ran on this feed, the output does not
            worst.update({"max_abs": float("inf"), "max_rel": float("inf"), "worst_output": None,
                          "reason": f"the new model fails on an input the original runs: {exc.message}"})
            continue
        err = runtime.output_error(runtime.run(s_ref, feed), got)
        floor = max(floor, err.pop("rtol_floor", 0.0))
        # the worst relative error over all feeds is kept, even when a later feed has the
        # larger absolute error (update() alone would overwrite it)
        max_rel = max(worst["max_rel"], err["max_rel"])
        if err["max_abs"] >= worst["max_abs"]:
            worst.update(err)
        worst["max_rel"] = max_rel
    # a float16 output cannot be held to a relative tolerance below a few of its own ulps
    rtol = max(rtol, floor)
    worst["passed"] = bool(worst["max_abs"] <= atol or worst["max_rel"] <= rtol)
    worst["inputs"] = source
    if source == "generated":
        worst["sizes"] = [{n: list(s) for n, s in sizes.items()} for sizes in ctx.feed_plan(before).sizes]
    worst["rtol"], worst["atol"] = rtol, atol
    return worst


def _run_pass(info: PassInfo, current: ModelProto, options, ctx: PassContext) -> tuple:
    """(result, new model) of one pass on a copy of ``current``, unknown ops hidden, the output validated."""
    work = model_io.load_model(current, check=False)
    hidden = opsets.hide_unknown(work)  # ops the passes do not know at this opset are left alone
    blocker = unrepresentable(work)
    if blocker:  # the graph editor would drop or fail on it: the pass leaves the model as it is
        result = PassResult(current, skipped=[f"model left unchanged: {blocker}"])
        hidden = []
    else:
        result = info.run(work, options, ctx)
    new_model = result.model
    if hidden:
        opsets.restore_hidden(new_model)
        result.skipped.append(f"left alone: {', '.join(sorted(set(hidden)))} (semantics at opset "
                              f"{model_io.opset_of(current)} not reviewed by onnxopt)")
    inherited = _validate_pass_output(info.name, new_model, current)
    if inherited:
        result.skipped.append(inherited)
    return result, new_model


def _rule_switches(options, extra: dict) -> list:
    """The pass's rules that can be switched off: its on/off options that are on, and for a rule-table
    pass (bnfuse) the rules that fired, which its ``disable`` option switches off."""
    if not dataclasses.is_dataclass(options):
        return []
    switches = [f.name for f in dataclasses.fields(options) if getattr(options, f.name) is True]
    if hasattr(options, "disable"):
        switches += [name for name, rec in (extra.get("rules") or {}).items() if rec.get("count")]
    return switches


def _switched_off(options, off: tuple):
    """``options`` with the rules ``off`` switched off (an on/off option, or a name added to ``disable``)."""
    flags = {f.name for f in dataclasses.fields(options)}
    changes: dict = {r: False for r in off if r in flags}
    rules = [r for r in off if r not in flags]
    if rules:
        changes["disable"] = list(options.disable or []) + rules
    return dataclasses.replace(options, **changes)


def _revert_failing_rules(info: PassInfo, current: ModelProto, options, ctx: PassContext, failed: dict, extra: dict):
    """Rerun an exact pass without the rule(s) whose rewrites changed the output: first each rule alone
    switched off, then the largest set that verifies. (result, model, verification, options dict), or None."""
    rules = _rule_switches(options, extra)
    if not rules:
        return None
    tried: dict = {}

    def attempt(off: tuple):
        if off not in tried:
            opts = _switched_off(options, off)
            result, model = _run_pass(info, current, opts, ctx)
            ver = verify_exact(current, model, ctx) if result.modified else None
            tried[off] = (result, model, ver, opts) if ver is not None and ver.get("passed") else None
        return tried[off]

    off = next(((rule,) for rule in rules if attempt((rule,))), None)  # one rule at fault: the common case
    if off is None:  # several: keep the rules that verify alone, then all of those together
        good = [r for r in rules if attempt(tuple(x for x in rules if x != r))]
        off = tuple(r for r in rules if r not in good) if good else None
    found = attempt(off) if off is not None else None
    if not found:
        return None
    result, model, ver, opts = found
    ver["reverted"] = [{"rule": r, "max_abs": failed["max_abs"], "max_rel": failed["max_rel"],
                        "worst_output": failed.get("worst_output")} for r in off]
    result.skipped.append(f"reverted rule(s) {', '.join(off)}: with them the output changed by max abs "
                          f"{failed['max_abs']:.3g} (rel {failed['max_rel']:.3g}), beyond tolerance")
    return result, model, ver, opts.to_dict()


def _summary(model: ModelProto, layers: bool) -> dict:
    return stats.summarize(model) if layers else {"ops": stats.op_histogram(model)}


def _check_exact(info: PassInfo, current: ModelProto, new_model: ModelProto, result: PassResult, record: PassRecord,
                 options, ctx: PassContext, summarize_layers: bool) -> ModelProto:
    """Verify an exact pass, reverting the rule(s) or the pass that changed the output; return the model
    the chain goes on with (``record`` describes what was kept)."""
    name = info.name
    record.verification = verify_exact(current, new_model, ctx)
    if record.verification["verified"] is False:  # an error with --require-verify, else one line
        reason = record.verification["reason"]
        if ctx.require_verify:
            raise OnnxoptError(f"the exact pass '{name}' cannot be verified: {reason}",
                               "skip the check with --no-verify (verify=False in the API), give --data or "
                               "--input-shape, or drop --require-verify to write it unverified")
        ctx.log(f"  {name}: not verified ({reason})")
    elif not record.verification["passed"]:
        kept = _revert_failing_rules(info, current, options, ctx, record.verification, result.extra)
        if kept is not None:  # the rules that broke the output are undone, the rest is kept
            result, new_model, record.verification, record.options = kept
            record.changes, record.details, record.skipped, record.extra = (
                result.changes, result.details, result.skipped, result.extra)
            record.after = _summary(new_model, summarize_layers)
            rv = record.verification["reverted"]
            ctx.log(f"  {name}: reverted {', '.join(r['rule'] for r in rv)} (output changed by max abs "
                    f"{rv[0]['max_abs']:.3g}, rel {rv[0]['max_rel']:.3g}); the rest of the pass is kept and verified")
    if record.verification.get("verified") and not record.verification["passed"]:
        return _revert_pass(record, current, ctx)
    return new_model


def _revert_pass(record: PassRecord, current: ModelProto, ctx: PassContext) -> ModelProto:
    """Undo an exact pass no part of which verifies: the chain goes on with the model before it, the
    record keeps the failed verification (``reverted_pass``); with ``require_verify`` an error."""
    v = record.verification
    what = (f"pass '{record.name}' changed the model's output '{v['worst_output']}' beyond tolerance: "
            f"max abs error {v['max_abs']:.3g}, max rel error {v['max_rel']:.3g} (tolerance rel {v['rtol']:g} / abs {v['atol']:g})")
    if ctx.require_verify:
        raise VerificationError(f"{what}.", "this is a bug in the pass on this model; rerun with --save-steps DIR and "
                                "report it, skip the pass, or drop --require-verify to have the pass reverted")
    ctx.log(f"  {record.name}: reverted, the model is kept as it was before the pass ({what}; please report the model)")
    v["reverted_pass"] = True
    record.skipped.append(f"pass reverted: {what}")
    record.changes, record.details, record.after = {}, [], record.before
    return current


def _measure_change(current: ModelProto, new_model: ModelProto, result: PassResult, record: PassRecord, ctx: PassContext,
                    change_feeds):
    """How much an approximate pass changed the output, with a warning when it damaged it; returns
    the feeds (or the error that none can be built), reused for every approximate pass of the chain."""
    if change_feeds is None:
        try:
            change_feeds = output_change.feeds(ctx, current)
        except OnnxoptError as exc:  # no input onnxruntime runs: the change goes unmeasured, the pass stands
            change_feeds = exc
    record.output_change = ({"skipped": change_feeds.message} if isinstance(change_feeds, OnnxoptError)
                            else output_change.measure(current, new_model, *change_feeds))
    if output_change.is_damaging(record.output_change):
        record.warnings.append(_damage_warning(record.name, record, result.extra))
    return change_feeds


def _record_history(model: ModelProto, name: str, options: dict) -> None:
    """Append the pass to the model's ``onnxopt.passes`` metadata and stamp the version."""
    history = next((json.loads(p.value) for p in model.metadata_props if p.key == "onnxopt.passes"), [])
    history.append({"pass": name, "options": options})
    model_io.record_metadata(model, "onnxopt.passes", history)
    model_io.record_metadata(model, "onnxopt.version", __version__)


def apply(
    model: Union[str, os.PathLike, ModelProto],
    passes: Union[str, Sequence[str]],
    options: Optional[dict] = None,
    *,
    verify: bool = True,
    context: Optional[PassContext] = None,
    save_steps: Optional[Union[str, os.PathLike]] = None,
    summarize_layers: bool = True,
) -> tuple:
    """Apply ``passes`` (comma-separated string or list) to ``model`` in order; returns ``(model, report)``.
    ``options``: ``{pass: {option: value}}``, values typed or strings (as from the CLI); ``context``:
    the data and settings passes may use (calibration data for ``qdq``). The input is never modified."""
    names = parse_pass_list(passes)
    resolved = resolve_options(names, options)
    source = str(model) if not isinstance(model, ModelProto) else None
    current = model_io.load_model(model)
    ctx = context or PassContext()
    for name in names:  # every option and input of the chain is checked before the first pass runs
        resolved[name].validate(current, ctx)
    report = Report(source=source)
    t_chain = time.perf_counter()
    before_stats = _summary(current, summarize_layers)
    change_feeds = None
    for step, name in enumerate(names):
        info: PassInfo = get_pass(name)
        ctx.log(f"[{step + 1}/{len(names)}] {name} ...")
        t0 = time.perf_counter()
        result, new_model = _run_pass(info, current, resolved[name], ctx)
        record = PassRecord(
            name=name, exact=info.exact, options=resolved[name].to_dict(), seconds=time.perf_counter() - t0,
            before=before_stats, after=_summary(new_model, summarize_layers),
            changes=result.changes, details=result.details, skipped=result.skipped, extra=result.extra,
        )
        if verify and info.exact and result.modified:
            new_model = _check_exact(info, current, new_model, result, record, resolved[name], ctx, summarize_layers)
        elif verify and not info.exact and result.modified:
            change_feeds = _measure_change(current, new_model, result, record, ctx, change_feeds)
        report.passes.append(record)
        _record_history(new_model, name, record.options)
        if save_steps:
            model_io.save_model(new_model, Path(save_steps) / f"{step + 1:02d}_{name}.onnx", inputs=[model] if source else [])
        current = new_model
        before_stats = record.after
    report.total_seconds = time.perf_counter() - t_chain
    return current, report


def unrepresentable(model: ModelProto) -> Optional[str]:
    """Why onnx-graphsurgeon (every pass's graph editor) cannot round-trip ``model``, or None: it
    exports only tensor (and sequence) values and drops TYPE_PROTO attributes (``Optional``'s ``type``)."""
    def walk(graph: onnx.GraphProto) -> Optional[str]:
        for vi in list(graph.input) + list(graph.output):
            if not vi.type.HasField("tensor_type") and not (
                    vi.type.HasField("sequence_type") and vi.type.sequence_type.elem_type.HasField("tensor_type")):
                return f"'{vi.name}' is an optional/map/nested value, which onnxopt's graph editor cannot write back"
        for node in graph.node:
            for a in node.attribute:
                if a.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
                    return f"{node.op_type} node '{node.name or node.output[0]}' has a type attribute, which onnxopt's graph editor drops"
            for g in model_io.subgraphs(node):
                why = walk(g)
                if why:
                    return why
        return None

    return walk(model.graph)


def _damage_warning(name: str, record: PassRecord, extra: dict) -> str:
    """The console warning of an approximate pass that damaged the output: what changed, what caused
    it (``extra["damage_sources"]``) and the ways out (``extra["ways_out"]``, else finetuning)."""
    sources = extra.get("damage_sources") or []
    cause = f" (rules {', '.join(sources)})" if sources else ""
    ways = extra.get("ways_out") or "finetune the model against the original (onnxopt finetune OUT --teacher MODEL --data DATA)"
    return f"{name}{cause} changed the model's output: {output_change.describe(record.output_change, prefix='')}. Ways out: {ways}"


def _validate_pass_output(name: str, model: ModelProto, before: Optional[ModelProto] = None) -> Optional[str]:
    """Every pass must leave a valid model: full checker and shape inference. When the model before
    the pass fails inference the same way (onnx's own function bodies do for some ops), the pass
    is not blamed: the returned note says so."""
    try:
        model_io.check_model(model, full=True)
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).splitlines()[0]
        if before is not None:
            try:
                model_io.check_model(before, full=True)
            except onnx.shape_inference.InferenceError as exc_before:
                if str(exc_before).splitlines()[0] == first:
                    return f"the input already fails onnx's shape inference the same way ({first[:200]})"
            except onnx.checker.ValidationError:
                pass
        raise InternalError(f"pass '{name}' produced a model that fails shape inference: {first}") from exc
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"pass '{name}' produced an invalid model: {str(exc).splitlines()[0]}",
                            f"{InternalError.REPORT}; rerun with --save-steps to see the previous step") from exc
    return None
