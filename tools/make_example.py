"""Build the README's example: a small CNN with BatchNorm trained on scikit-learn's digits.

The network is trained here in plain NumPy (a few seconds on a CPU, no torch needed) and
exported to ONNX the way a framework's training-mode export leaves it: BatchNormalization
unfused, a SiLU written as Sigmoid*Mul, a Dropout and an Identity left in. Alongside it, an
``.npz`` holds the held-out digits (key ``input``) and their ``labels`` for calibration and
evaluation.

    python tools/make_example.py -o examples/build      # writes digits_cnn.onnx, digits.npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


# ----------------------------------------------------------------------------- tiny autograd
def _im2col(x, k, stride, pad):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k, k, ho, wo), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.reshape(n, c * k * k, ho * wo), (ho, wo)


def _col2im(dcols, shape, k, stride, pad, ho, wo):
    n, c, h, w = shape
    dx = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dcols.dtype)
    d = dcols.reshape(n, c, k, k, ho, wo)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += d[:, :, i, j]
    return dx[:, :, pad:pad + h, pad:pad + w]


class _Conv:
    def __init__(self, rng, cin, cout, k, stride, pad):
        self.w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        self.b = np.zeros(cout, np.float32)
        self.k, self.stride, self.pad = k, stride, pad

    def forward(self, x):
        self.x_shape = x.shape
        self.cols, (ho, wo) = _im2col(x, self.k, self.stride, self.pad)
        self.hw = (ho, wo)
        y = np.einsum("of,nfp->nop", self.w.reshape(len(self.w), -1), self.cols) + self.b[None, :, None]
        return y.reshape(x.shape[0], len(self.w), ho, wo)

    def backward(self, dy):
        n = dy.shape[0]
        d = dy.reshape(n, len(self.w), -1)
        self.dw = np.einsum("nop,nfp->of", d, self.cols).reshape(self.w.shape)
        self.db = d.sum(axis=(0, 2))
        dcols = np.einsum("of,nop->nfp", self.w.reshape(len(self.w), -1), d)
        return _col2im(dcols, self.x_shape, self.k, self.stride, self.pad, *self.hw)

    def params(self):
        return [(self.w, "dw"), (self.b, "db")]


class _BN:
    def __init__(self, c, eps=1e-5, momentum=0.1):
        self.g, self.b = np.ones(c, np.float32), np.zeros(c, np.float32)
        self.mean, self.var = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.eps, self.m = eps, momentum

    def forward(self, x, train):
        if train:
            mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            self.mean = (1 - self.m) * self.mean + self.m * mu
            n = x.size / x.shape[1]
            self.var = (1 - self.m) * self.var + self.m * var * n / max(n - 1, 1)
        else:
            mu, var = self.mean, self.var
        self.inv = 1.0 / np.sqrt(var + self.eps)
        self.xh = (x - mu[None, :, None, None]) * self.inv[None, :, None, None]
        return self.g[None, :, None, None] * self.xh + self.b[None, :, None, None]

    def backward(self, dy):
        self.dg = (dy * self.xh).sum(axis=(0, 2, 3))
        self.db = dy.sum(axis=(0, 2, 3))
        n = dy.size / dy.shape[1]
        dxh = dy * self.g[None, :, None, None]
        return (self.inv[None, :, None, None] / n) * (n * dxh - dxh.sum(axis=(0, 2, 3), keepdims=True)
                                                       - self.xh * (dxh * self.xh).sum(axis=(0, 2, 3), keepdims=True))

    def params(self):
        return [(self.g, "dg"), (self.b, "db")]


def _train(x, y, epochs, seed):
    rng = np.random.default_rng(seed)
    c1, bn1 = _Conv(rng, 1, 16, 3, 1, 1), _BN(16)
    c2, bn2 = _Conv(rng, 16, 32, 3, 2, 1), _BN(32)
    fc_w = (rng.standard_normal((10, 32)) * np.sqrt(1.0 / 32)).astype(np.float32)
    fc_b = np.zeros(10, np.float32)
    layers = [c1, bn1, c2, bn2]
    state = {}

    def forward(xb, train):
        a1 = bn1.forward(c1.forward(xb), train)
        r1 = np.maximum(a1, 0)
        a2 = bn2.forward(c2.forward(r1), train)
        s2 = 1 / (1 + np.exp(-a2))
        h2 = a2 * s2                                   # SiLU
        g = h2.mean(axis=(2, 3))
        return a1, a2, s2, g, g @ fc_w.T + fc_b

    lr, beta1, beta2 = 0.01, 0.9, 0.999
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            xb, yb = x[idx], y[idx]
            a1, a2, s2, g, logits = forward(xb, True)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dlog = p
            dlog[np.arange(len(yb)), yb] -= 1
            dlog /= len(yb)
            grads = {"fc_w": dlog.T @ g, "fc_b": dlog.sum(0)}
            dg = dlog @ fc_w
            dh2 = np.broadcast_to(dg[:, :, None, None] / (a2.shape[2] * a2.shape[3]), a2.shape)
            da2 = dh2 * (s2 * (1 + a2 * (1 - s2)))
            dr1 = c2.backward(bn2.backward(da2))
            c1.backward(bn1.backward(dr1 * (a1 > 0)))
            step += 1
            params = [(fc_w, grads["fc_w"]), (fc_b, grads["fc_b"])]
            for layer in layers:
                params += [(p_, getattr(layer, gname)) for p_, gname in layer.params()]
            for k, (param, grad) in enumerate(params):
                m, v = state.get(k, (np.zeros_like(param), np.zeros_like(param)))
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad * grad
                state[k] = (m, v)
                param -= (lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + 1e-8)).astype(np.float32)
    return (c1, bn1, c2, bn2, fc_w, fc_b), (lambda xb: forward(xb, False)[-1])


def _export(net, path: Path) -> onnx.ModelProto:
    c1, bn1, c2, bn2, fc_w, fc_b = net
    inits = []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["input", init("conv1.weight", c1.w), init("conv1.bias", c1.b)], ["c1"], name="conv1", pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", init("bn1.weight", bn1.g), init("bn1.bias", bn1.b), init("bn1.running_mean", bn1.mean),
                                                init("bn1.running_var", bn1.var)], ["b1"], name="bn1", epsilon=bn1.eps),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Dropout", ["r1"], ["d1"], name="dropout1"),
        helper.make_node("Conv", ["d1", init("conv2.weight", c2.w), init("conv2.bias", c2.b)], ["c2"], name="conv2", pads=[1] * 4, strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c2", init("bn2.weight", bn2.g), init("bn2.bias", bn2.b), init("bn2.running_mean", bn2.mean),
                                                init("bn2.running_var", bn2.var)], ["b2"], name="bn2", epsilon=bn2.eps),
        helper.make_node("Sigmoid", ["b2"], ["s2"], name="silu2_sigmoid"),
        helper.make_node("Mul", ["b2", "s2"], ["h2"], name="silu2_mul"),
        helper.make_node("GlobalAveragePool", ["h2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Identity", ["flat"], ["feat"], name="identity"),
        helper.make_node("Gemm", ["feat", init("fc.weight", fc_w), init("fc.bias", fc_b)], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "digits_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxopt-example")
    model.ir_version = 8
    model.metadata_props.add(key="source", value="tools/make_example.py: NumPy-trained CNN on sklearn digits")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def build(out_dir, epochs: int = 12, seed: int = 0) -> dict:
    """Train, export and write ``digits_cnn.onnx`` and ``digits.npz`` into ``out_dir``; return paths and accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in 0..1
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, held = order[:1300], order[1300:]
    net, predict = _train(x[train], y[train], epochs, seed)
    acc = float((predict(x[held]).argmax(1) == y[held]).mean())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, data_path = out / "digits_cnn.onnx", out / "digits.npz"
    _export(net, model_path)
    np.savez(data_path, input=x[held], labels=y[held])
    return {"model": str(model_path), "data": str(data_path), "accuracy": acc, "samples": int(len(held))}


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the digits CNN example and export it to ONNX (BN unfused).")
    ap.add_argument("-o", "--out-dir", default="examples/build")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    info = build(args.out_dir, args.epochs)
    print(f"wrote {info['model']} and {info['data']} ({info['samples']} held-out digits); "
          f"NumPy accuracy on them: {100 * info['accuracy']:.2f} %")


if __name__ == "__main__":
    main()
