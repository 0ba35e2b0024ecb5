"""``prune`` -- structured channel pruning as a graph rewrite (approximate).

Channels are removed physically: the analysis in :mod:`.channels` (beside this pass) finds the groups
of channels that must go together, and the rewrite slices the weights, biases and parameters they
reach and rewrites the sizes that count them. What the analysis does not understand is never pruned.

Importance of output channel ``c`` of a layer with filters ``W[c]`` (BN-folded,
``W[c] * gamma[c] / sqrt(var[c] + eps)``, when a BatchNormalization follows): ``l1`` ``sum |W[c]|``,
``l2`` ``||W[c]||_2``, ``bn_gamma`` ``|gamma[c]|`` (network slimming), ``fpgm``
``sum_j ||W[c] - W[j]||_2`` (filters close to the others, the geometric median, are the most
replaceable) or ``file`` (option ``scores``); a layer without a BN, or that the file does not name,
falls back to l1. Each layer's scores are divided by their mean (scale-free); a group's score is
the sum of its layers' (divided by their number when ranking globally, so that a residual stream
fed by nine layers is not favoured over a single conv).

What is removed: ``ratio`` (default 0.3) counts MACs by default (``ratio_of=macs``): the pruned
model keeps about ``1 - ratio`` of the MACs, as a user reads "ratio 0.3"; ``target_macs=0.7`` says
the same as a fraction to keep. The MACs target is solved over the channel groups
(:func:`_solve_macs`) and lands at or under it. ``ratio_of=channels``: ``mode=uniform`` removes
``ratio`` of the channels of every group class (the channels that appear in the same tensors --
e.g. one conv's output, or one residual stream); ``mode=global`` removes ``ratio`` of all
channels, lowest scores first.

Residual streams (the channel groups that meet in an Add of two computed tensors) are kept unless
``residual=true``: a stream is read by every block of its stage, so pruning it costs far more
accuracy than a short finetuning recovers (tools/sweep_recovery.py).

Every mode respects ``max_layer_ratio``, ``min_channels`` and ``round_to`` per class. ``round_to``
defaults to 8: onnxruntime's CPU convs, TensorRT's tensor cores and TIDL block channels by 8 or
more, and odd widths fall back to slower kernels (docs/benchmarks.md); ``round_narrow`` keeps that
rounding from halving a narrow stage (:func:`_granule`).

Removing an input channel also removes its average contribution to the consumer, which
``compensate`` (:func:`_compensate`) puts back: by the removed channels' means or by a
least-squares refit of the consumer on the data; without data it compensates nothing by default,
as the means of generated inputs mislead (docs/benchmarks.md).

Not exact: the outputs change. The pass says on the console what it removes and reports
parameters, MACs and onnxruntime CPU latency before and after (per layer and in total) and the
output error, on the context's data or on generated inputs. Recovery is ``finetune``'s job.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxopt import runtime, stats, task_metric
from onnxopt.compare import measure_latency
from onnxopt.data import collect_feeds, feed_samples
from onnxopt.errors import OptionError
from onnxopt.ir.graph import NameGenerator, constant_value, input_at, set_input
from onnxopt.ir.proto import const_tensors
from onnxopt.progress import progress_bar
from onnxopt.registry import PassContext, PassOptions, PassResult, compile_patterns, option, register_pass

from . import channels
from .channels import POISON


@dataclass
class PruneOptions(PassOptions):
    """The prune pass's options."""

    ratio: float = option(0.3, "fraction to remove: of the MACs (ratio_of=macs: the pruned model is about that much cheaper) "
                          "or of the channels of every prunable group (ratio_of=channels)")
    ratio_of: str = option("macs", "what ratio counts: macs (solved over the channel groups, as target_macs=1-ratio) or "
                           "channels (per group class in uniform mode, overall in global mode)", ("macs", "channels"))
    target_macs: Optional[float] = option(None, "keep this fraction of the MACs (e.g. 0.7), solved over the channel groups; "
                                          "overrides ratio")
    mode: str = option("uniform", "uniform: the same ratio in every channel group class; global: lowest scores overall", ("uniform", "global"))
    residual: bool = option(False, "also prune residual streams (the channels shared through residual Adds); off: they are "
                            "kept, as in the pruning literature's ResNet recipes, and only the layers inside blocks shrink")
    importance: str = option("l1", "channel importance: l1/l2 of BN-folded filters, bn_gamma, fpgm, or file (see scores)", ("l1", "l2", "bn_gamma", "fpgm", "file"))
    scores: Optional[str] = option(None, "JSON file {layer output, node or weight name: [score per output channel]} (implies "
                                   "importance=file)")
    max_layer_ratio: float = option(0.8, "never remove more than this fraction of one class's channels")
    min_channels: int = option(1, "keep at least this many channels in every class")
    round_to: int = option(8, "kept channel counts are multiples of this (the nearest to the ratio); 8 suits TensorRT, "
                           "onnxruntime CPU and TIDL kernels; 1 = exact ratios")
    round_narrow: bool = option(True, "a group class narrower than 4 x round_to rounds to the largest power of two that is at "
                                "most a quarter of its width instead (16 channels: multiples of 4), so rounding never halves a narrow stage")
    protect: list = option([], "layers whose output channels are kept: node, output or weight names or regexes (full match)")
    keep_first_last: bool = option(True, "keep channel groups made only of the first layer's outputs or read only by the last"
                                   " layer(s)")
    compensate: str = option("auto", "consumers of removed channels: fold each removed channel's mean into the bias (mean), "
                             "refit the kept weights and bias by least squares to the original output (refit; dense "
                             "Conv, else mean) or nothing (none); auto = refit when data is given, none without (means "
                             "of generated inputs mislead)", ("auto", "mean", "refit", "none"))
    refit_ridge: float = option(0.001, "compensate=refit: ridge term, relative to the mean diagonal of the input Gram matrix")
    refit_samples: int = option(128, "compensate=refit: data samples the least squares are fit on (a conv whose patches are "
                                "fewer than 4x its kept weights per output falls back to the mean fold)")
    latency_runs: int = option(20, "onnxruntime CPU runs for the latency before/after (median; 0 = skip)")
    eval_batches: int = option(4, "batches of the data used to measure the output error after pruning")

    def validate(self, model, ctx) -> None:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise OptionError(f"prune.ratio must be in [0, 1), got {self.ratio}.", "e.g. --set prune.ratio=0.3 removes 30% of the MACs")
        if self.target_macs is not None and not 0.0 < float(self.target_macs) <= 1.0:
            raise OptionError(f"prune.target_macs must be in (0, 1], got {self.target_macs}.", "e.g. --set prune.target_macs=0.7 keeps 70% of the MACs")
        if not 0.0 <= self.max_layer_ratio <= 1.0:
            raise OptionError(f"prune.max_layer_ratio must be in [0, 1], got {self.max_layer_ratio}.", "e.g. 0.8")
        if self.round_to < 1 or self.min_channels < 0:
            raise OptionError("prune.round_to must be >= 1 and prune.min_channels >= 0.", "e.g. --set prune.round_to=8")
        if self.importance == "file" and not self.scores:
            raise OptionError("prune.importance=file needs prune.scores=FILE.json.", "give a JSON file {layer name: [scores]}")
        compile_patterns(self.protect, "prune.protect")


