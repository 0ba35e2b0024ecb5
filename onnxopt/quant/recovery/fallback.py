"""Automatic fallback (mixed precision, on by default): the most sensitive layers of a QDQ model
go back to high precision.

``fallback=auto`` with a :class:`onnxopt.task_metric.Budget` -- ``max_agreement_loss`` (top-1 agreement
points lost on classifier outputs, default 1, checked on up to ``AGREEMENT_SAMPLES`` calibration
samples) and/or ``max_error`` (relative L2 error of every output's logits, on
``FALLBACK_SAMPLES``), both measured with :mod:`onnxopt.task_metric` on the logits. The agreement
budget is a promise about data the model has not been calibrated on, so it is checked on a
one-sided upper confidence bound of the agreement loss (Wilson score, from the sample count; see
:func:`onnxopt.task_metric.agreement_bound`; ``qdq.agreement_confidence``, 0.84 by default, chosen
in ``tools/bench_fallback_margin.py``), not on the calibration samples' own count, which
understates the held-out loss. Each unit -- a layer (weight + input activation) or an activation
Q/DQ pair that feeds no layer (residual Add, SE Mul) -- is ranked by the task objective with only
it quantized, then the fewest most sensitive units that meet the budget go back to float (found by
doubling and bisection over the ranking; a check that misses the budget stops at the sample that
decides it). Where no output takes a decision (a detector's raw head, a regression, an embedding)
the agreement budget holds nothing; without ``max_error`` only the units that alone make half the
output noise or more are kept, when they remove more of it than their share of the MACs
(:func:`find_dominant_units`, :func:`worth_keeping`). With ``fallback_precision=int16`` on TIDL the layers are left float in the ONNX graph
(TIDL reads pre-quantized models as 8-bit only) and reported as TIDL's ``params_16bit_names_list``
/ ``output_feature_16bit_names_list`` import options; other targets have no 16-bit QDQ path here
(TensorRT has no int16) and refuse it. The report lists the layers kept in high precision, their
share of MACs, and onnxruntime CPU latency of the float model, all int8 and the output; on
``--target ort`` the warning says when the output runs no faster than the float model.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import numpy as np
from onnx import ModelProto

from ... import runtime, stats
from ...errors import OptionError
from ...task_metric import POSITIONS, Budget, TaskError, agreement_bound
from ...task_metric import Evaluator as TaskEvaluator
from ..options import RecoveryOptions
from ..view import QdqView, QuantInfo, sqnr_db

FALLBACK_SAMPLES = 32
AGREEMENT_SAMPLES = 256  # a top-1 agreement budget is checked on this many calibration samples (capped by memory)
MIN_SHIFTED_SIZE = 8     # images smaller than this on a side are not shifted (a pixel is too much of them)
SHIFTED = "calibration images moved by one pixel"


def _image_axes(arr: np.ndarray) -> Optional[tuple]:
    """The (height, width) axes of a batch of images -- [N, C, H, W] or [N, H, W, C] with C of 1 or
    3 and both sides at least MIN_SHIFTED_SIZE -- else None."""
    if arr.ndim != 4 or arr.dtype.kind != "f":
        return None
    if arr.shape[1] in (1, 3) and min(arr.shape[2:]) >= MIN_SHIFTED_SIZE:
        return 2, 3
    if arr.shape[3] in (1, 3) and min(arr.shape[1:3]) >= MIN_SHIFTED_SIZE:
        return 1, 2
    return None


def shift_images(images: np.ndarray, axes: tuple, k: int = 1, start: int = 0) -> np.ndarray:
    """Image ``i`` of the batch moved by ``k`` pixels along ``axes`` (height, width): down, up,
    right or left by ``(start + i) % 4``, the border repeated."""
    pad = [(0, 0)] * images.ndim
    pad[axes[0]] = pad[axes[1]] = (k, k)
    big = np.pad(images, pad, mode="edge")
    h, w = images.shape[axes[0]], images.shape[axes[1]]
    out = np.empty_like(images)
    for i in range(len(images)):
        dy, dx = ((0, k), (2 * k, k), (k, 0), (k, 2 * k))[(start + i) % 4]
        window = [slice(None)] * images.ndim
        window[axes[0]], window[axes[1]] = slice(dy, dy + h), slice(dx, dx + w)
        out[i] = big[i][tuple(window[1:])]
    return out


def shifted_views(data) -> Optional[object]:
    """The calibration batches with image ``i`` moved by one pixel (up, down, left or right by
    ``i % 4``, the border repeated), as a data callable; None unless the first batch feeds one
    float image input (:func:`_image_axes`). What ``fallback_check=shifted`` checks on.

    Why: where the calibration images are the model's own training images, the float model is
    surer of them than of new images, and the agreement check saw 2.7x fewer top-1 changes than
    held-out images show (0.25 % against 0.68 % over 8 runs). A one-pixel shift is a view of each
    image the model did not memorise; of noise, mixup and 1-2 pixel shifts it came closest to the
    held-out rate, leaving each of 7 classifiers out (``tools/bench_check_set.py``). It is not the
    default: where the calibration images are new to the model, the shifted views see about as
    many changes as the images themselves, but different ones, and clearing them kept far more
    layers in float (EfficientNet-Lite0 fold 0, ort: 55 units instead of 1, docs/benchmarks.md)."""
    if data is None:
        return None
    first = next(iter(data()), None)
    if first is None or len(first) != 1 or _image_axes(np.asarray(next(iter(first.values())))) is None:
        return None

    def views():
        seen = 0
        for feed in data():
            name, arr = next(iter(feed.items()))
            arr = np.asarray(arr)
            axes = _image_axes(arr)
            if axes is None:   # a batch of another shape: as it is
                yield feed
                continue
            yield {name: shift_images(arr, axes, 1, seen)}
            seen += len(arr)
    return views


def worst_bound(err: TaskError, confidence: float) -> Optional[float]:
    """The largest :func:`agreement_bound` over ``err``'s classifier outputs (None without one)."""
    return max((agreement_bound(o.agreement_loss, o.samples, confidence) for o in err.outputs if o.classifier),
               default=None)


