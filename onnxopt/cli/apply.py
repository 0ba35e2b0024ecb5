"""``onnxopt apply`` and ``onnxopt passes``."""
from __future__ import annotations

import sys

import click

from .. import manager, model_io
from ..data import DataSpec, ImageOptions, open_data
from ..errors import OptionError
from ..registry import PassContext, all_passes
from . import cli
from .options import image_options, image_settings, input_shape_option, parse_input_shapes


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
@click.option("--target", default=None, help="Deployment target for passes that take one (qdq): tensorrt, ort, tidl, tidl-tda4vm.")
@click.option("--rules-module", default=None, type=click.Path(dir_okay=False), help="Python file registering user rules for the lite pass (= --set lite.rules_module=FILE).")
@click.option("--calib-method", default=None, type=click.Choice(["auto", "minmax", "percentile", "entropy", "mse"]), help="qdq: calibration method (= --set qdq.calib_method=...).")
@click.option("--calib-percentile", type=float, default=None, help="qdq: percentile for --calib-method percentile (default 99.99).")
@click.option("--calib-cache", default=None, type=click.Path(dir_okay=False), help="qdq: calibration cache file, reused when model/data/settings match.")
@click.option("--calib-workers", type=int, default=None, help="qdq: calibration worker processes.")
@click.option("--trt-calib-table", default=None, type=click.Path(dir_okay=False), help="qdq: also write a TensorRT calibration table here.")
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def apply_cmd(passes, model, output, set_options, recipe, verify, report_path, save_steps, data, calib_samples, batch_size, target, input_shapes, quiet, rules_module=None, **kwargs):
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
    if target is not None:
        takers = [n for n in names if any(o.name == "target" for o in all_passes()[n].options)]
        if not takers:
            raise OptionError(f"--target {target} given, but no pass in {','.join(names)} takes a target.", "add qdq to the passes or drop --target")
        for n in takers:
            options.setdefault(n, {}).setdefault("target", target)
    if rules_module is not None:
        if "lite" not in names:
            raise OptionError(f"--rules-module given, but lite is not in {','.join(names)}.", "add lite to the passes or drop --rules-module")
        options.setdefault("lite", {}).setdefault("rules_module", rules_module)
    _route_qdq_options(kwargs, names, options)
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


_QDQ_FLAGS = {"calib_method": "calib_method", "calib_percentile": "calib_percentile", "calib_cache": "calib_cache",
              "calib_workers": "calib_workers", "trt_calib_table": "trt_calib_table"}


def _route_qdq_options(kwargs: dict, names: list, options: dict) -> None:
    """--calib-method/--calib-cache/... -> qdq options (an explicit --set wins)."""
    given = {opt: kwargs.pop(flag) for flag, opt in _QDQ_FLAGS.items() if kwargs.get(flag) is not None}
    for flag in _QDQ_FLAGS:
        kwargs.pop(flag, None)
    if not given:
        return
    if "qdq" not in names:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise OptionError(f"{flags} given, but qdq is not in {','.join(names)}.", "add qdq to the passes or drop the calibration flags")
    for opt, value in given.items():
        options.setdefault("qdq", {}).setdefault(opt, value)


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
