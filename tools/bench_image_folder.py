"""An image folder of class subfolders (torchvision's ImageFolder layout), read the way onnxopt reads
it (``onnxopt.data.class_folder_images``: classes in sorted folder order, images interleaved class by
class) against the same images read class after class (a flat folder whose names sort by class, as a
reader that walks the folders in order would give them).

The shared CIFAR-10 images (1017) are written as PNGs: every second image calibrates, the others are
evaluated from the arrays. ResNet20 is quantized with the defaults on each folder; per target: top-1 on
the evaluated images, agreement with fp32, the units the fallback kept, and the classes among the
first 32 calibration samples (what ``calib_method=auto`` measures its candidates on). Also checked:
the float model's top-1 on the class-subfolder images with the labels the folders give equals its
top-1 against the dataset's own labels.

    ONNXOPT_BENCH_CACHE=/tmp/IF nice python tools/bench_image_folder.py [--targets tensorrt,ort] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from onnxopt import manager, model_io, runtime  # noqa: E402
from onnxopt.data import open_data  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402

SHARED = ROOT.parent / "shared"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE = dict(size=32, crop=32, scale=1 / 255.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def write_folders(x: np.ndarray, y: np.ndarray, root: Path) -> dict:
    """The calibration images as class subfolders and as one flat folder sorted by class."""
    nested, flat = root / "classes", root / "flat_by_class"
    for i, (img, c) in enumerate(zip(x, y)):
        for path in (nested / CLASSES[c] / f"{i:04d}.png", flat / f"{c}_{CLASSES[c]}_{i:04d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray(img.transpose(1, 2, 0)).save(path)
    return {"class subfolders (interleaved)": nested, "flat, class after class": flat}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="tensorrt,ort")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cache = Path(os.environ.get("ONNXOPT_BENCH_CACHE", tempfile.gettempdir())) / "onnxopt_bench_image_folder"
    model = model_io.load_model(SHARED / "models" / "resnet20_cifar10.onnx")
    with np.load(SHARED / "data" / "cifar10_test_1017.npz") as z:
        x, y = z["x"], z["y"].astype(np.int64)
    calib, held = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    folders = write_folders(x[calib], y[calib], cache)
    mean, std = np.array(IMAGE["mean"], np.float32)[:, None, None], np.array(IMAGE["std"], np.float32)[:, None, None]
    xe = ((x[held].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    sess = runtime.session(model)
    ref = np.concatenate([sess.run(None, {"input": xe[i:i + 64]})[0] for i in range(0, len(xe), 64)]).argmax(1)
    rows = []
    # the labels the class subfolders give, against the dataset's own
    nested = open_data(str(folders["class subfolders (interleaved)"]), model, image=IMAGE)
    pred = np.array([int(sess.run(None, f)[0].argmax()) for f in nested.samples()])
    order = [int(p.stem) for p in nested._image_files()]
    rows.append({"check": "fp32 top-1 on the class subfolders, with their labels / with the dataset's labels",
                 "folder_labels": round(100 * float(np.mean(pred == nested.labels())), 2),
                 "dataset_labels": round(100 * float(np.mean(pred == y[calib][order])), 2)})
    print(json.dumps(rows[-1]), flush=True)
    for target in args.targets.split(","):
        for name, folder in folders.items():
            src = open_data(str(folder), model, image=IMAGE)
            first = [p.name.split("_")[1] if "_" in p.name else p.parent.name for p in src._image_files()[:32]]
            q, report = manager.apply(model, ["qdq"], {"qdq": {"target": target}},
                                      context=PassContext(data=src, progress=False, log=lambda m: None), verify=False,
                                      summarize_layers=False)
            fb = (report.passes[-1].extra.get("recovery") or {}).get("fallback") or {}
            sq = runtime.session(q)
            got = np.concatenate([sq.run(None, {"input": xe[i:i + 64]})[0] for i in range(0, len(xe), 64)]).argmax(1)
            row = {"target": target, "folder": name, "classes_in_first_32": len(set(first)),
                   "top1": round(100 * float(np.mean(got == y[held])), 2),
                   "fp32_top1": round(100 * float(np.mean(ref == y[held])), 2),
                   "agreement": round(100 * float(np.mean(got == ref)), 2),
                   "units_kept": len(fb.get("high_precision_layers", [])),
                   "calibration": ((report.passes[-1].extra.get("info") or {}).get("calibration") or {}).get("start_method")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
