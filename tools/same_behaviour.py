"""Does a refactor keep behaviour? Run the same CLI jobs on the shared models with two checkouts of
onnxopt and compare what they write: model bytes, JSON reports and console output (timings aside).

  git worktree add /tmp/base REV
  python tools/same_behaviour.py /tmp/base .                 # 17 jobs, about 10 min on 2 cores
  python tools/same_behaviour.py /tmp/base . --slow          # + rounding=brecq (about 15 min more)

Jobs (ResNet20 on CIFAR unless named): cleanup+bnfuse, qdq for ort/tensorrt/tidl, adaround, prune,
sparsify, info, check, compare, sensitivity, one epoch of finetune; EfficientNet-Lite0 (BN) lite and
qdq tensorrt, EfficientNet-Lite0 prune; YOLOX-nano qdq for tidl (with lite) and ort. Exits 1 when
anything differs. Each checkout runs from its own source tree, whatever onnxopt is installed.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
# Run the CLI of the checkout in argv[1]: no installed (editable) onnxopt may shadow it, and the
# passes/ folder is the subpackage onnxopt.passes as in an install.
RUNNER = """
import importlib.util, sys
root = sys.argv.pop(1)


class PassesFolder:
    def find_spec(self, name, path=None, target=None):
        if name != "onnxopt.passes":
            return None
        return importlib.util.spec_from_file_location(name, root + "/passes/__init__.py",
                                                      submodule_search_locations=[root + "/passes"])


