"""Batch Renormalization (Ioffe, 2017): batch norm that stays close to its running statistics.

In training, with batch statistics ``mu_B`` and ``sigma_B = sqrt(var_B + eps)`` and the layer's
renormalization statistics ``mu`` and ``sigma``::

    r = clip(sigma_B / sigma, 1 / rmax, rmax)         # no gradient
    d = clip((mu_B - mu) / sigma, -dmax, dmax)        # no gradient
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta

Gradients flow through ``mu_B`` and ``sigma_B`` with ``r`` and ``d`` held constant, so with
``rmax=1, dmax=0`` this is exactly batch norm; when both clip at their bounds the training output
is an affine function of the normalized batch, like the inference output.
"""
from __future__ import annotations

import numbers

import torch

from ..stats import Moments, accumulation_dtype, batch_moments, update_running_stats
from ..stats.ramp import progress
from ..validation import check_batch_size
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, _locked

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "LinearRamp", "renorm_warmup"]


class LinearRamp:
    """``step -> value``: ``start`` for the first ``hold`` steps, then linear to ``end`` over ``steps``.

    >>> ramp = LinearRamp(1.0, 3.0, steps=10, hold=5)
    >>> [ramp(s) for s in (1, 5, 10, 15, 100)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
    """

    def __init__(self, start: float, end: float, steps: int, hold: int = 0):
        if steps < 1 or hold < 0:
            raise ValueError(f"LinearRamp: need steps >= 1 and hold >= 0, got steps={steps}, hold={hold}")
        self.start, self.end, self.steps, self.hold = float(start), float(end), int(steps), int(hold)

    def __call__(self, step):
        """``step`` is an int, or a tensor (then the value is a tensor: layers evaluate ramps on the device)."""
        return self.start + (self.end - self.start) * progress(step, self.steps, self.hold)

    def __repr__(self) -> str:
        return f"LinearRamp({self.start}, {self.end}, steps={self.steps}, hold={self.hold})"


def renorm_warmup(steps: int, *, hold: int = 0, rmax: float = 3.0, dmax: float = 5.0,
                  dmax_steps: int | None = None) -> dict:
    """The paper's warm-up as ``rmax=``/``dmax=`` keyword arguments for :class:`BatchRenorm2d` etc.

    ``rmax`` stays 1 and ``dmax`` 0 (plain batch norm) for ``hold`` steps, then they ramp linearly
    to ``rmax`` (default 3) over ``steps`` and to ``dmax`` (default 5) over ``dmax_steps`` (default
    ``steps``). The paper used hold=5000, 40k steps for rmax and 25k for dmax.

    >>> kw = renorm_warmup(100, hold=10)
    >>> kw["rmax"](60), kw["dmax"](60)
    (2.0, 2.5)
    """
    return {"rmax": LinearRamp(1.0, rmax, steps, hold),
            "dmax": LinearRamp(0.0, dmax, steps if dmax_steps is None else dmax_steps, hold)}


def _check_limits(layer: str, rmax, dmax, step: int | None = None, at: str = "") -> tuple[float, float]:
    at = at if step is None else f" (schedule value at step {step})"
    for key, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if not isinstance(value, numbers.Real) or not value >= low:
            raise ValueError(f"{layer}: {key} must be a number >= {low:g}{at}, got {value!r}")
    return float(rmax), float(dmax)