@register_pass("prune", "Structured channel pruning: removes the least important channel groups, shrinking the layers.", exact=False, options=PruneOptions)
def prune(model: ModelProto, options: PruneOptions, ctx: PassContext) -> PassResult:
    """Structured channel pruning; see the module docstring."""
    options.validate(model, ctx)
    ratio = float(options.ratio)
    target = options.target_macs
    if target is None and options.ratio_of == "macs":
        target = 1.0 - ratio
    importance = "file" if options.scores else options.importance
    patterns = compile_patterns(options.protect, "prune.protect")
    compensate = options.compensate
    if compensate == "auto":
        # means of generated inputs folded into the biases cost more than no compensation (tools/sweep_recovery.py)
        compensate = "refit" if ctx.data is not None else "none"

    t0 = time.perf_counter()
    an = channels.analyze(model)
    t_analysis = time.perf_counter() - t0
    scores, fallback = _component_scores(an, importance, options.scores)
    protected = _protected(an, patterns, options.keep_first_last)
    residual = set() if options.residual else _residual_roots(an) - protected
    protected |= residual
    removed, class_rows, solved = (_solve_macs(an, model, scores, protected, float(target), options)
                                   if target is not None else _select(an, scores, protected, ratio, options))
    feeds, source = ctx.sample_feeds(model, options.eval_batches)
    refs: list = []
    fit_feeds = None
    if compensate == "refit" and removed:  # about refit_samples samples of the data, whatever its batch size
        fit_feeds = (collect_feeds(ctx.data, options.refit_samples) if ctx.data is not None
                     else ctx.sample_feeds(model, max(1, min(options.refit_samples, 16)))[0])
    compensated = _compensate(an, model, removed, feeds, refs, compensate, options.refit_ridge, fit_feeds, ctx.progress) \
        if compensate != "none" and removed else 0
    if not refs and removed:
        _reference_run(model, feeds, [], refs)
    new_model = an.rewrite(removed)
    t_total = time.perf_counter() - t0

    extra = _report(model, new_model, an, removed, ctx, options, feeds, source, refs)
    extra.update({"compensated_layers": compensated, "compensation_inputs": source if compensated else None,
                  "importance": importance, "mode": options.mode, "round_to": options.round_to, "classes": class_rows,
                  "compensate": compensate, "residual_channels_kept": len(residual),
                  "analysis_seconds": round(t_analysis, 3), "prune_seconds": round(t_total, 3)})
    if solved is not None:
        solved["kept"] = round(1.0 - extra["macs"]["reduction"], 4)
        extra["target_macs"] = solved
    if fallback:
        extra["importance_fallback_l1"] = fallback
    skipped = [f"{where}: {why} (its channels are not pruned)" for where, why in dict.fromkeys(an.reasons)]
    if not removed:
        skipped.append(_why_nothing_removed(class_rows, ratio, options, target))
    elif solved is not None and not solved["reached"]:
        skipped.append(f"target_macs {solved['asked']:.3g}: the prunable groups allow only {solved['kept']:.3f} of the MACs "
                       "(protected layers, residual streams, max_layer_ratio)")
    pruned_layers = [row for row in extra["layers"] if row["channels_after"] < row["channels_before"]]
    changes = {"channels_removed": sum(r["channels_before"] - r["channels_after"] for r in pruned_layers),
               "layers_pruned": len(pruned_layers)}
    details = [f"{r['layer']}: {r['channels_before']} -> {r['channels_after']} channels" for r in pruned_layers]
    if removed:
        ctx.log(_cost_statement(extra, options, ratio, solved, len(residual)))
    extra["ways_out"] = ("finetune the pruned model against the original (onnxopt finetune OUT --teacher MODEL --data DATA), "
                         "or prune less: a lower prune.ratio, prune.protect for the sensitive layers, prune.compensate=refit")
    return PassResult(new_model, changes=changes, details=details, skipped=skipped, extra=extra)


