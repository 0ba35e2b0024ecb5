"""Streaming calibration: clipping ranges of activations, and per-channel ranges of weights.

How statistics are gathered
---------------------------
One onnxruntime session runs a copy of the model whose extra graph outputs are the tensors to
calibrate (basic graph optimizations only: constant folding never renames a graph output, and
fusions that would hide an intermediate tensor are not applied). Each batch's outputs are reduced
at once into per-tensor min, max and, for histogram methods, a
:class:`~onnxopt.quant.histogram.SignedHistogram` (``2 * num_bins`` bins per sign, so that at least
``num_bins`` bins cover ``[0, amax]``), then dropped: peak memory is one batch of activations plus
fixed-size state, whatever the number of samples (a batch whose outputs would exceed
``config.max_batch_mb`` runs in slices along the batch axis). Histograms grow by exact doubling,
so the statistics do not depend on the batch size, the batch order or the number of workers:
``workers > 1`` processes ("spawn", ``cpu_count // workers`` intra-op threads each), fed by the
parent through a bounded queue, give one worker's result.

Range methods
-------------
``minmax`` takes the extremes; ``percentile`` the ``p``-th percentile of ``|x|`` (asymmetric: the
``(100-p)/2`` and ``100-(100-p)/2`` percentiles of ``x``), never beyond min/max; ``entropy``
TensorRT's KL-divergence threshold (asymmetric: each sign's side searched separately); ``mse`` the
clip minimising the expected quantization error for ``bits``. Asymmetric ranges always contain 0
(so zero is exactly representable). A constant-zero tensor gets ``(0.0, 0.0)``; the caller picks a
scale for it.

Cache
-----
``config.cache`` is a JSON file of each tensor's min/max and range, keyed on the model's
fingerprint, the data (source, selection, image options, input shapes, the files' sizes and
mtimes; for a bare callable, a sha256 of all its batches) and the settings that change ranges. A
matching cache is reused (also for a subset of its tensors); any difference is refused with an
:class:`OnnxoptError` that says what differs. Writes are atomic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from .. import errors as _errors
from ..progress import progress_bar
from ..data import feed_samples
from ..errors import DataError, OnnxoptError, OptionError
from ..model_io import fingerprint, write_text_atomic
from ..runtime import cpu_count, with_outputs
from . import histogram as H
from .trt_table import DEFAULT_TRT_VERSION, read_trt_calibration_table, write_trt_calibration_table

METHODS = ("minmax", "percentile", "entropy", "mse")
CACHE_FORMAT = "onnxopt-calibration-cache"
CACHE_VERSION = 1
QUEUE_PER_WORKER = 2          # batches buffered per worker: bounds the parent's memory

__all__ = [
    "CalibConfig", "TensorStats", "calibrate", "channel_ranges", "collect_statistics", "compute_range", "weight_ranges",
    "write_trt_calibration_table", "read_trt_calibration_table", "METHODS",
]


@dataclass
class CalibConfig:
    method: str = "minmax"          # minmax | percentile | entropy | mse | auto
    search: str = "uniform"         # auto's search (uniform | per_tensor): part of the cache key, its choice differs
    percentile: float = 99.99
    num_bins: int = 2048            # histogram bins over [0, amax] at least (power of two)
    workers: int = 1                # processes whose statistics merge
    progress: bool = True
    cache: Optional[str] = None     # --calib-cache FILE
    trt_table: Optional[str] = None  # also write a TensorRT calibration table here
    batch_size: Optional[int] = None  # re-batch a DataSource (None: the source's own batch size)
    threads: int = 0                # intra-op threads of the single-process session (0: onnxruntime's default)
    trt_version: str = DEFAULT_TRT_VERSION  # header of the TensorRT table
    optimize: str = "basic"         # onnxruntime graph optimizations of the calibration session: none | basic | all
    max_batch_mb: int = 1024        # run a batch in slices when its calibrated outputs would exceed this (0: never)


@dataclass
class TensorStats:
    """Statistics of one tensor merged over all batches (and workers)."""

    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    hist: Optional[H.SignedHistogram] = None

    @property
    def amax(self) -> float:
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    def update(self, arr: np.ndarray, name: str = "?", batch: int = 0) -> None:
        a = np.asarray(arr)
        if a.size == 0:
            return
        if a.dtype.kind != "f":
            raise OnnxoptError(f"tensor '{name}' is {a.dtype}; only floating-point tensors are calibrated.",
                               "calibrate the float tensors only (integer tensors are not quantized)")
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"tensor '{name}' holds NaN or Inf on calibration batch {batch}.",
                            "the model overflows on this data (check the preprocessing), or the model itself is broken")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(a.size)
        if self.hist is not None:
            self.hist.add(a, max(-lo, hi), lo)

    def merge(self, other: "TensorStats") -> None:
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        if self.hist is not None and other.hist is not None:
            self.hist.merge(other.hist)


# -- validation helpers -------------------------------------------------------------------

def _check_config(config: CalibConfig, bits: int, auto: bool = False) -> None:
    if config.method not in METHODS and not (auto and config.method == "auto"):
        raise OptionError(f"unknown calibration method '{config.method}'.", f"choose one of: {', '.join(METHODS)}")
    if not (0.0 < float(config.percentile) <= 100.0):
        raise OptionError(f"percentile must be in (0, 100], got {config.percentile}.", "e.g. 99.99")
    if not H.is_power_of_two(int(config.num_bins)) or not (128 <= config.num_bins <= 1 << 16):
        raise OptionError(f"num_bins must be a power of two in [128, 65536], got {config.num_bins}.",
                          "histogram ranges grow by doubling, which is exact only with power-of-two bin counts; e.g. 2048")
    if int(config.workers) < 1:
        raise OptionError(f"workers must be at least 1, got {config.workers}.", "use --calib-workers 1 or more")
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise OptionError(f"bits must be an integer in [2, 16], got {bits}.", "activation bits are 2..8 (16 for int16 fallback)")
    if config.optimize not in OPT_LEVELS:
        raise OptionError(f"unknown optimization level '{config.optimize}' for the calibration session.", f"choose one of: {', '.join(OPT_LEVELS)}")
    if config.batch_size is not None and config.batch_size < 1:
        raise OptionError(f"batch size must be at least 1, got {config.batch_size}.", "use --batch-size 1 or more")


def _per_tensor(value, tensors: list, what: str) -> dict:
    if not isinstance(value, Mapping):
        return dict.fromkeys(tensors, bool(value))
    missing = [t for t in tensors if t not in value]
    if missing:
        raise OptionError(f"'{what}' does not say which way to calibrate {len(missing)} tensor(s): {', '.join(missing[:5])}.",
                          f"give '{what}' for every calibrated tensor, or one bool for all")
    return {t: bool(value[t]) for t in tensors}


def _graph_tensors(model: ModelProto) -> tuple:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    produced = {o for n in model.graph.node for o in n.output if o}
    return inputs, produced, inits


# -- statistics collection ----------------------------------------------------------------

def _augmented(model: ModelProto, fetch: list) -> bytes:
    """The model with the tensors in ``fetch`` added as graph outputs, serialized."""
    aug = with_outputs(model, fetch)
    if aug.ByteSize() >= 2**31 - 2**20:  # pragma: no cover - needs a >2 GB model
        raise OnnxoptError("calibration of models over 2 GB is not supported yet.", "calibrate a model under 2 GB")
    return aug.SerializeToString()


OPT_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}


def _session(payload, threads: int, optimize: str = "basic") -> ort.InferenceSession:
    # any level keeps graph outputs (the calibrated tensors) by name; "all" adds fusions and
    # blocked layouts (faster on x86, values equal up to float rounding)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[optimize])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime cannot load the calibration model: {str(exc).strip().splitlines()[0][:500]}",
                           "the graph uses an op or type onnxruntime's CPU provider lacks, or it is invalid") from None


class _Collector:
    """One session + per-tensor statistics; ``update(feed)`` reduces one batch, in slices along axis 0
    when its calibrated outputs would exceed ``max_bytes`` (so that many or large tensors fit)."""

    def __init__(self, payload, tensors: list, from_feed: list, hist_bins: Optional[int], threads: int,
                 optimize: str = "basic", max_bytes: int = 0):
        self.fetch = [t for t in tensors if t not in set(from_feed)]
        self.from_feed = from_feed
        self.sess = _session(payload, threads, optimize)
        self.stats = {t: TensorStats(hist=H.SignedHistogram(hist_bins) if hist_bins else None) for t in tensors}
        self.batches = 0
        self.max_bytes = int(max_bytes)
        self.per_sample: Optional[int] = None
        # a model whose batch dimension is fixed must be fed whole batches: never slice them
        self.fixed_batch = any(isinstance(i.shape[0], int) for i in self.sess.get_inputs() if i.shape)

    def update(self, feed: dict) -> int:
        n = feed_samples(feed)
        if self.fetch:
            can_split = (n > 1 and self.max_bytes > 0 and not self.fixed_batch
                         and all(np.ndim(v) >= 1 and np.shape(v)[0] == n for v in feed.values()))
            start = 0
            while start < n:
                k = n
                if can_split:            # the first batch's first sample measures the outputs' size
                    k = (1 if self.per_sample is None
                         else max(1, min(n - start, self.max_bytes // max(self.per_sample, 1))))
                part = feed if k == n else {name: np.asarray(v)[start:start + k] for name, v in feed.items()}
                self._run(part, k)
                start += k
        for name in self.from_feed:
            self.stats[name].update(feed[name], name, self.batches)
        self.batches += 1
        return n

    def _run(self, feed: dict, n: int) -> None:
        try:
            outs = self.sess.run(self.fetch, feed)
        except Exception as exc:
            raise DataError(f"onnxruntime failed to run the model on calibration batch {self.batches}: "
                            f"{str(exc).strip().splitlines()[0][:500]}",
                            "check that the data matches the model's inputs (names, shapes, dtypes)") from None
        size = sum(int(getattr(o, "nbytes", 0)) for o in outs) // max(n, 1)
        self.per_sample = max(self.per_sample or 0, size)
        # reduce and drop one output at a time
        for i, name in enumerate(self.fetch):
            arr, outs[i] = outs[i], None
            self.stats[name].update(arr, name, self.batches)


def _iter_batches(data, batch_size: Optional[int]) -> Iterator[dict]:
    if hasattr(data, "batches") and callable(getattr(data, "batches")):
        yield from data.batches(batch_size)
    elif callable(data):
        yield from data()
    else:
        raise OptionError(f"calibration data must be a DataSource or a callable returning feed dicts, not {type(data).__name__}.",
                          "open it with onnxopt.data.open_data(...)")


def _total(data) -> Optional[int]:
    try:
        return data.count() if hasattr(data, "count") else None
    except OnnxoptError:  # a source that cannot count without reading: the progress bar has no total
        return None


def collect_statistics(model: ModelProto, tensors: list, data, config: CalibConfig) -> dict:
    """Per-tensor :class:`TensorStats` over all of ``data`` (streaming; see module doc)."""
    tensors = list(dict.fromkeys(tensors))
    inputs, produced, inits = _graph_tensors(model)
    unknown = [t for t in tensors if t not in produced and t not in inputs]
    if unknown:
        raise OnnxoptError(
            f"cannot calibrate {len(unknown)} tensor(s) not computed in the main graph: {', '.join(unknown[:5])}"
            + (" (initializers: their ranges come from weight_ranges)" if any(t in inits for t in unknown) else "") + ".",
            "calibrate activations of the main graph (tensors inside If/Loop bodies are not reachable as outputs)")
    from_feed = [t for t in tensors if t in inputs]
    hist_bins = 2 * int(config.num_bins) if config.method != "minmax" else None
    payload = _augmented(model, [t for t in tensors if t not in from_feed])
    workers = int(config.workers)
    bar = progress_bar(_total(data), f"calibrating {len(tensors)} tensors ({config.method})", config.progress)
    try:
        if workers == 1:
            col = _Collector(payload, tensors, from_feed, hist_bins, int(config.threads), config.optimize, config.max_batch_mb << 20)
            for feed in _iter_batches(data, config.batch_size):
                bar.update(col.update(feed))
            stats, nbatches = col.stats, col.batches
        else:
            # the model travels through a temporary file: process arguments stay small
            fd, model_file = tempfile.mkstemp(prefix="onnxopt-calib-", suffix=".onnx")
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            try:
                stats, nbatches = _run_workers(model_file, tensors, from_feed, hist_bins, data, config, workers, bar)
            finally:
                os.unlink(model_file)
    finally:
        bar.close()
    if nbatches == 0:
        raise DataError("the calibration data yielded no batches.", "check --calib-data and --calib-samples")
    return stats


def channel_ranges(model: ModelProto, tensors: list, data, config: Optional[CalibConfig] = None, axis: int = 1) -> dict:
    """Per-channel ``(lo[C], hi[C])`` along ``axis`` of each tensor: the min/max over every other
    axis and every batch (streaming, one session; per-channel activation quantizers take minmax
    ranges, as NNCF's do)."""
    config = config or CalibConfig()
    inputs = _graph_tensors(model)[0]
    fetch = [t for t in dict.fromkeys(tensors) if t not in inputs]
    sess = _session(_augmented(model, fetch), int(config.threads), config.optimize) if fetch else None
    lo, hi = {}, {}
    for b, feed in enumerate(_iter_batches(data, config.batch_size)):
        outs = dict(zip(fetch, sess.run(fetch, feed))) if sess is not None else {}
        for t in dict.fromkeys(tensors):
            a = np.asarray(outs[t] if t in outs else feed[t])
            other = tuple(i for i in range(a.ndim) if i != axis)
            mn, mx = a.min(axis=other).astype(np.float64), a.max(axis=other).astype(np.float64)
            if not (np.all(np.isfinite(mn)) and np.all(np.isfinite(mx))):
                raise DataError(f"tensor '{t}' holds NaN or Inf on calibration batch {b}.",
                                "the model overflows on this data (check the preprocessing), or the model itself is broken")
            lo[t] = np.minimum(lo[t], mn) if t in lo else mn
            hi[t] = np.maximum(hi[t], mx) if t in hi else mx
    if len(lo) != len(set(tensors)):
        raise DataError("the calibration data yielded no batches.", "check --calib-data and --calib-samples")
    return {t: (lo[t], hi[t]) for t in lo}


# -- worker processes ---------------------------------------------------------------------

def _worker_main(model_file, tensors, from_feed, hist_bins, threads, optimize, max_bytes, in_q, out_q) -> None:  # pragma: no cover - runs in a child
    try:
        col = _Collector(model_file, tensors, from_feed, hist_bins, threads, optimize, max_bytes)
        for feed in iter(in_q.get, None):        # None: no more batches
            out_q.put(("progress", col.update(feed)))
        out_q.put(("done", col.batches, col.stats))     # TensorStats and their histograms pickle as they are
    except OnnxoptError as exc:
        out_q.put(("error", type(exc).__name__, exc.message, exc.hint))
    except BaseException:
        out_q.put(("crash", traceback.format_exc()))


def _raise_from_worker(msg: tuple):
    if msg[0] == "error":
        cls = getattr(_errors, msg[1], OnnxoptError)
        if not (isinstance(cls, type) and issubclass(cls, OnnxoptError)):
            cls = OnnxoptError
        err = cls.__new__(cls)
        OnnxoptError.__init__(err, msg[2], msg[3])
        raise err
    raise RuntimeError(f"a calibration worker crashed:\n{msg[1]}")


def _run_workers(model_file, tensors, from_feed, hist_bins, data, config, workers, bar):
    ctx = mp.get_context("spawn")
    threads = max(1, cpu_count() // workers)
    in_q = ctx.Queue(maxsize=QUEUE_PER_WORKER * workers)
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(model_file, tensors, from_feed, hist_bins, threads, config.optimize, config.max_batch_mb << 20, in_q, out_q), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    results: list = []

    def drain(block: bool, timeout: float = 0.1) -> None:
        while True:
            try:
                msg = out_q.get(block=block, timeout=timeout) if block else out_q.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "progress":
                bar.update(msg[1])
            elif msg[0] == "done":
                results.append(msg)
            else:
                _raise_from_worker(msg)
            block = False

    def alive_check() -> None:
        dead = [p for p in procs if not p.is_alive()]
        if len(dead) > len(results):
            drain(True, 0.5)                 # a finished worker's last message may still be in the pipe
            if len(dead) > len(results):
                code = next((p.exitcode for p in dead if p.exitcode), 0)
                raise RuntimeError(f"a calibration worker ended without its statistics (exit code {code}); out of memory? "
                                   "(scripts that use workers > 1 need an `if __name__ == '__main__':` guard)")

    def put(item) -> None:  # a full queue: take results meanwhile, so the workers can go on
        while True:
            try:
                in_q.put(item, timeout=0.1)
                return
            except queue.Full:
                drain(False)
                alive_check()

    try:
        for feed in _iter_batches(data, config.batch_size):
            put(feed)
            drain(False)
        for _ in procs:
            put(None)
        while len(results) < workers:
            drain(True, 0.2)
            alive_check()
    finally:
        if len(results) < workers:
            # on failure nobody reads the queues any more: do not block the exit on them
            in_q.cancel_join_thread()
            out_q.cancel_join_thread()
        for p in procs:
            p.join(timeout=5 if len(results) == workers else 0.5)
            if p.is_alive():
                p.terminate()
                p.join()
    merged = results[0][2]
    for _, _, stats in results[1:]:
        for t, st in stats.items():
            merged[t].merge(st)
    return merged, sum(n for _, n, _ in results)


# -- ranges from statistics ---------------------------------------------------------------

def compute_range(stats: TensorStats, method: str, *, symmetric: bool = True, unsigned: bool = False,
                  bits: int = 8, percentile: float = 99.99) -> tuple:
    """The clipping range (lo, hi) of one tensor from its statistics (see module doc)."""
    if method not in METHODS:
        raise OptionError(f"unknown calibration method '{method}'.", f"choose one of: {', '.join(METHODS)}")
    if stats.count == 0:
        return (0.0, 0.0)
    mn, mx, amax = stats.min, stats.max, stats.amax
    if method == "minmax":
        if unsigned:
            return (0.0, max(mx, 0.0))
        if symmetric:
            return (-amax, amax)
        return (min(mn, 0.0), max(mx, 0.0))
    h = stats.hist
    if h is None:
        raise OnnxoptError(f"method '{method}' needs histograms, but the statistics were collected for minmax.",
                           "collect statistics with the same method")
    if h.exp is None:                       # only zeros were seen
        return (0.0, 0.0)
    w = h.width
    q = float(percentile) / 100.0
    signed_levels = 2 ** (bits - 1)
    if unsigned or symmetric:
        counts = h.positive() if unsigned else h.folded()
        top = max(mx, 0.0) if unsigned else amax
        if method == "percentile":
            t = H.percentile_value(counts, w, q)
        elif method == "entropy":
            t = H.entropy_threshold(counts, w, 2 ** bits if unsigned else signed_levels)
        else:  # mse
            t = H.mse_threshold(counts, w, 2 ** bits - 1 if unsigned else signed_levels - 1)
        t = float(min(t, top))
        return (0.0, t) if unsigned else (-t, t)
    # asymmetric
    if method == "percentile":
        cut = (1.0 - q) / 2.0
        lo, hi = max(H.signed_percentile(h, cut), mn), min(H.signed_percentile(h, 1.0 - cut), mx)
    elif method == "entropy":
        # one sign only (e.g. after a ReLU): all 2**bits levels go to that side
        side_levels = signed_levels if (mn < 0 < mx) else 2 ** bits
        hi = min(H.entropy_threshold(h.positive(), w, side_levels), mx) if mx > 0 else 0.0
        lo = -min(H.entropy_threshold(h.negative(), w, side_levels), -mn) if mn < 0 else 0.0
    else:
        lo, hi = H.asym_mse_range(h, min(mn, 0.0), max(mx, 0.0), 2 ** bits - 1)
    return (float(min(lo, 0.0)), float(max(hi, 0.0)))


# -- cache --------------------------------------------------------------------------------

def _file_stats(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p.name}\0missing\n".encode())
    return h.hexdigest()[:16]


def _data_key(data, config: CalibConfig) -> Optional[dict]:
    spec = getattr(data, "spec", None)
    if spec is None or not hasattr(spec, "source"):
        return None      # a bare callable: identified by the content of all its batches (_ContentHash)
    src = str(spec.source)
    key = {
        "source": src,
        "every": spec.every, "offset": spec.offset, "exclude_every": spec.exclude_every,
        "max_samples": spec.max_samples,
        "image": dataclasses.asdict(spec.image) if dataclasses.is_dataclass(spec.image) else repr(spec.image),
        "input_shapes": {k: list(v) for k, v in (getattr(data, "_overrides", None) or {}).items()},
    }
    if src != "random":
        file, sep, func = src.rpartition(":") if ".py:" in src else (src, "", "")
        path = Path(file)
        key["source"] = str(path.resolve()) + sep + func
        key["files"] = _file_stats(sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path])
    return key


class _ContentHash:
    """sha256 of every batch a data callable yields (names, dtypes, shapes, bytes) and the sample count.

    A bare callable has no path to fingerprint, so its cache key is its content: hashed on the fly
    during collection (a miss costs nothing extra) and by one pass without inference on a hit.
    """

    def __init__(self):
        self.h = hashlib.sha256()
        self.samples = 0

    def wrap(self, data, batch_size):
        def gen():
            for feed in _iter_batches(data, batch_size):
                self.add(feed)
                yield feed
        return gen

    def add(self, feed: dict) -> None:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            self.h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            self.h.update(a.tobytes())
        self.samples += feed_samples(feed)

    def key(self) -> dict:
        return {"source": "callable", "content_sha256": self.h.hexdigest()[:16], "samples": self.samples}


def _settings_key(config: CalibConfig, bits: int) -> dict:
    s: dict = {"method": config.method}
    if config.method in ("percentile", "auto"):  # auto's choice also depends on the percentile candidate
        s["percentile"] = float(config.percentile)
    if config.method != "minmax":
        s["num_bins"] = int(config.num_bins)
    if config.method in ("entropy", "mse", "auto"):
        s["bits"] = int(bits)
    if config.method in ("entropy", "auto"):   # a cache from before the spike cap holds other entropy ranges
        s["entropy"] = "spikes capped"
    if config.method != "minmax":   # nor did it keep the output tail's full range
        s["output_tail"] = "minmax"
    if config.method == "auto":  # and on the search
        s["search"] = f"{config.search}, by noise-to-signal"   # the measure is named: a cache chosen by another is refused
    return s


def _describe(a, b) -> str:
    text = f"{'(unset)' if a is None else repr(a)} -> {'(unset)' if b is None else repr(b)}"
    return text if len(text) < 160 else text[:157] + "..."


def _load_cache(path: Path, key: dict, tensors: list, sym: dict, uns: dict) -> Optional[dict]:
    if not path.exists():
        return None
    stale_hint = f"delete '{path}' to recalibrate, or pass another --calib-cache path"
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != CACHE_FORMAT:
            raise ValueError("not an onnxopt calibration cache")
    except (OSError, ValueError) as exc:
        raise OnnxoptError(f"calibration cache '{path}' is unreadable ({exc}).", stale_hint) from None
    diffs = []
    if doc.get("version") != CACHE_VERSION:
        diffs.append(f"cache format version {doc.get('version')} (this onnxopt writes {CACHE_VERSION})")
    if doc.get("model") != key["model"]:
        diffs.append(f"model fingerprint {doc.get('model')} -> {key['model']} (the model changed)")
    for section in ("data", "settings"):
        old, new = doc.get(section, {}), key[section]
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                what = k if section == "settings" else "data files (sizes/mtimes)" if k == "files" else f"data {k}"
                diffs.append(f"{what}: {_describe(old.get(k), new.get(k))}")
    entries = doc.get("tensors", {})
    missing = [t for t in tensors if t not in entries]
    if missing:
        diffs.append(f"{len(missing)} tensor(s) not in the cache: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    flipped = [t for t in tensors if t in entries and (entries[t].get("symmetric") != sym[t] or entries[t].get("unsigned") != uns[t])]
    if flipped:
        diffs.append(f"symmetric/unsigned changed for {len(flipped)} tensor(s): {', '.join(flipped[:3])}")
    if diffs:
        raise OnnxoptError(f"calibration cache '{path}' is stale: " + "; ".join(diffs) + ".", stale_hint)
    return {t: (float(entries[t]["range"][0]), float(entries[t]["range"][1])) for t in tensors}


def _save_cache(path: Path, key: dict, ranges: dict, stats: dict, sym: dict, uns: dict) -> None:
    doc = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "model": key["model"], "data": key["data"], "settings": key["settings"],
        "tensors": {t: {"range": [float(lo), float(hi)], "min": float(stats[t].min), "max": float(stats[t].max),
                        "symmetric": sym[t], "unsigned": uns[t]} for t, (lo, hi) in ranges.items()},
    }
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True))


