"""Write what an :class:`~onnxopt.torch.convert.OnnxModule` learned back into its ONNX graph.

The graph's structure is untouched; only constant *values* change, under their own names:

* float parameters (weights, biases, BN affine, Q/DQ scales) -> their initializer or Constant node,
  in the tensor's original dtype;
* BN running statistics (re-estimated with ``--bn-recalib``) -> their initializers;
* latent quantized weights -> ``w_q = clamp(round_half_even(w / s) + zp, qmin, qmax)`` in the
  original integer type (int8, restricted ranges, int4/uint4 at opset >= 21), with the learned
  scale ``s``; binary/ternary weights as {-1, 1} / {-1, 0, 1} with their scale factors;
* int32 biases -> ``b_q = round(b / (s_in * s_w))`` with their scale initializer set to
  ``s_in * s_w`` computed from the learned scales;
* a restricted-range Clip before an activation Q -> bounds ``(qmin - zp) * s``, ``(qmax - zp) * s``.

Every value is computed by the same torch arithmetic the module's eval forward uses, so the
written model's onnxruntime output matches ``module.eval()(x)`` (up to float summation order).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ..quant.view import INT_RANGE_OF_TYPE
from .convert import OnnxModule

_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
       TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
       TensorProto.INT32: np.int32, TensorProto.INT64: np.int64, TensorProto.UINT16: np.uint16}


def _tensor(name: str, value: np.ndarray, dtype: int) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, list(value.shape), value.astype(np.int64).reshape(-1).tolist())
    if dtype == TensorProto.BFLOAT16:
        return helper.make_tensor(name, dtype, list(value.shape), value.astype(np.float32).reshape(-1).tolist())
    return numpy_helper.from_array(np.array(value, dtype=_NP[dtype], order="C"), name)


def learned_values(module: OnnxModule) -> dict:
    """{onnx name: (numpy value, onnx dtype)} of every constant the module may have changed."""
    out: dict = {}
    latents = set(module.weight_quants) | set(module.bias_quants)
    with torch.no_grad():
        for name, key in module.param_names.items():
            if name in latents:
                continue
            out[name] = (module.params[key].detach().cpu().numpy(), module.onnx_dtypes.get(name, TensorProto.FLOAT))
        for name, key in module.buffer_names.items():
            v = getattr(module.consts, key)
            if name in module.bn_stats and v.is_floating_point():  # the only buffers training changes
                out[name] = (v.detach().cpu().numpy(), module.onnx_dtypes.get(name, TensorProto.FLOAT))
        for name, wq in module.weight_quants.items():
            q, s = module.quantized_weight(wq)
            out[name] = (q.cpu().numpy().round(), wq.dtype)
            out[wq.scale] = (s.detach().cpu().numpy().astype(np.float32), module.onnx_dtypes.get(wq.scale, TensorProto.FLOAT))
        for name, bq in module.bias_quants.items():
            s = module.bias_scale(bq)
            b = module.value(name).detach()
            lo, hi = INT_RANGE_OF_TYPE[TensorProto.INT32]
            out[name] = (torch.clamp(torch.round(b.double() / s.double()), lo, hi).cpu().numpy(), TensorProto.INT32)
            out[bq.scale] = (s.cpu().numpy().astype(np.float32), module.onnx_dtypes.get(bq.scale, TensorProto.FLOAT))
        for aq in module.act_quants:
            if aq.clip is None:
                continue
            s = module.value(aq.scale).detach().reshape(())
            zp = float(module.value(aq.zero_point).reshape(())) if aq.zero_point else 0.0
            for key, q in (("min", aq.qmin), ("max", aq.qmax)):
                name = aq.clip[key]
                out[name] = (((q - zp) * s).cpu().numpy().astype(np.float32), module.onnx_dtypes.get(name, TensorProto.FLOAT))
    return out


def write_back(module: OnnxModule, model: ModelProto) -> ModelProto:
    """A copy of ``model`` carrying the module's current values (see the module docstring)."""
    result = ModelProto()
    result.CopyFrom(model)
    values = learned_values(module)
    index = {t.name: i for i, t in enumerate(result.graph.initializer)}
    const_nodes = {n.output[0]: n for n in result.graph.node if n.op_type == "Constant" and n.output}
    for name, (value, dtype) in values.items():
        if name in index:
            old = result.graph.initializer[index[name]]
            value = value.reshape(tuple(old.dims))
            result.graph.initializer[index[name]].CopyFrom(_tensor(name, value, dtype))
        elif name in const_nodes:
            node = const_nodes[name]
            old = node.attribute[0]
            if old.name == "value":
                value = value.reshape(tuple(old.t.dims))
            t = _tensor("", value, dtype)
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("value", t)])
    return result
