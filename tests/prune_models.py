"""Small graphs with the channel couplings real detectors and classifiers have, built with
onnx.helper, for the prune/sparsify tests: residual Adds, Concat offsets, Split, depthwise and
grouped convs, the CIFAR ResNet "option A" shortcut (strided Slice + channel Pad whose amounts a
shape chain computes), GAP -> Flatten/Reshape -> Gemm, a YOLO-like net (Focus, CSP Concat/Split,
SPP, Resize, decoupled head, Reshape/Concat/Transpose output), a MobileNet-like net
(expand / depthwise / project with residuals, squeeze-excite, ReLU6 as Clip) and a CRNN (convs
into a GRU over the width, as OCR recognisers are).

Every builder returns a valid model (full checker) whose BN parameters are non-trivial, so
numerical checks see real arithmetic. ``const_nodes=True`` stores weights in Constant nodes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class B:
    def __init__(self, seed: int = 0, const_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.k = 0
        self.const_nodes = const_nodes

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value, dtype=np.float32, node: bool | None = None) -> str:
        n = self.name("c")
        arr = np.asarray(value, dtype=dtype)
        if (self.const_nodes if node is None else node) and arr.dtype == np.float32:
            self.nodes.append(helper.make_node("Constant", [], [n], value=numpy_helper.from_array(arr, n)))
        else:
            self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, stride=1, group=1, bias=True, name=None):
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)) * (1.5 / np.sqrt(cin // group * k * k)))
        ins = [x, w] + ([self.const(self.rng.standard_normal(cout) * 0.1)] if bias else [])
        out = self.name("conv_") if name is None else name
        self.nodes.append(helper.make_node("Conv", ins, [out], name=self.name("Conv"), kernel_shape=[k, k],
                                           pads=[k // 2] * 4, strides=[stride, stride], group=group))
        return out

    def bn(self, x, c):
        r = self.rng
        params = [self.const(1 + 0.2 * r.standard_normal(c)), self.const(0.1 * r.standard_normal(c)),
                  self.const(0.1 * r.standard_normal(c)), self.const(0.5 + r.random(c))]
        return self.node("BatchNormalization", [x] + params, epsilon=1e-5)

    def cbr(self, x, cin, cout, k=3, stride=1, group=1, act="relu"):
        y = self.bn(self.conv(x, cin, cout, k, stride, group, bias=False), cout)
        if act == "relu":
            return self.node("Relu", [y])
        if act == "silu":
            return self.node("Mul", [y, self.node("Sigmoid", [y])])
        if act == "relu6":
            return self.node("Clip", [y, self.const(0.0, node=False), self.const(6.0, node=False)])
        return y

    def gemm(self, x, cin, cout, out=None):
        w = self.const(self.rng.standard_normal((cout, cin)) * (1.0 / np.sqrt(cin)))
        b = self.const(self.rng.standard_normal(cout) * 0.1)
        o = out or self.name("gemm_")
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [o], name=self.name("Gemm"), transB=1))
        return o

    def model(self, inputs, outputs, opset=17) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "prune_test",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def residual(const_nodes: bool = False, batch="N") -> onnx.ModelProto:
    """stem -> 2 residual blocks (Add ties stem and both conv2) -> GAP -> Flatten -> Gemm."""
    b = B(1, const_nodes)
    x = b.cbr("input", 3, 8)
    for _ in range(2):
        y = b.cbr(x, 8, 6)
        y = b.cbr(y, 6, 8, act=None)
        x = b.node("Relu", [b.node("Add", [y, x])])
    f = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    b.gemm(f, 8, 5, out="logits")
    return b.model([("input", [batch, 3, 8, 8])], [("logits", [batch, 5])])


def concat_split() -> onnx.ModelProto:
    """Two convs (4 and 6 channels) -> Concat -> Split [3, 7] -> convs -> Add of equal widths."""
    b = B(2)
    a = b.cbr("input", 3, 4)
    c = b.cbr("input", 3, 6)
    cat = b.node("Concat", [a, c], axis=1)
    s1, s2 = b.node("Split", [cat, b.const([3, 7], np.int64)], n_out=2, axis=1)
    y1 = b.cbr(s1, 3, 5)
    y2 = b.cbr(s2, 7, 5)
    z = b.node("Add", [y1, y2])
    z = b.node("Mul", [z, b.const(np.linspace(0.5, 1.5, 5).reshape(5, 1, 1))])  # per-channel constant
    b.conv(z, 5, 4, name="out")
    return b.model([("input", [1, 3, 8, 8])], [("out", [1, 4, 8, 8])])


def depthwise(multiplier: int = 1) -> onnx.ModelProto:
    """1x1 expand -> depthwise 3x3 (channel multiplier) -> 1x1 project + residual."""
    b = B(3)
    x = b.cbr("input", 3, 8)
    e = b.cbr(x, 8, 12, k=1, act="relu6")
    d = b.cbr(e, 12, 12 * multiplier, k=3, group=12, act="relu6")
    p = b.cbr(d, 12 * multiplier, 8, k=1, act=None)
    y = b.node("Add", [p, x])
    b.conv(y, 8, 4, k=1, name="out")
    return b.model([("input", [1, 3, 8, 8])], [("out", [1, 4, 8, 8])])


def grouped() -> onnx.ModelProto:
    """A grouped conv (group 2, 4 input channels per group) between two dense convs."""
    b = B(4)
    x = b.cbr("input", 3, 8)
    y = b.cbr(x, 8, 6, group=2)
    b.conv(y, 6, 4, name="out")
    return b.model([("input", [1, 3, 8, 8])], [("out", [1, 4, 8, 8])])


def _pad_chain(b: B, pad_c: int) -> str:
    """The TorchScript export of F.pad(x, (0, 0, 0, 0, p, p)) as a shape chain (CIFAR ResNet)."""
    p6 = b.const(np.array([0, 0, 0, 0, pad_c, pad_c], np.int64), np.int64, node=True)
    zero = b.const(np.array([0], np.int64), np.int64, node=True)
    shape = b.node("Shape", [p6])
    n = b.node("Gather", [shape, zero], axis=0)
    eight = b.node("Mul", [b.const(np.array([4], np.int64), np.int64, node=True), b.const(np.array([2], np.int64), np.int64, node=True)])
    rest = b.node("ConstantOfShape", [b.node("Sub", [eight, n])], value=numpy_helper.from_array(np.array([0], np.int64)))
    cat = b.node("Concat", [b.node("Cast", [p6], to=TensorProto.INT64), rest], axis=0)
    r = b.node("Reshape", [cat, b.const(np.array([-1, 2], np.int64), np.int64, node=True)])
    r = b.node("Slice", [r, b.const([-1], np.int64, node=True), b.const([-(2 ** 62)], np.int64, node=True),
                         b.const([0], np.int64, node=True), b.const([-1], np.int64, node=True)])
    t = b.node("Transpose", [r], perm=[1, 0])
    return b.node("Reshape", [t, b.const([-1], np.int64, node=True)])


def option_a() -> onnx.ModelProto:
    """CIFAR ResNet stage change: x (8 ch) -> strided block (16 ch) + option-A shortcut
    (Slice ::2 on H and W, Pad 4 channels each side via a shape chain) -> Add -> GAP -> Gemm."""
    b = B(5)
    x = b.cbr("input", 3, 8)
    y = b.cbr(x, 8, 8)
    x = b.node("Relu", [b.node("Add", [b.cbr(y, 8, 8, act=None), x])])
    y = b.cbr(x, 8, 16, stride=2)
    y = b.cbr(y, 16, 16, act=None)
    s = b.node("Slice", [x, b.const([0], np.int64), b.const([2 ** 62], np.int64), b.const([2], np.int64), b.const([2], np.int64)])
    s = b.node("Slice", [s, b.const([0], np.int64), b.const([2 ** 62], np.int64), b.const([3], np.int64), b.const([2], np.int64)])
    sc = b.node("Pad", [s, _pad_chain(b, 4)], mode="constant")
    x = b.node("Relu", [b.node("Add", [y, sc])])
    y = b.cbr(x, 16, 16)
    x = b.node("Relu", [b.node("Add", [b.cbr(y, 16, 16, act=None), x])])
    f = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    b.gemm(f, 16, 10, out="logits")
    return b.model([("input", [1, 3, 8, 8])], [("logits", [1, 10])])


def flatten_gemm() -> onnx.ModelProto:
    """conv (6 ch, 2x2 map) -> Flatten (each channel feeds 4 Gemm columns) -> Gemm -> Relu ->
    Gemm; and a Reshape [N, C, 1, 1] -> [N, C] path for the SE-style MLP."""
    b = B(6)
    x = b.cbr("input", 3, 6, stride=2)
    f = b.node("Flatten", [x])
    h = b.node("Relu", [b.gemm(f, 24, 7)])
    g = b.node("GlobalAveragePool", [x])
    r = b.node("Reshape", [g, b.const([1, 6], np.int64)])
    h2 = b.node("Relu", [b.gemm(r, 6, 7)])
    b.gemm(b.node("Add", [h, h2]), 7, 3, out="out")
    return b.model([("input", [1, 3, 4, 4])], [("out", [1, 3])])


def reshape_mixing() -> onnx.ModelProto:
    """conv (6 ch, 4x4) -> Reshape [1, 4, 6, 4] (mixes channels with H) -> conv: unprunable.
    A second, independent branch stays prunable."""
    b = B(7)
    x = b.cbr("input", 3, 6)
    r = b.node("Reshape", [x, b.const([1, 4, 6, 4], np.int64)])
    b.conv(r, 4, 5, name="out")
    free = b.cbr("input", 3, 5)
    b.conv(free, 5, 2, name="out2")
    return b.model([("input", [1, 3, 4, 4])], [("out", [1, 5, 6, 4]), ("out2", [1, 2, 4, 4])])


def unknown_consumer() -> onnx.ModelProto:
    """conv (8 ch) -> DepthToSpace (not understood): conv's channels must stay."""
    b = B(8)
    x = b.cbr("input", 3, 8)
    b.node("DepthToSpace", [x], blocksize=2)
    b.nodes[-1].output[0] = "out"
    return b.model([("input", [1, 3, 4, 4])], [("out", [1, 2, 8, 8])])


