"""Automatic fallback: the most sensitive layers of a QDQ model go back to high precision.

``fallback=auto`` with ``max_error`` (relative L2 error of the model outputs vs float on up to
``FALLBACK_SAMPLES`` calibration samples): per-layer sensitivity ("only this layer quantized",
:mod:`onnxopt.quant.sensitivity`), then the most sensitive layers go back to float -- the
fewest that meet the budget, found by doubling and bisection over the ranking. With
``fallback_precision=int16`` on TIDL the layers are left float in the ONNX graph (TIDL reads
pre-quantized models as 8-bit only) and reported as TIDL's ``params_16bit_names_list`` /
``output_feature_16bit_names_list`` import options; other targets have no 16-bit QDQ path
here (TensorRT has no int16) and refuse it. The report lists the layers kept in high
precision, their share of MACs, and onnxruntime CPU latency before/after (median).
"""
from __future__ import annotations

import time

import numpy as np
from onnx import ModelProto

from ... import runtime, stats
from ...data import collect_feeds
from ...errors import OptionError
from ..sensitivity import analyze
from ..view import Evaluator, QdqView, sqnr_db

FALLBACK_SAMPLES = 32


def _latency_ms(model: ModelProto, feed: dict, runs: int = 15) -> float:
    sess = runtime.session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    sess.run(names, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def auto_fallback(float_model, qmodel, info, data, max_error: float, precision: str, log, measure_latency: bool = True) -> tuple:
    target = info.get("target", "")
    if precision == "int16" and not target.startswith("tidl"):
        raise OptionError(f"qdq.fallback_precision=int16 is not available for target {target}.",
                          "TensorRT has no int16 Q/DQ; use fallback_precision=float (or target tidl, whose 16-bit layer lists are reported)")
    t0 = time.perf_counter()
    view = QdqView(float_model, qmodel, info)
    feeds = collect_feeds(data, FALLBACK_SAMPLES)
    sens = analyze(view, feeds, modes=("only",))
    order = [r.layer for r in sens.ranked("only")]
    ev = Evaluator(view.float_reference(), feeds)
    cache = {0: sens.full_rel}

    def err(k: int) -> float:
        if k not in cache:
            chosen = order[:k]
            cache[k] = ev.error(view.variant(float_layers=chosen, float_inputs=chosen, fold_weights=True))
        return cache[k]

    n = len(order)
    k_ok = None
    if err(0) <= max_error:
        k_ok = 0
    else:
        lo, hi = 0, 1
        while hi < n and err(hi) > max_error:
            lo, hi = hi, min(n, hi * 2)
        if err(hi) <= max_error:
            while hi - lo > 1:  # invariant: err(lo) > budget >= err(hi)
                mid = (lo + hi) // 2
                if err(mid) <= max_error:
                    hi = mid
                else:
                    lo = mid
            k_ok = hi
    met = k_ok is not None
    k = k_ok if met else n
    chosen = order[:k]
    out = view.variant(float_layers=chosen, float_inputs=chosen) if chosen else qmodel
    macs = {r["name"]: (r["macs"] or 0) for r in stats.layer_macs(qmodel)}
    total = sum(macs.get(l, 0) for l in view.layers) or 1
    rep = {"max_error": max_error, "met": met, "error_before": sens.full_rel, "error_after": err(k),
           "sqnr_db_before": round(sqnr_db(sens.full_rel), 3), "sqnr_db_after": round(sqnr_db(err(k)), 3),
           "high_precision_layers": chosen, "precision": precision, "evaluations": len(cache),
           "high_precision_mac_share": round(sum(macs.get(l, 0) for l in chosen) / total, 4),
           "samples": sens.samples}
    if not met:
        rep["note"] = ("the budget is not reachable by keeping weighted layers in high precision "
                       "(the remaining error comes from activations quantized outside them, e.g. residual Adds)")
    if precision == "int16":
        outputs = [view.nodes[l].output[0] for l in chosen]
        rep["tidl_options"] = {"advanced_options:params_16bit_names_list": ",".join(outputs),
                               "advanced_options:output_feature_16bit_names_list": ",".join(outputs)}
    if measure_latency:
        feed = feeds[0]
        rep["latency_ms_ort_cpu"] = {"all_quantized": round(_latency_ms(qmodel, feed), 3),
                                     "with_fallback": round(_latency_ms(out, feed), 3), "note": "onnxruntime CPU, median of 15"}
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"fallback: {len(chosen)} layer(s) kept in {precision}; error {sens.full_rel:.4g} -> {err(k):.4g} (budget {max_error:g})")
    return out, rep