def _latency_ms(model: ModelProto, feed: dict, runs: int = 15) -> float:
    """Median onnxruntime CPU latency in ms, rounded to 3 decimals, after one untimed run."""
    sess = runtime.session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    sess.run(names, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, feed)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times) * 1e3), 3)


def fallback_budget(options: RecoveryOptions):
    """The :class:`onnxopt.task_metric.Budget` ``fallback=auto`` must meet, from the qdq options
    ``max_agreement_loss`` (at ``agreement_confidence``) and ``max_error``; None when neither is set."""
    agree, rel = options.max_agreement_loss, options.max_error
    if agree < 0 and rel <= 0:
        return None
    return Budget(max_agreement_loss=math.inf if agree < 0 else agree, max_rel_error=rel,
                  confidence=options.agreement_confidence)


def fewest(task, n: int, budget) -> Optional[int]:
    """The fewest units k in [0, n] whose ``task(k)`` (the first k of the ranking in high
    precision) meets ``budget``, by doubling then bisection; None when even n does not."""
    if task(0).within(budget):
        return 0
    lo, hi = 0, 1
    while hi < n and not task(hi).within(budget):
        lo, hi = hi, min(n, hi * 2)
    if not (n and task(hi).within(budget)):
        return None
    while hi - lo > 1:  # invariant: task(lo) misses the budget, task(hi) meets it
        mid = (lo + hi) // 2
        if task(mid).within(budget):
            hi = mid
        else:
            lo = mid
    return hi


# what the agreement budget reads, for the note when no output has it
NO_DECISION = ("no output takes a decision (class scores [N, C], a Sigmoid's [N, C] / [N] labels, or a map whose "
               "ArgMax/Softmax names its class axis; an output of features, e.g. an L2-normalized embedding, is none)")
