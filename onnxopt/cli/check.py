"""``onnxopt check MODEL --target ...``: list every QDQ rule violation for a deployment target."""
from __future__ import annotations

import json

import click

from .. import model_io
from ..errors import GateFailure
from ..quant.check import TARGETS, check_model, describe_fallback, failing, fallback_summary
from . import cli


@cli.command("check", epilog="""\b
Examples:
  onnxopt check model.int8.onnx --target tensorrt
  onnxopt check model.int8.onnx --target tidl --json
  onnxopt check model.int8.onnx --target tidl --strict        # every node must run on TIDL itself
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", required=True, type=click.Choice(TARGETS), help="Deployment target whose rules apply.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Fail on op-support violations too: for flows that need every node on the "
              "accelerator (TIDL-RT's standalone import), not TIDL's OSRT flow, where they run on ARM through ONNX Runtime.")
@click.option("--format-only", is_flag=True, help="Check only the QDQ encoding: do not list the nodes that run outside the accelerator.")
def check_cmd(model, target, as_json, strict, format_only):
    """Check MODEL's Q/DQ encoding (and, for TIDL, its operators) against TARGET's rules.

    Lists every encoding violation. Nodes whose op the target's accelerator lacks (TIDL's
    op-support rules) run on its fallback -- in TIDL's OSRT flow on ARM through ONNX Runtime --
    and are summed up in one warning line; --strict lists them as violations. Exit 0 when nothing
    fails, 3 when a violation is found.
    """
    proto = model_io.load_model(model)
    found = check_model(proto, target)
    if format_only:
        found = [v for v in found if v.kind == "format"]
    bad = failing(found, strict)
    elsewhere = None if strict else fallback_summary(found, target)
    q = sum(1 for n in proto.graph.node if n.op_type == "QuantizeLinear")
    dq = sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear")
    if as_json:
        click.echo(json.dumps({"model": model, "target": target, "strict": strict, "clean": not bad, "quantize_linear": q,
                               "dequantize_linear": dq, "violations": [v.to_dict() for v in bad],
                               "fallback": dict(elsewhere, list=[v.to_dict() for v in found if v.kind != "format"]) if elsewhere else None},
                              indent=2))
    else:
        for v in bad:
            click.echo(f"  {v}" + ("  (op support)" if v.kind != "format" else ""))
        if elsewhere:
            click.echo(f"WARNING: {describe_fallback(elsewhere)} (--json lists them; --strict fails on them)", err=True)
        click.echo(f"{model}: {q} QuantizeLinear, {dq} DequantizeLinear; "
                   + ("clean for " + target if not bad else f"{len(bad)} violation(s) for {target}")
                   + (f" ({elsewhere['nodes']} node(s) {elsewhere['where']})" if elsewhere and not bad else "")
                   + (" (a float model: there is no Q/DQ encoding to check)" if not q and not dq else ""))
    if bad:
        fixes = []
        if any(v.kind == "format" for v in bad):
            fixes.append(f"`onnxopt apply qdq --target {target}` on the float model writes a compliant Q/DQ encoding")
        if any(v.kind != "format" for v in bad):
            fixes.append("op-support rules need graph changes: `qdq --target tidl` rewrites what it can exactly before "
                         "quantizing (static shapes, cleanup, ReduceMean -> GlobalAveragePool/MatMul), lite replaces "
                         "unsupported layers, or the exporter must change")
        raise GateFailure(f"{model} violates {len(bad)} {target} rule(s).", "see the list above; " + "; ".join(fixes))
