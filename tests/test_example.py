"""The README's example, end to end: build the digits CNN, optimize it, compare it.

This is executable documentation: it runs the same commands the README's first command runs
(tools/make_example.py, then `onnxopt apply` and `onnxopt compare`) and checks the artifacts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import op_count, run

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")
sys.path.insert(0, str(ROOT / "tools"))

import make_example  # noqa: E402


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    info = make_example.build(out)   # as the README's first command builds it
    return info


def _onnxopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_example_model_is_real(example):
    model = onnx.load(example["model"])
    onnx.checker.check_model(model, full_check=True)
    assert op_count(model, "BatchNormalization") == 2  # exported unfused on purpose
    data = np.load(example["data"])
    logits = run(model, {"input": data["input"]})["logits"]
    acc = float((logits.argmax(1) == data["labels"]).mean())
    assert acc == pytest.approx(example["accuracy"], abs=1e-9)
    assert acc > 0.85, "the example CNN should actually have learned the digits"


def test_example_cleanup_bnfuse_and_compare(example, tmp_path):
    out, report = tmp_path / "digits_opt.onnx", tmp_path / "report.json"
    r = _onnxopt("apply", "cleanup,bnfuse", example["model"], "-o", out, "--data", example["data"], "--report", report)
    assert r.returncode == 0, r.stderr
    model = onnx.load(out)
    assert op_count(model, "BatchNormalization") == 0
    assert op_count(model, "Dropout") == 0 and op_count(model, "Identity") == 0
    rep = json.loads(report.read_text())
    assert [p["pass"] for p in rep["passes"]] == ["cleanup", "bnfuse"]
    assert all(p["verification"] is None or p["verification"]["passed"] for p in rep["passes"])


def test_readme_first_command(example, tmp_path):
    """The README's first command, minus the install: the main job on the example, then compare and check."""
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "tools/make_example.py" in l and "onnxopt apply" in l)
    steps = [s.strip() for s in line.split("&&") if s.strip().startswith("onnxopt ")]
    assert [s.split()[1] for s in steps] == ["apply", "compare", "check"]
    build = Path(example["model"]).parent
    for step in steps:
        args = step.replace("examples/build", str(build)).split()[1:]
        r = _onnxopt(*args)
        assert r.returncode == 0, f"{step}\n{r.stderr}"
    qmodel = onnx.load(build / "digits_int8.onnx")
    assert op_count(qmodel, "QuantizeLinear") > 0 and op_count(qmodel, "BatchNormalization") == 0
    assert op_count(qmodel, "Sigmoid") == 0  # lite turned the SiLU into ReLU
    r = _onnxopt("compare", example["model"], build / "digits_int8.onnx", "--data", example["data"], "--json", "--runs", "3")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    (out,) = result["outputs"]
    # an int8 model of a 97 % classifier: same answer on nearly every digit, accuracy within 2 points
    assert out["top1_agreement"] >= 0.95
    assert result["candidate"]["accuracy"] >= result["reference"]["accuracy"] - 0.02
    assert result["candidate"]["size_bytes"] < result["reference"]["size_bytes"]


def test_readme_python_api(tmp_path, monkeypatch):
    """The README's Python API block runs as written, on a small CNN saved as model.onnx with
    calib.npz and val.npz beside it."""
    from fixtures import models

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    model = models.tiny_cnn()
    onnx.save(model, tmp_path / "model.onnx")
    x = np.random.default_rng(0).standard_normal((16,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]))
    np.savez(tmp_path / "calib.npz", **{model.graph.input[0].name: x.astype(np.float32)})
    np.savez(tmp_path / "val.npz", **{model.graph.input[0].name: x[:8].astype(np.float32)})
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (Python API)", "exec"), {})
    assert (tmp_path / "model.opt.onnx").exists()


def _readme_section(title):
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_finetune_section(tmp_path, monkeypatch):
    """The README's finetune section as written: its torch export (the default exporter, which
    needs onnxscript), then each of its onnxopt commands in order."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    section = _readme_section("Finetuning a torch model")
    block = section.split("```python", 1)[1].split("```", 1)[0]
    commands = [l.strip() for l in section.splitlines() if l.startswith("    onnxopt ")]
    assert [c.split()[1] for c in commands] == ["apply", "finetune"]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (finetune export)", "exec"), {})
    for command in commands:
        r = _onnxopt(*command.split()[1:], cwd=tmp_path)
        assert r.returncode == 0, f"{command}\n{r.stderr}"
    out = onnx.load(tmp_path / commands[-1].split(" -o ")[1].split()[0])
    onnx.checker.check_model(out, full_check=True)
    params = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    assert params(onnx.load(tmp_path / "net.pruned.onnx")) < params(onnx.load(tmp_path / "net.onnx")), "prune removed no channel"
