"""Robustness: every deliberately broken input ends in ONE clear message and a non-zero exit,
no traceback, and no output file. The real CLI entry point runs in a subprocess so the real
stderr and exit code are checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import models

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "fixtures" / "run_cli.py"


def cli(*args, cwd, with_test_passes=False):
    """Run ``onnxopt ARGS`` (optionally with the test passes registered); return the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ONNXOPT_DEBUG", None)
    head = [sys.executable, str(RUNNER)] if with_test_passes else [sys.executable, "-m", "onnxopt"]
    return subprocess.run(head + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_clear_error(proc, *words, code=None):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr  # (a quoted "Fatal error:" is fine)
    at = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert len(lines) - at <= 2, proc.stderr  # the message and its hint end the output (progress lines may precede)
    for w in words:
        assert w in proc.stderr, proc.stderr


MODEL_CASES = [
    ("truncated", "not a readable ONNX model"),
    ("not_onnx", "not a readable ONNX model"),
    ("invalid_graph", "not a valid ONNX graph"),
    ("missing_external", "is missing"),
    ("escaping_external", "escapes the model's folder"),
    ("opset_high", "opset 40"),
]


@pytest.mark.parametrize("kind, words", MODEL_CASES)
def test_broken_model_apply(tmp_path, kind, words):
    path = models.broken(kind, tmp_path / "m")
    out = tmp_path / "out.onnx"
    proc = cli("apply", "t_scale", path, "-o", out, "--report", tmp_path / "r.json", cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, words, "hint:", code=1)
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escaped.data", "m"] if kind == "escaping_external" else ["m"]


@pytest.mark.parametrize("kind, words", MODEL_CASES[:3])
def test_broken_model_info_and_compare(tmp_path, kind, words):
    path = models.broken(kind, tmp_path / "m")
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    assert_one_clear_error(cli("info", path, cwd=tmp_path), words)
    assert_one_clear_error(cli("compare", good, path, "--runs", "0", cwd=tmp_path), words)


def test_unknown_pass(tmp_path):
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    out = tmp_path / "out.onnx"
    proc = cli("apply", "t_scale,nosuchpass", good, "-o", out, cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, "unknown pass 'nosuchpass'", "valid passes:", "t_scale", code=2)
    assert not out.exists()


@pytest.mark.parametrize("setting, words", [
    ("t_scale.factor=abc", "bad value 'abc' for option t_scale.factor: expected float"),
    ("t_scale.mode=pow", "valid values: mul, div"),
    ("t_scale.nope=1", "valid options of t_scale: factor, mode, count, enabled"),
    ("t_scale=1", "PASS.OPTION=VALUE"),
])
def test_bad_option(tmp_path, setting, words):
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    out = tmp_path / "out.onnx"
    proc = cli("apply", "t_scale", good, "-o", out, "--set", setting, cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, words, code=2)
    assert not out.exists()


@pytest.mark.parametrize("name, write", [
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)),
    ("text.npy", lambda p: p.write_text("not numpy")),
    ("objects.npz", lambda p: np.savez(p, input=np.array([{"a": 1}] * 2, dtype=object))),
    ("broken.npz", lambda p: p.write_bytes(b"PK\x03\x04 truncated")),
])
def test_data_file_that_holds_no_numeric_arrays(tmp_path, name, write):
    """Pickled objects, text or a broken zip named .npy/.npz: one data error, not an internal one."""
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    write(tmp_path / name)
    proc = cli("compare", good, good, "--data", tmp_path / name, "--runs", "0", cwd=tmp_path)
    assert_one_clear_error(proc, f"cannot read '{tmp_path / name}' as numeric NumPy data", code=1)
    assert "internal error" not in proc.stderr


def test_data_of_the_wrong_shape(tmp_path):
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 16, 16), np.float32))
    out = tmp_path / "out.onnx"
    # the pass does not change the model, so verification never reads the data: the data is
    # still checked up front
    proc = cli("apply", "t_scale", good, "-o", out, "--data", tmp_path / "x.npy", "--set", "t_scale.enabled=false",
               cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, "shape [1, 3, 16, 16]", "expects [?, 3, 8, 8]", code=1)
    assert not out.exists()
    proc = cli("compare", good, good, "--data", tmp_path / "x.npy", cwd=tmp_path)
    assert_one_clear_error(proc, "shape [1, 3, 16, 16]")


