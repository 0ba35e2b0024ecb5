"""A segmentation model exported with its ArgMax, quantized with the defaults: each pixel's class
measured as a decision (``task_metric.POSITIONS``) against the behaviour before it, where an
``[N, C, H, W]`` output took no decision and ``fallback=auto``'s budget did not apply.
``--task mask``: a binary segmentation model instead (foreground or not), ended by a Sigmoid
(``mask`` [N, 1, 32, 32]), each pixel's yes/no a decision.

The model is trained here on scikit-learn's digits upsampled to 32x32: every pixel of the stroke
(intensity over one half) is labelled with the digit (classes 1..10), every other pixel is
background (0). The encoder is the SE model's (``bench_peers.se_block``: HardSwish and
squeeze-excite, unfused BN, depthwise ranges spread over two decades, where int8 loses
accuracy), down to 8x8; a 1x1 conv gives the 11 class scores, upsampled 4x (bilinear) and ended by
an ArgMax over the classes, as segmentation exports for TIDL end. Output ``classes`` [N, 32, 32].

Calibrated on the first 200 test digits, evaluated on the other 400 (``--calibration train``: on
200 training images, evaluated on all 600). Per target, three runs: the defaults now, the
defaults with the per-position decisions switched off (the code before), all int8
(``fallback=none``). Per run: units kept in high precision and their share of the MACs, pixel
agreement with fp32, mean IoU over the 11 classes (a mask: the 2) against the labels, violations of the target's
check.

``--finetune``: QAT instead (``onnxopt finetune --qat w8a8 --target T``, label-free distillation
from the float model, every other setting the defaults), trained on the 200 training images and
evaluated on the 600 test digits; the map's logits distilled per position (the KL of each pixel's
classes, now) against the MSE of the logits (before), beside the all-int8 model it starts from.

    ONNXOPT_BENCH_CACHE=/tmp/SEG nice python tools/bench_segmentation.py [--task classes|mask]
        [--targets ort,tensorrt,tidl] [--calibration held-out|train] [--finetune] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers  # noqa: E402
from onnxopt import runtime, task_metric  # noqa: E402
from onnxopt.quant import check as qcheck  # noqa: E402

CLASSES = 11
HELD_OUT = 200   # --calibration held-out: the first test digits calibrate


def pixel_labels(x: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """[N, 32, 32]: the digit + 1 on the stroke (x > 0: intensity over one half), 0 elsewhere."""
    return np.where(x[:, 0] > 0, digits[:, None, None] + 1, 0).astype(np.int64)


def segmenter(seed=0, spread=2.0, mask=False):
    """(model, calibration feeds, evaluation feeds, pixel labels of the evaluation feeds); ``mask``:
    one foreground score per pixel, trained with binary cross entropy, ended by a Sigmoid."""
    import io

    import onnx
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    xtr, dtr, xte, dte = bench_peers.digits_split()
    ytr, yte = torch.from_numpy(pixel_labels(xtr, dtr)), pixel_labels(xte, dte)
    if mask:
        ytr, yte = (ytr > 0).float()[:, None], (yte > 0).astype(np.int64)
    xtr_t = torch.from_numpy(xtr)
    Block = bench_peers.se_block()
    net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                        Block(16, 48, 16, 1), Block(16, 64, 24, 2), Block(24, 72, 24, 1),
                        nn.Conv2d(24, 1 if mask else CLASSES, 1), nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(25):
        net.train()
        perm = torch.randperm(len(xtr_t), generator=g)
        for i in range(0, len(xtr_t), 64):
            idx = perm[i:i + 64]
            xb = xtr_t[idx] + 0.1 * torch.randn(len(idx), 1, 32, 32, generator=g)
            loss = F.binary_cross_entropy_with_logits(net(xb), ytr[idx]) if mask else F.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    bench_peers.spread_depthwise_ranges(net, spread, seed)

    class WithArgMax(nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.scores = scores

        def forward(self, t):
            return torch.argmax(self.scores(t), dim=1)

    out = "mask" if mask else "classes"
    buf = io.BytesIO()
    torch.onnx.export(nn.Sequential(net, nn.Sigmoid()) if mask else WithArgMax(net), xtr_t[:1], buf, input_names=["input"],
                      output_names=[out], opset_version=17, dynamic_axes={"input": {0: "N"}, out: {0: "N"}}, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    calib = [{"input": xtr[i:i + 1]} for i in range(0, bench_peers.SE_TRAIN, bench_peers.SE_CALIB_EVERY)][:200]
    evalf = [{"input": xte[i:i + 1]} for i in range(len(xte))]
    return model, calib, evalf, yte


def class_maps(model, feeds) -> np.ndarray:
    """[N, 32, 32] class ids: the ArgMax's, or the mask's pixels over 0.5 (1: foreground)."""
    sess = runtime.session(model)
    out = sess.get_outputs()[0].name
    maps = np.concatenate([sess.run([out], f)[0] for f in feeds])
    return (maps[:, 0] > 0.5).astype(np.int64) if out == "mask" else maps


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    ious = []
    for c in range(int(max(pred.max(), truth.max())) + 1):
        p, t = pred == c, truth == c
        union = np.count_nonzero(p | t)
        if union:
            ious.append(np.count_nonzero(p & t) / union)
    return 100.0 * float(np.mean(ious))


class _Before:
    """The per-position decisions switched off: an output with more than two axes takes none."""

    def __enter__(self):
        self.saved = task_metric.decision_kind
        saved = self.saved
        task_metric.decision_kind = lambda shape, activation, axis=None: None if len(shape) > 2 else saved(shape, activation)

    def __exit__(self, *exc):
        task_metric.decision_kind = self.saved


def run(targets: list, calibration: str, task: str) -> list:
    mask = task == "mask"
    model, cf, ef, labels = bench_peers._trained("segmentation", f"se_digits_segmentation{'_mask' if mask else ''}",
                                                 lambda: segmenter(mask=mask))
    if calibration == "held-out":
        cf, ef, labels = ef[:HELD_OUT], ef[HELD_OUT:], labels[HELD_OUT:]
    ref = class_maps(model, ef)
    rows = [{"task": task, "calibration": calibration, "target": "fp32", "config": "-", "kept": None, "mac_share": 0.0,
             "miou": mean_iou(ref, labels), "agreement": 100.0, "check": None}]
    for target in targets:
        for config in ("defaults", "defaults before", "all int8"):
            q, fb, kept, seconds = bench_peers.quantize_as(model, cf, target, config, _Before())
            got = class_maps(q, ef)
            row = {"task": task, "calibration": calibration, "target": target, "config": config,
                   "kept": kept, "mac_share": fb.get("high_precision_mac_share", 0.0), "miou": mean_iou(got, labels),
                   "agreement": 100.0 * float(np.mean(got == ref)), "check": len(qcheck.check_model(q, target)),
                   "seconds": round(seconds, 1), "task_after": fb.get("task_after")}
            bench_peers.log(json.dumps(row))
            rows.append(row)
    return rows


class _MseDistillation:
    """finetune before per-position distillation: a map's logits distilled by their MSE."""

    def __enter__(self):
        from onnxopt.torch import train
        self.train, self.saved = train, train.logit_distill_loss
        saved = self.saved
        train.logit_distill_loss = lambda s, t, activation, temperature, axis=None: saved(s, t, activation, temperature)

    def __exit__(self, *exc):
        self.train.logit_distill_loss = self.saved


