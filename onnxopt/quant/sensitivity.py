"""Per-layer quantization sensitivity of a QDQ model, derived from one calibration.

Given the float model, the fully quantized model and the qdq pass's ``info`` (layout in
``notes/contracts.md``), :class:`QdqView` derives *variants* of the quantized model without
recalibrating: a layer is put back in float by giving it its float weight (and float bias where
the bias was int32) and by wiring its data input to the tensor before its activation
Q -> DQ pair (the pair itself stays for any other reader). Every variant therefore uses exactly
the scales of the one calibration.

For each quantized layer ``L`` two variants are measured against the float reference (the
quantized graph with every layer in float and every activation Q/DQ bypassed -- the same graph
the quantizer prepared, so tensor names and opset match):

* ``only``: only ``L`` quantized (its weight and its input activation) -- the error ``L`` alone adds;
* ``all_but``: everything quantized except ``L`` -- how much keeping ``L`` in float recovers.

Error metric (all model outputs, concatenated over the evaluation samples):
``rel = ||y_q - y_f|| / ||y_f||`` and ``SQNR = -20 log10(rel)`` dB. Activation Q/DQ pairs that do
not feed a weighted layer (e.g. on residual Adds) are counted in the fully quantized model and in
``all_but``, never in ``only``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
from onnx import ModelProto, numpy_helper

from .. import model_io, runtime
from ..data import feed_samples
from ..errors import DataError, OnnxoptError
from .quantize import with_clip_bounds


def _const_arrays(model: ModelProto) -> dict:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
    return out


def along_axis(a: np.ndarray, ndim: int, axis: Optional[int]) -> np.ndarray:
    """A per-channel vector ``a`` (a quantization scale or zero point) shaped to broadcast along
    ``axis`` of a rank-``ndim`` tensor; a per-tensor one (one element, or no axis) as it is."""
    if axis is None or a.size == 1:
        return a.reshape(()) if a.size == 1 else a
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def fast_session(model: ModelProto):
    """An onnxruntime session with every graph optimization off, as the verification oracle.

    Not even the basic level: with activation Q/DQ pairs in the graph it changes the numbers
    (measured: 0.039 -> 0.067 relative output error on the SE test network once the weights are
    float constants). Speed comes from folding the weight DQ nodes ourselves
    (``QdqView.variant(fold_weights=True)``): the same float32 weights bit for bit (outputs agree
    to float rounding, onnxruntime prepacking constant weights)."""
    return runtime.session(model, optimize=False)


def rel_error(ref: list, cand: list) -> float:
    """||cand - ref|| / ||ref|| over lists of output arrays."""
    num = sum(float(np.sum((c.astype(np.float64) - r.astype(np.float64)) ** 2)) for r, c in zip(ref, cand))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return math.sqrt(num / max(den, 1e-30))


def sqnr_db(rel: float) -> float:
    return float("inf") if rel <= 0 else -20.0 * math.log10(rel)


class QdqView:
    """The quantized model plus what is needed to derive per-layer variants of it."""

    def __init__(self, float_model: ModelProto, qmodel: ModelProto, info: dict):
        self.qmodel = qmodel
        self.info = info
        self.layers = {l["node"]: l for l in info.get("layers", [])}
        self.acts = {a["dq_node"]: a for a in info.get("activations", [])}
        self.nodes = {n.name: n for n in qmodel.graph.node}
        missing = [n for n in self.layers if n not in self.nodes]
        if missing:
            raise OnnxoptError(f"the quantization info names layer '{missing[0]}', which is not in the quantized model.",
                               "pass the info returned together with this quantized model")
        self.dq_output_to_act = {}
        for n in qmodel.graph.node:
            if n.op_type == "DequantizeLinear" and n.name in self.acts:
                self.dq_output_to_act[n.output[0]] = self.acts[n.name]
        self.q_consts = _const_arrays(qmodel)
        # the clips lite removed and qdq calibrated with (quantize.with_clip_bounds): every variant,
        # the float reference included, has them, so that it computes what the Q/DQ model approximates
        capped = set(info.get("clip_bounds", ()))
        self.clip_bounds = {t: b for t, b in model_io.activation_bounds(qmodel).items() if t in capped}
        f_consts = _const_arrays(float_model) if float_model is not None else {}
        # The float layer of each quantized one: the float model's node reading the float weight
        # (its bias is the float bias, which recovery may since have corrected in the QDQ model).
        f_layer = {}
        if float_model is not None:
            for n in float_model.graph.node:
                if len(n.input) > 1 and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                    f_layer.setdefault(n.input[1], n)
        self.float_weight = {}
        self.float_bias = {}  # layer -> float bias array, or None when the float layer has none
        for name, l in self.layers.items():
            t = f_consts.get(l["float_weight"])
            self.float_weight[name] = numpy_helper.to_array(t) if t is not None else self.dequantized_weight(name)
            fnode = f_layer.get(l["float_weight"])
            if fnode is not None and fnode.op_type == l["op"]:
                b = fnode.input[2] if len(fnode.input) > 2 and fnode.input[2] else None
                if b is None:
                    self.float_bias[name] = None
                elif b in f_consts:
                    self.float_bias[name] = numpy_helper.to_array(f_consts[b])
            elif l.get("bias_is_int"):
                self.float_bias[name] = self.dequantized_int_bias(name)

    # ------------------------------------------------------------------ arrays
    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.q_consts[name])

    def dequantized_weight(self, layer: str) -> np.ndarray:
        l = self.layers[layer]
        wq = self.array(l["weight_q"]).astype(np.float64)
        s = self.array(l["weight_scale"]).astype(np.float64)
        zp = self.array(l["weight_zero_point"]).astype(np.float64)
        s, zp = along_axis(s, wq.ndim, l.get("axis")), along_axis(zp, wq.ndim, l.get("axis"))
        return ((wq - zp) * s).astype(np.float32)

    def dequantized_int_bias(self, layer: str) -> np.ndarray:
        l = self.layers[layer]
        return (self.array(l["bias_q"]).astype(np.float64) * self.array(l["bias_scale"]).astype(np.float64)).astype(np.float32)

    def layer_input(self, layer: str) -> tuple:
        """(float tensor, tensor the quantized layer reads) of ``layer``'s data input."""
        node = self.nodes[layer]
        x = node.input[0]
        act = self.dq_output_to_act.get(x)
        return (act["tensor"] if act else x), x

    def input_quantizer(self, layer: str):
        """``x -> DQ(Q(x))`` with the scale/zero point of ``layer``'s input activation (None when unquantized)."""
        act = self.dq_output_to_act.get(self.nodes[layer].input[0])
        if act is None:
            return None
        s = float(self.array(act["scale"]))
        zp_arr = self.array(act["zero_point"])
        zp = float(zp_arr)
        info = np.iinfo(zp_arr.dtype)
        lo, hi = float(info.min), float(info.max)
        bits = int(self.info.get("activation_bits", 8))
        if bits < 8:  # restricted range (the quantizer clips before Q)
            if zp_arr.dtype == np.uint8:
                lo, hi = 0.0, float(2 ** bits - 1)
            else:
                lo, hi = -float(2 ** (bits - 1) - 1), float(2 ** (bits - 1) - 1)

        def fq(x):
            # round half to even, as QuantizeLinear does
            return ((np.clip(np.rint(x / s) + zp, lo, hi) - zp) * s).astype(np.float32)

        return fq

    # ---------------------------------------------------------------- variants
    def variant(self, float_layers: Iterable[str] = (), float_inputs: Iterable[str] = (), bypass_all: bool = False,
                keep_acts_of: Optional[set] = None, fold_weights: bool = False) -> ModelProto:
        """A copy of the quantized model with ``float_layers`` given float weights/biases and
        ``float_inputs`` (layer names) reading their float input. ``bypass_all`` removes every
        activation Q/DQ except those feeding layers in ``keep_acts_of``. ``fold_weights`` replaces
        weight DQ nodes by their float output (same values; for fast evaluation only)."""
        m = ModelProto()
        m.CopyFrom(self.qmodel)
        g = m.graph
        float_layers, float_inputs = set(float_layers), set(float_inputs)
        by_name = {n.name: n for n in g.node}
        new_inits = []
        for name in float_layers:
            node = by_name[name]
            w_name = f"{name}__float_weight"
            new_inits.append(numpy_helper.from_array(self.float_weight[name], w_name))
            node.input[1] = w_name
            if name in self.float_bias:
                if self.float_bias[name] is None:
                    del node.input[2:]
                else:
                    b_name = f"{name}__float_bias"
                    new_inits.append(numpy_helper.from_array(self.float_bias[name], b_name))
                    while len(node.input) < 3:
                        node.input.append("")
                    node.input[2] = b_name
        for name in float_inputs:
            node = by_name[name]
            act = self.dq_output_to_act.get(node.input[0])
            if act is not None:
                node.input[0] = act["tensor"]
        if bypass_all:
            keep = set()
            for name in keep_acts_of or ():
                keep.add(by_name[name].input[0])
            rewire = {dq: a["tensor"] for dq, a in self.dq_output_to_act.items() if dq not in keep}
            for node in g.node:
                if node.op_type in ("QuantizeLinear",):
                    continue
                for i, inp in enumerate(node.input):
                    if inp in rewire:
                        node.input[i] = rewire[inp]
            for o in g.output:
                if o.name in rewire:  # a graph output that is a DQ output: leave it (rare, kept quantized)
                    pass
        g.initializer.extend(new_inits)
        if fold_weights:
            self._fold_weight_dq(m)
        _prune(m)
        return with_clip_bounds(m, self.clip_bounds)

    def _fold_weight_dq(self, m: ModelProto) -> None:
        """Replace every weight DequantizeLinear by a float initializer of its (identical) output,
        so that evaluating many variants does not dequantize every weight on every run."""
        if not hasattr(self, "_deq_cache"):
            self._deq_cache = {}
        weight_q = {l["weight_q"]: name for name, l in self.layers.items()}
        keep, inits = [], []
        for node in m.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in weight_q:
                out = node.output[0]
                if out not in self._deq_cache:
                    layer = weight_q[node.input[0]]
                    # float32 (q - zp) * s, the arithmetic DequantizeLinear itself does
                    l = self.layers[layer]
                    q = self.array(l["weight_q"]).astype(np.int32)
                    s_ = self.array(l["weight_scale"]).astype(np.float32)
                    zp = self.array(l["weight_zero_point"]).astype(np.int32)
                    s_, zp = along_axis(s_, q.ndim, l.get("axis")), along_axis(zp, q.ndim, l.get("axis"))
                    self._deq_cache[out] = numpy_helper.from_array(((q - zp).astype(np.float32) * s_).astype(np.float32), out)
                inits.append(self._deq_cache[out])
            else:
                keep.append(node)
        if inits:
            del m.graph.node[:]
            m.graph.node.extend(keep)
            m.graph.initializer.extend(inits)

    def float_reference(self) -> ModelProto:
        return self.variant(float_layers=self.layers, float_inputs=self.layers, bypass_all=True)

    def only_layer(self, layer: str, fold_weights: bool = True) -> ModelProto:
        others = [n for n in self.layers if n != layer]
        return self.variant(float_layers=others, float_inputs=others, bypass_all=True, keep_acts_of={layer}, fold_weights=fold_weights)

    def all_but_layer(self, layer: str, fold_weights: bool = True) -> ModelProto:
        return self.variant(float_layers=[layer], float_inputs=[layer], fold_weights=fold_weights)


