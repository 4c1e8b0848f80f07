"""The torch path of the kernel: normalize + affine (+ activation) from given statistics.

Written with differentiable torch ops, so autograd derives the exact backward for every way the
statistics were produced (local, ghost, synced, renormalized), and ``torch.func`` and
``torch.compile`` see ordinary ops. Arithmetic is in the accumulation dtype of the statistics
(float32 for half input); the output has the input's dtype and memory format.
"""
from __future__ import annotations

import torch

from .activations import apply_activation

__all__ = ["normalize"]


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    # (C,) broadcasts over every sample; (N, C) holds per-sample statistics (ghost batch norm).
    return v.reshape((1, -1) + (1,) * (ndim - 2)) if v.dim() == 1 else v.reshape(v.shape + (1,) * (ndim - 2))


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float, activation: str = "identity",
              negative_slope: float = 0.01) -> torch.Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` per channel (dimension 1).

    ``mean``/``var`` have shape ``(C,)``, or ``(N, C)`` for statistics that differ per sample.
    """
    acc = mean.dtype
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x.to(acc) - _channel_view(mean, x.dim())) * _channel_view(scale, x.dim())
    if bias is not None:
        y = y + _channel_view(bias.to(acc), x.dim())
    return apply_activation(y, activation, negative_slope).to(x.dtype)
