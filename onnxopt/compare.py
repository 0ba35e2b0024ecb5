"""Inspection as a library: what a model is (:func:`model_info`) and how two models differ
(:func:`compare_models`), plus the latency helper :func:`measure_latency` others reuse.

Per output: ``max_abs``, ``cosine`` (float64 sums, and the worst per-sample one), ``sqnr_db``, top-1
agreement and accuracy for classifier outputs ([N, C], C > 1; a Sigmoid's ``[N, C]`` or ``[N]``: every
label decided at 0.5 agrees, and a binary classifier's accuracy on labels 0 / 1; a segmentation map's
or mask's positions: the share whose class agrees), and ``task_error`` (:mod:`onnxopt.task_metric`,
on the logits before a terminal Softmax/Sigmoid). Numerics run with graph optimizations off (the graphs as
written are compared) and are streamed: only running sums and one argmax per sample are kept. The two
models are timed alternately so machine noise hits both alike; the gates are evaluated on the candidate.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx
from onnx import ModelProto
from onnx.external_data_helper import uses_external_data

from . import model_io, runtime, stats, task_metric
from .data import (IGNORED_LABEL, DataSource, feed_samples, graph_inputs, open_data, per_sample_labels,
                   recorded_preprocessing)
from .errors import DataError, GateFailure, OnnxoptError, OptionError
from .feeds import NoFeedError, plan_feeds
from .input_dims import real_inputs
from .progress import progress_bar

MB = 2**20
ModelLike = Union[str, os.PathLike, ModelProto]
GATES = ("max_size_mb", "max_latency_ms", "min_agreement", "max_drop")


# ------------------------------------------------------------------------------------ info
def file_size_bytes(path: Union[str, os.PathLike]) -> dict:
    """Bytes on disk of a model file and of the external data files it references."""
    path = Path(path)
    model = onnx.load_model(str(path), load_external_data=False)
    locations = {e.value for t in model_io.all_tensors(model) if uses_external_data(t)
                 for e in t.external_data if e.key == "location" and e.value}
    external = sum((path.parent / loc).stat().st_size for loc in sorted(locations) if (path.parent / loc).is_file())
    model_bytes = path.stat().st_size
    return {"model": model_bytes, "external": external, "total": model_bytes + external, "external_files": sorted(locations)}


def _value_info(vi: onnx.ValueInfoProto) -> dict:
    if not vi.type.HasField("tensor_type"):
        return {"name": vi.name, "dtype": vi.type.WhichOneof("value") or "?", "shape": None}
    tt = vi.type.tensor_type
    shape = ([int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
             if tt.HasField("shape") else None)
    try:  # numpy's names (float32, int64) where numpy has the type, ONNX's otherwise (bfloat16)
        dtype = str(runtime.np_dtype(tt.elem_type))
    except KeyError:
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "?"
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def model_info(source: ModelLike, per_layer: bool = False) -> dict:
    """Everything ``onnxopt info`` shows, as a JSON-able dict."""
    model = model_io.load_model(source)
    layers = stats.layer_macs(model)
    readings = task_metric.output_readings(model)
    info: dict = {
        "path": None if isinstance(source, ModelProto) else str(source),
        "ir_version": int(model.ir_version),
        "opsets": {(imp.domain or "ai.onnx"): int(imp.version) for imp in model.opset_import},
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        "inputs": [_value_info(vi) for vi in real_inputs(model)],
        # how the task metric (compare, sensitivity, qdq's fallback budget) reads each output
        "outputs": [dict(_value_info(vi), measured_as=readings.get(vi.name)) for vi in model.graph.output],
        "nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
        "ops": stats.op_histogram(model), "params": stats.param_count(model), **stats.mac_totals(layers),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    quant = stats.quantization(model, layers)
    if quant:
        info["quantization"] = quant
    if isinstance(source, ModelProto):
        info.update(size_bytes=model.ByteSize(), external_data_bytes=0)
    else:
        sizes = file_size_bytes(source)
        info.update(size_bytes=sizes["total"], external_data_bytes=sizes["external"],
                    external_data_files=sizes["external_files"])
    if per_layer:
        total = info["macs"] or 1
        info["layers"] = [dict(r, share=(r["macs"] / total if r["macs"] is not None else None)) for r in layers]
    return info


# --------------------------------------------------------------------------------- latency
def _time_alternating(sessions: Sequence, feed: dict, runs: int, warmup: int) -> list:
    """Per-session lists of wall times (ms); the sessions take turns so noise hits them alike."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list = [[] for _ in sessions]
    for _ in range(runs):
        for i, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def _latency_summary(times: list, threads: int) -> dict:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0],
            "p90_ms": ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)],
            "runs": len(ordered), "threads": threads}


