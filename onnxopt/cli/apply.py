"""``onnxopt apply`` and ``onnxopt passes``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .. import manager, model_io, output_change, sanity
from ..data import PREPROCESSING_KEY
from ..errors import GateFailure, OnnxoptError, OptionError
from ..quant import check as qcheck
from ..registry import PassContext, all_passes, shortcut_flags
from . import cli
from .options import image_options, image_settings, input_shape_option, open_cli_data, parse_input_shapes


def _kwarg(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def shortcut_options(fn):
    """One `apply` flag per pass option that declares one (``option(..., flag="--calib-method")``):
    the flag is the same as ``--set PASS.OPTION=VALUE`` for every pass of the chain that takes it."""
    for flag, owners in reversed(list(shortcut_flags().items())):
        names = "/".join(dict.fromkeys(name for name, _ in owners))
        opt = owners[0][1]
        metavar = "|".join(map(str, opt.choices)) if opt.choices else ("FILE" if opt.path else opt.type.__name__.upper())
        fn = click.option(flag, _kwarg(flag), default=None, metavar=metavar,
                          type=click.Path(dir_okay=False) if opt.path else None,
                          help=f"{names}: {opt.help} (= --set {names.split('/')[0]}.{opt.name}=...)")(fn)
    return fn


@cli.command("apply", epilog="""\b
Examples:
  onnxopt apply cleanup,bnfuse model.onnx -o model.opt.onnx
  onnxopt apply bnfuse model.onnx -o out.onnx --set bnfuse.standalone=conv --report report.json
  onnxopt apply lite,bnfuse,qdq model.onnx --calib-data images/ --preprocess imagenet --target tensorrt
      (writes model.lite-bnfuse-qdq.onnx beside model.onnx)
  onnxopt apply qdq model.onnx --calib-data train/ --check-data val/ --preprocess imagenet --target tidl
      (calibrates on train/, checks the fallback's accuracy budget on val/)
  onnxopt apply --recipe recipe.yaml model.onnx -o out.onnx
""")
@click.argument("passes", required=False)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where to write the optimized model (written atomically). Default: beside MODEL as STEM.PASSES.onnx.")
@click.option("--force", is_flag=True, help="Without -o: overwrite the default output when it exists.")
@click.option("--set", "set_options", multiple=True, metavar="PASS.OPTION=VALUE", help="Set a pass option (repeatable); see `onnxopt passes`.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML/JSON file naming the passes and their options; --set overrides it.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check each exact pass against the model before it in onnxruntime.")
@click.option("--require-verify", is_flag=True, help="Fail when an exact pass cannot be verified (no runnable generated input, "
              "a model onnxruntime cannot load) instead of writing it unverified, or when it fails verification "
              "instead of undoing it.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write a JSON report of what each pass did.")
@click.option("--save-steps", type=click.Path(file_okay=False), help="Write the model after each pass into this folder (for Netron).")
@click.option("--data", "--calib-data", "data", metavar="PATH", help="Data for verification and calibration: .npy, .npz, image folder (or class subfolders of images), file.py:function, or 'random'.")
@click.option("--calib-samples", type=int, default=None, help="Use at most this many samples of --calib-data.")
@click.option("--check-data", metavar="PATH", help="qdq: the samples fallback=auto checks its accuracy budget on, instead of "
              "--calib-data (same formats and preprocessing). Give images the model never trained on (a validation "
              "split): on training images the model is too sure of itself for the check to see the disagreements "
              "new images will have. Without such images: --set qdq.fallback_check=shifted.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Batch size when running data through the model.")
@shortcut_options
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def apply_cmd(passes, model, output, force, set_options, recipe, verify, require_verify, report_path, save_steps, data, calib_samples,
              check_data, batch_size, input_shapes, quiet, **kwargs):
    """Apply PASSES (comma-separated, in order) to MODEL and write the result to -o
    (default: beside MODEL as STEM.PASSES.onnx, e.g. model.lite-bnfuse-qdq.onnx).

    Every pass leaves a valid model; exact passes (cleanup, bnfuse, ...) are verified
    numerically against the model before them (on --data, else on inputs generated from the
    model at two sizes where it has dynamic dims). A rule whose rewrites change the output
    beyond the tolerance is reverted and the rest of the pass kept; a pass no part of which
    verifies is undone and the chain goes on; the console says either in one line. When no input
    can be generated the pass is written unverified and the console says why. --require-verify
    makes both an error. The input model is never
    modified.

    A qdq output whose Q/DQ encoding fails its target's `onnxopt check` is not written (exit 1).
    Nodes the target runs outside its accelerator (TIDL: on ARM through ONNX Runtime) are one
    warning line; with --set qdq.strict_check=true the model is written and the run exits 3.
    """
    image = image_settings(kwargs)
    if model is None:  # `onnxopt apply --recipe r.yaml model.onnx`: the only positional is the model
        if not recipe:
            raise OptionError("no model given.", "usage: onnxopt apply PASSES MODEL -o OUT (or --recipe FILE MODEL -o OUT)")
        passes, model = None, passes
    names, options = manager.load_recipe(recipe) if recipe else ([], {})
    if passes:
        names = manager.parse_pass_list(passes)
    if not names:
        raise OptionError("no passes given.", "name them (e.g. `onnxopt apply cleanup,bnfuse model.onnx -o out.onnx`) or give --recipe")
    for pass_name, opts in manager.parse_set_options(set_options).items():
        options.setdefault(pass_name, {}).update(opts)
    _route_shortcuts(kwargs, names, options)
    shapes = parse_input_shapes(input_shapes)
    defaulted = output is None
    if defaulted:
        output = default_output(model, names, force)
    model_io.refuse_overwriting_inputs(output, [model])
    source = model_io.load_model(model)
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    ctx = PassContext(progress=not quiet, input_shapes=shapes, log=log, require_verify=require_verify)
    if check_data and "qdq" not in names:   # before any data is read
        raise OptionError("--check-data is read by the qdq pass only, and the chain has none.",
                          "drop --check-data, or add qdq to the passes")
    if check_data and not data:
        raise OptionError("--check-data needs --calib-data: qdq calibrates on that, and checks its fallback on this.",
                          "give --calib-data too")
    if data:
        # bad data (shape, dtype, NaN, no preprocessing) fails now, not only if a pass happens to read it
        ctx.data = open_cli_data(data, image, source, shapes, log=log, batch_size=batch_size, max_samples=calib_samples)
        ctx.data_spec = ctx.data.spec
        if check_data:
            ctx.check_data = open_cli_data(check_data, image, source, shapes, log=log, batch_size=batch_size)
        if not all(all_passes()[n].exact for n in names):  # minutes of calibration/pruning ahead: look at the data first
            for prefix, read in (("", ctx.data), ("--check-data: ", ctx.check_data)):
                for warning in sanity.check_outputs(source, read) if read is not None else ():
                    click.echo(f"WARNING: {prefix}{warning}", err=True)
    result, report = manager.apply(source, names, options, verify=verify, context=ctx, save_steps=save_steps)
    report.source = str(model)
    if ctx.data is not None and ctx.data.preprocessing is not None:
        # compare, sensitivity, finetune and a later apply read the data the same way
        model_io.record_metadata(result, PREPROCESSING_KEY, ctx.data.preprocessing.to_metadata())
    _refuse_failing_target_check(report, report_path)
    model_io.save_model(result, output, inputs=[model])
    if report_path:
        report.write(report_path)
    if not quiet:
        _print_summary(report, output)
    elif defaulted:
        click.echo(f"wrote {output}")
    _fail_on_op_support_violations(report, output)


def default_output(model: str, names: list, force: bool) -> str:
    """``dir/stem.pass1-pass2.onnx`` beside the input; an existing file is kept unless ``force``."""
    path = Path(model)
    out = path.with_name(f"{path.stem}.{'-'.join(names)}.onnx")
    if out.exists() and not force:
        raise OptionError(f"no -o given, and the default output '{out}' already exists.",
                          "give -o PATH, or --force to overwrite it")
    return str(out)


def _route_shortcuts(kwargs: dict, names: list, options: dict) -> None:
    """Route the shortcut flags to every pass of the chain that declares them (--set or a recipe wins)."""
    orphans: dict = {}
    for flag, owners in shortcut_flags().items():
        value = kwargs.pop(_kwarg(flag), None)
        if value is None:
            continue
        takers = [(name, opt) for name, opt in owners if name in names]
        if not takers:
            orphans[flag] = "/".join(dict.fromkeys(name for name, _ in owners))
        for name, opt in takers:
            options.setdefault(name, {}).setdefault(opt.name, value)
    if orphans:
        flags, owners = ", ".join(orphans), " or ".join(dict.fromkeys(orphans.values()))
        raise OptionError(f"{flags} given, but {owners} is not in {','.join(names)}.", f"add {owners} to the passes or drop {flags}")


def _refuse_failing_target_check(report: manager.Report, report_path) -> None:
    """A model whose Q/DQ encoding fails its pass's target check (``extra["check"]``) is not written: the
    run fails listing the violations, never exit 0 with an encoding the target rejects (the report is written)."""
    for rec in report.passes:
        check = rec.extra.get("check") if isinstance(rec.extra, dict) else None
        if check and check.get("format_violations", check.get("violations")):
            if report_path:
                report.write(report_path)
            format_first = [v for v in check["first"] if v.get("kind", "format") == "format"] or check["first"]
            listed = "; ".join(f"[{v['rule']}] {v['node']}: {v['message']}" for v in format_first[:5])
            more = check.get("format_violations", check["violations"]) - min(5, len(format_first))
            raise OnnxoptError(f"the quantized model fails `onnxopt check --target {check['target']}` "
                               f"({check.get('format_violations', check['violations'])} encoding violation(s)): {listed}" + (f"; and {more} more" if more > 0 else "")
                               + "; it was not written.",
                               f"keep the offending layers in float (--set {rec.name}.exclude_nodes=NAME,...) or run cleanup "
                               f"before {rec.name}; please report the model if the violation is in onnxopt's own encoding")


def _fail_on_op_support_violations(report: manager.Report, output: str) -> None:
    """With ``strict_check``, ops the target's accelerator lacks fail the run (exit 3) once the model is
    written: the encoding is right, but the run must not exit 0 with a model its own ``check --strict`` fails."""
    for rec in report.passes:
        check = rec.extra.get("check") if isinstance(rec.extra, dict) else None
        if check and check.get("violations"):
            first = "; ".join(f"[{v['rule']}] {v['node']}" for v in check["first"][:3])
            raise GateFailure(f"{output} was written, but {check['violations']} node(s) fail `onnxopt check --target {check['target']} "
                              f"--strict` op-support rules ({first}{'; ...' if check['violations'] > 3 else ''}): the target runs "
                              "them outside its accelerator, and strict_check asks for every node on it.",
                              f"run `onnxopt check {output} --target {check['target']} --strict` for the list; replace those ops "
                              f"(e.g. with lite or your exporter), or drop --set {rec.name}.strict_check=true if your flow offloads them")


def _print_summary(report: manager.Report, output: str) -> None:
    """One line per pass: what it did and what it cost (:func:`_cost_lines`), then the warnings."""
    for rec in report.passes:
        changes = ", ".join(f"{k}={v}" for k, v in rec.changes.items() if v) or "no change"
        click.echo(f"  {rec.name:<10} {rec.seconds:6.2f}s  nodes {rec.before.get('nodes', '?')} -> {rec.after.get('nodes', '?')}  {changes}")
        for line in _cost_lines(rec):
            click.echo(f"             {line}")
        for s in rec.skipped[:5]:
            click.echo(f"             skipped: {s}")
        if len(rec.skipped) > 5:
            click.echo(f"             ... and {len(rec.skipped) - 5} more skipped (see --report)")
    click.echo(f"wrote {output}")
    for rec in report.passes:
        for warning in rec.warnings:
            click.echo(f"WARNING: {warning}", err=True)


def _cost_lines(rec) -> list:
    lines = []
    if rec.verification and rec.verification.get("verified") is False:
        lines.append(f"NOT verified: {rec.verification.get('reason', 'onnxruntime could not run it')}")
    elif rec.verification and rec.verification.get("reverted_pass"):
        lines.append(f"REVERTED: it changed the output by max abs {rec.verification['max_abs']:.3g} (rel "
                     f"{rec.verification['max_rel']:.3g}); the model is kept as it was before this pass")
    elif rec.verification:
        lines.append(f"verified max|err|={rec.verification['max_abs']:.2e} ({rec.verification.get('inputs', 'generated')} inputs)")
    elif rec.exact and any(rec.changes.values()):
        lines.append("not verified (--no-verify)")
    if rec.output_change:
        lines.append(output_change.describe(rec.output_change))
    if not rec.exact and rec.before.get("macs") != rec.after.get("macs"):  # e.g. prune: what the change bought
        parts = []
        # MACs of layers with dynamic shapes are unknown (not counted): a pass that fixed the input
        # size (qdq for a static-shape target) would show them all as added
        unknown = rec.before.get("macs_unknown_layers") or rec.after.get("macs_unknown_layers")
        for key, label in (("macs", "MACs"), ("params", "params")):
            b, a = rec.before.get(key), rec.after.get(key)
            if key == "macs" and unknown:
                parts.append("MACs not compared (layers with dynamic shapes)")
            elif b:
                parts.append(f"{label} {100 * (a - b) / b:+.1f} %")
        if parts:
            lines.append(", ".join(parts))
    check = rec.extra.get("check") if isinstance(rec.extra, dict) else None
    if check:
        verdict = "clean" if not check["violations"] else f"{check['violations']} violation(s) (run onnxopt check OUT --target {check['target']})"
        if check.get("fallback"):
            verdict += f"; {qcheck.describe_fallback(check['fallback'])}"
        lines.append(f"check --target {check['target']}{' --strict' if check.get('strict') else ''}: {verdict}")
    return lines


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes_cmd(as_json):
    """List the passes, whether each is exact, and their options with defaults."""
    table = all_passes()
    if as_json:
        click.echo(json.dumps({n: {"summary": p.summary, "exact": p.exact, "options": {
            o.name: {"type": o.type.__name__, "default": o.default, "help": o.help, "choices": list(o.choices) if o.choices else None}
            for o in p.options}} for n, p in table.items()}, indent=2, default=str))
        return
    for name, p in table.items():
        click.echo(f"{name}  ({'exact' if p.exact else 'approximate'}) -- {p.summary}")
        for o in p.options:
            choices = f" [{'|'.join(map(str, o.choices))}]" if o.choices else ""
            click.echo(f"    {name}.{o.name} = {o.default!r}{choices}\n        {o.help}")
        click.echo("")