def finetune_rows(targets: list, task: str, threads: int) -> list:
    """QAT rows (module doc, ``--finetune``): all int8, then finetuned before / now, per target."""
    import contextlib
    import tempfile

    import onnx

    from onnxopt.cli import main as cli_main

    mask = task == "mask"
    model, cf, ef, labels = bench_peers._trained("segmentation", f"se_digits_segmentation{'_mask' if mask else ''}",
                                                 lambda: segmenter(mask=mask))
    ref = class_maps(model, ef)
    rows = [{"task": task, "calibration": "train", "target": "fp32", "config": "-", "kept": None, "mac_share": 0.0,
             "miou": mean_iou(ref, labels), "agreement": 100.0, "check": None}]
    with tempfile.TemporaryDirectory() as tmp:
        src, data = Path(tmp) / "float.onnx", Path(tmp) / "train.npz"
        onnx.save(model, src)
        np.savez(data, input=np.concatenate([f["input"] for f in cf]))
        for target in targets:
            q, _, _, _ = bench_peers.quantize_as(model, cf, target, "all int8")
            runs = [("all int8", q, 0.0)]
            for config, ctx in (("QAT before (logit MSE)", _MseDistillation()), ("QAT now (KL per position)", contextlib.nullcontext())):
                out = Path(tmp) / f"{target}.onnx"
                t0 = time.perf_counter()
                with ctx:
                    try:
                        cli_main(["finetune", str(src), "-o", str(out), "--data", str(data), "--qat", "w8a8", "--target", target,
                                  "--threads", str(threads), "-q"])
                    except SystemExit as exc:
                        if exc.code:
                            raise
                runs.append((config, onnx.load(out), time.perf_counter() - t0))
            for config, m, seconds in runs:
                got = class_maps(m, ef)
                row = {"task": task, "calibration": "train", "target": target, "config": config, "kept": None, "mac_share": 0.0,
                       "miou": mean_iou(got, labels), "agreement": 100.0 * float(np.mean(got == ref)),
                       "check": len(qcheck.check_model(m, target)), "seconds": round(seconds, 1)}
                bench_peers.log(json.dumps(row))
                rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| task | calibration | target | run | units kept (MAC share) | pixel agreement with fp32 | mean IoU | check violations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{r['kept']} ({100 * r['mac_share']:.0f} %)"
        check = "-" if r["check"] is None else str(r["check"])
        lines.append(f"| {r.get('task', 'classes')} | {r['calibration']} | {r['target']} | {r['config']} | {kept} | {r['agreement']:.2f} % | "
                     f"{r['miou']:.2f} % | {check} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="ort,tensorrt,tidl")
    ap.add_argument("--calibration", default="held-out", choices=("held-out", "train"))
    ap.add_argument("--task", default="classes", choices=("classes", "mask"))
    ap.add_argument("--finetune", action="store_true", help="QAT rows instead (module doc); --calibration is then train")
    ap.add_argument("--threads", type=int, default=1, help="--finetune: torch threads")
    bench_peers.add_rows_options(ap)
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    rows = (lambda: finetune_rows(targets, args.task, args.threads)) if args.finetune else (lambda: run(targets, args.calibration, args.task))
    return bench_peers.rows_main(args, rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
