"""``onnxopt sensitivity``: per-layer quantization sensitivity (only-this-layer / all-but-this-layer)."""
from __future__ import annotations

import json

import click

from .. import manager, model_io, sanity
from ..data import collect_feeds
from ..errors import OptionError, require
from ..quant import sensitivity as sens
from ..quant.prepare import float_for_target
from ..quant.quantize import quantize_model, to_static_batch
from ..quant.upcast import float32_twin
from ..quant.view import QdqView
from ..registry import PassContext, get_pass
from . import cli
from .compare import strict_json
from .options import image_options, image_settings, input_shape_option, open_cli_data, parse_input_shapes


@cli.command("sensitivity", epilog="""\b
Examples:
  onnxopt sensitivity model.onnx --calib-data images/ --target tensorrt
  onnxopt sensitivity model.onnx --calib-data images/ --target ort --plot sens.png --json sens.json
  onnxopt sensitivity model.onnx --calib-data calib.npz --set qdq.weight_bits=4 --mode only --top 10
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "--calib-data", "data", required=True, metavar="PATH", help="Calibration data (.npy, .npz, image folder, file.py:function).")
@click.option("--calib-samples", type=int, default=None, help="Calibrate on at most this many samples.")
@click.option("--samples", "eval_samples", type=int, default=8, show_default=True,
              help="Samples (the first ones of the calibration data) on which each variant's output error is measured.")
@click.option("--target", default="tensorrt", show_default=True, help="Quantization target: tensorrt, ort, tidl, tidl-tda4vm.")
@click.option("--set", "set_options", multiple=True, metavar="qdq.OPTION=VALUE", help="Any qdq pass option (bits, per_channel, calib_method, ...).")
@click.option("--mode", type=click.Choice(["both", "only", "all_but"]), default="both", show_default=True,
              help="only-this-layer-quantized, all-but-this-layer, or both.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--top", type=int, default=None, help="Print only the N most sensitive layers.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full result as JSON ('-' = stdout).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a bar chart PNG (needs matplotlib).")
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True)
def sensitivity_cmd(model, data, calib_samples, eval_samples, target, set_options, mode, batch_size, top, json_path, plot_path,
                    input_shapes, quiet, **kwargs):
    """Quantize MODEL once (qdq pass, --target), then measure per layer the output error vs float
    with only that layer quantized and with all but that layer quantized.

    The per-layer models are derived from the one quantized model by removing Q/DQ (no
    recalibration). Metric: relative L2 error of all outputs and SQNR in dB (higher = better).
    """
    image = image_settings(kwargs)
    if plot_path:  # fail before the long part when matplotlib is missing
        require("matplotlib", "the sensitivity bar chart (--plot)")
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    opts = {}
    for pass_name, values in manager.parse_set_options(set_options).items():
        if pass_name != "qdq":
            raise OptionError(f"--set {pass_name}.* is not a qdq option.", "sensitivity takes qdq options only, e.g. --set qdq.weight_bits=4")
        opts.update(values)
    opts["target"] = target
    resolved = get_pass("qdq").resolve(opts)
    shapes = parse_input_shapes(input_shapes)
    source = model_io.load_model(model)
    ds = open_cli_data(data, image, source, shapes, log=log, batch_size=batch_size, max_samples=calib_samples)
    for warning in sanity.check_outputs(source, ds):  # before minutes of per-layer quantization
        click.echo(f"WARNING: {warning}", err=True)
    ctx = PassContext(data=ds, data_spec=ds.spec, progress=not quiet, input_shapes=shapes, log=log)
    log(f"quantizing for {target} (one calibration) ...")
    source, widened = float32_twin(source)
    # the float model exactly as the qdq pass prepares it (target rewrites, computed weights folded)
    source = float_for_target(source, resolved, ds, ctx, lambda note: note and log(note), widened)
    result = quantize_model(source, resolved, ds, ctx)
    view = QdqView(source, result.model, result.info)
    feeds = collect_feeds(to_static_batch(ds, result.model), eval_samples)
    modes = ("only", "all_but") if mode == "both" else (mode,)
    log(f"measuring {len(view.layers)} layers x {len(modes)} variant(s) on {eval_samples} samples ...")
    rep = sens.analyze(view, feeds, modes=modes, progress=None if quiet else (lambda m: click.echo(m, err=True)))
    if not quiet or not json_path:
        click.echo(sens.format_table(rep, top=top))
    if json_path:
        payload = json.dumps(strict_json({"model": str(model), "target": target, **rep.to_dict()}), indent=2)
        if json_path == "-":
            click.echo(payload)
        else:
            model_io.write_text_atomic(json_path, payload)
    if plot_path:
        sens.plot(rep, plot_path)
        log(f"wrote {plot_path}")
