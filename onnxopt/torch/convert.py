"""ONNX graph -> executable ``torch.nn.Module`` (the graph stays the source of truth).

:class:`OnnxModule` interprets the ONNX graph node by node with torch ops, so it is trainable, and
:mod:`onnxopt.torch.writeback` writes what was learned back into the very same graph. Float
weights and Q/DQ scales become ``nn.Parameter`` s, other constants buffers. An activation
``[Clip ->] QuantizeLinear -> DequantizeLinear`` is one fake-quantization step (exact ONNX rounding
forward, STE backward; the restricted-range Clip the qdq pass puts before a <8-bit Q is tied to the
learned scale). Integer weights and int32 biases behind a DequantizeLinear become float latents,
fake-quantized on every forward in the range the stored values show (restricted ranges such as
[-7, 7]); a bias scale is recomputed from the current input and weight scales (what TIDL/ORT expect).
Unsupported ops raise :class:`onnxopt.errors.OnnxoptError` listing them, before any work.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ..errors import OnnxoptError
from ..ir.proto import input_uses, node_attr, producers
from ..model_io import opset_of
from ..quant.view import INT_RANGE_OF_TYPE, along_axis
from . import fakequant

_ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool, TensorProto.UINT16: torch.int32, TensorProto.UINT32: torch.int64,
    TensorProto.INT4: torch.int8, TensorProto.UINT4: torch.uint8,
}

# binary/ternary latent weights: scale factors computed from the weights every step
_LOW_BIT_WEIGHT = {"binary": fakequant.binary_weight, "ternary": fakequant.ternary_weight}

# inputs of these ops that hold trainable weights
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                  "BatchNormalization": (1, 2), "PRelu": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
                  "Div": (0, 1), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
                  "GRU": (1, 2, 3), "LSTM": (1, 2, 3)}


def _sanitize(name: str, used: set, prefix: str) -> str:
    base = prefix + (re.sub(r"[^0-9A-Za-z_]", "_", name) or "t")
    key, i = base, 1
    while key in used:
        key = f"{base}_{i}"
        i += 1
    used.add(key)
    return key


@dataclass
class Node:
    op: str
    name: str
    inputs: List[str]
    outputs: List[str]
    attrs: dict
    fn: Optional[Callable] = None
    kind: str = "op"            # op | fq (fused activation Q/DQ) | fqw (latent weight) | fqb (latent bias)
    extra: dict = field(default_factory=dict)


@dataclass
class WeightQuant:
    """A latent weight fake-quantized on the fly; written back as integers + scale."""
    latent: str          # ONNX name of the integer initializer (now a float latent parameter)
    scale: str
    zero_point: Optional[str]
    axis: Optional[int]
    qmin: int
    qmax: int
    dtype: int           # ONNX element type of the stored integers
    dq_output: str
    mode: str = "lsq"    # lsq | binary | ternary


@dataclass
class ActQuant:
    x: str
    scale: str
    zero_point: Optional[str]
    qmin: int
    qmax: int
    axis: Optional[int]
    outputs: List[str]
    clip: Optional[dict] = None   # {"node": name, "min": init name, "max": init name}


@dataclass
class BiasQuant:
    latent: str          # int32 initializer name
    scale: str           # its scale initializer (rewritten as s_in * s_w)
    input_scale: str
    weight_scale: str
    dq_output: str


class OnnxModule(nn.Module):
    """An ONNX graph as a trainable torch module. ``forward(*inputs)`` returns the graph outputs
    (a tensor for one output, else a tuple); ``capture`` names extra tensors to keep in
    ``self.captured`` (intermediate features for distillation)."""

    def __init__(self, model: ModelProto, *, quant_mode: str = "lsq", train_scales: bool = True,
                 weight_ranges: Optional[dict] = None, weight_modes: Optional[dict] = None,
                 bn_mode: str = "frozen", float_weights: Optional[dict] = None):
        super().__init__()
        if quant_mode not in fakequant.MODES:
            raise OnnxoptError(f"unknown fake-quantization mode '{quant_mode}'.", f"use one of {', '.join(fakequant.MODES)}")
        self.opset = opset_of(model)
        self.quant_mode = quant_mode
        self.bn_mode = bn_mode
        g = model.graph
        _check_supported(g)
        init_names = {t.name for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]
        # An export with a fixed batch (often 1) bakes that batch into Reshape shapes; training
        # runs larger batches, so op_reshape swaps the declared batch for the running one.
        self.declared_batch = _declared_batch(g, self.input_names)
        self.running_batch: Optional[int] = None
        self.capture: set = set()
        self.captured: dict = {}
        # latent weight name -> callable giving the dequantized weight to use instead of fake
        # quantization (block reconstruction learns the rounding, onnxopt.quant.recovery.brecq)
        self.weight_override: Dict[str, Callable[[], torch.Tensor]] = {}
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self.param_names: Dict[str, str] = {}
        self.buffer_names: Dict[str, str] = {}
        used: set = set()

        consts: Dict[str, np.ndarray] = {t.name: _plain(numpy_helper.to_array(t)) for t in g.initializer}
        self.onnx_dtypes: Dict[str, int] = {t.name: t.data_type for t in g.initializer}
        nodes = []
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                a = n.attribute[0]
                if a.name == "value":
                    consts[n.output[0]] = _plain(numpy_helper.to_array(a.t))
                    self.onnx_dtypes[n.output[0]] = a.t.data_type
                    continue
                if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                    v = helper.get_attribute_value(a)
                    consts[n.output[0]] = np.asarray(v, dtype=np.float32 if "float" in a.name else np.int64)
                    self.onnx_dtypes[n.output[0]] = TensorProto.FLOAT if "float" in a.name else TensorProto.INT64
                    continue
            nodes.append(n)
        for n in nodes:  # torch needs BN running statistics as tensors of their own, not computed ones
            stats = [t for t in n.input[3:5] if t and t not in consts] if n.op_type == "BatchNormalization" else []
            if stats:
                raise OnnxoptError(f"BatchNormalization '{n.name or n.output[0]}' reads its running statistics from computed "
                                   f"tensors ({', '.join(stats)}; a training-mode export passes them through Identity).",
                                   "run `onnxopt apply cleanup` (or cleanup,bnfuse) first: it turns them into initializers")
        consumers = input_uses(g)
        graph_outputs = set(self.output_names)

        trainable = {n.input[i] for n in nodes for i in _WEIGHT_INPUTS.get(n.op_type, ())
                     if i < len(n.input) and n.input[i] in consts and consts[n.input[i]].dtype.kind == "f"}

        # ---- quantization patterns (pattern-matched on the proto; ONNX names are the keys)
        skip: set = set()    # ids of the nodes a fused step replaces
        fused: Dict[int, Node] = {}   # id(DequantizeLinear / QuantizeLinear) -> the fused step that stands for it
        self.weight_quants: Dict[str, WeightQuant] = {}
        self.act_quants: List[ActQuant] = []
        self.bias_quants: Dict[str, BiasQuant] = {}
        latent_init: Dict[str, np.ndarray] = {}
        producer = producers(g)
        weight_ranges = weight_ranges or {}
        weight_modes = weight_modes or {}
        for n in nodes:
            if n.op_type != "DequantizeLinear":
                continue
            x, s_name = n.input[0], n.input[1]
            zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if (x not in consts or consts[x].dtype.kind not in "iu" or len(consumers.get(x, [])) != 1
                    or x in graph_outputs or s_name not in consts):
                continue
            s = consts[s_name].astype(np.float64)
            zp = consts[zp_name].astype(np.float64) if zp_name else np.zeros(())
            nd = consts[x].ndim
            axis_used = None if s.size == 1 else node_attr(n, "axis", 1) % nd
            real = (consts[x].astype(np.float64) - along_axis(zp, nd, axis_used)) * along_axis(s, nd, axis_used)
            dq_readers = consumers.get(n.output[0], [])
            if consts[x].dtype == np.int32 and len(dq_readers) == 1 and dq_readers[0][0].op_type in ("Conv", "Gemm", "ConvTranspose") and dq_readers[0][1] == 2:
                layer = dq_readers[0][0]
                in_dq, w_dq = producer.get(layer.input[0]), producer.get(layer.input[1])
                if in_dq is not None and w_dq is not None and in_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear" \
                        and in_dq.input[1] in consts and w_dq.input[1] in consts:
                    self.bias_quants[x] = BiasQuant(x, s_name, in_dq.input[1], w_dq.input[1], n.output[0])
                    latent_init[x] = real.astype(np.float32)
                    fused[id(n)] = Node("BiasFakeQuant", n.name, [], [n.output[0]], {}, kind="fqb", extra={"q": self.bias_quants[x]})
                    continue
            dtype = self.onnx_dtypes.get(x, TensorProto.INT8)
            mode = weight_modes.get(x, "lsq")
            qmin, qmax = weight_ranges[x] if x in weight_ranges else _weight_range(consts[x], zp, dtype, mode)
            self.weight_quants[x] = WeightQuant(x, s_name, zp_name, axis_used, int(qmin), int(qmax), dtype, n.output[0], mode)
            fw = (float_weights or {}).get(x)
            latent_init[x] = (np.asarray(fw, np.float32) if fw is not None and np.shape(fw) == consts[x].shape else real.astype(np.float32))
            trainable.add(s_name)
            fused[id(n)] = Node("WeightFakeQuant", n.name, [], [n.output[0]], {}, kind="fqw", extra={"q": self.weight_quants[x]})

        for n in nodes:
            if n.op_type != "QuantizeLinear" or n.input[1] not in consts:
                continue
            readers = consumers.get(n.output[0], [])
            zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
            # fuse only when every reader is a DequantizeLinear with the same scale/zero point/axis
            # reading the integers as its data input (anything else needs the integers themselves)
            if not readers or n.output[0] in graph_outputs or not all(
                    i == 0 and r.op_type == "DequantizeLinear" and r.input[1] == n.input[1]
                    and (r.input[2] if len(r.input) > 2 and r.input[2] else None) == zp_name
                    and node_attr(r, "axis", 1) == node_attr(n, "axis", 1) for r, i in readers):
                continue
            zp_dtype = self.onnx_dtypes.get(zp_name, TensorProto.UINT8) if zp_name else TensorProto.UINT8
            qmin, qmax = INT_RANGE_OF_TYPE.get(zp_dtype, (0, 255))
            s = consts[n.input[1]].astype(np.float64)
            zp = consts[zp_name].astype(np.float64) if zp_name else np.zeros(())
            axis = None if s.size == 1 else node_attr(n, "axis", 1)
            clip = None
            x = n.input[0]
            pn = producer.get(x)
            if (pn is not None and pn.op_type == "Clip" and len(consumers.get(x, [])) == 1 and x not in graph_outputs
                    and s.size == 1 and len(pn.input) == 3 and pn.input[1] in consts and pn.input[2] in consts
                    and len(consumers.get(pn.input[1], [])) == 1 and len(consumers.get(pn.input[2], [])) == 1):
                sv, zv = float(s.reshape(())), float(zp.reshape(()))
                cl = float(consts[pn.input[1]]) / sv + zv
                ch = float(consts[pn.input[2]]) / sv + zv
                if abs(cl - round(cl)) < 1e-3 and abs(ch - round(ch)) < 1e-3 and qmin <= round(cl) < round(ch) <= qmax:
                    qmin, qmax = int(round(cl)), int(round(ch))
                    clip = {"node": pn.name, "min": pn.input[1], "max": pn.input[2]}
                    skip.add(id(pn))
                    x = pn.input[0]
            aq = ActQuant(x, n.input[1], zp_name, qmin, qmax, axis, [r.output[0] for r, _ in readers], clip)
            self.act_quants.append(aq)
            trainable.add(n.input[1])
            skip.update(id(r) for r, _ in readers)
            fused[id(n)] = Node("FakeQuant", n.name, [], aq.outputs, {}, kind="fq", extra={"q": aq})

        # ---- parameters and buffers
        self.bn_stats = {n.input[i] for n in nodes if n.op_type == "BatchNormalization" for i in (3, 4) if i < len(n.input)}
        for name, value in consts.items():
            if name in latent_init or (name in trainable and name not in self.bn_stats and value.dtype.kind == "f"):
                key = _sanitize(name, used, "p_")
                self.params[key] = nn.Parameter(torch.from_numpy(np.array(latent_init.get(name, value), order="C")))
                self.param_names[name] = key
            else:
                key = _sanitize(name, used, "b_")
                self.consts.register_buffer(key, _to_torch(value))
                self.buffer_names[name] = key
        if not train_scales:
            for q in [*self.act_quants, *self.weight_quants.values()]:
                self.params[self.param_names[q.scale]].requires_grad_(False)

        # ---- the program: one entry per node (fused patterns become one step)
        program: List[Node] = []
        for n in nodes:
            if id(n) in fused:
                program.append(fused[id(n)])
            elif id(n) not in skip:
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
                program.append(Node(n.op_type, n.name, list(n.input), list(n.output), attrs, fn=_OPS[n.op_type]))
        self.program = program
        # tensors to free after their last use keeps peak memory near a real framework's
        last_use = {name: idx for idx, node in enumerate(program) for name in _node_reads(node)}
        keep = {*self.output_names, *self.param_names, *self.buffer_names}
        self._free_after = [[nm for nm in _node_reads(node) if last_use.get(nm) == idx and nm not in keep] for idx, node in enumerate(program)]

    # ------------------------------------------------------------------ value access
    def value(self, name: str) -> torch.Tensor:
        """The current value of a constant/parameter by ONNX name (latent weights as floats)."""
        if name in self.param_names:
            return self.params[self.param_names[name]]
        return getattr(self.consts, self.buffer_names[name])

    def parameter_by_onnx_name(self, name: str) -> nn.Parameter:
        return self.params[self.param_names[name]]

    def quantized_weight(self, wq: WeightQuant) -> tuple:
        """(integers, scale) exactly as the forward pass in eval mode uses them."""
        w = self.value(wq.latent).detach()
        if wq.mode in _LOW_BIT_WEIGHT:
            _, q, s = _LOW_BIT_WEIGHT[wq.mode](w, wq.axis)
            return q, s
        s = self.value(wq.scale).detach()
        zp = self.value(wq.zero_point).detach().to(w.dtype) if wq.zero_point else torch.zeros((), dtype=w.dtype, device=w.device)
        sb = fakequant.along_axis_of(s, w, wq.axis)
        zb = fakequant.along_axis_of(zp, w, wq.axis)
        return torch.clamp(torch.round(w / sb) + zb, wq.qmin, wq.qmax), s

    def bias_scale(self, bq: BiasQuant) -> torch.Tensor:
        return (self.value(bq.input_scale) * self.value(bq.weight_scale)).detach()

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        env: Dict[str, torch.Tensor] = {name: self.params[key] for name, key in self.param_names.items()}
        env.update((name, getattr(self.consts, key)) for name, key in self.buffer_names.items())
        env.update(zip(self.input_names, args))
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise OnnxoptError(f"missing model input(s): {', '.join(missing)}", f"the model takes {', '.join(self.input_names)}")
        first = env[self.input_names[0]] if self.input_names else None
        self.running_batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
        capture, captured, training = self.capture, {}, self.training
        for idx, node in enumerate(self.program):
            if node.kind == "op":
                ins = [env[i] if i else None for i in node.inputs]
                outs = node.fn(self, node, ins)
                if not isinstance(outs, (list, tuple)):
                    outs = (outs,)
                env.update((name, v) for name, v in zip(node.outputs, outs) if name)
            elif node.kind == "fq":
                q = node.extra["q"]
                zp = env[q.zero_point] if q.zero_point else torch.zeros((), device=env[q.x].device)
                y = fakequant.fake_quantize(env[q.x], env[q.scale], zp, q.qmin, q.qmax, q.axis, self.quant_mode, training)
                env.update((name, y) for name in q.outputs)
            elif node.kind == "fqw":
                q = node.extra["q"]
                w = env[q.latent]
                if q.latent in self.weight_override:
                    y = self.weight_override[q.latent]()
                elif q.mode in _LOW_BIT_WEIGHT:
                    y = _LOW_BIT_WEIGHT[q.mode](w, q.axis)[0]
                else:
                    zp = env[q.zero_point] if q.zero_point else torch.zeros((), device=w.device)
                    y = fakequant.fake_quantize(w, env[q.scale], zp, q.qmin, q.qmax, q.axis, "lsq" if self.quant_mode == "pact" else self.quant_mode, training)
                env[q.dq_output] = y
            else:  # fqb: int32 bias with scale s_in * s_w, rounding kept, gradient straight through
                q = node.extra["q"]
                b = env[q.latent]
                s = (env[q.input_scale] * env[q.weight_scale]).detach()
                env[q.dq_output] = b + (torch.round(b / s) * s - b).detach()
            if capture:
                captured.update((name, env[name]) for name in node.outputs if name in capture)
            for name in self._free_after[idx]:
                env.pop(name, None)
        self.captured = captured
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def _weight_range(w_q: np.ndarray, zp: np.ndarray, dtype: int, mode: str) -> tuple:
    """(qmin, qmax) of a latent weight: [-1, 1] for binary/ternary, else the smallest range of its
    integer type that holds the stored values."""
    lo, hi = INT_RANGE_OF_TYPE.get(dtype, (-128, 127))
    if mode in ("binary", "ternary"):
        return -1, 1
    if dtype not in (TensorProto.INT8, TensorProto.INT16, TensorProto.INT4):
        return lo, hi
    if not zp.any():
        # restricted symmetric ranges (<8 bits stored in int8): the smallest 2^(b-1)-1 covering the values
        m = int(np.abs(w_q).max()) if w_q.size else 0
        q = min((1 << max(1, m.bit_length())) - 1, hi)
        return (-q, q) if q < hi else (lo, hi)
    # asymmetric (weight_symmetric=false): all 2^b levels [-2^(b-1), 2^(b-1) - 1], the
    # smallest such range holding the stored values and zero points
    vals = np.concatenate([w_q.reshape(-1), zp.reshape(-1)]).astype(np.int64)
    q = 1 << (max(-int(vals.min()), int(vals.max()) + 1) - 1).bit_length()
    return max(-q, lo), min(q - 1, hi)


def _node_reads(node: Node) -> list:
    if node.kind == "op":
        return [i for i in node.inputs if i]
    q = node.extra["q"]
    if node.kind == "fq":
        return [q.x, q.scale] + ([q.zero_point] if q.zero_point else [])
    if node.kind == "fqw":
        return [q.latent, q.scale] + ([q.zero_point] if q.zero_point else [])
    return [q.latent, q.input_scale, q.weight_scale]


def _plain(arr: np.ndarray) -> np.ndarray:
    """int4/uint4 (ml_dtypes) arrays as int8/uint8, so numpy and torch can work with them."""
    if arr.dtype.name in ("int4", "uint4"):
        return arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8)
    return arr


def _to_torch(value: np.ndarray) -> torch.Tensor:
    """A constant (int4/uint4 already widened by _plain) as a torch tensor; torch lacks uint16/uint32."""
    if value.dtype == object:
        raise OnnxoptError("string tensors are not supported by the torch converter.", "remove string constants from the graph")
    widened = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}.get(value.dtype, value.dtype)
    return torch.from_numpy(np.array(value, dtype=widened, order="C", copy=True))


def _unsupported_form(n: onnx.NodeProto) -> Optional[str]:
    """What of a supported op's attributes the converter cannot run, or None."""
    if n.op_type == "GatherND" and node_attr(n, "batch_dims", 0):
        return "GatherND with batch_dims > 0"
    if n.op_type in ("GRU", "LSTM"):
        default = ["Sigmoid", "Tanh"] if n.op_type == "GRU" else ["Sigmoid", "Tanh", "Tanh"]
        acts = [a.decode() if isinstance(a, bytes) else a for a in node_attr(n, "activations", None) or []]
        if any(a != default[k % len(default)] for k, a in enumerate(acts)):
            return f"{n.op_type} with activations {','.join(acts)}"
        if node_attr(n, "clip", None) is not None:
            return f"{n.op_type} with clip"
    return None