def _cost_statement(extra: dict, options: PruneOptions, ratio: float, solved: dict | None, residual: int) -> str:
    """What this pruning costs and what the options meant, said on the console while the pass runs: the
    absolute figures and the choices (the manager's summary gives the changes in percent)."""
    m, p = extra["macs"], extra["params"]
    if solved is not None:
        asked = (f"prune.target_macs={solved['asked']:.3g} keeps {1 - m['reduction']:.1%} of the MACs" if options.target_macs is not None
                 else f"prune.ratio={ratio:g} counts MACs (ratio_of=macs): keeps {1 - m['reduction']:.1%} of them")
    else:
        asked = (f"prune.ratio={ratio:g} counts channels (ratio_of=channels): {ratio:.0%} of every prunable group's channels, "
                 f"{m['reduction']:.1%} of the MACs")
    kept = ("residual streams pruned too (prune.residual=true)" if options.residual
            else "residual streams kept (prune.residual=true prunes them)" if residual else "")
    comp = {"refit": "least-squares refit of the consumers on the data", "mean": "removed channels' means folded into the biases",
            "none": "nothing compensated" + (" (no data: give --calib-data for a least-squares refit)"
                                             if options.compensate == "auto" else "")}[extra["compensate"]]
    return (f"prune: {asked} ({m['before'] / 1e6:.1f}M -> {m['after'] / 1e6:.1f}M MACs, {p['before'] / 1e3:.0f}k -> "
            f"{p['after'] / 1e3:.0f}k params){'; ' + kept if kept else ''}; {comp}")


# ------------------------------------------------------------------------------ importance
def _layer_scores(p: channels.LayerAction, importance: str, user: dict | None, fallback: list) -> np.ndarray:
    if importance == "file":
        for key in (p.node.outputs[0].name, p.node.name, p.node.inputs[1].name):
            if key and key in user:
                s = np.asarray(user[key], dtype=np.float64).reshape(-1)
                if len(s) != len(p.out_ids):
                    raise OptionError(f"prune.scores gives {len(s)} scores for '{key}', which has {len(p.out_ids)} output channels.",
                                      "give one score per output channel")
                return s
    elif importance == "bn_gamma" and p.bn is not None:
        return p.bn_gamma()
    if importance in ("file", "bn_gamma"):  # the layer has no score of that kind
        fallback.append(p.name)
        importance = "l1"
    rows = p.filters()
    if importance == "l1":
        return np.abs(rows).sum(axis=1)
    sq = (rows ** 2).sum(axis=1)
    if importance == "l2":
        return np.sqrt(sq)
    # fpgm: the sum of the distances to the other filters
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)).sum(axis=1)


def _component_scores(an: channels.Analysis, importance: str, path: str | None) -> tuple:
    user = None
    if importance == "file":
        p = Path(path)
        if not p.is_file():
            raise OptionError(f"prune.scores file '{p}' does not exist.", "give a JSON file {layer name: [scores]}")
        try:
            user = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise OptionError(f"prune.scores file '{p}' is not valid JSON: {exc}", "write {layer name: [score, ...]}") from None
        if not isinstance(user, dict):
            raise OptionError(f"prune.scores file '{p}' must hold a JSON object.", "write {layer name: [score, ...]}")
    fallback: list = []
    scores: dict = {}  # root -> (sum of its layers' normalized scores, number of layers)
    for p in an.producers:
        s = _layer_scores(p, importance, user, fallback)
        mean = float(np.mean(s)) if len(s) else 0.0
        s = s / mean if mean > 0 else np.zeros_like(s)
        for r, v in zip(an.roots(p.out_ids).tolist(), s.tolist()):
            total, count = scores.get(r, (0.0, 0))
            scores[r] = (total + v, count + 1)
    return scores, fallback


