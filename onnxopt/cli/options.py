"""Option groups shared by several subcommands (data, image preprocessing, input shapes)."""
from __future__ import annotations

import click

from ..data import PRESETS, DataSpec, ImageOptions, open_data, presets_help, recorded_preprocessing
from ..errors import OptionError


def parse_input_shapes(items) -> dict | None:
    """``("input:1x3x224x224", ...)`` -> ``{"input": [1, 3, 224, 224]}``."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().replace(",", "x").split("x")]
        except ValueError:
            raise OptionError(f"bad --input-shape '{item}'.", "write it as NAME:1x3x224x224") from None
    return shapes or None


def input_shape_option(fn):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                        help="Concrete shape for an input with dynamic dims, e.g. input:1x3x224x224 (repeatable).")(fn)


def image_options(fn):
    """Preprocessing for a folder of images (ignored for .npy/.npz/.py data)."""
    opts = [
        click.option("--preprocess", "preset", type=click.Choice(list(PRESETS)), default=None,
                     help="Images (and uint8 arrays for a float input): a named preprocessing; the flags below override its values. "
                          + presets_help()),
        click.option("--size", type=int, default=None, help="Images: resize the short side to this many pixels (default: the crop)."),
        click.option("--crop", type=int, default=None, help="Images: center-crop to this size (default: the model's input H/W)."),
        click.option("--mean", default=None, metavar="M[,M,M]", help="Images: subtract this mean per channel (after --scale)."),
        click.option("--std", default=None, metavar="S[,S,S]", help="Images: divide by this std per channel (after --mean)."),
        click.option("--scale", type=float, default=None, help="Images: multiply raw 0..255 pixels by this first (e.g. 0.00392 for 1/255)."),
        click.option("--bgr", is_flag=True, default=False, help="Images: feed BGR channel order instead of RGB."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None, help="Images: tensor layout (default: from the model input)."),
        click.option("--letterbox", type=int, default=None, metavar="PAD", help="Images: letterbox (keep aspect, pad with PAD) instead of resize+crop, as YOLO models expect."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def image_settings(kwargs: dict) -> dict:
    """Pop the image options out of a command's kwargs as a dict for onnxopt.data.ImageOptions."""
    keys = ("size", "crop", "mean", "std", "scale", "bgr", "layout", "letterbox", "preset")
    values = {k: kwargs.pop(k, None) for k in keys}
    for k in ("mean", "std"):
        if values[k] is not None:
            try:
                values[k] = [float(v) for v in str(values[k]).split(",")]
            except ValueError:
                raise OptionError(f"bad --{k} '{values[k]}'.", f"write --{k} as one number or three comma-separated numbers") from None
    return values


def open_cli_data(path: str, image: dict, model, shapes=None, *, recorded_from=(), log=None, **spec_fields):
    """The data of a command, its pixel preprocessing stated by flags, a preset or the metadata of ``model``
    or ``recorded_from``'s models; the first sample is checked now, the preprocessing logged."""
    recorded = next((r for r in map(recorded_preprocessing, recorded_from) if r is not None), None)
    spec = DataSpec(path, image=ImageOptions(**image), require_preprocessing=True, **spec_fields)
    ds = open_data(spec, model, shapes, recorded=recorded)
    ds.check()
    if ds.preprocessing is not None and log is not None:
        where = " (recorded in the model's metadata)" if ds.preprocessing_origin == "model" else ""
        held = ds.describe()
        log(f"data {path}: {held + ', ' if held else ''}preprocessing {ds.preprocessing.describe(ds.grey)}{where}")
    return ds

