"""What each dimension of a model's inputs is -- batch, spatial, sequence or other -- read from its
name and the input's layout, and the ``--input-shape`` hint built from it (a leaf module)."""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import ModelProto, helper

BATCH_NAME = re.compile(r"batch|^(n|b|bs|N|B)$", re.I)
SPATIAL_NAME = re.compile(r"height|width|^(h|w|H|W)$")
SEQUENCE_NAME = re.compile(r"seq|len|time|token|step|sentence|word|char|frame|^(t|T|L)$", re.I)


def real_inputs(model: ModelProto) -> list:
    """The graph inputs a caller feeds (initializer-backed inputs excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def shape_hint(vi: onnx.ValueInfoProto) -> str:
    """``--input-shape`` text in the input's own rank: known dims as they are, batch 1, others
    named after their dimension (``tokens:1xSEQ``, ``x:1x3xHxW``)."""
    dims = []
    if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
        rank = len(vi.type.tensor_type.shape.dim)
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(str(d.dim_value))
            elif dim_role(vi, axis, rank, d.dim_param) == "batch":
                dims.append("1")
            else:
                dims.append(placeholder(d.dim_param, axis, rank))
    return f"{vi.name}:{'x'.join(dims)}" if dims else f"{vi.name}:1"


def placeholder(param: str, axis: int, rank: int) -> str:
    if param and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,11}", param):
        return param.upper()
    if rank == 4 and axis in (2, 3):
        return "HW"[axis - 2]
    return f"D{axis}"


def dim_role(vi: onnx.ValueInfoProto, axis: int, rank: int, param: str) -> str:
    """batch | spatial | sequence | other, from the dim's name and the input's layout."""
    tt = vi.type.tensor_type
    is_float = bool(tt.elem_type) and np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).kind == "f"
    static = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if param and BATCH_NAME.search(param):
        return "batch"
    if param and SPATIAL_NAME.search(param):
        return "spatial"
    if is_float and rank in (4, 5):  # images / volumes: NCHW, NHWC (3 or 1 channels last), NCDHW
        if axis == 0:
            return "batch"
        if rank == 4 and static[3] in (1, 3, 4) and axis in (1, 2):
            return "spatial"
        return "spatial" if axis >= 2 else "other"
    if param and SEQUENCE_NAME.search(param):
        return "sequence"
    if axis == 0 and rank >= 2:
        return "batch"
    if (not is_float and rank == 2 and axis == 1) or (rank == 3 and axis == 1) or (rank == 1 and not is_float):
        return "sequence"
    return "other"
