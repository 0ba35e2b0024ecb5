"""Per-layer quantization sensitivity of a QDQ model, derived from one calibration.

:class:`onnxopt.quant.view.QdqView` derives *variants* of the quantized model without
recalibrating (a layer put back in float gets its float weight and bypasses its input's Q -> DQ
pair), so every variant uses exactly the scales of the one calibration.

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

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .. import stats, task_metric
from ..data import feed_samples
from ..errors import require
from .view import Evaluator, QdqView, sqnr_db


@dataclass
class LayerSensitivity:
    layer: str
    op: str
    only_rel: Optional[float] = None
    all_but_rel: Optional[float] = None
    macs: Optional[int] = None
    only_agreement_loss: Optional[float] = None   # task metric (logits): agreement points lost, only this layer quantized

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "op": self.op, "macs": self.macs, "only_agreement_loss_pts": self.only_agreement_loss}
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
    task: Optional[dict] = None     # the fully quantized model's task error (onnxopt.task_metric)
    task_summary: str = ""

    def to_dict(self) -> dict:
        return {"full_rel_error": self.full_rel, "task_error": self.task, "task_summary": self.task_summary, "full_sqnr_db": round(sqnr_db(self.full_rel), 3), "samples": self.samples,
                "seconds": round(self.seconds, 2), "layers": [l.to_dict() for l in self.layers]}

    def ranked(self, key: str = "only") -> list:
        """Layers, most sensitive first (largest ``only`` error, or largest recovery for ``all_but``)."""
        if key == "only":
            return sorted(self.layers, key=lambda l: -(l.only_rel or 0.0))
        return sorted(self.layers, key=lambda l: (l.all_but_rel if l.all_but_rel is not None else self.full_rel))


def analyze(view: QdqView, feeds: list, modes=("only", "all_but"),
            progress: Optional[Callable[[str], None]] = None) -> SensitivityReport:
    """Per-layer sensitivity of ``view``'s quantized model on ``feeds`` (see the module docstring)."""
    t0 = time.perf_counter()
    ev = Evaluator(view.float_reference(), feeds)
    full = ev.error(view.variant(fold_weights=True))
    macs = {r["name"]: r["macs"] for r in stats.layer_macs(view.qmodel)}
    rep = SensitivityReport(full_rel=full, samples=sum(feed_samples(f) for f in feeds))
    # the task-aware error (logits before a final Softmax; top-1 agreement for classifiers)
    task_ev = task_metric.Evaluator(view.float_reference(), feeds, limit=rep.samples)
    full_task = task_ev.error(view.variant(fold_weights=True))
    rep.task, rep.task_summary = full_task.to_dict(), full_task.summary()
    names = list(view.layers)
    for i, name in enumerate(names):
        row = LayerSensitivity(name, view.layers[name].op, macs=macs.get(name))
        if "only" in modes:
            only = view.only_layer(name)
            row.only_rel = ev.error(only)
            if full_task.classifier:
                row.only_agreement_loss = task_ev.error(only).agreement_loss
        if "all_but" in modes:
            row.all_but_rel = ev.error(view.all_but_layer(name))
        rep.layers.append(row)
        if progress:
            progress(f"[{i + 1}/{len(names)}] {name}")
    rep.seconds = time.perf_counter() - t0
    return rep


def format_table(rep: SensitivityReport, top: Optional[int] = None) -> str:
    rows = rep.ranked("only")[:top or None]
    w = max([6] + [len(r.op) for r in rows])  # ConvTranspose would push its row out of line
    agree = any(r.only_agreement_loss is not None for r in rows)
    lines = [f"fully quantized: rel error {rep.full_rel:.4g}  SQNR {sqnr_db(rep.full_rel):.2f} dB  "
             f"({rep.samples} samples, {rep.seconds:.1f} s)" + (f"; task error: {rep.task_summary}" if rep.task_summary else ""),
             f"{'layer':<40} {'op':<{w}} {'only-this SQNR':>15} {'all-but SQNR':>13} {'MMACs':>8}"
             + (f" {'only-this agreement lost':>24}" if agree else "")]
    for r in rows:
        only = f"{sqnr_db(r.only_rel):.2f} dB" if r.only_rel is not None else "-"
        allb = f"{sqnr_db(r.all_but_rel):.2f} dB" if r.all_but_rel is not None else "-"
        macs = f"{r.macs / 1e6:.1f}" if r.macs else "-"
        lost = (f" {r.only_agreement_loss:>21.2f} pt" if r.only_agreement_loss is not None else f" {'-':>24}") if agree else ""
        lines.append(f"{r.layer[:40]:<40} {r.op:<{w}} {only:>15} {allb:>13} {macs:>8}{lost}")
    return "\n".join(lines)


def plot(rep: SensitivityReport, path: str) -> None:
    """A bar chart of per-layer SQNR (only-this-layer and all-but-this-layer) in graph order."""
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