def test_verification_failure(tmp_path):
    """A pass that fails verification is undone (one line, exit 0, the model as it was), or with
    --require-verify refused with one message and nothing written."""
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    out = tmp_path / "out.onnx"
    proc = cli("apply", "t_scale", good, "-o", out, "--set", "t_scale.factor=1.5", "--save-steps", tmp_path / "steps",
               "--require-verify", cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, "beyond tolerance", "max abs error", "max rel error")
    assert not out.exists() and not (tmp_path / "steps").exists()
    proc = cli("apply", "t_scale", good, "-o", out, "--set", "t_scale.factor=1.5", cwd=tmp_path, with_test_passes=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "t_scale: reverted" in line]) == 1
    assert "REVERTED" in proc.stdout and [n.op_type for n in onnx.load(out).graph.node] == [n.op_type for n in models.tiny_cnn().graph.node]


def test_output_over_input_is_refused(tmp_path):
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    before = good.read_bytes()
    proc = cli("apply", "t_scale", good, "-o", good, cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, "never overwrites its input")
    assert "[1/1]" not in proc.stderr  # refused before any pass runs, not after a long calibration
    assert good.read_bytes() == before


def test_finetune_output_over_teacher_is_refused_before_training(tmp_path):
    pytest.importorskip("torch")
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    teacher = models.save(models.tiny_cnn(), tmp_path / "teacher.onnx")
    before = teacher.read_bytes()
    proc = cli("finetune", good, "-o", teacher, "--teacher", teacher, "--data", "random", cwd=tmp_path)
    assert_one_clear_error(proc, "never overwrites its input")
    assert "epoch" not in proc.stderr and "RANDOM" not in proc.stderr  # refused before the data is read or a step taken
    assert teacher.read_bytes() == before


def test_missing_files_and_bad_recipe(tmp_path):
    assert_one_clear_error(cli("info", tmp_path / "none.onnx", cwd=tmp_path), "does not exist")
    good = models.save(models.tiny_cnn(), tmp_path / "good.onnx")
    (tmp_path / "r.yaml").write_text("passes:\n  - t_scale: conv\n")
    proc = cli("apply", "--recipe", tmp_path / "r.yaml", good, "-o", tmp_path / "o.onnx", cwd=tmp_path, with_test_passes=True)
    assert_one_clear_error(proc, "must be a mapping")
    assert_one_clear_error(cli("compare", good, good, "--data", tmp_path / "nothing", cwd=tmp_path), "does not exist")


def test_debug_switch_shows_the_traceback(tmp_path):
    env_proc = subprocess.run([sys.executable, "-m", "onnxopt", "info", str(tmp_path / "none.onnx")], cwd=tmp_path,
                              env=dict(os.environ, ONNXOPT_DEBUG="1", PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert env_proc.returncode != 0 and "Traceback" in env_proc.stderr and "ModelLoadError" in env_proc.stderr


def test_exact_pass_on_a_model_onnxruntime_cannot_run(tmp_path):
    """A custom-domain op: bnfuse folds the BN, but onnxruntime cannot load the model to verify
    it. Verification never blocks the main job: the model is written and the console says in one
    line that it was not verified and why. --require-verify restores the refusal: one message
    pointing at --no-verify; with that, the folded model is written."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")] + [
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in
        (("g", np.ones(4)), ("b", np.zeros(4)), ("mu", np.zeros(4)), ("var", np.ones(4)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("MyOp", ["bn"], ["y"], domain="com.example", name="custom")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    src = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]), src)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    proc = cli("apply", "bnfuse", src, "-o", out, "--report", report, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "not verified" in line]
    assert len(said) == 1 and "MyOp" in said[0], proc.stderr
    ver = json.loads(report.read_text())["passes"][0]["verification"]
    assert ver["verified"] is False and "MyOp" in ver["reason"]
    out.unlink()
    proc = cli("apply", "bnfuse", src, "-o", out, "--require-verify", cwd=tmp_path)
    assert_one_clear_error(proc, "cannot be verified", "--no-verify")
    assert not out.exists()
    proc = cli("apply", "bnfuse", src, "-o", out, "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "MyOp"]
