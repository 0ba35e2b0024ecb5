"""How much an approximate pass changed the model's outputs, measured on the data in hand.

The pass manager measures every approximate pass here, so each summary line reads the same way:
per graph output, on the logits before a terminal Softmax/LogSoftmax/Sigmoid (probabilities hide
a changed argmax; :mod:`onnxopt.task_metric`), the cosine, the relative L2 error, the SQNR, and
for classifier outputs the top-1 agreement and KL. A cosine or agreement below
:data:`WARN_BELOW` is a console warning (an output turned to all zeros has cosine 0).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from onnx import ModelProto

from . import runtime, task_metric
from .data import DataSource, take_samples
from .errors import OnnxoptError

SAMPLES = 32          # samples measured (top-1 agreement needs more than the 2 batches verification uses)
GENERATED = 8         # generated inputs when no data was given
WARN_BELOW = 0.9      # cosine or top-1 agreement below this: the console warns


def feeds(ctx, model: ModelProto, samples: int = SAMPLES) -> tuple:
    """(feeds, "data" | "generated"): the user's data up to ``samples`` samples, else :data:`GENERATED`
    generated inputs. Only a :class:`DataSource` is read again: a plain callable given to the API
    may be a costly or single-use stream, so the passes alone read it."""
    if ctx is None:
        return [runtime.generate_inputs(model, seed=s) for s in range(GENERATED)], "generated"
    if not isinstance(ctx.data, DataSource):  # the verification's generated inputs (plausible values per input role)
        return dataclasses.replace(ctx, data=None).sample_feeds(model, GENERATED)
    return take_samples(ctx.data, samples), "data"


def measure(before: ModelProto, after: ModelProto, batches: list, source: str = "data") -> dict:
    """The output change of ``after`` against ``before`` on ``batches``, or ``{"skipped": reason}``."""
    found = task_metric.logit_tensors(before)
    ref_model, ref_tensor = task_metric.with_logit_outputs(before, found)
    new_model, new_tensor = task_metric.with_logit_outputs(after)
    try:
        s_ref, s_new = runtime.session(ref_model), runtime.session(new_model)
        refs = [runtime.run(s_ref, f) for f in batches]
        gots = [runtime.run(s_new, f) for f in batches]
    except OnnxoptError as exc:
        return {"skipped": exc.message}
    activations = {name: act for name, (_, act) in found.items()}
    axes = task_metric.class_axes(before)
    per: dict = {}
    samples = 0
    for name, rt in ref_tensor.items():   # per output, or per tensor a data-dependent selection reads
        ct = new_tensor.get(name, name)
        r = [np.asarray(x[rt], np.float64) for x in refs if rt in x]
        c = [np.asarray(x[ct], np.float64) for x in gots if ct in x]
        if not r or len(r) != len(c) or any(a.shape != b.shape for a, b in zip(r, c)) or r[0].dtype.kind not in "fc":
            continue
        per[name] = _compare(r, c, activations.get(name), axes.get(name))
        if rt != name:
            per[name].update(measured=rt, activation=activations.get(name))
        samples = max(samples, sum(a.shape[0] if a.ndim else 1 for a in r))
    worst = lambda key, fn: fn((v[key] for v in per.values() if v.get(key) is not None), default=None)  # noqa: E731
    return {"inputs": source, "samples": samples, "outputs": per,
            "cosine": worst("cosine", min), "rel_error": worst("rel_error", max),
            "top1_agreement": worst("top1_agreement", min), "kl": worst("kl", max)}


def _compare(refs: list, cands: list, activation: Optional[str] = None, axis: Optional[int] = None) -> dict:
    r = np.concatenate([a.reshape(-1) for a in refs])
    c = np.concatenate([a.reshape(-1) for a in cands])
    finite = np.isfinite(r) & np.isfinite(c)
    bad = int((~finite & np.isfinite(r)).sum())  # a NaN/Inf where the reference has none is as far off as it gets
    if not finite.all():
        r, c = r[finite], c[finite]
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0.0 and nc == 0.0:
        cosine = 1.0
    elif nr == 0.0 or nc == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r, c) / (nr * nc))
    rel = float(np.linalg.norm(r - c) / nr) if nr > 0 else (0.0 if nc == 0 else float("inf"))
    out = {"cosine": 0.0 if bad else cosine, "rel_error": float("inf") if bad else rel, "top1_agreement": None}
    if bad:
        out["non_finite"] = bad
    task = task_metric.Accumulator(["out"], activations={"out": activation} if activation else None,
                                   axes={"out": axis} if axis is not None else None)
    for a, b in zip(refs, cands):
        task.update([a], [b])
    err = task.result().outputs[0]
    out["sqnr_db"] = err.sqnr_db
    if err.classifier:
        out["top1_agreement"], out["kl"], out["decision"] = err.top1_agreement, err.kl, err.decision
    return out


def describe(change: dict, prefix: str = "output change ") -> str:
    """``output change cosine 0.871, rel err 0.45, top-1 agreement 62.5 % (32 samples of the data)``."""
    if change.get("skipped"):
        return f"output change not measured: {change['skipped']}"
    # a Sigmoid's outputs agree on every label's decision (task_metric.LABELS), class scores on the top-1;
    # outputs of different kinds keep the top-1 name
    decisions = {v.get("decision") for v in change.get("outputs", {}).values() if v.get("decision")}
    agreement = task_metric.agreement_name(next(iter(decisions)) if len(decisions) == 1 else None)
    shown = {"cosine": lambda v: f"cosine {v:.4f}", "rel_error": lambda v: f"rel err {v:.3g}",
             "top1_agreement": lambda v: f"{agreement} {100 * v:.1f} %", "kl": lambda v: f"KL {v:.3g}"}
    parts = [fmt(change[key]) for key, fmt in shown.items() if change.get(key) is not None]
    acts = {v["activation"] for v in change.get("outputs", {}).values() if v.get("measured") and v.get("activation")}
    if acts & set(task_metric.LOGIT_READERS):
        parts.append("on the logits before the final " + "/".join(sorted(acts & set(task_metric.LOGIT_READERS))))
    selecting = acts - set(task_metric.LOGIT_READERS) - {task_metric.FEATURES}
    if selecting:
        parts.append("on the tensors " + "/".join(sorted(selecting)) + " selects from")
    what = "of the data" if change.get("inputs") == "data" else "of generated inputs; give --calib-data for real figures"
    return f"{prefix}{', '.join(parts) or 'none measurable'} ({change.get('samples', 0)} samples {what})"


def is_damaging(change: Optional[dict]) -> bool:
    """Whether the change is large enough to warn about (cosine or top-1 agreement below WARN_BELOW)."""
    if not change or change.get("skipped"):
        return False
    return any(v is not None and v < WARN_BELOW for v in (change.get("cosine"), change.get("top1_agreement")))
