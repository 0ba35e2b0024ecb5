"""Does the output noise that ``calib_method=auto`` minimises rank a detector's calibrations as its
boxes do? YOLOX-nano, each fixed method with ``fallback=none``, on both targets:

    ONNXOPT_BENCH_CACHE=/tmp/N nice python tools/bench_detector_noise.py [--fold F]

For each quantized model: the output noise-to-signal ratio ``auto`` compares (``TaskError.noise``)
on the held-in calibration samples it reads, the largest class score on them against fp32's, and
the held-out box agreement with fp32 (``bench_peers``' split and measure). The measure ranks well
when its smallest value goes with the most matched boxes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers as P  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=int, default=0, choices=range(5))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.fold:   # bench_peers' fold: its split, and a cache folder of its own
        P.FOLD, P.CACHE = args.fold, P.CACHE / f"fold{args.fold}"
    import numpy as np
    import onnx

    from onnxopt import manager
    from onnxopt.quant.calib_search import SEARCH_SAMPLES
    from onnxopt.registry import PassContext
    from onnxopt.task_metric import task_error

    path, cf, ef, _, _, B = P.prepare("yolox")
    model = onnx.load(path)
    ref = P.outputs(path, ef)
    held_in = cf[:SEARCH_SAMPLES]
    rows = []
    for target in ("ort", "tensorrt"):
        for method in P.FIXED:
            ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda _: None)
            q, _ = manager.apply(model, ["qdq"], {"qdq": {"target": target, "calib_method": method, "fallback": "none"}},
                                 context=ctx, verify=False, summarize_layers=False)
            err = task_error(model, q, held_in)
            out = P.CACHE / f"yolox.noise.{target}.{method}.onnx"
            onnx.save(q, out)
            boxes = B.box_agreement(ref, P.outputs(out, ef))
            ref_in, q_in = (np.concatenate(P.outputs(m, held_in)) for m in (path, out))
            rows.append({"target": target, "method": method, "noise": err.noise(), "max_score": float(q_in[..., 5:].max()),
                         "max_score_fp32": float(ref_in[..., 5:].max()), "matched": boxes["matched"], "fp32_boxes": boxes["fp32_boxes"], "mean_iou_all": boxes["mean_iou_all"]})
            P.log(json.dumps(rows[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| target | method | output noise (held-in) | largest class score (held-in; fp32) | held-out matched boxes | mean IoU |")
    print("|---|---|---|---|---|---|")
    for target in ("ort", "tensorrt"):
        mine = [r for r in rows if r["target"] == target]
        least = min(mine, key=lambda r: r["noise"])["method"]
        for r in mine:
            mark = " (least: auto's choice)" if r["method"] == least else ""
            print(f"| {target} | {r['method']} | {r['noise']:.4g}{mark} | {r['max_score']:.3f} ({r['max_score_fp32']:.3f}) | "
                  f"{r['matched']}/{r['fp32_boxes']} | {r['mean_iou_all']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
