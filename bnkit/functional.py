"""Functional batch norm: ``batch_norm`` (torch's signature, buffers updated in place) and
``batch_norm_stateless`` (``(y, new_stats)``, for ``torch.func`` and JAX-style code).

Both run one core of composed differentiable torch ops over the same pieces the layers use
(``bnkit.stats`` moments and the one running-statistics rule in ``bnkit.stats.running``).
Extras over torch, all keyword-only:

* ``momentum=None`` means the cumulative average and needs ``num_batches_tracked``.
* ``activation``: applied after the affine, taken as the layers take it: ``None``/``"identity"``,
  ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"silu"``, or the module ``nn.Identity()``,
  ``nn.ReLU()``, ``nn.LeakyReLU(slope)`` or ``nn.SiLU()``. The old ``negative_slope=s`` keyword
  raises a TypeError that says to write ``activation=torch.nn.LeakyReLU(s)``.
* ``nonfinite``: what a batch with NaN/Inf statistics does to the running statistics:
  ``"skip"`` (default; keep the old values), ``"raise"`` (error, buffers unchanged) or
  ``"propagate"`` (torch's behaviour: the running statistics become NaN). The output always shows
  the NaN, whatever the policy. ``batch_norm`` has no counter to report skips later, so with
  ``"skip"`` it warns at once (one host read); ``batch_norm_stateless`` never reads the host and
  skips silently (its ``num_batches_tracked`` shows it); bnkit's layers count skips on the device.
* ``axis``: the channel dimension (default 1, as torch; ``-1`` for ``(N, L, C)`` input).
* ``mask``: bool, ``x``'s shape without the channel dimension; False elements are padding: left
  out of the batch and running statistics (whatever they hold) and passed through unchanged.
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
from typing import Mapping

import torch

from .ops import normalize, normalize_running, resolve_activation
from .stats import Moments, accumulation_dtype, batch_moments, example_weighted_moments, masked_moments
from .stats.running import RunningStats, candidates, enough_values, finite, stored_variance, updated
from .validation import (NONFINITE_POLICIES, SINGLE_SAMPLE_POLICIES, VARIANCE_KINDS, channel_back, channel_first,
                         check_batch_size, check_choice, check_eps, check_input, check_mask, check_momentum,
                         mask_from_lengths, nonfinite_message, refuse_removed)

__all__ = ["batch_norm", "batch_norm_stateless", "fold_moments", "mask_from_lengths", "NONFINITE_POLICIES", "SINGLE_SAMPLE_POLICIES",
           "VARIANCE_KINDS"]

# The keywords the functional form took before activation modules (the rest of the layers' list never applied).
_REMOVED = ("negative_slope",)


def _keep(new_mean, new_var, n, nonfinite: str):
    """Device-side condition for taking this batch: finite running statistics after it (unless
    ``"propagate"``; as the layers decide) and, for masked batches (``n`` a tensor), at least 2 valid values."""
    keep = None if nonfinite == "propagate" else finite(new_mean, new_var)
    enough = enough_values(n)
    if enough is not None:
        keep = enough if keep is None else keep & enough
    return keep


def _report(name: str, new_mean, new_var, keep, nonfinite: str) -> None:
    """The functional form's immediate report (it has no counter): one host read."""
    if keep is None or nonfinite == "propagate" or torch.compiler.is_compiling() or bool(keep):
        return
    bad = (~(torch.isfinite(new_mean) & torch.isfinite(new_var))).nonzero().flatten().tolist()
    if not bad:  # finite but too few valid values (mask)
        warnings.warn(f"{name}: fewer than 2 valid values per channel; the running statistics were left "
                      f"unchanged.", RuntimeWarning, stacklevel=4)
        return
    msg = nonfinite_message(name, bad)
    if nonfinite == "raise":
        raise FloatingPointError(msg + "the running statistics were left unchanged (nonfinite='raise').")
    warnings.warn(msg + "this batch was skipped: running statistics and num_batches_tracked are unchanged "
                  "(nonfinite='skip'). Check the input and the learning rate.", RuntimeWarning, stacklevel=4)


