"""``LazyBatchNorm1d/2d/3d``: ``num_features`` is read from the first input, as in ``torch.nn``.

Built like torch's lazy batch norm: ``LazyModuleMixin`` holds uninitialized parameters and buffers
until the first forward, then materializes them with the input's channel count, runs
``reset_parameters()`` and turns the module into the plain class (``cls_to_become``), so the model
afterwards holds ordinary :class:`bnkit.BatchNorm1d/2d/3d` layers.
"""
from __future__ import annotations

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from ..validation import channel_first
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _LazyBatchNorm(LazyModuleMixin, BatchNormBase):
    """Lazy form of a bnkit batch norm: every argument of :class:`bnkit.BatchNormBase` but ``num_features``."""

    _min_features = 0
    cls_to_become: type[BatchNormBase]

    def __init__(self, eps: float = 1e-5, momentum=0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True, **kwargs):
        factory = {"device": device, "dtype": dtype}
        # affine/track_running_stats False here: the parameters and buffers are created uninitialized below.
        super().__init__(0, eps, momentum, False, False, device, dtype, **kwargs)
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:  # bias=False: no beta, as torch.nn.LazyBatchNorm*d(bias=False)
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:
        if self.num_features:
            return
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"{type(self).__name__}: the first input sets num_features from dimension {self.axis}, "
                             f"so it must be a tensor of shape (N, C, *); got {shape}")
        self._check_input_dim(input)
        channels = channel_first(type(self).__name__, input, self.axis).shape[1]  # axis=-1: (N, *, C)
        tensors = [t for t in (self.weight, self.bias, self.running_mean, self.running_var) if t is not None]
        if self.has_uninitialized_params():
            self.num_features = channels
            for tensor in tensors:
                tensor.materialize((self.num_features,))
            self.reset_parameters()
        else:
            # Materialized by load_state_dict (the checkpoint's size wins; torch.nn leaves num_features
            # at 0 here), or a layer with neither parameters nor buffers.
            self.num_features = tensors[0].numel() if tensors else channels


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """:class:`bnkit.BatchNorm1d` with ``num_features`` inferred from ``input.shape[1]`` on the first call.

    >>> bn = LazyBatchNorm1d()
    >>> _ = bn(torch.randn(4, 3))
    >>> type(bn).__name__, bn.num_features, bn.running_mean.shape
    ('BatchNorm1d', 3, torch.Size([3]))
    """

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """:class:`bnkit.BatchNorm2d` with ``num_features`` inferred from ``input.shape[1]`` on the first call."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """:class:`bnkit.BatchNorm3d` with ``num_features`` inferred from ``input.shape[1]`` on the first call."""

    cls_to_become = BatchNorm3d