class BatchRenormBase(BatchNormBase):
    r"""Batch Renormalization over dimension 1 of an ``(N, C, *)`` input (see the module docstring).

    Takes every argument of :class:`bnkit.BatchNormBase`, plus:

    Args:
        rmax: bound on the scale correction r, a number >= 1 or a callable ``step -> rmax`` (step
            counts update steps from 1). Required, with ``dmax``: usually ``**bnkit.renorm_warmup(steps,
            hold=...)``, the paper's ramps (plain batch norm for ``hold`` steps, then r's bound 1 -> 3
            and d's 0 -> 5 over ``steps``), sized to the length of training.
        dmax: bound on the shift correction d, a number >= 0 or a callable ``step -> dmax``. Required.

    Why there is no default: the paper's fixed ``rmax=3, dmax=5`` apply r and d from the first step,
    when ``renorm_mean``/``renorm_std`` are still mostly their initial 0 and 1, and the warm-up that
    avoids this has to be sized to the run (the paper: hold 5k, ramps over 25k-40k steps). On the
    digits CNN with class-sorted batches of 4 (``python examples/small_batch_digits.py``, 5 seeds) fixed
    limits lost 6.3 ± 8.0 points to plain batch norm (1 of 5 seeds better), the warm-up gained
    1.0 ± 4.5 (see docs/small_batch.md).
    ``rmax=3.0, dmax=5.0`` can still be passed explicitly.
        renorm_momentum: torch convention (weight of the new batch; tf-keras' ``renorm_momentum=0.99``
            is 0.01 here). Default 0.01. It updates the *renormalization* statistics
            ``renorm_mean`` (EMA of ``mu_B``) and ``renorm_std`` (EMA of ``sigma_B``, a standard
            deviation, as in the paper and tf-keras), from which r and d are computed, before this
            batch is folded in. ``running_mean``/``running_var`` are separate and updated exactly as
            in :class:`bnkit.BatchNorm2d` with ``momentum`` (unbiased variance); eval uses them.

    Shape:
        Input ``(N, C, *)``; output the same shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, rmax=None, dmax=None,
                 renorm_momentum: float = 0.01, **kwargs):
        name = f"{type(self).__name__}({num_features})"
        if not track_running_stats:
            raise ValueError(f"{name}: batch renormalization needs its running statistics; "
                             f"track_running_stats must be True")
        if rmax is None or dmax is None:
            raise ValueError(f"{name}: pass the bounds of r and d, usually the paper's warm-up sized to your run: "
                             f"**bnkit.renorm_warmup(steps, hold=...) (plain batch norm for hold steps, then rmax "
                             f"1 -> 3 and dmax 0 -> 5 over steps); or rmax=, dmax= as numbers (the paper's "
                             f"3 and 5) or callables of the step")
        _check_limits(name, 1.0 if callable(rmax) else rmax, 0.0 if callable(dmax) else dmax)
        # a LinearRamp by its two ends, here: it is evaluated on the device, where no check can raise, and its
        # values lie between them (other callables are checked at each step)
        for end in ("start", "end"):
            _check_limits(name, *(getattr(v, end) if isinstance(v, LinearRamp) else low
                                  for v, low in ((rmax, 1.0), (dmax, 0.0))), at=f" (the ramp's {end} value)")
        if isinstance(renorm_momentum, bool) or not isinstance(renorm_momentum, numbers.Real) \
                or not 0.0 <= renorm_momentum <= 1.0:
            raise ValueError(f"{name}: renorm_momentum must be in [0, 1] (torch convention, weight of the new "
                             f"batch), got {renorm_momentum!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.rmax, self.dmax, self.renorm_momentum = rmax, dmax, renorm_momentum
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
        self.register_buffer("renorm_std", torch.ones(num_features, **factory))

    def reset_running_stats(self) -> None:
        """torch's reset (``reset_parameters()`` calls it), and the renormalization statistics with it: a reset
        layer restarts its warm-up from ``num_batches_tracked = 0``, so it starts from a fresh layer's 0 and 1."""
        super().reset_running_stats()
        if "renorm_std" in self._buffers:  # not yet registered while torch's __init__ calls this
            with torch.no_grad():
                self.renorm_mean.zero_()
                self.renorm_std.fill_(1.0)

    def _limits(self):
        """``(rmax, dmax)`` for this step: numbers, or 0-d tensors for ramps evaluated on the device (a
        plain Python callable gets the step as an int, which costs one host read)."""
        if not (callable(self.rmax) or callable(self.dmax)):
            return _check_limits(self.layer_name, self.rmax, self.dmax)
        if all(isinstance(v, LinearRamp) or not callable(v) for v in (self.rmax, self.dmax)):
            # in the statistics' dtype: float32 bounds would clip a float64 layer's r and d ~1e-7 off
            step = self.num_batches_tracked.to(accumulation_dtype(self.renorm_std.dtype)) + 1
            ones = torch.ones_like(step)  # torch.clamp takes both bounds as numbers or both as tensors
            return tuple(v(step) if callable(v) else ones * v for v in (self.rmax, self.dmax))
        step = 1 + int(self.num_batches_tracked)
        rmax = self.rmax(step) if callable(self.rmax) else self.rmax
        dmax = self.dmax(step) if callable(self.dmax) else self.dmax
        return _check_limits(self.layer_name, rmax, dmax, step)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n) -> torch.Tensor | None:
        """The running statistics, then the renorm statistics ``(mu, sigma = sqrt(var + eps))`` with the
        same keep decision: from a batch, or from pooled micro-batches (``fold_moments``, ``accumulate``)."""
        keep = super()._update_running(mean, var, n)
        std = torch.sqrt(var.detach() + self.eps)
        _locked(update_running_stats, self.renorm_mean, self.renorm_std, mean.detach(), std, self.renorm_momentum, keep)
        return keep

    def _batch_statistics(self, input: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = check_batch_size(self.layer_name, input)
        rmax, dmax = self._limits()
        mean, var = batch_moments(input)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            sigma = self.renorm_std.to(std.dtype)
            r = torch.clamp(std / sigma, 1.0 / rmax, rmax)
            d = torch.clamp((mean - self.renorm_mean.to(mean.dtype)) / sigma, -dmax, dmax)
        if self._moments_hooks:
            self._call_moments_hooks(Moments(torch.full_like(mean, float(n)), mean.detach(), (var * n).detach()))
        if update:
            self._update_running(mean, var, n)
        # (x - mu_B) / sigma_B * r + d  ==  (x - m) / sqrt(v + eps)  with  m = mu_B - d sigma_B / r,
        # sqrt(v + eps) = sigma_B / r: the shared kernel normalizes, autograd sees r and d as constants.
        return mean - d * std / r, (std / r) ** 2 - self.eps

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax!r}, dmax={self.dmax!r}, renorm_momentum={self.renorm_momentum}"


class BatchRenorm1d(BatchRenormBase, BatchNorm1d):
    """Batch renormalization of a ``(N, C)`` or ``(N, C, L)`` input. See :class:`BatchRenormBase`."""


class BatchRenorm2d(BatchRenormBase, BatchNorm2d):
    """Batch renormalization of a ``(N, C, H, W)`` input. See :class:`BatchRenormBase`."""


class BatchRenorm3d(BatchRenormBase, BatchNorm3d):
    """Batch renormalization of a ``(N, C, D, H, W)`` input. See :class:`BatchRenormBase`."""