def shared_weight() -> onnx.ModelProto:
    """Two convs read the same weight initializer from two different inputs."""
    b = B(9)
    x1 = b.cbr("input", 3, 6)
    x2 = b.cbr("input", 3, 6)
    w = b.const(b.rng.standard_normal((4, 6, 3, 3)) * 0.3)
    y1 = b.node("Conv", [x1, w], pads=[1, 1, 1, 1])
    y2 = b.node("Conv", [x2, w], pads=[1, 1, 1, 1])
    b.node("Add", [y1, y2])
    b.nodes[-1].output[0] = "out"
    return b.model([("input", [1, 3, 6, 6])], [("out", [1, 4, 6, 6])])


def yolo_like(const_nodes: bool = False) -> onnx.ModelProto:
    """Focus stem (4 strided Slices + Concat), CSP block (two branches, residual, Concat),
    SPP (MaxPool 5/9/13 + Concat), Split, nearest Resize x2 + Concat with the backbone, decoupled
    head (box/obj/cls Concat), Reshape [1, 85', HW] + Concat on axis 2 + Transpose output."""
    b = B(10, const_nodes)
    sl = []
    for h0, w0 in ((0, 0), (1, 0), (0, 1), (1, 1)):
        s = b.node("Slice", ["input", b.const([h0, w0], np.int64), b.const([2 ** 62, 2 ** 62], np.int64),
                             b.const([2, 3], np.int64), b.const([2, 2], np.int64)])
        sl.append(s)
    x = b.cbr(b.node("Concat", sl, axis=1), 12, 8, act="silu")
    p3 = b.cbr(x, 8, 16, stride=2, act="silu")                       # 8x8
    # CSP: two 1x1 branches, bottleneck with residual on the first, concat, fuse
    a = b.cbr(p3, 16, 8, k=1, act="silu")
    c = b.cbr(p3, 16, 8, k=1, act="silu")
    a = b.node("Add", [b.cbr(b.cbr(a, 8, 8, k=1, act="silu"), 8, 8, act="silu"), a])
    p3 = b.cbr(b.node("Concat", [a, c], axis=1), 16, 16, k=1, act="silu")
    p4 = b.cbr(p3, 16, 24, stride=2, act="silu")                     # 4x4
    s = b.cbr(p4, 24, 12, k=1, act="silu")
    pools = [b.node("MaxPool", [s], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1]) for k in (5, 9, 13)]
    p4 = b.cbr(b.node("Concat", [s] + pools, axis=1), 48, 24, k=1, act="silu")
    h1, h2 = b.node("Split", [p4, b.const([8, 16], np.int64)], n_out=2, axis=1)
    p4 = b.node("Concat", [b.cbr(h1, 8, 8, k=1, act="silu"), h2], axis=1)
    up = b.node("Resize", [p4, "", b.const([1, 1, 2, 2])], mode="nearest")
    p3 = b.cbr(b.node("Concat", [up, p3], axis=1), 40, 16, k=1, act="silu")
    outs = []
    for feat, c_in, hw in ((p3, 16, 64), (p4, 24, 16)):
        stem = b.cbr(feat, c_in, 8, k=1, act="silu")
        reg = b.cbr(stem, 8, 8, act="silu")
        cls = b.cbr(stem, 8, 8, act="silu")
        box = b.conv(reg, 8, 4, k=1)
        obj = b.node("Sigmoid", [b.conv(reg, 8, 1, k=1)])
        cl = b.node("Sigmoid", [b.conv(cls, 8, 3, k=1)])
        o = b.node("Concat", [box, obj, cl], axis=1)
        outs.append(b.node("Reshape", [o, b.const([1, 8, hw], np.int64)]))
    cat = b.node("Concat", outs, axis=2)
    b.node("Transpose", [cat], perm=[0, 2, 1])
    b.nodes[-1].output[0] = "output"
    return b.model([("input", [1, 3, 32, 32])], [("output", [1, 80, 8])])


