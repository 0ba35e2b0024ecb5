"""What ``calib_method=auto``'s search should measure, on held-out data: one row per model, target
and search variant, with leave-one-model-out.

    nice python tools/bench_calib_search.py [--models resnet20,resnet56,se,effnet,yolox] [--targets ort,tensorrt]
        [--variants "kl,32,per_tensor;noise,32,uniform;..."] [--results out.jsonl]
    python tools/bench_calib_search.py --summary out.jsonl

A variant is ``measure,samples,search``:
* ``measure``: what ranks the candidates on the held-in samples -- ``noise`` (the outputs'
  noise-to-signal ratio, :meth:`onnxopt.task_metric.TaskError.noise`, the default) or ``kl``
  (:meth:`~onnxopt.task_metric.TaskError.objective`: mean KL of the softmax for classifiers, the
  measure before 2026-12-06; set here by replacing ``noise`` for the run, an ablation only);
* ``samples``: held-in samples the search measures on (``calib_search.SEARCH_SAMPLES``, 32);
* ``search``: ``uniform`` (one method for every tensor, the default) or ``per_tensor`` (the
  greedy refinement, ``--set qdq.calib_search=per_tensor``).

Each variant quantizes with ``fallback=none`` (the calibration alone) on the calibration split of
``tools/bench_peers.py`` and is measured on its held-out split: mean KL(fp32 || quantized) of the
softmax with every graph optimization off (the task metric's own evaluation), relative L2 error
of the outputs, top-1 (classifiers, onnxruntime's default session). The summary gives each
variant's held-out KL relative to the first variant (geometric mean over the model/target pairs)
and, leaving each model out, the variant the other models choose and what it gives on that model.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

DEFAULT_VARIANTS = "kl,32,per_tensor;kl,32,uniform;noise,32,per_tensor;noise,32,uniform;kl,256,uniform;noise,256,uniform"


def run(models, targets, variants, results):
    import numpy as np
    import onnx

    import bench_peers as BP
    from onnxopt import manager, task_metric
    from onnxopt.quant import calib_search
    from onnxopt.registry import PassContext

    noise = task_metric.TaskError.noise
    with open(results, "a") as out:
        for name in models:
            path, cf, ef, labels, kind, _ = BP.prepare(name)
            model = onnx.load(str(path))
            held_out = task_metric.Evaluator(model, ef, limit=10 ** 6, max_mb=4096)
            for target in targets:
                for v in variants:
                    measure, samples, search = v.split(",")
                    task_metric.TaskError.noise = noise if measure == "noise" else task_metric.TaskError.objective
                    calib_search.SEARCH_SAMPLES = int(samples)
                    logs = []
                    ctx = PassContext(data=lambda: iter(cf), progress=False, log=logs.append)
                    t0 = time.perf_counter()
                    q, _ = manager.apply(model, ["qdq"], {"qdq": {"target": target, "fallback": "none", "calib_search": search}},
                                         context=ctx, verify=False, summarize_layers=False)
                    seconds = time.perf_counter() - t0
                    task_metric.TaskError.noise = noise
                    o = held_out.error(q).outputs[0]
                    row = {"model": name, "target": target, "variant": v, "seconds": round(seconds, 1), "kl": o.kl,
                           "rel_error": o.rel_error, "log": next((l for l in logs if l.startswith("calibration auto")), "")}
                    if labels is not None:
                        qp = BP.CACHE / f"{name}.{target}.calib_search.onnx"
                        onnx.save(q, qp)
                        pred = np.array([int(np.argmax(x)) for x in BP.outputs(qp, ef)])
                        row["top1"] = 100.0 * float(np.mean(pred == labels))
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                    out.flush()


def summary(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    # the figure: held-out KL for classifiers, the squared relative error for the others
    figure = {(r["model"], r["target"], r["variant"]): (r["kl"] if r["kl"] is not None else r["rel_error"] ** 2) for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    pairs = list(dict.fromkeys((r["model"], r["target"]) for r in rows))
    variants = [v for v in variants if all((m, t, v) in figure for m, t in pairs)]
    base = variants[0]
    top1 = {(r["model"], r["target"], r["variant"]): r.get("top1") for r in rows}

    def ratio(sel, v):
        return math.exp(sum(math.log(figure[(m, t, v)] / figure[(m, t, base)]) for m, t in sel) / len(sel))

    print(f"| model | target | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for m, t in pairs:
        cells = []
        for v in variants:
            t1 = top1[(m, t, v)]
            cells.append(f"{figure[(m, t, v)]:.5f}" + (f" ({t1:.2f} %)" if t1 is not None else ""))
        print(f"| {m} | {t} | " + " | ".join(cells) + " |")
    print(f"| all | geometric mean, relative to {base} | " + " | ".join(f"{ratio(pairs, v):.3f}" for v in variants) + " |")
    print()
    print("| model left out | variant the other models choose | its held-out KL relative to the first variant on that model |")
    print("|---|---|---|")
    for m in dict.fromkeys(p[0] for p in pairs):
        others, mine = [p for p in pairs if p[0] != m], [p for p in pairs if p[0] == m]
        if not others:
            continue
        pick = min(variants, key=lambda v: ratio(others, v))
        print(f"| {m} | {pick} | {ratio(mine, pick):.3f} |")


def held_out_cli(doc, default_results, run_args, summarize, add_arguments=lambda ap: None):
    """The command line of the held-out benchmarks (this one, ``bench_bias_correction.py``): run
    the models and targets, appending rows to ``--results``, then summarize; or only summarize
    the files given to ``--summary``. ``run_args(args)`` runs with the parsed arguments."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet56,se,effnet,yolox")
    ap.add_argument("--targets", default="ort,tensorrt")
    add_arguments(ap)
    ap.add_argument("--results", default=default_results, help="rows are appended here")
    ap.add_argument("--summary", nargs="*", help="print the tables of these results files and exit")
    args = ap.parse_args()
    if args.summary:
        summarize(args.summary)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    run_args(args)
    summarize([args.results])


def main():
    held_out_cli(__doc__, "calib_search.jsonl",
                 lambda a: run(a.models.split(","), a.targets.split(","), [v for v in a.variants.split(";") if v], a.results),
                 summary, lambda ap: ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated measure,samples,search"))


if __name__ == "__main__":
    main()