def measure_latency(model: ModelLike, feed: Optional[dict] = None, runs: int = 20, *, warmup: int = 3, threads: int = 1,
                    optimize: bool = True, input_shapes: Optional[dict] = None) -> dict:
    """Median (and min, p90) wall time in ms of ``runs`` onnxruntime runs of ``model`` on ``feed``
    (default: one generated sample), after ``warmup`` untimed runs; ``threads`` 0 = onnxruntime's default."""
    if runs < 1:
        raise OptionError(f"runs must be at least 1, got {runs}.", "use --runs 1 or more")
    proto = model if isinstance(model, ModelProto) else model_io.load_model(model)
    feed = feed if feed is not None else runtime.generate_inputs(proto, overrides=input_shapes)
    sess = runtime.session(proto, optimize=optimize, threads=threads)
    _check_feed_runs(sess, feed, "the model")
    return _latency_summary(_time_alternating([sess], feed, runs, warmup)[0], threads)


def _check_feed_runs(sess, feed: dict, what: str) -> None:
    try:
        sess.run(None, feed)
    except Exception as exc:
        raise DataError(f"onnxruntime cannot run {what} on the latency input: {str(exc).strip().splitlines()[0][:400]}",
                        "check --input-shape and that the data matches the model's inputs") from None


# --------------------------------------------------------------------------------- metrics
class _OutputStats:
    """Running sums for one output pair: of all the samples, only one argmax each is kept."""

    def __init__(self, name: str, cand_name: str, data_dependent: bool = False, activation: Optional[str] = None,
                 class_ids: bool = False, axis: Optional[int] = None):
        self.name, self.cand_name = name, cand_name
        # what task_metric.logit_tensors found writing the output: a Sigmoid's probabilities decide each
        # label at 0.5; features (task_metric.FEATURES) decide nothing: no agreement, no accuracy
        self.activation = activation
        self.class_ids = class_ids   # written by an ArgMax: one class id per sample ([N] or [N, 1]) is the decision
        self.axis = axis   # task_metric.class_axes: the classes' axis of scores whose positions each decide
        self.decision: Optional[str] = None   # task_metric.TOP1, LABELS or POSITIONS
        # a selection's output (after NonMaxSuppression...): where the two models select a different
        # number of items it is not compared element by element (the task error reads its inputs)
        self.data_dependent, self.shape_changes = data_dependent, 0
        self.shape: Optional[list] = None
        self.classifier: Optional[bool] = None
        self.max_abs = self.sum_abs = self.dot = self.rr = self.cc = self.ee = 0.0
        self.min_sample_cos = math.inf
        self.elements = self.equal = self.ref_nonfinite = self.cand_nonfinite = 0
        self.samples = self.agree = self.ref_correct = self.cand_correct = self.labelled = 0
        # per-position labels: [intersection, union] per class, each model; their count per sample differs
        self.iou = {"ref": np.zeros((2, 0), np.int64), "cand": np.zeros((2, 0), np.int64)}
        self.label_shape_mismatch = False

    def update(self, r: np.ndarray, c: np.ndarray, labels: Optional[np.ndarray]) -> None:
        if r.shape != c.shape and self.data_dependent:
            self.shape_changes += 1
            return
        if r.shape != c.shape:
            raise OnnxoptError(
                f"output '{self.name}' has shape {list(r.shape)} in the reference but {list(c.shape)} in the candidate.",
                "the two models are not comparable on this output; check that CAND was derived from REF")
        shape = r.shape
        r, c = task_metric.as_scores(r), task_metric.as_scores(c)   # [N, C, 1, 1]: a classifier's [N, C] scores
        # (selected indices are no logits, and an embedding's argmax decides nothing)
        ids = self.class_ids and r.ndim in (1, 2) and r.size == (r.shape[0] if r.ndim else 1)
        # an ArgMax's map of class ids (a segmentation export): each position is a decision
        id_map = self.class_ids and not ids and r.ndim >= 2
        kind = (task_metric.TOP1 if ids else task_metric.POSITIONS if id_map else None if self.data_dependent
                else task_metric.decision_kind(r.shape, self.activation, self.axis))
        is_cls = kind is not None
        self.classifier = is_cls if self.classifier is None else (self.classifier and is_cls)
        self.decision = kind if self.decision in (None, kind) else None
        self.shape = list(shape) if self.shape is None else [a if a == b else None for a, b in zip(self.shape, shape)]
        r64, c64 = r.astype(np.float64, copy=False), c.astype(np.float64, copy=False)
        fr, fc = np.isfinite(r64), np.isfinite(c64)
        self.ref_nonfinite += int(r64.size - fr.sum())
        self.cand_nonfinite += int(c64.size - fc.sum())
        both = fr & fc
        diff = np.abs(np.where(both, r64 - c64, 0.0))
        # a non-finite value on one side only is an infinite error; NaN vs NaN counts as equal
        one_sided = (fr != fc) | (~fr & ~fc & ~(np.isnan(r64) & np.isnan(c64)) & (r64 != c64))
        if one_sided.any():
            self.max_abs = math.inf
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        rz, cz = np.where(both, r64, 0.0), np.where(both, c64, 0.0)
        self.dot += float(np.vdot(rz, cz))
        self.rr += float(np.vdot(rz, rz))
        self.cc += float(np.vdot(cz, cz))
        self.ee += float(np.vdot(diff, diff))
        self.equal += int(np.count_nonzero(r == c))
        self.elements += int(r.size)
        if r.ndim >= 1 and r.shape[0] > 0:
            rs, cs = rz.reshape(r.shape[0], -1), cz.reshape(r.shape[0], -1)
            num = np.einsum("ij,ij->i", rs, cs)
            den = np.sqrt(np.einsum("ij,ij->i", rs, rs) * np.einsum("ij,ij->i", cs, cs))
            cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.all(rs == cs, axis=1), 1.0, 0.0))
            self.min_sample_cos = min(self.min_sample_cos, float(cos.min()))
        if kind == task_metric.POSITIONS:
            # a class map compares ids; a Sigmoid's mask its probabilities at 0.5 (no class axis)
            axis = None if id_map or self.axis is None else self.axis % r.ndim
            self.samples += r.size if id_map else task_metric.positions(r.shape, axis)
            self.agree += (int(np.count_nonzero(r == c)) if id_map else task_metric.agreeing(r, c, kind, threshold=0.5, axis=axis))
            if labels is not None and labels.ndim >= 2:   # a class per position: pixel accuracy and IoU
                self._count_positions(*(x if id_map else (x > 0.5).astype(np.int64) if axis is None else np.argmax(x, axis=axis)
                                        for x in (r, c)), labels)
        elif kind == task_metric.LABELS:   # a Sigmoid's probabilities: each label is a yes at 0.5
            self.samples += r.shape[0] if r.ndim else 1
            self.agree += task_metric.agreeing(r, c, kind, threshold=0.5)
            if labels is not None and labels.ndim == 1 and r.size == len(labels):   # a binary classifier: labels 0 / 1
                self.ref_correct += int(np.count_nonzero((r.reshape(-1) > 0.5) == (labels != 0)))
                self.cand_correct += int(np.count_nonzero((c.reshape(-1) > 0.5) == (labels != 0)))
                self.labelled += len(labels)
            elif labels is not None and labels.ndim == 2 and labels.size == r.size:   # multi-hot: every label right
                truth = (labels != 0).reshape(len(labels), -1)
                self.ref_correct += int(np.count_nonzero(((r.reshape(len(labels), -1) > 0.5) == truth).all(axis=1)))
                self.cand_correct += int(np.count_nonzero(((c.reshape(len(labels), -1) > 0.5) == truth).all(axis=1)))
                self.labelled += len(labels)
        elif is_cls:
            if labels is not None and labels.ndim == 2 and labels.shape == r.shape and not ids:
                labels = np.argmax(labels, axis=1)   # one-hot labels (Keras' to_categorical): their classes
            ra, ca = (r.reshape(-1), c.reshape(-1)) if ids else (np.argmax(r, axis=1), np.argmax(c, axis=1))
            self.samples += r.shape[0]
            self.agree += int(np.count_nonzero(ra == ca))
            if labels is not None and labels.ndim == 1:
                self.ref_correct += int(np.count_nonzero(ra == labels))
                self.cand_correct += int(np.count_nonzero(ca == labels))
                self.labelled += len(labels)

    def _count_positions(self, ref_pred: np.ndarray, cand_pred: np.ndarray, labels: np.ndarray) -> None:
        """Pixel accuracy and per-class intersection / union of both models' class maps against
        per-position ``labels`` (the same count per sample; IGNORED_LABEL and negative labels skipped)."""
        n = len(labels)
        if ref_pred.shape[:1] != (n,) or ref_pred.size != labels.size:
            self.label_shape_mismatch = True
            return
        rp, cp, y = (a.reshape(n, -1) for a in (ref_pred, cand_pred, labels))
        keep = (y >= 0) & (y != IGNORED_LABEL)
        rp, cp, y = rp[keep].astype(np.int64), cp[keep].astype(np.int64), y[keep].astype(np.int64)
        self.ref_correct += int(np.count_nonzero(rp == y))
        self.cand_correct += int(np.count_nonzero(cp == y))
        self.labelled += int(y.size)
        for which, pred in (("ref", rp), ("cand", cp)):
            k = int(max(pred.max(initial=0), y.max(initial=0))) + 1
            inter = np.bincount(y[pred == y], minlength=k)
            union = np.bincount(y, minlength=k) + np.bincount(pred, minlength=k) - inter
            old = self.iou[which]
            grown = np.zeros((2, max(k, old.shape[1])), np.int64)
            grown[:, :old.shape[1]] += old
            grown[0, :k] += inter
            grown[1, :k] += union
            self.iou[which] = grown

    def _miou(self, which: str) -> Optional[float]:
        inter, union = self.iou[which]
        seen = union > 0
        return float(np.mean(inter[seen] / union[seen])) if seen.any() else None

    def result(self) -> dict:
        norm = math.sqrt(self.rr) * math.sqrt(self.cc)
        if norm > 0:
            cosine = self.dot / norm
        else:  # an all-zero output: equal outputs agree perfectly, otherwise not at all
            cosine = 1.0 if self.ee == 0 else 0.0
        if self.ee == 0:
            sqnr = math.inf
        elif self.rr == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.rr / self.ee)
        classified = bool(self.classifier and self.samples)
        accuracy = classified and self.labelled
        return {
            "name": self.name, "candidate_name": self.cand_name, "shape": self.shape,
            "max_abs": self.max_abs, "mean_abs": self.sum_abs / self.elements if self.elements else 0.0,
            "cosine": cosine, "min_sample_cosine": None if self.min_sample_cos == math.inf else self.min_sample_cos,
            "sqnr_db": sqnr, "equal_fraction": self.equal / self.elements if self.elements else 1.0,
            "ref_nonfinite": self.ref_nonfinite, "cand_nonfinite": self.cand_nonfinite,
            "classifier": bool(self.classifier), "decision": self.decision if classified else None,
            "top1_agreement": self.agree / self.samples if classified else None,
            "ref_accuracy": self.ref_correct / self.labelled if accuracy else None,
            "cand_accuracy": self.cand_correct / self.labelled if accuracy else None,
            # a class per position against per-position labels: mean IoU over the classes present
            "ref_miou": self._miou("ref") if accuracy and self.decision == task_metric.POSITIONS else None,
            "cand_miou": self._miou("cand") if accuracy and self.decision == task_metric.POSITIONS else None,
            "label_shape_mismatch": self.label_shape_mismatch,
            "data_dependent": self.data_dependent, "shape_changes": self.shape_changes,
        }