def _check_supported(g: onnx.GraphProto) -> None:
    bad = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in g.node
                  if (n.domain not in ("", "ai.onnx") or n.op_type not in _OPS) and n.op_type != "Constant"})
    bad += sorted({form for form in map(_unsupported_form, g.node) if form})
    if bad:
        raise OnnxoptError(f"the torch converter does not support: {', '.join(bad)}.",
                           "finetune needs every op of the graph in torch; run `onnxopt apply cleanup` first or file an issue")


# ============================================================================ op implementations
def _ints(t) -> list:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _spatial_pads(pads: list, rank: int) -> list:
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> F.pad order (last dim first)."""
    return [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]


def _auto_pads(auto_pad: str, in_sp: list, kernel: list, strides: list, dilations: list) -> list:
    # output size ceil(size / stride); the odd pixel of the total padding goes to the end for SAME_UPPER
    totals = [max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
              for size, k, s, d in zip(in_sp, kernel, strides, dilations)]
    small, big = [t // 2 for t in totals], [t - t // 2 for t in totals]
    return small + big if auto_pad == "SAME_UPPER" else big + small


def _conv_pads(node, x, kernel):
    rank = len(kernel)
    a = node.attrs
    strides = list(a.get("strides", [1] * rank))
    dil = list(a.get("dilations", [1] * rank))
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _auto_pads(auto, list(x.shape[2:]), kernel, strides, dil)
    elif auto == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(a.get("pads", [0] * (2 * rank)))
    return pads, strides, dil


def op_conv(m, node, ins):
    x, w, b = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    rank = w.dim() - 2
    pads, strides, dil = _conv_pads(node, x, list(w.shape[2:]))
    group = int(node.attrs.get("group", 1))
    sym = pads[:rank] == pads[rank:]
    if not sym:
        x = F.pad(x, _spatial_pads(pads, rank))
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return fn(x, w, b, strides, pads[:rank] if sym else 0, dil, group)


def op_conv_transpose(m, node, ins):
    x, w, b = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    rank = w.dim() - 2
    a = node.attrs
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OnnxoptError(f"ConvTranspose '{node.name}': output_shape/auto_pad SAME is not supported by the torch converter.",
                           "re-export with explicit pads")
    _, strides, dil = _conv_pads(node, x, list(w.shape[2:]))
    out_pad = list(a.get("output_padding", [0] * rank))
    group = int(a.get("group", 1))
    pads = list(a.get("pads", [0] * (2 * rank)))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    y = fn(x, w, b, strides, 0, out_pad, group, dil)
    return y[(slice(None), slice(None), *(slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank)))]


def op_gemm(m, node, ins):
    at = node.attrs
    a_ = ins[0].t() if at.get("transA", 0) else ins[0]
    b_ = ins[1].t() if at.get("transB", 0) else ins[1]
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    y = a_ @ b_
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def op_bn(m, node, ins):
    x, scale, bias, mean, var = ins[:5]
    eps = float(node.attrs.get("epsilon", 1e-5))
    train = m.training and m.bn_mode == "train"  # else the running statistics, frozen
    mom = 1.0 - float(node.attrs.get("momentum", 0.9)) if train else 0.0
    return F.batch_norm(x, mean, var, scale, bias, train, mom, eps)


def op_clip(m, node, ins):
    x = ins[0]
    for i, attr, bound_fn in ((1, "min", torch.maximum), (2, "max", torch.minimum)):
        bound = ins[i] if len(ins) > i and ins[i] is not None else node.attrs.get(attr)
        if bound is not None:
            x = bound_fn(x, torch.as_tensor(bound, dtype=x.dtype, device=x.device))
    return x


def _binary(fn):
    def op(m, node, ins):
        a, b = ins
        if a.dtype != b.dtype:  # to the float operand's type, else to the first's
            if b.is_floating_point() and not a.is_floating_point():
                a = a.to(b.dtype)
            else:
                b = b.to(a.dtype)
        return fn(a, b)
    return op


def _div(a, b):
    return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


def op_pad(m, node, ins):
    x = ins[0]
    mode = node.attrs.get("mode", "constant")
    if len(ins) > 1 and ins[1] is not None:
        pads = _ints(ins[1])
        value = float(ins[2].reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    else:
        pads = list(node.attrs.get("pads"))
        value = float(node.attrs.get("value", 0.0))
        axes = None
    r = x.dim()
    if axes is not None:
        full = [0] * (2 * r)
        k = len(axes)
        for j, ax in enumerate(axes):
            full[ax % r] = pads[j]
            full[ax % r + r] = pads[j + k]
        pads = full
    tp = _spatial_pads(pads, r)
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    if mode == "constant":
        return F.pad(x, tp, mode="constant", value=value)
    return F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _slice_axis(x, axis, start, end, step):
    n = x.shape[axis]
    if step > 0:
        s = max(0, min(n, start + n if start < 0 else start))
        e = max(0, min(n, end + n if end < 0 else end))
        idx = [slice(None)] * x.dim()
        idx[axis] = slice(s, e, step)
        return x[tuple(idx)]
    s = max(-1, min(n - 1, start + n if start < 0 else start))
    e = max(-1, min(n - 1, end + n if end < 0 else end))
    index = torch.arange(s, e, step, device=x.device)
    return x.index_select(axis, index)


def op_slice(m, node, ins):
    x = ins[0]
    if len(ins) > 1:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        x = _slice_axis(x, a % x.dim(), s, e, st)
    return x


def op_concat(m, node, ins):
    ts = [t for t in ins if t is not None]
    return torch.cat([t.to(ts[0].dtype) for t in ts], dim=int(node.attrs["axis"]))


def op_split(m, node, ins):
    x = ins[0]
    axis = int(node.attrs.get("axis", 0)) % x.dim()
    if len(ins) > 1 and ins[1] is not None:
        sizes = _ints(ins[1])
    elif "split" in node.attrs:
        sizes = list(node.attrs["split"])
    else:
        k = int(node.attrs.get("num_outputs", len(node.outputs)))
        n = x.shape[axis]
        chunk = -(-n // k)
        sizes = [chunk] * (k - 1) + [n - chunk * (k - 1)]
    return torch.split(x, sizes, dim=axis)


def op_reshape(m, node, ins):
    x, shape = ins[0], _ints(ins[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    b0, b = m.declared_batch, m.running_batch
    if b0 is not None and b is not None and b != b0 and shape and shape[0] == b0 and x.dim() and x.shape[0] == b:
        # a fixed-batch export run on another batch: the leading dim is the batch (x carries it)
        shape = [b] + list(shape[1:])
    return x.reshape(shape)


def op_flatten(m, node, ins):
    x = ins[0]
    axis = int(node.attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _axes(node, ins, idx=1):
    if len(ins) > idx and ins[idx] is not None:
        return _ints(ins[idx])
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def op_unsqueeze(m, node, ins):
    x, axes = ins[0], _axes(node, ins)
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return x


def op_squeeze(m, node, ins):
    x, axes = ins[0], _axes(node, ins)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _resize_coords(out_size, in_size, scale, mode):
    o = torch.arange(out_size, dtype=torch.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(o)
    if mode == "align_corners":
        return o * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(o)
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / (scale * in_size))
        return offset + (o + 0.5) / scale - 0.5
    raise OnnxoptError(f"Resize coordinate_transformation_mode '{mode}' is not supported by the torch converter.", "use half_pixel/asymmetric/align_corners")


def op_resize(m, node, ins):
    x = ins[0]
    a = node.attrs
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel" if m.opset >= 11 else "asymmetric")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if node.op == "Upsample":
        scales_t, sizes_t = (ins[1].tolist() if len(ins) > 1 else a["scales"]), None
        ctm, nearest = "asymmetric", "floor"
    else:
        scales_t = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        sizes_t = ins[3] if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
        if m.opset < 11:
            scales_t = ins[1]
    if sizes_t is not None:
        sizes = _ints(sizes_t)
        scales = [o / i for o, i in zip(sizes, x.shape)]
    else:
        scales = [float(v) for v in (scales_t.tolist() if isinstance(scales_t, torch.Tensor) else scales_t)]
        sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    if mode not in ("nearest", "linear"):
        raise OnnxoptError(f"Resize mode '{mode}' is not supported by the torch converter.", "use nearest or linear")
    y = x
    for ax in range(x.dim()):
        if sizes[ax] == x.shape[ax] and scales[ax] == 1.0:
            continue
        coords = _resize_coords(sizes[ax], x.shape[ax], scales[ax], ctm)
        n = x.shape[ax]
        if mode == "nearest":
            if nearest in ("round_prefer_floor", "round_prefer_ceil"):  # torch.round breaks ties to even
                tie = coords.floor() if nearest == "round_prefer_floor" else coords.ceil()
                idx = torch.where(coords == coords.floor() + 0.5, tie, torch.round(coords))
            else:
                idx = coords.floor() if nearest == "floor" else coords.ceil()
            idx = idx.clamp(0, n - 1).long().to(x.device)
            y = y.index_select(ax, idx)
        else:
            c = coords.clamp(0, n - 1)
            i0 = c.floor().long()
            i1 = (i0 + 1).clamp(max=n - 1)
            w1 = fakequant.along_axis_of((c - i0.double()).to(x.dtype).to(x.device), x, ax)
            y = y.index_select(ax, i0.to(x.device)) * (1 - w1) + y.index_select(ax, i1.to(x.device)) * w1
    return y


def _pool(m, node, ins, kind):
    x = ins[0]
    kernel = list(node.attrs["kernel_shape"])
    rank = len(kernel)
    pads, strides, dil = _conv_pads(node, x, kernel)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include = bool(node.attrs.get("count_include_pad", 0))
    if pads[:rank] != pads[rank:] or any(p > k // 2 for p, k in zip(pads, kernel * 2)):  # beyond torch's pooling pads
        # padded here, so the padding is input to torch: with ceil_mode, crop the windows ONNX drops
        # (those starting in the end padding)
        crop = _ceil_crop(x, pads, kernel, strides, dil) if ceil else None
        if kind == "avg" and not include and any(pads):
            # the mean over the window's real pixels: the zero-padded sum over the padded count
            # (Caffe2-era GoogLeNet exports have such a pool)
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
            ones = F.pad(torch.ones_like(x[:1, :1]), _spatial_pads(pads, rank), value=0.0)
            xp = F.pad(x, _spatial_pads(pads, rank), value=0.0)
            y = pool(xp, kernel, strides, 0, ceil, True) / pool(ones, kernel, strides, 0, ceil, True)
            return y[crop] if crop else y
        x = F.pad(x, _spatial_pads(pads, rank), value=float("-inf") if kind == "max" else 0.0)
        pads = [0] * (2 * rank)
    else:
        crop = None
    if kind == "max":
        y = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1](x, kernel, strides, pads[:rank], dil, ceil)
    else:
        y = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1](x, kernel, strides, pads[:rank], ceil, include)
    return y[crop] if crop else y


def _ceil_crop(x, pads: list, kernel: list, strides: list, dil: list) -> tuple:
    """The slice of a ceil-mode pool over an explicitly padded ``x`` that ONNX keeps: per spatial
    axis, ``ceil((in + pads - dil*(k-1) - 1) / stride) + 1`` windows, less the last one when it
    would start in the end padding."""
    rank = len(kernel)
    keep = [slice(None), slice(None)]
    for i in range(rank):
        size, begin = x.shape[2 + i], pads[i]
        n = -(-(size + pads[i] + pads[i + rank] - dil[i] * (kernel[i] - 1) - 1) // strides[i]) + 1
        if (n - 1) * strides[i] >= size + begin:
            n -= 1
        keep.append(slice(0, n))
    return tuple(keep)


def _reduce(fn_name):
    def op(m, node, ins):
        x = ins[0]
        axes = _axes(node, ins)
        keep = bool(node.attrs.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [a % x.dim() for a in axes]
        if fn_name in ("mean", "sum"):
            return getattr(x, fn_name)(dim=axes, keepdim=keep)
        if fn_name in ("l1", "l2", "sum_square"):   # the norms F.normalize and embedding heads export
            y = (x.abs() if fn_name == "l1" else x * x).sum(dim=axes, keepdim=keep)
            return y.sqrt() if fn_name == "l2" else y
        for a in sorted(axes, reverse=True):
            x = (x.amax if fn_name == "max" else x.amin)(dim=a, keepdim=keep)
        return x
    return op


def op_lp_normalization(m, node, ins):
    """x / ||x||_p along ``axis`` (p 1 or 2), without F.normalize's eps, as onnxruntime computes it."""
    x, p = ins[0], int(node.attrs.get("p", 2))
    norm = x.abs().sum(dim=int(node.attrs.get("axis", -1)), keepdim=True) if p == 1 else \
        (x * x).sum(dim=int(node.attrs.get("axis", -1)), keepdim=True).sqrt()
    return x / norm


