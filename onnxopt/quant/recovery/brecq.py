"""Block reconstruction of the weight rounding (BRECQ, Li et al. 2021, "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction"), on calibration data only, with torch.

:mod:`onnxopt.quant.recovery.adaround` learns each layer's rounding against that layer's own output, which
is linear in the weights. Low-bit weights (4 bits) leave errors that only the following layers and
their activations reveal: a rounding that is best for one layer can be worse for the block. Here
the rounding of every layer of a *block* is learned together, against the block's float output:

    minimise  E || B_q(x_q; h(V)) - B_f(x_f) ||^2 / E || B_q(x_q; nearest) - B_f(x_f) ||^2
              + lam * mean(1 - |2 h(V) - 1|^beta)

``B_q`` is the block of the Q/DQ model (its activation quantizers included, scales fixed, a
straight-through estimator through them), run as a torch module built from the block's ONNX nodes
(:class:`onnxopt.torch.convert.OnnxModule`); its weights are ``s * clip(floor(W / s) + h(V))``
with AdaRound's rectified sigmoid ``h``. ``x_q`` is the block's input in the Q/DQ model with every
earlier block's learned rounding applied (the asymmetric reconstruction), ``B_f(x_f)`` the block's
output in the float reference. ``beta`` anneals from 20 to 2 after a warm-up without the
regulariser; what is still undecided then is hardened in stages (:meth:`_Block._harden`). The
weight scales and biases are learned with the rounding. Before learning, each layer's weight
scale takes the weight-MSE clipping ratio (the scale initialisation both papers use at 4 bits);
an int32 bias is re-quantized with it.

Blocks: the graph is cut where a single float tensor carries everything downstream (a block
boundary in ResNet/MobileNet-style networks: after each residual Add, between the layers of a
block without a skip). Consecutive segments join until a block holds ``block_layers`` quantized
layers; a segment with more (a residual block) stays whole. A block keeps its learned rounding
only when it reconstructs the block output better than the rounding it started from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ... import model_io, runtime
from ...data import collect_feeds, feed_samples
from ...errors import OnnxoptError, require
from ...ir.proto import infer_shapes, producers, value_infos
from ..view import LayerQuant, QdqView, along_axis, channel_rows, fast_session, truncated
from .adaround import GAMMA, ZETA, shared_weights, store, weight_clipping, write_scale
from .bias import BIAS_SAMPLES, empirical_bias_correction


def _constant_names(model: ModelProto) -> set:
    """Initializers and every tensor computed from constants only (weight DQ outputs, Constant nodes)."""
    const = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(i in const for i in node.input if i):
            const.update(node.output)
    return const


def find_blocks(model: ModelProto, layers, block_layers: int) -> list:
    """[(input tensor, output tensor, [layer names])] in graph order; see the module doc."""
    nodes = list(model.graph.node)
    const = _constant_names(model)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        for t in list(node.input) + sorted(model_io.subgraph_reads(node)):  # If/Loop bodies read outer tensors
            if t and t not in const:
                last_use[t] = i
    for o in model.graph.output:
        last_use[o.name] = len(nodes)
    producer = producers(model.graph)
    inputs = [i.name for i in model.graph.input if i.name not in const]
    live = {t for t in inputs if t in last_use}
    cuts = [(-1, inputs[0])] if len(inputs) == 1 else []
    for i, node in enumerate(nodes):
        live.update(o for o in node.output if o not in const and last_use.get(o, -1) > i)
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1:
            (t,) = live
            if getattr(producer.get(t), "op_type", None) not in ("QuantizeLinear", "DequantizeLinear") and (not cuts or cuts[-1][1] != t):
                cuts.append((i, t))
    wanted = set(layers)
    blocks, start, pending = [], None, []
    for (a, t_a), (b, t_b) in zip(cuts, cuts[1:]):
        start = t_a if start is None else start
        pending += [n.name for n in nodes[a + 1: b + 1] if n.name in wanted]
        if len(pending) >= block_layers:
            blocks.append((start, t_b, pending))
            start, pending = None, []
        elif not pending:
            start = None        # nothing to learn yet: the block starts at the next cut
    if pending and cuts:
        blocks.append((start, cuts[-1][1], pending))
    return blocks


def _submodel(model: ModelProto, t_in: str, t_out: str, value_info: dict) -> ModelProto:
    """The nodes that compute ``t_out`` from ``t_in`` (and constants) as a model."""
    producer = producers(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    needed, taken, used_inits, stack, seen = [], set(), set(), [t_out], set()
    while stack:
        t = stack.pop()
        if t in seen or t == t_in or not t:
            continue
        seen.add(t)
        if t in inits:
            used_inits.add(t)
            continue
        node = producer[t]
        if id(node) in taken:
            continue
        taken.add(id(node))
        needed.append(node)
        stack.extend(node.input)
    needed.sort(key=lambda n: order[id(n)])
    vi_in = value_info.get(t_in) or helper.make_tensor_value_info(t_in, TensorProto.FLOAT, None)
    vi_out = value_info.get(t_out) or helper.make_tensor_value_info(t_out, TensorProto.FLOAT, None)
    graph = helper.make_graph(needed, "block", [vi_in], [vi_out], [inits[n] for n in sorted(used_inits)])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def _mse_scale(w: np.ndarray, scale: np.ndarray, axis: Optional[int], lo, hi) -> np.ndarray:
    """Per channel (or per tensor), the scale ``scale * ratio`` whose nearest rounding of ``w``
    has the least squared error (adaround's data-free clipping search); ratio 1 is a candidate.
    ``lo`` / ``hi``: the integer bounds, per channel ([C]) with asymmetric weights."""
    per_channel = scale.size > 1
    wc = channel_rows(w.astype(np.float64), axis if per_channel else None)
    lo, hi = (np.reshape(b, (1, -1, 1)) if np.size(b) > 1 else b for b in (lo, hi))
    new, _ = weight_clipping(wc[None], scale.reshape(-1).astype(np.float64), lo, hi, per_channel)
    return new


def _value_bounds(inits: dict, l: LayerQuant, ndim: int, axis: Optional[int]) -> tuple:
    """(lo, hi, zp), shaped along ``axis`` for an ``ndim`` weight: the bounds of ``round(w / s)``,
    which is ``q - zp`` for a stored ``q`` in [qmin, qmax] (symmetric weights: zp 0)."""
    zp = along_axis(numpy_helper.to_array(inits[l.weight_zero_point]).astype(np.float64), ndim, axis)
    return int(l.qmin) - zp, int(l.qmax) - zp, zp


def _stack(sess, feeds: list, name: str) -> np.ndarray:
    return np.concatenate([runtime.run(sess, f, [name])[name] for f in feeds])


MAX_SAMPLES = 256   # calibration samples reconstructed on, unless the caller gives a number (qdq.calib_samples, --calib-samples)


@dataclass(frozen=True)
class BrecqConfig:
    """How :func:`brecq` learns; the defaults are what the qdq pass uses (``iters`` from
    ``qdq.adaround_iters``, ``max_samples`` from ``qdq.calib_samples`` or the data's limit).

    ``block_layers``: quantized layers a block gathers at least; ``batch``: images per iteration
    at 28x28 outputs (fewer for larger ones, :func:`_batch_for`); ``lam`` / ``lr``: the rounding
    regulariser's weight and the rounding's learning rate; ``bias_lr`` / ``scale_lr``: learning
    rates of the biases and of the per-channel weight scales (0: not learned); ``warmup``: share
    of ``iters`` without the regulariser; ``harden_stages`` / ``harden_iters``: progressive
    hardening (``harden_iters`` None: a tenth of ``iters``, at least 10)."""

    iters: int = 500
    max_samples: int = MAX_SAMPLES
    block_layers: int = 3
    batch: int = 32
    lam: float = 2.0
    lr: float = 0.1
    bias_lr: float = 1e-3
    warmup: float = 0.2
    seed: int = 0
    harden_stages: int = 4
    harden_iters: Optional[int] = None
    scale_lr: float = 1e-3


def brecq(view: QdqView, data, config: BrecqConfig = BrecqConfig(), float_model: Optional[ModelProto] = None,
          log=lambda msg: None) -> tuple:
    """Block-reconstructed rounding for the layers of ``view`` (an :class:`onnxopt.quant.view.QdqView`).

    With ``float_model`` (the model ``view`` was quantized from), the biases are first corrected
    empirically (:func:`onnxopt.quant.recovery.bias.empirical_bias_correction`, layer by layer): a
    4-bit depthwise kernel whose weights nearly cancel can shift a channel's pre-activation into a
    following ReLU6's flat region, where the block loss has no gradient to learn from.
    ``config.bias_lr > 0`` also learns each layer's bias with its rounding (AdaQuant's bias tuning,
    Hubara et al. 2021); ``config.scale_lr > 0`` each layer's weight scale, per channel, as
    ``s * exp(t)`` on the fixed integer grid.

    ``lam`` / ``lr`` are set for a few hundred iterations: the papers' 0.01 / 1e-3 assume 10-20k,
    and at a few hundred leave so much of ``h`` undecided that the hard rounding is worse than
    nearest. All the data given is used, up to ``max_samples``: the late, small blocks fit the
    samples they learn on, the more so the fewer there are (``tools/bench_recovery.py holdout``).
    Each block's input and output are held for every sample.

    Returns (new quantized model, report dict). Only the integer weight initializers, the weight
    scales and the biases change.
    """
    torch = require("torch", "qdq.rounding=brecq", "pip install torch (or use qdq.rounding=adaround, which needs none)")

    t0 = time.perf_counter()
    cfg = config
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ModelProto()
    model.CopyFrom(view.qmodel)
    inits = {t.name: t for t in model.graph.initializer}
    learnable, skipped = _learnable_layers(view, inits)
    _init_weight_scales(view, learnable, inits)
    if float_model is not None:
        model, _ = empirical_bias_correction(float_model, model, view.info, data, BIAS_SAMPLES, log)
        inits = {t.name: t for t in model.graph.initializer}
    blocks = find_blocks(model, learnable, cfg.block_layers)
    in_blocks = {n for _, _, names in blocks for n in names}
    skipped += [f"{n}: after the last single-tensor cut (several graph outputs?): nearest rounding" for n in learnable if n not in in_blocks]
    feeds = collect_feeds(data, cfg.max_samples)
    samples = sum(feed_samples(f) for f in feeds)
    ref = view.float_reference()
    value_info = value_infos(infer_shapes(model)[0])   # the block models' input/output types, where known
    value_info.update({v.name: v for v in list(model.graph.input) + list(model.graph.output)})
    rows = []
    for t_in, t_out, names in blocks:
        tb = time.perf_counter()
        built = _block_module(view, model, ref, feeds, samples, value_info, t_in, t_out)
        if isinstance(built, str):  # the block's layers keep nearest rounding
            skipped.extend(f"{n}: its block {t_in} -> {t_out} {built}: nearest rounding" for n in names)
            log(f"brecq block {t_in} -> {t_out}: skipped, {built}")
            continue
        row = _reconstruct(_Block(torch, *built, cfg, gen), view, model, learnable, inits, names, skipped, log,
                           f"{t_in} -> {t_out}", tb)
        if row is not None:
            rows.append(row)
    return model, {"blocks": len(rows), "improved": sum(r["used"] for r in rows), "samples": samples, "iters": cfg.iters,
                   "seconds": round(time.perf_counter() - t0, 2), "per_block": rows, "skipped": skipped}


def _block_module(view: QdqView, model: ModelProto, ref, feeds: list, samples: int, value_info: dict, t_in: str, t_out: str):
    """(torch module of the block t_in -> t_out, its quantized inputs, float outputs), or a reason
    string why the block cannot be reconstructed."""
    from ...torch.convert import OnnxModule
    try:
        module = OnnxModule(_submodel(model, t_in, t_out, value_info), quant_mode="fixed", train_scales=False)
    except OnnxoptError as exc:  # e.g. an If inside the block
        return f"cannot run in torch ({exc.message})"
    xq, yf = _block_data(view, model, ref, feeds, t_in, t_out)
    if xq.ndim == 0 or yf.ndim == 0 or xq.shape[0] != samples or yf.shape[0] != samples:
        return "does not keep the samples on axis 0 (a squeezed batch?)"  # the batches would mix samples
    return module, xq, yf


def _reconstruct(block: "_Block", view: QdqView, model: ModelProto, learnable: dict, inits: dict, names: list,
                 skipped: list, log, where: str, tb: float) -> Optional[dict]:
    """Learn the rounding of the block's layers; keep it when the block loss falls. The report row,
    or None when no layer of the block can learn."""
    loss_start = block.loss()
    for name in names:
        if not block.add_layer(name, learnable[name], view.float_weight[name], inits):
            skipped.append(f"{name}: its weight Q/DQ was not recognised by the torch converter")
    if not block.soft:
        return None
    undecided, loss_soft = block.learn(model, learnable, loss_start)
    loss_learned = block.loss()
    keep = loss_learned < loss_start
    if keep:
        block.write(inits, learnable)
    log(f"brecq block {where} ({len(block.soft)} layers): mse {loss_start:.4g} -> {loss_learned:.4g}"
        f"{'' if keep else ' (kept the start)'} (soft {loss_soft:.4g}, {100 * undecided:.0f} % undecided, batch {block.batch}), "
        f"{time.perf_counter() - tb:.1f} s")
    # undecided: the share of h(V) still between 0.01 and 0.99 when learning stops, rounded at
    # 0.5 for the hard loss; the soft loss is what the relaxation reached before that
    return {"block": where, "layers": list(block.soft), "loss_start": loss_start, "loss_soft": loss_soft,
            "loss_learned": loss_learned, "undecided": round(undecided, 3), "used": bool(keep), "batch": block.batch,
            "seconds": round(time.perf_counter() - tb, 1)}


def _learnable_layers(view: QdqView, inits: dict) -> tuple:
    """({layer: LayerQuant} whose rounding can be learned, [reasons the others cannot])."""
    shared = shared_weights(view)
    learnable, skipped = {}, []
    for name, l in view.layers.items():
        arr = numpy_helper.to_array(inits[l.weight_q])
        if l.weight_q in shared:
            skipped.append(f"{name}: its quantized weight is shared with another layer")
        elif arr.dtype not in (np.int8, np.uint8) or l.axis not in (None, 0, 1):
            skipped.append(f"{name}: weight storage {arr.dtype} / axis {l.get('axis')} is not handled")
        else:
            learnable[name] = l
    return learnable, skipped


def _init_weight_scales(view: QdqView, learnable: dict, inits: dict) -> None:
    """Scale initialisation (weight-MSE clipping) and nearest rounding at that scale, in ``inits``."""
    for name, l in learnable.items():
        w = view.float_weight[name]
        old = numpy_helper.to_array(inits[l.weight_scale])
        axis = l.axis if old.size > 1 else None
        lo, hi, _ = _value_bounds(inits, l, 1, 0)
        new = _mse_scale(w, old, axis, lo, hi)
        if not np.array_equal(new, old.reshape(-1).astype(np.float64)):
            write_scale(inits, l, old, new, old.reshape(-1).astype(np.float64))
        s = along_axis(numpy_helper.to_array(inits[l.weight_scale]), w.ndim, axis)
        lo, hi, zp = _value_bounds(inits, l, w.ndim, axis)
        store(inits, l.weight_q, np.clip(np.rint(w / s), lo, hi) + zp)


def _block_data(view: QdqView, model: ModelProto, ref: ModelProto, feeds: list, t_in: str, t_out: str) -> tuple:
    """(the block's input in the Q/DQ model as rounded so far, its output in the float reference), over ``feeds``."""
    if t_in in {i.name for i in model.graph.input}:
        xq = np.concatenate([f[t_in] for f in feeds])
    else:
        qview = QdqView(None, model, view.info).variant(fold_weights=True)
        xq = _stack(fast_session(truncated(qview, [t_in])), feeds, t_in)
    return xq, _stack(fast_session(truncated(ref, [t_out])), feeds, t_out)


class _Block:
    """One block's learning: its torch module (Q/DQ included, scales fixed), data, the soft
    rounding ``h(V)`` of each layer's weight, the learned scales and biases, and their optimiser."""

    def __init__(self, torch, module, xq: np.ndarray, yf: np.ndarray, cfg: BrecqConfig, gen):
        self.torch, self.module, self.cfg, self.gen = torch, module, cfg, gen
        module.train()
        for p in module.parameters():
            p.requires_grad_(False)
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(xq)), torch.from_numpy(np.ascontiguousarray(yf))
        self.soft, self.log_scales, self.bounds, self.states = {}, {}, {}, {}
        self.biases = {}   # layer -> (initializer name, parameter): learned with the rounding (the block's mean error)
        self.batch = _batch_for(self.y, cfg.batch)

    def loss(self, chunk: int = 32) -> float:
        """Mean squared error of the block output over all its samples."""
        torch, module, x, y = self.torch, self.module, self.x, self.y
        with torch.no_grad():
            module.eval()
            err = sum(float(((module(x[i:i + chunk]) - y[i:i + chunk]) ** 2).sum()) for i in range(0, len(x), chunk))
            module.train()
        return err / y.numel()

    def add_layer(self, name: str, l: LayerQuant, w_float: np.ndarray, inits: dict) -> bool:
        """Replace the layer's weight in the module by its soft rounding; False when the torch
        converter did not recognise the weight's Q/DQ."""
        torch = self.torch
        wq = self.module.weight_quants.get(l.weight_q)
        if wq is None:
            return False
        w = torch.from_numpy(w_float.astype(np.float32))
        s_b = torch.from_numpy(along_axis(numpy_helper.to_array(inits[l.weight_scale]).astype(np.float32), w.ndim, wq.axis))
        base = torch.floor(w / s_b)
        rest = (w / s_b - base).clamp(0, 1)
        sig0 = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        v = torch.nn.Parameter(torch.log(sig0 / (1 - sig0)))
        self.bounds[name] = lo, hi, _ = tuple(torch.from_numpy(np.asarray(b, np.float32)) for b in _value_bounds(inits, l, w.ndim, wq.axis))
        self.soft[name] = (wq, base, s_b, v)
        if self.cfg.scale_lr > 0:
            self.log_scales[name] = torch.nn.Parameter(torch.zeros_like(s_b))
        state = {"hard": False, "fixed": torch.zeros_like(v, dtype=torch.bool), "value": torch.zeros_like(v)}
        self.module.weight_override[wq.latent] = _soft_weight(torch, base, s_b, v, lo, hi, state, self.log_scales.get(name))
        self.states[name] = state
        return True

    def _optimizer(self, model: ModelProto, learnable: dict):
        cfg, module = self.cfg, self.module
        groups = [{"params": [v for (_, _, _, v) in self.soft.values()], "lr": cfg.lr}]
        if self.log_scales:
            groups.append({"params": list(self.log_scales.values()), "lr": cfg.scale_lr})
        if cfg.bias_lr > 0:
            node_of = {nd.name: nd for nd in model.graph.node}
            for name in self.soft:
                l, nd = learnable[name], node_of[name]
                # a float bias is read by name (bias correction may have given it a new one)
                b_name = l.bias_q if l.bias_is_int else (nd.input[2] if len(nd.input) > 2 else None)
                if b_name and b_name in module.param_names:
                    self.biases[name] = (b_name, module.parameter_by_onnx_name(b_name).requires_grad_(True))
            if self.biases:
                groups.append({"params": [p for _, p in self.biases.values()], "lr": cfg.bias_lr})
        return self.torch.optim.Adam(groups)

    def learn(self, model: ModelProto, learnable: dict, loss_start: float) -> tuple:
        """Learn the soft rounding (with the regulariser after the warm-up), then harden it in
        stages; returns (share of h still undecided before hardening, the soft loss)."""
        torch, cfg, module, x, y, soft = self.torch, self.cfg, self.module, self.x, self.y, self.soft
        opt = self._optimizer(model, learnable)
        norm = max(loss_start, 1e-30)
        warm = int(cfg.warmup * cfg.iters)
        n = len(x)

        def step(beta: Optional[float] = None) -> None:
            """One Adam step on a random batch; with ``beta``, plus the rounding regulariser."""
            idx = torch.randint(0, n, (min(self.batch, n),), generator=self.gen)
            loss = ((module(x[idx]) - y[idx]) ** 2).mean() / norm
            if beta is not None:
                loss = loss + cfg.lam * sum((1 - (2 * _h(torch, v) - 1).abs() ** beta).mean() for (_, _, _, v) in soft.values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        for it in range(cfg.iters):
            step(20.0 + (2.0 - 20.0) * (it - warm) / max(cfg.iters - warm - 1, 1) if it >= warm else None)
        undecided = float(sum(((_h(torch, v) > 0.01) & (_h(torch, v) < 0.99)).sum() for (_, _, _, v) in soft.values())
                          / sum(v.numel() for (_, _, _, v) in soft.values()))
        loss_soft = self.loss()
        self._harden(step)
        return undecided, loss_soft

    def _harden(self, step) -> None:
        """Progressive hardening in ``harden_stages`` stages of ``harden_iters`` iterations: fix the most
        decided half of the still-soft rounding, let the rest (and the biases) make up for it, repeat;
        the last stage fixes all. Rounding every h at 0.5 at once undoes what the undecided ones were
        compensating for."""
        torch, cfg = self.torch, self.cfg
        harden_iters = max(10, cfg.iters // 10) if cfg.harden_iters is None else cfg.harden_iters
        for stage in range(cfg.harden_stages):
            last = stage == cfg.harden_stages - 1
            for name, (_, _, _, v) in self.soft.items():
                st = self.states[name]
                dist = (_h(torch, v) - 0.5).abs().detach()
                free = ~st["fixed"]
                fix = free if last or int(free.sum()) <= 1 else free & (dist >= _median(torch, dist[free]))
                # the fixed value is kept, not re-read from v: Adam's momentum still moves a v without gradient
                st["value"] = torch.where(fix, (v.detach() >= 0).to(st["value"].dtype), st["value"])
                st["fixed"] = st["fixed"] | fix
            for _ in range(harden_iters):
                step()
        for st in self.states.values():
            st["hard"] = True

    def write(self, inits: dict, learnable: dict) -> None:
        """Store the learned integers, weight scales and biases in ``inits``."""
        torch = self.torch
        for name, (_, base, s_b, v) in self.soft.items():
            lo, hi, zp = self.bounds[name]
            ints = torch.clamp(base + _hard(torch, v, self.states[name]), lo, hi) + zp
            store(inits, learnable[name].weight_q, ints.numpy())
            if name in self.log_scales:   # before the biases: an int32 bias is re-quantized with the new scale
                old = numpy_helper.to_array(inits[learnable[name].weight_scale])
                new = (s_b * torch.exp(self.log_scales[name].detach())).numpy().astype(np.float64).reshape(-1)
                write_scale(inits, learnable[name], old, new, old.reshape(-1).astype(np.float64))
        for name, (b_name, p) in self.biases.items():
            b = p.detach().numpy().astype(np.float64)
            if learnable[name].bias_is_int:   # int32 with scale s_in * s_w, as the module rounds it
                bs = numpy_helper.to_array(inits[learnable[name].bias_scale]).astype(np.float64)
                b = np.clip(np.rint(b / bs), -(2**31), 2**31 - 1)
            store(inits, b_name, b)


def _batch_for(y, batch: int) -> int:
    """Images per iteration: ``batch`` up to 28x28 outputs, fewer for larger ones (at least 8), so
    an iteration sees about as many output positions as ``batch`` images at 28x28: an iteration's
    cost grows with its output positions, and the time is better spent on more iterations, which
    the rounding needs to settle."""
    positions = int(np.prod(y.shape[2:])) if y.ndim > 2 else 1
    return max(min(8, batch), min(batch, batch * 28 * 28 // max(positions, 1)))


def _median(torch, x):
    """``torch.quantile(x, 0.5)`` (the mean of the two middle values, by lerp), which refuses
    tensors over 2^24 elements (a 4096x4096 MatMul)."""
    xs = x.flatten().sort().values
    n = xs.numel()
    return torch.lerp(xs[(n - 1) // 2], xs[n // 2], 0.5)


def _h(torch, v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _hard(torch, v, state):
    """The 0/1 rounding: the value fixed while hardening, else the sign of ``v``."""
    return torch.where(state["fixed"], state["value"], (v.detach() >= 0).to(state["value"].dtype))


def _soft_weight(torch, base, s_b, v, lo, hi, state: dict, log_scale=None):
    """The dequantized weight of a learned rounding: soft while learning, 0/1 once ``state['hard']``;
    with ``log_scale``, the scale ``s_b`` is learned too, as ``s_b * exp(log_scale)``. ``lo`` /
    ``hi``: the bounds of ``round(w / s)`` (tensors along the channel axis when asymmetric)."""
    def weight():
        h = _hard(torch, v, state) if state["hard"] else torch.where(state["fixed"], state["value"], _h(torch, v))
        scale = s_b if log_scale is None else s_b * torch.exp(log_scale)
        return torch.clamp(base + h, lo, hi) * scale
    weight.state = state
    return weight
