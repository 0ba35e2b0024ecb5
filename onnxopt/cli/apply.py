"""``onnxopt apply`` and ``onnxopt passes``."""
from __future__ import annotations

import sys

import click

from .. import manager, model_io
from ..data import DataSpec, ImageOptions, open_data
from ..errors import OptionError
from ..registry import PassContext, all_passes, shortcut_flags
from . import cli
from .options import image_options, image_settings, input_shape_option, parse_input_shapes


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
  onnxopt apply lite,bnfuse,qdq model.onnx -o model.int8.onnx --calib-data images/ --target tensorrt
  onnxopt apply --recipe recipe.yaml model.onnx -o out.onnx
""")
@click.argument("passes", required=False)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the optimized model (written atomically).")
@click.option("--set", "set_options", multiple=True, metavar="PASS.OPTION=VALUE", help="Set a pass option (repeatable); see `onnxopt passes`.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML/JSON file naming the passes and their options; --set overrides it.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check each exact pass against the model before it in onnxruntime.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write a JSON report of what each pass did.")
@click.option("--save-steps", type=click.Path(file_okay=False), help="Write the model after each pass into this folder (for Netron).")
@click.option("--data", "--calib-data", "data", metavar="PATH", help="Data for verification and calibration: .npy, .npz, image folder, file.py:function, or 'random'.")
@click.option("--calib-samples", type=int, default=None, help="Use at most this many samples of --calib-data.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Batch size when running data through the model.")
@shortcut_options
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def apply_cmd(passes, model, output, set_options, recipe, verify, report_path, save_steps, data, calib_samples, batch_size, input_shapes, quiet, **kwargs):
    """Apply PASSES (comma-separated, in order) to MODEL and write the result to -o.

    Every pass leaves a valid model; exact passes (cleanup, bnfuse, ...) are verified
    numerically against the model before them, and the chain stops loudly when one is off
    by more than the tolerance. The input model is never modified.
    """
    image = image_settings(kwargs)
    if model is None:  # `onnxopt apply --recipe r.yaml model.onnx`: the only positional is the model
        if not recipe:
            raise OptionError("no model given.", "usage: onnxopt apply PASSES MODEL -o OUT (or --recipe FILE MODEL -o OUT)")
        passes, model = None, passes
    names, options = [], {}
    if recipe:
        names, options = manager.load_recipe(recipe)
    if passes:
        names = manager.parse_pass_list(passes)
    if not names:
        raise OptionError("no passes given.", "name them (e.g. `onnxopt apply cleanup,bnfuse model.onnx -o out.onnx`) or give --recipe")
    for pass_name, opts in manager.parse_set_options(set_options).items():
        options.setdefault(pass_name, {}).update(opts)
    _route_shortcuts(kwargs, names, options)
    shapes = parse_input_shapes(input_shapes)
    model_io.refuse_overwriting_inputs(output, [model])
    source = model_io.load_model(model)
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    ctx = PassContext(progress=not quiet and sys.stderr.isatty(), input_shapes=shapes, log=log)
    if data:
        spec = DataSpec(data, image=ImageOptions(**image), batch_size=batch_size, max_samples=calib_samples)
        ctx.data = open_data(spec, source, shapes)
        ctx.data.check()  # wrong shape/dtype/NaN fails now, not only if a pass happens to read the data
        ctx.data_spec = spec
    result, report = manager.apply(source, names, options, verify=verify, context=ctx, save_steps=save_steps)
    report.source = str(model)
    model_io.save_model(result, output, inputs=[model])
    if report_path:
        report.write(report_path)
    if not quiet:
        _print_summary(report, output)


def _route_shortcuts(kwargs: dict, names: list, options: dict) -> None:
    """The pass options' shortcut flags (--target, --calib-method, --rules-module...) -> the options
    of every pass in the chain that declares them (an explicit --set or recipe value wins)."""
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


def _print_summary(report: manager.Report, output: str) -> None:
    for rec in report.passes:
        changes = ", ".join(f"{k}={v}" for k, v in rec.changes.items() if v) or "no change"
        ver = ""
        if rec.verification:
            ver = f"  verified max|err|={rec.verification['max_abs']:.2e}"
        click.echo(f"  {rec.name:<10} {rec.seconds:6.2f}s  nodes {rec.before.get('nodes', '?')} -> {rec.after.get('nodes', '?')}  {changes}{ver}")
        for s in rec.skipped[:5]:
            click.echo(f"             skipped: {s}")
        if len(rec.skipped) > 5:
            click.echo(f"             ... and {len(rec.skipped) - 5} more skipped (see --report)")
    click.echo(f"wrote {output}")


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes_cmd(as_json):
    """List the passes, whether each is exact, and their options with defaults."""
    import json

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