# when no output takes a decision, the units that alone (every other unit in float) make at least
# this share of the all-quantized model's output noise are kept in high precision, if they remove
# more of the noise than their share of the MACs (:func:`worth_keeping`): a few cheap units that
# cause most of it (two on one path: the same channels quantized twice)
DOMINANT_NOISE_SHARE = 0.5
SCREEN_SAMPLES = 1   # the samples every unit is screened on (find_dominant_units)


def auto_fallback(float_model, qmodel, info, data, budget, precision: str, log, measure_latency: bool = True,
                  evaluator: Optional[TaskEvaluator] = None, own_data: bool = False,
                  checked_on: Optional[str] = None) -> tuple:
    """Keep the fewest most-sensitive units in ``precision`` so that ``budget`` (a
    :class:`onnxopt.task_metric.Budget`, or a float: a relative-error budget) holds on the
    calibration data (see the module doc). Units are ranked on the first ``FALLBACK_SAMPLES``
    samples; the budget is checked on ``AGREEMENT_SAMPLES`` when it limits top-1 agreement (one
    point needs ~100 samples to be seen at all), else on ``FALLBACK_SAMPLES``. ``evaluator``: the
    float model's :class:`~onnxopt.task_metric.Evaluator` on the calibration data when the caller
    already holds one (the bias correction's check). ``own_data``: ``data`` is the user's check data
    (``--check-data``), not the calibration data; the console and the report say so, as they say
    ``checked_on`` (what ``data`` is, e.g. :data:`SHIFTED`: :func:`shifted_views` of the calibration data)."""
    checked_on = checked_on or ("check data" if own_data else "calibration data")
    if not isinstance(budget, Budget):
        budget = Budget(max_agreement_loss=math.inf, max_rel_error=float(budget))
    target = QuantInfo.of(info).target
    if precision == "int16" and not target.startswith("tidl"):
        raise OptionError(f"qdq.fallback_precision=int16 is not available for target {target}.",
                          "TensorRT has no int16 Q/DQ; use fallback_precision=float (or target tidl, whose 16-bit layer lists are reported)")
    t0 = time.perf_counter()
    view = QdqView(float_model, qmodel, info)
    uses_agreement = math.isfinite(budget.max_agreement_loss)
    # the float function in the quantized graph: the check's reference and the float latency's model
    # (the user's float graph may not load as it is: duplicate node names, which the quantizer renamed)
    reference = view.float_reference()
    ev = evaluator or TaskEvaluator(reference, data, limit=AGREEMENT_SAMPLES if uses_agreement else FALLBACK_SAMPLES)
    full = ev.error(view.variant(fold_weights=True))
    cache = {(): full}
    acts = activation_units(view)

    def error(units: list, complete: bool = False):
        """The task error with ``units`` in high precision; a check that misses the agreement budget
        stops at the sample that decides it, unless ``complete`` (the figures reported)."""
        key = tuple(units)
        if key not in cache or (complete and cache[key].stopped_early):
            cache[key] = ev.error(unit_variant(view, acts, units), budget=None if complete else budget)
        return cache[key]

    n_layers = len(view.layers) + len(acts)
    macs = {r["name"]: (r["macs"] or 0) for r in stats.layer_macs(qmodel)}   # read once: the share is asked twice
    # no output takes a decision (a detector's raw head, a regression) and no qdq.max_error was given:
    # nothing says how much output noise matters, but a unit that alone causes most of it is kept
    # (YOLOX-nano: one depthwise conv, 0.3 % of the MACs, 89 % of the output noise on TensorRT)
    dominant = uses_agreement and not full.classifier and budget.max_rel_error <= 0
    ranked = min(FALLBACK_SAMPLES, ev.samples)
    if dominant:
        order = find_dominant_units(view, acts, ev, ranked)
        k = len(order)
        if k and not worth_keeping(full.objective(), error(order, complete=True).objective(), _mac_share(macs, view, order)):
            k = 0
    else:
        order = [] if full.within(budget) else rank_units(view, acts, ev, ranked)
        k = fewest(lambda k: error(order[:k]), len(order), budget)
    by_count = None
    if k is not None and k == n_layers and n_layers and budget.confidence > 0.5 and not dominant:
        # every unit in high precision is the float model, not the quantized one asked for: when
        # the all-quantized model meets the budget on the count itself and only the confidence
        # bound asked for more (one disagreement of 256 samples is 1.02 points at 0.84), the
        # fewest units that meet the count are the answer, and the console says so
        by_count = dataclasses.replace(budget, confidence=0.5)
        k_count = fewest(lambda k: error(order[:k], complete=True), len(order), by_count)
        if k_count is not None and k_count < k:
            k = k_count
        else:
            by_count = None
    met = k is not None
    chosen = order[:k] if met else order
    after = error(chosen, complete=True)
    out = unit_variant(view, acts, chosen, fold=False) if chosen else qmodel
    rep = {"budget": budget.describe(), "max_error": budget.max_rel_error, "max_agreement_loss": budget.max_agreement_loss,
           "met": met, "error_before": full.rel_error, "error_after": after.rel_error,
           "agreement_loss_before": full.agreement_loss, "agreement_loss_after": after.agreement_loss,
           "agreement_bound_after": worst_bound(after, budget.confidence),
           "task_before": full.summary(), "task_after": after.summary(),
           "sqnr_db_before": round(sqnr_db(full.rel_error), 3), "sqnr_db_after": round(sqnr_db(after.rel_error), 3),
           "high_precision_layers": chosen, "precision": precision, "evaluations": len(cache) + (n_layers if order or dominant else 0),
           "high_precision_mac_share": _mac_share(macs, view, chosen),
           "samples": ev.samples, "checked_on": checked_on}
    if dominant:
        rep["dominant_units"] = True
        rep["note"] = (f"{NO_DECISION}: the agreement budget does not apply; kept the units that alone make at least "
                       f"{DOMINANT_NOISE_SHARE:.0%} of the all-quantized outputs' noise; set qdq.max_error (relative error "
                       "of the outputs) for a budget on these outputs")
    if not met:
        rep["note"] = ("the budget is not reachable by keeping weighted layers in high precision "
                       "or activations in float")
    if by_count is not None:
        rep["met_on_count"] = (
            f"note: fallback=auto: the budget's upper bound at {100 * budget.confidence:g} % confidence is met on these "
            f"{ev.samples} samples only with all {n_layers} unit(s) in {precision}, the float model; kept {len(chosen)} instead, "
            f"the fewest whose agreement loss on the samples themselves is within {budget.max_agreement_loss:g} pt "
            f"({after.agreement_loss:.2f} pt). For the bound, check on more images the model never trained on (--check-data)")
    if precision == "int16":  # TIDL's import options that keep these tensors (and the layers writing them) in 16 bits
        names = ",".join(acts[u] if u in acts else view.nodes[u].output[0] for u in chosen)
        rep["tidl_options"] = {"advanced_options:params_16bit_names_list": names,
                               "advanced_options:output_feature_16bit_names_list": names}
    if measure_latency:
        rep["latency_ms_ort_cpu"] = {"float": _latency_ms(reference, ev.feeds[0]),
                                     "all_quantized": _latency_ms(qmodel, ev.feeds[0]),
                                     "with_fallback": _latency_ms(out, ev.feeds[0]),
                                     "note": "onnxruntime CPU, median of 15"}
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    slower = (_slower_than_float(rep["latency_ms_ort_cpu"])
              if measure_latency and target == "ort" and met and 0 < len(chosen) < n_layers else None)
    # a map's positions are what its budget counts, not the samples: the hint then gives no sample counts
    samples = None if any(o.decision == POSITIONS for o in full.outputs) else ev.samples
    warning = _fallback_warning(met, len(chosen), n_layers, rep["high_precision_mac_share"], budget, precision, samples,
                                own_data, slower, dominant)
    share = f" ({_percent(rep['high_precision_mac_share'])} of the MACs)" if chosen else ""
    held = ("no output takes a decision: kept the units that alone make half the output noise or more; "
            "qdq.max_error sets a budget"
            if dominant else f"budget {budget.describe()}{'' if met else ', NOT met'}")
    log(f"fallback: {len(chosen)} of {n_layers} unit(s) kept in {precision}{share}{_named(chosen)}; "
        f"{full.summary()} -> {after.summary()} ({held}; "
        f"{ev.samples} samples{'' if checked_on == 'calibration data' else ' of the ' + checked_on})")
    if by_count is not None:
        log(rep["met_on_count"])
    if warning:
        rep["warning"] = warning
        log(warning)
    elif chosen and met and uses_agreement and full.classifier and not ev.memory_capped:
        coarse = _coarse_check_note(ev.samples, precision, own_data)
        if coarse:
            rep["coarse_check"] = coarse
            log(coarse)
    return out, rep