# ------------------------------------------------------------------------------ protection
def _protected(an: channels.Analysis, patterns: list, keep_first_last: bool) -> set:
    protected = set()
    for p in an.producers:
        names = [p.node.name, p.node.outputs[0].name, p.node.inputs[1].name]
        if any(pat.fullmatch(n) for pat in patterns for n in names if n):
            protected.update(an.roots(p.out_ids).tolist())
    for name, s in an.slots.items():
        if any(pat.fullmatch(name) for pat in patterns):
            protected.update(an.roots(s.ids).tolist())
    if keep_first_last:
        index = {id(p.node): i for i, p in enumerate(an.producers)}
        # the producers reached from a graph input (resp. reaching a graph output) without passing another one
        first = _producers_reached(index, an.graph.inputs, lambda t: t.outputs, lambda n: n.outputs)
        last = _producers_reached(index, an.graph.outputs, lambda t: t.inputs,
                                  lambda n: [x for x in n.inputs if x is not None])
        # kept: the groups made only by first layers, and those read only by last layers
        for ends, ids_of in ((first, lambda a: a.out_ids), (last, lambda a: a.in_ids)):
            inside, outside = set(), set()
            for i, a in enumerate(an.producers):
                if ids_of(a) is not None:
                    (inside if i in ends else outside).update(an.roots(ids_of(a)).tolist())
            protected |= inside - outside
    protected.discard(POISON)
    return protected


def _producers_reached(index: dict, start, nodes_of, tensors_of) -> set:
    """Indices (``index``: id(node) -> producer index) of the producers met first when walking
    from the tensors ``start`` (``nodes_of`` a tensor's next nodes, ``tensors_of`` a node's next
    tensors); the walk stops at each producer."""
    reached, seen, stack = set(), set(), list(start)
    while stack:
        for node in nodes_of(stack.pop()):
            if id(node) in index:
                reached.add(index[id(node)])
            elif id(node) not in seen:
                seen.add(id(node))
                stack.extend(tensors_of(node))
    return reached


def _residual_roots(an: channels.Analysis) -> set:
    """The channel groups of residual streams: those that meet in an Add/Sub/Sum of two or more
    tensors that carry channels (a block's output added to its shortcut)."""
    out = set()
    for node in an.graph.nodes:
        carried = [an.slots[t.name] for t in node.inputs if t is not None and t.name in an.slots]
        if node.op in ("Add", "Sub", "Sum") and len(carried) >= 2:
            out.update(r for sl in carried for r in an.roots(sl.ids).tolist())
    return out - {POISON}


# ------------------------------------------------------------------------------- selection
def _bounds(n: int, prunable: int, options: PruneOptions) -> int:
    """The most channels one class of ``n`` (``prunable`` of them removable) may lose."""
    return max(0, min(int(math.floor(options.max_layer_ratio * n + 1e-9)), n - max(options.min_channels, 1), prunable))


def _granule(n: int, options: PruneOptions) -> int:
    """The multiple a class of ``n`` channels keeps: ``round_to``, or with ``round_narrow`` for a class
    narrower than 4 x round_to the largest power of two <= n / 4 (16 -> 4, 32 -> 8), not to halve it."""
    g = int(options.round_to)
    if options.round_narrow:
        while g > 1 and n < 4 * g:
            g //= 2
    return g


def _rounded(n: int, want: int, cap: int, round_to: int) -> int:
    """Adjust a removal count so that ``n - removed`` is a multiple of ``round_to`` within [0, cap]."""
    if round_to <= 1:
        return min(want, cap)
    kept = n - want
    allowed = [k for k in range(round_to, n + 1, round_to) if n - k <= cap]
    # the kept count nearest to the wanted one; on a tie, the larger
    return n - min(allowed, key=lambda k: (abs(k - kept), -k)) if allowed else 0


def _why_nothing_removed(rows: list, ratio: float, options: PruneOptions, target: float | None = None) -> str:
    """The one-line reason a prune run removed nothing, for the report and the CLI summary."""
    if ratio == 0 and options.target_macs is None:
        return "nothing pruned: prune.ratio is 0"
    if target is not None and target >= 1.0:
        return "nothing pruned: prune.target_macs is 1 (keep all the MACs)"
    if not rows:
        return ("nothing pruned: no Conv/ConvTranspose/Gemm/MatMul layer has output channels that can be removed "
                "(a graph output keeps its channels)")
    if all(r["protected"] == r["channels"] for r in rows):
        return "nothing pruned: every channel group is protected (keep_first_last, protect, residual streams)"
    return (f"nothing pruned: ratio {ratio} with round_to={options.round_to}, min_channels={options.min_channels} "
            f"and max_layer_ratio={options.max_layer_ratio} leaves no channel to remove in any group; raise the ratio "
            "or lower round_to")


