"""PTQ accuracy recovery without training, applied to a QDQ model after calibration.

Entry point :func:`recover` (called by the ``qdq`` pass when one of its reserved options is set;
see ``notes/contracts.md``). Steps, in this order, each optional:

1. ``rounding=adaround`` -- learned weight rounding per layer (:mod:`onnxopt.quant.adaround`), or
   ``rounding=brecq`` -- per block of layers, with their biases (:mod:`onnxopt.quant.brecq`, torch).
2. ``bias_correction`` (undone, and reported as reverted, when it raises the relative output
   error on the reference samples -- as it does after AdaRound, which leaves shifts where a
   following ReLU6 clips that the correction then moves):

   * ``empirical`` (Nagel et al. 2019 §4.2, AIMET's empirical bias correction): for every layer,
     ``E[y_q] - E[y_f]`` per output channel -- the mean of the layer's output error over the
     calibration data, the quantized model against the float reference -- is subtracted from
     the bias (a float bias, or the int32 bias ``b_q -= round(delta / s_b)`` where the target
     stores int32 biases: ort, tidl). Layers are corrected sequentially (wave by wave in graph
     order, each wave measured after the ones before it were corrected) on up to
     ``BIAS_SAMPLES`` samples: corrected all at once, every layer would also correct the shifts
     its upstream layers' corrections remove, and the model gets worse.
   * ``analytical`` (data-free form of the same paper): only the weight error is corrected,
     ``delta_c = sum_{i,k} (W^ - W)[c, i, k] E[x_i]``, with ``E[x_i]`` from the BatchNormalization
     feeding the layer in the float model (``y ~ N(beta, gamma^2)`` per channel; through ReLU
     ``E[relu(y)] = gamma phi(beta/gamma) + beta Phi(beta/gamma)``, through Clip(0, c) the same
     minus the part above ``c``) and, where no BN precedes the layer (BN-folded models), from the
     per-channel mean of the layer's float input on the calibration data. Zero padding at the
     borders is ignored (as in the paper).

3. ``fallback=auto`` with ``max_error`` (relative L2 error of the model outputs vs float on up to
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

import math
import time
from typing import Optional

import numpy as np
from onnx import ModelProto, numpy_helper

from .. import runtime
from ..data import feed_samples
from ..errors import DataError, OptionError
from .sensitivity import Evaluator, QdqView, analyze, collect_feeds, fast_session, sqnr_db

FALLBACK_SAMPLES = 32
BIAS_SAMPLES = 32  # samples per measurement of the sequential empirical correction
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _limited(data, n: int):
    def gen():
        seen = 0
        for feed in data():
            yield feed
            seen += feed_samples(feed)
            if seen >= n:
                return
    return gen


def _expose(model: ModelProto, tensors) -> ModelProto:
    return runtime.with_outputs(model, tensors)


def channel_means(model: ModelProto, tensors: list, data, max_samples: Optional[int] = None) -> dict:
    """Per-channel (axis 1) mean of each tensor over ``data``."""
    sess = fast_session(_expose(model, tensors))
    sums, counts = {}, {}
    seen = 0
    for feed in data():
        outs = runtime.run(sess, feed, list(dict.fromkeys(tensors)))
        for name, v in outs.items():
            v = v.astype(np.float64)
            if v.ndim < 2:
                continue
            c = v.shape[1]
            s = np.moveaxis(v, 1, 0).reshape(c, -1)
            sums[name] = sums.get(name, 0.0) + s.sum(axis=1)
            counts[name] = counts.get(name, 0) + s.shape[1]
        seen += feed_samples(feed)
        if max_samples and seen >= max_samples:
            break
    return {k: sums[k] / counts[k] for k in sums}


# ------------------------------------------------------------------------------ bias update
def _current_bias(view: QdqView, layer: str) -> np.ndarray:
    l = view.layers[layer]
    node = view.nodes[layer]
    if l.get("bias_is_int"):
        return view.dequantized_int_bias(layer).astype(np.float64)
    if len(node.input) > 2 and node.input[2]:
        return numpy_helper.to_array(view.q_consts[node.input[2]]).astype(np.float64)
    return None


def apply_bias_deltas(model: ModelProto, view: QdqView, deltas: dict) -> tuple:
    """Subtract ``deltas[layer]`` (per output channel) from each layer's bias; returns (model, skipped)."""
    m = ModelProto()
    m.CopyFrom(model)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    skipped = []
    for layer, delta in deltas.items():
        l = view.layers[layer]
        node = nodes[layer]
        if l.get("bias_is_int"):
            t = inits[l["bias_q"]]
            bq = numpy_helper.to_array(t).astype(np.float64)
            s = numpy_helper.to_array(inits[l["bias_scale"]]).astype(np.float64)
            new = np.clip(np.rint(bq - delta.reshape(bq.shape) / s), INT32_MIN, INT32_MAX).astype(np.int32)
            t.CopyFrom(numpy_helper.from_array(new, t.name))
            continue
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):  # MatMul: no bias input to write to
            skipped.append(f"{layer}: {node.op_type} has no bias input to correct")
            continue
        if len(node.input) > 2 and node.input[2]:
            old_name = node.input[2]
            if old_name not in inits:
                skipped.append(f"{layer}: bias is not an initializer")
                continue
            old = numpy_helper.to_array(inits[old_name])
            new = (old.astype(np.float64).reshape(-1) - delta).reshape(old.shape).astype(old.dtype)
        else:
            if node.op_type == "Gemm" and any(a.name == "beta" for a in node.attribute):
                for a in node.attribute:
                    if a.name == "beta":
                        a.f = 1.0
            new = (-delta).astype(np.float32)
        name = _fresh(m, f"{layer}__bias_corrected", inits)
        t = numpy_helper.from_array(new, name)
        m.graph.initializer.append(t)
        inits[name] = t
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return m, skipped