LISTED_UNITS = 8   # the console names this many units kept; the report lists them all


def _percent(share: float) -> str:
    """``34 %``, or ``0.3 %`` below one percent (a unit or two of a large model is not 0 %)."""
    pct = 100 * share
    return f"{pct:.0f} %" if pct >= 1 or pct == 0 else f"{pct:.1g} %"


def _named(chosen: list) -> str:
    """``: a, b, c`` for the console line, the first LISTED_UNITS of them (a W5 model kept 44)."""
    if not chosen:
        return ""
    more = len(chosen) - LISTED_UNITS
    return ": " + ", ".join(chosen[:LISTED_UNITS]) + (f" and {more} more (the report's recovery.fallback.high_precision_layers)"
                                                      if more > 0 else "")


def _coarse_check_note(samples: int, precision: str, own_data: bool = False) -> Optional[str]:
    """One line when the agreement budget was checked on fewer samples than the check reads (the
    user gave fewer): at 0.84 confidence a 1-point budget allows no disagreement on up to 259
    samples, so the fewer samples, the fewer inputs near a decision boundary the check can see
    before it stops adding units. On the SE model of ``tools/bench_se_calib_count.py`` 200 training
    images lost 2 points held out, 399 (checked on 256) none. None when the check read its fill (the
    caller leaves out a check its memory cap stopped early: more samples would not reach it)."""
    if samples >= AGREEMENT_SAMPLES:
        return None
    if own_data:
        return (f"note: fallback=auto checked its budget on {samples} samples of the check data (it reads up to "
                f"{AGREEMENT_SAMPLES}); with few samples the layers kept in {precision} hold the budget less surely on "
                f"new data: give {AGREEMENT_SAMPLES}+ check samples")
    return (f"note: fallback=auto checked its budget on {samples} calibration samples (it reads up to {AGREEMENT_SAMPLES}); "
            f"with few samples the layers kept in {precision} hold the budget less surely on new data: give "
            f"{AGREEMENT_SAMPLES}+ samples, not only training images (or --check-data: images the model never trained on; "
            f"without those, --set qdq.fallback_check=shifted checks on each image moved by one pixel)")


