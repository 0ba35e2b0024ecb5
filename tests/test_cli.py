"""The command line: help texts, `passes`, `info`, `compare` (incl. the gate exit code), `apply`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from fixtures import models
from fixtures.testpasses import SCALE_OPTIONS, scale_outputs, temporary_pass
from helpers import assert_equivalent, op_count
from onnxopt.cli import cli

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "fixtures" / "run_cli.py"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def subprocess_cli(*args, cwd, with_test_passes=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    head = [sys.executable, str(RUNNER)] if with_test_passes else [sys.executable, "-m", "onnxopt"]
    return subprocess.run(head + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def t_scale():
    with temporary_pass("t_scale", scale_outputs, exact=True, options=SCALE_OPTIONS):
        yield


# -------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command, words", [
    ([], ["onnxopt -- optimize an exported ONNX model", "apply", "compare", "info", "passes", "Examples:"]),
    (["apply"], ["PASSES", "--set", "--recipe", "--verify / --no-verify", "--report", "--save-steps", "--data", "--input-shape"]),
    (["passes"], ["List the passes", "--json"]),
    (["info"], ["--json", "--layers", "MACs"]),
    (["compare"], ["REF", "CAND", "--data", "--labels", "--runs", "--threads", "--max-size-mb", "--max-latency-ms",
                   "--min-agreement", "--max-drop", "--size", "--crop", "--mean", "--std", "--input-shape",
                   "--batch-size", "--max-samples", "Exit codes", "3 a gate failed"]),
])
def test_help_texts(command, words):
    res = invoke(*command, "--help")
    assert res.exit_code == 0
    for w in words:
        assert w in res.output, w


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and "onnxopt" in res.output


# ------------------------------------------------------------------------------------ passes
def test_passes_lists_options(t_scale):
    res = invoke("passes")
    assert res.exit_code == 0
    assert "t_scale  (exact) -- test pass" in res.output
    assert "t_scale.mode = 'mul' [mul|div]" in res.output
    assert "multiply the outputs by this" in res.output
    data = json.loads(invoke("passes", "--json").output)
    assert data["t_scale"]["exact"] is True
    assert data["t_scale"]["options"]["count"] == {"type": "int", "default": 1, "help": "how many Mul nodes to chain", "choices": None}


# -------------------------------------------------------------------------------------- info
def test_info_table_and_json(tmp_path):
    path = models.save(models.tiny_cnn(), tmp_path / "m.onnx")
    res = invoke("info", path)
    assert res.exit_code == 0
    out = res.output
    for words in ("input   float32  [N, 3, 8, 8]", "logits  float32  [N, 5]", "opset ai.onnx 17",
                  f"({models.TINY_CNN_PARAMS:,})", f"({models.TINY_CNN_MACS:,}) per sample", "BatchNormalization 1"):
        assert words in out, words
    assert "layer" not in out
    res = invoke("info", path, "--layers")
    assert "conv" in res.output and "Conv" in res.output and "99.7%" in res.output
    data = json.loads(invoke("info", path, "--json", "--layers").output)
    assert data["macs"] == models.TINY_CNN_MACS and len(data["layers"]) == 2


# ----------------------------------------------------------------------------------- compare
def test_compare_table(tmp_path):
    ref = models.save(models.tiny_cnn(), tmp_path / "ref.onnx")
    cand = models.save(models.tiny_cnn(noise=0.01), tmp_path / "cand.onnx")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32),
             labels=np.array([0, 1, 2, 3, 4, 0]))
    res = invoke("compare", ref, cand, "--data", tmp_path / "d.npz", "--runs", "3", "--batch-size", "4")
    assert res.exit_code == 0
    for words in ("reference", "candidate", "6 samples, with labels", "latency ms (median of 3, 1 thr)", "top-1 accuracy",
                  "max|err|", "cosine", "SQNR dB", "top-1 agree", "logits"):
        assert words in res.output, words


def test_compare_generated_inputs_note(tmp_path):
    ref = models.save(models.tiny_cnn(), tmp_path / "ref.onnx")
    res = invoke("compare", ref, ref, "--runs", "0", "--max-samples", "3")
    assert "3 GENERATED inputs" in res.output and "note: no data given" in res.output


def test_compare_json(tmp_path):
    ref = models.save(models.tiny_cnn(), tmp_path / "ref.onnx")
    res = invoke("compare", ref, ref, "--runs", "2", "--json", "--threads", "2")
    data = json.loads(res.output, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["outputs"][0]["max_abs"] == 0 and data["candidate"]["latency"]["threads"] == 2
    assert data["outputs"][0]["sqnr_db"] == "inf"  # identical outputs, spelled as standard JSON
    assert data["passed"] is True


def test_compare_gate_failure_exit_code_3(tmp_path):
    """Run the real entry point: the table is printed, then one error listing every failed gate, exit 3."""
    ref = models.save(models.tiny_cnn(), tmp_path / "ref.onnx")
    cand = models.save(models.tiny_cnn(noise=0.5), tmp_path / "cand.onnx")
    proc = subprocess_cli("compare", ref, cand, "--runs", "2", "--max-samples", "16", "--max-size-mb", "0.0001",
                          "--min-agreement", "100", "--max-latency-ms", "1000", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "FAIL  candidate size" in proc.stdout and "FAIL  top-1 agreement" in proc.stdout and "PASS  candidate median latency" in proc.stdout
    assert proc.stderr.count("error:") == 1 and "2 acceptance gate(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "max_size_mb" in proc.stderr and "min_agreement" in proc.stderr
    # --json keeps stdout parseable and still exits 3
    proc = subprocess_cli("compare", ref, cand, "--runs", "0", "--max-size-mb", "0.0001", "--json", cwd=tmp_path)
    assert proc.returncode == 3 and json.loads(proc.stdout)["passed"] is False
    # all gates met: exit 0
    proc = subprocess_cli("compare", ref, ref, "--runs", "0", "--min-agreement", "100", "--max-size-mb", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_compare_image_folder_options(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 12), (40 * i, 80, 120)).save(folder / f"{i}.png")
    (folder / "labels.json").write_text(json.dumps({"0.png": 0, "1.png": 1, "2.png": 2}))
    ref = models.save(models.tiny_cnn(), tmp_path / "ref.onnx")
    res = invoke("compare", ref, ref, "--data", folder, "--size", "10", "--crop", "8", "--mean", "127", "--std", "128",
                 "--runs", "0", "--json", "--max-drop", "0")
    data = json.loads(res.output)
    assert data["data"]["samples"] == 3 and data["data"]["labels"] and data["passed"]


# ------------------------------------------------------------------------------------- apply
def test_apply_with_recipe_set_override_report_and_steps(tmp_path):
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    (tmp_path / "recipe.json").write_text(json.dumps({"passes": ["t_scale"], "options": {"t_scale": {"count": 3, "mode": "div"}}}))
    out = tmp_path / "out.onnx"
    proc = subprocess_cli("apply", "--recipe", tmp_path / "recipe.json", src, "-o", out, "--set", "t_scale.count=2",
                          "--report", tmp_path / "report.json", "--save-steps", tmp_path / "steps", cwd=tmp_path, with_test_passes=True)
    assert proc.returncode == 0, proc.stderr
    assert "t_scale" in proc.stdout and "verified max|err|=0.00e+00" in proc.stdout and f"wrote {out}" in proc.stdout
    result = onnx.load(str(out))
    assert op_count(result, "Div") == 2 and op_count(result, "Mul") == 0  # --set beat the recipe's count, kept its mode
    assert_equivalent(models.tiny_cnn(), result)
    history = json.loads({p.key: p.value for p in result.metadata_props}["onnxopt.passes"])
    assert history == [{"pass": "t_scale", "options": {"factor": 1.0, "mode": "div", "count": 2, "enabled": True}}]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == str(src) and report["passes"][0]["changes"] == {"outputs_scaled": 1}
    assert [p.name for p in (tmp_path / "steps").iterdir()] == ["01_t_scale.onnx"]


def test_apply_with_yaml_recipe_and_data(tmp_path):
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    (tmp_path / "r.yaml").write_text("passes:\n  - t_scale: {count: 2}\n")
    np.save(tmp_path / "x.npy", np.ones((3, 3, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    proc = subprocess_cli("apply", "--recipe", tmp_path / "r.yaml", src, "-o", out, "--data", tmp_path / "x.npy", "-q",
                          "--report", tmp_path / "r.json", cwd=tmp_path, with_test_passes=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and op_count(onnx.load(str(out)), "Mul") == 2
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["verification"]["inputs"] == "data"


def test_apply_without_model_or_passes(tmp_path):
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    proc = subprocess_cli("apply", src, "-o", tmp_path / "o.onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "no model given" in proc.stderr


def test_main_returns_click_exit_codes(tmp_path):
    """Regression: ctx.exit(n) inside a command used to end the process with 0."""
    import click

    from onnxopt.cli import main

    @cli.command("t-exit")
    def t_exit():
        click.get_current_context().exit(5)

    try:
        with pytest.raises(SystemExit) as err:
            main(["t-exit"])
        assert err.value.code == 5
        with pytest.raises(SystemExit) as err:
            main(["passes"])
        assert err.value.code == 0
    finally:
        cli.commands.pop("t-exit", None)


def test_unexpected_failure_is_reported_as_internal(tmp_path, capsys, monkeypatch):
    """A bug in onnxopt is said to be one (exit 70, no traceback); ONNXOPT_DEBUG=1 shows the traceback."""
    from onnxopt.cli import main

    def crashes(model, options, ctx):
        return {}["no such key"]

    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    monkeypatch.delenv("ONNXOPT_DEBUG", raising=False)
    with temporary_pass("t_crash", crashes, exact=True):
        with pytest.raises(SystemExit) as err:
            main(["apply", "t_crash", str(src), "-o", str(tmp_path / "out.onnx"), "-q"])
        assert err.value.code == 70
        stderr = capsys.readouterr().err
        assert stderr.startswith("internal error: KeyError: 'no such key'") and "bug in onnxopt" in stderr
        assert "ONNXOPT_DEBUG=1" in stderr and "Traceback" not in stderr
        monkeypatch.setenv("ONNXOPT_DEBUG", "1")
        with pytest.raises(KeyError):
            main(["apply", "t_crash", str(src), "-o", str(tmp_path / "out.onnx"), "-q"])
    assert not (tmp_path / "out.onnx").exists()


def test_pass_output_onnxruntime_cannot_run_is_internal(tmp_path):
    """An exact pass whose output passes the checker but not onnxruntime is onnxopt's fault, not the user's."""
    from onnxopt import apply
    from onnxopt.errors import InternalError
    from onnxopt.registry import PassResult

    def unrunnable(model, options, ctx):
        model.graph.node[0].domain = "com.example"  # a custom domain onnxruntime has no kernel for
        model.opset_import.add(domain="com.example", version=1)
        return PassResult(model, changes={"broken": 1})

    with temporary_pass("t_unrunnable", unrunnable, exact=True):
        with pytest.raises(InternalError) as err:
            apply(models.tiny_cnn(), "t_unrunnable")
    assert err.value.message.startswith("internal error: onnxruntime cannot load the pass's output model")
    assert err.value.exit_code == 70 and "bug in onnxopt" in err.value.hint
    assert err.value.__cause__ is not None  # ONNXOPT_DEBUG=1 shows where it came from


def test_shortcut_flags_come_from_the_pass_options(tmp_path):
    """--target/--calib-*/--rules-module are generated from the options that declare them, and refused
    when no pass of the chain takes them."""
    from onnxopt.registry import shortcut_flags

    flags = {flag: [(name, opt.name) for name, opt in owners] for flag, owners in shortcut_flags().items()}
    assert flags["--target"] == [("qdq", "target")] and flags["--rules-module"] == [("lite", "rules_module")]
    assert flags["--calib-method"] == [("qdq", "calib_method")] and flags["--trt-calib-table"] == [("qdq", "trt_calib_table")]
    help_text = invoke("apply", "--help").output
    for flag in flags:
        assert flag in help_text
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    res = CliRunner().invoke(cli, ["apply", "cleanup", str(src), "-o", str(tmp_path / "o.onnx"), "--calib-method", "minmax",
                                   "--target", "ort"])
    assert res.exit_code != 0 and isinstance(res.exception, Exception)
    assert "--target, --calib-method given, but qdq is not in cleanup" in str(res.exception)
    res = CliRunner().invoke(cli, ["apply", "qdq", str(src), "-o", str(tmp_path / "o.onnx"), "--calib-workers", "two"])
    assert "bad value 'two' for option qdq.calib_workers: expected int" in str(res.exception)  # converted like --set
    assert not (tmp_path / "o.onnx").exists()
