"""The SE model's fallback with more calibration images: does the 1-point figure hold when the user
gives more of their data, and should the agreement budget be checked on all of it?

    nice python tools/bench_se_calib_count.py [--every 6,3,2,1] [--targets tidl,tensorrt,ort]
        [--agreement-samples N] [--held-out-calibration] [--set OPTION=VALUE] [--out results.json]
        [--markdown results.json]

The SE model of ``tools/bench_peers.py`` (``se``: HardSwish + squeeze-excite, depthwise channel
ranges two decades apart, trained on scikit-learn's digits) calibrates on every 6th of its 1197
training images (200). Here the same model is quantized by the qdq pass with its defaults on every
``k``-th training image instead (``--every``: 6, 3, 2, 1 -> 200, 399, 599, 1197 images) and
measured on the 600 test images (onnxruntime with its default graph optimizations, as
``bench_peers.py`` measures): top-1, agreement with fp32,
and the units the fallback keeps in high precision.

``--held-out-calibration`` asks whether the 200-image miss comes from the count or from the kind of
image: it calibrates on 200 of the test images (every 3rd, 3 folds), which the model never trained
on, and evaluates on the other 400, beside the usual 200 training images on the same 400, and
beside the training images with those 200 test images as the fallback's check data
(``--check-data``).

``--agreement-samples N`` sets how many calibration samples the fallback checks its agreement
budget on (``fallback.AGREEMENT_SAMPLES``, 256 by default; the bias correction's check uses the
same count): the ablation "check the budget on every sample the user gave".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as P  # noqa: E402

from onnxopt import manager  # noqa: E402
from onnxopt.quant.recovery import fallback  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


QDQ_SET: dict = {}   # --set: more qdq options for every run


def run(calib: np.ndarray, source: str, target: str, model, xte: np.ndarray, yte: np.ndarray, ref: np.ndarray,
        check: np.ndarray = None) -> dict:
    feeds = [{"input": calib[i:i + 1]} for i in range(len(calib))]
    check_feeds = None if check is None else [{"input": check[i:i + 1]} for i in range(len(check))]
    shapes = {"input": [1, *calib.shape[1:]]} if target.startswith("tidl") else None   # TIDL takes static shapes
    ctx = PassContext(data=lambda: iter(feeds), progress=False, log=lambda m: None, input_shapes=shapes,
                      check_data=None if check is None else (lambda: iter(check_feeds)))
    out, report = manager.apply(model, ["qdq"], {"qdq": {"target": target, **QDQ_SET}}, context=ctx, verify=False,
                                summarize_layers=False)
    fb = (report.passes[-1].extra.get("recovery") or {}).get("fallback") or {}
    pred = P.top1(out, xte)
    row = {"source": source, "calib": len(calib), "evaluated": len(xte), "target": target, "agreement_samples": fallback.AGREEMENT_SAMPLES,
           "checked_on": fb.get("samples"), "kept": len(fb.get("high_precision_layers", [])), "met": fb.get("met"),
           "top1": 100 * float(np.mean(pred == yte)), "agreement": 100 * float(np.mean(pred == ref))}
    P.log(json.dumps(row))
    return row


def held_out_rows(model, xtr, xte, yte, ref, targets) -> list:
    """Is the 200-image miss the count or the kind of image? Each fold calibrates on every 3rd test
    image from an offset (200 the model never trained on) and evaluates on the other 400; the same
    400 also evaluate the usual calibration on 200 training images."""
    rows = []
    for offset in range(3):
        calib = np.zeros(len(xte), bool)
        calib[offset::3] = True
        ev = ~calib
        fp32 = 100 * float(np.mean(ref[ev] == yte[ev]))
        for t in targets:
            train = xtr[::P.SE_CALIB_EVERY]
            for source, images, check in ((f"held-out (fold {offset})", xte[calib], None),
                                          (f"training (fold {offset})", train, None),
                                          (f"training, --check-data held-out (fold {offset})", train, xte[calib])):
                row = run(images, source, t, model, xte[ev], yte[ev], ref[ev], check)
                rows.append({**row, "fp32": fp32})
    return rows


def markdown(rows: list, fp32: float) -> str:
    lines = [f"fp32 top-1 {fp32:.2f} % on the 600 test images", "",
             "| calibration images | target | budget checked on | units kept | top-1 % (vs fp32, pt) | held-out agreement % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        f32 = r.get("fp32", fp32)   # the held-out calibration rows are evaluated on 400 images, fp32 given per fold
        lines.append(f"| {r['calib']} {r.get('source', 'training')} | {r['target']} | {r['checked_on']} | {r['kept']} | "
                     f"{r['top1']:.2f} ({r['top1'] - f32:+.2f}{'' if 'fp32' not in r else f'; fp32 {f32:.2f}'}) | "
                     f"{r['agreement']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", default="6,3,2,1")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a qdq option for every run, e.g. --set fallback_check=shifted")
    ap.add_argument("--targets", default="tidl,tensorrt,ort")
    ap.add_argument("--agreement-samples", type=int, default=fallback.AGREEMENT_SAMPLES)
    ap.add_argument("--out", default=str(P.CACHE / "se_calib_count.json"))
    ap.add_argument("--markdown", help="print the table of this results file and exit")
    ap.add_argument("--held-out-calibration", action="store_true",
                    help="calibrate on 200 test images the model never trained on (3 folds of the 600) and, for "
                         "comparison, on the usual 200 training images; both evaluated on the other 400")
    args = ap.parse_args(argv)
    if args.markdown:
        res = json.loads(Path(args.markdown).read_text())
        print(markdown(res["rows"], res["fp32"]))
        return 0
    fallback.AGREEMENT_SAMPLES = args.agreement_samples   # the fallback's check and the bias correction's
    QDQ_SET.update(kv.split("=", 1) for kv in args.set)
    model, cf, _, _ = P._trained("se", "se_digits", P.se_digits)
    xtr, _, xte, yte = P.digits_split()
    if not np.array_equal(np.concatenate([f["input"] for f in cf]), xtr[::P.SE_CALIB_EVERY][:len(cf)]):
        raise SystemExit(f"the cached SE model's calibration images ({P.CACHE}) are not this split's: remove the cache")
    ref = P.top1(model, xte)
    fp32 = 100 * float(np.mean(ref == yte))
    targets = args.targets.split(",")
    if args.held_out_calibration:
        rows = held_out_rows(model, xtr, xte, yte, ref, targets)
    else:
        rows = [run(xtr[::int(e)], "training", t, model, xte, yte, ref) for e in args.every.split(",") for t in targets]
    Path(args.out).write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1))
    print(markdown(rows, fp32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
