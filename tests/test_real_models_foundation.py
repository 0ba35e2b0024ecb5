"""Issue 2 figures on the real shared models (opt-in: skipped when ../shared is absent).

Everything goes through ``onnxopt.apply(path, "cleanup,bnfuse")`` so the pass manager's own
checker run and onnxruntime verification of each exact pass happen too; the test then compares
the original and optimized models on real data.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import shared_path
from helpers import op_count

import onnxopt
from onnxopt import runtime
from onnxopt.data import open_data

pytestmark = pytest.mark.shared

CIFAR_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def _logits(model, x, batch):
    sess = runtime.session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _verified(report):
    for rec in report.passes:
        assert rec.verification is not None and rec.verification["passed"], rec.name


def test_efficientnet_lite0_bn_no_bn_no_pad_logits_match():
    path = shared_path("models", "efficientnet_lite0_bn.onnx")
    images = shared_path("data", "imagenet")
    before = onnxopt.load_model(path)
    assert op_count(before, "BatchNormalization") == 49 and op_count(before, "Pad") == 17
    after, report = onnxopt.apply(path, "cleanup,bnfuse")
    _verified(report)
    assert op_count(after, "BatchNormalization") == 0
    assert op_count(after, "Pad") == 0
    assert not any(n.op_type in ("Shape", "ConstantOfShape", "Constant") for n in after.graph.node)
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    src = open_data(images, before, image={"size": 256, "crop": 224, "mean": [127.0] * 3, "std": [128.0] * 3}, max_samples=6)
    x = np.concatenate([next(iter(f.values())) for f in src.samples()])
    ref, new = _logits(before, x, 1), _logits(after, x, 1)
    assert np.max(np.abs(ref.astype(np.float64) - new)) <= 1e-3
    assert np.array_equal(ref.argmax(1), new.argmax(1))


@pytest.mark.parametrize("name,bn", [("resnet20_cifar10", 19), ("resnet56_cifar10", 55)])
def test_cifar_resnet_no_bn_top1_unchanged_any_batch(name, bn):
    path = shared_path("models", f"{name}.onnx")
    with np.load(shared_path("data", "cifar10_test_1017.npz")) as z:
        x, y = z["x"][:128], z["y"][:128]
    x = (((x.astype(np.float32) / 255.0) - CIFAR_MEAN) / CIFAR_STD).astype(np.float32)
    before = onnxopt.load_model(path)
    assert op_count(before, "BatchNormalization") == bn
    after, report = onnxopt.apply(path, "cleanup,bnfuse")
    _verified(report)
    assert op_count(after, "BatchNormalization") == 0
    # the dynamic batch dimension survives, and the model runs at several batch sizes
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    ref, new = _logits(before, x, 64), _logits(after, x, 64)
    np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4)
    for batch in (7, 1):
        np.testing.assert_allclose(_logits(after, x[:14], batch), ref[:14], rtol=1e-4, atol=1e-4)
    assert np.array_equal(ref.argmax(1), new.argmax(1))
    assert np.mean(new.argmax(1) == y) == np.mean(ref.argmax(1) == y)


def test_cli_apply_cleanup_bnfuse_on_a_real_model(tmp_path):
    path = shared_path("models", "resnet20_cifar10.onnx")
    out, report = tmp_path / "r20.opt.onnx", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", "apply", "cleanup,bnfuse", str(path), "-o", str(out),
                           "--report", str(report), "--set", "bnfuse.standalone=conv", "--input-shape", "input:4x3x32x32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert op_count(model, "BatchNormalization") == 0
    rec = json.loads(report.read_text())
    assert [p["pass"] for p in rec["passes"]] == ["cleanup", "bnfuse"]
    assert all(p["verification"]["passed"] for p in rec["passes"])
    assert rec["passes"][1]["changes"]["bn_folded_into_conv"] == 19
    history = json.loads(next(p.value for p in model.metadata_props if p.key == "onnxopt.passes"))
    assert [h["pass"] for h in history] == ["cleanup", "bnfuse"]