# -- public entry points ------------------------------------------------------------------

def calibrate(model: ModelProto, tensors: list, data, config: Optional[CalibConfig] = None, *,
              symmetric: Union[Mapping[str, bool], bool] = True, unsigned: Union[Mapping[str, bool], bool] = False,
              bits: int = 8, choose=None, unclipped: Iterable[str] = ()) -> dict:
    """Clipping range ``(lo, hi)`` per tensor (see module doc).

    ``data`` is a :class:`onnxopt.data.DataSource` or a callable returning an iterable of feed
    dicts. ``symmetric``/``unsigned`` are one bool or ``{tensor: bool}``; ``lo == -hi`` when
    symmetric, ``lo == 0`` when unsigned. ``config.method == "auto"`` needs ``choose``:
    ``choose(candidates, seconds) -> ranges`` picks among every method's range
    (``{tensor: {method: (lo, hi)}}``, :mod:`onnxopt.quant.calib_search`), ``seconds`` being the
    statistics pass's time. The tensors in ``unclipped`` take their minmax range whatever the
    method (the graph's output tail, :func:`onnxopt.quant.placement.output_tail`).
    """
    config = config or CalibConfig()
    _check_config(config, bits, auto=choose is not None)
    if config.method == "auto" and choose is None:
        raise OptionError("calibration method 'auto' needs a way to choose among the methods.",
                          f"choose one of: {', '.join(METHODS)}")
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        return {}
    sym, uns = _per_tensor(symmetric, tensors, "symmetric"), _per_tensor(unsigned, tensors, "unsigned")
    if config.trt_table and bits != 8:
        raise OptionError(f"a TensorRT calibration table holds int8 ranges, but bits={bits}.", "write the table only for 8-bit calibration")
    ranges = key = hasher = None
    if config.cache:
        key = {"model": fingerprint(model), "data": _data_key(data, config), "settings": _settings_key(config, bits)}
        if Path(config.cache).exists():
            if key["data"] is None:                 # verify a bare callable's content: one pass, no inference
                hasher = _ContentHash()
                for feed in _iter_batches(data, config.batch_size):
                    hasher.add(feed)
                key["data"] = hasher.key()
            ranges = _load_cache(Path(config.cache), key, tensors, sym, uns)
    if ranges is None:
        source = data
        if config.cache and key["data"] is None:   # hash the content while it streams
            hasher = _ContentHash()
            source = hasher.wrap(data, config.batch_size)
        t_stats = time.perf_counter()
        stats = collect_statistics(model, tensors, source, config)
        methods = METHODS if config.method == "auto" else (config.method,)
        unclipped = set(unclipped)
        candidates = {t: {m: compute_range(stats[t], "minmax" if t in unclipped else m, symmetric=sym[t], unsigned=uns[t],
                                           bits=bits, percentile=config.percentile) for m in methods} for t in tensors}
        ranges = (choose(candidates, time.perf_counter() - t_stats) if config.method == "auto"
                  else {t: candidates[t][config.method] for t in tensors})
        if config.cache:
            key["data"] = key["data"] or hasher.key()
            _save_cache(Path(config.cache), key, ranges, stats, sym, uns)
    if config.trt_table:
        version = config.trt_version
        if config.method == "minmax" and version == DEFAULT_TRT_VERSION:
            version = version.replace("EntropyCalibration2", "MinMaxCalibration")
        write_trt_calibration_table({t: max(abs(lo), abs(hi)) for t, (lo, hi) in ranges.items()}, config.trt_table, version)
    return ranges


