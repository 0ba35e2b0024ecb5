"""``onnxopt compare``: run a reference and a candidate model on the same inputs; errors,
agreement, accuracy, latency, size, MACs, and acceptance gates (exit code 3 when one fails)."""
from __future__ import annotations

import json
import math

import click

from ..compare import check_gates, compare_models
from . import cli
from .info import human
from .options import image_options, image_settings, input_shape_option, parse_input_shapes


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)  # format writes inf / -inf itself


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def strict_json(value):
    """Non-finite floats (SQNR of identical outputs is +inf) as the strings "inf"/"-inf"/"nan",
    so the output is standard JSON that every parser (jq, JavaScript) reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def render_compare(res: dict) -> str:
    ref, cand = res["reference"], res["candidate"]
    lines = [f"reference  {ref['path'] or '(in memory)'}", f"candidate  {cand['path'] or '(in memory)'}"]
    d = res["data"]
    if d["generated"]:
        lines.append(f"data       {d['samples']} GENERATED inputs (no --data given)")
    else:
        lines.append(f"data       {d['source']}: {d['samples']} samples" + (", with labels" if d["labels"] else ", no labels"))
    lines.append("")
    rows = [
        ("size (MB)", f"{ref['size_mb']:.2f}", f"{cand['size_mb']:.2f}"),
        ("params", human(ref["params"]), human(cand["params"])),
        ("MACs", human(ref["macs"]), human(cand["macs"])),
        ("nodes", str(ref["nodes"]), str(cand["nodes"])),
    ]
    if ref["latency"]:
        lat = ref["latency"]
        rows.append((f"latency ms (median of {lat['runs']}, {lat['threads'] or 'default'} thr)",
                     f"{ref['latency']['median_ms']:.2f}", f"{cand['latency']['median_ms']:.2f}"))
    if ref["accuracy"] is not None and ref.get("miou") is not None:   # a class per position (segmentation)
        per = "pixel" if (d.get("label_dims") or 0) >= 3 else "position"   # [N, H, W] map, or [N, T] sequence
        rows.append((f"{per} accuracy", _pct(ref["accuracy"]), _pct(cand["accuracy"])))
        rows.append(("mean IoU", _pct(ref["miou"]), _pct(cand["miou"])))
    elif ref["accuracy"] is not None:
        rows.append(("top-1 accuracy", _pct(ref["accuracy"]), _pct(cand["accuracy"])))
    kw = max(len(r[0]) for r in rows)
    lines.append(f"{'':<{kw}}  {'reference':>12}  {'candidate':>12}")
    for key, a, b in rows:
        lines.append(f"{key:<{kw}}  {a:>12}  {b:>12}")
    lines.append("")
    outs = res["outputs"]
    nw = max([len("output")] + [len(o["name"]) for o in outs])
    lines.append(f"{'output':<{nw}}  {'shape':<16} {'max|err|':>10} {'cosine':>10} {'min cos':>10} {'SQNR dB':>8} {'agreement':>12}")
    for o in outs:
        shape = "[" + ",".join("?" if s is None else str(s) for s in (o["shape"] or [])) + "]"
        lines.append(f"{o['name']:<{nw}}  {shape:<16} {_num(o['max_abs'], '.3g'):>10} {_num(o['cosine'], '.6f'):>10} "
                     f"{_num(o['min_sample_cosine'], '.6f'):>10} {_num(o['sqnr_db'], '.1f'):>8} {_pct(o['top1_agreement']):>12}")
        if o.get("shape_changes"):
            lines.append(f"{'':<{nw}}  its shape depends on the data and differs on {o['shape_changes']} batch(es): "
                         "compared only where it matches; the task error reads the tensors its selection reads")
        if o["ref_nonfinite"] or o["cand_nonfinite"]:
            lines.append(f"{'':<{nw}}  non-finite values: reference {o['ref_nonfinite']}, candidate {o['cand_nonfinite']}")
    if res.get("task_summary"):
        lines.append(f"task error {res['task_summary']}")
    if res["gates"]:
        lines += ["", "gates"]
        for g in res["gates"]:
            op = ">=" if g["gate"] == "min_agreement" else "<="
            lines.append(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['what']}: {g['value']:.4g} {g['unit']} (limit {op} {g['limit']:g})")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


@cli.command("compare", epilog="""\b
Examples:
  onnxopt compare model.onnx model.opt.onnx                       generated inputs
  onnxopt compare model.onnx model.int8.onnx --data val.npz --max-drop 1 --min-agreement 98
  onnxopt compare ref.onnx cand.onnx --data images/ --size 256 --crop 224 --mean 127 --std 128 --max-samples 500
  onnxopt compare ref.onnx cand.onnx --max-size-mb 5 --max-latency-ms 20 --json > cmp.json
