"""``resize_sizes_to_scales`` (exact): ``Resize(sizes)`` becomes ``Resize(scales = sizes / in)``
when the input shape is static and float32 scales reproduce the sizes exactly."""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, input_at
from .engine import Match, rule
from .patterns import static_shape


def rewrite_resize(graph, m, ctx):
    node = m.data["node"]
    roi = input_at(node, 1)
    if roi is None:
        roi = ctx.constant(f"{m.output.name}_roi", np.zeros(0, np.float32)) if ctx.opset < 13 else gs.Variable.empty()
    scales = ctx.constant(f"{m.output.name}_scales", m.data["scales"])
    ctx.replace_output(m.output, "Resize", [node.inputs[0], roi, scales], dict(node.attrs), base=f"{m.output.name}_resize")


@rule("resize_sizes_to_scales", "Resize given by sizes -> scales (static shapes)",
      exact=True, anchors=('Resize',), rewrite=rewrite_resize, priority=30)
def match_resize(graph, node, ctx):
    """Resize with constant ``sizes`` and a static input shape."""
    sizes_t = input_at(node, 3)
    if ctx.opset < 11 or sizes_t is None:
        return None
    sizes = constant_value(sizes_t)
    if sizes is None:
        return "sizes is not a constant"
    policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if policy != "stretch":
        return f"keep_aspect_ratio_policy={policy}"
    shape = static_shape(node.inputs[0])
    if shape is None:
        return "the input shape is not static"
    axes = node.attrs.get("axes")
    axes = list(range(len(shape))) if axes is None else [int(a) % len(shape) for a in axes]
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    scales = []
    for a, s in zip(axes, sizes):
        sc = np.float32(s / shape[a])
        for _ in range(4):  # float32 rounding may put in*scale just below the size: nudge up
            if int(np.floor(np.float32(sc) * np.float32(shape[a]))) == s and int(math.floor(float(sc) * shape[a])) == s:
                break
            sc = np.nextafter(sc, np.float32(np.inf))
        else:
            return f"no float32 scale reproduces size {s} from {shape[a]}"
        scales.append(sc)
    return Match(node.outputs[0], {"node": node, "scales": np.array(scales, np.float32)})
