"""ONNX operator conformance through ``onnxopt.apply(model, "cleanup,bnfuse")`` (issue 19).

The node test cases of the installed onnx package (``onnx.backend.test.case.node.collect_testcases``,
generated in-process, nothing downloaded) are the standard ONNX conformance suite: one small model
per operator feature, every opset the package defines. Each case onnxruntime can run (model loads
and its own test inputs run) goes through ``onnxopt.apply`` with no data and no flags, as a new
user would call it, then the optimized model is run on the case's own inputs and compared with
the original's outputs (same tolerance as the manager's verification; NaN equals NaN).

Counted: crashes (an exception that is not an OnnxoptError), changed outputs, refusals (an
OnnxoptError: onnxopt declined the model), and how many exact passes ran unverified.

    nice python tools/bench_conformance.py [--json out.json] [--filter SUBSTRING] [--limit N] [--list]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import warnings

import numpy as np


def _outputs_equal(ref, got, rtol=1e-4, atol=1e-5) -> tuple:
    """(equal, worst description) comparing two lists of outputs (arrays or sequences)."""
    if len(ref) != len(got):
        return False, f"{len(ref)} vs {len(got)} outputs"
    for i, (r, g) in enumerate(zip(ref, got)):
        if isinstance(r, list) or isinstance(g, list):
            if not isinstance(r, list) or not isinstance(g, list) or len(r) != len(g):
                return False, f"output {i}: sequence mismatch"
            ok, why = _outputs_equal(r, g, rtol, atol)
            if not ok:
                return False, why
            continue
        if r is None or g is None:
            if (r is None) != (g is None):
                return False, f"output {i}: optional mismatch"
            continue
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            return False, f"output {i}: shape {r.shape} vs {g.shape}"
        if r.dtype != g.dtype:
            return False, f"output {i}: dtype {r.dtype} vs {g.dtype}"
        if r.dtype.kind in "fc":
            # the manager's tolerance: a float16 output is held to 4 of its own ulps (an exact
            # rewrite may move where onnxruntime's fp16 kernels round)
            rtol_eff = max(rtol, 4 * float(np.finfo(r.dtype).eps)) if r.dtype.kind == "f" else rtol
            r64, g64 = r.astype(np.complex128 if r.dtype.kind == "c" else np.float64), g.astype(np.complex128 if g.dtype.kind == "c" else np.float64)
            nan = np.isnan(r64) & np.isnan(g64)
            same_inf = np.isinf(r64) & (r64 == g64)
            d = np.where(nan | same_inf, 0.0, np.abs(r64 - g64))
            if d.size and (np.isnan(d).any() or float(d.max()) > atol + rtol_eff * float(np.max(np.abs(np.where(np.isfinite(r64), r64, 0))) or 1.0)):
                return False, f"output {i}: max abs diff {float(np.nanmax(d)) if not np.isnan(d).all() else 'nan'}"
        elif r.dtype.kind in "biu":
            if not np.array_equal(r, g):
                return False, f"output {i}: integer values differ"
        else:
            if not np.array_equal(r, g):
                return False, f"output {i}: values differ"
    return True, ""


def _run(sess, model, inputs):
    names = [i.name for i in sess.get_inputs()]
    feed = dict(zip(names, inputs))
    return sess.run(None, feed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the counts and every non-ok case here")
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--passes", default="cleanup,bnfuse")
    ap.add_argument("--list", action="store_true", help="print every non-ok case")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    import onnxopt
    from onnxopt import runtime
    from onnxopt.errors import OnnxoptError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        cases = [c for c in collect_testcases() if args.filter in c.name]
    if args.limit:
        cases = cases[: args.limit]

    counts = collections.Counter()
    rows = []
    unverified_reasons = collections.Counter()
    refusal_reasons = collections.Counter()
    t0 = time.perf_counter()
    for case in cases:
        model = case.model
        if not case.data_sets:
            counts["no_data"] += 1
            continue
        inputs, _ = case.data_sets[0]
        try:
            sess = runtime.session(model)
            ref = _run(sess, model, inputs)
        except Exception:
            counts["ort_cannot_run"] += 1
            continue
        counts["ort_runs"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out, report = onnxopt.apply(model, args.passes)
        except OnnxoptError as exc:
            counts["refused"] += 1
            msg = exc.message.split(":")[0][:80]
            refusal_reasons[msg] += 1
            rows.append({"case": case.name, "status": "refused", "message": exc.message})
            continue
        except Exception as exc:  # a crash: onnxopt raised something that is not a user error
            counts["crashed"] += 1
            rows.append({"case": case.name, "status": "crashed", "message": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=-3)})
            continue
        for rec in report.passes:
            v = rec.verification
            if v is not None and v.get("verified") is False:
                counts["passes_unverified"] += 1
                unverified_reasons[str(v.get("reason", ""))[:80]] += 1
            if v is not None and (v.get("reverted") or v.get("reverted_pass")):  # rules reverted, or the whole pass undone
                counts["passes_with_reverts"] += 1
        try:
            got = _run(runtime.session(out), out, inputs)
        except Exception as exc:
            counts["changed"] += 1
            rows.append({"case": case.name, "status": "changed", "message": f"optimized model does not run: {str(exc)[:300]}"})
            continue
        ok, why = _outputs_equal(ref, got)
        if ok:
            counts["ok"] += 1
        else:
            counts["changed"] += 1
            rows.append({"case": case.name, "status": "changed", "message": why})
    seconds = time.perf_counter() - t0
    runs = counts["ort_runs"]
    summary = {
        "cases": len(cases), "onnxruntime_runs": runs, "ok": counts["ok"], "crashed": counts["crashed"],
        "changed": counts["changed"], "refused": counts["refused"],
        "refused_pct": round(100.0 * counts["refused"] / max(runs, 1), 2),
        "onnxruntime_cannot_run": counts["ort_cannot_run"], "passes_unverified": counts["passes_unverified"],
        "passes_with_reverts": counts["passes_with_reverts"], "seconds": round(seconds, 1),
        "refusal_reasons": dict(refusal_reasons.most_common(10)),
        "unverified_reasons": dict(unverified_reasons.most_common(10)),
        "onnxopt_version": onnxopt.__version__, "onnxruntime": ort.__version__,
    }
    import onnx
    summary["onnx"] = onnx.__version__
    print(json.dumps(summary, indent=2))
    if args.list:
        for r in rows:
            print(f"{r['status']:8} {r['case']}: {r['message'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "cases": rows}, f, indent=2)
    return 0 if not counts["crashed"] and not counts["changed"] else 1


if __name__ == "__main__":
    sys.exit(main())