def _plan(an: channels.Analysis, scores: dict, protected: set, options: PruneOptions) -> list:
    """[(roots, prunable roots lowest score first, most removable)] per group class."""
    score = lambda r: scores.get(r, (0.0, 0))[0]  # noqa: E731
    plan = []
    for roots in an.classes().values():  # POISON is in no class
        prunable = sorted((r for r in roots if r not in protected), key=lambda r: (score(r), r))
        plan.append((roots, prunable, _bounds(len(roots), len(prunable), options)))
    return plan


def _counts(plan: list, scores: dict, ratio: float, options: PruneOptions, rounding: bool = True) -> list:
    """Channels removed per class at ``ratio`` (of the channels: per class in uniform mode,
    overall in global mode), rounded to each class's granule unless ``rounding`` is off."""
    if options.mode == "uniform":
        counts = [min(int(round(ratio * len(roots))), cap) for roots, _, cap in plan]
    else:
        mean_score = lambda r: scores[r][0] / scores[r][1] if r in scores and scores[r][1] else 0.0  # noqa: E731
        target = int(round(ratio * sum(len(roots) for roots, _, _ in plan)))
        owner = {r: ci for ci, (_, prunable, _) in enumerate(plan) for r in prunable}
        counts, done = [0] * len(plan), 0
        for r in sorted(owner, key=lambda r: (mean_score(r), r)):
            if done >= target:
                break
            ci = owner[r]
            if counts[ci] < plan[ci][2]:
                counts[ci] += 1
                done += 1
    if rounding:
        counts = [_rounded(len(roots), k, cap, _granule(len(roots), options)) for (roots, _, cap), k in zip(plan, counts)]
    return counts


def _class_rows(plan: list, counts: list) -> list:
    return [{"channels": len(roots), "removed": k, "protected": len(roots) - len(prunable)}
            for (roots, prunable, _), k in zip(plan, counts) if len(roots) > 1]


def _select(an: channels.Analysis, scores: dict, protected: set, ratio: float, options: PruneOptions) -> tuple:
    """(removed roots, class rows, None) at ``ratio`` of the channels; as :func:`_solve_macs` without its solution."""
    plan = _plan(an, scores, protected, options)
    counts = _counts(plan, scores, ratio, options)
    removed = {r for (_, prunable, _), k in zip(plan, counts) for r in prunable[:k]}
    return removed, _class_rows(plan, counts), None


def _mac_model(an: channels.Analysis, model: ModelProto, plan: list):
    """A function counts -> the fraction of the model's MACs kept when each class loses its
    ``counts[ci]`` lowest-score channels: every Conv/ConvTranspose/Gemm/MatMul's MACs scale with
    its kept output and input fractions (a depthwise conv's with its kept channels only)."""
    by_out = {r["output"]: r["macs"] or 0 for r in stats.layer_macs(model)}
    total = float(sum(by_out.values())) or 1.0
    layers = []
    for act in an.producers:
        m = float(by_out.get(act.node.outputs[0].name, 0))
        if not m:
            continue
        ins = None if act.in_ids is None or (act.kind == "conv" and act.mode == "depthwise") else an.roots(act.in_ids)
        layers.append((m, an.roots(act.out_ids), ins))
    fixed = total - sum(m for m, _, _ in layers)
    size = len(an.uf.parent)

    def kept(counts: list) -> float:
        dead = np.zeros(size, dtype=bool)
        for (_, prunable, _), k in zip(plan, counts):
            if k:
                dead[prunable[:k]] = True
        macs = fixed
        for m, out, ins in layers:
            f = 1.0 - dead[out].mean()
            if ins is not None and len(ins):
                f *= 1.0 - dead[ins].mean()
            macs += m * f
        return macs / total
    return kept


