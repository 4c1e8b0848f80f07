"""The torch path of the kernel: normalize + affine (+ activation) from given statistics.

Written with differentiable torch ops, so autograd derives the exact backward for every way the
statistics were produced (local, ghost, synced, renormalized), and ``torch.func`` and
``torch.compile`` see ordinary ops. Arithmetic is in the accumulation dtype of the statistics
(float32 for half input); the output has the input's dtype and memory format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import apply_activation

__all__ = ["normalize", "normalize_running", "is_exporting", "eval_scale_shift"]


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) statistics broadcast over (N, C, *); (N, C) per-example statistics keep their batch dimension."""
    lead = v.shape if v.dim() == 2 else (1, -1)
    return v.reshape(tuple(lead) + (1,) * (ndim - 2))


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float, activation: str = "identity",
              negative_slope: float = 0.01) -> torch.Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` per channel (dimension 1).

    ``mean``/``var`` are ``(C,)``, or ``(N, C)`` for statistics that differ per example.
    """
    acc = mean.dtype
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x.to(acc) - _channel_view(mean, x.dim())) * _channel_view(scale, x.dim())
    if bias is not None:
        y = y + _channel_view(bias.to(acc), x.dim())
    return apply_activation(y, activation, negative_slope).to(x.dtype)


def is_exporting() -> bool:
    """True while torch.export, torch.onnx.export (either exporter) or torch.jit.trace runs the model."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def normalize_running(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                      activation: str = "identity", negative_slope: float = 0.01) -> torch.Tensor:
    """Normalize with the running statistics (eval mode): torch's own ``batch_norm(training=False)``.

    It is torch.nn's eval computation, so the numbers are torch's (``x * scale + shift``), it is one
    fused pass on every device, and exported graphs hold one standard batch-norm node (ONNX
    ``BatchNormalization``) that runtimes run fused and optimizers fold into the preceding convolution.
    The activation follows as a separate op, as ``BatchNorm2d`` followed by ``ReLU`` would.
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, momentum=0.0, eps=eps)
    return apply_activation(y, activation, negative_slope)


def eval_scale_shift(running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval batch norm as one per-channel affine map ``x * scale + shift`` (detached, in ``dtype``):
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
    scale = torch.rsqrt(running_var.detach().to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(dtype)
    shift = -running_mean.detach().to(dtype) * scale
    if bias is not None:
        shift = shift + bias.detach().to(dtype)
    return scale, shift
