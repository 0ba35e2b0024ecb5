"""AdaRound-style learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"), layer by layer, on calibration data only, with NumPy.

For a layer with float weight ``W`` (per group ``[out, K]``, ``K = C/g * prod(kernel)``) and
per-channel scale ``s``, the quantized weight is ``W~ = s * clip(floor(W / s) + h(V), qmin, qmax)``
with the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(zeta = 1.1, gamma = -0.1); with asymmetric weights (zero point ``zp`` per channel) the bounds are
``qmin - zp, qmax - zp`` and ``zp`` is added back when the integers are stored. ``V`` minimises

    E ||W~ x_q - W x_f||^2 / E ||W^ x_q - W x_f||^2  +  lam * mean(1 - |2 h(V) - 1|^beta)

where ``x_f`` is the layer's input in the float model, ``x_q`` the input the quantized layer reads
(see :func:`adaround`), ``W^`` the round-to-nearest weight, and ``beta`` is annealed from 20 to 2
after a warm-up so that ``h`` converges to 0/1. The reconstruction is linear in ``W~``, so the
data enter only through the Gram matrices ``G_qq = E[x_q x_q^T]`` and ``G_fq = E[x_f x_q^T]``
(im2col patches, positions subsampled per image): the gradient ``dL/dW~ = 2 (W~ G_qq - W G_fq)``
is exact and cheap, and no torch is needed. Before learning, the per-channel scale may shrink
(clipping ratio 1 ... 0.5 of min-max, the one whose nearest rounding reconstructs the output best:
the MSE scale initialisation AdaRound uses at 4 bits); an int32 bias (scale ``s_in * s_w``) is
re-quantized with it. The final rounding is ``h >= 0.5``; a layer whose learned rounding
reconstructs worse than round-to-nearest keeps round-to-nearest.

Learned all from one collection, each layer would compensate errors its predecessors also remove,
hence the sequential default (wave by wave) or, one-pass, ``x_q = DQ(Q(x_f))``; the two are
compared in docs/benchmarks.md.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import ModelProto, numpy_helper

from ... import runtime
from ...data import collect_feeds, feed_samples
from ...ir.proto import consumers
from ..check import attrs
from ..view import LayerQuant, QdqView, fast_session, layer_depths, truncated

ZETA, GAMMA = 1.1, -0.1
MASKED_GRAM_LIMIT = 8_000_000  # entries of the per-output-channel Grams of one layer
MIN_ROWS_PER_INPUT = 4  # a layer needs this many input rows (positions x samples) per weight input


class _Layer:
    """Geometry of one layer: how to turn its input tensor into im2col rows [g, P, K]."""

    def __init__(self, name: str, node: onnx.NodeProto, w: np.ndarray, entry: LayerQuant):
        self.name, self.node, self.entry = name, node, entry
        a = attrs(node)
        self.op = node.op_type
        if self.op == "Conv":
            self.group = int(a.get("group", 1))
            self.kernel = list(w.shape[2:])
            self.strides = list(a.get("strides", [1, 1]))
            self.dil = list(a.get("dilations", [1, 1]))
            self.pads = list(a.get("pads", [0, 0, 0, 0]))
            self.w = w.reshape(self.group, w.shape[0] // self.group, -1).astype(np.float64)  # [g, o, K]
        else:
            self.group = 1
            self.trans_b = int(a.get("transB", 0))
            self.w = (w if self.trans_b else w.T)[None].astype(np.float64)  # [1, N_out, K]
        k = self.w.shape[2]
        self.act = None  # (lo, hi, bias [g, o]) when the layer's output goes through Relu/Clip
        self.gqq, self.gfq = np.zeros((self.group, k, k)), np.zeros((self.group, k, k))
        self.count = 0

    def use_activation(self, lo: float, hi: float, bias: Optional[np.ndarray]) -> bool:
        """Weight the reconstruction by where the float pre-activation is in the activation's
        linear region (the paper's ||f_a(W x) - f_a(W~ x)||, linearised): per-output-channel
        Gram matrices, so only when they fit in memory."""
        g, o, k = self.w.shape
        if g * o * k * k > MASKED_GRAM_LIMIT:
            return False
        b = np.zeros((g, o)) if bias is None else np.asarray(bias, np.float64).reshape(g, o)
        self.act = (lo, hi, b)
        self.gqq, self.gfq = np.zeros((g, o, k, k)), np.zeros((g, o, k, k))
        return True

    @staticmethod
    def supported(node: onnx.NodeProto, w: np.ndarray) -> Optional[str]:
        a = attrs(node)
        if node.op_type == "Conv":
            if w.ndim != 4:
                return "only 2-D convolutions"
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
                return "auto_pad"
            return None
        if node.op_type == "Gemm":
            return None if int(a.get("transA", 0)) == 0 else "transA=1"
        return f"{node.op_type} is not supported"

    def rows(self, xf: np.ndarray, xq: np.ndarray, rng: np.random.Generator, max_positions: int) -> tuple:
        """[g, P, K] im2col rows of the paired inputs ``xf``, ``xq``, at the same output positions
        (a random ``max_positions`` of them when there are more)."""
        if self.op == "Gemm":
            return tuple(x.reshape(x.shape[0], -1)[None].astype(np.float32) for x in (xf, xq))
        pt, pl, pb, pr = self.pads
        kh, kw = self.kernel
        dh, dw = self.dil
        sh, sw = self.strides
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        pads = ((0, 0), (0, 0), (pt, pb), (pl, pr))
        wins = [sliding_window_view(np.pad(x, pads), (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
                for x in (xf, xq)]
        n, c, ho, wo = wins[0].shape[:4]
        total = ho * wo
        idx = np.arange(total) if total <= max_positions else np.sort(rng.choice(total, max_positions, replace=False))
        g, p = self.group, len(idx)
        # only the chosen windows, [n, c, P, kh, kw] each
        chosen = (win[:, :, idx // wo, idx % wo].reshape(n, g, c // g, p, kh * kw) for win in wins)
        return tuple(np.ascontiguousarray(w.transpose(1, 0, 3, 2, 4).reshape(g, n * p, -1), dtype=np.float32)
                     for w in chosen)

    def accumulate(self, xf: np.ndarray, xq: np.ndarray, rng: np.random.Generator, max_positions: int) -> None:
        rf, rq = self.rows(xf, xq, rng, max_positions)
        # batched float32 BLAS products of one batch, summed in float64 (np.einsum with a batch
        # axis falls back to slow C loops)
        rqt = rq.transpose(0, 2, 1)
        if self.act is None:
            self.gqq += rqt @ rq
            self.gfq += rf.transpose(0, 2, 1) @ rq
        else:
            lo, hi, b = self.act
            y = rf @ self.w.transpose(0, 2, 1).astype(np.float32) + b[:, None, :]  # [g, P, o]
            mask = ((y > lo) & (y < hi)).transpose(0, 2, 1)[:, :, None, :]  # [g, o, 1, P]
            self.gqq += (rqt[:, None] * mask) @ rq[:, None]
            self.gfq += (rf.transpose(0, 2, 1)[:, None] * mask) @ rq[:, None]
        self.count += rq.shape[1]

    def statistics(self) -> tuple:
        """(apply, G_qq, W G_fq): the mean Gram matrices, and ``apply(a, gram)``, the product that fits
        their layout (one Gram per group, or one per output channel with an activation)."""
        gqq, gfq = self.gqq / max(self.count, 1), self.gfq / max(self.count, 1)
        apply = np.matmul if gqq.ndim == 3 else (lambda a, gram: np.einsum("gok,gokl->gol", a, gram))
        return apply, gqq, apply(self.w, gfq)


def _optimize(layer: _Layer, scale: np.ndarray, qmin, qmax, iters: int, lam: float = 0.1,
              lr: float = 0.1, warmup: float = 0.2) -> tuple:
    """Learned integer weights [g, o, K] and (loss_nearest, loss_learned) on the layer's statistics."""
    # lam / lr were chosen on the SE test network at 4 bits, 200-500 iterations (the paper's
    # lr 1e-3 with 10k-20k iterations is too slow for the default budget of 500)
    w = layer.w
    s = scale.reshape(w.shape[:2] + (1,))
    apply, gqq, target = layer.statistics()

    def recon(wq_float):
        # E||W~ x_q - W x_f||^2 up to the constant E||W x_f||^2 (identical for every candidate)
        return float(np.sum(apply(wq_float, gqq) * wq_float) - 2.0 * np.sum(target * wq_float))

    base = np.floor(w / s)
    rest = w / s - base
    nearest = np.clip(np.rint(w / s), qmin, qmax)
    loss_near = recon(nearest * s)
    sig0 = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    v = np.log(sig0 / (1 - sig0))
    m_t, v_t = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    norm = max(abs(loss_near - recon(w)), 1e-30)  # nearest's excess error over the float weight
    warm = int(warmup * iters)
    # the iterations' products in float32 (twice as fast; the Gram of a 1152-input layer makes
    # them the learning's whole cost); the losses that decide between candidates stay float64
    gqq32, target32 = gqq.astype(np.float32), target.astype(np.float32)
    for it in range(iters):
        sig = 1.0 / (1.0 + np.exp(-v))
        hraw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(hraw, 0.0, 1.0)
        wint = base + h
        inside = (wint >= qmin) & (wint <= qmax)
        wq = np.clip(wint, qmin, qmax) * s
        grad_w = 2.0 * (apply(wq.astype(np.float32), gqq32) - target32).astype(np.float64) / norm
        dh = sig * (1 - sig) * (ZETA - GAMMA) * ((hraw > 0) & (hraw < 1))
        grad_v = grad_w * s * inside * dh
        if it >= warm:
            beta = 20.0 + (2.0 - 20.0) * (it - warm) / max(iters - warm - 1, 1)
            t = 2.0 * h - 1.0
            grad_reg = -lam * beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2.0 / t.size
            grad_v = grad_v + grad_reg * dh
        m_t = b1 * m_t + (1 - b1) * grad_v
        v_t = b2 * v_t + (1 - b2) * grad_v * grad_v
        mh, vh = m_t / (1 - b1 ** (it + 1)), v_t / (1 - b2 ** (it + 1))
        v = v - lr * mh / (np.sqrt(vh) + eps)
    sig = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    learned = np.clip(base + (h >= 0.5), qmin, qmax)
    loss_learned = recon(learned * s)
    return learned, loss_near, loss_learned


def shared_weights(view) -> set:
    """The quantized weights that more than one layer reads (no single layer may learn their rounding)."""
    readers = Counter(l.weight_q for l in view.layers.values())
    return {w for w, n in readers.items() if n > 1}


def _supported_layers(view) -> tuple:
    """({name: _Layer} whose rounding adaround learns, [why each other layer keeps nearest rounding])."""
    shared = shared_weights(view)
    layers, skipped = {}, []
    readers_of = consumers(view.qmodel.graph)
    for name, l in view.layers.items():
        node = view.nodes[name]
        w = view.float_weight[name]
        reason = _Layer.supported(node, w)
        if reason is None and l.weight_q in shared:
            reason = "its quantized weight is shared with another layer"
        if reason is None and np.asarray(view.array(l.weight_q)).dtype.kind not in "iu":
            reason = "weight storage is not an integer array"
        if reason:
            skipped.append(f"{name}: {reason}")
            continue
        layers[name] = _Layer(name, node, w, l)
        act = _activation_after(view, name, readers_of)
        if act is not None:
            layers[name].use_activation(act[0], act[1], view.float_bias.get(name))
    return layers, skipped


def adaround(view, data, iters: int = 500, max_samples: int = 128, max_positions: int = 256, seed: int = 0,
             sequential: bool = True, log=lambda msg: None) -> tuple:
    """Learned rounding for every supported layer of ``view`` (an :class:`onnxopt.quant.view.QdqView`).

    ``sequential`` (the paper's asymmetric reconstruction): layers are learned wave by wave in
    graph order (a wave = the layers with the same number of quantized layers upstream), each
    wave's input statistics taken from the quantized model with every earlier wave's rounding
    (and clipping) already applied, so ``x_q`` carries the upstream quantization error and each
    layer compensates it. Otherwise ``x_q`` is the float input through the layer's own activation
    quantizer and all layers are learned from one pass over the data.

    Returns (new quantized model, report dict). Only the integer weight initializers (and, where
    the clipping search shrinks it, the weight scale with its int32 bias) change.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    layers, skipped = _supported_layers(view)
    if not layers:
        return view.qmodel, {"layers": 0, "skipped": skipped}
    feeds = collect_feeds(data, max_samples)  # every wave reads the same samples: keep them
    seen = sum(feed_samples(f) for f in feeds)
    ref = view.float_reference()
    f_names = {n: view.layer_input(n)[0] for n in layers}
    q_names = {n: view.layer_input(n)[1] for n in layers}
    quantizer = {n: view.input_quantizer(n) for n in layers}
    if sequential:
        depths = layer_depths(view.qmodel, layers)
        waves = [[n for n in layers if depths[n] == d] for d in sorted(set(depths.values()))]
    else:
        waves = [list(layers)]
    model = ModelProto()
    model.CopyFrom(view.qmodel)
    inits = {t.name: t for t in model.graph.initializer}
    per_layer = []
    t_stats = 0.0
    for wave in waves:
        t1 = time.perf_counter()
        fw = sorted({f_names[n] for n in wave})
        s_f = fast_session(truncated(ref, fw))
        if sequential:  # the quantized model as rounded so far, run only up to this wave's inputs
            qw = sorted({q_names[n] for n in wave})
            s_q = fast_session(truncated(QdqView(None, model, view.info).variant(fold_weights=True), qw))
        for feed in feeds:
            outs_f = runtime.run(s_f, feed, fw)
            outs_q = runtime.run(s_q, feed, qw) if sequential else None
            for n in wave:
                xf = outs_f[f_names[n]]
                xq = outs_q[q_names[n]] if sequential else (quantizer[n](xf) if quantizer[n] else xf)
                layers[n].accumulate(xf, xq, rng, max_positions)
        t_stats += time.perf_counter() - t1
        t2 = time.perf_counter()
        rows = [_learn_layer(view, layers.pop(n), inits, iters, skipped, log) for n in wave]
        per_layer += [r for r in rows if r is not None]
        log(f"adaround wave {wave[0]}{'...' if len(wave) > 1 else ''}: statistics {t2 - t1:.1f} s, learning {time.perf_counter() - t2:.1f} s")
    return model, {"layers": len(per_layer), "improved": sum(r["used"] for r in per_layer), "samples": seen,
                   "iters": iters, "sequential": sequential, "waves": len(waves),
                   "seconds_statistics": round(t_stats, 2), "seconds": round(time.perf_counter() - t0, 2),
                   "per_layer": per_layer, "skipped": skipped}


def _learn_layer(view, layer: _Layer, inits: dict, iters: int, skipped: list, log) -> Optional[dict]:
    """Clipping search + learned rounding of one layer from its accumulated statistics; writes
    the result into ``inits`` when it reconstructs better than nearest at the calibration's scale."""
    n, l, w = layer.name, layer.entry, layer.w
    k, per_output = w.shape[2], w.shape[:2] + (1,)
    stored_scale = np.asarray(view.array(l.weight_scale))
    co = w.shape[0] * w.shape[1]
    if stored_scale.size not in (1, co) or l.axis not in (None, 0, 1):
        skipped.append(f"{n}: unexpected scale layout")
        return None
    scale = np.broadcast_to(stored_scale.astype(np.float64).reshape(-1), (co,))
    # the bounds of round(w / s) = q - zp, per channel with asymmetric weights
    zp = np.asarray(view.array(l.weight_zero_point), np.float64)
    zp = zp.reshape(per_output) if zp.size == co else zp.reshape(-1)[0]
    qmin_l, qmax_l = int(l.qmin) - zp, int(l.qmax) - zp
    per_channel = stored_scale.size > 1
    if layer.count < MIN_ROWS_PER_INPUT * k:
        # too few input rows for K free weights per output: learned rounding would fit the
        # calibration samples, not the distribution (a Gemm head on 40 samples).
        # Round to nearest, at the clipping that minimises the weight error itself (data-free).
        new_scale, alpha = weight_clipping(w, scale, qmin_l, qmax_l, per_channel)
        if not np.array_equal(new_scale, scale):
            write_scale(inits, l, stored_scale, new_scale, scale)
            _write_weight(inits, l, layer, np.clip(np.rint(w / new_scale.reshape(per_output)), qmin_l, qmax_l) + zp)
        skipped.append(f"{n}: {layer.count} input rows for {k} inputs per output (< {MIN_ROWS_PER_INPUT}x): "
                       f"nearest rounding, weight-MSE clipping (min ratio {float(np.min(alpha)):.2f})")
        return None
    new_scale, alpha = _best_clipping(layer, scale, qmin_l, qmax_l, per_channel=per_channel)
    learned, loss_near, loss_learned = _optimize(layer, new_scale, qmin_l, qmax_l, iters)
    if not np.array_equal(new_scale, scale):  # compare against nearest at the calibration's scale
        _, loss_near, _ = _optimize(layer, scale, qmin_l, qmax_l, 0)
    keep = loss_learned < loss_near
    row = {"layer": n, "loss_nearest": loss_near, "loss_learned": loss_learned, "used": bool(keep),
           "clip_ratio_min": float(np.min(alpha))}
    if keep:
        if not np.array_equal(new_scale, scale):
            write_scale(inits, l, stored_scale, new_scale, scale)
        _write_weight(inits, l, layer, learned + zp)
        log(f"adaround {n}: loss {loss_near:.4g} -> {loss_learned:.4g}")
    return row


def _write_weight(inits: dict, entry: LayerQuant, layer: _Layer, wint: np.ndarray) -> None:
    """Store integer weights given as [g, o, K] in the layer's initializer layout."""
    store(inits, entry.weight_q, wint if layer.op == "Conv" else (wint[0] if layer.trans_b else wint[0].T))


def store(inits: dict, name: str, value: np.ndarray) -> None:
    """Replace initializer ``name`` by ``value``, cast to its dtype and reshaped to its shape."""
    old = numpy_helper.to_array(inits[name])
    inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value).astype(old.dtype).reshape(old.shape), name))


