"""The measurements behind ``prune`` + ``finetune``'s recovery defaults (issue 23).

ResNet56 CIFAR-10 (shared), first 717 images to finetune, last 300 held out. Every run prunes the
model the same way (residual streams kept, ~30 % of the MACs removed), then finetunes it by
label-free distillation from the unpruned model with one setting changed, and reports the
held-out top-1. Runs go in parallel processes (``--jobs``); on a CUDA machine they share the GPU.

    python tools/sweep_recovery.py --jobs 8 --json sweep.json          # the whole grid
    python tools/sweep_recovery.py --only lr1e-3_feat_aug,lr1e-4       # some runs

Each grid entry: ``name: dict(lr=, feature=none|auto|adds, augment=, epochs=, fused=, bn_mode=,
bn_recalib=, train=n images, seed=, warmup=)``. ``fused=False`` keeps BatchNormalization
(cleanup,prune instead of cleanup,bnfuse,prune) to compare the BN statistics modes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared models and data: ../shared beside the checkout, or where ONNXOPT_SHARED points
SHARED = Path(os.environ.get("ONNXOPT_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# the pruning of the first sweep (before prune's defaults changed; MACs -31.1 %): 33 % of the inner
# channels, widths multiples of 4, residual producers protected, the mean fold on generated inputs
PRUNE_DEFAULT = {"ratio": 0.33, "ratio_of": "channels", "round_to": 4, "protect": [".*/conv2/Conv"], "compensate": "mean",
                 "latency_runs": 0}
# the BN seeds 1 and 2 ran after the change: ratio 0.33 of the MACs (-33.1 %), nothing compensated
PRUNE_MACS = {"ratio": 0.33, "round_to": 4, "protect": [".*/conv2/Conv"], "compensate": "none", "latency_runs": 0}
BASE = dict(lr=1e-3, feature="auto", augment=True, epochs=15, fused=True, bn_mode="auto", bn_recalib=False, train=717, seed=0,
            warmup=0.05, prune=None)
GRID = {
    "lr1e-4": dict(lr=1e-4, feature="none", augment=False),
    "lr5e-4": dict(lr=5e-4, feature="none", augment=False),
    "lr1e-3": dict(feature="none", augment=False),
    "lr1e-3_feat": dict(augment=False),
    "lr1e-3_feat_aug": dict(),
    "lr5e-4_feat_aug": dict(lr=5e-4),
    "lr2e-3_feat_aug": dict(lr=2e-3),
    "lr3e-3_feat_aug": dict(lr=3e-3),
    "lr1e-3_adds_aug": dict(feature="adds"),
    "lr1e-3_nofeat_aug": dict(feature="none"),
    "lr1e-3_feat_aug_645": dict(train=645),
    "lr1e-3_feat_aug_e10": dict(epochs=10),
    "lr1e-3_feat_aug_w15": dict(warmup=0.15),
    "lr1e-3_feat_aug_s1": dict(seed=1),
    "lr2e-3_feat_aug_s1": dict(lr=2e-3, seed=1),
    "lr1e-3_feat_aug_comp_none": dict(prune={**PRUNE_DEFAULT, "compensate": "none"}),
    "lr1e-3_feat_aug_e20": dict(epochs=20),
    "bn_train": dict(fused=False, bn_mode="train"),
    "bn_frozen": dict(fused=False, bn_mode="frozen"),
    "bn_train_recalib": dict(fused=False, bn_mode="train", bn_recalib=True),
    **{f"{k}_s{seed}": dict(fused=False, seed=seed, prune=PRUNE_MACS, **v) for seed in (1, 2) for k, v in (
        ("bn_train", dict(bn_mode="train")), ("bn_frozen", dict(bn_mode="frozen")),
        ("bn_train_recalib", dict(bn_mode="train", bn_recalib=True)))},
}


def _cifar():
    import numpy as np
    z = np.load(SHARED / "data" / "cifar10_test_1017.npz")
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    x = ((z["x"].astype(np.float32) / 255.0) - mean) / std
    return x, z["y"]




def run_one(name: str, cfg: dict, threads: int) -> dict:
    import tempfile

    import numpy as np
    import onnxopt
    from bench_finetune import top1
    from onnxopt.data import DataSpec, open_data
    from onnxopt.registry import PassContext
    from onnxopt.torch.train import FinetuneConfig, auto_features, finetune

    x, y = _cifar()
    xt, xh, yh = x[:cfg["train"]], x[717:], y[717:]
    base = onnxopt.load_model(SHARED / "models" / "resnet56_cifar10.onnx")
    passes = "cleanup,bnfuse,prune" if cfg["fused"] else "cleanup,prune"
    prune_opts = cfg["prune"] or PRUNE_DEFAULT
    pruned, rep = onnxopt.apply(base, passes, {"prune": prune_opts}, context=PassContext(log=lambda m: None))
    ex = rep.passes[-1].extra
    teacher = base   # the original model, as the command gives it
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "train.npz"
        np.savez(p, input=xt)
        data = open_data(DataSpec(str(p), batch_size=32), pruned)
        feats = ()
        if cfg["feature"] == "auto":
            feats = auto_features(teacher, pruned)
        elif cfg["feature"] == "adds":
            adds = {n.output[0] for n in pruned.graph.node if n.op_type == "Add"}
            feats = [f for f in auto_features(teacher, pruned) if f in adds]
        fc = FinetuneConfig(epochs=cfg["epochs"], lr=cfg["lr"], batch_size=32, augment=cfg["augment"], feature_loss=feats,
                            bn_mode=cfg["bn_mode"], bn_recalib=cfg["bn_recalib"], warmup=cfg["warmup"], seed=cfg["seed"],
                            progress=False, log=lambda m: None, threads=threads)
        t0 = time.perf_counter()
        res = finetune(pruned, data, teacher=teacher, config=fc)
        secs = time.perf_counter() - t0
    return {"name": name, **{k: v for k, v in cfg.items() if k != "prune"}, "macs_reduction": ex["macs"]["reduction"],
            "before": top1(pruned, xh, yh), "after": top1(res.model, xh, yh), "features": len(feats), "seconds": round(secs, 1),
            "history_loss": [round(h["loss"], 4) for h in res.history]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="1 epoch on 64 images (checks the script)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(GRID)
    rows = []
    import multiprocessing
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = {pool.submit(run_one, n, {**BASE, **GRID[n], **({"epochs": 1, "train": 64} if args.smoke else {})}, args.threads): n for n in names}
        for f in futs:
            try:
                r = f.result()
            except Exception as exc:  # noqa: BLE001  one failed run must not lose the others
                r = {"name": futs[f], "error": repr(exc)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