def _solve_macs(an: channels.Analysis, model: ModelProto, scores: dict, protected: set, target: float, options: PruneOptions) -> tuple:
    """Remove channels until the model keeps at most ``target`` of its MACs, as close to it as the
    rounding allows: a bisection on the mode's channel ratio, without rounding, gives each class's
    ideal count; every class starts at the allowed count just below it, and while the MACs are above
    the target the class furthest below its ideal (in granule steps; ties: the least important next
    channels) takes one more step; then classes above their ideal step back where the target still
    holds. Classes of one width thus share the rounding instead of all jumping together."""
    plan = _plan(an, scores, protected, options)
    kept = _mac_model(an, model, plan)
    score = lambda r: scores.get(r, (0.0, 0))[0]  # noqa: E731
    lo, hi = 0.0, 1.0
    ideal = _counts(plan, scores, hi, options, rounding=False)
    if kept(ideal) <= target:
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            c = _counts(plan, scores, mid, options, rounding=False)
            if kept(c) <= target:
                hi, ideal = mid, c
            else:
                lo = mid
    gran = [_granule(len(roots), options) for roots, _, _ in plan]
    steps = []  # the removal counts each class allows
    for (roots, _, cap), g in zip(plan, gran):
        n = len(roots)
        steps.append(sorted({0} | {n - k for k in range(g, n + 1, g) if n - k <= cap}) if g > 1 else list(range(cap + 1)))
    cur = [max(a for a in allowed if a <= want) for allowed, want in zip(steps, ideal)]

    def next_cost(ci: int, nxt: int) -> float:
        return float(np.mean([score(r) for r in plan[ci][1][cur[ci]:nxt]]))

    frac = kept(cur)
    while frac > target:
        # the next allowed count of every class that can lose more (steps are sorted)
        nxt = {ci: min(a for a in steps[ci] if a > cur[ci]) for ci in range(len(plan)) if steps[ci][-1] > cur[ci]}
        if not nxt:
            break
        ci = min(nxt, key=lambda c: (-(ideal[c] - cur[c]) / gran[c], next_cost(c, nxt[c]), c))
        cur[ci] = nxt[ci]
        frac = kept(cur)
    if frac <= target:   # give back what the last steps overshot
        for ci in sorted(range(len(plan)), key=lambda c: -(cur[c] - ideal[c]) / gran[c]):
            lower = [a for a in steps[ci] if a < cur[ci]]
            if not lower:
                continue
            old, cur[ci] = cur[ci], max(lower)
            f = kept(cur)
            if f <= target:
                frac = f
            else:
                cur[ci] = old
    removed = {r for (_, prunable, _), k in zip(plan, cur) for r in prunable[:k]}
    solved = {"asked": target, "estimate": round(frac, 4), "reached": frac <= target + 1e-9, "mode": options.mode}
    return removed, _class_rows(plan, cur), solved


# ---------------------------------------------------------------------------- compensation
def _reference_run(model: ModelProto, feeds: list, tensors: list, refs: list) -> dict:
    """Run the original model once over ``feeds``: its outputs go to ``refs`` (for the error
    report) and the per-channel (axis 1) means of ``tensors`` are returned."""
    outputs = [o.name for o in model.graph.output]
    sess = runtime.session(runtime.with_outputs(model, tensors) if tensors else model)
    sums: dict = {}
    for feed in feeds:
        out = runtime.run(sess, feed, list(dict.fromkeys(outputs + tensors)))
        refs.append({k: out[k] for k in outputs})
        for name in tensors:
            v = out[name].astype(np.float64)
            sums[name] = sums.get(name, 0.0) + v.mean(axis=tuple(i for i in range(v.ndim) if i != 1))
    return {k: v / max(len(feeds), 1) for k, v in sums.items()}


def _compensate(an: channels.Analysis, model: ModelProto, removed: set, feeds: list, refs: list,
                how: str = "mean", ridge: float = 1e-3, fit_feeds: list | None = None, progress: bool = False) -> int:
    """Fold the mean of each removed input channel into the consumer's bias (``mean``), or refit
    the consumer's kept weights and bias by least squares (``refit``, dense 2-D Conv only).

    A removed channel c contributes ``sum_k W[o, c, k] * x_c`` to output o; its mean over the data keeps
    that expected contribution: ``b'[o] = b[o] + mean(x_c) * sum_k W[o, c, k]`` (exact for a constant
    channel away from zero-padded borders). A depthwise conv loses whole groups, outputs included, and
    MatMul has no bias to take it. ``refit`` (ThiNet; He et al., *Channel Pruning*): the kept channels
    are usually correlated with the removed ones, so ``[W_K, b]^T = (G_KK + r I)^-1 G_K: [W, b]^T``
    beats the mean (``G = P^T P`` over the data, ``P`` the im2col patches plus a column of ones, ``K``
    the columns of the kept channels and the bias, ``r = ridge * mean diag(G_KK)``).
    """
    todo = []
    removed = an.dead_mask(removed)
    for act in an.producers:
        if act.kind not in ("conv", "gemm") or act.in_ids is None or act.mode == "depthwise":
            continue
        dead = ~an.keep_mask(act.in_ids, removed)
        if dead.any():
            todo.append((act, dead))
    if not todo:
        return 0
    tensors = list(dict.fromkeys(act.node.inputs[0].name for act, _ in todo))
    refit = [(act, dead) for act, dead in todo if how == "refit" and _refittable(act)]
    grams = _input_grams(model, fit_feeds or feeds, refit, progress) if refit else {}
    means = _reference_run(model, feeds, tensors, refs)
    names = NameGenerator(an.graph)
    done = 0
    for act, dead in todo:
        node = act.node
        refitted = id(node) in grams and _refit_conv(node, dead, grams[id(node)], ridge, names)
        fold = _fold_mean_conv if act.kind == "conv" else _fold_mean_gemm
        done += int(refitted or fold(node, np.where(dead, means[node.inputs[0].name], 0.0), names))
    return done