def mobilenet_like(const_nodes: bool = False) -> onnx.ModelProto:
    """Stem, inverted residuals (1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, residual
    Add), ReLU6 as Clip, head conv, ReduceMean GAP -> Reshape -> Gemm."""
    b = B(11, const_nodes)
    x = b.cbr("input", 3, 8, stride=2, act="relu6")
    c = 8
    for cout, stride, expand in ((8, 1, 3), (12, 2, 4), (12, 1, 4)):
        e = b.cbr(x, c, c * expand, k=1, act="relu6")
        d = b.cbr(e, c * expand, c * expand, k=3, stride=stride, group=c * expand, act="relu6")
        se = b.node("GlobalAveragePool", [d])
        se = b.node("Relu", [b.conv(se, c * expand, 4, k=1)])
        se = b.node("HardSigmoid", [b.conv(se, 4, c * expand, k=1)], alpha=1 / 6, beta=0.5)
        d = b.node("Mul", [d, se])
        p = b.cbr(d, c * expand, cout, k=1, act=None)
        x = b.node("Add", [p, x]) if (stride == 1 and cout == c) else p
        c = cout
    h = b.cbr(x, c, 32, k=1, act="relu6")
    g = b.node("ReduceMean", [h], axes=[2, 3], keepdims=1)
    r = b.node("Reshape", [g, b.const([-1, 32], np.int64)])
    b.gemm(r, 32, 10, out="logits")
    return b.model([("input", [1, 3, 16, 16])], [("logits", [1, 10])])


