"""Small test networks for equalization / PTQ recovery, built with onnx.helper.

* :func:`mobilenetv3_se` -- a MobileNetV3-style classifier (HardSwish stem and head, inverted
  residual blocks with ReLU depthwise + squeeze-excite, like MobileNetV3-Small's first bnecks),
  BN already folded, whose depthwise filters are *badly scaled*: a well-conditioned network is
  built first, then every ``expand -> ReLU -> depthwise -> ReLU -> (SE) -> project`` chain is
  rescaled per channel by random factors spanning ~3 decades (the function is unchanged, exactly
  what folding BatchNorm with widely different gamma/sigma produces). Per-tensor int8 weights then
  round the small depthwise filters to zero.
* :func:`reference_qdq` -- a deliberately simple W/A quantizer that writes the QDQ layout of
  the ``qdq`` pass (weights stored quantized + DequantizeLinear, activations Q->DQ before
  every Conv/Gemm, float bias) with the matching ``info`` dict, so recovery can be tested
  independently of the real ``qdq`` pass.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, value):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv(self, x, cin, cout, k=1, stride=1, group=1, w=None, b=None):
        if w is None:
            fan_in = cin // group * k * k
            w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        if b is None:
            b = self.rng.standard_normal(cout) * 0.1
        wn, bn, y = self.const("w", w), self.const("b", b), self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, wn, bn], [y], name=y, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4, group=group))
        return y

    def op(self, op_type, inputs, **attrs):
        y = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [y], name=y, **attrs))
        return y


def mobilenetv3_se(seed: int = 0, bad_scale: float = 3.0, size: int = 32, classes: int = 10) -> onnx.ModelProto:
    """A MobileNetV3-style HardSwish + SE classifier with badly scaled (BN-folded) depthwise weights.

    ``bad_scale`` is the spread of the per-channel scale factors in decades (0 = well conditioned).
    """
    b = _Builder(seed)
    rng = b.rng
    x = "input"
    h = b.op("HardSwish", [b.conv(x, 3, 16, k=3, stride=2)])
    blocks = [(16, 48, 16, True, 1), (16, 64, 24, True, 2), (24, 72, 24, True, 1), (24, 96, 32, False, 2)]
    for cin, mid, cout, se, stride in blocks:
        # random per-channel factors: expand output / depthwise output channels are rescaled, the
        # following layer compensates exactly (the float function is unchanged).
        f1 = 10.0 ** rng.uniform(-bad_scale / 2, bad_scale / 2, mid)
        f2 = 10.0 ** rng.uniform(-bad_scale / 2, bad_scale / 2, mid)
        w_exp = rng.standard_normal((mid, cin, 1, 1)) * np.sqrt(2.0 / cin)
        b_exp = rng.standard_normal(mid) * 0.1
        w_dw = rng.standard_normal((mid, 1, 3, 3)) * np.sqrt(2.0 / 9)
        b_dw = rng.standard_normal(mid) * 0.1
        w_pr = rng.standard_normal((cout, mid, 1, 1)) * np.sqrt(1.0 / mid)
        # relu(f * y) = f * relu(y): scale expand by f1, undo in the depthwise input; scale the
        # depthwise output by f2, undo in the project (and SE fc1) input.
        w_exp, b_exp = w_exp * f1[:, None, None, None], b_exp * f1
        w_dw = w_dw / f1[:, None, None, None] * f2[:, None, None, None]
        b_dw = b_dw * f2
        e = b.op("Relu", [b.conv(h, cin, mid, w=w_exp, b=b_exp)])
        d = b.op("Relu", [b.conv(e, mid, mid, k=3, stride=stride, group=mid, w=w_dw, b=b_dw)])
        if se:
            sq = max(8, mid // 4)
            w_fc1 = rng.standard_normal((sq, mid, 1, 1)) * np.sqrt(2.0 / mid) / f2[None, :, None, None]
            p = b.op("GlobalAveragePool", [d])
            s1 = b.op("Relu", [b.conv(p, mid, sq, w=w_fc1, b=rng.standard_normal(sq) * 0.1)])
            gate = b.op("HardSigmoid", [b.conv(s1, sq, mid)], alpha=1.0 / 6, beta=0.5)
            d = b.op("Mul", [d, gate])
        y = b.conv(d, mid, cout, w=w_pr / f2[None, :, None, None], b=rng.standard_normal(cout) * 0.1)
        h = b.op("Add", [h, y]) if cin == cout and stride == 1 else y
    h = b.op("HardSwish", [b.conv(h, 32, 128)])
    p = b.op("GlobalAveragePool", [h])
    flat = b.op("Flatten", [p], axis=1)
    fc_w = b.const("fc_w", rng.standard_normal((classes, 128)) * np.sqrt(1.0 / 128))
    fc_b = b.const("fc_b", rng.standard_normal(classes) * 0.1)
    b.nodes.append(helper.make_node("Gemm", [flat, fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(b.nodes, "mbv3_se", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    # A nearest-class-mean head instead of a random one: the classifier compares the pooled
    # features with each prototype class's mean feature over image-like inputs, so the top-1 class
    # depends on the input with margins, as a trained classifier's does (a random head on random
    # features predicts one class everywhere, or separates classes by less than any noise).
    from onnxopt import runtime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_empty_tensor_value_info(flat))
    sess = runtime.session(probe)
    feeds = image_like_inputs(20 * classes, size, seed=seed + 1000, classes=classes)
    feats = np.concatenate([runtime.run(sess, f, [flat])[flat] for f in feeds]).astype(np.float64)
    centre = feats.mean(axis=0)
    mu = np.stack([feats[k::classes].mean(axis=0) for k in range(classes)]) - centre
    spread = np.sqrt(np.mean((feats - centre) ** 2))
    w = mu / spread
    bias = -(w @ centre) - 0.5 * np.sum(mu * mu, axis=1) / spread
    for t in model.graph.initializer:
        if t.name == fc_w:
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), fc_w))
        elif t.name == fc_b:
            t.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), fc_b))
    onnx.checker.check_model(model, full_check=True)
    return model


def image_like_inputs(n: int, size: int = 32, seed: int = 1, classes: int = 10, noise: float = 0.4) -> list:
    """Image-like inputs drawn from ``classes`` fixed smooth prototypes plus smooth noise (a toy
    data set with class structure, so that a classifier on it has margins, like a trained one)."""
    protos = _smooth(np.random.default_rng(12345), classes, size)
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = protos[i % classes] + noise * _smooth(rng, 1, size)[0] + 0.1 * rng.standard_normal((3, size, size))
        feeds.append({"input": x[None].astype(np.float32)})
    return feeds


def _smooth(rng, n: int, size: int) -> np.ndarray:
    low = rng.standard_normal((n, 3, size // 8, size // 8))
    return np.kron(low, np.ones((1, 1, 8, 8))) + rng.standard_normal((n, 3, 1, 1))


# ----------------------------------------------------------------------------- reference QDQ
def reference_qdq(model: onnx.ModelProto, feeds: list, *, per_channel: bool = True, weight_bits: int = 8,
                  activation_bits: int = 8, target: str = "tensorrt", skip: tuple = ()):
    """Quantize every Conv/Gemm of ``model`` in the contract's QDQ layout; returns (qdq_model, info).

    Activations: symmetric int8 (tensorrt) or asymmetric uint8 (ort), per-tensor minmax over
    ``feeds``. Weights: symmetric, per-channel (axis 0 for Conv, output features for Gemm) or
    per-tensor, stored as int8 with range +-(2^(b-1)-1), then DequantizeLinear.
    """
    from onnxopt import runtime

    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits and n.name not in skip]
    act_names = list(dict.fromkeys(n.input[0] for n in layers))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in act_names:
        if t not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
    sess = runtime.session(probe)
    lo = {t: np.inf for t in act_names}
    hi = {t: -np.inf for t in act_names}
    for feed in feeds:
        for t, v in runtime.run(sess, feed, act_names).items():
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    q = onnx.ModelProto()
    q.CopyFrom(model)
    new_nodes, new_inits = [], []
    info = {"target": target, "activation_bits": activation_bits, "weight_bits": weight_bits, "layers": [], "activations": []}
    dq_of = {}
    amax_a = 2 ** (activation_bits - 1) - 1
    for t in act_names:
        if target == "ort":
            lo_t, hi_t = min(lo[t], 0.0), max(hi[t], 0.0)
            scale = max(hi_t - lo_t, 1e-8) / (2 ** activation_bits - 1)
            zp = np.array(int(np.clip(round(-lo_t / scale), 0, 2 ** activation_bits - 1)), np.uint8)
        else:
            scale = max(abs(lo[t]), abs(hi[t]), 1e-8) / amax_a
            zp = np.array(0, np.int8)
        s_name, z_name = f"{t}_scale", f"{t}_zp"
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), s_name), numpy_helper.from_array(zp, z_name)]
        qn, dqn = f"{t}_Q", f"{t}_DQ"
        new_nodes += [helper.make_node("QuantizeLinear", [t, s_name, z_name], [f"{t}_q"], name=qn),
                      helper.make_node("DequantizeLinear", [f"{t}_q", s_name, z_name], [f"{t}_dq"], name=dqn)]
        dq_of[t] = f"{t}_dq"
        info["activations"].append({"tensor": t, "scale": s_name, "zero_point": z_name, "q_node": qn, "dq_node": dqn})
    qmax = 2 ** (weight_bits - 1) - 1
    for node in q.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in inits or node.name in skip:
            continue
        w = inits[node.input[1]]
        axis = 0 if node.op_type == "Conv" or any(a.name == "transB" and a.i for a in node.attribute) else 1
        if per_channel:
            red = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=red), 1e-12) / qmax
            shape = [1] * w.ndim
            shape[axis] = -1
            wq = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
            zp = np.zeros(scale.shape, np.int8)
        else:
            scale = np.array(max(float(np.abs(w).max()), 1e-12) / qmax)
            wq = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
            zp = np.array(0, np.int8)
        base = node.name
        wq_n, ws_n, wz_n, wdq = f"{base}_wq", f"{base}_wscale", f"{base}_wzp", f"{base}_wdq"
        new_inits += [numpy_helper.from_array(wq, wq_n), numpy_helper.from_array(scale.astype(np.float32), ws_n),
                      numpy_helper.from_array(zp, wz_n)]
        attrs = {"axis": axis} if per_channel else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [wq_n, ws_n, wz_n], [wdq], name=f"{base}_wDQ", **attrs))
        float_w = node.input[1]
        x_in = node.input[0]
        node.input[0] = dq_of[x_in]
        node.input[1] = wdq
        info["layers"].append({"node": node.name, "op": node.op_type, "weight_q": wq_n, "weight_scale": ws_n,
                               "weight_zero_point": wz_n, "axis": axis if per_channel else None, "qmin": -qmax, "qmax": qmax,
                               "bias": node.input[2] if len(node.input) > 2 and node.input[2] else None, "bias_is_int": False,
                               "bias_scale": None, "input_dq": dq_of[x_in], "float_weight": float_w})
    q.graph.node.extend(new_nodes)
    q.graph.initializer.extend(new_inits)
    used = {i for n in q.graph.node for i in n.input}
    keep = [t for t in q.graph.initializer if t.name in used]
    del q.graph.initializer[:]
    q.graph.initializer.extend(keep)
    _toposort(q)
    onnx.checker.check_model(q, full_check=True)
    return q, info


def _toposort(model: onnx.ModelProto) -> None:
    g = model.graph
    avail = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                order.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("cycle in graph")
        pending = rest
    del g.node[:]
    g.node.extend(order)


def top1_agreement(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds: list, output: str = "logits") -> float:
    """Fraction of ``feeds`` on which both models pick the same top-1 class."""
    from onnxopt import runtime

    s_ref, s_cand = runtime.session(ref), runtime.session(cand)
    same = [int(np.argmax(runtime.run(s_ref, f, [output])[output]) == np.argmax(runtime.run(s_cand, f, [output])[output])) for f in feeds]
    return float(np.mean(same))