def _fold_mean_conv(node: gs.Node, contrib: np.ndarray, names: NameGenerator) -> bool:
    """b' = b + sum_k W[:, c, k] * contrib[c] (contrib: the removed channels' means, 0 elsewhere); True."""
    w = constant_value(node.inputs[1])
    wdt, w = w.dtype, w.astype(np.float64)
    cin_g = w.shape[1]
    g = int(node.attrs.get("group", 1))
    per_in = w.reshape(w.shape[0], cin_g, -1).sum(axis=2)   # [Cout, Cin/g]
    b_g = w.shape[0] // g  # output o of group k reads inputs k*cin_g .. (k+1)*cin_g-1
    delta = np.concatenate([per_in[k * b_g:(k + 1) * b_g] @ contrib[k * cin_g:(k + 1) * cin_g] for k in range(g)])
    b = input_at(node, 2)
    bias = np.zeros(w.shape[0]) if b is None else constant_value(b).astype(np.float64)
    set_input(node, 2, gs.Constant(names("compensated_b"), (bias + delta).astype(wdt)))
    return True


def _fold_mean_gemm(node: gs.Node, contrib: np.ndarray, names: NameGenerator) -> bool:
    """Gemm ``Y = alpha * A op(B) + beta * C``: C' = C + alpha * contrib op(B) / beta; False where
    C cannot take it (transA, a non-constant C, beta 0, a C that would change shape)."""
    if int(node.attrs.get("transA", 0)):
        return False
    w = constant_value(node.inputs[1])
    wdt, w = w.dtype, w.astype(np.float64)
    rows = w.T if int(node.attrs.get("transB", 0)) else w      # [K, N]
    delta = float(node.attrs.get("alpha", 1.0)) * (contrib @ rows)
    beta = float(node.attrs.get("beta", 1.0))
    c = input_at(node, 2)
    if c is None:
        new = delta.astype(wdt)
        node.attrs["beta"] = 1.0
    else:
        cv = constant_value(c)
        if cv is None or beta == 0.0:
            return False
        new = (cv.astype(np.float64) + delta / beta).astype(cv.dtype)
        if new.shape != np.broadcast_shapes(cv.shape, delta.shape) or new.ndim and new.shape[-1] != len(delta):
            return False
    set_input(node, 2, gs.Constant(names("compensated_c"), np.ascontiguousarray(new)))
    return True