def op_lrn(m, node, ins):
    """Local response normalization across channels, ONNX's window: ``floor((size-1)/2)`` channels
    before and ``ceil((size-1)/2)`` after (torch's local_response_norm centres even windows the other
    way). AlexNet, GoogLeNet and ZFNet exports have it."""
    x, size = ins[0], int(node.attrs["size"])
    alpha, beta, bias = (float(node.attrs.get(k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    sq = x * x
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    pad = lambda n: sq.new_zeros((sq.shape[0], n, *sq.shape[2:]))  # noqa: E731
    window = torch.cat([pad(before), sq, pad(after)], dim=1).unfold(1, size, 1).sum(-1)
    return x / (bias + alpha / size * window) ** beta


def op_shape(m, node, ins):
    shape = list(ins[0].shape)[int(node.attrs.get("start", 0)):node.attrs.get("end")]
    return torch.tensor(shape, dtype=torch.int64, device=ins[0].device)


def op_gather(m, node, ins):
    x, idx = ins[0], ins[1].long()
    axis = int(node.attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def op_constant_of_shape(m, node, ins):
    shape = _ints(ins[0])
    v = node.attrs.get("value")
    if v is None:
        return torch.zeros(shape, dtype=torch.float32, device=ins[0].device)
    arr = numpy_helper.to_array(v).reshape(-1)
    return torch.full(shape, arr[0].item(), dtype=_ONNX_TO_TORCH[v.data_type], device=ins[0].device)


def op_softmax(fn):
    def op(m, node, ins):
        x = ins[0]
        if m.opset < 13:
            axis = int(node.attrs.get("axis", 1)) % x.dim()
            return fn(x.reshape(int(np.prod(x.shape[:axis])), -1), dim=1).reshape(x.shape)
        return fn(x, dim=int(node.attrs.get("axis", -1)))
    return op


def op_quantize(m, node, ins):
    """A standalone QuantizeLinear (not fused with a DequantizeLinear): exact, STE while training;
    the integers are carried as a float tensor so that gradients flow."""
    x, s, zp = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    zp_type = m.onnx_dtypes.get(node.inputs[2], TensorProto.UINT8) if zp is not None else TensorProto.UINT8
    lo, hi = INT_RANGE_OF_TYPE.get(zp_type, (0, 255))
    axis = None if s.numel() == 1 else int(node.attrs.get("axis", 1))
    sb = fakequant.along_axis_of(s, x, axis)
    z = fakequant.along_axis_of(zp.to(x.dtype), x, axis) if zp is not None else 0.0
    return torch.clamp(fakequant.round_ste(x / sb) + z, lo, hi)


def op_dequantize(m, node, ins):
    x, s, zp = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    xf = x.to(s.dtype) if not x.is_floating_point() else x
    axis = None if s.numel() == 1 else int(node.attrs.get("axis", 1))
    sb = fakequant.along_axis_of(s, xf, axis)
    if zp is not None:
        xf = xf - fakequant.along_axis_of(zp.to(s.dtype), xf, axis)
    return xf * sb


def op_expand(m, node, ins):
    x, shape = ins[0], _ints(ins[1])
    r = max(x.dim(), len(shape))
    xs = [1] * (r - x.dim()) + list(x.shape)
    ss = [1] * (r - len(shape)) + shape
    target = [max(a, b) if b != 1 else a for a, b in zip(xs, ss)]
    return x.reshape(xs).expand(target)


def op_pow(m, node, ins):
    x, p = ins
    if p.numel() == 1 and float(p) == 2.0:
        return x * x
    return torch.pow(x, p.to(x.dtype))


def op_lrn_free(fn):
    return lambda m, node, ins: fn(ins[0])


def op_variadic(fn):
    """Min / Max / Sum of any number of inputs (ONNX gives them one type), pairwise from the left."""
    def op(m, node, ins):
        y = ins[0]
        for t in ins[1:]:
            y = fn(y, t.to(y.dtype))
        return y
    return op


def op_layernorm(m, node, ins):
    x, w, b = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    axis = int(node.attrs.get("axis", -1)) % x.dim()
    return F.layer_norm(x, list(x.shape[axis:]), w, b, float(node.attrs.get("epsilon", 1e-5)))


def op_depth_to_space(m, node, ins):
    x = ins[0]
    b = int(node.attrs["blocksize"])
    n, c, h, w = x.shape
    if node.attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def op_space_to_depth(m, node, ins):
    x = ins[0]
    b = int(node.attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def op_mod(m, node, ins):
    a, b = ins
    dtype = a.dtype
    if dtype in (torch.uint16, torch.uint32, torch.uint64):   # torch has no remainder for these
        a, b = a.to(torch.int64), b.to(torch.int64)
    # fmod=1: the sign of the dividend (C fmod); 0: the sign of the divisor (Python %)
    y = torch.fmod(a, b) if int(node.attrs.get("fmod", 0)) else torch.remainder(a, b)
    return y.to(dtype)


def op_gather_nd(m, node, ins):
    data, idx = ins   # batch_dims 0 (_unsupported_form refuses the rest)
    idx = torch.where(idx < 0, idx + torch.tensor(data.shape[:idx.shape[-1]], device=idx.device), idx)
    return data[tuple(idx.unbind(-1))]


def _rnn_weights(ins, gates: int):
    """(W, R, the input bias Wb, the recurrent bias Rb, hidden size) of an ONNX GRU/LSTM, per direction."""
    w, r = ins[1], ins[2]
    hidden = r.shape[-1]
    b = ins[3] if len(ins) > 3 and ins[3] is not None else torch.zeros(w.shape[0], 2 * gates * hidden, dtype=w.dtype, device=w.device)
    return w, r, b[:, :gates * hidden], b[:, gates * hidden:], hidden


def _rnn_input(node, ins, kind: str):
    """The sequence [T, N, I] of an ONNX recurrent node (activations and clip: _unsupported_form)."""
    x = ins[0].transpose(0, 1) if int(node.attrs.get("layout", 0)) else ins[0]
    if len(ins) > 4 and ins[4] is not None and bool((ins[4] != x.shape[0]).any()):   # values: known only here
        raise OnnxoptError(f"the torch converter does not support {kind} with sequences shorter than the input "
                           "(sequence_lens).", "finetune needs every op of the graph in torch; file an issue with the model")
    return x


def _rnn_outputs(node, ys: list, finals: list):
    """ONNX's Y [T, D, N, H] and Y_h [D, N, H] (layout 1: batch first) from each direction's steps."""
    y = torch.stack([torch.stack(steps) for steps in ys], dim=1)
    h = torch.stack(finals)
    if int(node.attrs.get("layout", 0)):
        return y.permute(2, 0, 1, 3), h.transpose(0, 1)
    return y, h


def _initial(node, ins, k: int, d: int, x, hidden: int):
    """Direction ``d``'s initial state from input ``k`` ([D, N, H]; layout 1: [N, D, H]), else zeros."""
    if len(ins) > k and ins[k] is not None:
        return ins[k][:, d] if int(node.attrs.get("layout", 0)) else ins[k][d]
    return x.new_zeros(x.shape[1], hidden)


def _directions(node, x):
    order = list(range(x.shape[0]))
    return {"forward": [order], "reverse": [order[::-1]], "bidirectional": [order, order[::-1]]}[node.attrs.get("direction", "forward")]


def op_gru(m, node, ins):
    """ONNX GRU (gates z, r, h; linear_before_reset) step by step, default activations."""
    x = _rnn_input(node, ins, "GRU")
    w, r, wb, rb, hidden = _rnn_weights(ins, 3)
    lbr = int(node.attrs.get("linear_before_reset", 0))
    ys, finals = [], []
    for d, order in enumerate(_directions(node, x)):
        h = _initial(node, ins, 5, d, x, hidden)
        steps = [None] * len(order)
        for t in order:
            gx = x[t] @ w[d].T + wb[d]
            gh = h @ r[d].T
            z = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden] + rb[d, :hidden])
            rr = torch.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden] + rb[d, hidden:2 * hidden])
            rh = r[d, 2 * hidden:]
            if lbr:
                n = torch.tanh(gx[:, 2 * hidden:] + rr * (h @ rh.T + rb[d, 2 * hidden:]))
            else:
                n = torch.tanh(gx[:, 2 * hidden:] + (rr * h) @ rh.T + rb[d, 2 * hidden:])
            h = (1 - z) * n + z * h
            steps[t] = h
        ys.append(steps)
        finals.append(h)
    return _rnn_outputs(node, ys, finals)


def op_lstm(m, node, ins):
    """ONNX LSTM (gates i, o, f, c; peepholes P: i, o, f) step by step, default activations."""
    x = _rnn_input(node, ins, "LSTM")
    w, r, wb, rb, hidden = _rnn_weights(ins, 4)
    b = wb + rb
    p = ins[7] if len(ins) > 7 and ins[7] is not None else x.new_zeros(w.shape[0], 3 * hidden)
    ys, finals, cells = [], [], []
    for d, order in enumerate(_directions(node, x)):
        h, c = _initial(node, ins, 5, d, x, hidden), _initial(node, ins, 6, d, x, hidden)
        steps = [None] * len(order)
        for t in order:
            g = x[t] @ w[d].T + h @ r[d].T + b[d]
            i, o, f, cc = g.split(hidden, dim=1)
            pi, po, pf = p[d].split(hidden)
            c = torch.sigmoid(f + pf * c) * c + torch.sigmoid(i + pi * c) * torch.tanh(cc)
            h = torch.sigmoid(o + po * c) * torch.tanh(c)
            steps[t] = h
        ys.append(steps)
        finals.append(h)
        cells.append(c)
    y, h = _rnn_outputs(node, ys, finals)
    c = torch.stack(cells)
    return y, h, (c.transpose(0, 1) if int(node.attrs.get("layout", 0)) else c)


_OPS: Dict[str, Callable] = {
    "Conv": op_conv, "ConvTranspose": op_conv_transpose, "Gemm": op_gemm,
    "MatMul": lambda m, n, i: torch.matmul(i[0], i[1]),
    "BatchNormalization": op_bn, "LayerNormalization": op_layernorm,
    "InstanceNormalization": lambda m, n, i: F.instance_norm(i[0], weight=i[1], bias=i[2],
                                                             eps=float(n.attrs.get("epsilon", 1e-5))),
    "Relu": op_lrn_free(F.relu), "Sigmoid": op_lrn_free(torch.sigmoid), "Tanh": op_lrn_free(torch.tanh),
    "Exp": op_lrn_free(torch.exp), "Log": op_lrn_free(torch.log), "Erf": op_lrn_free(torch.erf),
    "Sqrt": op_lrn_free(torch.sqrt), "Neg": op_lrn_free(torch.neg), "Abs": op_lrn_free(torch.abs),
    "Reciprocal": op_lrn_free(torch.reciprocal), "Floor": op_lrn_free(torch.floor), "Ceil": op_lrn_free(torch.ceil),
    "Softplus": op_lrn_free(F.softplus), "Mish": op_lrn_free(F.mish), "Sign": op_lrn_free(torch.sign),
    "Not": op_lrn_free(torch.logical_not), "Round": op_lrn_free(torch.round),
    "Identity": lambda m, n, i: i[0], "Dropout": lambda m, n, i: i[0],
    "Clip": op_clip,
    "LeakyRelu": lambda m, n, i: F.leaky_relu(i[0], float(n.attrs.get("alpha", 0.01))),
    "Elu": lambda m, n, i: F.elu(i[0], float(n.attrs.get("alpha", 1.0))),
    "Selu": lambda m, n, i: F.selu(i[0]),
    "PRelu": lambda m, n, i: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "HardSigmoid": lambda m, n, i: torch.clamp(i[0] * float(n.attrs.get("alpha", 0.2)) + float(n.attrs.get("beta", 0.5)),
                                               0.0, 1.0),
    "HardSwish": lambda m, n, i: i[0] * torch.clamp(i[0] * (1.0 / 6.0) + 0.5, 0.0, 1.0),
    "Gelu": lambda m, n, i: F.gelu(i[0], approximate=n.attrs.get("approximate", "none")),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": op_pow,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Min": op_variadic(torch.minimum), "Max": op_variadic(torch.maximum), "Sum": op_variadic(torch.add),
    "Where": lambda m, n, i: torch.where(i[0].bool(), i[1], i[2].to(i[1].dtype)),
    "Pad": op_pad, "Slice": op_slice, "Concat": op_concat, "Split": op_split, "Reshape": op_reshape,
    "Flatten": op_flatten, "Unsqueeze": op_unsqueeze, "Squeeze": op_squeeze,
    "Transpose": lambda m, n, i: i[0].permute(*(n.attrs.get("perm") or reversed(range(i[0].dim())))),
    "Resize": op_resize, "Upsample": op_resize,
    "MaxPool": lambda m, n, i: _pool(m, n, i, "max"), "AveragePool": lambda m, n, i: _pool(m, n, i, "avg"),
    "GlobalAveragePool": lambda m, n, i: i[0].mean(dim=list(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda m, n, i: i[0].amax(dim=list(range(2, i[0].dim())), keepdim=True),
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"), "ReduceMin": _reduce("min"),
    "ReduceL1": _reduce("l1"), "ReduceL2": _reduce("l2"), "ReduceSumSquare": _reduce("sum_square"),
    "LpNormalization": op_lp_normalization, "LRN": op_lrn,
    "Shape": op_shape, "Size": lambda m, n, i: torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device),
    "Gather": op_gather, "ConstantOfShape": op_constant_of_shape,
    "Cast": lambda m, n, i: i[0].to(_ONNX_TO_TORCH[int(n.attrs["to"])]),
    "Softmax": op_softmax(torch.softmax), "LogSoftmax": op_softmax(torch.log_softmax),
    "QuantizeLinear": op_quantize, "DequantizeLinear": op_dequantize,
    "Expand": op_expand, "Tile": lambda m, n, i: i[0].repeat(*_ints(i[1])),
    "Range": lambda m, n, i: torch.arange(*(v.item() for v in i[:3]), dtype=i[0].dtype, device=i[0].device),
    "ArgMax": lambda m, n, i: torch.argmax(i[0], dim=int(n.attrs.get("axis", 0)),
                                           keepdim=bool(n.attrs.get("keepdims", 1))),
    "DepthToSpace": op_depth_to_space, "SpaceToDepth": op_space_to_depth,
    "Mod": op_mod, "GatherND": op_gather_nd, "CastLike": lambda m, n, i: i[0].to(i[1].dtype),
    "NonZero": lambda m, n, i: torch.nonzero(i[0]).T.contiguous(),
    "GRU": op_gru, "LSTM": op_lstm,
}

def _declared_batch(g, input_names) -> Optional[int]:
    """The fixed leading dimension shared by every graph input, or None (symbolic or mixed)."""
    dims = set()
    for i in g.input:
        if i.name in input_names:
            shape = i.type.tensor_type.shape.dim
            if not shape or not shape[0].HasField("dim_value") or shape[0].dim_value <= 0:
                return None
            dims.add(shape[0].dim_value)
    return dims.pop() if len(dims) == 1 else None


def to_torch(model: ModelProto, **kwargs) -> OnnxModule:
    """Convert an ONNX model to a trainable :class:`OnnxModule` (see the module docstring)."""
    return OnnxModule(model, **kwargs)