def _updated(name: str, mean: torch.Tensor, var: torch.Tensor, n, running_mean, running_var, num_batches_tracked,
             momentum, nonfinite: str, variance: str) -> tuple[RunningStats, object]:
    """``(new_running_stats, report)``: one batch's ``(mean, biased var)`` over ``n`` values folded into
    the running statistics out of place (``n=None``: ``var`` is already the estimate to store);
    ``report()`` tells the caller about a skipped batch (it reads the host)."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked (the count of "
                         f"batches so far, a 0-d integer tensor updated in place); pass it, or a float momentum")
    new_mean, new_var = candidates(running_mean, running_var, num_batches_tracked, mean.detach(),
                                   stored_variance(var.detach(), n, variance == "unbiased"), momentum)
    keep = _keep(new_mean, new_var, n, nonfinite)
    new = updated(running_mean, running_var, num_batches_tracked, new_mean, new_var, keep)
    return new, lambda: _report(name, new_mean, new_var, keep, nonfinite)


def fold_moments(moments: Moments, running_mean: torch.Tensor, running_var: torch.Tensor,
                 num_batches_tracked: torch.Tensor | None = None, *, momentum: float | None = 0.1,
                 nonfinite: str = "skip", variance: str = "unbiased", name: str = "fold_moments") -> None:
    """In place: fold pooled batch moments (:class:`bnkit.stats.Moments`, e.g. several micro-batches
    merged) into a pair of running-statistics buffers as ONE update, the functional twin of
    :meth:`bnkit.BatchNorm2d.fold_moments` for buffers that belong to no bnkit layer (a ``torch.nn``
    layer's). A skipped batch (non-finite, or fewer than 2 values) is reported at once."""
    check_choice(name, "nonfinite", nonfinite, NONFINITE_POLICIES)
    check_choice(name, "variance", variance, VARIANCE_KINDS)
    check_momentum(name, momentum)
    n = moments.count[0] if moments.count.numel() and moments.count.dim() else moments.count
    new, report = _updated(name, moments.mean, moments.var(), n, running_mean, running_var, num_batches_tracked,
                           momentum, nonfinite, variance)
    report()
    _write(new, running_mean, running_var, num_batches_tracked)


@torch.no_grad()
def _write(new: RunningStats, running_mean, running_var, num_batches_tracked) -> None:
    for buf, value in zip((running_mean, running_var, num_batches_tracked), new):
        if buf is not None and value is not None:
            buf.copy_(value)


def _forward_core(name: str, x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked, *,
                  use_batch_stats: bool, update: bool, momentum, eps: float, activation: str = "identity",
                  negative_slope: float = 0.01, nonfinite: str = "skip", variance: str = "unbiased",
                  mask: torch.Tensor | None = None, single_sample: str = "raise",
                  example_weight: float | None = None) -> tuple[torch.Tensor, RunningStats | None, object]:
    """Composed-op batch norm of a checked channel-first ``(N, C, *)`` tensor, out of place.

    Returns ``(y, new_running_stats, report)``: the statistics are ``None`` when they do not change;
    ``report()`` (or None) tells the caller about a skipped batch (it reads the host).
    """
    have_running = running_mean is not None and running_var is not None
    if use_batch_stats and mask is None:
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        if n == 1 and single_sample == "use_running" and have_running:
            use_batch_stats = update = False
        elif n == 1 and single_sample == "skip_update":
            update = False
        elif n == 0 and x.shape[1]:  # empty: an empty output, the statistics unchanged, the batch counted (torch.nn)
            y = normalize(x, x.new_zeros(x.shape[1]), x.new_ones(x.shape[1]), weight, bias, eps, activation,
                          negative_slope)
            if not update:
                return y, None, None
            count = None if num_batches_tracked is None else num_batches_tracked + 1
            return y, RunningStats(running_mean, running_var, count), lambda: None
        else:
            check_batch_size(name, x)
    if not use_batch_stats:
        if example_weight is None:
            y = normalize_running(x, running_mean, running_var, weight, bias, eps, activation, negative_slope)
            return (y if mask is None else torch.where(mask.unsqueeze(1), y, x)), None, None
        acc = accumulation_dtype(x.dtype)
        mean, var = example_weighted_moments(x, running_mean.to(acc), running_var.to(acc), example_weight, mask)
        new = report = None
    else:
        if mask is not None:
            mean, var, n = masked_moments(x, mask)
            n = n[0] if n.numel() else n
        else:
            mean, var = batch_moments(x)
        new = report = None
        if update:
            new, report = _updated(name, mean, var, n, running_mean, running_var, num_batches_tracked, momentum,
                                   nonfinite, variance)
    y = normalize(x, mean, var, weight, bias, eps, activation, negative_slope)
    if mask is not None:
        y = torch.where(mask.unsqueeze(1), y, x)
    return y, new, report


def _prepare(name: str, input, axis, weight, bias, running_mean, running_var, mask, momentum):
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    check_momentum(name, momentum)
    x = channel_first(name, input, axis)
    check_input(name, x, None, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                "running_var": running_var}, axis)
    return x, (None if mask is None else check_mask(name, x, mask))


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: torch.Tensor | None = None, activation=None, nonfinite: str = "skip",
               axis: int = 1, mask: torch.Tensor | None = None, single_sample: str = "raise",
               example_weight: float | None = None, variance: str = "unbiased", name: str = "batch_norm",
               **removed) -> torch.Tensor:
    """Batch normalization of an ``(N, C, *)`` tensor over every dimension but the channel one.

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)``. With ``training=True`` (or no running
    statistics) ``mean``/``var`` are the batch's (biased variance), and the running statistics, if
    given, are updated in place with the unbiased variance. Otherwise the running statistics are used.

    >>> x = torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]])
    >>> batch_norm(x, None, None, training=True).flatten().tolist()  # doctest: +ELLIPSIS
    [0.5773..., 0.5773..., -1.7320..., 0.5773...]
    """
    if removed:
        refuse_removed(name, removed, _REMOVED)
    activation, negative_slope = resolve_activation(name, activation)
    check_choice(name, "nonfinite", nonfinite, NONFINITE_POLICIES)
    check_choice(name, "single_sample", single_sample, SINGLE_SAMPLE_POLICIES)
    check_choice(name, "variance", variance, VARIANCE_KINDS)
    x, mask = _prepare(name, input, axis, weight, bias, running_mean, running_var, mask, momentum)
    use_batch = training or running_mean is None
    check_eps(name, eps, use_batch)
    y, new, report = _forward_core(name, x, weight, bias, running_mean, running_var, num_batches_tracked,
                                   use_batch_stats=use_batch, update=training and running_mean is not None,
                                   momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope,
                                   nonfinite=nonfinite, variance=variance, mask=mask, single_sample=single_sample,
                                   example_weight=example_weight)
    if new is not None:
        report()
        _write(new, running_mean, running_var, num_batches_tracked)
    return channel_back(y, axis, input)


