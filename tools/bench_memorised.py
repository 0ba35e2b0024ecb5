"""Can the float model tell, from the calibration images alone, that they are its training images?

``fallback=auto`` checks its budget on the calibration images. Where those are training images the
float model is surer of them than of new images, and the check sees too few top-1 changes (the SE
model's 200-image miss, docs/benchmarks.md). ``qdq.fallback_check=shifted`` checks on each image
moved by one pixel instead, which met the SE figure but kept far more units where the images were
new to the model; so it is an option. A default could take it only where the images look
memorised. This bench measures candidate signals of that, from the float model alone, on the
seven classifiers of ``bench_peers.py`` (4 calibrated on training images, 3 on held-out ones):

* ``conf drop``: mean over images of max-softmax(image) - max-softmax(the image moved one pixel,
  the four directions in turn), over the mean max-softmax of the images (relative);
* ``margin drop``: the same with the top-1 minus top-2 logit margin;
* ``flips``: the share of images whose fp32 top-1 changes when moved one pixel.

Each is measured on the calibration images and, as a reference the run-time rule cannot have, on
the held-out images. A signal works when every training-calibrated model is above a threshold
and every held-out-calibrated one below it.

    nice python tools/bench_memorised.py [--models se,mnist_vit,mnist_mbv2,mnist_gru,resnet20,resnet56,effnet] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_check_set as CS  # noqa: E402
import bench_peers as P  # noqa: E402

from onnxopt import model_io, runtime  # noqa: E402

LIMIT = 256   # the samples the fallback's check reads


def logits(model, images: np.ndarray) -> np.ndarray:
    sess = runtime.session(model, optimize=True)
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))]
    return np.concatenate(out).reshape(len(images), -1).astype(np.float64)


def signals(model, images: np.ndarray) -> dict:
    a, b = logits(model, images), logits(model, CS.shifted(images, 1))

    def conf(z):
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).max(1)

    def margin(z):
        s = np.sort(z, 1)
        return s[:, -1] - s[:, -2]
    ca, cb, ma, mb = conf(a), conf(b), margin(a), margin(b)
    return {"conf_drop": float(np.mean(ca - cb) / np.mean(ca)), "margin_drop": float(np.mean(ma - mb) / np.mean(ma)),
            "flips": float(np.mean(a.argmax(1) != b.argmax(1))), "samples": len(images)}


def run_model(name: str) -> dict:
    path, cf, ef, _, _, _ = P.prepare(name)
    model = model_io.load_model(path)
    key = list(cf[0])[0]
    calib = np.concatenate([f[key] for f in cf])[:LIMIT]
    held = np.concatenate([f[key] for f in ef])[:LIMIT]
    row = {"model": name, "calibrated_on": "training" if name in CS.TRAINING_CALIBRATION else "held-out",
           "calibration": signals(model, calib), "held_out": signals(model, held)}
    P.log(json.dumps(row))
    return row


def markdown(rows: list) -> str:
    lines = ["| model | calibrated on | conf drop: calibration / held-out | margin drop | fp32 flips |", "|---|---|---|---|---|"]
    for r in rows:
        c, h = r["calibration"], r["held_out"]
        lines.append(f"| {r['model']} | {r['calibrated_on']} | {c['conf_drop']:+.4f} / {h['conf_drop']:+.4f} | "
                     f"{c['margin_drop']:+.3f} / {h['margin_drop']:+.3f} | {100 * c['flips']:.1f} / {100 * h['flips']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CS.MODELS))
    P.add_rows_options(ap)
    args = ap.parse_args(argv)
    return P.rows_main(args, lambda: [run_model(m) for m in args.models.split(",")], markdown)


if __name__ == "__main__":
    sys.exit(main())