CLIP_RATIOS = np.linspace(1.0, 0.5, 11)


def _best_clipping(layer: _Layer, scale: np.ndarray, qmin, qmax, per_channel: bool) -> tuple:
    """Per output channel (or per tensor), the clipping ratio of the min-max scale whose
    round-to-nearest weight reconstructs the layer output best on the same statistics (the
    reconstruction loss separates over output channels). Ratio 1 (the calibration's scale) is a
    candidate, so the result is never worse on these statistics."""
    ap, gqq, target = layer.statistics()
    return _clip_search(layer.w, scale, qmin, qmax, per_channel, lambda wq: np.sum(ap(wq, gqq) * wq - 2.0 * target * wq, axis=2))


def weight_clipping(w: np.ndarray, scale: np.ndarray, qmin, qmax, per_channel: bool) -> tuple:
    """Like :func:`_best_clipping`, but minimising the weight's own squared rounding error
    (for layers without enough data to trust their input statistics)."""
    return _clip_search(w, scale, qmin, qmax, per_channel, lambda wq: np.sum((wq - w) ** 2, axis=2))


def _clip_search(w: np.ndarray, scale: np.ndarray, qmin, qmax, per_channel: bool, loss) -> tuple:
    """(new scale [g*o], ratio [g, o]): for each ratio in CLIP_RATIOS the nearest-rounded weight
    ``w`` [g, o, K] at ``scale * ratio`` is scored by ``loss(wq) -> [g, o]``; the best ratio per
    output channel, or the best single ratio for all channels when the scale is per tensor."""
    g, o, _ = w.shape
    base = scale.reshape(g, o, 1)
    losses = np.stack([loss(np.clip(np.rint(w / (base * a)), qmin, qmax) * base * a) for a in CLIP_RATIOS])  # [r, g, o]
    best = np.argmin(losses, axis=0) if per_channel else np.full((g, o), int(np.argmin(losses.sum(axis=(1, 2)))))
    alpha = CLIP_RATIOS[best]
    return (base[..., 0] * alpha).reshape(-1), alpha


