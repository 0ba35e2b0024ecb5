"""Issue 7 figure: EfficientNet-Lite0 ``lite,bnfuse,qdq`` then finetuned by distillation.

The shared ImageNet images are split as the issue says: every 5th image (200) is held out for
top-1, the other 800 finetune the model by label-free distillation from the original float
model. The shared export has a fixed batch of 1; the torch round trip trains it at any batch
(``OnnxModule`` swaps the declared batch in Reshape shapes for the running one), and the written
model keeps the original's batch-1 interface.

Rows: original float, after ``lite,bnfuse`` (ReLU6 -> ReLU, float), after ``lite,bnfuse,qdq``
(PTQ, the starting point), after finetuning; drop vs the original and the 1-point target.

``lite`` records the 6 each ReLU6 -> ReLU rewrite drops and ``qdq`` calibrates with it
(``qdq.clip_bounds``, on by default): the Q/DQ then clips where the ReLU6 did, so the PTQ start
is the quantized original rather than the unbounded ReLU model. ``--qdq-set clip_bounds=false``
measures the flow without it.

``--float-epochs N`` follows TI's flow for lite models: the float ``lite,bnfuse`` model is
finetuned first (no fake quantization, so faster and without rounding noise), then quantized by
``qdq`` (calibrated on the finetuned model) and QAT-finetuned for ``--epochs``.
``--feature-loss`` also distills every activation output and residual sum of the original
(the student's ReLU outputs against the teacher's ReLU6 outputs, same tensor names), so each
layer learns where the lost clipping mattered instead of only the logits.

    python tools/bench_finetune_effnet.py [--target tensorrt] [--epochs 3] [--lr 1e-4] [--threads 0]
                                          [--float-epochs N] [--float-lr LR] [--float-model F.onnx]
                                          [--feature-loss] [--feature-weight W] [--qat-logits-only]
                                          [--qdq-set OPTION=VALUE] [--equalize] [--quant-mode lsq|pact|fixed]
                                          [--limit-train N] [--json out.json]

``--float-model F.onnx`` writes the float stage there, or loads it when F.onnx exists, so QAT
variants can start from one float stage.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from onnxopt import runtime  # noqa: E402
from onnxopt.data import DataSpec, open_data  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402

IMAGE = dict(size=256, crop=224, mean=[127.0], std=[128.0])   # EfficientNet-Lite0's preprocessing


def top1(model, feeds, labels) -> float:
    sess = runtime.session(model, optimize=True)
    hits = sum(int(np.argmax(sess.run(None, f)[0]) == y) for f, y in zip(feeds, labels))
    return 100.0 * hits / len(labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tensorrt", help="qdq target (tensorrt, ort, tidl)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--float-epochs", type=int, default=0, help="finetune the float lite,bnfuse model first, then qdq + QAT")
    ap.add_argument("--float-lr", type=float, default=None, help="lr of the float stage (default: --lr)")
    ap.add_argument("--feature-loss", action="store_true", help="also distill activation outputs and residual sums")
    ap.add_argument("--feature-weight", type=float, default=0.1)
    ap.add_argument("--float-model", default=None, help="the float stage's result: loaded when the file exists, else written there")
    ap.add_argument("--qdq-set", action="append", default=[], metavar="OPTION=VALUE", help="qdq option for the QAT start, e.g. calib_method=mse")
    ap.add_argument("--equalize", action="store_true", help="cross-layer equalization (exact in float) before qdq")
    ap.add_argument("--quant-mode", default="lsq", help="QAT step sizes: lsq (learned), pact, fixed (calibrated scales kept)")
    ap.add_argument("--qat-logits-only", action="store_true", help="QAT stage: distill the logits only (no --feature-loss)")
    ap.add_argument("--augment", action="store_true", help="random shift + flip on the finetuning images")
    ap.add_argument("--limit-train", type=int, default=0, help="finetune on the first N of the 800 images (0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = auto from the load average)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not SHARED.exists():
        print(f"{SHARED} not found", file=sys.stderr)
        return 1
    log = lambda m: print("   ", m, file=sys.stderr, flush=True)  # noqa: E731
    from onnxopt.torch.train import FinetuneConfig, auto_features, finetune

    base = onnxopt.load_model(SHARED / "models" / "efficientnet_lite0.onnx")
    folder = str(SHARED / "data" / "imagenet")
    held = open_data(folder, base, image=IMAGE, every=5)
    train = open_data(folder, base, image=IMAGE, every=5, exclude_every=True)
    hfeeds, hlabels = list(held.samples()), held.labels()
    name = base.graph.input[0].name
    xt = np.concatenate([f[name] for f in train.samples()])
    if args.limit_train:
        xt = xt[: args.limit_train]
    log(f"{len(hlabels)} held-out images, {len(xt)} finetuning images")

    rows = {"target": args.target, "held_out": len(hlabels), "finetune_images": len(xt)}
    rows["original_top1"] = top1(base, hfeeds, hlabels)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "train.npz"
        np.savez(p, **{name: xt})
        data = open_data(DataSpec(str(p), batch_size=args.batch_size), base)
        ctx = PassContext(data=data, log=lambda m: None, progress=False)
        lite, _ = onnxopt.apply(base, ["lite", "bnfuse"], context=ctx)
        rows["lite_bnfuse_top1"] = top1(lite, hfeeds, hlabels)
        features = auto_features(base, lite) if args.feature_loss else ()
        rows["feature_tensors"] = len(features)

        def config(epochs, lr, feats):
            return FinetuneConfig(epochs=epochs, lr=lr, batch_size=args.batch_size, augment=args.augment, progress=False, log=log,
                                  threads=args.threads, feature_loss=feats, feature_weight=args.feature_weight, quant_mode=args.quant_mode)
        t0 = time.perf_counter()
        speeds = []
        if args.float_model and Path(args.float_model).exists():
            lite = onnxopt.load_model(args.float_model)
            log(f"float stage loaded from {args.float_model}")
        elif args.float_epochs:
            res = finetune(lite, data, teacher=base, config=config(args.float_epochs, args.float_lr or args.lr, features))
            lite = res.model
            speeds += [h["samples_per_second"] for h in res.history]
            if args.float_model:
                onnxopt.save_model(lite, args.float_model)
        if args.float_epochs or args.float_model:
            rows["float_finetuned_top1"] = top1(lite, hfeeds, hlabels)
            log(f"float lite,bnfuse finetuned: {rows['float_finetuned_top1']:.2f}")
        qopts = {"target": args.target, **dict(kv.split("=", 1) for kv in args.qdq_set)}
        q, _ = onnxopt.apply(lite, ["equalize", "qdq"] if args.equalize else ["qdq"], {"qdq": qopts}, context=ctx, verify=False)
        rows["ptq_top1"] = top1(q, hfeeds, hlabels)
        log(f"original {rows['original_top1']:.2f}  lite,bnfuse {rows['lite_bnfuse_top1']:.2f}  +qdq {rows['ptq_top1']:.2f}")
        res = finetune(q, data, teacher=base, config=config(args.epochs, args.lr, () if args.qat_logits_only else features))
        speeds += [h["samples_per_second"] for h in res.history]
        rows["finetune_seconds"] = round(time.perf_counter() - t0, 1)
    rows["finetuned_top1"] = top1(res.model, hfeeds, hlabels) if args.epochs else rows["ptq_top1"]
    rows["samples_per_second_median"] = statistics.median(speeds or [0.0])
    rows["parity_max_abs"] = res.parity.get("max_abs")
    rows.update(equalize=args.equalize, qdq=qopts, quant_mode=args.quant_mode, qat_features=not args.qat_logits_only)
    rows["drop_points"] = round(rows["original_top1"] - rows["finetuned_top1"], 2)
    rows.update(float_epochs=args.float_epochs, epochs=args.epochs, lr=args.lr, feature_weight=args.feature_weight, batch_size=args.batch_size, augment=args.augment, met=rows["drop_points"] <= 1.0)
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