# --------------------------------------------------------------------------------- compare
def _load(source: ModelLike) -> tuple:
    model = model_io.load_model(source)
    if isinstance(source, ModelProto):
        return model, None, model.ByteSize()
    return model, str(source), file_size_bytes(source)["total"]


def _check_inputs_match(ref: ModelProto, cand: ModelProto) -> None:
    ri, ci = graph_inputs(ref), graph_inputs(cand)
    if set(ri) != set(ci):
        raise OnnxoptError(f"the models take different inputs: reference {', '.join(ri)}; candidate {', '.join(ci)}.",
                           "compare a model with one derived from it (same input names)")
    for name, spec in ri.items():
        other = ci[name]
        if spec["dtype"] != other["dtype"]:
            raise OnnxoptError(f"input '{name}' is {spec['dtype']} in the reference but {other['dtype']} in the candidate.",
                               "compare models that take the same input types")
        if len(spec["shape"]) != len(other["shape"]) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(spec["shape"], other["shape"])):
            raise OnnxoptError(f"input '{name}' has shape {spec['shape']} in the reference but {other['shape']} in the candidate.",
                               "compare models that take the same input shapes (None = dynamic)")


def _output_pairs(ref: ModelProto, cand: ModelProto, notes: list) -> list:
    rn, cn = [o.name for o in ref.graph.output], [o.name for o in cand.graph.output]
    if set(rn) == set(cn):
        return [(n, n) for n in rn]
    if len(rn) == len(cn):
        notes.append("output names differ; outputs are matched by position: " + ", ".join(f"{a}<->{b}" for a, b in zip(rn, cn)))
        return list(zip(rn, cn))
    raise OnnxoptError(f"the models have different outputs: reference {', '.join(rn)}; candidate {', '.join(cn)}.",
                       "compare a model with one derived from it")


