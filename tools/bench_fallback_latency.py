"""Does the default fallback leave a ``--target ort`` model slower than its float model, and does
the console say so?

    nice python tools/bench_fallback_latency.py [--models effnet,resnet20,resnet56] [--folds 0,1,2,3,4]
        [--target ort] [--set qdq_option=value ...] [--out results.json]

Each model of ``bench_peers.py`` is quantized by the qdq pass with its defaults on the fold's
calibration samples (``--fold`` of ``bench_peers.py``); the row gives the units the fallback kept in
float, their share of the MACs, the report's ``latency_ms_ort_cpu`` (the float model, every unit
int8, the output: onnxruntime CPU, median of 15), the output's top-1 agreement with fp32 on the
held-out images, and the pass's warning, if any. ``--set`` adds
qdq options (e.g. ``max_agreement_loss=2``, what the warning offers for a more quantized model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as P  # noqa: E402

from onnxopt import manager, model_io  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def run(name: str, fold: int, target: str, options: dict = None) -> dict:
    P.FOLD = fold
    path, cf, ef, _, _, _ = P.prepare(name)
    logs = []
    model = model_io.load_model(path)
    out, report = manager.apply(model, ["qdq"], {"qdq": {"target": target, **(options or {})}}, verify=False,
                              context=PassContext(data=lambda: iter(cf), progress=False, log=logs.append),
                              summarize_layers=False)
    fb = report.passes[-1].extra["recovery"]["fallback"]
    lat = fb["latency_ms_ort_cpu"]
    row = {"model": name, "fold": fold, "target": target, "options": options or {},
           "kept": len(fb["high_precision_layers"]), "units": None, "mac_share": fb["high_precision_mac_share"],
           "latency_ms": {k: lat[k] for k in ("float", "all_quantized", "with_fallback")},
           "warning": next((line for line in logs if line.startswith("WARNING: fallback=auto")), None)}
    # held-out top-1 agreement with fp32 (classifiers), what a looser budget costs
    held = np.concatenate([f[key] for f in ef for key in f])   # the bench's models have one input
    ref, got = P.top1(model, held), P.top1(out, held)
    row["held_out_agreement"] = 100.0 * float(np.mean(ref == got))
    kept_line = next((line for line in logs if line.startswith("fallback: ")), "")
    if " of " in kept_line:
        row["units"] = int(kept_line.split(" of ")[1].split()[0])
    P.log(json.dumps(row))
    return row


def markdown(rows: list) -> str:
    lines = ["| model | fold | options | units kept in float | share of the MACs | float / all int8 / output (ms) | output / float | held-out agreement % | warning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        w = r["warning"] or ""
        # the warning's reasons: most of the MACs in float (fallback.COSTLY_MAC_SHARE), slower than float
        reasons = (("MACs", bool(w) and r["mac_share"] > 0.5), ("latency", "no faster" in w))
        said = " and ".join(why for why, on in reasons if on)
        said = said or ("other" if w else "none")
        opts = ",".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "defaults"
        lines.append(f"| {r['model']} | {r['fold']} | {opts} | {r['kept']} of {r['units']} | {100 * r['mac_share']:.0f} % | "
                     f"{lat['float']:.2f} / {lat['all_quantized']:.2f} / {lat['with_fallback']:.2f} | "
                     f"{lat['with_fallback'] / lat['float']:.2f} | {r.get('held_out_agreement', float('nan')):.2f} | {said} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="effnet,resnet20,resnet56")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="qdq options (values parsed as JSON where they parse)")
    ap.add_argument("--out", default=str(P.CACHE / "fallback_latency.json"))
    args = ap.parse_args(argv)
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    rows = []
    for name in args.models.split(","):
        for fold in map(int, args.folds.split(",")):
            rows.append(run(name, fold, args.target, options))
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
