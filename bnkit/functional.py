"""Functional batch norm: ``batch_norm`` (torch's signature, buffers updated in place) and
``batch_norm_stateless`` (``(y, new_stats)``, for ``torch.func`` and JAX-style code).

Both, and every bnkit layer, run the same core (:func:`forward_core`). Extras over torch, all
keyword-only:

* ``momentum=None`` means the cumulative average and needs ``num_batches_tracked``.
* ``activation`` / ``negative_slope``: an activation applied after the affine.
* ``nonfinite``: what a batch with NaN/Inf statistics does to the running statistics:
  ``"skip"`` (default; keep the old values, warn), ``"raise"`` (error, buffers unchanged) or
  ``"propagate"`` (torch's behaviour: the running statistics become NaN). The output always shows
  the NaN, whatever the policy.
* ``axis``: the channel dimension (default 1, as torch; ``-1`` for ``(N, L, C)`` input).
* ``mask``: bool, ``x``'s shape without the channel dimension; False elements are padding: left
  out of the batch and running statistics and passed through unchanged.
* ``single_sample``: one value per channel in training: ``"raise"`` (default),
  ``"use_running"`` (normalize with the running statistics, no update) or ``"skip_update"``
  (normalize with the batch's own statistics, which gives ``bias``, and leave the running
  statistics unchanged).
* ``example_weight``: inference example weighing (eval only): mix each example's own statistics
  into the population statistics with this weight (see :func:`bnkit.stats.example_weighted_moments`).
* ``variance``: ``"unbiased"`` (torch) or ``"biased"`` (Keras/Flax): which variance the running
  update stores.
* ``name``: the layer name used in error messages.
"""
from __future__ import annotations

import warnings
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from .ops import apply_activation, check_activation, normalize, normalize_running
from .stats import (accumulation_dtype, batch_moments, ema, example_weighted_moments, masked_moments,
                    unbiased_factor)
from .validation import SINGLE_VALUE_FIXES, check_batch_size, check_input

__all__ = ["batch_norm", "batch_norm_stateless", "forward_core", "running_update", "batch_statistics_update",
           "NONFINITE_POLICIES", "SINGLE_SAMPLE_POLICIES", "VARIANCE_KINDS"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")
SINGLE_SAMPLE_POLICIES = ("raise", "use_running", "skip_update")
VARIANCE_KINDS = ("unbiased", "biased")


def _check_choice(name: str, what: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: {what} must be one of {choices}, got {value!r}")
    return value


def check_nonfinite_policy(name: str, policy: str) -> str:
    return _check_choice(name, "nonfinite", policy, NONFINITE_POLICIES)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def report_nonfinite(name: str, bad_channels: torch.Tensor, nonfinite: str) -> None:
    """Warn (``"skip"``) or raise (``"raise"``) about a batch whose statistics are NaN/Inf where
    ``bad_channels`` is True. Called once the running statistics are known to be unchanged."""
    bad = bad_channels.nonzero().flatten().tolist()
    msg = f"{name}: batch statistics are NaN/Inf in channel(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}; "
    if nonfinite == "raise":
        raise FloatingPointError(msg + "the running statistics were left unchanged (nonfinite='raise').")
    warnings.warn(msg + "this batch was skipped: running statistics and num_batches_tracked are unchanged "
                  "(nonfinite='skip'). Check the input and the learning rate.", RuntimeWarning, stacklevel=6)


def native_train_forward(name: str, x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked,
                         momentum, eps: float, nonfinite: str = "skip", activation: str = "identity",
                         negative_slope: float = 0.01) -> torch.Tensor:
    """Training forward through torch's own fused kernel (ATen ``batch_norm``), in place like torch.nn.

    The plain case in eager mode takes this path: it is torch.nn's computation (the same numbers and
    speed, one fused backward). Running statistics are updated by the kernel; for ``nonfinite`` other
    than ``"propagate"`` the C-element buffers are saved first and restored (with the count) when the
    batch made them non-finite, before the warning or error. ``momentum=None``: cumulative average.
    """
    if running_mean is None or running_var is None:
        y = F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)
        return apply_activation(y, activation, negative_slope)
    saved = None if nonfinite == "propagate" else (running_mean.clone(), running_var.clone())
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
        momentum = 1.0 / float(num_batches_tracked)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=float(momentum), eps=eps)
    if saved is not None:
        bad = (torch.isfinite(saved[0]) & ~torch.isfinite(running_mean)) | \
              (torch.isfinite(saved[1]) & ~torch.isfinite(running_var))
        if bool(bad.any()):
            with torch.no_grad():
                running_mean.copy_(saved[0])
                running_var.copy_(saved[1])
                if num_batches_tracked is not None:
                    num_batches_tracked.sub_(1)
            report_nonfinite(name, bad, nonfinite)
    return apply_activation(y, activation, negative_slope)


