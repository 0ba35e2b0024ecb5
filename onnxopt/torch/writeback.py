"""Write what an :class:`~onnxopt.torch.convert.OnnxModule` learned back into its ONNX graph.

The graph's structure is untouched; only constant *values* change, under their own names and in
their original dtypes: float parameters, BN statistics, latent weights re-quantized with their
learned scales, int32 biases with the scale ``s_in * s_w`` and restricted-range Clip bounds. Every
value is computed by the same torch arithmetic as the module's eval forward, so the written model's
onnxruntime output matches ``module.eval()(x)`` (up to float summation order).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ..quant.view import INT_RANGE_OF_TYPE
from .convert import OnnxModule


def _tensor(name: str, value: np.ndarray, dtype: int) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.UINT4, TensorProto.BFLOAT16):  # no numpy type: from a list
        as_list = value.astype(np.float32 if dtype == TensorProto.BFLOAT16 else np.int64).reshape(-1).tolist()
        return helper.make_tensor(name, dtype, list(value.shape), as_list)
    return numpy_helper.from_array(np.array(value, dtype=helper.tensor_dtype_to_np_dtype(dtype), order="C"), name)


def learned_values(module: OnnxModule) -> dict:
    """{onnx name: (numpy value, onnx dtype)} of every constant the module may have changed."""
    out: dict = {}
    latents = set(module.weight_quants) | set(module.bias_quants)
    with torch.no_grad():
        for name, key in module.param_names.items():
            if name not in latents:
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
        for aq in [q for q in module.act_quants if q.clip is not None]:
            s = module.value(aq.scale).detach().reshape(())
            zp = float(module.value(aq.zero_point).reshape(())) if aq.zero_point else 0.0
            for key, q in (("min", aq.qmin), ("max", aq.qmax)):
                name = aq.clip[key]
                out[name] = (((q - zp) * s).cpu().numpy().astype(np.float32), module.onnx_dtypes.get(name, TensorProto.FLOAT))
    return out


FLOAT16_MAX = 65504.0
_LOW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def write_back(module: OnnxModule, model: ModelProto, own_types: bool = False):
    """A copy of ``model`` carrying the module's current values (see the module docstring).

    ``own_types``: ``model`` is the float16/bfloat16 model whose float32 twin the module was built
    from; each learned float32 value is rounded to the type ``model`` stores it in, and None is
    returned where that cannot be done: a value with no tensor of its name in ``model`` (the
    twin's graph is not the model's), or one beyond float16's range."""
    result = ModelProto()
    result.CopyFrom(model)
    index = {t.name: i for i, t in enumerate(result.graph.initializer)}
    const_nodes = {n.output[0]: n for n in result.graph.node if n.op_type == "Constant" and n.output}
    for name, (value, dtype) in learned_values(module).items():
        if name in index:
            old = result.graph.initializer[index[name]]
        elif name in const_nodes and const_nodes[name].attribute[0].name == "value":
            old = const_nodes[name].attribute[0].t
        else:
            old = None
        if own_types:
            if old is None:
                return None
            if old.data_type in _LOW_FLOATS and dtype == TensorProto.FLOAT:
                if old.data_type == TensorProto.FLOAT16 and np.abs(value).max(initial=0.0) > FLOAT16_MAX:
                    return None
                dtype = old.data_type
        if name in index:
            old.CopyFrom(_tensor(name, value.reshape(tuple(old.dims)), dtype))
        elif name in const_nodes:
            node = const_nodes[name]
            if node.attribute[0].name == "value":
                value = value.reshape(tuple(node.attribute[0].t.dims))
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("value", _tensor("", value, dtype))])
    return result