def _prune(model: ModelProto) -> None:
    """Drop nodes and initializers nothing reads (bypassed Q/DQ pairs, replaced weights)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(model_io.subgraph_reads(node))  # an If/Loop body may read outer tensors
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)


def collect_feeds(data, limit: int) -> list:
    """Up to ``limit`` samples of ``data`` (a callable returning batches) as a list of batches."""
    if data is None:
        raise DataError("sensitivity analysis needs data.", "give --calib-data")
    feeds, count = [], 0
    for feed in data():
        feeds.append(feed)
        count += feed_samples(feed)
        if count >= limit:
            break
    if not feeds:
        raise DataError("the data yielded no samples.", "check --calib-data")
    return feeds


class Evaluator:
    """Runs model variants on fixed feeds and compares their outputs with the float reference."""

    def __init__(self, reference: ModelProto, feeds: list):
        self.feeds = feeds
        self.ref = self.outputs(reference)

    def outputs(self, model: ModelProto) -> list:
        sess = fast_session(model)
        names = [o.name for o in sess.get_outputs()]
        outs = []
        for feed in self.feeds:
            outs.extend(runtime.run(sess, feed, names)[n] for n in names)
        return outs

    def error(self, model: ModelProto) -> float:
        return rel_error(self.ref, self.outputs(model))


@dataclass
class LayerSensitivity:
    layer: str
    op: str
    only_rel: Optional[float] = None
    all_but_rel: Optional[float] = None
    macs: Optional[int] = None

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "op": self.op, "macs": self.macs}
        for key in ("only", "all_but"):
            rel = getattr(self, f"{key}_rel")
            d[f"{key}_rel_error"] = rel
            d[f"{key}_sqnr_db"] = None if rel is None else round(sqnr_db(rel), 3)
        return d


@dataclass
class SensitivityReport:
    full_rel: float
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict:
        return {"full_rel_error": self.full_rel, "full_sqnr_db": round(sqnr_db(self.full_rel), 3), "samples": self.samples,
                "seconds": round(self.seconds, 2), "layers": [l.to_dict() for l in self.layers]}

    def ranked(self, key: str = "only") -> list:
        """Layers, most sensitive first (largest ``only`` error, or largest recovery for ``all_but``)."""
        if key == "only":
            return sorted(self.layers, key=lambda l: -(l.only_rel or 0.0))
        return sorted(self.layers, key=lambda l: (l.all_but_rel if l.all_but_rel is not None else self.full_rel))


def analyze(view: QdqView, feeds: list, modes=("only", "all_but"),
            progress: Optional[Callable[[str], None]] = None) -> SensitivityReport:
    """Per-layer sensitivity of ``view``'s quantized model on ``feeds`` (see the module docstring)."""
    from .. import stats

    t0 = time.perf_counter()
    ev = Evaluator(view.float_reference(), feeds)
    full = ev.error(view.variant(fold_weights=True))
    macs = {r["name"]: r["macs"] for r in stats.layer_macs(view.qmodel)}
    rep = SensitivityReport(full_rel=full, samples=sum(feed_samples(f) for f in feeds))
    names = list(view.layers)
    for i, name in enumerate(names):
        row = LayerSensitivity(name, view.layers[name]["op"], macs=macs.get(name))
        if "only" in modes:
            row.only_rel = ev.error(view.only_layer(name))
        if "all_but" in modes:
            row.all_but_rel = ev.error(view.all_but_layer(name))
        rep.layers.append(row)
        if progress:
            progress(f"[{i + 1}/{len(names)}] {name}")
    rep.seconds = time.perf_counter() - t0
    return rep


