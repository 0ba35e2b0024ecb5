"""Bias correction of a QDQ model (Nagel et al. 2019), empirical or analytical; undone by the
orchestrator (:func:`onnxopt.quant.recovery.recover`) where it makes the outputs noisier.

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
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from onnx import ModelProto, numpy_helper

from ... import runtime
from ...data import feed_samples
from ...ir.proto import const_tensors, consumers
from ..view import INT32_MAX, INT32_MIN, QdqView, fast_session, layer_depths

BIAS_SAMPLES = 32  # samples per measurement of the sequential empirical correction


def channel_means(model: ModelProto, tensors: list, data, max_samples: Optional[int] = None) -> dict:
    """Per-channel (axis 1) mean of each tensor over ``data``."""
    sess = fast_session(runtime.with_outputs(model, tensors))
    sums, counts, seen = {}, {}, 0
    for feed in data():
        outs = runtime.run(sess, feed, list(dict.fromkeys(tensors)))
        for name, v in outs.items():
            v = v.astype(np.float64)
            if v.ndim < 2:
                continue
            s = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)
            sums[name] = sums.get(name, 0.0) + s.sum(axis=1)
            counts[name] = counts.get(name, 0) + s.shape[1]
        seen += feed_samples(feed)
        if max_samples and seen >= max_samples:
            break
    return {k: sums[k] / counts[k] for k in sums}


# ------------------------------------------------------------------------------ bias update
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
        if l.bias_is_int:
            t = inits[l.bias_q]
            bq = numpy_helper.to_array(t).astype(np.float64)
            s = numpy_helper.to_array(inits[l.bias_scale]).astype(np.float64)
            new = np.clip(np.rint(bq - delta.reshape(bq.shape) / s), INT32_MIN, INT32_MAX).astype(np.int32)
            t.CopyFrom(numpy_helper.from_array(new, t.name))
            continue
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):  # MatMul: no bias input to write to
            skipped.append(f"{layer}: {node.op_type} has no bias input to correct")
            continue
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                skipped.append(f"{layer}: bias is not an initializer")
                continue
            old = numpy_helper.to_array(inits[node.input[2]])
            new = (old.astype(np.float64).reshape(-1) - delta).reshape(old.shape).astype(old.dtype)
        else:
            for a in node.attribute:  # a Gemm's beta would scale the new bias
                if a.name == "beta":
                    a.f = 1.0
            new = (-delta).astype(np.float32)
        name = _fresh(f"{layer}__bias_corrected", inits)
        t = numpy_helper.from_array(new, name)
        m.graph.initializer.append(t)
        inits[name] = t
        node.input.extend([""] * (3 - len(node.input)))
        node.input[2] = name
    return m, skipped


def _fresh(base, inits) -> str:
    name, i = base, 0
    while name in inits:
        i += 1
        name = f"{base}_{i}"
    return name


def empirical_bias_correction(float_model, qmodel, info, data, max_samples: int, log) -> tuple:
    """Sequential empirical bias correction (module doc), wave by wave: a wave = the layers with the
    same number of quantized layers upstream."""
    view = QdqView(float_model, qmodel, info)
    layers = list(view.layers)
    outs = {l: view.nodes[l].output[0] for l in layers}
    mean_f = channel_means(view.float_reference(), list(outs.values()), data, max_samples)
    depths = layer_depths(qmodel, layers)
    waves = [[l for l in layers if depths[l] == d] for d in sorted(set(depths.values()))]
    skipped, shifts = [], []
    for wave in waves:
        mean_q = channel_means(view.variant(fold_weights=True), [outs[l] for l in wave], data, max_samples)
        deltas = {l: mean_q[outs[l]] - mean_f[outs[l]] for l in wave if outs[l] in mean_q and outs[l] in mean_f}
        qmodel, sk = apply_bias_deltas(qmodel, view, deltas)
        skipped += sk
        view = QdqView(float_model, qmodel, info)
        shifts += [float(np.abs(x).max()) for x in deltas.values()]
    log(f"bias correction: {len(layers)} layers in {len(waves)} waves")
    return qmodel, {"method": "empirical", "layers": len(layers), "waves": len(waves), "samples": max_samples,
                    "max_shift": max(shifts, default=0.0), "skipped": sorted(set(skipped))}


def relu_gaussian_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[max(0, y)] for y ~ N(mu, sigma^2), per channel: sigma pdf(mu/sigma) + mu cdf(mu/sigma)."""
    sigma = np.maximum(np.abs(sigma), 1e-12)
    z = mu / sigma
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    return sigma * pdf + mu * cdf


def _bn_input_means(float_model: ModelProto) -> dict:
    """{tensor: E[x] per channel} for tensors that are BN outputs, optionally through Relu / Clip(0, c)."""
    consts = {name: numpy_helper.to_array(t) for name, t in const_tensors(float_model).items()}
    means = {}
    readers = consumers(float_model.graph)
    for n in float_model.graph.node:
        if n.op_type != "BatchNormalization" or not all(i in consts for i in n.input[1:3]):
            continue
        gamma, beta = consts[n.input[1]].astype(np.float64), consts[n.input[2]].astype(np.float64)
        y = n.output[0]
        means[y] = beta
        for c in readers.get(y, ()):
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
    return means


def analytical_bias_correction(float_model, qmodel, info, data, max_samples: int, log) -> tuple:
    view = QdqView(float_model, qmodel, info)
    bn_means = _bn_input_means(float_model)
    need_data = [view.layer_input(l)[0] for l in view.layers if view.layer_input(l)[0] not in bn_means]  # input tensors
    data_means = {}
    if need_data and data is not None:
        data_means = channel_means(view.float_reference(), need_data, data, max_samples)
    deltas, skipped, source = {}, [], {"bn": 0, "data": 0}
    for name, l in view.layers.items():
        x = view.layer_input(name)[0]
        ex = bn_means.get(x, data_means.get(x))
        if ex is None:
            skipped.append(f"{name}: no BN statistics and no data for E[x]")
            continue
        source["bn" if x in bn_means else "data"] += 1
        eps = view.dequantized_weight(name).astype(np.float64) - view.float_weight[name].astype(np.float64)
        node = view.nodes[name]
        if l.op == "Conv":
            g = next((a.i for a in node.attribute if a.name == "group"), 1)
            co, cpg = eps.shape[0], eps.shape[1]
            if ex.shape[0] != cpg * g:
                skipped.append(f"{name}: channel mismatch")
                continue
            e = eps.reshape(g, co // g, cpg, -1).sum(axis=3)  # [g, o, cpg]
            delta = np.einsum("goc,gc->go", e, ex.reshape(g, cpg)).reshape(-1)
        elif l.op == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            delta = alpha * ((eps @ ex) if trans_b else (ex @ eps))
        else:
            skipped.append(f"{name}: {l.op} not supported")
            continue
        deltas[name] = delta
    qmodel, sk = apply_bias_deltas(qmodel, view, deltas)
    return qmodel, {"method": "analytical", "layers": len(deltas), "expectation_source": source, "skipped": skipped + sk}