def _fixed_batch(ref: ModelProto, cand: ModelProto) -> Optional[int]:
    dims = {spec["shape"][0] for m in (ref, cand) for spec in graph_inputs(m).values()
            if spec["shape"] and isinstance(spec["shape"][0], int)}
    if len(dims) > 1:
        raise OnnxoptError(f"the models fix different batch sizes {sorted(dims)}.", "compare models with the same batch dimension")
    return dims.pop() if dims else None


def _validate_gates(gates: dict) -> dict:
    unknown = [k for k in gates if k not in GATES]
    if unknown:
        raise OptionError(f"unknown gate '{unknown[0]}'.", f"valid gates: {', '.join(GATES)}")
    gates = {k: (None if v is None else float(v)) for k, v in gates.items()}
    for k, v in gates.items():
        if v is not None and (math.isnan(v) or v < 0):
            raise OptionError(f"gate {k} must be a non-negative number, got {v}.", "e.g. --max-size-mb 5 --max-drop 0.5")
    agreement = gates.get("min_agreement")
    if agreement is not None and (agreement > 100 or 0 < agreement <= 1):
        raise OptionError(f"--min-agreement is a percentage in (1, 100], got {agreement:g}.",
                          "give e.g. --min-agreement 99 for 99 % of samples with the same top-1 class")
    return gates