def batch_norm_stateless(x: torch.Tensor, params: Mapping[str, torch.Tensor | None] | None,
                         stats: Mapping[str, torch.Tensor | None] | None, training: bool = True, *,
                         momentum: float | None = 0.1, eps: float = 1e-5, activation=None, axis: int = 1,
                         mask: torch.Tensor | None = None, variance: str = "unbiased",
                         name: str = "batch_norm_stateless", **removed):
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
    if removed:
        refuse_removed(name, removed, _REMOVED)
    params, stats = dict(params or {}), dict(stats or {})
    activation, negative_slope = resolve_activation(name, activation)
    check_choice(name, "variance", variance, VARIANCE_KINDS)
    rm, rv, nbt = stats.get("running_mean"), stats.get("running_var"), stats.get("num_batches_tracked")
    xc, mask = _prepare(name, x, axis, params.get("weight"), params.get("bias"), rm, rv, mask, momentum)
    use_batch = training or rm is None
    check_eps(name, eps, use_batch)
    y, new, _ = _forward_core(name, xc, params.get("weight"), params.get("bias"), rm, rv, nbt,
                              use_batch_stats=use_batch, update=training and rm is not None, momentum=momentum,
                              eps=eps, activation=activation, negative_slope=negative_slope, variance=variance,
                              mask=mask)
    y = channel_back(y, axis, x)
    if new is None:
        return y, stats
    out = dict(stats)
    for key, value in zip(RunningStats._fields, new):
        if key in stats or value is not None:
            out[key] = value
    return y, out
