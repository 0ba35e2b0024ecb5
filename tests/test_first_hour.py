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


# ------------------------------------------------------------------- what each pass cost
def _relu6_classifier(path):
    """x[N,8] -> MatMul -> Clip(0,6) -> MatMul -> logits[N,5]: on large inputs the ReLU6 clips
    most values, so lite's relu6_to_relu changes the logits a lot."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Clip", ["h", "lo", "hi"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(path.with_suffix(".npz"), x=(10 * rng.standard_normal((64, 8))).astype(np.float32))
    return path, path.with_suffix(".npz")


def test_lite_damage_is_measured_and_warned_with_the_rule_and_the_ways_out(tmp_path):
    model, data = _relu6_classifier(tmp_path / "m.onnx")
    r = invoke("apply", "lite", model, "--calib-data", data, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "relu6_to_relu=1" in r.output and "output change cosine" in r.output and "top-1 agreement" in r.output
    warning = next(line for line in r.output.splitlines() if line.startswith("WARNING: lite"))
    assert "relu6_to_relu" in warning and "finetune" in warning and "lite.disable=relu6_to_relu" in warning
    (rec,) = json.loads((tmp_path / "r.json").read_text())["passes"]
    change = rec["output_change"]
    assert change["inputs"] == "data" and change["samples"] == 32 and change["cosine"] < 0.9
    assert rec["warnings"] == [warning[len("WARNING: "):]]
    # lite.max_error: the rule over the budget is skipped, and says why
    r = invoke("apply", "lite", model, "--calib-data", data, "-o", tmp_path / "b.onnx", "--set", "lite.max_error=0.1")
    assert r.exit_code == 0 and "relu6_to_relu: not applied" in r.output and "exceeds lite.max_error=0.1" in r.output
    assert "WARNING: lite" not in r.output
    assert [n.op_type for n in onnx.load(tmp_path / "b.onnx").graph.node].count("Clip") == 1


def test_prune_and_qdq_summary_lines(tmp_path, cnn):
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x)
    r = invoke("apply", "bnfuse,prune,qdq", cnn, "--calib-data", tmp_path / "d.npz", "--set", "prune.ratio=0.5",
               "--set", "prune.round_to=1", "--set", "prune.keep_first_last=false", "--target", "tensorrt")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    prune = lines[next(i for i, l in enumerate(lines) if l.strip().startswith("prune "))+1:]
    assert any("MACs -" in l and "params -" in l for l in prune[:3]), r.output
    assert any("check --target tensorrt: clean" in l for l in lines), r.output
    assert sum("output change cosine" in l for l in lines) == 2  # prune and qdq measured, bnfuse verified
    assert any("verified max|err|=" in l for l in lines)


# ------------------------------------------------------- the whole chain checked before it runs
@pytest.mark.parametrize("extra, words", [
    (["--set", "qdq.weight_bits=9", "--calib-data", "DATA"], "qdq.weight_bits=9 is out of range"),
    ([], "the qdq pass needs calibration data"),
    (["--set", "prune.ratio=1.5", "--calib-data", "DATA"], "prune.ratio must be in [0, 1)"),
    (["--set", "lite.disable=no_such_rule", "--calib-data", "DATA"], "unknown lite rule 'no_such_rule'"),
])
def test_a_later_pass_option_or_input_is_refused_before_the_first_pass_runs(tmp_path, cnn, extra, words):
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x)
    chain = "cleanup,bnfuse,prune,lite,qdq"
    r = invoke("apply", chain, cnn, "-o", tmp_path / "out.onnx", *[str(tmp_path / "d.npz") if a == "DATA" else a for a in extra])
    assert r.exit_code != 0 and words in r.output, r.output
    assert "[1/5] cleanup" not in r.output and "Traceback" not in r.output  # nothing ran
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------- progress
def test_long_steps_print_plain_progress_lines_when_not_on_a_terminal(tmp_path, cnn, monkeypatch):
    from onnxopt import progress

    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # every update is "a few seconds later"
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x)
    r = invoke("apply", "qdq", cnn, "--calib-data", tmp_path / "d.npz", "--target", "ort")
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("calibrating")]
    assert len(lines) >= 6 and lines[-1].split(": ", 1)[1].startswith("6/6 samples") and "sample/s" in lines[-1]
    assert "\r" not in r.output  # lines, not a bar's carriage returns
    r = invoke("apply", "qdq", cnn, "--calib-data", tmp_path / "d.npz", "--target", "ort", "--force", "-q")
    assert r.exit_code == 0 and "calibrating" not in r.output


# ----------------------------------------------------------- a look at the data before the work
def test_data_the_model_cannot_read_is_named_before_the_passes_run(tmp_path):
    model, _ = _relu6_classifier(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    # scaled 100x beyond what the first layer saw: its ReLU6 sits at 6 for half the values
    np.savez(tmp_path / "big.npz", x=(100 * rng.standard_normal((16, 8))).astype(np.float32))
    r = invoke("apply", "lite", model, "--calib-data", tmp_path / "big.npz", "-o", tmp_path / "a.onnx")
    assert r.exit_code == 0, r.output
    warning = next(l for l in r.output.splitlines() if "first bounded activation" in l)
    assert r.output.index(warning) < r.output.index("[1/1] lite")  # said before the pass runs
    assert "sit at its upper bound" in warning and "preprocess" in warning
    # one sample repeated: the output does not depend on the data as read
    np.savez(tmp_path / "same.npz", x=np.repeat(rng.standard_normal((1, 8)), 16, axis=0).astype(np.float32))
    r = invoke("apply", "lite", model, "--calib-data", tmp_path / "same.npz", "-o", tmp_path / "b.onnx")
    assert r.exit_code == 0 and "is the same for all 16 samples" in r.output, r.output
    # well-scaled data: no such warning
    np.savez(tmp_path / "ok.npz", x=(0.1 * rng.standard_normal((16, 8))).astype(np.float32))
    r = invoke("apply", "lite", model, "--calib-data", tmp_path / "ok.npz", "-o", tmp_path / "c.onnx")
    assert r.exit_code == 0 and "bounded activation" not in r.output and "same for all" not in r.output, r.output
    # --check-data is looked at the same way, and the warning names it
    r = invoke("apply", "qdq", model, "--calib-data", tmp_path / "ok.npz", "--check-data", tmp_path / "big.npz",
               "--target", "ort", "-o", tmp_path / "d.onnx")
    assert r.exit_code == 0, r.output
    assert [l for l in r.output.splitlines() if "first bounded activation" in l][0].startswith("WARNING: --check-data: ")


# ------------------------------------------------------------------------ the target's own check
def test_qdq_output_with_ops_tidl_lacks_warns_they_run_on_arm_and_strict_check_exits_3(tmp_path):
    """A 5x5 stride-1 depthwise conv is outside TIDL's op support: the encoding is right, so the
    model is written; in TIDL's OSRT flow the node runs on ARM through ONNX Runtime, which the run
    says in one line (exit 0). With qdq.strict_check (every node on TIDL) the run exits 3."""
    from helpers import make_model, rand
    from onnxopt.quant.check import check_model, failing

    conv = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw5", group=4, kernel_shape=[5, 5], pads=[2, 2, 2, 2])
    relu = onnx.helper.make_node("Relu", ["y"], ["z"], name="relu")
    path = tmp_path / "dw.onnx"
    onnx.save(make_model([conv, relu], [("x", [1, 4, 8, 8])], [("z", [1, 4, 8, 8])],
                         [("w", rand(4, 1, 5, 5)), ("b", rand(4, seed=1))]), path)
    np.save(tmp_path / "calib.npy", rand(8, 4, 8, 8, seed=2))
    out = tmp_path / "dw.int8.onnx"
    r = invoke("apply", "qdq", path, "-o", out, "--calib-data", tmp_path / "calib.npy", "--target", "tidl")
    assert r.exit_code == 0 and "1 node(s) run on ARM through ONNX Runtime, not on the accelerator: Conv x1" in r.output, r.output
    found = check_model(onnx.load(out), "tidl")
    assert [v.node for v in found] == ["dw5"] and {v.kind for v in found} == {"op-support"} and failing(found) == []
    r = invoke("apply", "qdq", path, "-o", out, "--calib-data", tmp_path / "calib.npy", "--target", "tidl",
               "--set", "qdq.strict_check=true")
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    assert "fail `onnxopt check --target tidl --strict`" in r.output and "dw5" in r.output and out.exists()
