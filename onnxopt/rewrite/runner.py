"""Running a rule table on a graph, for every pass built on the rewrite engine (``lite``, ``bnfuse``).

An exact rule is verified on its own region, not the whole model: the tensors it preserved are
compared between the original region (cut out of the input model) and the new nodes, on random
values at the region's inputs. When a rule fails, each of its rewrites is checked alone, so that
the passes undo only the rewrites that fail (the rule context's ``reverted``) and keep the others.
"""
from __future__ import annotations

import heapq
import time
from collections import namedtuple
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto
from onnx.utils import Extractor

from .. import runtime
from ..errors import OptionError, VerificationError
from ..ir.graph import export_graph
from ..model_io import opset_of
from .engine import Match, Rule, RuleContext

# Tolerance for the exact rules (same as the manager's for exact passes).
EXACT_RTOL = 1e-4
EXACT_ATOL = 1e-5

# One rewrite of a rule: the tensor it matched on (its name is kept), the nodes it added and the
# tensors it preserves -- the region its own check covers.
Rewrite = namedtuple("Rewrite", "tensor added preserved")


def select_rules(table: list, only: Optional[list], disable: Optional[list], pass_name: str) -> list:
    """The rules of ``table`` a run applies: ``only`` (else the default-on ones) less ``disable``."""
    names = [r.name for r in table]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OptionError(f"the {pass_name} rule table names {', '.join(dup)} twice.", "give every rule a unique name")
    for opt, given in (("rules", only), ("disable", disable)):
        bad = [n for n in (given or []) if n not in names]
        if bad:
            raise OptionError(f"unknown {pass_name} rule '{bad[0]}' in {pass_name}.{opt}.", f"valid rules: {', '.join(names)}")
    wanted = (set(only) if only else {r.name for r in table if r.default}) - set(disable or [])
    return [r for r in table if r.name in wanted]


def rule_help(table: list) -> str:
    """The rule list an option's help shows: ``~`` approximate, ``(off)`` off by default."""
    return ", ".join(f"{r.name}{'' if r.default else '(off)'}{'' if r.exact else '~'}" for r in table)


def new_record(rule: Rule, active: bool) -> dict:
    """The report entry of one rule (``extra["rules"][name]``)."""
    return {"exact": rule.exact, "enabled": active, "default": rule.default, "summary": rule.summary,
            "count": 0, "tensors": [], "preserved": []}


def apply_rule(rule: Rule, ctx: RuleContext, record: dict, skipped: list, details: list, clips: dict,
               pass_name: str = "lite") -> list:
    """One scan of the graph with ``rule``: every match is rewritten at once; a near-match's reason
    goes to ``skipped``, each rewrite to ``details`` and ``record``. A match on a tensor in
    ``ctx.reverted[rule.name]`` is left as it is (that rewrite failed its check in an earlier run).
    Returns the rewrites (with the nodes each added while ``ctx.added`` is a list)."""
    graph = ctx.graph
    anchors = set(rule.anchors)
    undo = ctx.reverted.get(rule.name, ())
    rewrites = []
    for node in list(graph.nodes):
        if id(node) in ctx.dead or (anchors and node.op not in anchors):
            continue
        try:
            result = rule.match(graph, node, ctx)
        except Exception as exc:  # name the rule and the node: the traceback alone rarely does
            raise RuntimeError(f"{pass_name} rule '{rule.name}' failed matching node '{node.name}' ({node.op}): {exc}") from exc
        if result is None:
            continue
        if isinstance(result, str):
            skipped.append(f"{node.name or node.op} ({node.outputs[0].name if node.outputs else '?'}): {rule.name}: {result}")
            continue
        if not isinstance(result, Match):
            raise TypeError(f"{pass_name} rule {rule.name}: match returned {type(result).__name__}, expected Match, str or None")
        out_name = result.output.name
        if out_name in undo:
            continue
        before = result.output.inputs[0].op if result.output.inputs else None
        added = ctx.added if ctx.added is not None else []
        first = len(added)
        try:
            rule.rewrite(graph, result, ctx)
        except Exception as exc:
            raise RuntimeError(f"{pass_name} rule '{rule.name}' failed rewriting '{out_name}': {exc}") from exc
        record["count"] += 1
        record["tensors"].append(out_name)
        if "clip" in result.data:
            clips[out_name] = tuple(result.data["clip"])
        preserved = list(result.preserved or [out_name])
        record["preserved"].extend(preserved)
        rewrites.append(Rewrite(out_name, added[first:], preserved))
        entry = {"rule": rule.name, "exact": rule.exact, "tensor": out_name, "was": before,
                 "now": result.output.inputs[0].op if result.output.inputs else None}
        if result.change:
            entry["change"] = result.change
        if result.note:
            entry["note"] = result.note
        details.append(entry)
    ctx.compact()
    return rewrites