def crnn() -> onnx.ModelProto:
    """Three conv layers, then the feature map read column by column by a GRU (Transpose ->
    Reshape to [width, batch, C*H]), as OCR recognisers do: the GRU holds about a fifth of the
    MACs, and the last conv's channels feed it (the channel analysis leaves them)."""
    b = B(31)
    x = b.cbr(b.cbr(b.cbr("input", 1, 16), 16, 16), 16, 8)                           # [1, 8, 8, 16]
    seq = b.node("Reshape", [b.node("Transpose", [x], perm=[3, 0, 1, 2]), b.const([16, 1, 64], np.int64)])
    w = b.const(b.rng.standard_normal((1, 96, 64)) * 0.1)
    r = b.const(b.rng.standard_normal((1, 96, 32)) * 0.1)
    b.nodes.append(helper.make_node("GRU", [seq, w, r], ["out"], name="gru", hidden_size=32))
    return b.model([("input", [1, 1, 8, 16])], [("out", [16, 1, 1, 32])])


def split_num_outputs() -> onnx.ModelProto:
    """Opset 18 Split with ``num_outputs`` (no sizes input): the rewrite writes explicit sizes."""
    b = B(20)
    x = b.cbr("input", 3, 8)
    s1, s2 = b.node("Split", [x], n_out=2, axis=1, num_outputs=2)
    y = b.node("Add", [b.cbr(s1, 4, 4), b.cbr(s2, 4, 4)])
    b.conv(y, 4, 2, name="out")
    return b.model([("input", [1, 3, 6, 6])], [("out", [1, 2, 6, 6])], opset=18)