def write_scale(inits: dict, entry: LayerQuant, old_arr: np.ndarray, new_scale: np.ndarray, old_scale: np.ndarray) -> None:
    """Store the new weight scale; an int32 bias (scale s_in * s_w) is re-quantized to match."""
    t = inits[entry.weight_scale]
    value = new_scale.astype(old_arr.dtype).reshape(old_arr.shape) if old_arr.size > 1 else np.asarray(new_scale.reshape(-1)[0], old_arr.dtype)
    t.CopyFrom(numpy_helper.from_array(value, t.name))
    if entry.bias_is_int:
        bq_t, bs_t = inits[entry.bias_q], inits[entry.bias_scale]
        bs = numpy_helper.to_array(bs_t).astype(np.float64)
        b = numpy_helper.to_array(bq_t).astype(np.float64) * bs
        ratio = np.broadcast_to((new_scale / old_scale).reshape(-1), bs.shape) if bs.size > 1 else (new_scale / old_scale).reshape(-1)[0]
        bs_new = (bs * ratio).astype(numpy_helper.to_array(bs_t).dtype)
        bq_new = np.clip(np.rint(b / bs_new.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        bs_t.CopyFrom(numpy_helper.from_array(bs_new, bs_t.name))
        bq_t.CopyFrom(numpy_helper.from_array(bq_new, bq_t.name))


def _activation_after(view, layer: str, readers_of: dict) -> Optional[tuple]:
    """(lo, hi) of a Relu / Clip(0, hi) that alone reads ``layer``'s output, else None."""
    readers = readers_of.get(view.nodes[layer].output[0], [])
    if len(readers) != 1:
        return None
    r = readers[0]
    if r.op_type == "Relu":
        return 0.0, np.inf
    if r.op_type == "Clip" and len(r.input) >= 2:
        try:
            lo = float(view.array(r.input[1])) if r.input[1] else -np.inf
            hi = float(view.array(r.input[2])) if len(r.input) > 2 and r.input[2] else np.inf
        except KeyError:
            return None
        return (lo, hi) if lo == 0.0 else None
    return None