def format_table(rep: SensitivityReport, top: Optional[int] = None) -> str:
    lines = [f"fully quantized: rel error {rep.full_rel:.4g}  SQNR {sqnr_db(rep.full_rel):.2f} dB  "
             f"({rep.samples} samples, {rep.seconds:.1f} s)",
             ""]
    rows = rep.ranked("only")
    rows = rows[:top] if top else rows
    w = max([6] + [len(r.op) for r in rows])  # ConvTranspose would push its row out of line
    lines[-1] = f"{'layer':<40} {'op':<{w}} {'only-this SQNR':>15} {'all-but SQNR':>13} {'MMACs':>8}"
    for r in rows:
        only = f"{sqnr_db(r.only_rel):.2f} dB" if r.only_rel is not None else "-"
        allb = f"{sqnr_db(r.all_but_rel):.2f} dB" if r.all_but_rel is not None else "-"
        macs = f"{r.macs / 1e6:.1f}" if r.macs else "-"
        lines.append(f"{r.layer[:40]:<40} {r.op:<{w}} {only:>15} {allb:>13} {macs:>8}")
    return "\n".join(lines)


def plot(rep: SensitivityReport, path: str) -> None:
    """A bar chart of per-layer SQNR (only-this-layer and all-but-this-layer) in graph order."""
    from ..errors import require

    require("matplotlib", "the sensitivity bar chart (--plot)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rep.layers)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * n + 2), 4.5))
    only = [sqnr_db(l.only_rel) if l.only_rel is not None else 0 for l in rep.layers]
    allb = [sqnr_db(l.all_but_rel) if l.all_but_rel is not None else 0 for l in rep.layers]
    ax.bar(x - 0.2, only, 0.4, label="only this layer quantized")
    ax.bar(x + 0.2, allb, 0.4, label="all but this layer quantized")
    ax.axhline(sqnr_db(rep.full_rel), color="k", ls="--", lw=1, label=f"all quantized ({sqnr_db(rep.full_rel):.1f} dB)")
    ax.set_xticks(x)
    ax.set_xticklabels([l.layer for l in rep.layers], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR vs float (dB, higher = less sensitive)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
