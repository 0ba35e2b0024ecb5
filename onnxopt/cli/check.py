"""``onnxopt check MODEL --target ...``: list every QDQ rule violation for a deployment target."""
from __future__ import annotations

import json

import click

from .. import model_io
from ..errors import GateFailure
from ..quant.check import TARGETS, check_model
from . import cli


@cli.command("check", epilog="""\b
Examples:
  onnxopt check model.int8.onnx --target tensorrt
  onnxopt check model.int8.onnx --target tidl --json
  onnxopt check model.int8.onnx --target tidl --format-only   # ignore ops TIDL runs on ARM
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", required=True, type=click.Choice(TARGETS), help="Deployment target whose rules apply.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--format-only", is_flag=True, help="Check only the QDQ encoding, not operator support (TIDL op constraints).")
def check_cmd(model, target, as_json, format_only):
    """Check MODEL's Q/DQ encoding (and, for TIDL, its operators) against TARGET's rules.

    Lists every violation. Exit 0 when clean, 3 when any violation is found.
    """
    proto = model_io.load_model(model)
    found = check_model(proto, target)
    if format_only:
        found = [v for v in found if v.kind == "format"]
    q = sum(1 for n in proto.graph.node if n.op_type == "QuantizeLinear")
    dq = sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear")
    if as_json:
        click.echo(json.dumps({"model": model, "target": target, "clean": not found, "quantize_linear": q,
                               "dequantize_linear": dq, "violations": [v.to_dict() for v in found]}, indent=2))
    else:
        for v in found:
            click.echo(f"  {v}" + ("  (op support)" if v.kind != "format" else ""))
        click.echo(f"{model}: {q} QuantizeLinear, {dq} DequantizeLinear; "
                   + ("clean for " + target if not found else f"{len(found)} violation(s) for {target}")
                   + (" (a float model: there is no Q/DQ encoding to check)" if not q and not dq else ""))
    if found:
        fixes = []
        if any(v.kind == "format" for v in found):
            fixes.append(f"`onnxopt apply qdq --target {target}` on the float model writes a compliant Q/DQ encoding")
        if any(v.kind != "format" for v in found):
            fixes.append("op-support rules need graph changes: cleanup folds computed shapes of a static-shape model, "
                         "lite replaces unsupported layers, or the exporter must change")
        raise GateFailure(f"{model} violates {len(found)} {target} rule(s).", "see the list above; " + "; ".join(fixes))
