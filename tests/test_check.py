"""`onnxopt check`: the rule checker catches hand-made violations and passes qdq outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, rand
from onnxopt.cli import main
from onnxopt.quant.check import check_model


def qdq_conv(zp_dtype=np.int8, zp_value=0, w_axis=0, scale=0.02, w_scale=None, act_scale_dq=None, bias="float",
             opset=17, batch=1, kernel=3, stride=1, group=1, cin=4):
    """x -> Q -> DQ -> Conv(DQ(w_q)) -> y, parametrized to break one rule at a time."""
    cout = 4
    w = rand(cout, cin // group, kernel, kernel, seed=1)
    ws = np.full(w.shape[w_axis], 0.01, np.float32) if w_scale is None else np.asarray(w_scale, np.float32)
    wq = np.clip(np.rint(w / 0.01), -127, 127).astype(np.int8)
    inits = [("s", np.asarray(scale, np.float32)), ("zp", np.asarray(zp_value, zp_dtype)),
             ("s_dq", np.asarray(act_scale_dq if act_scale_dq is not None else scale, np.float32)),
             ("wq", wq), ("ws", ws), ("wz", np.zeros(ws.shape, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s_dq", "zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq", axis=w_axis)]
    conv_in = ["xd", "wd"]
    if bias == "float":
        inits.append(("b", rand(cout, seed=2)))
        conv_in.append("b")
    elif bias == "int32":
        inits += [("bq", np.arange(cout, dtype=np.int32)), ("bs", np.asarray(ws * scale, np.float32)),
                  ("bz", np.zeros(cout, np.int32))]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], name="bdq", axis=0))
        conv_in.append("bd")
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name="conv", pads=[1, 1, 1, 1], strides=[stride, stride], group=group))
    size = 8
    out = (size + 2 - kernel) // stride + 1
    return make_model(nodes, [("x", [batch, cin, size, size])], [("y", [batch, cout, out, out])], inits, opset=opset)


def rules(model, target):
    return {v.rule for v in check_model(model, target)}


def test_clean_symmetric_model_passes_tensorrt():
    assert check_model(qdq_conv(), "tensorrt") == []


def test_tensorrt_rejects_nonzero_and_uint8_zero_points():
    assert "zero-point-zero" in rules(qdq_conv(zp_value=3), "tensorrt")
    assert "trt-uint8" in rules(qdq_conv(zp_dtype=np.uint8, zp_value=0), "tensorrt")
    assert "trt-int32" in rules(qdq_conv(bias="int32"), "tensorrt")


def test_wrong_per_channel_axis_is_caught():
    m = qdq_conv(w_axis=1, w_scale=np.full(4, 0.01))      # axis 1 of a Conv weight: input channels
    assert "per-channel-axis" in rules(m, "tensorrt")


def test_scale_rules():
    assert "scale-positive" in rules(qdq_conv(scale=0.0), "ort")
    assert "scale-positive" in rules(qdq_conv(scale=float("nan")), "ort")
    assert "mismatched-pair" in rules(qdq_conv(act_scale_dq=0.03), "ort")
    # a scale computed at run time
    m = qdq_conv()
    m.graph.node.insert(0, helper.make_node("Identity", ["s_src"], ["s_dyn"], name="ident"))
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(0.02, np.float32), "s_src"))
    m.graph.node[1].input[1] = "s_dyn"
    assert "constant-scale" in rules(m, "tensorrt")


def test_q_without_dq_is_caught():
    m = qdq_conv()
    m.graph.node.append(helper.make_node("Cast", ["xq"], ["xc"], name="cast", to=TensorProto.FLOAT))
    m.graph.output.append(helper.make_tensor_value_info("xc", TensorProto.FLOAT, [1, 4, 8, 8]))
    assert "q-without-dq" in rules(m, "tensorrt")


def test_ort_and_tidl_need_int32_bias_with_product_scale():
    assert "int32-bias" in rules(qdq_conv(zp_dtype=np.uint8, zp_value=128), "ort")
    assert check_model(qdq_conv(zp_dtype=np.uint8, zp_value=128, bias="int32"), "ort") == []
    assert check_model(qdq_conv(zp_dtype=np.uint8, zp_value=128, bias="int32"), "tidl") == []
    m = qdq_conv(zp_dtype=np.uint8, zp_value=128, bias="int32")
    for t in m.graph.initializer:
        if t.name == "bs":
            t.CopyFrom(numpy_helper.from_array(np.full(4, 1e-3, np.float32), "bs"))
    assert "bias-scale" in rules(m, "tidl")


def test_tidl_specific_rules():
    assert "tidl-activation-type" in rules(qdq_conv(bias="int32"), "tidl")      # int8 activations
    assert "static-shapes" in rules(qdq_conv(zp_dtype=np.uint8, bias="int32", batch="N"), "tidl")
    assert "opset" in rules(qdq_conv(zp_dtype=np.uint8, bias="int32", opset=19), "tidl")
    dw = qdq_conv(zp_dtype=np.uint8, bias="int32", kernel=5, stride=1, group=4)
    found = check_model(dw, "tidl")
    assert [v.rule for v in found] == ["tidl-depthwise"] and found[0].kind == "op-support"
    assert check_model(qdq_conv(zp_dtype=np.uint8, bias="int32", kernel=5, stride=2, group=4), "tidl") == []
    pool = make_model([helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[5, 5], pads=[2, 2, 2, 2])],
                      [("x", [1, 2, 8, 8])], [("y", [1, 2, 8, 8])])
    assert rules(pool, "tidl") == {"tidl-pool"}
    gemm = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="g", alpha=2.0)], [("x", [1, 3])], [("y", [1, 2])],
                      [("w", rand(3, 2))])
    assert "tidl-gemm" in rules(gemm, "tidl")


def test_tda4vm_power_of_two_and_per_tensor():
    found = rules(qdq_conv(zp_dtype=np.uint8, bias="int32"), "tidl-tda4vm")
    assert "tda4vm-power-of-two" in found and "tda4vm-per-tensor" in found
    m = qdq_conv(zp_dtype=np.uint8, scale=2.0 ** -6, w_scale=[0.01], bias=None)
    assert "tda4vm-per-tensor" not in rules(m, "tidl-tda4vm")


def test_cli_check_exit_codes_and_json(tmp_path, capsys):
    import onnx
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(qdq_conv(), good)
    onnx.save(qdq_conv(zp_value=5), bad)
    with pytest.raises(SystemExit) as e:
        main(["check", str(good), "--target", "tensorrt"])
    assert e.value.code == 0
    assert "clean for tensorrt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["check", str(bad), "--target", "tensorrt", "--json"])
    assert e.value.code == 3
    report = json.loads(capsys.readouterr().out)
    assert not report["clean"] and any(v["rule"] == "zero-point-zero" for v in report["violations"])


def test_cli_check_says_what_fixes_which_violations(tmp_path, capsys):
    """A float model has no Q/DQ to check (said, so 'clean' is not read as 'quantized'); the hint
    points format violations at qdq and op-support ones at graph changes."""
    import onnx
    bad, plain = tmp_path / "bad.onnx", tmp_path / "plain.onnx"
    onnx.save(qdq_conv(zp_value=5), bad)
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])]), plain)
    with pytest.raises(SystemExit) as e:
        main(["check", str(plain), "--target", "tensorrt"])
    assert e.value.code == 0 and "a float model: there is no Q/DQ encoding to check" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["check", str(bad), "--target", "tensorrt"])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "writes a compliant Q/DQ encoding" in err and "op-support" not in err
    dyn = tmp_path / "dyn.onnx"
    onnx.save(make_model([helper.make_node("Dropout", ["x"], ["y"], name="d")], [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 4, 4])]), dyn)
    with pytest.raises(SystemExit) as e:
        main(["check", str(dyn), "--target", "tidl", "--strict"])
    assert e.value.code == 3 and "op-support rules need graph changes" in capsys.readouterr().err


def test_cli_check_ops_tidl_runs_on_arm_are_one_warning_not_a_failure(tmp_path, capsys):
    """In TIDL's OSRT flow an op TIDL lacks runs on ARM through ONNX Runtime: the check passes with
    one warning line counting those nodes by type; --strict fails on them; an encoding violation
    (here a dynamic input) fails either way."""
    import onnx
    ops = [helper.make_node("Dropout", ["x"], ["d"], name="drop"), helper.make_node("Identity", ["d"], ["i"], name="id"),
           helper.make_node("Dropout", ["i"], ["y"], name="drop2")]
    arm = tmp_path / "arm.onnx"
    onnx.save(make_model(ops, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])]), arm)
    with pytest.raises(SystemExit) as e:
        main(["check", str(arm), "--target", "tidl"])
    out = capsys.readouterr()
    assert e.value.code == 0 and "clean for tidl (3 node(s) on ARM through ONNX Runtime)" in out.out
    assert [line for line in out.err.splitlines() if "WARNING" in line] == [
        "WARNING: 3 node(s) run on ARM through ONNX Runtime, not on the accelerator: Dropout x2, Identity x1 "
        "(--json lists them; --strict fails on them)"]
    with pytest.raises(SystemExit) as e:
        main(["check", str(arm), "--target", "tidl", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and report["clean"] and report["violations"] == []
    assert report["fallback"]["nodes"] == 3 and report["fallback"]["op_types"] == {"Dropout": 2, "Identity": 1}
    assert {v["node"] for v in report["fallback"]["list"]} == {"drop", "id", "drop2"}
    with pytest.raises(SystemExit) as e:
        main(["check", str(arm), "--target", "tidl", "--strict"])
    assert e.value.code == 3 and "3 violation(s) for tidl" in capsys.readouterr().out
    dyn = tmp_path / "dyn.onnx"
    onnx.save(make_model(ops[:1], [("x", ["N", 3, 4, 4])], [("d", ["N", 3, 4, 4])]), dyn)
    with pytest.raises(SystemExit) as e:
        main(["check", str(dyn), "--target", "tidl"])
    out = capsys.readouterr()
    assert e.value.code == 3 and "[static-shapes]" in out.out and "Dropout x1" in out.err


def test_cli_trt_build_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed; the missing-dependency message is not reachable")
    except ImportError:
        pass
    import onnx
    p = tmp_path / "m.onnx"
    onnx.save(qdq_conv(), p)
    with pytest.raises(SystemExit) as e:
        main(["trt-build", str(p), "-o", str(tmp_path / "m.engine")])
    assert e.value.code == 1
    assert "tensorrt" in capsys.readouterr().err
