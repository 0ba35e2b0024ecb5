"""Benchmark of the qdq pass against onnxruntime.quantization.quantize_static, side by side.

Same model, same calibration split, same evaluation split, one run. Prints a table and, with
--json, writes every figure.

  python tools/bench_qdq.py effnet          # EfficientNet-Lite0: top-1 (200 calib / 800 eval) + speed + check
  python tools/bench_qdq.py cifar           # ResNet20/56 CIFAR-10 W8A8 top-1 drop
  python tools/bench_qdq.py yolox           # YOLOX-nano: decoded boxes vs fp32 (mean IoU, class agreement)
  python tools/bench_qdq.py all --json out.json

  python tools/bench_qdq.py speed --runs 200   # latency only, fp32 vs --target ort int8, all models
  python tools/bench_qdq.py saturation --limit 100   # EfficientNet-Lite0 ort: fused int8 kernels vs unfused Q/DQ
  python tools/bench_qdq.py ceiling         # one conv, fp32 vs ort int8: the int8 speed-up this CPU's kernels allow

Splits: calibration = every 5th sample from offset 0 (``open_data(..., every=5)``), evaluation =
the rest (``exclude_every=True``). Latency: onnxruntime CPU, all graph optimizations on, batch 1,
each model alone in ``--procs`` fresh processes (alternating fp32 / int8), 20 warm-up runs then the
median of ``--runs`` timed runs per process, the median over the processes; reported for 1 and 2
intra-op threads, with the speed-up of both models interleaved in one process beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from onnxopt import manager, model_io, runtime  # noqa: E402
from onnxopt.data import open_data  # noqa: E402
from onnxopt.quant import check as qcheck  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def session(model, threads=1, optimize=True):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    payload = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])


def ours(model, data_feeds, spec, **opts):
    """Run the qdq pass (after the given pre-passes) on ``model`` with the calibration feeds."""
    pre = opts.pop("pre", [])
    ctx = PassContext(data=lambda: iter(data_feeds), data_spec=spec, progress=False)
    t0 = time.perf_counter()
    q, report = manager.apply(model, pre + ["qdq"], {"qdq": opts}, context=ctx, verify=False, summarize_layers=False)
    rec = report.passes[-1]
    return q, time.perf_counter() - t0, rec


def ort_static(model, data_feeds, method, per_channel=True, symmetric_act=False):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data_feeds)

        def get_next(self):
            return next(self.it, None)

    if model_io.opset_of(model) < 13:  # per-channel Q/DQ needs opset 13; quantize_static does not convert
        from onnxopt.quant.quantize import convert_opset
        model = convert_opset(model, 13)
    meth = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        t0 = time.perf_counter()
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8 if symmetric_act else QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=meth, extra_options={"ActivationSymmetric": symmetric_act})
        secs = time.perf_counter() - t0
        return onnx.load(dst), secs


def top1(model, feeds, labels, threads=2):
    s = session(model, threads)
    name = s.get_inputs()[0].name
    preds = [int(np.argmax(s.run(None, {name: f[name]})[0])) for f in feeds]
    return 100.0 * float(np.mean(np.asarray(preds) == labels))


def latency(models: dict, feed, threads, runs=40, rounds=4):
    sessions = {k: session(m, threads) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs // rounds):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def latency_per_process(models: dict, feed, threads, runs=200, procs=5):
    """Median latency (ms) of each model in its own fresh Python process, as a deployed model runs
    (onnxruntime_perf_test's way): ``procs`` processes per model, alternating between the models,
    each 20 warm-up runs then the median of ``runs``; the result is the median over the processes,
    with their min and max. Two sessions in one process slow each other down (int8 ResNet56: about
    1.27 ms interleaved against 1.0-1.1 ms alone), and one process's memory layout can shift a small
    model's latency by 30 %, hence several processes."""
    with tempfile.TemporaryDirectory() as tmp:
        feed_path = os.path.join(tmp, "feed.npz")
        np.savez(feed_path, **feed)
        paths = {}
        for k, m in models.items():
            paths[k] = os.path.join(tmp, f"{k}.onnx")
            onnx.save(m, paths[k])
        per = {k: [] for k in models}
        for _ in range(procs):
            for k, path in paths.items():
                out = subprocess.run([sys.executable, __file__, "_latency", path, feed_path, str(threads), str(runs)],
                                     capture_output=True, text=True, check=True)
                per[k].append(float(out.stdout.split()[-1]))
    return {k: {"ms": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in per.items()}


def _latency_worker(path, feed_path, threads, runs):
    """The child of latency_per_process: prints one model's median latency in ms."""
    feed = dict(np.load(feed_path))
    s = session(path, int(threads))
    for _ in range(20):
        s.run(None, feed)
    times = []
    for _ in range(int(runs)):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    print(1000 * float(np.median(times)))


def op_class_profile(model, feed, threads=1, runs=30) -> dict:
    """Kernel time per run (ms) by op class from onnxruntime's profiler: dense conv, depthwise conv
    (group == channels), everything else. Says where an int8 speed-up comes from, or not."""
    times, executed = runtime.profile_kernels(model, feed, runs, optimize=True, threads=threads, with_graph=True)
    nodes = {n.name: n for n in executed.graph.node}
    out = {"dense conv": 0.0, "depthwise conv": 0.0, "other": 0.0}
    for name, ms in times.items():
        node = nodes.get(name)
        group = next((a.i for a in node.attribute if a.name == "group"), 1) if node is not None else 1
        key = "other" if node is None or "Conv" not in node.op_type else ("depthwise conv" if group > 1 else "dense conv")
        out[key] += sum(ms) / runs
    return out


def violations(model, target):
    vs = qcheck.check_model(model, target)
    fmt = [v for v in vs if v.kind == "format"]
    return {"format": len(fmt), "op_support": len(vs) - len(fmt), "examples": [str(v) for v in vs[:4]]}


# ------------------------------------------------------------------------------------- tasks
def effnet_split(model, limit=0):
    """EfficientNet-Lite0's split of the shared ImageNet images: (calibration data, its 200 feeds,
    the first ``limit`` (0 = all) of the other 800 as feeds, their labels); preprocessing resize
    256, crop 224, (x - 127) / 128."""
    img = dict(size=256, crop=224, mean=[127.0], std=[128.0])
    calib = open_data(str(SHARED / "data" / "imagenet"), model, image=img, every=5)
    ev = open_data(str(SHARED / "data" / "imagenet"), model, image=img, every=5, exclude_every=True)
    efeeds = list(ev.samples())[: limit or None]
    return calib, list(calib.samples()), efeeds, ev.labels()[: len(efeeds)]


def task_effnet(args, results):
    path = SHARED / "models" / "efficientnet_lite0.onnx"
    model = model_io.load_model(path)
    if args.pre:  # exact float pre-passes (e.g. equalize) applied before every quantizer
        model, _ = manager.apply(model, args.pre, {k: v for k, v in args.pre_options.items()}, context=PassContext(progress=False),
                                 summarize_layers=False)
    log("loading images ...")
    calib, cfeeds, efeeds, labels = effnet_split(model, args.limit)
    base = top1(model, efeeds, labels)
    rows = [{"model": "effnet-lite0", "config": "fp32", "top1": base, "drop": 0.0}]
    log(f"fp32 top-1 {base:.2f} on {len(efeeds)} images, calibrated on {len(cfeeds)}")
    qmodels = {}
    for target in args.targets:
        for method in args.methods:
            q, secs, rec = ours(model, cfeeds, calib.spec, target=target, calib_method=method)
            acc = top1(q, efeeds, labels)
            rows.append({"model": "effnet-lite0", "config": f"onnxopt {target} {method}", "top1": acc, "drop": base - acc,
                         "seconds": secs, "check": violations(q, target)})
            qmodels[(target, method)] = q
            log(str(rows[-1]))
    for method in args.ort_methods:
        q, secs = ort_static(model, cfeeds, method)
        acc = top1(q, efeeds, labels)
        rows.append({"model": "effnet-lite0", "config": f"quantize_static U8S8 per-channel {method}", "top1": acc, "drop": base - acc, "seconds": secs})
        log(str(rows[-1]))
    if "tidl" in args.targets or args.check_tidl:
        for t in ("tidl", "tidl-tda4vm"):
            if (t, args.methods[0]) not in qmodels:
                q, secs, rec = ours(model, cfeeds, calib.spec, target=t, calib_method=args.methods[0])
                qmodels[(t, args.methods[0])] = q
                rows.append({"model": "effnet-lite0", "config": f"onnxopt {t} {args.methods[0]}", "top1": top1(q, efeeds, labels),
                             "check": violations(q, t)})
                rows[-1]["drop"] = base - rows[-1]["top1"]
                log(str(rows[-1]))
    results["effnet"] = rows
    ortq = next((m for (t, _), m in qmodels.items() if t == "ort"), None)
    if ortq is not None:
        results["effnet_speed"] = speed_rows("effnet-lite0", model, ortq, cfeeds[0], args)


def speed_rows(name, fp32, int8, feed, args):
    """fp32 vs int8 latency at 1 and 2 threads: each model alone in fresh processes (the figure),
    and both interleaved in this process (``speedup_one_process``, for comparison)."""
    rows = []
    for threads in (1, 2):
        lat = latency_per_process({"fp32": fp32, "int8": int8}, feed, threads, runs=args.runs, procs=args.procs)
        one = latency({"fp32": fp32, "int8": int8}, feed, threads, runs=args.runs, rounds=10)
        rows.append({"model": name, "threads": threads, "fp32_ms": lat["fp32"]["ms"], "int8_ms": lat["int8"]["ms"],
                     "speedup": lat["fp32"]["ms"] / lat["int8"]["ms"],
                     "int8_ms_range": [round(lat["int8"]["min"], 3), round(lat["int8"]["max"], 3)],
                     "speedup_one_process": one["fp32"] / one["int8"], "cpu": cpu_int8_features()})
        log(str(rows[-1]))
    return rows


def task_cifar(args, results):
    rows = []
    img = dict(scale=1 / 255.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    npz = str(SHARED / "data" / "cifar10_test_1017.npz")
    for net in ("resnet20", "resnet56"):
        src = model_io.load_model(SHARED / "models" / f"{net}_cifar10.onnx")
        ctx = PassContext(progress=False)
        model, _ = manager.apply(src, "cleanup,bnfuse", context=ctx, summarize_layers=False)
        calib = open_data(npz, model, image=img, every=5)
        ev = open_data(npz, model, image=img, every=5, exclude_every=True)
        cfeeds, efeeds, labels = list(calib.samples()), list(ev.samples()), ev.labels()
        base = top1(model, efeeds, labels)
        rows.append({"model": net, "config": "fp32 (cleanup,bnfuse)", "top1": base, "drop": 0.0})
        log(str(rows[-1]))
        best_q = None
        for target in args.targets:
            for method in args.methods:
                q, secs, rec = ours(model, cfeeds, calib.spec, target=target, calib_method=method)
                acc = top1(q, efeeds, labels)
                rows.append({"model": net, "config": f"onnxopt {target} {method}", "top1": acc, "drop": base - acc, "seconds": secs,
                             "check": violations(q, target)})
                log(str(rows[-1]))
                if target == "ort" and best_q is None:
                    best_q = q
        for method in args.ort_methods:
            q, secs = ort_static(model, cfeeds, method)
            acc = top1(q, efeeds, labels)
            rows.append({"model": net, "config": f"quantize_static U8S8 per-channel {method}", "top1": acc, "drop": base - acc, "seconds": secs})
            log(str(rows[-1]))
        if best_q is not None:
            results.setdefault("cifar_speed", []).extend(speed_rows(net, model, best_q, cfeeds[0], args))
    results["cifar"] = rows


def _decode(out, conf=0.3, iou=0.45):
    """YOLOX output [1, A, 85] -> (boxes xyxy [n,4], class [n], score [n]) after per-class NMS."""
    p = out[0]
    strides, grids = [], []
    for s in (8, 16, 32):
        n = 416 // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    xy = (p[:, :2] + grid) * stride
    wh = np.exp(p[:, 2:4]) * stride
    cls = np.argmax(p[:, 5:], 1)
    score = p[:, 4] * p[np.arange(len(p)), 5 + cls]
    keep = score > conf
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
    cls, score = cls[keep], score[keep]
    order = np.argsort(-score)
    boxes, cls, score = boxes[order], cls[order], score[order]
    chosen = []
    for c in np.unique(cls):
        idx = np.where(cls == c)[0]
        while len(idx):
            i = idx[0]
            chosen.append(i)
            rest = idx[1:]
            idx = rest[_iou(boxes[i], boxes[rest]) <= iou]
    chosen = sorted(chosen, key=lambda i: -score[i])
    return boxes[chosen], cls[chosen], score[chosen]


def _iou(a, b):
    tl = np.maximum(a[:2], b[:, :2])
    br = np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), 1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], -1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def box_agreement(ref_outs, q_outs):
    ious, same, n_ref, matched = [], 0, 0, 0
    for r, q in zip(ref_outs, q_outs):
        rb, rc, _ = _decode(r)
        qb, qc, _ = _decode(q)
        n_ref += len(rb)
        used = set()
        for b, c in zip(rb, rc):
            if not len(qb):
                ious.append(0.0)
                continue
            iou = _iou(b, qb)
            for j in used:
                iou[j] = -1
            j = int(np.argmax(iou))
            if iou[j] > 0.5:
                used.add(j)
                matched += 1
                ious.append(float(iou[j]))
                same += int(qc[j] == c)
            else:
                ious.append(0.0)
    return {"fp32_boxes": n_ref, "matched": matched, "mean_iou_matched": float(np.mean([i for i in ious if i > 0])) if matched else 0.0,
            "mean_iou_all": float(np.mean(ious)) if ious else 0.0, "class_agreement": same / max(matched, 1)}


def task_yolox(args, results):
    model = model_io.load_model(SHARED / "models" / "yolox_nano.onnx")
    img = dict(bgr=True, letterbox=114)
    folder = str(SHARED / "data" / "coco100")
    calib = open_data(folder, model, image=img, every=5)
    ev = open_data(folder, model, image=img, every=5, exclude_every=True)
    cfeeds, efeeds = list(calib.samples()), list(ev.samples())
    s = session(model, 2)
    ref = [s.run(None, f)[0] for f in efeeds]
    rows = []
    for target in args.targets:
        for method in args.methods:
            q, secs, rec = ours(model, cfeeds, calib.spec, target=target, calib_method=method)
            sq = session(q, 2)
            outs = [sq.run(None, f)[0] for f in efeeds]
            row = {"model": "yolox-nano", "config": f"onnxopt {target} {method}", "seconds": secs, "check": violations(q, target)}
            row.update(box_agreement(ref, outs))
            rows.append(row)
            log(str(row))
            if target == "ort" and "yolox_speed" not in results:
                results["yolox_speed"] = speed_rows("yolox-nano", model, q, cfeeds[0], args)
    for method in args.ort_methods:
        q, secs = ort_static(model, cfeeds, method)
        sq = session(q, 2)
        outs = [sq.run(None, f)[0] for f in efeeds]
        row = {"model": "yolox-nano", "config": f"quantize_static U8S8 per-channel {method}", "seconds": secs}
        row.update(box_agreement(ref, outs))
        rows.append(row)
        log(str(row))
    results["yolox"] = rows


def task_speed(args, results):
    """Latency only: fp32 vs the --target ort int8 model (calibrated on 16 samples) for every model,
    then the kernel time by op class (1 thread, onnxruntime's profiler)."""
    rows, profile = [], []
    specs = [
        ("effnet-lite0", "efficientnet_lite0.onnx", "imagenet", dict(size=256, crop=224, mean=[127.0], std=[128.0]), []),
        ("resnet20", "resnet20_cifar10.onnx", "cifar10_test_1017.npz", dict(scale=1 / 255.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), ["cleanup", "bnfuse"]),
        ("resnet56", "resnet56_cifar10.onnx", "cifar10_test_1017.npz", dict(scale=1 / 255.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), ["cleanup", "bnfuse"]),
        ("yolox-nano", "yolox_nano.onnx", "coco100", dict(bgr=True, letterbox=114), []),
    ]
    for name, fname, data, img, pre in specs:
        model = model_io.load_model(SHARED / "models" / fname)
        if pre:
            model, _ = manager.apply(model, pre, context=PassContext(progress=False), summarize_layers=False)
        ds = open_data(str(SHARED / "data" / data), model, image=img, max_samples=16)
        feeds = list(ds.samples())
        q, _, _ = ours(model, feeds, ds.spec, target="ort", calib_method="minmax")
        rows += speed_rows(name, model, q, feeds[0], args)
        fp, i8 = op_class_profile(model, feeds[0]), op_class_profile(q, feeds[0])
        for cls in fp:
            if fp[cls] or i8[cls]:
                profile.append({"model": name, "op class": cls, "fp32_ms": fp[cls], "int8_ms": i8[cls],
                                "speedup": fp[cls] / i8[cls] if i8[cls] else None})
                log(str(profile[-1]))
    results["speed"] = rows
    results["speed_by_op_class"] = profile


CEILING_CONVS = [  # (channels, height = width, group): ResNet/EfficientNet-sized layers, 3x3 kernels
    (64, 56, 1), (128, 28, 1), (256, 14, 1), (144, 56, 144)]


def cpu_int8_features() -> str:
    """The x86 flags that decide onnxruntime's int8 kernels (see runtime.int8_kernels_saturate)."""
    flags = runtime.cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)


