"""Benchmark of the ``lite`` pass: the figures of issue 3.

* YOLOX-nano (../shared/models/yolox_nano.onnx): SiLU -> ReLU count, the head Sigmoids that stay,
  SPP MaxPools -> 3x3 cascades (that rule alone: max abs diff), Focus -> Conv (alone: max abs
  diff), validity, output error on real COCO images, onnxruntime CPU latency before/after.
* A MobileNetV3-style model exported from torch (if torch is installed; else only the onnx.helper
  twin in tests/lite_models.py): everything replaced, nothing else touched.
* ``lite`` on a generated 10k-node graph (tools/gen_graph.py): pass time.

Timings are medians over several runs on a shared machine (noisy); the load average is printed.

    python tools/bench_lite.py [--json out.json] [--runs 30] [--skip-torch]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from onnxopt import runtime  # noqa: E402
from onnxopt.model_io import check_model, load_model  # noqa: E402
from onnxopt.passes.lite import options_with, run_lite  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def ops(model) -> dict:
    return dict(collections.Counter(n.op_type for n in model.graph.node if n.op_type != "Constant"))


def silu_count(model) -> int:
    cons = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            cons[i].append(n)
    k = 0
    for n in model.graph.node:
        if n.op_type == "Sigmoid":
            c = cons[n.output[0]]
            if len(c) == 1 and c[0].op_type == "Mul" and n.input[0] in c[0].input:
                k += 1
    return k


def max_diff(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    sa, sb = runtime.session(a), runtime.session(b)
    worst = 0.0
    for f in feeds:
        ra, rb = runtime.run(sa, f), runtime.run(sb, f)
        for k in ra:
            worst = max(worst, float(np.max(np.abs(ra[k].astype(np.float64) - rb[k]))))
    return worst


def latency_ms(model, feed, runs: int) -> float:
    # all ORT optimizations on (as deployed), one intra-op thread: steadier on a loaded 2-core box
    sess = runtime.session(model, optimize=True, threads=1)
    for _ in range(3):
        runtime.run(sess, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runtime.run(sess, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def coco_feeds(n: int = 4) -> list:
    """YOLOX preprocessing: BGR, letterbox to 416 with pad 114, raw 0-255 floats."""
    from PIL import Image

    folder = SHARED / "data" / "coco100"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    feeds = []
    for p in files:
        img = Image.open(p).convert("RGB")
        r = min(416 / img.width, 416 / img.height)
        img = img.resize((max(1, int(img.width * r)), max(1, int(img.height * r))), Image.BILINEAR)
        canvas = np.full((416, 416, 3), 114, np.float32)
        arr = np.asarray(img, np.float32)[:, :, ::-1]
        canvas[: arr.shape[0], : arr.shape[1]] = arr
        feeds.append({"images": canvas.transpose(2, 0, 1)[None].copy()})
    return feeds


def bench_yolox(runs: int) -> dict:
    path = SHARED / "models" / "yolox_nano.onnx"
    if not path.exists():
        return {"skipped": f"{path} not found"}
    model = load_model(path)
    feeds = coco_feeds()
    data = lambda: iter(feeds)  # noqa: E731
    out = {"model": str(path), "ops_before": ops(model), "silu_before": silu_count(model),
           "sigmoid_before": ops(model).get("Sigmoid", 0)}
    t = time.perf_counter()
    res = run_lite(model, options_with(), PassContext(data=data))
    out["pass_seconds"] = round(time.perf_counter() - t, 3)
    lite = res.model
    check_model(lite, full=True)
    out.update(changes=res.changes, ops_after=ops(lite), silu_after=silu_count(lite), sigmoid_after=ops(lite).get("Sigmoid", 0),
               maxpool_kernels_after=sorted({tuple(a.ints) for n in lite.graph.node if n.op_type == "MaxPool"
                                             for a in n.attribute if a.name == "kernel_shape"}),
               exact_verification=res.extra.get("exact_verification"),
               output_error_coco=res.extra.get("output_error", {}).get("max_abs"),
               output_rel_error_coco=res.extra.get("output_error", {}).get("max_rel"))
    only_pool = run_lite(model, options_with(rules="maxpool_ge5_to_cascade", verify=False)).model
    only_focus = run_lite(model, options_with(rules="focus_to_conv", verify=False)).model
    out["maxpool_only_max_abs_diff"] = max_diff(model, only_pool, feeds)
    out["focus_only_max_abs_diff"] = max_diff(model, only_focus, feeds)
    out["latency_ms_before"] = round(latency_ms(model, feeds[0], runs), 2)
    out["latency_ms_after"] = round(latency_ms(lite, feeds[0], runs), 2)
    return out


def bench_mobilenetv3(skip_torch: bool) -> dict:
    from lite_models import mobilenetv3_like, torch_mobilenetv3_onnx

    out = {}
    models = {"onnx.helper twin (opset 17)": mobilenetv3_like(17)}
    if not skip_torch:
        try:
            import torch  # noqa: F401

            for opset in (13, 17, 20):
                models[f"torch {torch.__version__} export (opset {opset})"] = torch_mobilenetv3_onnx(opset)
        except ImportError:
            out["torch"] = "not installed: pip install torch==2.13.0"
    for name, m in models.items():
        res = run_lite(m, options_with())
        check_model(res.model, full=True)
        before, after = ops(m), ops(res.model)
        out[name] = {"ops_before": before, "ops_after": after, "changes": res.changes,
                     "everything_replaced": set(after) == {"Conv", "Relu"},
                     "convs_kept": after.get("Conv", 0) == before.get("Conv", 0) - 2,
                     "output_error": res.extra.get("output_error", {}).get("max_abs")}
    return out


def bench_generated(n: int, repeats: int) -> dict:
    from gen_graph import build

    model = build(n)
    out = {"nodes": len(model.graph.node)}
    for verify in (True, False):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = run_lite(model, options_with(verify=verify))
            times.append(time.perf_counter() - t)
        out[f"seconds_median_verify_{str(verify).lower()}"] = round(statistics.median(times), 2)
        out[f"seconds_all_verify_{str(verify).lower()}"] = [round(x, 2) for x in times]
    out["changes"] = res.changes
    out["nodes_after"] = len(res.model.graph.node)
    # linearity: pass time without verification (rules + graph import/export) across sizes
    out["scaling_verify_false"] = {}
    for size in (n // 4, n // 2, n, 2 * n):
        m = build(size)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            run_lite(m, options_with(verify=False))
            times.append(time.perf_counter() - t)
        out["scaling_verify_false"][len(m.graph.node)] = round(min(times), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--runs", type=int, default=30, help="latency runs per model (median)")
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    figures = {"load_average": os.getloadavg(), "cpus": runtime.cpu_count()}
    figures["yolox_nano"] = bench_yolox(args.runs)
    figures["mobilenetv3"] = bench_mobilenetv3(args.skip_torch)
    figures["generated"] = bench_generated(args.nodes, args.repeats)

    y = figures["yolox_nano"]
    print(f"load average {figures['load_average'][0]:.1f} on {figures['cpus']} CPUs (timings are medians; noisy)")
    print("\n== YOLOX-nano ==")
    if "skipped" in y:
        print("  skipped:", y["skipped"])
    else:
        rows = [
            ("SiLU (Sigmoid->Mul) before -> after", f"{y['silu_before']} -> {y['silu_after']}"),
            ("Sigmoid nodes before -> after", f"{y['sigmoid_before']} -> {y['sigmoid_after']} (head, not SiLU)"),
            ("Relu after", str(y["ops_after"].get("Relu", 0))),
            ("MaxPool kernels after", str(y["maxpool_kernels_after"])),
            ("Slice after", str(y["ops_after"].get("Slice", 0))),
            ("maxpool rule alone: max abs diff (COCO)", f"{y['maxpool_only_max_abs_diff']:.3g}"),
            ("focus rule alone: max abs diff (COCO)", f"{y['focus_only_max_abs_diff']:.3g}"),
            ("exact rules in-pass (region check)", ", ".join(f"{k}={v['max_abs']:.3g}" for k, v in (y["exact_verification"] or {}).get("rules", {}).items())),
            ("lite vs original output, max abs / rel (COCO)", f"{y['output_error_coco']:.4g} / {y['output_rel_error_coco']:.3g}"),
            ("pass time (s)", str(y["pass_seconds"])),
            ("ORT CPU latency, 1 thread, before -> after (ms, median)", f"{y['latency_ms_before']} -> {y['latency_ms_after']}"),
        ]
        for k, v in rows:
            print(f"  {k:<48} {v}")
        print(f"  changes: {y['changes']}")
    print("\n== MobileNetV3-style ==")
    for name, r in figures["mobilenetv3"].items():
        if isinstance(r, str):
            print(f"  {name}: {r}")
            continue
        print(f"  {name}: replaced={r['everything_replaced']} convs_kept={r['convs_kept']} changes={r['changes']}")
        print(f"      before {r['ops_before']}\n      after  {r['ops_after']}")
    g = figures["generated"]
    print(f"\n== generated graph ({g['nodes']} nodes -> {g['nodes_after']}) ==")
    print(f"  lite with verification    median {g['seconds_median_verify_true']} s  {g['seconds_all_verify_true']}")
    print(f"  lite without verification median {g['seconds_median_verify_false']} s  {g['seconds_all_verify_false']}")
    print(f"  changes: {g['changes']}")
    print("  scaling, no verification (nodes: best of 2, s): " + ", ".join(f"{k}: {v}" for k, v in g["scaling_verify_false"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