def stable_toposort(graph) -> bool:
    """Kahn's algorithm keeping the existing order where it can (linear; gs's toposort computes
    hierarchy levels recursively and dominates on 10k-node graphs). False when it does not apply
    (subgraphs with outer-scope reads, or a cycle): then gs sorts."""
    nodes = graph.nodes
    if any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(x, gs.Graph) for x in v))
           for n in nodes for v in n.attrs.values()):
        return False
    index = {id(n): i for i, n in enumerate(nodes)}
    pending = [0] * len(nodes)
    readers: dict = {}
    for i, n in enumerate(nodes):
        producers = {id(t.inputs[0]) for t in n.inputs if t.inputs and id(t.inputs[0]) in index}
        pending[i] = len(producers)
        for p in producers:
            readers.setdefault(p, []).append(i)
    ready = [i for i, c in enumerate(pending) if c == 0]  # ascending: already a heap
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers.get(id(nodes[i]), ()):
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        return False
    graph.nodes = order
    return True


def export(graph, like: ModelProto) -> ModelProto:
    """The rewritten graph as a model like ``like``, sorted keeping the existing order where it can."""
    # export_graph's cleanup only removes nodes, so the order sorted here stays topological.
    model = export_graph(graph, like, sort=not stable_toposort(graph))  # IR < 4: initializers listed as inputs
    # Keep only the value_info the input model had (shape inference ran on a copy for matching).
    keep = {vi.name: vi for vi in like.graph.value_info}
    present = {t for n in model.graph.node for t in n.output}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for name, v in keep.items() if name in present)
    return model


def session(model: ModelProto):
    """A verification session: optimizations off, one intra-op thread (ORT's spinning worker
    threads cost more than they give on a loaded machine, and the two sessions run side by side)."""
    return runtime.session(model, threads=1)


def worst_error(pairs: list, tensors: list) -> tuple:
    """(max abs, max rel) :func:`onnxopt.runtime.tensor_error` of ``tensors`` over (reference, new) output dicts."""
    mx, rel = 0.0, 0.0
    for r, g in pairs:
        for t in tensors:
            a, b = runtime.tensor_error(r[t], g[t])
            mx, rel = max(mx, a), max(rel, b)
    return mx, rel


class RegionChecker:
    """Verifies an exact rule on the region it rewrote (random inputs: an exact rewrite is exact for any
    input); a region that cannot be cut out is left to the caller to verify on the whole model."""

    def __init__(self, shaped: ModelProto, model: ModelProto):
        self.shaped, self.model = shaped, model
        self.seconds = 0.0
        self._extractor = None
        self.vi = {v.name: v for v in list(shaped.graph.value_info) + list(shaped.graph.input) + list(shaped.graph.output)}

    def check(self, graph, ctx: RuleContext, added: list, preserved: list):
        t0 = time.perf_counter()
        try:
            return self._check(graph, ctx, added, preserved)
        finally:
            self.seconds += time.perf_counter() - t0

    def _check(self, graph, ctx: RuleContext, added: list, preserved: list):
        nodes = {id(n): n for n in added if id(n) not in ctx.dead}
        by_name = {t.name: t for n in nodes.values() for t in n.outputs}
        outs = []
        for name in dict.fromkeys(preserved):
            t = by_name.get(name)
            if t is None:  # preserved by a node the rule edited in place (e.g. permuted weights)
                t = graph.tensors().get(name)
                if t is None or not t.inputs:
                    return f"preserved tensor '{name}' not found"
                nodes[id(t.inputs[0])] = t.inputs[0]
            outs.append(t)
        produced = {id(t) for n in nodes.values() for t in n.outputs}
        inputs = []
        for n in list(nodes.values()):   # a Constant node producing an input joins the region (no inputs of its own)
            for t in n.inputs:
                if id(t) in produced or isinstance(t, gs.Constant) or (t.name == "" and not t.inputs) or any(t is i for i in inputs):
                    continue
                if t.inputs and t.inputs[0].op == "Constant":
                    nodes[id(t.inputs[0])] = t.inputs[0]
                    continue
                inputs.append(t)
        specs = []
        for t in inputs:
            vi = self.vi.get(t.name)
            shape = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim] if vi else None
            if vi is None or shape is None or any(d is None for d in shape):
                return f"region input '{t.name}' is new or has no static shape"
            specs.append((t.name, shape, runtime.np_dtype(vi.type.tensor_type.elem_type)))
        try:
            if self._extractor is None:
                self._extractor = Extractor(self.shaped)
            before = self._extractor.extract_model([s[0] for s in specs], [t.name for t in outs])
            sub = gs.Graph(nodes=list(nodes.values()), inputs=inputs, outputs=outs, opset=opset_of(self.model))
            after = gs.export_onnx(sub, do_type_check=False)
            for m in (before, after):
                m.ir_version = self.model.ir_version
                del m.opset_import[:]
                m.opset_import.extend(self.model.opset_import)
            s_before, s_after = session(before), session(after)
            rng = np.random.default_rng(0)
            pairs = []
            for _ in range(2):
                feed = {n: (rng.standard_normal(sh) * 4).astype(dt) if dt.kind == "f" else rng.integers(0, 4, sh).astype(dt)
                        for n, sh, dt in specs}
                pairs.append((runtime.run(s_before, feed), runtime.run(s_after, feed)))
            mx, rel = worst_error(pairs, [t.name for t in outs])
        except Exception as exc:  # a region that cannot be cut out or run alone: verify on the whole model
            return f"region not extractable ({type(exc).__name__})"
        return {"max_abs": mx, "max_rel": rel, "tensors": len(outs), "inputs": "generated at the region inputs",
                "region_nodes": {"before": len(before.graph.node), "after": len(after.graph.node)}}