def weight_ranges(w: np.ndarray, axis: Optional[int] = None, method: str = "minmax", bits: int = 8,
                  symmetric: bool = True) -> tuple:
    """Per-channel (``axis``) or per-tensor (``axis=None``) ranges ``(lo, hi)`` of a weight, of shape ``(C,)`` (or 0-d).

    ``minmax``: the extremes (symmetric: ``±max|w|``; asymmetric ranges contain 0). ``mse``: per
    channel, the shrink factor of that range minimising the squared quantization error of the
    weights themselves for ``bits``, searched on a coarse grid then refined.
    """
    if method not in ("minmax", "mse"):
        raise OptionError(f"unknown weight range method '{method}'.", "choose minmax or mse")
    if not 2 <= bits <= 16:
        raise OptionError(f"bits must be in [2, 16], got {bits}.", "weight bits are 2..8")
    a = np.asarray(w, np.float64)
    if not np.isfinite(a).all():
        raise DataError("a weight holds NaN or Inf values.", "the model is broken; re-export it")
    if axis is None:
        flat = a.reshape(1, -1)
    else:
        ax = axis + a.ndim if axis < 0 else axis
        if not 0 <= ax < a.ndim:
            raise OptionError(f"axis {axis} is out of range for a weight of rank {a.ndim}.", "per-channel axis must be a valid dimension")
        flat = np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1)
    if flat.shape[1] == 0:
        lo = hi = np.zeros(flat.shape[0])
    else:
        mn, mx = np.minimum(flat.min(axis=1), 0.0), np.maximum(flat.max(axis=1), 0.0)
        amax = np.maximum(-mn, mx)
        lo, hi = (-amax, amax) if symmetric else (mn, mx)
        if method == "mse":
            f = _best_shrink(flat, lo, hi, bits, symmetric)
            lo, hi = lo * f, hi * f
    if axis is None:
        return np.asarray(lo[0]), np.asarray(hi[0])
    return lo, hi