\b
Exit codes: 0 all gates passed (or none given), 1/2 user error, 3 a gate failed.
""")
@click.argument("ref", type=click.Path(dir_okay=False))
@click.argument("cand", type=click.Path(dir_okay=False))
@click.option("--data", metavar="PATH", help="Inputs: .npy, .npz, image folder (labels from labels.json or class subfolders), file.py:function yielding feed dicts, arrays or (inputs, labels) pairs (default: generated inputs).")
@click.option("--labels", metavar="PATH", help="Integer labels (.npy, or .npz with 'labels') for accuracy: a class per sample, or per "
              "position ([N, H, W]: a segmentation map's pixel accuracy and mean IoU; [N, T]: a sequence's accuracy per position; "
              "255 is ignored); default: the data's own labels.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed single-sample runs per model for the median latency (0: skip).")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads for the latency runs (0: onnxruntime's default).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Batch size for the accuracy/error runs (a fixed model batch wins).")
@click.option("--max-samples", type=int, default=None, help="Use at most this many samples (generated inputs: how many, default 8).")
@click.option("--max-size-mb", type=float, default=None, help="Gate: candidate file size (external data included) at most this many MB (2^20 bytes).")
@click.option("--max-latency-ms", type=float, default=None, help="Gate: candidate median latency at most this many ms.")
@click.option("--min-agreement", type=float, default=None, help="Gate: agreement with the reference (top-1 class; a Sigmoid output's every label; a map's "
              "positions) at least this percentage (e.g. 99).")
@click.option("--max-drop", type=float, default=None, help="Gate: accuracy drop (top-1, or pixel / position accuracy) at most this many points (needs labels).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (gates still set the exit code).")
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compare_cmd(ref, cand, data, labels, runs, threads, batch_size, max_samples, max_size_mb, max_latency_ms, min_agreement,
                max_drop, as_json, input_shapes, quiet, **kwargs):
    """Run REF and CAND in onnxruntime on the same inputs and compare them.

    Per output: max abs error, cosine similarity, SQNR (dB) and, for classifier outputs
    ([N, C], or [N, C, 1, 1]), top-1 agreement and each model's accuracy when labels are known; for a
    Sigmoid's outputs (binary and multi-label classifiers) the share of samples whose
    every label, decided at 0.5, agrees; for a segmentation map ended by an ArgMax or
    Softmax over its classes, the share of pixels whose class agrees, and with labels of
    a class per pixel ([N, H, W]) each model's pixel accuracy and mean IoU. Per model:
    size, params, MACs and median single-sample latency (default onnxruntime optimizations).
    Without --data the inputs are generated, and the output says so: a dynamic height,
    width or length gets the sizes the model runs at (--input-shape gives others). Gates
    check the candidate; when one fails the table is printed and the exit code is 3.
    """
    image = image_settings(kwargs)
    result = compare_models(
        ref, cand, data=data, labels=labels, runs=runs,
        input_shapes=parse_input_shapes(input_shapes), image=image, batch_size=batch_size, max_samples=max_samples,
        threads=threads,
        gates={"max_size_mb": max_size_mb, "max_latency_ms": max_latency_ms, "min_agreement": min_agreement, "max_drop": max_drop},
        progress=not quiet and not as_json, require_preprocessing=True,
    )
    if as_json:
        click.echo(json.dumps(strict_json(result), indent=2, default=str, allow_nan=False))
    else:
        click.echo(render_compare(result))
    check_gates(result)