def _labels_array(labels) -> Optional[np.ndarray]:
    if labels is None or isinstance(labels, (str, os.PathLike)):
        return None
    arr = per_sample_labels(labels)
    if arr.dtype.kind not in "iu":
        raise DataError("labels must be integer class indices.", "pass an array of ints")
    return arr.astype(np.int64)


def _check_arguments(gates: Optional[dict], runs: int, max_samples: Optional[int], data, labels) -> dict:
    """Refuse contradictory arguments before any model is read; return the validated gates."""
    gates = _validate_gates({k: v for k, v in (gates or {}).items() if v is not None})
    if runs < 0:
        raise OptionError(f"--runs must be 0 (no latency) or more, got {runs}.", "e.g. --runs 20")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"--max-samples must be at least 1, got {max_samples}.", "leave it out to use every sample")
    if "max_latency_ms" in gates and runs == 0:
        raise OptionError("--max-latency-ms needs a latency measurement, but --runs is 0.", "use --runs 20 (the default)")
    if data is None and labels is not None:
        raise OptionError("labels were given without data.", "give --data with the samples the labels belong to")
    return gates


@dataclasses.dataclass
class _Inputs:
    """The feeds both models run on, where they come from and their labels (or None)."""
    feeds: object        # an iterable of feed dicts
    source: str
    total: Optional[int]
    labels: Optional[np.ndarray]


def _generated_inputs(ref_model: ModelProto, input_shapes: Optional[dict], count: int, notes: list) -> _Inputs:
    where, kinds = "", "standard normal floats, small ints"
    try:
        runtime.input_specs(ref_model, input_shapes)  # a dynamic non-batch dim without --input-shape fails here
        feeds = (runtime.generate_inputs(ref_model, seed=s, overrides=input_shapes) for s in range(count))
    except OnnxoptError as exc:
        if input_shapes:
            raise
        # a dynamic height, width or length: the sizes the model runs at, found as apply's verification
        # finds them (every dynamic export stopped here, where apply needs no --input-shape)
        try:
            plan = plan_feeds(ref_model, two_sizes=False)
        except NoFeedError:
            raise exc from None
        feeds = (plan.feed(0, seed=s) for s in range(count))
        where = f" at {plan.describe()}, sizes the model runs at (--input-shape gives others)"
        kinds = "standard normal floats, integers valid where they index"
    notes.append(f"no data given: {count} generated inputs{where} ({kinds}), so errors and "
                 "agreement describe random inputs, not real data; give --data for meaningful figures")
    return _Inputs(feeds, "generated", count, None)


