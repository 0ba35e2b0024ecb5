"""onnxruntime helpers: sessions, generated inputs, running a model, comparing outputs. Verification
runs with graph optimizations off: the graph onnxopt wrote is compared, not onnxruntime's rewrite of it."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper

from .errors import DataError, OnnxoptError
from .input_dims import real_inputs, shape_hint


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def session(model: ModelProto | str, *, optimize: bool = False, threads: int = 0, providers: Sequence[str] | None = None,
            quiet: bool = False, arena: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``optimize=False`` disables all graph optimizations.
    ``quiet``: onnxruntime logs nothing, not even a failed run (for runs that probe inputs).
    ``arena=False``: without the CPU memory arena, whose memory a process keeps after the session."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4 if quiet else 3
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = threads
    payload = model if isinstance(model, str) else _serialize(model)
    try:
        return ort.InferenceSession(payload, so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        raise OnnxoptError(
            f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:500]}",
            "the graph uses an op or type onnxruntime's CPU provider lacks, or it is invalid") from None


def _serialize(model: ModelProto) -> bytes:
    if model.ByteSize() >= 2**31 - 2**20:  # pragma: no cover - needs a >2 GB model
        raise OnnxoptError("models over 2 GB are verified from a file; save the model first", None)
    return model.SerializeToString()


def input_specs(model: ModelProto, overrides: Optional[dict] = None) -> list:
    """[(name, shape, np.dtype)] of the model's real inputs: a symbolic axis 0 (batch) becomes 1,
    another must be given in ``overrides`` ({name: shape}), else an error says how."""
    specs = []
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxoptError(f"input '{vi.name}' is not a tensor; onnxopt can only generate tensor inputs.", "provide data with --data")
        dtype = np_dtype(tt.elem_type)
        if overrides and vi.name in overrides:
            shape = [int(d) for d in overrides[vi.name]]
        else:
            shape = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(int(d.dim_value))
                elif axis == 0:
                    shape.append(1)
                else:
                    raise OnnxoptError(
                        f"input '{vi.name}' has a dynamic dimension {axis} ('{d.dim_param or '?'}'); onnxopt needs a concrete shape to generate inputs.",
                        f"give it with --input-shape {shape_hint(vi)} (your real sizes), or provide --data")
        specs.append((vi.name, shape, dtype))
    return specs


def generate_inputs(model: ModelProto, *, seed: int = 0, overrides: Optional[dict] = None) -> dict:
    """One feed dict of random inputs with the model's shapes and dtypes (normal floats, small ints)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape, dtype in input_specs(model, overrides):
        if dtype.kind not in "fbiu":
            raise OnnxoptError(f"cannot generate inputs of dtype {dtype} for '{name}'.", "provide data with --data")
        high = 2 if dtype.kind == "b" else 8  # floats standard normal, bools and small ints uniform
        feed[name] = (rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, high, shape)).astype(dtype)
    return feed


def run(model_or_session, feed: dict, outputs: Optional[Sequence[str]] = None) -> dict:
    sess = model_or_session if isinstance(model_or_session, ort.InferenceSession) else session(model_or_session)
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feed)
    except Exception as exc:
        raise DataError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0][:500]}",
                        "check that the data matches the model's inputs (names, shapes, dtypes)") from None
    return dict(zip(names, values))


def tensor_error(ref: np.ndarray, cand: np.ndarray) -> tuple:
    """(max abs, max abs relative to the reference's largest finite magnitude) of one tensor pair. Equal
    infinities (a masked attention score) and NaN vs NaN are no error, a one-sided NaN or a shape mismatch
    infinite; a non-float tensor's error is 1 if any element differs."""
    if ref.shape != cand.shape:
        return math.inf, math.inf
    if ref.dtype.kind not in "fc":
        diff = float(np.any(ref != cand))
        return diff, diff
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    both_nan = np.isnan(r64) & np.isnan(c64)
    with np.errstate(invalid="ignore"):
        d = np.where(both_nan | (r64 == c64), 0.0, np.abs(r64 - c64))
    diff = float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0
    scale = float(np.max(np.abs(r64[np.isfinite(r64)]))) if np.isfinite(r64).any() else 1.0
    return diff, diff / max(scale, 1e-12)


def output_error(ref: dict, cand: dict) -> dict:
    """Max abs and max relative (:func:`tensor_error`) error over all common outputs. ``rtol_floor``:
    4 epsilons of the least precise float output, as an exact rewrite of a float16 graph may move
    where onnxruntime's fp16 kernels round by an ulp."""
    max_abs, max_rel, worst, floor = 0.0, 0.0, None, 0.0
    for name, r in ref.items():
        if name not in cand:
            continue
        c = cand[name]
        if r.shape != c.shape:
            return {"max_abs": math.inf, "max_rel": math.inf, "worst_output": name, "reason": f"shape {r.shape} vs {c.shape}"}
        if r.dtype.kind == "f":
            floor = max(floor, 4 * float(np.finfo(r.dtype).eps))
        diff, rel = tensor_error(r, c)
        if diff > max_abs:
            max_abs, worst = diff, name
        max_rel = max(max_rel, rel)
    return {"max_abs": max_abs, "max_rel": max_rel, "worst_output": worst, "rtol_floor": floor}


def with_outputs(model: ModelProto, tensors: Iterable[str]) -> ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (intermediate tensors exposed for onnxruntime to return)."""
    probe = ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name)
                              for name in dict.fromkeys(tensors) if name and name not in known)
    return probe


def intermediate_shapes(model: ModelProto, tensors: Iterable[str], *, overrides: Optional[dict] = None) -> dict:
    """Shapes of ``tensors`` from one onnxruntime run on generated inputs (for dynamic shape chains)."""
    wanted = [t for t in dict.fromkeys(tensors) if t]
    outs = run(session(with_outputs(model, wanted)), generate_inputs(model, overrides=overrides), wanted)
    return {k: list(v.shape) for k, v in outs.items()}


def profile_kernels(model: ModelProto, feed: dict, runs: int, *, optimize: bool = False, threads: int = 0,
                    with_graph: bool = False) -> tuple:
    """``({node name: [ms of each run]}, graph)`` from onnxruntime's profiler over ``runs`` runs of
    ``feed``: the names are those of the graph onnxruntime executed (after its fusions when
    ``optimize``), ``graph`` that graph when ``with_graph``, else None."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_profiling = True
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "profile")
        if with_graph:
            so.optimized_model_filepath = os.path.join(tmp, "executed.onnx")
        sess = ort.InferenceSession(_serialize(model), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False) if with_graph else None
    times: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            times.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
    return times, graph


def cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def cpu_flags() -> set:
    """This CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def int8_kernels_saturate() -> bool:
    """True on an x86 CPU with AVX2 and no VNNI. There onnxruntime's fused u8 x s8 kernels add
    pairs of products in int16 (vpmaddubsw), which saturates once stored weights pass +-64;
    VNNI (vpdpbusd) sums into int32. False where the flags cannot be read."""
    flags = cpu_flags()
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}