def activation_units(view: QdqView) -> dict:
    """The activation Q/DQ pairs that feed no layer (residual Adds, SE Muls), as units named
    ``act:<tensor>``: with every layer in float, those alone cost 4 agreement points on a
    HardSwish/SE network."""
    return {f"act:{t}": t for t in view.activation_only_units()}


def unit_variant(view: QdqView, acts: dict, chosen: list, fold: bool = True):
    """The quantized model with the ``chosen`` units (layer names, or ``acts`` keys) in float."""
    layers = [u for u in chosen if u not in acts]
    return view.variant(float_layers=layers, float_inputs=layers, float_acts=[acts[u] for u in chosen if u in acts],
                        fold_weights=fold)


def unit_scores(view: QdqView, acts: dict, ev: TaskEvaluator, samples: int, units: Optional[list] = None) -> dict:
    """{unit: the task objective with only that unit quantized}, for ``units`` (default: every unit,
    layers then ``acts``), on the first ``samples`` samples of ``ev``."""
    units = list(view.layers) + list(acts) if units is None else units
    return {u: ev.error(view.only_activation(acts[u]) if u in acts else view.only_layer(u), samples).objective() for u in units}


def rank_units(view: QdqView, acts: dict, ev: TaskEvaluator, samples: int) -> list:
    """Every unit, most sensitive first (:func:`unit_scores`)."""
    scores = unit_scores(view, acts, ev, samples)
    return sorted(scores, key=lambda u: -scores[u])


