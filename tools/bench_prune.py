"""Measure the figures of the prune / sparsify issue on the real models and print a table.

    python tools/bench_prune.py                       # all figures
    python tools/bench_prune.py --only resnet56 --runs 300 --json out.json

* ResNet56 (CIFAR-10) with prune.ratio=0.3 (defaults: uniform, l1, round_to=8; and the
  round_to=1 and ratio=0.1 variants): params, MACs, onnxruntime CPU latency at batch 1 and batch 32 before/after, validity
  (full checker), top-1 before and right after pruning (no finetuning) on the first 761 of the
  1017 CIFAR test images; the last 256 are the data prune measures its channel means on.
* EfficientNet-Lite0 and YOLOX-nano at ratio 0.3: valid, runs, params/MACs/latency at batch 1.
* The generated 10k-node graph (tools/gen_graph.py): wall time of the prune pass.
* sparsify on ResNet56: 2:4 and TI 41:64 (flat, zeroed convention), unstructured 50 %; top-1 after.

Latency: onnxruntime CPU, all graph optimizations, the machine's default thread count (or
--threads), before and after measured in alternating rounds so that load from other processes
hits both; the median over all runs is reported. The machine is shared: treat small differences
as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXOPT_SHARED", ROOT.parent / "shared"))   # ../shared, or where ONNXOPT_SHARED points
sys.path.insert(0, str(ROOT / "tools"))

from onnxopt import runtime  # noqa: E402
from onnxopt.manager import apply  # noqa: E402
from onnxopt.model_io import load_model  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def latency_pair(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, runs: int, threads: int, rounds: int = 5) -> dict:
    """Median latency (ms) of a and b, measured in alternating rounds.

    With ``threads=1`` onnxruntime runs every op on the calling thread, so the thread's CPU time
    per run is also reported: it does not count the time other processes on a shared machine take
    the core away, which makes it the steadier figure there.
    """
    sa = runtime.session(a, optimize=True, threads=threads)
    sb = runtime.session(b, optimize=True, threads=threads)
    for s in (sa, sb):
        for _ in range(3):
            s.run(None, feed)
    wall = {"a": [], "b": []}
    cpu = {"a": [], "b": []}
    per = max(1, runs // rounds)
    for _ in range(rounds):
        for key, s in (("a", sa), ("b", sb)):
            for _ in range(per):
                t, c = time.perf_counter(), time.thread_time()
                s.run(None, feed)
                cpu[key].append((time.thread_time() - c) * 1e3)
                wall[key].append((time.perf_counter() - t) * 1e3)
    out = {"before": round(statistics.median(wall["a"]), 3), "after": round(statistics.median(wall["b"]), 3), "runs": per * rounds,
           "threads": threads or "default"}
    out["reduction"] = round(1 - out["after"] / out["before"], 4)
    if threads == 1:
        out["cpu_before"] = round(statistics.median(cpu["a"]), 3)
        out["cpu_after"] = round(statistics.median(cpu["b"]), 3)
        out["cpu_reduction"] = round(1 - out["cpu_after"] / out["cpu_before"], 4)
    return out


def _fmt(lat: dict) -> str:
    text = f"{lat['before']:.2f}->{lat['after']:.2f} ms ({lat['reduction']:.1%})"
    if "cpu_reduction" in lat:
        text += f" cpu {lat['cpu_before']:.2f}->{lat['cpu_after']:.2f} ({lat['cpu_reduction']:.1%})"
    return text


CALIB = 256  # the last 256 CIFAR images feed prune's statistics; top-1 is on the first 761


def cifar() -> tuple:
    data = np.load(SHARED / "data" / "cifar10_test_1017.npz")
    x = data["x"].astype(np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std, data["y"]


def cifar_context() -> PassContext:
    x, _ = cifar()
    calib = x[-CALIB:]
    return PassContext(data=lambda: [{"input": calib[i:i + 64]} for i in range(0, CALIB, 64)])


def cifar_top1(model: onnx.ModelProto, batch: int = 128) -> float:
    x, y = cifar()
    x, y = x[:-CALIB], y[:-CALIB]
    sess = runtime.session(model, optimize=True)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        out = sess.run(None, {name: x[i:i + batch]})[0]
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def _prune(model, context=None, **opts):
    options = {"latency_runs": 0}
    options.update(opts)
    t = time.perf_counter()
    out, report = apply(model, "prune", options={"prune": options}, context=context)
    return out, report.passes[0], time.perf_counter() - t


def bench_resnet56(args, rows, results):
    path = SHARED / "models" / "resnet56_cifar10.onnx"
    base = load_model(path)
    top1_base = cifar_top1(base)
    for label, opts in (("ratio=0.3", {"ratio": 0.3}), ("ratio=0.3 round_to=1", {"ratio": 0.3, "round_to": 1}),
                        ("ratio=0.1", {"ratio": 0.1})):
        out, rec, secs = _prune(str(path), context=cifar_context(), **opts)
        onnx.checker.check_model(out, full_check=True)
        ex = rec.extra
        entry = {"model": "resnet56_cifar10", "options": opts, "params": ex["params"], "macs": ex["macs"],
                 "top1_before": top1_base, "top1_after": cifar_top1(out), "prune_seconds": round(secs, 2), "latency_ms": {}}
        for batch, runs in ((1, args.runs), (32, max(20, args.runs // 5))):
            feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)}
            entry["latency_ms"][f"batch{batch}"] = latency_pair(base, out, feed, runs, args.threads)
        results.append(entry)
        lat = entry["latency_ms"]
        rows.append([f"resnet56 {label}", f"{ex['params']['reduction']:.1%}", f"{ex['macs']['reduction']:.1%}",
                     _fmt(lat["batch1"]), _fmt(lat["batch32"]), f"top-1 {top1_base:.2%} -> {entry['top1_after']:.2%}"])


def bench_other(args, rows, results, name, input_name, shape, round_to=8):
    path = SHARED / "models" / f"{name}.onnx"
    base = load_model(path)
    out, rec, secs = _prune(str(path), ratio=0.3, round_to=round_to)
    onnx.checker.check_model(out, full_check=True)
    feed = {input_name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    ref, got = runtime.run(base, feed), runtime.run(out, feed)
    assert set(ref) == set(got) and all(ref[k].shape == got[k].shape for k in ref)
    lat = latency_pair(base, out, feed, max(10, args.runs // 10), args.threads)
    ex = rec.extra
    results.append({"model": name, "options": {"ratio": 0.3, "round_to": round_to}, "params": ex["params"], "macs": ex["macs"], "valid": True, "runs": True,
                    "latency_ms": {"batch1": lat},
                    "prune_seconds": round(secs, 2), "channels_removed": rec.changes["channels_removed"]})
    rows.append([f"{name} ratio=0.3" + (f" round_to={round_to}" if round_to != 8 else ""), f"{ex['params']['reduction']:.1%}", f"{ex['macs']['reduction']:.1%}",
                 _fmt(lat), "-", "valid, runs"])


def bench_target(args, rows, results):
    """Issue 23: prune.target_macs=0.5 (and the default ratio=0.3, which counts MACs) lands within
    3 % of the asked MACs; the MACs are counted on the rewritten model."""
    from onnxopt import stats
    for name, opts in (("resnet56_cifar10", {"target_macs": 0.5}), ("efficientnet_lite0", {"target_macs": 0.5}),
                       ("resnet56_cifar10", {"ratio": 0.3}), ("efficientnet_lite0", {"ratio": 0.3})):
        path = SHARED / "models" / f"{name}.onnx"
        out, rec, secs = _prune(str(path), **opts)
        onnx.checker.check_model(out, full_check=True)
        kept = stats.total_macs(out) / stats.total_macs(load_model(path))
        asked = opts.get("target_macs", 1 - opts.get("ratio", 0.3))
        off = abs(kept - asked) / asked
        results.append({"model": name, "options": opts, "asked_kept_macs": asked, "kept_macs": round(kept, 4), "relative_error": round(off, 4),
                        "within_3_percent": off <= 0.03, "params": rec.extra["params"], "prune_seconds": round(secs, 2)})
        rows.append([f"{name} {' '.join(f'{k}={v}' for k, v in opts.items())}", f"{rec.extra['params']['reduction']:.1%}",
                     f"{1 - kept:.1%}", f"kept MACs {kept:.4f} (asked {asked:g}, off {off:.2%})", "-", f"{secs:.1f} s"])


def bench_rounding(args, rows, results):
    """Issue 23: how widths are rounded, on ResNet56 with the residual streams kept and 30 % of the
    inner channels removed: round_narrow (16 -> 12), multiples of 8 (16 -> 8) and exact (16 -> 11);
    top-1 right after pruning with the least-squares refit on the calibration images, latency."""
    path = SHARED / "models" / "resnet56_cifar10.onnx"
    base = load_model(path)
    top1_base = cifar_top1(base)
    for label, opts in (("round_narrow (12/24/48)", {}), ("round_to=8 (8/24/48)", {"round_narrow": False}),
                        ("round_to=1 (11/22/45)", {"round_to": 1})):
        out, rec, secs = _prune(str(path), context=cifar_context(), ratio=0.3, ratio_of="channels", **opts)
        ex = rec.extra
        entry = {"model": "resnet56_cifar10", "options": {"ratio": 0.3, "ratio_of": "channels", **opts}, "params": ex["params"],
                 "macs": ex["macs"], "top1_before": top1_base, "top1_after_prune_refit": cifar_top1(out), "latency_ms": {}}
        for batch, runs in ((1, args.runs), (32, max(20, args.runs // 5))):
            feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)}
            entry["latency_ms"][f"batch{batch}"] = latency_pair(base, out, feed, runs, args.threads)
        results.append(entry)
        lat = entry["latency_ms"]
        rows.append([f"resnet56 0.3 of channels, {label}", f"{ex['params']['reduction']:.1%}", f"{ex['macs']['reduction']:.1%}",
                     _fmt(lat["batch1"]), _fmt(lat["batch32"]), f"top-1 {top1_base:.2%} -> {entry['top1_after_prune_refit']:.2%} (refit)"])


def bench_10k(args, rows, results):
    from gen_graph import build
    model = build(10000)
    t, c = time.perf_counter(), time.process_time()
    out, report = apply(model, "prune", options={"prune": {"ratio": 0.3, "round_to": 1, "latency_runs": 0, "eval_batches": 1}})
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    ex = report.passes[0].extra
    results.append({"model": "gen_graph 10k", "nodes": len(model.graph.node), "apply_seconds": round(wall, 2), "apply_cpu_seconds": round(cpu, 2),
                    "pass_seconds": round(report.passes[0].seconds, 2), "analysis_seconds": ex["analysis_seconds"],
                    "analysis_and_rewrite_seconds": ex["prune_seconds"], "macs": ex["macs"]})
    rows.append([f"gen_graph {len(model.graph.node)} nodes", f"{ex['params']['reduction']:.1%}", f"{ex['macs']['reduction']:.1%}",
                 f"pass {report.passes[0].seconds:.1f} s (analysis+rewrite {ex['prune_seconds']:.1f} s)", f"apply {wall:.1f} s (cpu {cpu:.1f} s)", "round_to=1"])


def bench_sparsify(args, rows, results):
    path = SHARED / "models" / "resnet56_cifar10.onnx"
    base = load_model(path)
    top1 = cifar_top1(base)
    for label, opts in (("2:4", {}), ("41:64 prune flat", {"nm": "41:64", "nm_convention": "prune", "nm_layout": "flat"}),
                        ("unstructured 0.5", {"method": "unstructured", "ratio": 0.5}),
                        ("unstructured 0.5 global", {"method": "unstructured", "ratio": 0.5, "scope": "global"})):
        out, report = apply(str(path), "sparsify", options={"sparsify": opts})
        ex = report.passes[0].extra
        after = cifar_top1(out)
        results.append({"model": "resnet56_cifar10", "sparsify": opts, "sparsity": ex["sparsity"], "top1_before": top1, "top1_after": after,
                        "layers_sparsified": report.passes[0].changes["layers_sparsified"]})
        rows.append([f"resnet56 sparsify {label}", f"sparsity {ex['sparsity']['all_layer_weights']:.1%}",
                     f"({report.passes[0].changes['layers_sparsified']} layers)", "", "", f"top-1 {top1:.2%} -> {after:.2%}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("resnet56", "others", "10k", "sparsify", "target", "rounding"), action="append")
    ap.add_argument("--runs", type=int, default=200, help="latency runs at batch 1 (batch 32 uses runs/5)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: the real models live there")
    only = set(args.only or ("resnet56", "others", "10k", "sparsify", "target", "rounding"))
    rows, results = [], []
    if "resnet56" in only:
        bench_resnet56(args, rows, results)
    if "others" in only:
        for r in (8, 1):
            bench_other(args, rows, results, "efficientnet_lite0", "input", (1, 3, 224, 224), r)
        for r in (8, 1):
            bench_other(args, rows, results, "yolox_nano", "images", (1, 3, 416, 416), r)
    if "target" in only:
        bench_target(args, rows, results)
    if "rounding" in only:
        bench_rounding(args, rows, results)
    if "10k" in only:
        bench_10k(args, rows, results)
    if "sparsify" in only:
        bench_sparsify(args, rows, results)
    head = ["case", "params -", "MACs -", "latency b1 (median)", "latency b32 (median)", "notes"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"(onnxruntime {runtime.ort.__version__}, CPU, threads={args.threads or 'default'}, {runtime.cpu_count()} cores; shared machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
