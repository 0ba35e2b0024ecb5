"""``onnxopt info``: what a model is -- interface, opsets, ops, parameters, MACs, size on disk."""
from __future__ import annotations

import json

import click

from ..compare import model_info
from . import cli


def human(n, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes; exact counts are in --json)."""
    if n is None:
        return "?"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} kB"


def render_info(info: dict) -> str:
    lines = []

    def row(key, value):
        lines.append(f"{key:<10} {value}")

    row("model", info["path"] or "(in memory)")
    size = mib(info["size_bytes"])
    if info.get("external_data_bytes"):
        size += f" (of which external data {mib(info['external_data_bytes'])} in {', '.join(info['external_data_files'])})"
    row("size", size)
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    row("format", f"IR {info['ir_version']}, opset {opsets}" + (f", producer {info['producer']}" if info["producer"] else ""))
    nw = max((len(v["name"]) for v in info["inputs"] + info["outputs"]), default=0)
    for key in ("inputs", "outputs"):
        items = info[key]
        for i, v in enumerate(items):
            shape = "(unknown shape)" if v["shape"] is None else (
                "[" + ", ".join("?" if d is None else str(d) for d in v["shape"]) + "]")
            row(key if i == 0 else "", f"{v['name']:<{nw}}  {v['dtype']:<8} {shape}"
                + (f"  -> measured as {v['measured_as']}" if v.get("measured_as") else ""))
        if not items:
            row(key, "(none)")
    row("nodes", f"{info['nodes']} ({info['initializers']} initializers)")
    row("params", f"{human(info['params'])} ({info['params']:,})")
    macs = f"{human(info['macs'])} ({info['macs']:,}) per sample"
    if info["macs_unknown_layers"]:
        macs += f"; {info['macs_unknown_layers']} layer(s) with unknown shapes not counted"
    row("MACs", macs)
    q = info.get("quantization")
    if q:
        text = f"{q['quantized_layers']} of {q['weighted_layers']} weighted layers"
        if q["quantized_mac_share"] is not None:
            text += f" ({100 * q['quantized_mac_share']:.0f} % of the MACs)"
        if q["weight_types"]:
            text += ", weights " + ", ".join(f"{t} {c}" for t, c in q["weight_types"].items())
        text += f"; {q['activation_qdq']} activation Q/DQ"
        if q["dynamic_quantizers"]:
            text += f" and {q['dynamic_quantizers']} DynamicQuantizeLinear"
        floats = q["weighted_layers"] - q["quantized_layers"]
        if floats:
            text += f"; {floats} layer(s) float"
        row("quantized", text)
    ops = [f"{op} {count}" for op, count in sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0]))]
    for i in range(0, max(len(ops), 1), 6):  # six to a line
        row("ops" if i == 0 else "", ", ".join(ops[i:i + 6]) or "(none)")
    for k, v in info["metadata"].items():
        row("metadata" if k == next(iter(info["metadata"])) else "", f"{k} = {v if len(v) < 100 else v[:97] + '...'}")
    if "layers" in info:
        lines.append("")
        layers = info["layers"]
        nw = min(60, max((len(r["name"]) for r in layers), default=4))
        lines.append(f"{'layer':<{nw}}  {'op':<14} {'MACs':>10}  {'share':>6}")
        for r in layers:
            name = r["name"] if len(r["name"]) <= nw else "..." + r["name"][-(nw - 3):]
            share = f"{100 * r['share']:5.1f}%" if r["share"] is not None else "     ?"
            lines.append(f"{name:<{nw}}  {r['op']:<14} {human(r['macs']):>10}  {share}")
        if not layers:
            lines.append("(no Conv/ConvTranspose/Gemm/MatMul layers)")
    return "\n".join(lines)


@cli.command("info", epilog="""\b
Examples:
  onnxopt info model.onnx
  onnxopt info model.onnx --layers          MACs of every Conv/Gemm/MatMul
  onnxopt info model.onnx --json > info.json
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (exact counts).")
@click.option("--layers", is_flag=True, help="Also list the MACs of every Conv/ConvTranspose/Gemm/MatMul and GRU/LSTM/RNN layer.")
def info_cmd(model, as_json, layers):
    """Show MODEL's inputs/outputs (shapes, dtypes), opsets, IR version, op histogram,
    parameter count, MACs per sample and size on disk (external data included). Each output
    says how compare, sensitivity and qdq's fallback budget measure it: class scores (top-1),
    a Sigmoid's labels, a class per pixel, or values with no decision. For a
    quantized model, also how many weighted layers read quantized weights (and their share of
    the MACs), the activation Q/DQ pairs, and how many layers stayed float.

    MACs count Conv, ConvTranspose, Gemm and MatMul (and their integer/QLinear forms) and
    GRU/LSTM/RNN (every step's input and recurrent products) from inferred shapes; a dynamic
    batch dimension counts as 1, and a layer whose shapes stay unknown (a dynamic sequence
    length) is not counted, and says so.
    """
    info = model_info(model, per_layer=layers)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(render_info(info))
