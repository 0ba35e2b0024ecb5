"""Pattern helpers the rule families share: a tensor's producer, a scalar constant's value,
ranks and static shapes."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value


def producer(t: Optional[gs.Tensor]) -> Optional[gs.Node]:
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def scalar(t: Optional[gs.Tensor]) -> Optional[float]:
    """The value of a one-element numeric constant, else None."""
    v = constant_value(t)
    if v is None or v.size != 1 or v.dtype.kind not in "fiu":
        return None
    return float(np.asarray(v).reshape(-1)[0])


def rank(t: gs.Tensor) -> Optional[int]:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def static_shape(t: gs.Tensor) -> Optional[list]:
    shape = getattr(t, "shape", None)
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def near(a: Optional[float], b: float, rtol: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rtol * max(abs(b), 1e-12)