sys.meta_path[:] = [PassesFolder()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, root)
from onnxopt.cli import main
sys.argv[0] = "onnxopt"
sys.exit(main())
"""
TIMING_KEY = re.compile(r"second|latency|_ms|rss|time|onnxopt_version", re.I)
TIMING_TEXT = re.compile(r" *\d+(\.\d+)?\s*(s|ms)\b")


def jobs(data: Path, slow: bool) -> list:
    m = SHARED / "models"
    r20, calib, evals = str(m / "resnet20_cifar10.onnx"), str(data / "cifar_calib.npz"), str(data / "cifar_eval.npz")
    imnet, coco = ["--preprocess", "imagenet-tf"], ["--preprocess", "yolox"]
    fold = ["apply", "cleanup,bnfuse,qdq", r20, "--calib-data", calib]
    out = [
        ("fold", ["apply", "cleanup,bnfuse", r20, "--data", calib]),
        ("ort", fold + ["--target", "ort"]),
        ("trt", fold + ["--target", "tensorrt"]),
        ("tidl", fold + ["--target", "tidl", "--input-shape", "input:1x3x32x32"]),
        ("ada", fold + ["--calib-samples", "32", "--target", "tensorrt", "--set", "qdq.rounding=adaround",
                        "--set", "qdq.fallback=none"]),
        ("prune", ["apply", "cleanup,bnfuse,prune", r20, "--data", calib]),
        ("sparse", ["apply", "cleanup,bnfuse,sparsify", r20, "--data", calib]),
        ("info", ["info", r20, "--json"]),
        ("check", ["check", "ort.onnx", "--target", "ort", "--json"]),
        ("compare", ["compare", r20, "ort.onnx", "--data", evals, "--runs", "1"]),
        ("sens", ["sensitivity", r20, "--calib-data", calib, "--samples", "16", "--target", "tensorrt",
                  "--json", "sens.json", "--top", "5"]),
        ("ft", ["finetune", "trt.onnx", "--teacher", r20, "--data", calib, "--epochs", "1", "--threads", "1"]),
        ("lite", ["apply", "cleanup,lite,bnfuse", str(m / "efficientnet_lite0_bn.onnx"), "--data", str(data / "imnet")] + imnet),
        ("effq", ["apply", "cleanup,bnfuse,qdq", str(m / "efficientnet_lite0_bn.onnx"), "--calib-data", str(data / "imnet"),
                  "--target", "tensorrt"] + imnet),
        ("effprune", ["apply", "prune", str(m / "efficientnet_lite0.onnx"), "--data", str(data / "imnet"),
                      "--calib-samples", "8"] + imnet),
        ("yolotidl", ["apply", "cleanup,lite,bnfuse,qdq", str(m / "yolox_nano.onnx"), "--calib-data", str(data / "coco"),
                      "--target", "tidl"] + coco),
        ("yoloort", ["apply", "cleanup,qdq", str(m / "yolox_nano.onnx"), "--calib-data", str(data / "coco"),
                     "--target", "ort"] + coco),
    ]
    if slow:
        out.append(("brecq", fold + ["--calib-samples", "32", "--target", "tensorrt", "--set", "qdq.rounding=brecq",
                                     "--set", "qdq.fallback=none"]))
    # every job that writes a model writes NAME.onnx (and an apply job NAME.json)
    for name, args in out:
        if args[0] in ("apply", "finetune"):
            args += ["-o", f"{name}.onnx", "--report", f"{name}.json"]
    return out


def make_data(folder: Path) -> None:
    """64 CIFAR calibration samples, 64 labelled evaluation ones, 24 ImageNet and 12 COCO images."""
    d = np.load(SHARED / "data" / "cifar10_test_1017.npz")
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    x = (d["x"][:128].astype(np.float32) / 255 - mean) / std
    np.savez(folder / "cifar_calib.npz", input=x[:64])
    np.savez(folder / "cifar_eval.npz", input=x[64:], labels=d["y"][64:128].astype(np.int64))
    for sub, src, n in (("imnet", "imagenet", 24), ("coco", "coco100", 12)):
        (folder / sub).mkdir()
        for f in sorted(p for p in (SHARED / "data" / src).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]:
            shutil.copy(f, folder / sub / f.name)


def run_all(root: Path, out: Path, job_list: list) -> None:
    out.mkdir()
    for name, args in job_list:
        print(f"  {root.name or root}: {name}", flush=True)
        done = subprocess.run([sys.executable, "-c", RUNNER, str(root.resolve()), *args], cwd=out,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
        (out / f"{name}.out").write_text(done.stdout + done.stderr + f"rc={done.returncode}\n")


def _no_timings(o):
    if isinstance(o, dict):
        return {k: _no_timings(v) for k, v in o.items() if not TIMING_KEY.search(k)}
    return [_no_timings(v) for v in o] if isinstance(o, list) else o


def _console(p: Path) -> list:
    return [TIMING_TEXT.sub("T", line) for line in p.read_text().splitlines()
            if "sample/s" not in line and "samples/s" not in line and not TIMING_KEY.search(line.split(":")[0])]


def differences(a: Path, b: Path) -> list:
    found = []
    for p in sorted(a.iterdir()):
        q = b / p.name
        if not q.exists():
            found.append(f"{p.name}: missing in the second run")
        elif p.suffix == ".onnx" and hashlib.sha256(p.read_bytes()).digest() != hashlib.sha256(q.read_bytes()).digest():
            found.append(f"{p.name}: model bytes differ")
        elif p.suffix == ".json" and _no_timings(json.loads(p.read_text())) != _no_timings(json.loads(q.read_text())):
            found.append(f"{p.name}: report differs")
        elif p.suffix == ".out" and _console(p) != _console(q):
            diff = difflib.unified_diff(_console(p), _console(q), lineterm="", n=0)
            found.append(f"{p.name}: console differs\n    " + "\n    ".join(list(diff)[2:8]))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path, help="checkout whose behaviour is the reference")
    ap.add_argument("second", type=Path, help="checkout to compare with it")
    ap.add_argument("--slow", action="store_true", help="also rounding=brecq (torch)")
    ap.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxopt-same-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir()
    make_data(work / "data")
    job_list = jobs(work / "data", args.slow)
    for i, root in enumerate((args.first, args.second)):
        run_all(root, work / f"run{i}", job_list)
    found = differences(work / "run0", work / "run1")
    files = len(list((work / "run0").iterdir()))
    print(f"{len(job_list)} jobs, {files} files compared: "
          + ("no difference" if not found else f"{len(found)} difference(s)"))
    for line in found:
        print(f"  {line}")
    if args.keep is None:
        shutil.rmtree(work)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