def task_ceiling(args, results):
    """The int8 speed-up one conv gets on this CPU: a single 3x3 Conv, fp32 against the same Conv
    through the qdq pass (--target ort, so onnxruntime runs it as a QLinearConv), 1 thread, kernel
    time from onnxruntime's profiler. A whole model gains about what its dense convs gain, less
    where depthwise convs weigh in; the GMAC/s say how close each kernel runs to the machine's peak."""
    rng = np.random.default_rng(0)
    rows = []
    for c, hw, group in CEILING_CONVS:
        graph = helper.make_graph(
            # the 1x1 MaxPool stands for the next layer: a conv whose output is the graph's
            # output stays float under --target ort, one read by another op is quantized
            [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], group=group),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[1, 1])], "conv",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, hw, hw])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, hw, hw])],
            [numpy_helper.from_array((0.1 * rng.standard_normal((c, c // group, 3, 3))).astype(np.float32), "w")])
        fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        feeds = [{"x": rng.random((1, c, hw, hw), dtype=np.float32)} for _ in range(4)]
        int8, _, _ = ours(fp32, feeds, None, target="ort", calib_method="minmax")
        cls = "depthwise conv" if group > 1 else "dense conv"
        ms = {k: op_class_profile(m, feeds[0], runs=args.runs)[cls] for k, m in (("fp32", fp32), ("int8", int8))}
        macs = c * (c // group) * 9 * hw * hw
        rows.append({"conv": f"{c}x{hw}x{hw} 3x3" + (" depthwise" if group > 1 else ""),
                     "fp32_ms": ms["fp32"], "int8_ms": ms["int8"],
                     "fp32_gmacs": macs / ms["fp32"] / 1e6, "int8_gmacs": macs / ms["int8"] / 1e6,
                     "speedup": ms["fp32"] / ms["int8"], "cpu": cpu_int8_features()})
        log(str(rows[-1]))
    results["ceiling"] = rows


def task_saturation(args, results):
    """Do onnxruntime's fused int8 kernels compute what the Q/DQ graph says? EfficientNet-Lite0
    --target ort at several weight widths: the output error against fp32 (sum of squared
    differences over the sum of squares, over the evaluation images) and top-1, once with every
    graph optimization on (QLinearConv etc., as deployed) and once with none (DequantizeLinear ->
    float Conv, the ONNX semantics). On AVX2 CPUs without VNNI, the u8 x s8 kernels add pairs of
    products in int16, which saturates once stored weights pass +-64."""
    from onnxopt.quant.view import rel_error

    model = model_io.load_model(SHARED / "models" / "efficientnet_lite0.onnx")
    calib, cfeeds, efeeds, labels = effnet_split(model, args.limit)
    name = model.graph.input[0].name

    def outputs(m, optimize):
        s = session(m, threads=2, optimize=optimize)
        return [s.run(None, {name: f[name]})[0] for f in efeeds]

    ref = outputs(model, False)
    rows = []
    for label, opts in (("W8 (symmetric)", {}), ("W7 (symmetric; onnxruntime's reduce_range)", {"weight_bits": 7}),
                        ("W8 asymmetric (forced; the qdq pass keeps 8-bit layers symmetric)", {"_asym8": True})):
        q, _, _ = ours(model, cfeeds, calib.spec, target="ort", **{k: v for k, v in opts.items() if k != "_asym8"})
        if opts.get("_asym8"):
            q = _asymmetric_weights(q)
        for optimize in (True, False):
            out = outputs(q, optimize)
            err = rel_error(ref, out) ** 2
            acc = 100.0 * float(np.mean([int(np.argmax(o)) == lab for o, lab in zip(out, labels)]))
            rows.append({"weights": label, "kernels": "fused int8" if optimize else "unfused Q/DQ", "output_error": round(err, 4),
                         "top1": acc, "images": len(efeeds)})
            log(str(rows[-1]))
    results["saturation"] = rows


def _asymmetric_weights(q):
    """``q`` with every int8 per-channel weight re-quantized asymmetrically over [-128, 127] from
    its dequantized values (what weight_symmetric=false would store at 8 bits)."""
    from onnx import numpy_helper
    from onnxopt.quant.recovery.adaround import write_scale
    from onnxopt.quant.quantize import quantize_weight, weight_scales, weight_zero_points

    out = onnx.ModelProto()
    out.CopyFrom(q)
    inits = {t.name: t for t in out.graph.initializer}
    producer = {o: nd for nd in out.graph.node for o in nd.output}
    readers: dict = {}
    for nd in out.graph.node:
        for t in nd.input:
            readers.setdefault(t, []).append(nd)
    for n in out.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or len(n.input) < 3:
            continue
        wq = numpy_helper.to_array(inits[n.input[0]])
        if wq.dtype != np.int8:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        s_arr = numpy_helper.to_array(inits[n.input[1]])
        if s_arr.ndim != 1:
            continue
        s = s_arr.astype(np.float64)
        shape = [-1 if i == axis else 1 for i in range(wq.ndim)]
        w = wq.astype(np.float64) * s.reshape(shape)
        s_new = weight_scales(w, axis, 8, False, symmetric=False)
        zp = weight_zero_points(w, s_new, axis, 8)
        for name, arr in ((n.input[0], quantize_weight(w, s_new, axis, 8, zp)), (n.input[2], zp)):
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
        # the layer entry write_scale takes: its int32 bias (scale s_in * s_w) is re-quantized with the new scale
        entry = {"weight_scale": n.input[1]}
        for reader in readers.get(n.output[0], []):
            if reader.op_type in ("Conv", "Gemm") and len(reader.input) > 2 and reader.input[1] == n.output[0]:
                bdq = producer.get(reader.input[2])
                if bdq is not None and bdq.op_type == "DequantizeLinear":
                    entry.update(bias_is_int=True, bias_q=bdq.input[0], bias_scale=bdq.input[1])
        write_scale(inits, entry, s_arr, np.asarray(s_new, np.float64), s)
    return out


def print_tables(results):
    for key, rows in results.items():
        if not rows:
            continue
        print(f"\n== {key}")
        cols = [c for c in rows[0].keys()] + sorted({c for r in rows for c in r} - set(rows[0].keys()))
        print(" | ".join(cols))
        for r in rows:
            cells = []
            for c in cols:
                x = r.get(c, "")
                cells.append(f"{x:.3f}" if isinstance(x, float) else (json.dumps(x) if isinstance(x, dict) else str(x)))
            print(" | ".join(cells))


def main(argv=None):
    if (argv or sys.argv[1:])[:1] == ["_latency"]:
        return _latency_worker(*(argv or sys.argv[1:])[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["effnet", "cifar", "yolox", "speed", "saturation", "ceiling", "all"])
    ap.add_argument("--targets", default="ort,tensorrt")
    ap.add_argument("--methods", default="percentile", help="onnxopt calibration methods to run (comma-separated)")
    ap.add_argument("--ort-methods", default="minmax,entropy,percentile", help="quantize_static methods ('' for none)")
    ap.add_argument("--check-tidl", action="store_true", help="also quantize for tidl/tidl-tda4vm and run their checks")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--procs", type=int, default=5, help="speed: fresh processes per model (the median over them is reported)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on at most this many images (quick runs)")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--pre", default="", help="effnet: float passes applied first, e.g. equalize")
    ap.add_argument("--set", dest="set_options", action="append", default=[], help="PASS.OPTION=VALUE for --pre passes")
    args = ap.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.ort_methods = [m for m in args.ort_methods.split(",") if m]
    args.pre = [p for p in args.pre.split(",") if p]
    args.pre_options = manager.parse_set_options(args.set_options)
    results = {}
    tasks = ["effnet", "cifar", "yolox", "speed"] if args.task == "all" else [args.task]
    for t in tasks:
        globals()[f"task_{t}"](args, results)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
