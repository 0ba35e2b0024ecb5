"""PTQ recovery ablation: what equalization, bias correction, mixed precision and AdaRound buy.

  python tools/bench_recovery.py se            # SE/HardSwish test net, W8A8 per-tensor: plain vs equalize
  python tools/bench_recovery.py effnet8       # EfficientNet-Lite0 W8A8, ort + tensorrt: ablation table
  python tools/bench_recovery.py effnet4       # EfficientNet-Lite0 W4A8: nearest vs adaround (+ bias correction) vs brecq
  python tools/bench_recovery.py sensitivity   # wall time of `onnxopt sensitivity` on EfficientNet-Lite0
  python tools/bench_recovery.py holdout --blocks 13:15   # brecq on some blocks: calibration vs held-out error
  python tools/bench_recovery.py all --json out.json

EfficientNet-Lite0: calibration = every 5th shared ImageNet image (200), evaluation = the other
800; preprocessing resize 256, crop 224, (x - 127) / 128. Each (target, bits) is calibrated ONCE
with the qdq engine (``quantize_model``); every recovery configuration is then applied to that
same quantized model with ``recovery.recover`` -- exactly what ``--set qdq.<option>`` does inside
the qdq pass, without paying for the calibration again. Top-1 is measured with onnxruntime CPU,
all graph optimizations on (as tools/bench_qdq.py does). Timings are single runs on a shared
2-core machine (the load average is printed with them): compare them within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHARED = ROOT.parent / "shared"

from onnxopt import manager, model_io  # noqa: E402
from onnxopt.quant import check as qcheck  # noqa: E402
from onnxopt.quant import recovery  # noqa: E402
from onnxopt.quant.quantize import quantize_model  # noqa: E402
from onnxopt.registry import PassContext, get_pass  # noqa: E402
from bench_qdq import effnet_split  # noqa: E402  (tools/ is on the path when run as a script)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load():
    return os.getloadavg()[0]


def top1(model, feeds, labels, threads=2):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    preds = [int(np.argmax(s.run(None, {name: f[name]})[0])) for f in feeds]
    return 100.0 * float(np.mean(np.asarray(preds) == labels))


def effnet_data(limit=None):
    model = model_io.load_model(SHARED / "models" / "efficientnet_lite0.onnx")
    calib, cfeeds, efeeds, labels = effnet_split(model, limit)   # the split bench_qdq measures on
    return model, calib, cfeeds, efeeds, labels


def run_configs(model, cfeeds, efeeds, labels, base, target, bits, configs, rows, tag, quant_extra=None, save_dir=None):
    opts = get_pass("qdq").resolve({"target": target, "weight_bits": bits, **(quant_extra or {})})
    data = lambda: iter(cfeeds)
    t0 = time.perf_counter()
    q = quantize_model(model, opts, data, PassContext(progress=False))
    t_cal = time.perf_counter() - t0
    done = {}
    for name, extra in configs:
        t0 = time.perf_counter()
        rep = {}
        extra = dict(extra)
        start = done[extra.pop("_after")] if "_after" in extra else q.model  # chain on an earlier result
        qm = start
        if extra:
            qm, rep = recovery.recover(model, start, q.info, extra, data, PassContext(progress=False, log=log),
                                       opts.calibration.calib_samples)
        done[name] = qm
        secs = time.perf_counter() - t0
        if save_dir:
            model_io.save_model(qm, os.path.join(save_dir, f"{tag}_{target}_{name}.onnx".replace(" ", "_").replace("/", "_")))
        acc = top1(qm, efeeds, labels)
        row = {"task": tag, "target": target, "weights": bits, **(quant_extra or {}), "config": name, "top1": round(acc, 3), "drop": round(base - acc, 3),
               "recovery_s": round(secs, 1), "calibration_s": round(t_cal, 1), "load": round(load(), 1),
               "check_violations": len(qcheck.check_model(qm, target)),
               "sqnr_db": [rep.get("sqnr_db_start"), rep.get("sqnr_db_end")]}
        fb = rep.get("fallback")
        if fb:
            row["fallback"] = {k: fb[k] for k in ("high_precision_layers", "high_precision_mac_share", "met", "latency_ms_ort_cpu", "error_after")}
        if "adaround" in rep:
            row["adaround"] = {k: rep["adaround"].get(k) for k in ("layers", "improved", "sequential", "samples", "seconds", "skipped")}
        if "brecq" in rep:
            row["brecq"] = {k: rep["brecq"].get(k) for k in ("blocks", "improved", "samples", "iters", "seconds", "skipped")}
        rows.append(row)
        log(json.dumps(row))


def task_effnet8(args, results):
    model, calib, cfeeds, efeeds, labels = effnet_data(args.limit)
    base = top1(model, efeeds, labels)
    rows = [{"task": "effnet8", "config": "fp32", "top1": base, "drop": 0.0}]
    log(f"fp32 top-1 {base:.2f} on {len(efeeds)} images")
    configs = [("plain", {}), ("bias empirical", {"bias_correction": "empirical"}),
               ("bias analytical", {"bias_correction": "analytical"}),
               ("bias empirical + fallback(max_error=0.08)", {"_after": "bias empirical", "fallback": "auto", "max_error": 0.08})]
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs.split(";")]
    for target in args.targets:
        run_configs(model, cfeeds, efeeds, labels, base, target, 8, configs, rows, "effnet8", save_dir=args.save)
    results["effnet8"] = rows


def mirrored(feeds):
    """Each feed followed by its left-right mirror image (NCHW: the last axis): twice the
    calibration samples from the same images, for the late BRECQ blocks that fit their samples."""
    return [g for f in feeds for g in (f, {k: np.ascontiguousarray(v[..., ::-1]) for k, v in f.items()})]


def task_effnet4(args, results):
    model, calib, cfeeds, efeeds, labels = effnet_data(args.limit)
    if args.mirror:
        cfeeds = mirrored(cfeeds)
    base = top1(model, efeeds, labels)
    rows = [{"task": "effnet4", "config": "fp32", "top1": base, "drop": 0.0}]
    configs = [("nearest", {}),
               (f"adaround({args.iters})", {"rounding": "adaround", "adaround_iters": args.iters}),
               (f"adaround({args.iters}) + bias empirical", {"_after": f"adaround({args.iters})", "bias_correction": "empirical"}),
               (f"brecq({args.iters})", {"rounding": "brecq", "adaround_iters": args.iters}),
               ("nearest + bias empirical", {"bias_correction": "empirical"})]
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs.split(";")]
    extra = {"first_last_weight_bits": args.first_last_bits} if args.first_last_bits else {}
    if args.weight_asym:
        extra["weight_symmetric"] = False
    if args.mirror:   # BRECQ reconstructs on all of them (its cap is 256 unless calib_samples says more)
        extra["calib_samples"] = len(cfeeds)
    for target in args.targets4:
        run_configs(model, cfeeds, efeeds, labels, base, target, 4, configs, rows, "effnet4", extra, args.save)
    results["effnet4"] = rows


def task_holdout(args, results):
    """Does block reconstruction generalise? BRECQ (W4A8, ort, first/last layers at 8 bits) on the
    blocks ``--blocks A:B`` only, learned on the first ``--train`` calibration images; the relative
    squared error at the last block's output, float reference against quantized, on those images
    and on the rest of the 200 (never seen by the learning), for: the start (nearest rounding), the
    initialisation (weight-MSE scales, bias correction) and the learned rounding."""
    from onnxopt.quant.recovery import brecq as B
    from onnxopt.quant.view import QdqView, fast_session, rel_error, truncated

    model, _, cfeeds, _, _ = effnet_data(limit=1)
    opts = get_pass("qdq").resolve({"target": "ort", "weight_bits": 4, "first_last_weight_bits": 8,
                                    **({"weight_symmetric": False} if args.weight_asym else {})})
    q = quantize_model(model, opts, lambda: iter(cfeeds), PassContext(progress=False))
    train, held = cfeeds[: args.train], cfeeds[args.train:]
    a, b = (int(x) for x in args.blocks.split(":"))
    all_blocks = B.find_blocks
    view, rows = QdqView(model, q.model, q.info), []

    def run(blocks, **kw):   # brecq restricted to some blocks (find_blocks patched for the call)
        B.find_blocks = lambda *x, **k: all_blocks(*x, **k)[blocks]
        try:
            return B.brecq(view, lambda: iter(train), B.BrecqConfig(iters=args.iters, max_samples=len(train), **kw), float_model=model, log=log)
        finally:
            B.find_blocks = all_blocks

    learned = []
    for name, kw in (("learned", {}), ("learned, rounding only", {"bias_lr": 0.0, "scale_lr": 0.0})):
        t0 = time.perf_counter()
        m, rep = run(slice(a, b), **kw)
        learned.append((name, m, round(time.perf_counter() - t0, 1)))
    t_out = rep["per_block"][-1]["block"].split(" -> ")[1]
    ref = fast_session(truncated(view.float_reference(), [t_out]))
    targets = {"calibration_error": (train, B._stack(ref, train, t_out)), "held_out_error": (held, B._stack(ref, held, t_out))}

    def row(stage, m, seconds=None):
        qs = fast_session(truncated(QdqView(None, m, q.info).variant(fold_weights=True), [t_out]))
        errs = {k: round(rel_error([y], [B._stack(qs, feeds, t_out)]) ** 2, 4) for k, (feeds, y) in targets.items()}
        rows.append({"task": "holdout", "blocks": args.blocks, "output": t_out, "stage": stage, "train_images": len(train),
                     **errs, "seconds": seconds})
        log(json.dumps(rows[-1]))

    row("start: nearest rounding", q.model)
    row("init: weight-MSE scales, bias correction", run(slice(0, 0))[0])
    for name, m, secs in learned:
        row(name, m, secs)
    results["holdout"] = rows


def task_se(args, results):
    import se_models

    rows = []
    m = se_models.mobilenetv3_se(bad_scale=3.0)
    feeds = se_models.image_like_inputs(1100)
    calib, ev = feeds[:100], feeds[100:]
    labels = np.arange(100, 1100) % 10
    ctx = lambda: PassContext(data=lambda: iter(calib), progress=False)
    base = top1(m, ev, labels)
    rows.append({"task": "se", "config": "fp32", "top1": base, "agreement": 100.0})
    eq, _ = manager.apply(m, "equalize", context=ctx(), verify=True)
    for name, src in (("per-tensor plain", m), ("per-tensor + equalize", eq)):
        for target in ("tensorrt", "ort"):
            q, _ = manager.apply(src, "qdq", {"qdq": {"target": target, "per_channel": False, "calib_method": "minmax"}},
                                 context=ctx(), verify=False, summarize_layers=False)
            acc = top1(q, ev, labels)
            import se_models as S

            rows.append({"task": "se", "target": target, "config": name, "top1": acc, "drop": round(base - acc, 3),
                         "agreement": round(100 * S.top1_agreement(m, q, ev), 2)})
            log(json.dumps(rows[-1]))
    results["se"] = rows


def task_sensitivity(args, results):
    cmd = [sys.executable, "-m", "onnxopt", "sensitivity", str(SHARED / "models" / "efficientnet_lite0.onnx"),
           "--calib-data", str(SHARED / "data" / "imagenet"), "--calib-samples", "200", "--size", "256", "--crop", "224",
           "--mean", "127", "--std", "128", "--target", "tensorrt", "--samples", str(args.sens_samples), "--json", "/dev/null", "-q"]
    l0 = load()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    row = {"task": "sensitivity", "model": "efficientnet_lite0", "seconds": round(secs, 1), "exit": r.returncode,
           "eval_samples": args.sens_samples, "load_before": round(l0, 1), "load_after": round(load(), 1), "command": " ".join(cmd)}
    log(json.dumps(row))
    results["sensitivity"] = [row]


def print_tables(results):
    for key, rows in results.items():
        print(f"\n== {key}")
        for r in rows:
            if "held_out_error" in r:
                print(f"  {r['blocks']} | {r['stage']} | {r['train_images']} images | "
                      f"calibration {r['calibration_error']} | held-out {r['held_out_error']}")
                continue
            cols = [r.get("target", ""), str(r.get("weights", "")), r.get("config", ""), f"top1 {r.get('top1', '')}",
                    f"drop {r.get('drop', '')}"]
            if "agreement" in r:
                cols.append(f"agree {r['agreement']}")
            if "recovery_s" in r:
                cols.append(f"recovery {r['recovery_s']}s (load {r['load']})")
            if "seconds" in r:
                cols.append(f"{r['seconds']} s (load {r['load_before']}->{r['load_after']})")
            if "fallback" in r:
                fb = r["fallback"]
                cols.append(f"float layers {len(fb['high_precision_layers'])} ({100 * fb['high_precision_mac_share']:.1f}% MACs) "
                            f"latency {fb['latency_ms_ort_cpu']['all_quantized']}->{fb['latency_ms_ort_cpu']['with_fallback']} ms")
            print("  " + " | ".join(str(c) for c in cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["se", "effnet8", "effnet4", "sensitivity", "holdout", "all"])
    ap.add_argument("--targets", default="ort,tensorrt")
    ap.add_argument("--targets4", default="ort")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N of the 800 images (0 = all)")
    ap.add_argument("--sens-samples", type=int, default=8)
    ap.add_argument("--configs", default="", help="effnet8/effnet4: only these configurations (names separated by ';')")
    ap.add_argument("--first-last-bits", type=int, default=0, help="effnet4: weight bits of the first and last layers (0 = 4, like the rest)")
    ap.add_argument("--weight-asym", action="store_true", help="effnet4/holdout: asymmetric 4-bit weights (qdq.weight_symmetric=false)")
    ap.add_argument("--mirror", action="store_true", help="effnet4: calibrate on the 200 calibration images and their mirror images (400 samples)")
    ap.add_argument("--blocks", default="13:15", help="holdout: the BRECQ blocks to learn (Python slice of the 17)")
    ap.add_argument("--train", type=int, default=100, help="holdout: calibration images learned on; the rest of the 200 are held out")
    ap.add_argument("--save", help="effnet8/effnet4: write each configuration's model into this folder")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
    args.targets = args.targets.split(",")
    args.targets4 = args.targets4.split(",")
    results = {}
    tasks = ["se", "effnet8", "effnet4", "sensitivity"] if args.task == "all" else [args.task]
    for t in tasks:
        globals()[f"task_{t}"](args, results)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    print_tables(results)


if __name__ == "__main__":
    main()