def _refittable(act: channels.LayerAction) -> bool:
    node = act.node
    w = node.inputs[1]
    return (act.kind == "conv" and act.mode == "dense" and int(node.attrs.get("group", 1)) == 1
            and str(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID") and w.shape is not None and len(w.shape) == 4)


def _im2col(x: np.ndarray, node) -> np.ndarray:
    """Patches [N*Ho*Wo, C*kh*kw] of the conv ``node``'s NCHW input (column order = the weight's [C, kh, kw])."""
    kh, kw = constant_value(node.inputs[1]).shape[2:]
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    pads = node.attrs.get("pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]                     # [N, C, Ho, Wo, kh, kw]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def _input_grams(model: ModelProto, feeds: list, todo: list, progress: bool = False) -> dict:
    """{id(consumer node): (Gram matrix of its [im2col patches, 1], patch rows) over the feeds
    (original model)}."""
    tensors = list(dict.fromkeys(act.node.inputs[0].name for act, _ in todo))
    sess = runtime.session(runtime.with_outputs(model, tensors))
    grams: dict = {}
    bar = progress_bar(sum(feed_samples(f) for f in feeds), f"prune refit: input statistics of {len(todo)} layers", progress)
    for feed in feeds:
        bar.update(feed_samples(feed))
        out = runtime.run(sess, feed, tensors)
        for act, _ in todo:
            node = act.node
            p = _im2col(out[node.inputs[0].name].astype(np.float64), node)
            p = np.concatenate([p, np.ones((len(p), 1))], axis=1)
            g, rows = grams.get(id(node), (0.0, 0))
            grams[id(node)] = (g + p.T @ p, rows + len(p))
    bar.close()
    return grams


def _refit_conv(node, dead: np.ndarray, gram: tuple, ridge: float, names) -> bool:
    """Replace the consumer's weight and bias by the least-squares refit (see _compensate); the
    removed input channels' weights are zeroed (the rewrite slices them away). False (nothing
    changed) when the data gave too few patches to fit the kept weights of one output."""
    gram, rows = gram
    w = constant_value(node.inputs[1])
    wdt, cout, cin = w.dtype, w.shape[0], w.shape[1]
    b = input_at(node, 2)
    bias = np.zeros(cout) if b is None else constant_value(b).astype(np.float64)
    full = np.concatenate([w.reshape(cout, -1).astype(np.float64), bias[:, None]], axis=1)   # [Cout, K+1]
    per = w[0].size // cin
    keep = np.concatenate([np.repeat(~dead, per), [True]])
    if rows < 4 * int(keep.sum()):
        return False
    g_kk = gram[np.ix_(keep, keep)]
    r = ridge * float(np.mean(np.diag(g_kk)))
    sol = np.linalg.solve(g_kk + r * np.eye(len(g_kk)), gram[keep] @ full.T)         # [|K|, Cout]
    new = np.zeros_like(full)
    new[:, keep] = sol.T
    node.inputs[1] = gs.Constant(names("refit_w"), new[:, :-1].reshape(w.shape).astype(wdt))
    set_input(node, 2, gs.Constant(names("refit_b"), new[:, -1].astype(wdt)))
    return True


# --------------------------------------------------------------------------------- report
def _layer_latency(model: ModelProto, feed: dict, runs: int) -> dict:
    """{node name: median ms} from onnxruntime's profiler (one warm-up run included), graph optimizations
    off so that every layer keeps its own node (fused kernels would merge a Conv with its activation)."""
    times, _ = runtime.profile_kernels(model, feed, runs + 1)
    return {k: statistics.median(v) for k, v in times.items()}


def _report(before: ModelProto, after: ModelProto, an: channels.Analysis, removed: set, ctx: PassContext, options: PruneOptions,
            feeds: list, source: str, refs: list) -> dict:
    # nothing removed: nothing to measure, and no onnxruntime run (the model may use ops it lacks)
    measure = bool(removed)
    lb, la = stats.layer_macs(before), stats.layer_macs(after)
    removed = an.dead_mask(removed)
    macs_a = {r["output"]: r["macs"] for r in la}
    macs_b = {r["output"]: r["macs"] for r in lb}
    wb, wa = _weight_sizes(before), _weight_sizes(after)
    layers = []
    for p in an.producers:
        out = p.node.outputs[0].name
        kept = int(an.keep_mask(p.out_ids, removed).sum())
        layers.append({"layer": p.name, "op": p.op, "output": out, "channels_before": len(p.out_ids), "channels_after": kept,
                       "params_before": wb.get(out), "params_after": wa.get(out),
                       "macs_before": macs_b.get(out), "macs_after": macs_a.get(out)})
    params_b, params_a = stats.param_count(before), stats.param_count(after)
    total_b, total_a = stats.mac_totals(lb)["macs"], stats.mac_totals(la)["macs"]
    err = {"max_abs": 0.0, "max_rel": 0.0, "inputs": source if measure else None}
    extra = {
        "params": {"before": params_b, "after": params_a, "reduction": _red(params_b, params_a)},
        "macs": {"before": total_b, "after": total_a, "reduction": _red(total_b, total_a)},
        "layers": layers,
        "output_error": err,
    }
    if not measure:
        return extra
    s_new = runtime.session(after)
    agree, total = 0, 0
    features = task_metric.features_outputs(before)   # no top-1 on an embedding
    for feed, ref in zip(feeds, refs):
        got = runtime.run(s_new, feed)
        e = runtime.output_error(ref, got)
        err["max_abs"] = max(err["max_abs"], e["max_abs"])
        err["max_rel"] = max(err["max_rel"], e["max_rel"])
        for name, r in ref.items():
            r, g = task_metric.as_scores(r), task_metric.as_scores(got[name])   # [N, C, 1, 1] scores as [N, C]
            if r.ndim == 2 and r.shape[1] > 1 and r.dtype.kind == "f" and name not in features:
                agree += int((r.argmax(1) == g.argmax(1)).sum())
                total += r.shape[0]
    if total:
        err["top1_agreement"] = agree / total
    if options.latency_runs > 0:
        # the first of the feeds the error was measured on: the user's data when given (a model
        # with dynamic height/width has no shape to generate inputs from)
        feed = feeds[0]
        lat_b, lat_a = (measure_latency(m, feed, options.latency_runs, warmup=1, threads=0)["median_ms"]
                        for m in (before, after))
        extra["latency_ms"] = {"before": round(lat_b, 4), "after": round(lat_a, 4), "reduction": _red(lat_b, lat_a),
                               "runs": options.latency_runs,
                               "note": f"onnxruntime CPU, all optimizations, median, first batch of the {source} inputs"}
        runs = min(options.latency_runs, 10)
        per_b, per_a = _layer_latency(before, feed, runs), _layer_latency(after, feed, runs)
        for row, p in zip(layers, an.producers):
            if p.node.name:
                row["latency_ms_before"] = per_b.get(p.node.name)
                row["latency_ms_after"] = per_a.get(p.node.name)
        extra["latency_ms"]["per_layer_note"] = "per layer: onnxruntime profiler, graph optimizations off, median"
    return extra


def _weight_sizes(model: ModelProto) -> dict:
    """{layer output: elements of its weight and bias} for Conv/ConvTranspose/Gemm/MatMul."""
    sizes = {name: int(np.prod(t.dims)) for name, t in const_tensors(model).items()}
    return {n.output[0]: sum(sizes.get(i, 0) for i in n.input[1:3] if i)
            for n in model.graph.node if n.op_type in channels.PRODUCERS and len(n.input) > 1}


def _red(before: float, after: float) -> float:
    return round(1.0 - after / before, 4) if before else 0.0