def failing_rewrites(checker: RegionChecker, graph, ctx: RuleContext, rewrites: list) -> dict:
    """A rule that failed its region check: each of its rewrites checked alone. Returns the
    tensor -> check result of those that fail, or {} when none fails alone or all do (then the
    rule as a whole is at fault)."""
    failed = {}
    for r in rewrites:
        res = checker.check(graph, ctx, r.added, r.preserved)
        if isinstance(res, str):   # one rewrite that cannot be checked alone: no way to tell them apart
            return {}
        if not within_tolerance(res):
            failed[r.tensor] = res
    return failed if len(failed) < len(rewrites) else {}


def undo_rewrites(undo: dict, rule: str, failing: Optional[dict]) -> bool:
    """Add the ``failing`` rewrites of ``rule`` to ``undo`` (rule -> tensors left alone in the
    rerun); False when there are none new to undo, so the caller switches the rule off instead."""
    if not failing or set(failing) <= undo.get(rule, set()):
        return False
    undo.setdefault(rule, set()).update(failing)
    return True


def within_tolerance(res: dict) -> bool:
    """An exact rule's check passes: the exact-pass tolerance, absolute or relative."""
    return bool(res["max_abs"] <= EXACT_ATOL or res["max_rel"] <= EXACT_RTOL)


def judge(name: str, res: dict, records: dict, pass_name: str = "lite") -> dict:
    """Record an exact rule's check; raise when it failed (with the failing rewrites, when the
    rule's check found which: ``res["failing"]``, from :func:`failing_rewrites`)."""
    res["passed"] = within_tolerance(res)
    records[name]["max_abs_error"] = res["max_abs"]
    if not res["passed"]:
        exc = VerificationError(
            f"{pass_name} rule '{name}' is exact but changed its tensors by max abs {res['max_abs']:.3g} (rel {res['max_rel']:.3g}).",
            f"this is a bug in the rule on this model; rerun with --set {pass_name}.disable={name} and report it")
        exc.rule = name  # the pass reverts these rewrites (or the rule) and reruns without them
        exc.failing = res.get("failing") or {}
        raise exc
    return res


def revert_note(rule: str, failing: dict, res: Optional[dict] = None) -> str:
    """The line a pass adds to ``skipped`` for what it reverted of ``rule``: the rewrites that
    failed alone (``failing``), else the whole rule (its check ``res``)."""
    if not failing:
        return (f"reverted rule {rule}: on its region the output changed by max abs {res['max_abs']:.3g} "
                f"(rel {res['max_rel']:.3g}), beyond tolerance")
    where = ", ".join(f"{t} (max abs {r['max_abs']:.3g})" for t, r in failing.items())
    return f"reverted {len(failing)} rewrite(s) of exact rule {rule} beyond tolerance, at {where}; its other rewrites are kept"
