"""Models whose outputs take no decision, quantized with the defaults: ``fallback=auto`` keeps the
units that alone make half of the output noise or more (``fallback.dominant_units``), against the
code before (no unit kept: the agreement budget holds nothing on such outputs).

* YOLOX-nano (its raw head ``[1, 3549, 85]``), calibrated on every fifth shared COCO photo (20),
  evaluated on the other 80: fp32 boxes (confidence 0.3, NMS 0.45) matched by the quantized
  model's (IoU > 0.5), mean IoU over all fp32 boxes, class agreement of the matched ones
  (``bench_qdq.box_agreement``);
* the embedding models of ``tools/bench_embedding.py`` (``--embeddings``; each shared classifier's
  penultimate features, L2-normalized), calibrated on fold 0: the cosine to the float embedding
  and the share of images whose nearest other image stays the same.

Per run: units kept and their share of the MACs, the output SQNR before / after the fallback, the
wall time of the qdq pass, the target's check; and the three largest ``only this unit quantized``
noise shares (of the all-quantized model's noise) on the sample every unit is screened on, the
figure the rule reads: any share limit between the largest share that is not kept and the
smallest that is gives the same choice.

    ONNXOPT_BENCH_CACHE=/tmp/ND nice python tools/bench_no_decision.py [--targets tensorrt,ort,tidl]
        [--embeddings resnet20,resnet56,effnet] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers  # noqa: E402
from onnxopt import manager, model_io, runtime  # noqa: E402
from onnxopt.quant import check as qcheck  # noqa: E402
from onnxopt.quant.recovery import fallback  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


class _Shares:
    """Records the noise shares ``fallback.dominant_units`` reads."""

    def __enter__(self):
        self.saved, self.shares = fallback.dominant_units, []
        saved = self.saved

        def dominant(scores, whole, *args):
            if not self.shares:   # the first call: every unit, on the screening sample
                self.shares = sorted((v / whole for v in scores.values()), reverse=True)[:3] if whole > 0 else []
            return saved(scores, whole, *args)
        fallback.dominant_units = dominant
        return self

    def __exit__(self, *exc):
        fallback.dominant_units = self.saved


def quantize(model, cf, target: str, before: bool) -> tuple:
    """``before``: the code before kept no unit for such outputs, so it wrote what ``fallback=none`` writes."""
    ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None,
                      input_shapes={k: list(v.shape) for k, v in cf[0].items()} if target.startswith("tidl") else None)
    t0 = time.perf_counter()
    with _Shares() as rec:
        q, report = manager.apply(model, ["cleanup", "bnfuse", "qdq"], {"qdq": {"target": target, **({"fallback": "none"} if before else {})}},
                                  context=ctx, verify=False, summarize_layers=False)
    fb = (report.passes[-1].extra.get("recovery") or {}).get("fallback") or {}
    row = {"target": target, "config": "before" if before else "now", "kept": len(fb.get("high_precision_layers", [])),
           "units": fb.get("high_precision_layers", []), "mac_share": fb.get("high_precision_mac_share", 0.0),
           "sqnr_before": fb.get("sqnr_db_before"), "sqnr_after": fb.get("sqnr_db_after"),
           "shares": [round(s, 3) for s in rec.shares], "seconds": round(time.perf_counter() - t0, 1),
           "check": len(qcheck.check_model(q, target))}
    return q, row


def yolox_rows(targets: list) -> list:
    from bench_qdq import SHARED, box_agreement

    from onnxopt.data import open_data
    model = model_io.load_model(SHARED / "models" / "yolox_nano.onnx")
    img, folder = dict(bgr=True, letterbox=114), str(SHARED / "data" / "coco100")
    cf = list(open_data(folder, model, image=img, every=5).samples())
    ef = list(open_data(folder, model, image=img, every=5, exclude_every=True).samples())
    sess = runtime.session(model)
    ref = [sess.run(None, f)[0] for f in ef]
    rows = []
    for target in targets:
        for before in (True, False):
            q, row = quantize(model, cf, target, before)
            sq = runtime.session(q)
            row.update({"model": "yolox", **box_agreement(ref, [sq.run(None, f)[0] for f in ef])})
            bench_peers.log(json.dumps(row))
            rows.append(row)
    return rows


def embedding_rows(name: str, targets: list) -> list:
    import onnx
    from bench_embedding import cosines, embedding_model, embeddings, retrieval

    path, cf, ef, labels, _, _ = bench_peers.prepare(name)
    model = embedding_model(onnx.load(str(path)))
    ref = embeddings(model, ef)
    ref_nn, _ = retrieval(ref, labels)
    rows = []
    for target in targets:
        for before in (True, False):
            q, row = quantize(model, cf, target, before)
            got = embeddings(q, ef)
            cos = cosines(ref, got)
            row.update({"model": f"{name} embedding", "cos_mean": float(cos.mean()),
                        "nn_agreement": 100.0 * float(np.mean(retrieval(got, labels)[0] == ref_nn))})
            bench_peers.log(json.dumps(row))
            rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| model | target | run | units kept (MAC share) | output SQNR dB before → after fallback | task figure | "
             "largest noise shares | qdq s | check |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{r['kept']} ({100 * r['mac_share']:.1f} %)" + (f": {', '.join(r['units'])}" if r["units"] else "")
        task = (f"{r['matched']}/{r['fp32_boxes']} boxes, IoU {r['mean_iou_all']:.3f}, classes {r['class_agreement']:.3f}"
                if "matched" in r else f"cosine {r['cos_mean']:.5f}, neighbour kept {r['nn_agreement']:.2f} %")
        sq = f"{r['sqnr_before']:.1f} → {r['sqnr_after']:.1f}" if r["sqnr_before"] is not None else "-"
        lines.append(f"| {r['model']} | {r['target']} | {r['config']} | {kept} | {sq} | {task} | "
                     f"{' / '.join(f'{s:.3f}' for s in r['shares']) or '-'} | {r['seconds']} | {r['check']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="tensorrt,ort,tidl")
    ap.add_argument("--embeddings", default="", help="also these embedding models (resnet20,resnet56,effnet)")
    bench_peers.add_rows_options(ap)
    args = ap.parse_args(argv)
    targets = args.targets.split(",")

    def rows():
        out = yolox_rows(targets)
        for name in filter(None, args.embeddings.split(",")):
            out += embedding_rows(name, [t for t in targets if not t.startswith("tidl")])
        return out
    return bench_peers.rows_main(args, rows, markdown)


if __name__ == "__main__":
    sys.exit(main())