class RunningStats(NamedTuple):
    """New running statistics (``None`` where the layer has no such buffer)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None


def running_update(name: str, mean: torch.Tensor, var: torch.Tensor, n, running_mean, running_var, momentum,
                   num_batches_tracked, nonfinite: str = "skip", variance: str = "unbiased",
                   warn: bool = True) -> RunningStats:
    """Out of place: the running statistics after one batch of ``(mean, biased var)`` over ``n`` values.

    ``n`` is an int or a tensor (masked batches), or ``None`` when ``var`` is already the estimate to
    store (ghost and synced statistics compute their own). ``warn=False`` never inspects values on the host
    (no sync, safe under ``torch.func`` transforms): a non-finite batch is skipped silently.
    """
    keep = None
    if nonfinite != "propagate":
        keep = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if warn and not _is_compiling() and not bool(keep):
            report_nonfinite(name, ~(torch.isfinite(mean) & torch.isfinite(var)), nonfinite)
    count = None
    if num_batches_tracked is not None:
        count = num_batches_tracked + (1 if keep is None else keep.to(num_batches_tracked.dtype))
    if momentum is None:
        if count is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
        momentum = 1.0 / torch.clamp(count, min=1).to(mean.dtype)
    stored_var = var * unbiased_factor(n) if variance == "unbiased" and n is not None else var
    return RunningStats(None if running_mean is None else ema(running_mean, mean, momentum, keep),
                        None if running_var is None else ema(running_var, stored_var, momentum, keep), count)


@torch.no_grad()
def _write_back(new: RunningStats, running_mean, running_var, num_batches_tracked) -> None:
    for buf, value in zip((running_mean, running_var, num_batches_tracked), new):
        if buf is not None and value is not None:
            buf.copy_(value)


def batch_statistics_update(name: str, mean: torch.Tensor, var: torch.Tensor, n, running_mean, running_var,
                            momentum, num_batches_tracked, nonfinite: str = "skip",
                            variance: str = "unbiased") -> None:
    """In place: fold one batch's ``(mean, biased var)`` over ``n`` values into the buffers.

    Shared by every layer that updates running statistics from batch statistics.
    """
    new = running_update(name, mean, var, n, running_mean, running_var, momentum, num_batches_tracked,
                         nonfinite, variance)
    _write_back(new, running_mean, running_var, num_batches_tracked)


def _channel_first(x, axis: int):
    """``x`` with its channel axis moved to dimension 1. Anything that is not a tensor of at least two
    dimensions is returned as it is, for the input checks to reject with a clear message."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or axis % x.dim() == 1:
        return x
    return x.movedim(axis, 1)


def _channel_back(y: torch.Tensor, axis: int) -> torch.Tensor:
    """Undo :func:`_channel_first` on an output."""
    return y if axis % y.dim() == 1 else y.movedim(1, axis)


