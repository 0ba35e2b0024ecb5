"""Issue 7 figures: finetuning in torch after prune / for QAT, measured on the shared models.

* ResNet56 CIFAR pruned at 0.3 (``prune`` pass), then finetuned by label-free distillation from
  the unpruned model: held-out top-1 before/after vs the unpruned model's.
* ResNet20 CIFAR W4A4: PTQ baseline (``qdq`` pass, 4-bit weights and activations) vs QAT by
  distillation from fp32 (``--qat w4a4``), both against fp32.
* EfficientNet-Lite0 ``lite,bnfuse,qdq`` + distillation: NOT measured here (the shared export has a
  fixed batch of 1, so training runs sample by sample; too slow on this CPU for the time given).
* Issue 23 (``--only cli``): ``onnxopt apply cleanup,bnfuse,prune ... --set prune.ratio=0.3`` then
  ``onnxopt finetune ... --teacher ... --data ... --epochs 15``, exactly as a user types them, with
  the defaults: held-out top-1, MACs, samples/s.
* ``--softmax`` (cli, r20): the shared model as exported with a final Softmax (probabilities out).
* Finetuning throughput on this CPU (``--only tput``; samples/s, median over epochs -- the machine
  is shared, so the figure is noisy; ``--threads 0`` picks the cores the load average leaves idle).

Data: the shared CIFAR subset, first 717 images for finetuning, last 300 held out (preprocessing
x/255, mean (.485,.456,.406), std (.229,.224,.225)); labels are used only for evaluation.

    python tools/bench_finetune.py [--only r56,r20,tput] [--epochs-r56 8] [--epochs-r20 8] [--bn-mode train]
                                   [--bn-recalib] [--keep-first-last] [--optimizer adam] [--weight-decay 0]
                                   [--prune-round-to 8] [--prune-protect REGEX,...] [--prune-compensate mean|refit]
                                   [--prune-mode uniform] [--prune-importance l1] [--json out.json]

The r56 row reports the prune options and the MACs/params reduction they give.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXOPT_SHARED", ROOT.parent / "shared"))   # ../shared, or where ONNXOPT_SHARED points
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from onnxopt import runtime  # noqa: E402
from onnxopt.data import DataSpec, open_data  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def cifar():
    z = np.load(SHARED / "data" / "cifar10_test_1017.npz")
    x = ((z["x"].astype(np.float32) / 255.0) - MEAN) / STD
    y = z["y"].astype(np.int64)
    return x[:717], y[:717], x[717:], y[717:]


def top1(model, x, y, batch=100) -> float:
    sess = runtime.session(model, optimize=True)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        out = sess.run(None, {name: x[i:i + batch]})[0]
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def train_source(model, x, tmp: Path):
    """A DataSource over the finetuning images (no labels: distillation is label-free)."""
    p = tmp / "train.npz"
    np.savez(p, **{model.graph.input[0].name: x})
    return open_data(DataSpec(str(p), batch_size=32), model)


def _bn_recalibrated(model, x):
    import torch
    from onnxopt.torch.convert import to_torch
    from onnxopt.torch.train import recalibrate_bn
    from onnxopt.torch.writeback import write_back
    module = to_torch(model)
    recalibrate_bn(module, {module.input_names[0]: torch.from_numpy(x)}, 64, torch.device("cpu"))
    return write_back(module, model)


def residual_features(teacher, student) -> list:
    """The residual-stream tensors (Add outputs) among ``finetune --feature-loss auto``'s choice:
    the feature-distillation targets (pruning keeps the residual channels, so these line up)."""
    from onnxopt.torch.train import auto_features

    adds = {n.output[0] for n in student.graph.node if n.op_type == "Add"}
    return [o for o in auto_features(teacher, student) if o in adds]


def prune_options(args) -> dict:
    """The prune pass options of the r56 figure, from the --prune-* flags."""
    opts = {"ratio": args.prune_ratio, "round_to": args.prune_round_to, "mode": args.prune_mode,
            "importance": args.prune_importance, "compensate": args.prune_compensate, "latency_runs": 0}
    if args.prune_protect:
        opts["protect"] = args.prune_protect.split(",")
    return opts


def run_r56(args, tmp, rows, log):
    from onnxopt.torch.train import FinetuneConfig, finetune
    xt, _, xh, yh = cifar()
    base = onnxopt.load_model(SHARED / "models" / "resnet56_cifar10.onnx")
    data = train_source(base, xt, tmp)
    acc_base = top1(base, xh, yh)
    ctx = PassContext(data=data, log=lambda m: None)
    popts = prune_options(args)
    pruned, rep = onnxopt.apply(base, "prune", {"prune": popts}, context=ctx)
    pex = rep.passes[-1].extra
    log(f"prune {popts}: MACs -{100 * pex['macs']['reduction']:.1f} %, params -{100 * pex['params']['reduction']:.1f} %")
    acc_pruned = top1(pruned, xh, yh)
    acc_recalib = top1(_bn_recalibrated(pruned, xt), xh, yh)   # what re-estimating BN alone recovers
    cfg = FinetuneConfig(epochs=args.epochs_r56, lr=args.lr_r56, batch_size=32, augment=True, progress=False, log=log, threads=args.threads,
                         optimizer=args.optimizer, weight_decay=args.weight_decay,
                         bn_mode=args.bn_mode, bn_recalib=args.bn_recalib, warmup=args.warmup,
                         feature_loss=residual_features(base, pruned) if args.feature_loss else (), feature_weight=args.feature_weight)
    log(f"feature distillation on {len(cfg.feature_loss)} residual tensors")
    t0 = time.perf_counter()
    res = finetune(pruned, data, teacher=base, config=cfg)
    secs = time.perf_counter() - t0
    acc_ft = top1(res.model, xh, yh)
    sps = statistics.median(h["samples_per_second"] for h in res.history)
    rows.append({"figure": "resnet56 prune 0.3 + distillation", "baseline_top1": acc_base, "before_finetune_top1": acc_pruned, "bn_recalib_only_top1": acc_recalib,
                 "after_finetune_top1": acc_ft, "drop_points": round(acc_base - acc_ft, 2), "target_drop": 1.5,
                 "met": acc_base - acc_ft <= 1.5, "prune": popts, "macs_reduction": pex["macs"]["reduction"],
                 "params_reduction": pex["params"]["reduction"], "optimizer": args.optimizer, "weight_decay": args.weight_decay, "bn_mode": args.bn_mode, "bn_recalib": args.bn_recalib, "feature_tensors": len(cfg.feature_loss), "warmup": args.warmup, "epochs": args.epochs_r56, "lr": args.lr_r56, "finetune_seconds": round(secs, 1),
                 "samples_per_second_median": sps, "parity_max_abs": res.parity.get("max_abs")})


def run_r20(args, tmp, rows, log):
    from onnxopt.qat import prepare_qat
    from onnxopt.torch.train import FinetuneConfig, finetune
    xt, _, xh, yh = cifar()
    path = SHARED / "models" / "resnet20_cifar10.onnx"
    base = onnxopt.load_model(_with_softmax(path, tmp) if args.softmax else path)
    data = train_source(base, xt, tmp)
    acc_fp = top1(base, xh, yh)
    ptq, _ = onnxopt.apply(base, "qdq", {"qdq": {"weight_bits": 4, "activation_bits": 4}},
                           context=PassContext(data=data, log=lambda m: None), verify=False)
    acc_ptq = top1(ptq, xh, yh)   # the PTQ baseline: qdq defaults (percentile calibration)
    qmodel, overrides, _ = prepare_qat(base, "w4a4", data, log=lambda m: None, extra_options={"calib_method": args.calib_method,
                                                                                     "keep_first_last": args.keep_first_last})
    acc_qat_init = top1(qmodel, xh, yh)
    cfg = FinetuneConfig(epochs=args.epochs_r20, lr=args.lr_r20, batch_size=32, augment=True, progress=False, log=log,
                         threads=args.threads, bn_mode=args.bn_mode, bn_recalib=args.bn_recalib, quant_mode=args.quant_mode, warmup=args.warmup,
                         optimizer=args.optimizer, weight_decay=args.weight_decay, feature_weight=args.feature_weight,
                         feature_loss=residual_features(base, qmodel) if args.feature_loss else (), **overrides)
    log(f"feature distillation on {len(cfg.feature_loss)} residual tensors")
    t0 = time.perf_counter()
    res = finetune(qmodel, data, teacher=base, config=cfg)
    secs = time.perf_counter() - t0
    acc_qat = top1(res.model, xh, yh)
    from onnxopt.quant.check import check_model
    violations = check_model(res.model, "tensorrt")   # the written QDQ model stays valid for its target
    sps = statistics.median(h["samples_per_second"] for h in res.history)
    rows.append({"figure": "resnet20 W4A4 QAT by distillation", "softmax": args.softmax, "fp32_top1": acc_fp, "ptq_w4a4_top1": acc_ptq, "qat_start_top1": acc_qat_init,
                 "qat_calib": args.calib_method, "keep_first_last_float": args.keep_first_last, "qat_w4a4_top1": acc_qat, "feature_tensors": len(cfg.feature_loss), "optimizer": args.optimizer, "weight_decay": args.weight_decay, "bn_mode": args.bn_mode, "bn_recalib": args.bn_recalib,
                 "drop_points": round(acc_fp - acc_qat, 2), "target_drop": 2.0, "met": acc_fp - acc_qat <= 2.0,
                 "epochs": args.epochs_r20, "lr": args.lr_r20, "finetune_seconds": round(secs, 1),
                 "samples_per_second_median": sps, "parity_max_abs": res.parity.get("max_abs"), "check_tensorrt_violations": len(violations)})


def run_cli(args, tmp, rows, log):
    """Issue 23: the two commands a new user types, unchanged but for --epochs (and --seed,
    --threads, --device), on ResNet56 with the first 717 images to finetune and the last 300 held
    out; top-1 of the pruned and the finetuned model on the 300, MACs, and finetune's samples/s."""
    from onnxopt import stats
    xt, _, xh, yh = cifar()
    train = tmp / "train.npz"
    np.savez(train, input=xt)
    model = SHARED / "models" / "resnet56_cifar10.onnx"
    if args.softmax:   # the model as exported with its Softmax (probabilities out)
        model = _with_softmax(model, tmp)
    pruned, tuned, report = tmp / f"p{args.seed}.onnx", tmp / f"f{args.seed}.onnx", tmp / f"ft{args.seed}.json"
    onnxopt_cli = [sys.executable, "-m", "onnxopt"]
    cmd1 = onnxopt_cli + ["apply", "cleanup,bnfuse,prune", str(model), "-o", str(pruned), "--set", f"prune.ratio={args.cli_ratio}"]
    cmd2 = onnxopt_cli + ["finetune", str(pruned), "-o", str(tuned), "--teacher", str(model), "--data", str(train),
                          "--epochs", str(args.cli_epochs), "--seed", str(args.seed), "--threads", str(args.threads),
                          "--device", args.device, "--report", str(report)] + args.cli_extra.split()
    said = []
    t0 = time.perf_counter()
    for cmd in (cmd1, cmd2):
        log(" ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        said.append(done.stderr + done.stdout)
        if done.returncode:
            raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    secs = time.perf_counter() - t0
    for text in said:
        for line in text.splitlines():
            if line.startswith(("prune:", "finetune defaults:", "held in", "early stop", "kept the weights", "epoch ")):
                log(line)
    base = onnxopt.load_model(model)
    p, f = onnxopt.load_model(pruned), onnxopt.load_model(tuned)
    rep = json.loads(report.read_text())
    macs = 1 - stats.total_macs(p) / stats.total_macs(base)
    acc_base, acc_p, acc_f = top1(base, xh, yh), top1(p, xh, yh), top1(f, xh, yh)
    rows.append({"figure": "issue 23: the two commands with the defaults", "softmax": args.softmax, "ratio": args.cli_ratio, "epochs": args.cli_epochs,
                 "seed": args.seed, "extra_flags": args.cli_extra, "macs_reduction": round(macs, 4), "baseline_top1": acc_base,
                 "pruned_top1": acc_p, "finetuned_top1": acc_f, "target_top1": 88.8, "met": acc_f >= 88.8 and macs >= 0.30,
                 "epochs_run": len(rep["history"]), "samples_per_second": round(rep["samples_per_second"], 1),
                 "samples_per_second_per_epoch": [h["samples_per_second"] for h in rep["history"]],
                 "seconds_both_commands": round(secs, 1), "device": args.device, "threads": args.threads})


def _with_softmax(path: Path, tmp: Path) -> Path:
    """A copy of the model at ``path`` with a Softmax after its logits, written under ``tmp``."""
    import onnx
    from onnx import helper
    m = onnx.load(str(path))
    out = m.graph.output[0]
    for node in m.graph.node:
        node.output[:] = [f"{o}_logits" if o == out.name else o for o in node.output]
    m.graph.node.append(helper.make_node("Softmax", [f"{out.name}_logits"], [out.name], axis=1, name="softmax"))
    dest = tmp / "with_softmax.onnx"
    onnx.save(m, str(dest))
    return dest


def run_tput(args, tmp, rows, log):
    """Finetuning throughput alone: ResNet20 fp32 and W4A4 QDQ, distillation (teacher cached), batch 32."""
    from onnxopt.qat import prepare_qat
    from onnxopt.torch.train import FinetuneConfig, finetune
    xt, _, _, _ = cifar()
    base = onnxopt.load_model(SHARED / "models" / "resnet20_cifar10.onnx")
    data = train_source(base, xt, tmp)
    qmodel, overrides, _ = prepare_qat(base, "w4a4", data, log=lambda m: None)
    for name, model, extra in (("resnet20 fp32", base, {}), ("resnet20 W4A4 QDQ", qmodel, overrides)):
        cfg = FinetuneConfig(epochs=3, lr=1e-4, batch_size=32, progress=False, log=log, threads=args.threads, **extra)
        res = finetune(model, data, teacher=base, config=cfg)
        rows.append({"figure": f"throughput {name}", "samples_per_second_median": statistics.median(h["samples_per_second"] for h in res.history),
                     "per_epoch": [h["samples_per_second"] for h in res.history], "threads": args.threads or "auto", "met": None})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="r20,r56", help="comma-separated: r20, r56, tput, cli (issue 23's two commands)")
    ap.add_argument("--cli-ratio", type=float, default=0.3, help="cli: prune.ratio")
    ap.add_argument("--cli-epochs", type=int, default=15, help="cli: finetune --epochs")
    ap.add_argument("--cli-extra", default="", help="cli: extra finetune flags (e.g. the old defaults, for comparison)")
    ap.add_argument("--softmax", action="store_true", help="cli, r20: the model exported with a final Softmax (probabilities out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs-r56", type=int, default=8)
    ap.add_argument("--lr-r56", type=float, default=5e-4)
    ap.add_argument("--epochs-r20", type=int, default=8)
    ap.add_argument("--lr-r20", type=float, default=5e-4)
    ap.add_argument("--bn-mode", default="train", choices=["frozen", "train"])
    ap.add_argument("--bn-recalib", action="store_true")
    ap.add_argument("--calib-method", default="mse", help="qdq calibration that initializes QAT (the PTQ baseline keeps the default)")
    ap.add_argument("--keep-first-last", action="store_true", help="QAT: keep the first and last layers in float (LSQ paper protocol)")
    ap.add_argument("--quant-mode", default="lsq", choices=["lsq", "pact", "fixed"])
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with a linear lr warm-up")
    ap.add_argument("--feature-loss", action="store_true", help="also distill the residual-stream tensors (Add outputs) of the original model")
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--prune-ratio", type=float, default=0.3)
    ap.add_argument("--prune-round-to", type=int, default=8, help="prune.round_to (8 = the pass default; 1 = exact ratios)")
    ap.add_argument("--prune-mode", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--prune-importance", default="l1")
    ap.add_argument("--prune-compensate", default="mean")
    ap.add_argument("--prune-protect", default="", help="prune.protect regexes, comma-separated (e.g. '.*/conv2/Conv' keeps the residual streams)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = auto from the load average)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not SHARED.exists():
        print(f"{SHARED} not found", file=sys.stderr)
        return 1
    rows = []
    log = lambda m: print("   ", m, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for what in args.only.split(","):
            fn = {"r56": run_r56, "r20": run_r20, "tput": run_tput, "cli": run_cli}[what.strip()]
            print(f"== {what}", file=sys.stderr, flush=True)
            fn(args, Path(tmp), rows, log)
            print(json.dumps(rows[-1]), flush=True)
    print("\n| figure | numbers | target met |\n|---|---|---|")
    for r in rows:
        nums = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("figure", "met"))
        print(f"| {r['figure']} | {nums} | {r['met']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