def _fresh(model, base, inits) -> str:
    name, i = base, 0
    while name in inits:
        i += 1
        name = f"{base}_{i}"
    return name


def _layer_depths(model: ModelProto, layers) -> dict:
    """Longest chain of quantized layers ending at each layer (0 = no quantized layer upstream)."""
    layers = set(layers)
    depth_of_tensor: dict = {}
    depths = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        d = max((depth_of_tensor.get(i, 0) for i in node.input if i), default=0)
        if node.name in layers:
            depths[node.name] = d
            d += 1
        for o in node.output:
            depth_of_tensor[o] = d
    return depths


def empirical_bias_correction(float_model, qmodel, info, data, max_samples: int, log) -> tuple:
    """Sequential empirical bias correction: layers are corrected wave by wave (a wave = layers
    with the same number of quantized layers upstream), each wave measured after the waves before
    it were corrected, so no layer corrects a shift that an upstream correction removes."""
    view = QdqView(float_model, qmodel, info)
    layers = list(view.layers)
    outs = {l: view.nodes[l].output[0] for l in layers}
    ref = view.float_reference()
    mean_f = channel_means(ref, list(outs.values()), data, max_samples)
    depths = _layer_depths(qmodel, layers)
    waves: dict = {}
    for l in layers:
        waves.setdefault(depths[l], []).append(l)
    skipped, shifts = [], []
    for d in sorted(waves):
        wave = waves[d]
        mean_q = channel_means(view.variant(fold_weights=True), [outs[l] for l in wave], data, max_samples)
        deltas = {l: mean_q[outs[l]] - mean_f[outs[l]] for l in wave if outs[l] in mean_q and outs[l] in mean_f}
        qmodel, sk = apply_bias_deltas(qmodel, view, deltas)
        skipped += sk
        view = QdqView(float_model, qmodel, info)
        shifts += [float(np.abs(x).max()) for x in deltas.values()]
    log(f"bias correction: {len(layers)} layers in {len(waves)} waves")
    return qmodel, {"method": "empirical", "layers": len(layers), "waves": len(waves), "samples": max_samples,
                    "max_shift": max(shifts, default=0.0), "skipped": sorted(set(skipped))}


