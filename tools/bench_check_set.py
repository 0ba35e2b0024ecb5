"""Can a check set made from the calibration images stand in for images the model never saw?

    nice python tools/bench_check_set.py [--models se,mnist_vit,mnist_mbv2,mnist_gru,resnet20,resnet56,effnet]
        [--targets ort,tensorrt] [--fold F] [--out results.json]
    python tools/bench_check_set.py --markdown results.json [more.json ...]

``fallback=auto`` checks its agreement budget on the calibration samples. Where those are training
images (the SE model, the three MNIST models of ``bench_peers.py``), the float model's margins there
are wider than on new images, and the check sees fewer top-1 changes than the deployment will.
This bench asks whether a set *derived from the calibration images* would see the held-out rate,
for every classifier of ``bench_peers.py`` (4 calibrated on training images, 3 on held-out ones):

* ``calibration``: the calibration images themselves (what the check reads today);
* ``noise k``: each image plus Gaussian noise of ``k`` times the calibration images' standard
  deviation (one scalar per model), k in 0.1, 0.2, 0.3, 0.5, 1.0;
* ``mixup``: ``l*a + (1-l)*b`` of two calibration images the float model puts in different
  classes, l uniform in [0, 1] (samples between classes, near the decision boundaries);
* ``shift k``: each image moved by ``k`` pixels along its last two (spatial) axes, up, down, left
  or right in turn, the border repeated (the same scene, framed differently: a new view of a
  training image that noise and mixup are not).

Each model is quantized by the qdq pass with ``fallback=none`` (all int8, calibration as the
default) per target, and the rate at which its top-1 class differs from fp32's is measured on each
set and on the held-out images (onnxruntime, default graph optimizations). Two summaries: how far
each set's rate is from the held-out rate (mean |log ratio|, rates floored at half a sample), with
the set chosen leaving each model out; and, as the fallback would decide, whether the set flags the
all-int8 model (``agreement_bound`` of its loss above the 1-point budget at 0.84 confidence) against
whether the held-out loss is above 1 point.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as P  # noqa: E402

from onnxopt import manager, model_io  # noqa: E402
from onnxopt.quant.recovery.fallback import shift_images  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402
from onnxopt.task_metric import agreement_bound  # noqa: E402

NOISE = (0.1, 0.2, 0.3, 0.5, 1.0)
SHIFT = (1, 2)
BUDGET, CONFIDENCE = 1.0, 0.84   # the qdq defaults max_agreement_loss / agreement_confidence
MODELS = ("se", "mnist_vit", "mnist_mbv2", "mnist_gru", "resnet20", "resnet56", "effnet")
TRAINING_CALIBRATION = {"se", "mnist_vit", "mnist_mbv2", "mnist_gru"}


def check_sets(calib: np.ndarray, pred: np.ndarray, seed: int = 0) -> dict:
    """{set name: images} derived from the calibration images ``calib`` (fp32 top-1 ``pred``)."""
    rng = np.random.default_rng(seed)
    sets = {"calibration": calib}
    std = float(calib.std())
    for k in NOISE:
        sets[f"noise {k:g}"] = (calib + rng.normal(0.0, k * std, calib.shape)).astype(calib.dtype)
    n = len(calib)
    a, b = rng.integers(0, n, 8 * n), rng.integers(0, n, 8 * n)
    apart = pred[a] != pred[b]
    a, b = a[apart][:n], b[apart][:n]
    lam = rng.uniform(0.0, 1.0, (len(a),) + (1,) * (calib.ndim - 1)).astype(calib.dtype)
    sets["mixup"] = lam * calib[a] + (1 - lam) * calib[b]
    for k in SHIFT:
        sets[f"shift {k}"] = shifted(calib, k)
    return sets


def shifted(images: np.ndarray, k: int) -> np.ndarray:
    """Image ``i`` moved by ``k`` pixels along the last two axes, as ``qdq.fallback_check=shifted`` moves it."""
    return shift_images(images, (images.ndim - 2, images.ndim - 1), k)


def run_model(name: str, targets: list) -> list:
    path, cf, ef, _, _, _ = P.prepare(name)
    model = model_io.load_model(path)
    key = list(cf[0])[0]
    calib = np.concatenate([f[key] for f in cf])
    held = np.concatenate([f[key] for f in ef])
    ref_calib = P.top1(model, calib)
    sets = {**check_sets(calib, ref_calib), "held-out": held}
    ref = {s: (ref_calib if s == "calibration" else P.top1(model, x)) for s, x in sets.items()}
    rows = []
    for target in targets:
        ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None)
        out, _ = manager.apply(model, ["qdq"], {"qdq": {"target": target, "fallback": "none"}}, context=ctx,
                               verify=False, summarize_layers=False)
        for s, x in sets.items():
            changed = int(np.sum(P.top1(out, x) != ref[s]))
            row = {"model": name, "target": target, "set": s, "samples": len(x), "changed": changed,
                   "rate": 100.0 * changed / len(x)}
            P.log(json.dumps(row))
            rows.append(row)
    return rows


def _rate(r: dict) -> float:
    return max(r["rate"], 50.0 / r["samples"])   # half a sample: a set that sees none is not "infinitely" off


def summary(rows: list) -> str:
    """The tables of the closing note from the rows of one or more runs (``--fold`` runs add rows)."""
    pairs = sorted({(r["model"], r["target"], r.get("fold", 0)) for r in rows},
                   key=lambda p: (MODELS.index(p[0]), p[2], p[1]))
    by = {(r["model"], r["target"], r.get("fold", 0), r["set"]): r for r in rows}
    sets = [s for s in dict.fromkeys(r["set"] for r in rows) if s != "held-out"]
    complete = [p for p in pairs if all((*p, s) in by for s in sets)]   # fold runs may hold two sets only
    lines = ["| model (calibrated on) | target | fold | held-out change % | " + " | ".join(sets) + " |",
             "|---|---|---|---|" + "---|" * len(sets)]
    for m, t, f in pairs:
        cells = []
        for s in sets:
            r = by.get((m, t, f, s))
            flag = r is not None and agreement_bound(r["rate"], r["samples"], CONFIDENCE) > BUDGET
            cells.append("-" if r is None else f"{r['rate']:.2f}{' ⚑' if flag else ''}")
        kind = "training" if m in TRAINING_CALIBRATION else "held-out"
        lines.append(f"| {m} ({kind}) | {t} | {f} | {by[(m, t, f, 'held-out')]['rate']:.2f} | " + " | ".join(cells) + " |")

    def distance(s, keep):
        return float(np.mean([abs(math.log(_rate(by[(*p, s)]) / _rate(by[(*p, 'held-out')])))
                              for p in complete if keep(p[0])]))

    lines += ["", "⚑: the set flags the all-int8 model (the fallback would keep units in high precision).", "",
              "| set | mean abs log(rate / held-out rate) | flags / held-out loss > 1 pt | flags, held-out loss <= 1 pt |",
              "|---|---|---|---|"]
    over = {p for p in complete if by[(*p, "held-out")]["rate"] > BUDGET}
    for s in sets:
        flagged = {p for p in complete if agreement_bound(by[(*p, s)]["rate"], by[(*p, s)]["samples"], CONFIDENCE) > BUDGET}
        lines.append(f"| {s} | {distance(s, lambda m: True):.2f} | {len(flagged & over)} of {len(over)} | "
                     f"{len(flagged - over)} of {len(complete) - len(over)} |")
    models = [m for m in MODELS if any(p[0] == m for p in complete)]
    if len(models) > 1:
        lines += ["", "| model left out | set the others choose | its distance on the model left out | calibration's |",
                  "|---|---|---|---|"]
        for left in models:
            pick = min(sets, key=lambda s: distance(s, lambda m: m != left))
            lines.append(f"| {left} | {pick} | {distance(pick, lambda m: m == left):.2f} | "
                         f"{distance('calibration', lambda m: m == left):.2f} |")
    lines += ["", "| calibrated on | runs | top-1 changes on the calibration images | on the held-out images |",
              "|---|---|---|---|"]
    for kind, keep in (("training images", lambda m: m in TRAINING_CALIBRATION),
                       ("held-out images", lambda m: m not in TRAINING_CALIBRATION)):
        ps = [p for p in pairs if keep(p[0])]
        if ps:
            cal = [by[(*p, "calibration")] for p in ps]
            held = [by[(*p, "held-out")] for p in ps]
            pooled = [f"{sum(r['changed'] for r in rs)} of {sum(r['samples'] for r in rs)} "
                      f"({100 * sum(r['changed'] for r in rs) / sum(r['samples'] for r in rs):.2f} %)" for rs in (cal, held)]
            lines.append(f"| {kind} | {len(ps)} | {pooled[0]} | {pooled[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default="ort,tensorrt")
    ap.add_argument("--fold", type=int, default=0, help="which fifth of the shared models' images calibrates "
                    "(bench_peers.py --fold; the models trained here have one split)")
    ap.add_argument("--out", default=str(P.CACHE / "check_set.json"))
    ap.add_argument("--markdown", nargs="+", help="print the tables of these results files and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(summary([r for path in args.markdown for r in json.loads(Path(path).read_text())]))
        return 0
    P.FOLD = args.fold
    rows = []
    for name in args.models.split(","):
        rows += [{**r, "fold": args.fold} for r in run_model(name, args.targets.split(","))]
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
