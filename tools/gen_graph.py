"""Generate a large, valid, runnable CNN-like ONNX graph for scaling benchmarks.

``build(n_nodes)`` stacks blocks of Conv -> BatchNormalization -> activation (Relu, SiLU as
Sigmoid*Mul, decomposed HardSwish, Clip(0,6)) with residual Adds, Concat+Split, a k5 MaxPool and
occasional squeeze-excite gates, at small channel counts so the model stays quick to run. Weights
are a mix of initializers and Constant nodes, as real exports have.

    python tools/gen_graph.py 10000 -o g10k.onnx
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C = 8  # channels everywhere: keeps a 20k-node graph fast to run


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, value: np.ndarray, as_node: bool = False, dtype=np.float32) -> str:
        n = self.name("w")
        arr = np.asarray(value, dtype=dtype)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [n], value=numpy_helper.from_array(arr, n + "_v")))
        else:
            self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(self, op: str, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.name(op), **attrs))
        return out

    def conv_bn_act(self, x: str, act: str) -> str:
        w = self.const(self.rng.standard_normal((C, C, 3, 3)) * 0.15, as_node=self.k % 3 == 0)
        b = self.const(self.rng.standard_normal(C) * 0.05)
        y = self.node("Conv", [x, w, b], pads=[1, 1, 1, 1])
        bn = [self.const(1 + 0.1 * self.rng.standard_normal(C)), self.const(0.1 * self.rng.standard_normal(C)),
              self.const(0.1 * self.rng.standard_normal(C)), self.const(1 + 0.1 * self.rng.random(C))]
        y = self.node("BatchNormalization", [y] + bn, epsilon=1e-5)
        if act == "relu":
            return self.node("Relu", [y])
        if act == "silu":
            return self.node("Mul", [y, self.node("Sigmoid", [y])])
        if act == "hswish":
            three, six, zero = self.const(np.float32(3)), self.const(np.float32(6)), self.const(np.float32(0))
            g = self.node("Clip", [self.node("Add", [y, three]), zero, six])
            return self.node("Mul", [y, self.node("Div", [g, six])])
        zero, six = self.const(np.float32(0)), self.const(np.float32(6))
        return self.node("Clip", [y, zero, six])

    def se(self, x: str) -> str:
        s = self.node("GlobalAveragePool", [x])
        s = self.node("Relu", [self.node("Conv", [s, self.const(self.rng.standard_normal((C // 2, C, 1, 1)) * 0.3)])])
        s = self.node("Sigmoid", [self.node("Conv", [s, self.const(self.rng.standard_normal((C, C // 2, 1, 1)) * 0.3)])])
        return self.node("Mul", [x, s])


def build(n_nodes: int, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A valid CNN of about ``n_nodes`` nodes with input ``input [1,3,32,32]`` and output ``output``."""
    b = _Builder(seed)
    x = b.node("Conv", ["input", b.const(b.rng.standard_normal((C, 3, 3, 3)) * 0.3)], pads=[1, 1, 1, 1])
    acts = ["relu", "silu", "hswish", "relu6"]
    i = 0
    while len(b.nodes) < n_nodes - 8:
        y = b.conv_bn_act(x, acts[i % 4])
        y = b.conv_bn_act(y, acts[(i + 1) % 4])
        if i % 5 == 4:
            y = b.se(y)
        x = b.node("Mul", [b.node("Add", [x, y]), b.const(np.float32(0.5))])  # keep activations O(1) at any depth
        if i % 7 == 6:  # Concat + Split round trip (YOLO necks)
            cat = b.node("Concat", [x, b.node("Relu", [x])], axis=1)
            halves = [b.name("split"), b.name("split")]
            sizes = b.const(np.array([C, C]), dtype=np.int64)
            b.nodes.append(helper.make_node("Split", [cat, sizes], halves, axis=1, name=b.name("Split")))
            x = b.node("Add", halves)
        if i % 11 == 10:
            x = b.node("MaxPool", [x], kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1])
        i += 1
    g = b.node("GlobalAveragePool", [x])
    f = b.node("Flatten", [g])
    out = helper.make_node("Gemm", [f, b.const(b.rng.standard_normal((10, C)) * 0.3), b.const(np.zeros(10))], ["output"], transB=1, name="head")
    b.nodes.append(out)
    graph = helper.make_graph(b.nodes, f"gen{n_nodes}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nodes", type=int)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = build(args.nodes, args.seed)
    onnx.save(model, args.output)
    print(f"wrote {args.output}: {len(model.graph.node)} nodes")


if __name__ == "__main__":
    main()
