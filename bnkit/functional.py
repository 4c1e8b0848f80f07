"""``bnkit.functional.batch_norm``: ``torch.nn.functional.batch_norm``'s signature, plus extras.

Differences from torch, all deliberate and keyword-only:

* ``momentum=None`` means the cumulative average and needs ``num_batches_tracked`` (torch's
  functional form has no cumulative mode).
* ``num_batches_tracked``: a 0-d integer tensor incremented in place on each update.
* ``activation`` / ``negative_slope``: an activation applied after the affine.
* ``nonfinite``: what a batch with NaN/Inf statistics does to the running statistics:
  ``"skip"`` (default; keep the old values, warn), ``"raise"`` (error, buffers unchanged) or
  ``"propagate"`` (torch's behaviour: the running statistics become NaN). The output always shows
  the NaN, whatever the policy.
* ``name``: the layer name used in error messages.
"""
from __future__ import annotations

import warnings

import torch

from .ops import check_activation, normalize
from .stats import accumulation_dtype, batch_moments, unbiased_factor, update_running_stats
from .validation import check_batch_size, check_input

__all__ = ["batch_norm", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")


def check_nonfinite_policy(name: str, policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"{name}: nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def batch_statistics_update(name: str, mean: torch.Tensor, var: torch.Tensor, n: int | None,
                            running_mean, running_var, momentum, num_batches_tracked, nonfinite: str) -> None:
    """Fold one batch's ``(mean, biased var)`` over ``n`` values into the running statistics.

    Shared by every layer that updates running statistics from batch statistics. ``n=None``:
    ``var`` is already the unbiased estimate (ghost and synced statistics compute their own).
    """
    keep = None
    if nonfinite != "propagate":
        keep = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if not _is_compiling() and not bool(keep):
            bad = (~(torch.isfinite(mean) & torch.isfinite(var))).nonzero().flatten().tolist()
            msg = (f"{name}: batch statistics are NaN/Inf in channel(s) {bad[:10]}"
                   f"{' ...' if len(bad) > 10 else ''}; ")
            if nonfinite == "raise":
                raise FloatingPointError(msg + "the running statistics were left unchanged (nonfinite='raise').")
            warnings.warn(msg + "this batch was skipped: running statistics and num_batches_tracked are unchanged "
                          "(nonfinite='skip'). Check the input and the learning rate.", RuntimeWarning, stacklevel=4)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1 if keep is None else keep.to(num_batches_tracked.dtype))
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
        momentum = 1.0 / torch.clamp(num_batches_tracked, min=1).to(mean.dtype)
    unbiased = var if n is None else var * unbiased_factor(n)
    update_running_stats(running_mean, running_var, mean, unbiased, momentum, keep)


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: torch.Tensor | None = None, activation: str | None = None,
               negative_slope: float = 0.01, nonfinite: str = "skip", name: str = "batch_norm") -> torch.Tensor:
    """Batch normalization of an ``(N, C, *)`` tensor over every dimension but 1.

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)``. With ``training=True`` (or no running
    statistics) ``mean``/``var`` are the batch's (biased variance), and the running statistics, if
    given, are updated in place with the unbiased variance. Otherwise the running statistics are used.

    >>> x = torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]])
    >>> batch_norm(x, None, None, training=True).flatten().tolist()  # doctest: +ELLIPSIS
    [0.5773..., 0.5773..., -1.7320..., 0.5773...]
    """
    activation = check_activation(name, activation)
    check_nonfinite_policy(name, nonfinite)
    check_input(name, input, None, {"weight": weight, "bias": bias,
                                    "running_mean": running_mean, "running_var": running_var})
    use_batch = training or running_mean is None or running_var is None
    if not use_batch:
        acc = accumulation_dtype(input.dtype)
        return normalize(input, running_mean.to(acc), running_var.to(acc), weight, bias, eps,
                         activation, negative_slope)
    n = check_batch_size(name, input)
    mean, var = batch_moments(input)
    if training and (running_mean is not None or running_var is not None):
        batch_statistics_update(name, mean, var, n, running_mean, running_var, momentum,
                                num_batches_tracked, nonfinite)
    return normalize(input, mean, var, weight, bias, eps, activation, negative_slope)
