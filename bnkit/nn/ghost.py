"""Ghost batch norm (Hoffer et al., 2017): each chunk of a training batch normalized on its own.

The statistics step (:func:`bnkit.stats.ghost_statistics`) is the only thing that differs from
:class:`bnkit.BatchNorm2d`; eval, the running statistics' form, state_dict and every other
argument are the plain layer's, and ``isinstance(layer, torch.nn.BatchNorm2d)`` holds.
"""
from __future__ import annotations

import torch

from ..stats import ghost_statistics
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormBase"]


class GhostBatchNormBase(BatchNormBase):
    r"""Ghost batch norm over dimension 1 of an ``(N, C, *)`` input.

    Args:
        num_features: C.
        virtual_batch_size: in training, the batch is split along N into consecutive chunks of this
            many samples (the last chunk is smaller when the size does not divide N), and each chunk
            is normalized with its own statistics, exactly as plain batch norm on that chunk. The
            running statistics are updated *once* per step (tf-keras' rule) with the
            chunk-size-weighted mean of the chunk means and the pooled within-chunk unbiased variance
            ``sum_g m2_g / (n - G)`` (= the mean of the chunks' unbiased variances when chunks are
            equal; with ``variance="biased"``, ``sum_g m2_g / n``, the count-weighted mean of the
            chunks' biased variances); ``num_batches_tracked`` += 1. A chunk of one value per channel
            raises. Eval ignores it (running statistics, or the whole batch's statistics when there are
            none, as the plain layer). Settable on the layer.
        eps, momentum, affine, track_running_stats, device, dtype, and the keywords of
            :class:`bnkit.BatchNormBase`. ``mask=``/``lengths=`` are not supported, and ghost
            statistics cannot be observed as one batch's moments (``register_moments_hook``).

    >>> bn = GhostBatchNorm2d(3, virtual_batch_size=4)
    >>> bn(torch.randn(8, 3, 2, 2)).shape, isinstance(bn, torch.nn.BatchNorm2d)
    (torch.Size([8, 3, 2, 2]), True)
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum=0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    @property
    def virtual_batch_size(self) -> int:
        """The number of samples in each chunk normalized on its own."""
        return self._virtual_batch_size

    @virtual_batch_size.setter
    def virtual_batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.layer_name}: virtual_batch_size must be a positive int, got {value!r}")
        self._virtual_batch_size = value

    def _batch_statistics(self, input: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:  # eval without running statistics: the whole batch's, as the plain layer
            return super()._batch_statistics(input, update)
        mean, var, (pooled_mean, pooled_var) = ghost_statistics(self.layer_name, input, self.virtual_batch_size)
        if self._moments_hooks:
            raise ValueError(f"{self.layer_name}: ghost-batch statistics (virtual_batch_size) cannot be "
                             f"observed as one batch's moments (e.g. by bnkit.accumulate); use plain batch norm")
        if update:
            if self.variance == "biased":  # sum_g m2_g / n: the count-weighted mean of the chunks' biased variances
                n = input.numel() // input.shape[1]
                chunks = -(-input.shape[0] // self.virtual_batch_size)
                pooled_var = pooled_var * ((n - chunks) / n)
            self._update_running(pooled_mean, pooled_var, None)
        return mean, var

    def extra_repr(self) -> str:
        s = super().extra_repr()
        # in the constructor's order: BatchNorm2d(C, virtual_batch_size, eps=..., ...)
        size = f"virtual_batch_size={self.virtual_batch_size}, "
        return s.replace(f"{self.num_features}, ", f"{self.num_features}, {size}", 1)


class GhostBatchNorm1d(GhostBatchNormBase, BatchNorm1d):
    """Ghost batch norm of a ``(N, C)`` or ``(N, C, L)`` input. See :class:`GhostBatchNormBase`."""


class GhostBatchNorm2d(GhostBatchNormBase, BatchNorm2d):
    """Ghost batch norm of a ``(N, C, H, W)`` input. See :class:`GhostBatchNormBase`."""


class GhostBatchNorm3d(GhostBatchNormBase, BatchNorm3d):
    """Ghost batch norm of a ``(N, C, D, H, W)`` input. See :class:`GhostBatchNormBase`."""
