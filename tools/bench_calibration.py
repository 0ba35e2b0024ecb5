"""Calibration cost: onnxopt's streaming calibration vs onnxruntime's quantize_static.

Each measurement runs in its own subprocess (so that peak memory is that run's alone):

* ``ours``: ``onnxopt.quant.calibrate.calibrate`` over the tensors the qdq pass calibrates (the
  inputs of every Conv/Gemm/MatMul and the non-constant Add inputs), method ``--method``;
* ``ort``: ``onnxruntime.quantization.quantize_static`` (QDQ, S8/S8, per-channel, the same op types
  ``Conv, Gemm, MatMul, Add``, ``CalibrationMethod.Entropy`` etc.) fed by a CalibrationDataReader
  over the same preprocessed samples.

Wall time is measured inside the child around the call (model loaded, imports done); peak RSS is
the child's ``ru_maxrss`` from ``os.wait4`` and, for multi-process runs, the peak of the summed
RSS of the child's process tree sampled from /proc every 20 ms.

onnxruntime's histogram calibrators keep every calibrated activation of every sample in memory
(about 55 MB per 224x224 sample on EfficientNet-Lite0), so 512 samples need ~30 GB. When the
estimate exceeds ``--ort-mem-fraction`` of MemAvailable, the ort side is measured at the two
largest sample counts that fit and extrapolated linearly to ``--samples`` (its cost is linear in
the sample count); the table says so. The machine is shared: sides run back to back, ``--repeats``
times, and medians are reported.

    python tools/bench_calibration.py [--samples 512] [--small 128] [--repeats 3] [--json out.json]

``--auto-vs --method mse --samples 200`` instead runs the whole qdq pass (``--target tensorrt
--set qdq.fallback=none``, the shared calibration split: every 5th image) with
``calib_method=auto`` and with ``mse``, interleaved, and reports the ratios of wall time and peak
RSS (``auto`` must stay within 3x the time and 10 % of the memory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "efficientnet_lite0.onnx"
DEFAULT_DATA = SHARED / "data" / "imagenet"
IMAGE = dict(size=256, crop=224, mean=[127.0] * 3, std=[128.0] * 3)
QUANT_OPS = ["Conv", "Gemm", "MatMul", "Add"]


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------

def calib_tensors(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input:
            out.append(n.input[0])
        elif n.op_type == "Add":
            out += [i for i in n.input if i and i not in inits]
    return list(dict.fromkeys(out))


def child_ours(args) -> dict:
    import onnx

    from onnxopt.data import open_data
    from onnxopt.quant.calibrate import CalibConfig, calibrate

    model = onnx.load(args.model)
    tensors = calib_tensors(model)
    src = open_data(args.data, model, image=IMAGE, max_samples=args.n)
    t0 = time.perf_counter()
    ranges = calibrate(model, tensors, src, CalibConfig(method=args.method, workers=args.workers, progress=False, optimize=args.optimize))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tensors": len(tensors), "amax_sample": {t: ranges[t][1] for t in tensors[:3]}}


def child_ort(args) -> dict:
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxopt.data import open_data

    model = onnx.load(args.model)
    src = open_data(args.data, model, image=IMAGE, max_samples=args.n)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(src.samples())

        def get_next(self):
            return next(self.it, None)

    method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
              "percentile": CalibrationMethod.Percentile}[args.method]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.onnx")
        t0 = time.perf_counter()
        quantize_static(args.model, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANT_OPS,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, extra_options={"ActivationSymmetric": True},
                        calibration_providers=["CPUExecutionProvider"])
        wall = time.perf_counter() - t0
    return {"wall_s": wall}


def child_qdq(args) -> dict:
    """The whole qdq pass (``--target tensorrt``, ``fallback=none``) with ``calib_method=--method``:
    what ``auto`` costs on top of one fixed-method calibration (its search included)."""
    import onnx

    from onnxopt import manager
    from onnxopt.data import open_data
    from onnxopt.registry import PassContext

    model = onnx.load(args.model)
    src = open_data(args.data, model, image=IMAGE, every=5, max_samples=args.n)   # the shared calibration split
    ctx = PassContext(data=src, progress=False, log=lambda msg: None)
    t0 = time.perf_counter()
    _, report = manager.apply(model, ["qdq"], {"qdq": {"target": "tensorrt", "calib_method": args.method, "fallback": "none"}},
                              context=ctx, verify=False, summarize_layers=False)
    wall = time.perf_counter() - t0
    cal = report.passes[-1].extra["info"].get("calibration") or {}
    return {"wall_s": wall, "evaluations": cal.get("evaluations"), "counts": cal.get("counts")}


def ort_bytes_per_sample(model_path: str) -> int:
    """Bytes onnxruntime's histogram calibrator keeps per sample: every input/output of the quantized op types."""
    import numpy as np
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(model_path))
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    inits = {i.name for i in m.graph.initializer}
    names = {t for n in m.graph.node if n.op_type in QUANT_OPS for t in list(n.input) + list(n.output) if t and t not in inits}
    return int(sum(4 * int(np.prod(shapes[t])) for t in names if t in shapes))


