"""Ghost (virtual) batch statistics: per-chunk moments of one batch (Hoffer et al., 2017).

The batch ``(N, C, *)`` is split along N into consecutive chunks of ``virtual_batch_size``
samples; when that size does not divide N the *last chunk is smaller* (``N % virtual_batch_size``
samples). Each chunk is normalized with its own statistics, exactly as plain batch norm applied
to that chunk alone.

Note: tf-keras reshapes the batch to ``(virtual_batch_size, -1, ...)`` and keeps axis 1, so its
ghost batch ``g`` holds the *strided* samples ``g, g + G, g + 2G, ...`` and it requires the size to
divide N. bnkit uses consecutive chunks (the paper's and TabNet's definition); for shuffled data
the two are the same in distribution.
"""
from __future__ import annotations

import torch

from ..validation import SINGLE_VALUE_FIXES, check_batch_size
from .moments import accumulation_dtype

__all__ = ["chunk_sizes", "ghost_moments", "pooled_moments", "ghost_statistics"]


def chunk_sizes(batch: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the consecutive chunks: full chunks, then a smaller last one if N is not divisible.

    >>> chunk_sizes(10, 4)
    [4, 4, 2]
    """
    full, rest = divmod(batch, virtual_batch_size)
    return [virtual_batch_size] * full + ([rest] if rest else [])


def ghost_moments(x: torch.Tensor, virtual_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased_var)`` of each chunk of an ``(N, C, *)`` tensor, each of shape ``(G, C)``.

    Differentiable, in the accumulation dtype. The full chunks are reduced in one call (a reshape,
    no Python loop over chunks); a smaller last chunk in a second.
    """
    acc = x.to(accumulation_dtype(x.dtype))
    full = x.shape[0] // virtual_batch_size * virtual_batch_size
    dims = (1,) + tuple(range(3, x.dim() + 1))
    means, variances = [], []
    if full:
        chunks = acc[:full].reshape((full // virtual_batch_size, virtual_batch_size) + tuple(x.shape[1:]))
        var, mean = torch.var_mean(chunks, dim=dims, correction=0)
        means.append(mean)
        variances.append(var)
    if full < x.shape[0]:
        var, mean = torch.var_mean(acc[full:].unsqueeze(0), dim=dims, correction=0)
        means.append(mean)
        variances.append(var)
    return torch.cat(means), torch.cat(variances)


def pooled_moments(mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ghost statistics into one ``(mean, unbiased_var)`` for the running statistics.

    ``values[g]`` is the number of values per channel in chunk g. The mean is the count-weighted
    mean of the chunk means (= the whole batch's mean); the variance is the pooled *within-chunk*
    unbiased variance ``sum_g m2_g / (n - G)``. With equal chunks this is exactly the plain average
    of the chunks' unbiased variances, i.e. tf-keras' "mean of the ghost batches' statistics"
    (tf-keras averages biased variances; bnkit keeps torch's unbiased ``running_var``).

    >>> m, v = pooled_moments(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]))
    >>> m.tolist(), v.tolist()   # chunk unbiased variances 2 and 6
    ([1.0], [4.0])
    """
    w = values.to(mean.dtype).unsqueeze(1)
    total = w.sum()
    pooled_mean = (w * mean).sum(0) / total
    pooled_var = (w * var).sum(0) / (total - values.numel())
    return pooled_mean, pooled_var


def ghost_statistics(name: str, x: torch.Tensor, virtual_batch_size: int):
    """What a ghost batch-norm layer needs: ``(mean, var, (pooled_mean, pooled_unbiased_var))``.

    ``mean``/``var`` are per sample, shape ``(N, C)`` (each sample gets its chunk's statistics,
    differentiable); the pooled pair, detached, is for the running statistics. Raises, naming the
    layer ``name``, for an empty batch or a chunk with one value per channel.
    """
    check_batch_size(name, x)
    sizes = chunk_sizes(x.shape[0], virtual_batch_size)
    per_sample = x[0, 0].numel()
    if sizes[-1] * per_sample == 1:
        raise ValueError(
            f"{name}: virtual_batch_size={virtual_batch_size} splits the batch of {x.shape[0]} (input shape "
            f"{tuple(x.shape)}) into chunks {sizes}; the last chunk has one value per channel, whose statistics "
            f"are undefined. Use a batch size divisible by {virtual_batch_size}, or: {SINGLE_VALUE_FIXES}.")
    mean, var = ghost_moments(x, virtual_batch_size)
    # filled on the device: torch.tensor(sizes, device=...) is a host-to-device copy from pageable
    # memory, which synchronizes the stream on a GPU and which a CUDA graph cannot capture
    counts = torch.full((len(sizes),), virtual_batch_size, dtype=torch.int64, device=x.device)
    if sizes[-1] != virtual_batch_size:
        counts[-1:].fill_(sizes[-1])
    pooled = pooled_moments(mean.detach(), var.detach(), counts * per_sample)
    # output_size: no device-to-host sync to learn the length on the GPU.
    expand = {"dim": 0, "output_size": x.shape[0]}
    return mean.repeat_interleave(counts, **expand), var.repeat_interleave(counts, **expand), pooled
