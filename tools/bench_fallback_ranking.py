"""fallback=auto's search, and two variants of it tried and not kept, over the folds of
``tools/bench_peers.py``.

    nice python tools/bench_fallback_ranking.py [--models resnet20,resnet56] [--targets ort,tensorrt]
        [--folds 0,1,2,3,4] [--out results.json] [--markdown results.json]

With a top-1 agreement budget on ~200 calibration samples the budget hinges on the few samples
whose top-1 class the quantized model changed or nearly changed, and the bisection over the
ranking (which assumes more units in float never lose agreement) can carry many units for one of
them. For each model, target and fold the qdq pass runs with its defaults up to the fallback, and
then:

- **default**: the units ranked on the first 32 calibration samples, the bisection's prefix
  (``fewest``), timed with and without the early stop of failing checks
  (``Evaluator.error(budget=...)``, the default);
- **+ drop**: that prefix less each unit the budget still holds without, tried least sensitive
  first (``drop_unneeded`` below);
- **deciding 32 + drop**: the units ranked on the 32 samples with the smallest margin (the
  candidate's logit for the float model's class minus its largest other logit) in the
  all-quantized model, then the same search and drop;
- **in context**: the units ranked by what each gives back in the quantized model (the task
  objective of the all-quantized model with only that unit in float, lowest first; NNCF's
  accuracy control ranks its quantizer groups the same way), on the same 32 samples, then the
  default search (no drop). The default ranks each unit alone (only it quantized), which misses
  what a unit costs on top of the others' error;
- **noise ranking**: each unit alone, as the default, but scored by the logits' noise-to-signal
  ratio instead of KL (what ``calib_method=auto`` measures, because on a few dozen samples the KL
  mean is carried by the few near a decision boundary), then the default search (no drop).

Each is measured on the held-out images: units kept, agreement loss against fp32 and top-1
(onnxruntime with graph optimizations off).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as P  # noqa: E402
from bench_fallback_margin import at_fallback, measured_at_fallback  # noqa: E402

from onnxopt.data import feed_samples  # noqa: E402
from onnxopt.quant.recovery import fallback as F  # noqa: E402
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


def drop_unneeded(error, chosen: list, budget) -> list:
    """The "+ drop" variant: ``chosen`` (a prefix of the ranking that meets ``budget``) without the
    units it meets the budget without: each is dropped in turn, least sensitive first, when ``error(units)`` (a
    :class:`~onnxopt.task_metric.TaskError`) still meets the budget without it. The bisection of
    :func:`fewest` assumes that more units in high precision never lose agreement; on a few
    hundred samples the budget can hinge on one sample near a decision boundary, which one late
    unit of the ranking puts right, and the prefix then carries every unit ranked before it
    (ResNet20 --target tensorrt kept 17-20 of 24 units on three of five folds)."""
    kept = list(chosen)
    for unit in reversed(chosen):
        trial = [u for u in kept if u != unit]
        if error(trial).within(budget):
            kept = trial
    return kept


VARIANTS = ("default", "+ drop", "deciding 32 + drop", "in context", "noise ranking")


def study(float_model, qmodel, info, data, budget, ef, labels) -> dict:
    view, cal, held, ref_pred, acts = measured_at_fallback(float_model, qmodel, info, data, ef)
    quantized = view.variant(fold_weights=True)
    full = cal.error(quantized)
    res = {"units": len(view.layers) + len(acts), "calib_loss_int8": full.agreement_loss}
    if full.within(budget):
        return res

    def held_out(units):
        pred = np.concatenate([np.argmax(o[0], axis=1) for o in held.outputs(F.unit_variant(view, acts, units))])
        return 100 * float(np.mean(pred != ref_pred)), 100 * float(np.mean(pred == labels))

    def search(order, stop_early=True, drop=True):
        """The fallback's search on ``order`` with a fresh cache: (prefix, kept units, seconds)."""
        cache, t0 = {}, time.perf_counter()

        def error(units):
            if tuple(units) not in cache:
                cache[tuple(units)] = cal.error(F.unit_variant(view, acts, units), budget=budget if stop_early else None)
            return cache[tuple(units)]

        k = F.fewest(lambda k: error(order[:k]), len(order), budget)
        chosen = (drop_unneeded(error, order[:k], budget) if drop else order[:k]) if k is not None else order
        search.samples_read = sum(e.outputs[0].samples for e in cache.values())   # what the checks cost, load-free
        return k, chosen, time.perf_counter() - t0

    first = F.rank_units(view, acts, cal, F.FALLBACK_SAMPLES)
    k, prefix, seconds = search(first, drop=False)
    res["default"] = {"kept": len(prefix), "chosen": prefix, "seconds": round(seconds, 1), "samples_read": search.samples_read}
    res["default"]["seconds_without_early_stop"] = round(search(first, stop_early=False, drop=False)[2], 1)
    res["default"]["samples_read_without_early_stop"] = search.samples_read
    deciding = subset(cal, np.argsort(margins(cal, quantized), kind="stable")[:32])
    for name, order in (("+ drop", first), ("deciding 32 + drop", F.rank_units(view, acts, deciding, F.FALLBACK_SAMPLES))):
        k, chosen, seconds = search(order)
        res[name] = {"prefix": k, "kept": len(chosen), "chosen": chosen, "seconds": round(seconds, 1)}
    samples = min(F.FALLBACK_SAMPLES, cal.samples)
    gain = {u: cal.error(F.unit_variant(view, acts, [u]), samples).objective() for u in first}
    k, chosen, seconds = search(sorted(first, key=lambda u: gain[u]), drop=False)
    res["in context"] = {"prefix": k, "kept": len(chosen), "chosen": chosen, "seconds": round(seconds, 1)}
    noise = {name: cal.error(view.only_layer(name), samples).noise() for name in view.layers}
    noise.update({u: cal.error(view.only_activation(t), samples).noise() for u, t in acts.items()})
    k, chosen, seconds = search(sorted(noise, key=lambda u: -noise[u]), drop=False)
    res["noise ranking"] = {"prefix": k, "kept": len(chosen), "chosen": chosen, "seconds": round(seconds, 1)}
    for name in VARIANTS:
        r = res[name]
        r["held_loss"], r["held_top1"] = held_out(r["chosen"])
        P.log(f"  {name}: kept {r['kept']}, held-out loss {r['held_loss']:.2f} pt, top-1 {r['held_top1']:.2f}, {r['seconds']} s")
    return res