def old_opset_pad_slice() -> onnx.ModelProto:
    """Opset 9: channel Pad and Slice take their amounts as attributes."""
    b = B(21)
    x = b.cbr("input", 3, 8)
    p = b.node("Pad", [x], pads=[0, 2, 0, 0, 0, 2, 0, 0], mode="constant")
    s = b.node("Slice", [p], starts=[1], ends=[11], axes=[1])
    y = b.cbr(s, 10, 10)
    b.conv(b.node("Add", [y, s]), 10, 2, name="out")
    return b.model([("input", [1, 3, 6, 6])], [("out", [1, 2, 6, 6])], opset=9)


def concat_graph_input() -> onnx.ModelProto:
    """A conv's channels concatenated with the graph input (whose 3 channels never change)."""
    b = B(22)
    x = b.cbr("input", 3, 8)
    c = b.node("Concat", [x, "input"], axis=1)
    b.conv(c, 11, 2, name="out")
    return b.model([("input", [1, 3, 6, 6])], [("out", [1, 2, 6, 6])])


def if_subgraph() -> onnx.ModelProto:
    """An If whose branches read an outer conv output: that conv's channels are unprunable."""
    b = B(23)
    x = b.cbr("input", 3, 8)
    then_g = helper.make_graph([helper.make_node("Relu", [x], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [x], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8, 6, 6])])
    b.nodes.append(helper.make_node("If", [b.const(np.array(True), np.bool_)], ["out"], then_branch=then_g, else_branch=else_g))
    b.conv(b.cbr("input", 3, 6), 6, 2, name="out2")
    return b.model([("input", [1, 3, 6, 6])], [("out", [1, 8, 6, 6]), ("out2", [1, 2, 6, 6])])


def convtranspose_matmul() -> onnx.ModelProto:
    """conv -> ConvTranspose (x2 upsample, bias) -> BN -> Relu -> conv, and a GAP -> Flatten ->
    MatMul (+ per-feature bias Add) -> Relu -> MatMul head: both producer kinds prune and are pruned."""
    b = B(24)
    x = b.cbr("input", 3, 8)
    w = b.const(b.rng.standard_normal((8, 6, 2, 2)) * 0.3)
    t = b.node("ConvTranspose", [x, w, b.const(b.rng.standard_normal(6) * 0.1)], strides=[2, 2])
    y = b.node("Relu", [b.bn(t, 6)])
    b.conv(y, 6, 3, name="out")
    f = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    h = b.node("MatMul", [f, b.const(b.rng.standard_normal((8, 7)) * 0.4)])
    h = b.node("Relu", [b.node("Add", [h, b.const(b.rng.standard_normal(7) * 0.1)])])
    b.node("MatMul", [h, b.const(b.rng.standard_normal((7, 4)) * 0.4)])
    b.nodes[-1].output[0] = "out2"
    return b.model([("input", [1, 3, 4, 4])], [("out", [1, 3, 8, 8]), ("out2", [1, 4])])


def gemm_to_feature_map() -> onnx.ModelProto:
    """A decoder-style head: Gemm (24 features) -> Reshape [1, 6, 2, 2] (each channel takes 4
    consecutive features, which the analysis ties together) -> Resize (sizes) -> conv."""
    b = B(25)
    f = b.node("Flatten", ["input"])
    g = b.node("Relu", [b.gemm(f, 12, 24)])
    r = b.node("Reshape", [g, b.const([1, 6, 2, 2], np.int64)])
    up = b.node("Resize", [r, "", "", b.const([1, 6, 4, 4], np.int64)], mode="nearest")
    b.conv(up, 6, 3, name="out")
    return b.model([("input", [1, 3, 2, 2])], [("out", [1, 3, 4, 4])])


BUILDERS = {
    "gemm_to_feature_map": gemm_to_feature_map,
    "convtranspose_matmul": convtranspose_matmul,
    "split_num_outputs": split_num_outputs, "old_opset_pad_slice": old_opset_pad_slice,
    "concat_graph_input": concat_graph_input, "if_subgraph": if_subgraph,
    "residual": residual, "concat_split": concat_split, "depthwise": depthwise,
    "depthwise_x2": lambda: depthwise(2), "grouped": grouped, "option_a": option_a,
    "flatten_gemm": flatten_gemm, "shared_weight": shared_weight, "yolo_like": yolo_like,
    "mobilenet_like": mobilenet_like, "residual_const_nodes": lambda: residual(const_nodes=True),
    "yolo_const_nodes": lambda: yolo_like(const_nodes=True),
}