# ---------------------------------------------------------------------------------------------
# parent: run a child, measure its memory
# ---------------------------------------------------------------------------------------------

def _tree_rss_kb(pid: int) -> int:
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_child(side: str, n: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--n", str(n), "--model", args.model,
           "--data", args.data, "--method", args.method, "--workers", str(args.workers), "--optimize", args.optimize]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    peak_tree = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_tree[0] = max(peak_tree[0], _tree_rss_kb(proc.pid))
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    for r in readers:
        r.join()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{side} n={n} failed (exit {proc.returncode}):\n{''.join(err_chunks)[-3000:]}")
    res = json.loads("".join(out_chunks).strip().splitlines()[-1])
    res.update(side=side, n=n, process_s=total, peak_rss_mb=usage.ru_maxrss / 1024, peak_tree_rss_mb=peak_tree[0] / 1024)
    return res


def auto_vs_fixed(args) -> int:
    """``calib_method=auto`` against one fixed method through the whole qdq pass, interleaved."""
    rows = {"auto": [], args.method: []}
    for rep in range(args.repeats):
        for method in rows:
            r = run_child("qdq", args.samples, argparse.Namespace(**{**vars(args), "method": method}))
            rows[method].append(r)
            print(f"  rep {rep}: qdq {method:10s} wall {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:8.1f} MB"
                  f"  evaluations {r['evaluations']}", file=sys.stderr)
    auto, fixed = ({k: med(rows[m], k) for k in ("wall_s", "peak_rss_mb")} for m in ("auto", args.method))
    # the machine is shared: each repeat's pair ran back to back, so the ratio within a pair is
    # what load changes least; the median of those is the figure
    pair_wall = statistics.median(a["wall_s"] / f["wall_s"] for a, f in zip(rows["auto"], rows[args.method]))
    result = {"model": args.model, "samples": args.samples, "repeats": args.repeats, "auto": auto, args.method: fixed,
              "wall_ratio": pair_wall, "rss_ratio": auto["peak_rss_mb"] / fixed["peak_rss_mb"],
              "runs": {m: [{k: r[k] for k in ("wall_s", "peak_rss_mb")} for r in v] for m, v in rows.items()}}
    print(f"\nqdq --target tensorrt, fallback=none, {Path(args.model).name}, {args.samples} samples, medians of {args.repeats}")
    print(f"{'calib_method':14s} {'wall s':>9s} {'peak RSS MB':>12s}")
    for m, r in (("auto", auto), (args.method, fixed)):
        print(f"{m:14s} {r['wall_s']:9.2f} {r['peak_rss_mb']:12.1f}")
    print(f"auto/{args.method}: wall {result['wall_ratio']:.2f}x (median of the {args.repeats} back-to-back pairs; target <= 3), "
          f"peak RSS {result['rss_ratio']:.3f} (target within 10%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--small", type=int, default=128, help="our second sample count (memory must stay within 10%%)")
    ap.add_argument("--method", default="entropy")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--optimize", default="basic", choices=["none", "basic", "all"], help="our session's onnxruntime optimization level")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ort-mem-fraction", type=float, default=0.35,
                    help="largest share of MemAvailable onnxruntime may be expected to use (shared machine)")
    ap.add_argument("--ort-samples", type=int, nargs="*", help="force the ort sample counts measured (extrapolated when < --samples)")
    ap.add_argument("--json")
    ap.add_argument("--auto-vs", action="store_true",
                    help="instead: the qdq pass with calib_method=auto against --method (e.g. mse), peak RSS and wall time")
    ap.add_argument("--child", choices=["ours", "ort", "qdq"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        res = {"ours": child_ours, "ort": child_ort, "qdq": child_qdq}[args.child](args)
        print(json.dumps(res))
        return 0

    if not Path(args.model).exists() or not Path(args.data).exists():
        print(f"model or data missing ({args.model}, {args.data}); nothing to measure", file=sys.stderr)
        return 1
    if args.auto_vs:
        return auto_vs_fixed(args)
    per_sample_mb = ort_bytes_per_sample(args.model) / 2**20
    budget_mb = args.ort_mem_fraction * mem_available_mb()
    if args.ort_samples:
        ort_ns = sorted(args.ort_samples)
    else:
        fit = int(max(budget_mb - 400, 0) / per_sample_mb)   # ~400 MB of baseline (session, model, imports)
        ort_ns = [args.samples] if fit >= args.samples else [max(8, fit // 2), max(16, fit)]
    print(f"onnxruntime keeps ~{per_sample_mb:.1f} MB per sample -> {args.samples} samples need ~{per_sample_mb * args.samples / 1024:.1f} GB; "
          f"budget {budget_mb / 1024:.1f} GB: measuring ort at {ort_ns}", file=sys.stderr)

    rows = {("ours", args.samples): [], ("ours", args.small): []}
    rows.update({("ort", n): [] for n in ort_ns})
    for rep in range(args.repeats):
        # back to back, alternating sides, so that load on the shared machine hits both alike
        for key in [("ours", args.samples)] + [("ort", n) for n in ort_ns][::-1] + [("ours", args.small)]:
            r = run_child(key[0], key[1], args)
            rows[key].append(r)
            print(f"  rep {rep}: {key[0]:4s} n={key[1]:4d}  wall {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:8.1f} MB"
                  f"  (tree {r['peak_tree_rss_mb']:8.1f} MB)", file=sys.stderr)

    summary = {k: {"wall_s": med(v, "wall_s"), "peak_rss_mb": med(v, "peak_rss_mb"), "peak_tree_rss_mb": med(v, "peak_tree_rss_mb"),
                   "runs": len(v)} for k, v in rows.items()}
    ours = summary[("ours", args.samples)]
    ours_small = summary[("ours", args.small)]
    if ort_ns[-1] >= args.samples:
        ort = dict(summary[("ort", args.samples)], extrapolated=False)
    else:
        (n1, a), (n2, b) = (ort_ns[0], summary[("ort", ort_ns[0])]), (ort_ns[-1], summary[("ort", ort_ns[-1])])
        ort = {"extrapolated": True, "from": [n1, n2]}
        for key in ("wall_s", "peak_rss_mb", "peak_tree_rss_mb"):
            slope = (b[key] - a[key]) / (n2 - n1)
            ort[key] = b[key] + slope * (args.samples - n2)
    mem_key = "peak_tree_rss_mb" if args.workers > 1 else "peak_rss_mb"
    result = {
        "model": args.model, "method": args.method, "samples": args.samples, "workers": args.workers, "repeats": args.repeats,
        "optimize": args.optimize,
        "ours": ours, "ours_small": ours_small, "ort": ort,
        "ort_measured": {str(n): summary[("ort", n)] for n in ort_ns},
        "wall_ratio": ours["wall_s"] / ort["wall_s"], "rss_ratio": ours[mem_key] / ort["peak_rss_mb"],
        "rss_small_vs_full": ours[mem_key] / ours_small[mem_key],
    }
    result["targets"] = {"wall_le_half": result["wall_ratio"] <= 0.5, "rss_le_third": result["rss_ratio"] <= 1 / 3,
                         "rss_128_vs_512_within_10pct": abs(result["rss_small_vs_full"] - 1) <= 0.10}

    print(f"\nCalibration cost, {args.method}, {Path(args.model).name}, medians of {args.repeats} run(s), workers={args.workers}, "
          f"our session optimization {args.optimize}")
    print(f"{'run':34s} {'wall s':>9s} {'peak RSS MB':>12s}")
    print(f"{'onnxopt calibrate, ' + str(args.samples) + ' samples':34s} {ours['wall_s']:9.2f} {ours[mem_key]:12.1f}")
    print(f"{'onnxopt calibrate, ' + str(args.small) + ' samples':34s} {ours_small['wall_s']:9.2f} {ours_small[mem_key]:12.1f}")
    for n in ort_ns:
        s = summary[("ort", n)]
        print(f"{'ort quantize_static, ' + str(n) + ' samples':34s} {s['wall_s']:9.2f} {s['peak_rss_mb']:12.1f}")
    if ort["extrapolated"]:
        print(f"{'ort quantize_static, ' + str(args.samples) + ' (linear extrap.)':34s} {ort['wall_s']:9.2f} {ort['peak_rss_mb']:12.1f}")
    print(f"wall ratio ours/ort {result['wall_ratio']:.3f} (target <= 0.5), RSS ratio {result['rss_ratio']:.3f} (target <= 0.333), "
          f"our RSS {args.samples}/{args.small} = {result['rss_small_vs_full']:.3f} (target within 10%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
