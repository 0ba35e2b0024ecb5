"""Builders of the test models for the ``lite`` pass, written with onnx.helper (no torch needed).

They reproduce the encodings real exporters write (research note "real models in the wild"
sections 2-3, and what torch 2.13's TorchScript exporter writes for ``torch_mobilenetv3_onnx`` below):

* HardSwish three ways: native ``HardSwish`` (opset >= 14), ``Mul(x, HardSigmoid(x))`` (what
  ``x * F.hardsigmoid(x)`` and, at opset 13, ``nn.Hardswish`` export to), and
  ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` (``x * F.relu6(x + 3) / 6``);
* SE: ``GlobalAveragePool -> Conv1x1 -> Relu -> Conv1x1 -> HardSigmoid -> Mul(x, gate)``
  (or ReduceMean / Gemm with Flatten+Reshape);
* ReLU6 as ``Clip`` with constant min/max inputs (opset >= 11) or attributes (opset < 11);
* GELU as ``Div(sqrt2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)``, native ``Gelu`` (opset 20), or the
  tanh approximation;
* scalar constants as ``Constant`` nodes, weights as initializers, like torch.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def init(self, value, base: str = "w") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def const(self, value, dtype=np.float32) -> str:
        """A scalar (or small) constant as a Constant node, as torch exports them."""
        n = self.name("c")
        self.nodes.append(helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.asarray(value, dtype=dtype), n + "_v")))
        return n

    def op(self, op: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, pad=None, bias: bool = True) -> str:
        w = self.init((self.rng.standard_normal((cout, cin // group, k, k)) * (1.5 / math.sqrt(cin // group * k * k))).astype(np.float32))
        ins = [x, w] + ([self.init((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")] if bias else [])
        p = k // 2 if pad is None else pad
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=group)

    # ---- activations in the exporters' encodings
    def clip(self, x: str, lo: float, hi: float, how: str = "inputs") -> str:
        if how == "attrs":
            return self.op("Clip", [x], min=float(lo), max=float(hi))
        if how == "minmax":
            return self.op("Min", [self.op("Max", [x, self.const(lo)]), self.const(hi)])
        return self.op("Clip", [x, self.const(lo), self.const(hi)])

    def relu6(self, x: str, how: str = "inputs") -> str:
        return self.clip(x, 0.0, 6.0, how)

    def hardswish_native(self, x: str) -> str:
        return self.op("HardSwish", [x])

    def hardswish_hsig(self, x: str, order: str = "xg") -> str:
        g = self.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)
        return self.op("Mul", [x, g] if order == "xg" else [g, x])

    def hardswish_decomposed(self, x: str, order: str = "mul_then_div", clip: str = "inputs", add_order: str = "x3") -> str:
        three = self.const(3.0)
        a = self.op("Add", [x, three] if add_order == "x3" else [three, x])
        c = self.relu6(a, clip)
        if order == "mul_then_div":  # x * relu6(x + 3) / 6 (torch)
            return self.op("Div", [self.op("Mul", [x, c]), self.const(6.0)])
        if order == "div_then_mul":  # x * (relu6(x + 3) / 6)
            return self.op("Mul", [self.op("Div", [c, self.const(6.0)]), x])
        if order == "mul_sixth":  # x * relu6(x + 3) * (1/6)
            return self.op("Mul", [self.const(1.0 / 6), self.op("Mul", [c, x])])
        raise ValueError(order)

    def silu(self, x: str, order: str = "xs") -> str:
        s = self.op("Sigmoid", [x])
        return self.op("Mul", [x, s] if order == "xs" else [s, x])

    def gelu(self, x: str, how: str = "erf") -> str:
        if how == "native":
            return self.op("Gelu", [x])
        if how == "erf":  # torch: Div -> Erf -> Add -> Mul(x) -> Mul(0.5)
            e = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))])])
            a = self.op("Add", [e, self.const(1.0)])
            return self.op("Mul", [self.op("Mul", [x, a]), self.const(0.5)])
        if how == "erf_half_first":  # x * 0.5 * (1 + erf(x * 1/sqrt2))
            h = self.op("Mul", [x, self.const(0.5)])
            e = self.op("Erf", [self.op("Mul", [x, self.const(1 / math.sqrt(2.0))])])
            return self.op("Mul", [h, self.op("Add", [self.const(1.0), e])])
        if how == "tanh":  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
            cube = self.op("Pow", [x, self.const(3.0)])
            inner = self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715)])])
            t = self.op("Tanh", [self.op("Mul", [inner, self.const(math.sqrt(2 / math.pi))])])
            a = self.op("Add", [t, self.const(1.0)])
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5)]), a])
        raise ValueError(how)

    def se(self, x: str, c: int, gate: str = "hardsigmoid", fc: str = "conv", pool: str = "gap") -> str:
        r = max(1, c // 4)
        if pool == "gap":
            p = self.op("GlobalAveragePool", [x])
        elif self.opset >= 18:
            p = self.op("ReduceMean", [x, self.init(np.array([2, 3], np.int64), "axes")], keepdims=1)
        else:
            p = self.op("ReduceMean", [x], axes=[2, 3], keepdims=1)
        if fc == "conv":
            h = self.op("Relu", [self.conv(p, c, r, k=1)])
            s = self.conv(h, r, c, k=1)
        else:
            f = self.op("Flatten", [p], axis=1)
            w1 = (self.rng.standard_normal((r, c)) * 0.3).astype(np.float32)
            w2 = (self.rng.standard_normal((c, r)) * 0.3).astype(np.float32)
            if fc == "gemm":
                h = self.op("Relu", [self.op("Gemm", [f, self.init(w1), self.init(np.zeros(r, np.float32), "b")], transB=1)])
                s = self.op("Gemm", [h, self.init(w2), self.init(np.zeros(c, np.float32), "b")], transB=1)
            else:
                h = self.op("Relu", [self.op("MatMul", [f, self.init(np.ascontiguousarray(w1.T))])])
                s = self.op("Add", [self.op("MatMul", [h, self.init(np.ascontiguousarray(w2.T))]), self.init(np.zeros(c, np.float32), "b")])
            s = self.op("Reshape", [s, self.init(np.array([-1, c, 1, 1], np.int64), "shape")])
        if gate == "hardsigmoid":
            g = self.op("HardSigmoid", [s], alpha=1.0 / 6, beta=0.5)
        elif gate == "sigmoid":
            g = self.op("Sigmoid", [s])
        else:  # decomposed hard sigmoid
            g = self.op("Div", [self.relu6(self.op("Add", [s, self.const(3.0)])), self.const(6.0)])
        return self.op("Mul", [x, g])

    def model(self, inputs, outputs, ir_version: int = 8) -> onnx.ModelProto:
        def vi(spec):
            name, shape = spec
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

        graph = helper.make_graph(self.nodes, "lite_test", [vi(i) for i in inputs], [vi(o) for o in outputs], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = ir_version
        onnx.checker.check_model(m, full_check=True)
        return m


def mobilenetv3_like(opset: int = 17, gelu: str = "erf", clip: str = "inputs", se_fc: str = "conv",
                     se_pool: str = "gap", se_gate: str = "hardsigmoid", seed: int = 0) -> onnx.ModelProto:
    """A small MobileNetV3-style network, as ``tools/bench_lite.py``'s torch model exports.

    stem Conv -> HardSwish (native at opset >= 14, x*HardSigmoid(x) below); dw Conv ->
    x*HardSigmoid(x); pw Conv -> x*relu6(x+3)/6; SE(HardSigmoid); Conv -> ReLU6; Conv -> GELU;
    Conv. Input ``input [1,3,32,32]``, output ``output``.
    """
    b = GraphBuilder(opset, seed)
    if opset < 11:
        clip = "attrs"
    x = b.conv("input", 3, 16, 3, stride=2)
    x = b.hardswish_native(x) if opset >= 14 else b.hardswish_hsig(x)
    x = b.hardswish_hsig(b.conv(x, 16, 16, 3, group=16))
    x = b.hardswish_decomposed(b.conv(x, 16, 16, 1), clip=clip)
    x = b.se(x, 16, gate=se_gate, fc=se_fc, pool=se_pool)
    x = b.relu6(b.conv(x, 16, 24, 1), clip)
    g = "native" if gelu == "native" and opset >= 20 else ("erf" if gelu == "native" else gelu)
    x = b.gelu(b.conv(x, 24, 24, 3), g)
    b.nodes.append(helper.make_node("Conv", [x, b.init((b.rng.standard_normal((32, 24, 1, 1)) * 0.2).astype(np.float32))],
                                    ["output"], name="head", kernel_shape=[1, 1]))
    return b.model([("input", [1, 3, 32, 32])], [("output", [1, 32, 16, 16])])


def focus(b: GraphBuilder, x: str, fused_slices: bool = False, order=((0, 0), (1, 0), (0, 1), (1, 1))) -> str:
    """YOLOv5/YOLOX Focus: x[..., dr::2, dc::2] for four offsets, concatenated on channels.

    As exported by torch (yolox_nano): each branch is two Slices (rows, then columns) with
    starts/ends/axes/steps as initializers; ``fused_slices`` writes one Slice over both axes.
    """
    big = np.array([2**63 - 1], np.int64)
    outs = []
    for dr, dc in order:
        if fused_slices:
            outs.append(b.op("Slice", [x, b.init(np.array([dr, dc], np.int64), "st"), b.init(np.array([2**63 - 1] * 2, np.int64), "en"),
                                       b.init(np.array([2, 3], np.int64), "ax"), b.init(np.array([2, 2], np.int64), "sp")]))
        else:
            r = b.op("Slice", [x, b.init(np.array([dr], np.int64), "st"), b.init(big, "en"), b.init(np.array([2], np.int64), "ax"),
                               b.init(np.array([2], np.int64), "sp")])
            outs.append(b.op("Slice", [r, b.init(np.array([dc], np.int64), "st"), b.init(big, "en"), b.init(np.array([3], np.int64), "ax"),
                                       b.init(np.array([2], np.int64), "sp")]))
    return b.op("Concat", outs, axis=1)


def yolox_like(opset: int = 11, seed: int = 0, fused_slices: bool = False, size: int = 32) -> onnx.ModelProto:
    """A miniature YOLOX: Focus stem, SiLU convs, SPP (MaxPool 5/9/13 + Concat), and a head whose
    objectness/class Sigmoids feed a Concat (they are not SiLU and must stay)."""
    b = GraphBuilder(opset, seed)
    x = focus(b, "input", fused_slices)
    x = b.silu(b.conv(x, 12, 16, 3))
    x = b.silu(b.conv(x, 16, 16, 3, stride=2))
    pools = [b.op("MaxPool", [x], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1]) for k in (5, 9, 13)]
    x = b.silu(b.conv(b.op("Concat", [x] + pools, axis=1), 64, 16, 1), order="sx")
    reg = b.conv(x, 16, 4, 1)
    obj = b.op("Sigmoid", [b.conv(x, 16, 1, 1)])
    cls = b.op("Sigmoid", [b.conv(x, 16, 3, 1)])
    b.nodes.append(helper.make_node("Concat", [reg, obj, cls], ["output"], axis=1, name="head_concat"))
    s = size // 4
    return b.model([("input", [1, 3, size, size])], [("output", [1, 8, s, s])])


def torch_mobilenetv3_onnx(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """The same MobileNetV3-style network built in torch and exported with the TorchScript
    exporter (``dynamo=False``). Needs torch (``pip install torch==2.13.0``); tests skip without it."""
    import io
    import warnings

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SE(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)
            self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.hs = nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish()
            self.c2, self.c3 = nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 16, 1)
            self.se = SE(16)
            self.c4, self.r6 = nn.Conv2d(16, 24, 1), nn.ReLU6()
            self.c5, self.gelu = nn.Conv2d(24, 24, 3, 1, 1), nn.GELU()
            self.c6 = nn.Conv2d(24, 32, 1)

        def forward(self, x):
            x = self.hs(self.c1(x))            # nn.Hardswish
            x = self.c2(x)
            x = x * F.hardsigmoid(x)           # explicit x * hardsigmoid(x)
            x = self.c3(x)
            x = x * F.relu6(x + 3) / 6         # explicit x * relu6(x + 3) / 6
            x = self.se(x)                     # SE with Hardsigmoid
            x = self.r6(self.c4(x))            # ReLU6
            x = self.gelu(self.c5(x))          # GELU
            return self.c6(x)

    torch.manual_seed(seed)
    net = Net().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 32, 32), buf, opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buf.getvalue())