def _data_inputs(data, labels, ref_model: ModelProto, cand_model: ModelProto, input_shapes: Optional[dict], image: Optional[dict],
                 batch: int, max_samples: Optional[int], require_preprocessing: bool, notes: list) -> _Inputs:
    label_arr = _labels_array(labels)
    if isinstance(data, DataSource):
        source = data
        if isinstance(labels, (str, os.PathLike)):  # the labels file wins, as with a path
            source = DataSource(dataclasses.replace(data.spec, labels=str(labels)), data.model, data._overrides)
    else:
        source = open_data(str(data), ref_model, input_shapes, recorded=recorded_preprocessing(cand_model),
                           image=image or {}, batch_size=batch, max_samples=max_samples,
                           labels=str(labels) if isinstance(labels, (str, os.PathLike)) else None,
                           require_preprocessing=require_preprocessing)
    source.check()
    if source.preprocessing is not None:
        where = " (recorded in the models' metadata)" if source.preprocessing_origin == "model" else ""
        notes.append(f"preprocessing: {source.preprocessing.describe(source.grey)}{where}")
    data_labels = source.labels() if label_arr is None else label_arr
    if data_labels is not None and label_arr is None and labels is None:
        origin = {"class subfolders": "; the class subfolders numbered in sorted order, as torchvision's ImageFolder does"
                  }.get(source.labels_origin, "")
        notes.append(f"labels taken from the data source ({len(data_labels)}{origin})")
    return _Inputs(source.batches(batch), source.spec.source, source.count(), data_labels)


@dataclasses.dataclass
class _Numerics:
    """What the streamed comparison leaves: per-output results, the task error, one sample for timing."""
    outputs: list
    task_error: object   # task_metric's result
    first_sample: Optional[dict]
    seen: int


def _stream_numerics(ref_model: ModelProto, cand_model: ModelProto, pairs: list, inputs: _Inputs, progress: bool) -> _Numerics:
    """Run both models batch by batch, keeping only running sums (see the module docstring)."""
    # the task-aware error reads the logits before a terminal Softmax/Sigmoid, exposed as extra outputs
    ref_found = task_metric.logit_tensors(ref_model)
    ref_logit_model, ref_logits = task_metric.with_logit_outputs(ref_model, ref_found)
    cand_logit_model, cand_logits = task_metric.with_logit_outputs(cand_model)
    s_ref, s_cand = runtime.session(ref_logit_model), runtime.session(cand_logit_model)
    ref_names, cand_names = [r for r, _ in pairs], [c for _, c in pairs]
    # the task error's places: an output, or (``output:Op[i]``) a tensor its data-dependent selection reads
    keys = {k: c + k[len(r):] for r, c in pairs for k in ref_logits if k == r or k.startswith(r + ":")}
    missing = [k for k, ck in keys.items() if ck not in cand_logits]
    if missing:
        raise OnnxoptError(f"the candidate has no place matching '{missing[0]}' of the reference's outputs.",
                           "the two models are not comparable; check that CAND was derived from REF")
    selected = task_metric.data_dependent_outputs(ref_model)
    class_ids = task_metric.class_id_outputs(ref_model)
    axes = task_metric.class_axes(ref_model)
    acc = [_OutputStats(r, c, r in selected, ref_found.get(r, (None, None))[1], r in class_ids, axes.get(r)) for r, c in pairs]
    task_acc = task_metric.Accumulator(list(keys), ref_logits,
                                       {k: a for k, (_, a) in ref_found.items() if a}, axes)
    ref_fetch = list(dict.fromkeys(ref_names + [ref_logits[k] for k in keys]))
    cand_fetch = list(dict.fromkeys(cand_names + [cand_logits[ck] for ck in keys.values()]))
    data_labels = inputs.labels
    first_sample: Optional[dict] = None
    seen = 0
    bar = progress_bar(inputs.total, "compare", progress)
    try:
        for feed in inputs.feeds:
            n_batch = feed_samples(feed)
            if first_sample is None:
                first_sample = {k: v[:1] if (v.ndim and n_batch) else v for k, v in feed.items()}
            ro = runtime.run(s_ref, feed, ref_fetch)
            co = runtime.run(s_cand, feed, cand_fetch)
            task_acc.update([ro[ref_logits[k]] for k in keys], [co[cand_logits[ck]] for ck in keys.values()])
            lab = None
            if data_labels is not None:
                if seen + n_batch > len(data_labels):
                    raise DataError(f"there are {len(data_labels)} labels but more samples than that in the data.",
                                    "give one label per sample (after --max-samples/selection)")
                lab = data_labels[seen:seen + n_batch]
            for a, rname, cname in zip(acc, ref_names, cand_names):
                a.update(ro[rname], co[cname], lab)
            seen += n_batch
            bar.update(n_batch)
    finally:
        bar.close()
    if seen == 0:
        raise DataError("no sample reached the models.", "check the data (an empty selection? fewer samples than the fixed batch size?)")
    return _Numerics([a.result() for a in acc], task_acc.result(), first_sample, seen)


