"""fallback=auto's unit ranking: on the first 32 calibration samples (the default) or on the 32 that
decide an agreement budget, over the folds of ``tools/bench_peers.py``.

    nice python tools/bench_fallback_ranking.py [--models resnet20,resnet56] [--targets ort,tensorrt]
        [--folds 0,1,2,3,4] [--out results.json] [--markdown results.json]

With a top-1 agreement budget on ~200 calibration samples the budget hinges on the few samples
whose top-1 class the quantized model changed or nearly changed; the first 32 samples, on which
the units are ranked, often hold none of them. This study ranks the units both ways -- on the
first 32 samples, and on the 32 with the smallest margin (the candidate's logit for the float
model's class minus its largest other logit) in the all-quantized model -- then runs the
fallback's own search on each ranking (``fewest``, then ``drop_unneeded``) and measures the units
kept and the held-out agreement loss and top-1 (onnxruntime with graph optimizations off). The
qdq pass runs with its defaults up to the fallback; models, data and folds as ``bench_peers.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as P  # noqa: E402

from onnxopt import manager  # noqa: E402
from onnxopt.data import feed_samples  # noqa: E402
from onnxopt.quant import recovery  # noqa: E402
from onnxopt.quant.recovery import fallback as F  # noqa: E402
from onnxopt.quant.view import QdqView  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402
from onnxopt.task_metric import Evaluator  # noqa: E402


def subset(ev: Evaluator, indices) -> Evaluator:
    """``ev`` on the samples at ``indices`` only (one batch each), sharing its reference outputs."""
    wanted, sub = set(int(i) for i in indices), object.__new__(Evaluator)
    sub.__dict__.update(ev.__dict__)
    sub.feeds, sub.ref, start = [], [], 0
    for feed, ref in zip(ev.feeds, ev.ref):
        b = feed_samples(feed)
        for j in range(b):
            if start + j in wanted:
                sub.feeds.append({k: np.asarray(v)[j:j + 1] for k, v in feed.items()})
                sub.ref.append([o[j:j + 1] for o in ref])
        start += b
    sub.samples = len(sub.feeds)
    return sub


def margins(ev: Evaluator, model) -> np.ndarray:
    """Per sample: the candidate's logit for the reference's top-1 class minus its largest other logit."""
    out = []
    for ref, cand in zip(ev.ref, ev.outputs(model)):
        r, c = ref[0], np.array(cand[0], np.float64)
        rows, top = np.arange(len(r)), r.argmax(1)
        ca = c[rows, top].copy()
        c[rows, top] = -np.inf
        out.append(ca - c.max(1))
    return np.concatenate(out)


def study(float_model, qmodel, info, data, budget, ef, labels) -> dict:
    view = QdqView(float_model, qmodel, info)
    ref = view.float_reference()
    cal = Evaluator(ref, data, limit=F.AGREEMENT_SAMPLES)
    held = Evaluator(ref, ef, limit=len(ef), max_mb=1e6)
    ref_pred = np.concatenate([np.argmax(r[0], axis=1) for r in held.ref])
    acts = F.activation_units(view)
    quantized = view.variant(fold_weights=True)
    full = cal.error(quantized)
    res = {"units": len(view.layers) + len(acts), "calib_loss_int8": full.agreement_loss}
    if full.within(budget):
        return res
    cache = {}

    def error(units):
        if tuple(units) not in cache:
            cache[tuple(units)] = cal.error(F.unit_variant(view, acts, units))
        return cache[tuple(units)]

    rankings = {"first 32": cal, "deciding 32": subset(cal, np.argsort(margins(cal, quantized), kind="stable")[:32])}
    for name, ranked_on in rankings.items():
        t0 = time.perf_counter()
        order = F.rank_units(view, acts, ranked_on, F.FALLBACK_SAMPLES)
        k = F.fewest(lambda k: error(order[:k]), len(order), budget)
        chosen = F.drop_unneeded(error, order[:k], budget) if k is not None else order
        pred = np.concatenate([np.argmax(o[0], axis=1) for o in held.outputs(F.unit_variant(view, acts, chosen))])
        res[name] = {"prefix": k, "kept": len(chosen), "chosen": chosen, "held_loss": 100 * float(np.mean(pred != ref_pred)),
                     "held_top1": 100 * float(np.mean(pred == labels)), "seconds": round(time.perf_counter() - t0, 1)}
        P.log(f"  {name}: prefix {k}, kept {len(chosen)}, held-out loss {res[name]['held_loss']:.2f} pt, "
              f"top-1 {res[name]['held_top1']:.2f}")
    return res


def run(name: str, target: str, fold: int, cache: Path) -> dict:
    P.FOLD, P.CACHE = fold, cache / f"fold{fold}"
    path, cf, ef, labels, _, _ = P.prepare(name)
    got, original = {}, recovery.auto_fallback

    def capture(float_model, qmodel, info, data, budget, precision, log, measure_latency=True, evaluator=None):
        got.update(study(float_model, qmodel, info, data, budget, ef, labels))
        return qmodel, {}

    recovery.auto_fallback = capture   # the pass's own float model, quantized model and data, at the fallback
    try:
        ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None)
        manager.apply(onnx.load(path), ["qdq"], {"qdq": {"target": target}}, context=ctx, verify=False, summarize_layers=False)
    finally:
        recovery.auto_fallback = original
    return got


def markdown(rows) -> str:
    lines = ["| model | target | fold | units | int8 calib loss (pt) | first 32: kept / held-out loss / top-1 | "
             "deciding 32: kept / held-out loss / top-1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[n]['kept']} / {r[n]['held_loss']:.2f} / {r[n]['held_top1']:.2f}" if n in r else "0 (budget met)"
                 for n in ("first 32", "deciding 32")]
        lines.append(f"| {r['model']} | {r['target']} | {r['fold']} | {r['units']} | {r['calib_loss_int8']:.2f} | {cells[0]} | {cells[1]} |")
    fallen = [r for r in rows if "first 32" in r]
    if fallen:
        mean = {n: np.mean([[r[n]["kept"], r[n]["held_loss"], r[n]["held_top1"]] for r in fallen], axis=0) for n in ("first 32", "deciding 32")}
        lines.append(f"| mean of the {len(fallen)} runs that fall back | | | | | "
                     + " | ".join(f"{m[0]:.1f} / {m[1]:.2f} / {m[2]:.2f}" for m in mean.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--targets", default="ort,tensorrt")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--out", default=str(P.CACHE / "fallback_ranking.json"))
    ap.add_argument("--markdown", help="print the table of this results file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for fold in map(int, args.folds.split(",")):
        for name in args.models.split(","):
            for target in args.targets.split(","):
                if any((r["model"], r["target"], r["fold"]) == (name, target, fold) for r in rows):
                    continue
                P.log(f"fold {fold}: {name} {target}")
                rows.append({"model": name, "target": target, "fold": fold, **run(name, target, fold, P.CACHE)})
                out.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