def run(name: str, target: str, fold: int, cache: Path) -> dict:
    P.FOLD, P.CACHE = fold, cache / f"fold{fold}"
    return at_fallback(name, target, study)


def markdown(rows) -> str:
    lines = ["| model | target | fold | units | int8 calib loss (pt) | "
             + " | ".join(f"{v}: kept / held-out loss / top-1" for v in VARIANTS)
             + " | search s: default / without early stop / + drop |", "|---" * (6 + len(VARIANTS)) + "|"]
    for r in rows:
        head = f"| {r['model']} | {r['target']} | {r['fold']} | {r['units']} | {r['calib_loss_int8']:.2f} | "
        if "default" not in r:
            lines.append(head + "0 (budget met) | " + "0 | " * (len(VARIANTS) - 1) + "- |")
            continue
        cells = [f"{r[v]['kept']} / {r[v]['held_loss']:.2f} / {r[v]['held_top1']:.2f}" if v in r else "-" for v in VARIANTS]
        d = r["default"]
        cost = f"{d['seconds']} / {d.get('seconds_without_early_stop', '-')} / {r['+ drop']['seconds']}"
        if "samples_read" in d:   # samples the checks ran, with / without the early stop
            cost += f" ({d['samples_read']} / {d['samples_read_without_early_stop']} samples)"
        lines.append(head + " | ".join(cells) + f" | {cost} |")
    fallen = [r for r in rows if all(v in r for v in VARIANTS)]   # fell back (rows of an older run lack a variant)
    if fallen:
        mean = [np.mean([[r[v]["kept"], r[v]["held_loss"], r[v]["held_top1"]] for r in fallen], axis=0) for v in VARIANTS]
        lines.append(f"| mean of the {len(fallen)} runs that fall back | | | | | "
                     + " | ".join(f"{m[0]:.1f} / {m[1]:.2f} / {m[2]:.2f}" for m in mean) + " | |")
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