def _phi(z):
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def relu_gaussian_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[max(0, y)] for y ~ N(mu, sigma^2), per channel."""
    sigma = np.maximum(np.abs(sigma), 1e-12)
    z = mu / sigma
    return sigma * _phi(z) + mu * _Phi(z)


def _bn_input_means(float_model: ModelProto) -> dict:
    """{tensor: E[x] per channel} for tensors that are BN outputs, optionally through Relu / Clip(0, c)."""
    consts = {}
    for t in float_model.graph.initializer:
        consts[t.name] = numpy_helper.to_array(t)
    for n in float_model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in float_model.graph.node for o in n.output}
    means = {}
    for n in float_model.graph.node:
        if n.op_type != "BatchNormalization" or not all(i in consts for i in n.input[1:3]):
            continue
        gamma, beta = consts[n.input[1]].astype(np.float64), consts[n.input[2]].astype(np.float64)
        y = n.output[0]
        means[y] = beta
        for c in [c for c in float_model.graph.node if y in c.input]:
            if c.op_type == "Relu":
                means[c.output[0]] = relu_gaussian_mean(beta, gamma)
            elif c.op_type == "Clip":
                lo = float(consts[c.input[1]]) if len(c.input) > 1 and c.input[1] in consts else -np.inf
                hi = float(consts[c.input[2]]) if len(c.input) > 2 and c.input[2] in consts else np.inf
                if lo == 0.0:
                    m = relu_gaussian_mean(beta, gamma)
                    if np.isfinite(hi):
                        m = m - relu_gaussian_mean(beta - hi, gamma)
                    means[c.output[0]] = m
    del producer
    return means


def analytical_bias_correction(float_model, qmodel, info, data, max_samples: int, log) -> tuple:
    view = QdqView(float_model, qmodel, info)
    bn_means = _bn_input_means(float_model)
    need_data = [l for l in view.layers if view.layer_input(l)[0] not in bn_means]
    data_means = {}
    source = {"bn": 0, "data": 0}
    if need_data and data is not None:
        ref = view.float_reference()
        data_means = channel_means(ref, [view.layer_input(l)[0] for l in need_data], data, max_samples)
    deltas, skipped = {}, []
    for name, l in view.layers.items():
        x = view.layer_input(name)[0]
        ex = bn_means.get(x)
        if ex is not None:
            source["bn"] += 1
        else:
            ex = data_means.get(x)
            if ex is None:
                skipped.append(f"{name}: no BN statistics and no data for E[x]")
                continue
            source["data"] += 1
        w = view.float_weight[name].astype(np.float64)
        eps = view.dequantized_weight(name).astype(np.float64) - w
        node = view.nodes[name]
        if l["op"] == "Conv":
            g = next((a.i for a in node.attribute if a.name == "group"), 1)
            co, cpg = eps.shape[0], eps.shape[1]
            if ex.shape[0] != cpg * g:
                skipped.append(f"{name}: channel mismatch")
                continue
            e = eps.reshape(g, co // g, cpg, -1).sum(axis=3)  # [g, o, cpg]
            delta = np.einsum("goc,gc->go", e, ex.reshape(g, cpg)).reshape(-1)
        elif l["op"] == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            delta = alpha * ((eps @ ex) if trans_b else (ex @ eps))
        else:
            skipped.append(f"{name}: {l['op']} not supported")
            continue
        deltas[name] = delta
    qmodel, sk = apply_bias_deltas(qmodel, view, deltas)
    return qmodel, {"method": "analytical", "layers": len(deltas), "expectation_source": source, "skipped": skipped + sk}


# ------------------------------------------------------------------------------ fallback
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
    from .. import stats

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


# ------------------------------------------------------------------------------ entry point
def recover(float_model: ModelProto, qdq_model: ModelProto, info: dict, options: dict, data, ctx) -> tuple:
    """Apply the PTQ recovery steps the qdq ``options`` ask for; returns (model, report dict)."""
    log = getattr(ctx, "log", None) or (lambda msg: None)
    bc = options.get("bias_correction", "none")
    fb = options.get("fallback", "none")
    max_error = float(options.get("max_error", 0.0) or 0.0)
    rounding = options.get("rounding", "nearest")
    precision = options.get("fallback_precision", "float")
    n_samples = int(options.get("calib_samples") or 0) or None
    if fb == "auto" and max_error <= 0:
        raise OptionError("qdq.fallback=auto needs an error budget.", "add e.g. --set qdq.max_error=0.05 (relative L2 error of the outputs)")
    if max_error > 0 and fb != "auto":
        raise OptionError("qdq.max_error is only used with qdq.fallback=auto.", "add --set qdq.fallback=auto or drop max_error")
    if precision != "float" and fb != "auto":
        raise OptionError("qdq.fallback_precision is only used with qdq.fallback=auto.", "add --set qdq.fallback=auto")
    if data is None and (bc == "empirical" or fb == "auto" or rounding != "nearest"):
        raise DataError(f"PTQ recovery (empirical bias correction, fallback, rounding={rounding}) needs the calibration data.", "give --calib-data")
    report: dict = {}
    t0 = time.perf_counter()
    model = qdq_model
    ref_feeds = collect_feeds(data, 16) if data is not None else None
    if ref_feeds is not None:
        ev = Evaluator(QdqView(float_model, model, info).float_reference(), ref_feeds)
        report["rel_error_start"] = ev.error(model)
    if rounding != "nearest":
        from .adaround import adaround  # recovery imports these modules, not the other way round
        from .brecq import MAX_SAMPLES, brecq

        view, iters = QdqView(float_model, model, info), int(options.get("adaround_iters", 500))
        if rounding == "adaround":
            model, report[rounding] = adaround(view, data, iters=iters, log=log)
        else:
            # the cap: qdq.calib_samples, else the data's own limit (--calib-samples), else MAX_SAMPLES
            data_limit = getattr(getattr(ctx, "data_spec", None), "max_samples", None)
            cap = n_samples or data_limit or MAX_SAMPLES
            model, report[rounding] = brecq(view, data, iters=iters, max_samples=cap, float_model=float_model, log=log)
    if bc != "none":
        correct = empirical_bias_correction if bc == "empirical" else analytical_bias_correction
        corrected, rep = correct(float_model, model, info, data, (n_samples or BIAS_SAMPLES) if bc == "empirical" else n_samples, log)
        if ref_feeds is not None:
            # A correction must not make the outputs worse: after rounding=adaround it did
            # (EfficientNet-Lite0 W4A8: 81.1 -> 0.1 % top-1), so it is checked and undone if so.
            before, after = ev.error(model), ev.error(corrected)
            rep = {**rep, "rel_error_before": before, "rel_error_after": after}
            if after > before:
                rep["reverted"] = f"output error rose from {before:.4g} to {after:.4g}; the model is left without it"
                log(f"bias_correction={bc} reverted: {rep['reverted']}")
                corrected = model
        model, report["bias_correction"] = corrected, rep
    if fb == "auto":
        model, report["fallback"] = auto_fallback(float_model, model, info, data, max_error, precision, log)
    if ref_feeds is not None:
        report["rel_error_end"] = ev.error(model)
        report["sqnr_db_start"] = round(sqnr_db(report["rel_error_start"]), 3)
        report["sqnr_db_end"] = round(sqnr_db(report["rel_error_end"]), 3)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return model, report
