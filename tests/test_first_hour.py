"""A new user's traps on the command line: data that would be read wrongly without saying so,
the command without -o, and what each pass did, each ending in a clear message, a warning or a
sensibly named output."""
from __future__ import annotations

import json

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from fixtures import models
from onnxopt.cli import main
from onnxopt.data import PREPROCESSING_KEY, PRESETS, open_data


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def _console(ctx):
    main(ctx.args)  # the console entry point: user errors become one message and an exit code


def invoke(*args):
    return CliRunner().invoke(_console, [str(a) for a in args], catch_exceptions=False)


def _images(folder, n=4, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(models.tiny_cnn(), path)
    return path


def _metadata(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


# ------------------------------------------------------------------------ preprocessing stated
def test_image_folder_without_preprocessing_is_refused_listing_the_presets(tmp_path, cnn):
    folder = _images(tmp_path / "imgs")
    r = invoke("apply", "cleanup", cnn, "-o", tmp_path / "out.onnx", "--calib-data", folder)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "needs its preprocessing stated" in r.output and "--preprocess" in r.output
    assert all(name in r.output for name in PRESETS)
    assert not (tmp_path / "out.onnx").exists()


def test_uint8_arrays_for_a_float_input_are_refused_with_the_scale_hint(tmp_path, cnn):
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    for path in (tmp_path / "d.npz", tmp_path / "d.npy"):
        np.savez(path, input=x) if path.suffix == ".npz" else np.save(path, x)
        r = invoke("apply", "cleanup", cnn, "-o", tmp_path / "out.onnx", "--calib-data", path)
        assert r.exit_code != 0 and "holds uint8 values" in r.output and "--scale" in r.output, r.output
        # stated, the arrays are normalized as an image folder would be
        r = invoke("apply", "cleanup", cnn, "-o", tmp_path / "out.onnx", "--calib-data", path, "--scale", 1 / 255)
        assert r.exit_code == 0, r.output


def test_preset_is_applied_recorded_and_reused(tmp_path, cnn):
    folder = _images(tmp_path / "imgs")
    out = tmp_path / "out.onnx"
    r = invoke("apply", "cleanup", cnn, "-o", out, "--calib-data", folder, "--preprocess", "imagenet-tf")
    assert r.exit_code == 0, r.output
    assert "preprocessing imagenet-tf (mean 127.5,127.5,127.5, std 127.5,127.5,127.5, RGB" in r.output
    recorded = json.loads(_metadata(out)[PREPROCESSING_KEY])
    assert recorded["preset"] == "imagenet-tf" and recorded["mean"] == [127.5] * 3 and recorded["std"] == [127.5] * 3
    # the recorded preprocessing is what an image folder is read with when none is stated
    src = open_data(str(folder), onnx.load(out), image={"crop": 8})
    x = next(iter(src.samples()))["input"]
    assert -1.0 <= x.min() and x.max() <= 1.0 and src.preprocessing_origin == "model"
    # a later apply on the output reuses it and says so
    r = invoke("apply", "cleanup", out, "-o", tmp_path / "again.onnx", "--calib-data", folder)
    assert r.exit_code == 0 and "recorded in the model's metadata" in r.output, r.output
    # compare takes it from the candidate when the reference has none
    r = invoke("compare", cnn, out, "--data", folder, "--runs", 0, "--json")
    assert r.exit_code == 0, r.output
    assert any("imagenet-tf" in n and "recorded" in n for n in json.loads(r.stdout)["notes"])


def test_flags_override_a_preset(tmp_path, cnn):
    folder = _images(tmp_path / "imgs", n=1)
    src = open_data(str(folder), models.tiny_cnn(), image={"preset": "imagenet", "std": [1.0], "crop": 8})
    o = src.spec.image
    assert o.scale == pytest.approx(1 / 255) and o.mean == [0.485, 0.456, 0.406] and o.std == [1.0]
    x = next(iter(src.samples()))["input"]
    assert x.min() >= -0.5 and x.max() <= 0.6  # x/255 - mean, not divided by the preset's std


# ----------------------------------------------------------------------------------- -o
def test_output_defaults_beside_the_input_and_never_overwrites(tmp_path, cnn):
    r = invoke("apply", "cleanup,bnfuse", cnn)
    expected = tmp_path / "model.cleanup-bnfuse.onnx"
    assert r.exit_code == 0 and f"wrote {expected}" in r.output and expected.exists()
    onnx.checker.check_model(onnx.load(expected), full_check=True)
    stamp = expected.stat().st_mtime_ns
    r = invoke("apply", "cleanup,bnfuse", cnn)
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    assert expected.stat().st_mtime_ns == stamp
    r = invoke("apply", "cleanup,bnfuse", cnn, "--force", "-q")
    assert r.exit_code == 0 and f"wrote {expected}" in r.output