def worth_keeping(noise_before: float, noise_after: float, mac_share: float) -> bool:
    """Whether units kept in high precision when no output takes a decision pay for themselves:
    the share of the output noise they remove exceeds their share of the MACs (on a model of two
    like layers, each makes half the noise, and keeping both is the float model)."""
    return noise_before > 0 and (1 - noise_after / noise_before) > mac_share


def dominant_units(scores: dict, whole: float, share: float = DOMINANT_NOISE_SHARE) -> list:
    """The units kept in high precision when no output takes a decision, most sensitive first: those
    whose noise alone (``scores``, :func:`unit_scores`) is at least ``share`` of ``whole``, the
    all-quantized model's on the same samples (none when that is zero: nothing to win)."""
    if not whole > 0:
        return []
    return sorted((u for u, v in scores.items() if v >= share * whole), key=lambda u: -scores[u])


def find_dominant_units(view: QdqView, acts: dict, ev: TaskEvaluator, samples: int) -> list:
    """:func:`dominant_units` on the first ``samples`` samples, among the units that make at least
    half that share of the noise on the first SCREEN_SAMPLES: every unit is a model run, and YOLOX-nano
    has 148 units on TensorRT and 378 on ort (their activation Q/DQ pairs), so each is screened on
    one sample (a unit that makes most of the noise does so on every image of these models:
    tools/bench_no_decision.py) and the few left are measured on all ``samples``."""
    def whole(n):
        return ev.error(view.variant(fold_weights=True), n).objective()
    screen = min(SCREEN_SAMPLES, samples)
    scores, noise = unit_scores(view, acts, ev, screen), whole(screen)
    candidates = dominant_units(scores, noise, DOMINANT_NOISE_SHARE / 2)
    if candidates and screen < samples:
        scores, noise = unit_scores(view, acts, ev, samples, candidates), whole(samples)
    return dominant_units({u: scores[u] for u in candidates}, noise)


def _mac_share(macs: dict, view: QdqView, chosen: list) -> float:
    """The share of the quantized layers' MACs (``macs``: {layer: MACs}) in the units kept in high precision."""
    total = sum(macs.get(l, 0) for l in view.layers) or 1
    return round(sum(macs.get(l, 0) for l in chosen) / total, 4)


COSTLY_MAC_SHARE = 0.5   # more than half the quantized MACs back in high precision: say so


def _slower_than_float(latency: dict) -> Optional[str]:
    """The clause for the fallback's warning when the output of ``--target ort`` runs no faster than
    the float model on this CPU (``latency``: the report's ``latency_ms_ort_cpu``), else None. Each
    unit in float ends its int8 kernels with a DequantizeLinear and starts the next with a
    QuantizeLinear, so on EfficientNet-Lite0 (fold 2) 44 of 61 units in float ran at 1.28x the
    float model's latency, against 0.45x for all int8 (``tools/bench_fallback_latency.py``). Only
    the ort target's latency is onnxruntime's on a CPU; TensorRT and TIDL run their own kernels."""
    if latency["with_fallback"] < latency["float"]:
        return None
    return (f"it runs no faster than the float model on this CPU (onnxruntime: {latency['with_fallback']:g} ms against "
            f"{latency['float']:g} ms; every unit int8: {latency['all_quantized']:g} ms)")