def _fake_quant(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(hi / qmax, 1e-30)[:, None]
        return np.clip(np.rint(x / s), -qmax, qmax) * s
    levels = 2 ** bits - 1
    s = np.maximum((hi - lo) / levels, 1e-30)[:, None]
    zp = np.rint(-lo[:, None] / s)
    return (np.clip(np.rint(x / s) + zp, 0, levels) - zp) * s


def _best_shrink(flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, grid: int = 40) -> np.ndarray:
    """Per-row shrink factor f in (0, 1] of (lo, hi) minimising the quantization MSE."""
    rows = flat.shape[0]
    best_f = np.ones(rows)
    best_e = ((flat - _fake_quant(flat, lo, hi, bits, symmetric)) ** 2).sum(axis=1)
    for f in np.arange(1, grid) / grid:
        e = ((flat - _fake_quant(flat, lo * f, hi * f, bits, symmetric)) ** 2).sum(axis=1)
        better = e < best_e
        best_f, best_e = np.where(better, f, best_f), np.where(better, e, best_e)
    step = 1.0 / grid
    for k in range(-4, 5):                  # refine around each row's best factor
        f = np.clip(best_f + k * step / 5, step / 5, 1.0)
        e = ((flat - _fake_quant(flat, lo * f, hi * f, bits, symmetric)) ** 2).sum(axis=1)
        better = e < best_e
        best_f, best_e = np.where(better, f, best_f), np.where(better, e, best_e)
    return best_f
