"""Issue 2 figures: ``cleanup,bnfuse`` on the shared real models, full shared data.

For efficientnet_lite0_bn (1000 ImageNet images: short side 256, center crop 224, (x-127)/128)
and resnet20/56_cifar10 (the 1017 CIFAR-10 images: x/255, ImageNet mean/std): BatchNormalization
and Pad counts before/after, top-1 before/after, top-1 agreement, max abs logit difference, and
the time of each pass (median of ``--repeat`` runs of ``onnxopt.apply`` without verification;
the machine is shared, so timings are noisy). Both models run in onnxruntime with graph
optimizations off, so what is compared is exactly the graph onnxopt wrote.

    python tools/bench_foundation_accuracy.py [--shared ../shared] [--limit N] [--repeat 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import onnxopt
from onnxopt import runtime
from onnxopt.data import open_data

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def imagenet_data(shared: Path, model, limit):
    src = open_data(shared / "data" / "imagenet", model, image={"size": 256, "crop": 224, "mean": [127.0] * 3, "std": [128.0] * 3},
                    max_samples=limit)
    xs = [next(iter(feed.values())) for feed in src.samples()]
    return np.concatenate(xs), src.labels(), 1


def cifar_data(shared: Path, limit):
    with np.load(shared / "data" / "cifar10_test_1017.npz") as z:
        x, y = z["x"], z["y"]
    if limit:
        x, y = x[:limit], y[:limit]
    x = ((x.astype(np.float32) / 255.0) - CIFAR_MEAN) / CIFAR_STD
    return x.astype(np.float32), y.astype(np.int64), 128


def logits_of(model, x, batch):
    sess = runtime.session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def count(model, op):
    return sum(1 for n in model.graph.node if n.op_type == op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="efficientnet_lite0_bn,resnet20_cifar10,resnet56_cifar10")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    ap.add_argument("--repeat", type=int, default=5, help="timing: median of this many apply runs")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    shared = Path(args.shared)
    rows = []
    for name in args.models.split(","):
        path = shared / "models" / f"{name}.onnx"
        before = onnxopt.load_model(path)
        # one verified run (the manager checks every exact pass in onnxruntime), then timing runs
        after, report = onnxopt.apply(path, "cleanup,bnfuse")
        verified = {p.name: p.verification["max_abs"] if p.verification else None for p in report.passes}
        times = {"cleanup": [], "bnfuse": [], "total": []}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, rep = onnxopt.apply(path, "cleanup,bnfuse", verify=False, summarize_layers=False)
            times["total"].append(time.perf_counter() - t0)
            for p in rep.passes:
                times[p.name].append(p.seconds)
        if name.startswith("efficientnet"):
            x, y, batch = imagenet_data(shared, before, args.limit)
        else:
            x, y, batch = cifar_data(shared, args.limit)
        ref, new = logits_of(before, x, batch), logits_of(after, x, batch)
        row = {
            "model": name, "samples": int(len(y)), "eval_batch": batch,
            "bn_before": count(before, "BatchNormalization"), "bn_after": count(after, "BatchNormalization"),
            "pad_before": count(before, "Pad"), "pad_after": count(after, "Pad"),
            "nodes_before": len(before.graph.node), "nodes_after": len(after.graph.node),
            "top1_before": float(np.mean(ref.argmax(1) == y) * 100), "top1_after": float(np.mean(new.argmax(1) == y) * 100),
            "top1_agreement": float(np.mean(ref.argmax(1) == new.argmax(1)) * 100),
            "max_abs_logit_diff": float(np.max(np.abs(ref.astype(np.float64) - new))),
            "verify_max_abs": verified,
            "seconds_cleanup": statistics.median(times["cleanup"]), "seconds_bnfuse": statistics.median(times["bnfuse"]),
            "seconds_apply_total": statistics.median(times["total"]),
        }
        rows.append(row)
        print(f"{name}: BN {row['bn_before']}->{row['bn_after']}  Pad {row['pad_before']}->{row['pad_after']}  "
              f"nodes {row['nodes_before']}->{row['nodes_after']}  top-1 {row['top1_before']:.2f}% -> {row['top1_after']:.2f}% "
              f"(n={row['samples']}, agreement {row['top1_agreement']:.2f}%)  max|dlogit| {row['max_abs_logit_diff']:.2e}  "
              f"cleanup {row['seconds_cleanup']:.3f}s bnfuse {row['seconds_bnfuse']:.3f}s apply {row['seconds_apply_total']:.3f}s",
              flush=True)
    print(f"\n(timings: median of {args.repeat} runs of onnxopt.apply without verification, shared noisy machine)")
    print(f"{'model':<24}{'BN':>9}{'Pad':>8}{'top-1 before':>14}{'top-1 after':>13}{'max|dlogit|':>13}{'cleanup s':>11}{'bnfuse s':>10}")
    for r in rows:
        print(f"{r['model']:<24}{r['bn_before']:>4} ->{r['bn_after']:>2}{r['pad_before']:>4} ->{r['pad_after']:>2}"
              f"{r['top1_before']:>13.2f}%{r['top1_after']:>12.2f}%{r['max_abs_logit_diff']:>13.2e}"
              f"{r['seconds_cleanup']:>11.3f}{r['seconds_bnfuse']:>10.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
