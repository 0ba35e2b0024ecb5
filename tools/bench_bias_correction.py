"""Whether the analytical bias correction helps, and whether the held-in samples can tell: one row
per model and target, with leave-one-model-out.

    nice python tools/bench_bias_correction.py [--models resnet20,resnet56,se,effnet,yolox] [--targets ort,tensorrt]
        [--results out.jsonl]
    python tools/bench_bias_correction.py --summary out.jsonl

Each row quantizes with ``fallback=none bias_correction=none`` (the calibration alone) on the
calibration split of ``tools/bench_peers.py``, then applies the analytical correction
(:func:`onnxopt.quant.recovery.bias.analytical_bias_correction`) without its check. Both models
are measured against the float model:
* held in: the outputs' noise-to-signal ratio (:meth:`onnxopt.task_metric.TaskError.noise`, on
  the logits) on the first 16, 32 and 64 calibration samples and on all of them (up to 256, what
  the pass's check reads);
* held out: the same ratio, mean KL(fp32 || quantized) of the softmax (classifiers) and top-1.

The summary gives, per pair, each held-in ratio (corrected / uncorrected; below 1: the check
keeps the correction) against the held-out ones, how often each held-in sample count decides as
the held-out noise does, the geometric means of the held-out figures of "always", "never" and
"kept where the check on all the held-in samples says so", and leaving each model out, the
choice the other models make between "never" and "checked".
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

HELD_IN = (16, 32, 64, 256)


def run(models, targets, results):
    import numpy as np
    import onnx

    import bench_peers as BP
    from onnxopt import manager, task_metric
    from onnxopt.quant.recovery.bias import analytical_bias_correction
    from onnxopt.quant.view import QuantInfo
    from onnxopt.registry import PassContext

    with open(results, "a") as out:
        for name in models:
            path, cf, ef, labels, kind, _ = BP.prepare(name)
            model = onnx.load(str(path))
            held_out = task_metric.Evaluator(model, ef, limit=10 ** 6, max_mb=4096)
            held_in = task_metric.Evaluator(model, cf, limit=max(HELD_IN), max_mb=4096)
            for target in targets:
                ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None)
                q0, report = manager.apply(model, ["qdq"], {"qdq": {"target": target, "fallback": "none", "bias_correction": "none"}},
                                           context=ctx, verify=False, summarize_layers=False)
                info = QuantInfo.of(report.passes[-1].extra["info"])
                t0 = time.perf_counter()
                q1, _ = analytical_bias_correction(model, q0, info, lambda: iter(cf), None, lambda m: None)
                row = {"model": name, "target": target, "seconds": round(time.perf_counter() - t0, 2), "held_in_samples": held_in.samples}
                for n in HELD_IN:
                    row[f"in{n}"] = [held_in.error(q, samples=n).noise() for q in (q0, q1)]
                errs = [held_out.error(q) for q in (q0, q1)]
                row["out_noise"] = [e.noise() for e in errs]
                row["out_kl"] = [e.outputs[0].kl for e in errs]
                if labels is not None:
                    row["top1"] = []
                    for q in (q0, q1):
                        qp = BP.CACHE / f"{name}.{target}.bias_correction.onnx"
                        onnx.save(q, qp)
                        pred = np.array([int(np.argmax(x)) for x in BP.outputs(qp, ef)])
                        row["top1"].append(100.0 * float(np.mean(pred == labels)))
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                out.flush()


def _geo(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    ratio = lambda r, k: r[k][1] / r[k][0]
    print("| model | target | held-in noise ratio, corrected / not: 16 | 32 | 64 | all (the check) | held-out noise ratio | held-out KL ratio | top-1 not → corrected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = f"{ratio(r, 'out_kl'):.3f}" if r["out_kl"][0] else "-"
        top1 = " → ".join(f"{t:.2f}" for t in r["top1"]) if r.get("top1") else "-"
        cells = " | ".join(f"{ratio(r, f'in{n}'):.3f}" for n in HELD_IN)
        print(f"| {r['model']} | {r['target']} | {cells} | {ratio(r, 'out_noise'):.3f} | {kl} | {top1} |")
    print()
    for n in HELD_IN:
        same = sum((ratio(r, f"in{n}") < 1) == (ratio(r, "out_noise") < 1) for r in rows)
        print(f"held-in {n if n < max(HELD_IN) else 'all'}: decides as the held-out noise does on {same} of {len(rows)} pairs")

    def chosen(r, policy):  # the held-out figures' ratio to "never" under a policy
        keep = policy == "always" or (policy == "checked" and ratio(r, f"in{max(HELD_IN)}") < 1)
        return {k: (ratio(r, k) if keep else 1.0) for k in ("out_noise", "out_kl") if r[k][0]}

    print()
    print("| policy | held-out noise, geometric mean relative to never | held-out KL (classifiers) |")
    print("|---|---|---|")
    for policy in ("never", "always", "checked"):
        c = [chosen(r, policy) for r in rows]
        print(f"| {policy} | {_geo([x['out_noise'] for x in c]):.3f} | {_geo([x['out_kl'] for x in c if 'out_kl' in x]):.3f} |")
    print()
    print("| model left out | the others' choice (held-out noise) | on the model left out: noise | KL |")
    print("|---|---|---|---|")
    for m in dict.fromkeys(r["model"] for r in rows):
        others, mine = [r for r in rows if r["model"] != m], [r for r in rows if r["model"] == m]
        pick = min(("never", "checked"), key=lambda p: _geo([chosen(r, p)["out_noise"] for r in others]))
        c = [chosen(r, pick) for r in mine]
        kl = [x["out_kl"] for x in c if "out_kl" in x]
        print(f"| {m} | {pick} | {_geo([x['out_noise'] for x in c]):.3f} | {_geo(kl):.3f} |" if kl else
              f"| {m} | {pick} | {_geo([x['out_noise'] for x in c]):.3f} | - |")


def main():
    from bench_calib_search import held_out_cli

    held_out_cli(__doc__, "bias_correction.jsonl", lambda a: run(a.models.split(","), a.targets.split(","), a.results), summary)


if __name__ == "__main__":
    main()
