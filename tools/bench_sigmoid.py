"""Binary and multi-label classifiers (a final Sigmoid) quantized with the defaults: each label's
decision measured (``task_metric.LABELS``) against the behaviour before it, the argmax of the
labels read as a class (and a binary classifier's ``[N, 1]`` read as no classifier at all).

Two models this bench trains on scikit-learn's digits (``bench_peers.se_digits``: HardSwish +
squeeze-excite, unfused BN, BN-folded depthwise ranges spread over two decades, where all-int8
loses accuracy), each ending in a Sigmoid output ``probs`` trained with binary cross entropy:

* ``binary``: one label, "the digit is 5 or more";
* ``multilabel``: four attributes of the digit: even, 5 or more, prime, has a closed loop (0 6 8 9).

Calibrated on 200 of their training images and evaluated on the 600 test digits
(``--calibration train``), or calibrated on the first 200 test digits and evaluated on the other
400 (``held-out``, the default: training images hide the decisions int8 flips, see the SE
model's sections in docs/benchmarks.md, which would hide what this bench measures). ``qdq`` runs per
target with no option but the target, three ways: the defaults now, the defaults with the label
decisions switched off (the code before), and all int8 (``fallback=none``); calibrated on training
images, also with ``fallback_check=shifted``, the option for that case. Per run: units kept
in high precision and their share of the MACs, exact-match accuracy (every label right), label agreement with fp32 (every
label's decision the same), and violations of the target's own check.

    ONNXOPT_BENCH_CACHE=/tmp/SG nice python tools/bench_sigmoid.py [--models binary,multilabel]
        [--targets ort,tensorrt,tidl] [--calibration held-out|train] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers  # noqa: E402
from onnxopt import runtime, task_metric  # noqa: E402
from onnxopt.quant import check as qcheck  # noqa: E402


def binary_labels(y: np.ndarray) -> np.ndarray:
    return (y >= 5)[:, None].astype(np.float32)


def attribute_labels(y: np.ndarray) -> np.ndarray:
    return np.stack([y % 2 == 0, y >= 5, np.isin(y, [2, 3, 5, 7]), np.isin(y, [0, 6, 8, 9])], axis=1).astype(np.float32)


MODELS = {"binary": binary_labels, "multilabel": attribute_labels}
HELD_OUT = 200   # --calibration held-out: the first test digits calibrate


class _Before:
    """The label decisions switched off: a Sigmoid's [N, C] is read by its argmax, [N, 1] as no classifier."""

    def __enter__(self):
        self.saved = task_metric.decision_kind

        def before(shape, activation, axis=None):
            if activation in task_metric.DATA_DEPENDENT_SHAPE + (task_metric.FEATURES,):
                return None
            return task_metric.TOP1 if len(shape) == 2 and shape[1] > 1 else None
        task_metric.decision_kind = before

    def __exit__(self, *exc):
        task_metric.decision_kind = self.saved


def decisions(model, feeds) -> np.ndarray:
    sess = runtime.session(model)
    return np.concatenate([sess.run(["probs"], f)[0] for f in feeds]) > 0.5


def run(name: str, targets: list, calibration: str) -> list:
    model, cf, ef, labels = bench_peers._trained(name, f"se_digits_{name}", lambda: bench_peers.se_digits(labels_of=MODELS[name]))
    if calibration == "held-out":
        cf, ef, labels = ef[:HELD_OUT], ef[HELD_OUT:], labels[HELD_OUT:]
    truth = np.asarray(labels) > 0.5
    ref = decisions(model, ef)
    rows = [{"model": name, "calibration": calibration, "target": "fp32", "config": "-", "kept": None, "accuracy": 100.0 * float((ref == truth).all(1).mean()),
             "agreement": 100.0, "check": None}]
    for target in targets:
        # on training images, also the check on their shifted views (the option for that case)
        for config in ("defaults", "defaults before", "all int8") + (("shifted check",) if calibration == "train" else ()):
            q, fb, kept, seconds = bench_peers.quantize_as(model, cf, target, config, _Before())
            got = decisions(q, ef)
            row = {"model": name, "calibration": calibration, "target": target, "config": config,
                   "kept": kept, "mac_share": fb.get("high_precision_mac_share", 0.0),
                   "accuracy": 100.0 * float((got == truth).all(1).mean()), "agreement": 100.0 * float((got == ref).all(1).mean()),
                   "check": len(qcheck.check_model(q, target)), "seconds": round(seconds, 1),
                   "task_after": fb.get("task_after")}
            bench_peers.log(json.dumps(row))
            rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| model | calibration | target | run | units kept (MAC share) | exact-match accuracy | label agreement with fp32 | check violations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{r['kept']} ({100 * r['mac_share']:.0f} %)"
        check = "-" if r["check"] is None else str(r["check"])
        lines.append(f"| {r['model']} | {r['calibration']} | {r['target']} | {r['config']} | {kept} | {r['accuracy']:.2f} % | {r['agreement']:.2f} % | {check} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="binary,multilabel")
    ap.add_argument("--targets", default="ort,tensorrt,tidl")
    ap.add_argument("--calibration", default="held-out", choices=("held-out", "train"))
    bench_peers.add_rows_options(ap)
    args = ap.parse_args(argv)
    return bench_peers.rows_main(args, lambda: [r for m in args.models.split(",") for r in run(m, args.targets.split(","), args.calibration)], markdown)


if __name__ == "__main__":
    sys.exit(main())