def _compare_latency(ref_model: ModelProto, cand_model: ModelProto, sample: dict, runs: int, threads: int, warmup: int) -> dict:
    if not runs:
        return {"reference": None, "candidate": None}
    l_ref, l_cand = (runtime.session(m, optimize=True, threads=threads) for m in (ref_model, cand_model))
    _check_feed_runs(l_ref, sample, "the reference")
    _check_feed_runs(l_cand, sample, "the candidate")
    t_ref, t_cand = _time_alternating([l_ref, l_cand], sample, runs, warmup)
    return {"reference": _latency_summary(t_ref, threads), "candidate": _latency_summary(t_cand, threads)}


def _side(model: ModelProto, path, size: int, latency: Optional[dict], accuracy: Optional[float],
          miou: Optional[float] = None) -> dict:
    summary = stats.summarize(model)
    return {"path": path, "size_bytes": size, "size_mb": size / MB, "nodes": summary["nodes"], "params": summary["params"],
            "macs": summary["macs"], "latency": latency, "accuracy": accuracy, "miou": miou}


def compare_models(
    ref: ModelLike,
    cand: ModelLike,
    data: Union[None, str, os.PathLike, DataSource] = None,
    labels: Union[None, str, os.PathLike, np.ndarray, Sequence[int]] = None,
    runs: int = 20,
    *,
    input_shapes: Optional[dict] = None,
    image: Optional[dict] = None,
    batch_size: int = 1,
    max_samples: Optional[int] = None,
    threads: int = 1,
    warmup: int = 3,
    generated_samples: int = 8,
    gates: Optional[dict] = None,
    progress: bool = False,
    require_preprocessing: bool = False,
) -> dict:
    """Run ``ref`` and ``cand`` on the same inputs and report errors, agreement, accuracy, latency,
    size and MACs as a JSON-able dict. Without ``data`` (a path or a :class:`DataSource`), generated
    inputs are used and a note says so; ``labels`` override the data's own; ``runs=0`` skips latency;
    ``gates`` maps :data:`GATES` to limits (:func:`check_gates` raises :class:`GateFailure`).
    """
    gates = _check_arguments(gates, runs, max_samples, data, labels)
    ref_model, ref_path, ref_size = _load(ref)
    cand_model, cand_path, cand_size = _load(cand)
    _check_inputs_match(ref_model, cand_model)
    unknown = sorted(set(input_shapes or {}) - set(graph_inputs(ref_model)))
    if unknown:
        raise OptionError(f"--input-shape names '{unknown[0]}', which is not an input of the model.",
                          f"the model's inputs are: {', '.join(graph_inputs(ref_model))}")
    notes: list = []
    pairs = _output_pairs(ref_model, cand_model, notes)
    fixed = _fixed_batch(ref_model, cand_model)
    if data is None:
        inputs = _generated_inputs(ref_model, input_shapes, max_samples or generated_samples, notes)
    else:
        inputs = _data_inputs(data, labels, ref_model, cand_model, input_shapes, image, fixed or batch_size, max_samples,
                              require_preprocessing, notes)
    if ("max_drop" in gates) and inputs.labels is None:
        raise OptionError("--max-drop needs labels, and there are none.",
                          "give --labels FILE.npy, an .npz with a 'labels' array, or an image folder with labels.json")

    num = _stream_numerics(ref_model, cand_model, pairs, inputs, progress)
    if inputs.labels is not None and len(inputs.labels) != num.seen:
        notes.append(f"{len(inputs.labels)} labels for {num.seen} evaluated samples; the first {num.seen} were used")
    classifiers = [o for o in num.outputs if o["classifier"]]
    for o in num.outputs:
        if o.get("label_shape_mismatch"):
            notes.append(f"the per-position labels do not match output '{o['name']}' {o['shape']} (one class per position "
                         "of each sample is needed): no accuracy computed for it")
    if inputs.labels is not None and not classifiers:
        notes.append("labels were given but no output is classifier-shaped ([N, C] scores, C > 1, ArgMax class ids, "
                     "or a binary Sigmoid): no accuracy computed")
    if "min_agreement" in gates and not classifiers:
        raise OptionError("--min-agreement needs an output that takes decisions ([N, C] class scores, a Sigmoid's labels, "
                          "or a map ended by an ArgMax/Softmax/Sigmoid); this model has none.",
                          "drop --min-agreement and gate on the error figures instead")

    main = classifiers[0] if classifiers else None
    chance = _labels_look_misnumbered(main, num.seen)
    if chance:
        notes.append(chance)
    latency = _compare_latency(ref_model, cand_model, num.first_sample, runs, threads, warmup)
    result = {
        "reference": _side(ref_model, ref_path, ref_size, latency["reference"], main["ref_accuracy"] if main else None,
                           main.get("ref_miou") if main else None),
        "candidate": _side(cand_model, cand_path, cand_size, latency["candidate"], main["cand_accuracy"] if main else None,
                           main.get("cand_miou") if main else None),
        "data": {"source": inputs.source, "generated": data is None, "samples": num.seen, "labels": inputs.labels is not None,
                 # a class per position: [N, T] labels a sequence's tokens, [N, H, W] a map's pixels
                 "label_dims": None if inputs.labels is None else int(inputs.labels.ndim)},
        "outputs": num.outputs,
        "task_error": num.task_error.to_dict(),
        "task_summary": num.task_error.summary(),
        "notes": notes,
    }
    result["gates"] = _evaluate_gates(result, gates)
    result["passed"] = all(g["passed"] for g in result["gates"])
    return result