def mask_from_lengths(name: str, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Padding mask ``(N, L)`` for a channel-first ``(N, C, L)`` tensor: position l of example n is valid
    when ``l < lengths[n]``."""
    if x.dim() != 3:
        raise ValueError(f"{name}: lengths= needs a 3-D input (N, C, L) or (N, L, C) with axis=-1, "
                         f"got {x.dim()}-D input")
    lengths = torch.as_tensor(lengths, device=x.device)
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"{name}: lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
    return torch.arange(x.shape[2], device=x.device) < lengths.unsqueeze(1)


def _check_mask(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    want = (x.shape[0],) + tuple(x.shape[2:])
    if mask.dtype != torch.bool or tuple(mask.shape) != want:
        raise ValueError(f"{name}: mask must be a bool tensor shaped like the input without its channel "
                         f"dimension, {want}; got {mask.dtype} of shape {tuple(mask.shape)}")
    return mask.to(x.device)


def forward_core(name: str, x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked, *,
                 use_batch_stats: bool, update: bool, momentum, eps: float, activation: str = "identity",
                 negative_slope: float = 0.01, nonfinite: str = "skip", variance: str = "unbiased",
                 mask: torch.Tensor | None = None, single_sample: str = "raise",
                 example_weight: float | None = None, warn: bool = True,
                 stats_sink=None) -> tuple[torch.Tensor, RunningStats | None]:
    """The one batch-norm forward every entry point runs, out of place.

    ``x`` is channel-first ``(N, C, *)`` and already checked. Returns ``(y, new_running_stats)``;
    the latter is ``None`` when the running statistics do not change. ``stats_sink(mean, var, n)``,
    if given, receives the batch statistics whenever they normalize the batch (gradient
    accumulation collects them there instead of updating every micro-batch).
    """
    have_running = running_mean is not None and running_var is not None
    if use_batch_stats:
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        if mask is not None:
            if x.numel() == 0 or int(mask.sum()) < 2:
                raise ValueError(f"{name}: the mask leaves {int(mask.sum()) if x.numel() else 0} valid value(s) per "
                                 f"channel; batch statistics need at least 2. Fixes: {SINGLE_VALUE_FIXES}.")
        elif n == 1 and single_sample == "use_running" and have_running:
            use_batch_stats = update = False
        elif n == 1 and single_sample == "skip_update":
            update = False
        else:
            check_batch_size(name, x)
    acc = accumulation_dtype(x.dtype)
    new = None
    if not use_batch_stats:
        if example_weight is None:
            y = normalize_running(x, running_mean, running_var, weight, bias, eps, activation, negative_slope)
            return (y if mask is None else torch.where(mask.unsqueeze(1), y, x)), None
        mean, var = example_weighted_moments(x, running_mean.to(acc), running_var.to(acc), example_weight)
    else:
        if mask is not None:
            mean, var, n = masked_moments(x, mask)
        else:
            mean, var = batch_moments(x)
        if stats_sink is not None:
            stats_sink(mean.detach(), var.detach(), n)
        if update:
            new = running_update(name, mean, var, n, running_mean, running_var, momentum, num_batches_tracked,
                                 nonfinite, variance, warn)
    y = normalize(x, mean, var, weight, bias, eps, activation, negative_slope)
    if mask is not None:
        y = torch.where(mask.unsqueeze(1), y, x)
    return y, new


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: torch.Tensor | None = None, activation: str | None = None,
               negative_slope: float = 0.01, nonfinite: str = "skip", axis: int = 1,
               mask: torch.Tensor | None = None, single_sample: str = "raise",
               example_weight: float | None = None, variance: str = "unbiased",
               name: str = "batch_norm") -> torch.Tensor:
    """Batch normalization of an ``(N, C, *)`` tensor over every dimension but the channel one.

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)``. With ``training=True`` (or no running
    statistics) ``mean``/``var`` are the batch's (biased variance), and the running statistics, if
    given, are updated in place with the unbiased variance. Otherwise the running statistics are used.

    >>> x = torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]])
    >>> batch_norm(x, None, None, training=True).flatten().tolist()  # doctest: +ELLIPSIS
    [0.5773..., 0.5773..., -1.7320..., 0.5773...]
    """
    activation = check_activation(name, activation)
    check_nonfinite_policy(name, nonfinite)
    _check_choice(name, "single_sample", single_sample, SINGLE_SAMPLE_POLICIES)
    _check_choice(name, "variance", variance, VARIANCE_KINDS)
    x = _channel_first(input, axis)
    check_input(name, x, None, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                "running_var": running_var})
    if mask is not None:
        mask = _check_mask(name, x, mask)
    have_running = running_mean is not None or running_var is not None
    use_batch = training or running_mean is None or running_var is None
    y, new = forward_core(name, x, weight, bias, running_mean, running_var, num_batches_tracked,
                          use_batch_stats=use_batch, update=training and have_running, momentum=momentum, eps=eps,
                          activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
                          variance=variance, mask=mask, single_sample=single_sample, example_weight=example_weight)
    if new is not None:
        _write_back(new, running_mean, running_var, num_batches_tracked)
    return _channel_back(y, axis)


def batch_norm_stateless(x: torch.Tensor, params: Mapping[str, torch.Tensor | None] | None,
                         stats: Mapping[str, torch.Tensor | None] | None, training: bool = True, *,
                         momentum: float | None = 0.1, eps: float = 1e-5, activation: str | None = None,
                         negative_slope: float = 0.01, axis: int = 1, mask: torch.Tensor | None = None,
                         variance: str = "unbiased", name: str = "batch_norm_stateless"):
    """``y, new_stats = batch_norm_stateless(x, params, stats, training)``: no buffer is modified.

    ``params``: ``{"weight": ..., "bias": ...}`` (either may be missing/None). ``stats``:
    ``{"running_mean", "running_var", "num_batches_tracked"}`` (any may be missing; ``None`` or
    ``{}`` for no running statistics). ``new_stats`` has the same keys; in eval it holds the same
    tensors. Works under ``torch.func.grad``, ``vmap``, ``jacrev`` and ``torch.compile``: it never
    reads tensor values on the host, so a batch with non-finite statistics is skipped silently.

    >>> x = torch.tensor([[1.0], [3.0]])
    >>> y, new = batch_norm_stateless(x, None, {"running_mean": torch.zeros(1), "running_var": torch.ones(1)})
    >>> y.flatten().tolist(), new["running_mean"].tolist(), new["running_var"].tolist()  # doctest: +ELLIPSIS
    ([-0.99999..., 0.99999...], [0.2...], [1.1...])
    """
    params, stats = dict(params or {}), dict(stats or {})
    activation = check_activation(name, activation)
    _check_choice(name, "variance", variance, VARIANCE_KINDS)
    xc = _channel_first(x, axis)
    rm, rv, nbt = stats.get("running_mean"), stats.get("running_var"), stats.get("num_batches_tracked")
    check_input(name, xc, None, {"weight": params.get("weight"), "bias": params.get("bias"),
                                 "running_mean": rm, "running_var": rv})
    if mask is not None:
        mask = _check_mask(name, xc, mask)
    use_batch = training or rm is None or rv is None
    y, new = forward_core(name, xc, params.get("weight"), params.get("bias"), rm, rv, nbt,
                          use_batch_stats=use_batch, update=training and (rm is not None or rv is not None),
                          momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope,
                          variance=variance, mask=mask, warn=False)
    y = _channel_back(y, axis)
    if new is None:
        return y, stats
    out = dict(stats)
    for key, value in zip(RunningStats._fields, new):
        if key in stats or value is not None:
            out[key] = value
    return y, out
