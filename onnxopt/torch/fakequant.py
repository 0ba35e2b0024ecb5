"""Fake quantization with a straight-through estimator (STE), as ONNX Q/DQ pairs compute it.

Forward (eval and train alike) is bit-exact with onnxruntime's QuantizeLinear -> DequantizeLinear.
Backward, by ``mode``: ``lsq`` (Esser et al., *Learned Step Size Quantization*) scales the step
size's gradient by 1/sqrt(n * qmax) (n = elements per scale) so that it learns at the pace of the
weights; ``pact`` (Choi et al., *PACT*) learns the clipping range, the rounding error treated as a
constant; ``fixed`` trains no scale (the STE still passes gradients to x). Binary and ternary
weights (micronet, XNOR-Net / TWN) compute their scale factors from the latent weights every step
instead of learning a step; they export as int8 values in [-1, 1].
"""
from __future__ import annotations

import math
from typing import Optional

import torch

MODES = ("lsq", "pact", "fixed")


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """round half to even forward, identity backward."""
    return v + (torch.round(v) - v).detach()


def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """Value s, gradient g * ds (the LSQ step-size gradient scale)."""
    return (s - s * g).detach() + s * g


def along_axis_of(param: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Broadcast a per-channel parameter along ``axis`` of ``x`` (scalars stay as they are)."""
    if axis is None or param.dim() == 0 or param.numel() == 1 and x.dim() == 0:
        return param
    ax = axis % x.dim()
    shape = [1] * x.dim()
    shape[ax] = -1
    return param.reshape(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: Optional[int] = None, mode: str = "lsq", training: bool = False) -> torch.Tensor:
    """Q -> DQ of ``x`` with the STE of ``mode`` while training; exact ONNX arithmetic otherwise."""
    s = along_axis_of(scale, x, axis)
    zp = along_axis_of(zero_point.to(x.dtype), x, axis)
    if not training or not (x.requires_grad or scale.requires_grad):
        q = torch.clamp(torch.round(x / s) + zp, qmin, qmax)
        return (q - zp) * s
    if mode == "fixed":
        s = s.detach()
    elif mode == "lsq" and scale.requires_grad:
        per = max(1, x.numel() // max(1, scale.numel()))
        s = _grad_scale(s, 1.0 / math.sqrt(per * max(1, qmax)))
    lo = (qmin - zp) * s
    hi = (qmax - zp) * s
    xc = torch.minimum(torch.maximum(x, lo), hi)  # gradient to s (via lo/hi) from the clipped region
    if mode == "pact":
        with torch.no_grad():
            err = (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s - xc
        return xc + err
    return round_ste(xc / s) * s


def binary_weight(w: torch.Tensor, axis: Optional[int]) -> tuple:
    """(fake-quantized w, q in {-1, 1}, scale per channel): XNOR-style sign with mean |w| scale."""
    a = w.abs()
    if axis is None:
        s = a.mean().clamp_min(1e-12)
    else:
        s = a.transpose(0, axis).reshape(w.shape[axis], -1).mean(1).clamp_min(1e-12)
    q = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    return _ste_to(w, q * along_axis_of(s, w, axis)), q.detach(), s.detach()


def ternary_weight(w: torch.Tensor, axis: Optional[int]) -> tuple:
    """(fake-quantized w, q in {-1, 0, 1}, scale): TWN threshold 0.7 mean|w|, scale = mean of kept |w|."""
    a = w.abs()
    if axis is None:
        delta = 0.7 * a.mean()
        keep = (a > delta).to(w.dtype)
        s = ((a * keep).sum() / keep.sum().clamp_min(1)).clamp_min(1e-12)
    else:
        flat_a = a.transpose(0, axis).reshape(w.shape[axis], -1)
        delta = 0.7 * flat_a.mean(1)
        keep_flat = (flat_a > delta[:, None]).to(w.dtype)
        s = ((flat_a * keep_flat).sum(1) / keep_flat.sum(1).clamp_min(1)).clamp_min(1e-12)
        keep = (a > along_axis_of(delta, w, axis)).to(w.dtype)
    q = torch.sign(w) * keep
    return _ste_to(w, q * along_axis_of(s, w, axis)), q.detach(), s.detach()


def _ste_to(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, gradient straight through to ``w``."""
    return w + (value - w).detach()