# labels the reference model gets right at most this many times chance (1 / classes): they are
# probably numbered otherwise than the model's classes
CHANCE_FACTOR = 2.0
CHANCE_MIN_SAMPLES, CHANCE_MIN_CLASSES = 50, 10


def _labels_look_misnumbered(main: Optional[dict], samples: int) -> Optional[str]:
    """A note when the reference model's top-1 accuracy against the labels is about chance: the
    labels then most likely number the classes otherwise than the model does (class folders in
    another order, a 1001-class TF model's background class at 0), and every accuracy is wrong."""
    if main is None or main.get("decision") != task_metric.TOP1 or main.get("ref_accuracy") is None or not main.get("shape"):
        return None
    classes = task_metric.scores_shape(tuple(main["shape"]))[-1]
    if not isinstance(classes, int) or classes < CHANCE_MIN_CLASSES or samples < CHANCE_MIN_SAMPLES:
        return None
    if main["ref_accuracy"] > CHANCE_FACTOR / classes:
        return None
    return (f"the reference model gets {100 * main['ref_accuracy']:.2f} % of the labels right, about chance for "
            f"{classes} classes: the labels are most likely numbered otherwise than the model's classes (class folders "
            "in another order, a background class at 0 in 1001-class TensorFlow models); give --labels in the model's order")


def _evaluate_gates(result: dict, gates: dict) -> list:
    cand = result["candidate"]
    classifiers = [o for o in result["outputs"] if o["classifier"]]
    measured = {}  # gate -> (what, value, unit)
    if "max_size_mb" in gates:
        measured["max_size_mb"] = ("candidate size", cand["size_mb"], "MB")
    if "max_latency_ms" in gates:
        measured["max_latency_ms"] = ("candidate median latency", cand["latency"]["median_ms"], "ms")
    if "min_agreement" in gates:
        worst = min(classifiers, key=lambda o: o["top1_agreement"])
        measured["min_agreement"] = (f"{task_metric.agreement_name(worst['decision'])} on '{worst['name']}'", 100.0 * worst["top1_agreement"], "%")
    if "max_drop" in gates:
        drops = [(100.0 * (o["ref_accuracy"] - o["cand_accuracy"]), o["name"]) for o in classifiers if o["ref_accuracy"] is not None]
        if not drops:
            raise OptionError("--max-drop needs a classifier-shaped output ([N, C], C > 1) to measure accuracy on; this model has none.",
                              "drop --max-drop")
        value, name = max(drops)
        measured["max_drop"] = (f"accuracy drop on '{name}'", value, "points")
    return [{"gate": gate, "what": what, "value": value, "limit": gates[gate], "unit": unit,
             "passed": value >= gates[gate] if gate == "min_agreement" else value <= gates[gate]}
            for gate, (what, value, unit) in measured.items()]


def gate_failures(result: dict) -> list:
    """Human-readable lines, one per failed gate."""
    sym = {"max_size_mb": ">", "max_latency_ms": ">", "min_agreement": "<", "max_drop": ">"}
    return [f"{g['what']} {g['value']:.4g} {g['unit']} {sym[g['gate']]} {g['limit']:g} {g['unit']} ({g['gate']})"
            for g in result.get("gates", []) if not g["passed"]]


def check_gates(result: dict) -> None:
    """Raise :class:`GateFailure` (exit code 3) listing every failed gate of a compare result."""
    failed = gate_failures(result)
    if failed:
        raise GateFailure(f"{len(failed)} acceptance gate(s) failed: " + "; ".join(failed) + ".",
                          "the candidate does not meet the limits given; see the table above")
