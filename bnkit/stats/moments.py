"""Per-channel moments: computed stably, merged exactly.

Statistics are accumulated in float32 (float64 for float64 input) whatever the input dtype.
``torch.var_mean`` is a Welford/two-pass reduction, so a channel with mean 1e4 and std 0.1 keeps
its variance (the naive ``E[x^2] - E[x]^2`` in float32 would return noise or a negative number).

Merging uses Chan et al.'s pairwise formula on ``(count, mean, M2)``, where ``M2`` is the sum of
squared deviations from the mean; no cancellation, and the result is the statistics of the
concatenated data, whatever the sizes of the parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["accumulation_dtype", "reduce_dims", "batch_moments", "masked_moments", "example_weighted_moments",
           "Moments"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(ndim: int) -> tuple[int, ...]:
    """All dimensions of an ``(N, C, *)`` tensor but the channel dimension 1."""
    return (0,) + tuple(range(2, ndim))


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased_var)`` per channel of an ``(N, C, *)`` tensor, in the accumulation dtype.

    Differentiable: autograd through it gives batch norm's exact training gradient.
    """
    var, mean = torch.var_mean(x.to(accumulation_dtype(x.dtype)), dim=reduce_dims(x.dim()), correction=0)
    return mean, var


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, biased_var, count)`` per channel over the elements where ``mask`` is True.

    ``mask`` has ``x``'s shape without the channel dimension 1 (``(N, *)``). Two passes (mean, then
    centered squares), so it is as stable as :func:`batch_moments`; differentiable. Padding never
    enters the arithmetic (it may hold NaN or Inf). No valid value gives mean 0 and variance 0 with
    count 0 (no host read decides anything).
    """
    acc = accumulation_dtype(x.dtype)
    m = mask.unsqueeze(1)
    dims = reduce_dims(x.dim())
    count = m.to(acc).sum(dims)  # (C,) after broadcasting: the same count in every channel
    count = count.expand(x.shape[1]) if count.numel() == 1 else count
    xa = torch.where(m, x.to(acc), 0.0)
    mean = xa.sum(dims) / torch.clamp(count, min=1)
    centered = torch.where(m, xa - mean.reshape((1, -1) + (1,) * (x.dim() - 2)), 0.0)
    return mean, (centered * centered).sum(dims) / torch.clamp(count, min=1), count


def example_weighted_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, alpha: float,
                             mask: torch.Tensor | None = None):
    """Inference example weighing (Summers & Dinneen, ICLR 2020): per-example statistics ``(N, C)``.

    Each example's own spatial statistics (``mu_e``, biased ``var_e``; over its valid positions when
    ``mask`` is given, padding never read) are mixed with the population statistics ``(mean, var)``
    with weight ``alpha``, as the moments of a two-component mixture::

        mu_i  = alpha * mu_e + (1 - alpha) * mean
        var_i = alpha * var_e + (1 - alpha) * var + alpha * (1 - alpha) * (mu_e - mean) ** 2

    An example without valid positions gets the population statistics.
    """
    acc = mean.dtype
    spatial = tuple(range(2, x.dim()))
    if not spatial:  # one value per example and channel: its own variance is zero
        mu_e, var_e = x.to(acc), torch.zeros_like(x, dtype=acc)
    elif mask is None:
        var_e, mu_e = torch.var_mean(x.to(acc), dim=spatial, correction=0)
    else:
        m = mask.unsqueeze(1)
        count = m.to(acc).sum(spatial)
        safe = torch.clamp(count, min=1)
        xa = torch.where(m, x.to(acc), 0.0)
        mu_e = xa.sum(spatial) / safe
        centered = torch.where(m, xa - mu_e.reshape(mu_e.shape + (1,) * len(spatial)), 0.0)
        var_e = (centered * centered).sum(spatial) / safe
        empty = count == 0
        mu_e, var_e = torch.where(empty, mean, mu_e), torch.where(empty, var, var_e)
    mu = alpha * mu_e + (1 - alpha) * mean
    v = alpha * var_e + (1 - alpha) * var + alpha * (1 - alpha) * (mu_e - mean) ** 2
    return mu, v


@dataclass
class Moments:
    """Per-channel ``count``, ``mean`` and ``m2`` (sum of squared deviations): mergeable statistics.

    >>> a = Moments.of(torch.tensor([[1.0], [2.0]]))
    >>> b = Moments.of(torch.tensor([[4.0], [5.0], [6.0]]))
    >>> m = a.merge(b)
    >>> round(m.mean.item(), 5), round(m.var(unbiased=True).item(), 5)   # of [1, 2, 4, 5, 6]
    (3.6, 4.3)
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, mask: torch.Tensor | None = None) -> "Moments":
        """Moments of an ``(N, C, *)`` tensor, in the accumulation dtype (no gradient); with ``mask``
        (bool, ``(N, *)``), of the elements where it is True only."""
        with torch.no_grad():
            if mask is not None:
                mean, var, count = masked_moments(x, mask)
                return cls(count, mean, var * count)
            n = x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0
            if n == 0 and x.dim() > 1:  # var_mean of no values is NaN, which a merge would spread to the other side
                return cls.zeros(x.shape[1], accumulation_dtype(x.dtype), x.device)
            mean, var = batch_moments(x)
        return cls(torch.full_like(mean, float(n)), mean, var * n)

    @classmethod
    def zeros(cls, channels: int, dtype=torch.float32, device=None) -> "Moments":
        """The moments of no values (count, mean and m2 all 0): the neutral element of :meth:`merge`."""
        z = torch.zeros(channels, dtype=dtype, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def merge(self, other: "Moments") -> "Moments":
        """Chan's merge; counts of zero on either side are handled (the other side is returned)."""
        n = self.count + other.count
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe_n)
        # count * (count / n), not (count * count) / n: the product of two large counts overflows
        m2 = self.m2 + other.m2 + delta * delta * (self.count * (other.count / safe_n))
        return Moments(n, mean, m2)

    def var(self, unbiased: bool = False) -> torch.Tensor:
        """``m2 / count`` (biased) or ``m2 / (count - 1)`` (unbiased); 0 where that divisor is below 1
        (no values, or one value with ``unbiased``), where torch's ``var`` would give NaN."""
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / torch.clamp(denom, min=1)