def allowed_disagreements(budget_pts: float, samples: int, confidence: float) -> int:
    """How many of ``samples`` may disagree with the float model while the agreement budget
    ``budget_pts`` holds at ``confidence`` (:func:`onnxopt.task_metric.agreement_bound`): 0 of up to
    259 samples for 1 point at 0.84, so a check that reads at most ``AGREEMENT_SAMPLES`` asks for
    none at all, however many samples the user gives."""
    d = 0
    while d < samples and agreement_bound(100.0 * (d + 1) / samples, samples, confidence) <= budget_pts:
        d += 1
    return d


def _fallback_warning(met: bool, kept: int, units: int, mac_share: float, budget, precision: str, samples: Optional[int],
                      own_data: bool = False, slower: Optional[str] = None, dominant: bool = False):
    """One line when the fallback does not give the quantized model asked for: the budget cannot
    be met or leaves nothing quantized (e.g. W4A4, where every layer alone costs more than a
    point), it is met only with most of the MACs in high precision, or (``slower``, the clause of
    :func:`_slower_than_float`) the output of ``--target ort`` runs no faster than the float model.
    A 1-point agreement budget at 0.84 confidence allows no disagreement on the at most
    ``AGREEMENT_SAMPLES`` samples the check reads, and a sample near a decision boundary can then
    take many layers with it. More samples do not loosen that (they give the check more chances to
    see a disagreement: the SE model of ``tools/bench_se_calib_count.py`` kept 1 unit on 200 images
    and 4 on 399), so the hint names what does, with the disagreements each setting allows on these
    samples (``own_data``: the samples are the user's check data; ``samples`` None: the budget counts
    a map's positions, and the hint gives no counts; ``dominant``: no output takes a decision and
    the units are :func:`find_dominant_units`', no budget's)."""
    if not met or (kept == units and units):
        what = "is not reachable" if not met else f"kept all {units} unit(s) in {precision}"
        return (f"WARNING: fallback=auto: the budget ({budget.describe()}) {what}, so the output is not the quantized model "
                "asked for; use --set qdq.fallback=none to quantize every layer, or a larger qdq.max_agreement_loss "
                "(qdq.max_error)")
    if mac_share <= COSTLY_MAC_SHARE and not slower:
        return None
    if dominant:
        return (f"WARNING: fallback=auto: no output takes a decision, and the units that make most of its noise are {kept} "
                f"of {units}, {_percent(mac_share)} of the MACs, kept in {precision}{', and ' + slower if slower else ''}; "
                "for a more quantized model --set qdq.fallback=none, or budget the outputs' error with qdq.max_error")
    which = "--check-data samples" if own_data else "calibration samples"
    if math.isfinite(budget.max_agreement_loss) and samples is None:
        hint = "allow more disagreement: a larger qdq.max_agreement_loss (the share of positions whose decision may change), or "
    elif math.isfinite(budget.max_agreement_loss):
        pts, conf = budget.max_agreement_loss, budget.confidence
        hint = (f"allow more disagreement: a larger qdq.max_agreement_loss ({2 * pts:g} lets "
                f"{allowed_disagreements(2 * pts, samples, conf)} of the {samples} {which} the budget is checked on "
                f"disagree, {pts:g} lets {allowed_disagreements(pts, samples, conf)}), qdq.agreement_confidence=0.5 "
                f"(the count itself: {allowed_disagreements(pts, samples, 0.5)}), or ")
    else:
        hint = "give a larger qdq.max_error, or "
    return (f"WARNING: fallback=auto: the budget ({budget.describe()}) keeps {kept} of {units} unit(s), "
            f"{_percent(mac_share)} of the MACs, in {precision}{', and ' + slower if slower else ''}; "
            f"for a {'faster, ' if slower else ''}more quantized model {hint}--set qdq.fallback=none")
