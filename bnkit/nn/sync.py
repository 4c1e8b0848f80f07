"""``SyncBatchNorm``: batch statistics over every rank of a ``torch.distributed`` process group.

Works with gloo (CPU) and NCCL (GPU). Each training forward does ONE all-reduce of a float64
vector ``[count, sum_c, q_c]`` (length ``2C + 1``) per layer, where per rank and channel

    count = n_i,   sum_c = n_i * mean_i,   q_c = M2_i + n_i * mean_i**2

with ``mean_i``/``M2_i`` computed locally by a stable (Welford/two-pass) reduction in the
accumulation dtype. After the sum: ``mean = sum / N`` and ``M2 = q - N * mean**2``.

Precision: the only cancellation is ``q - N mean^2``, done in float64 from the local moments, so
it adds a relative variance error of about ``1e-16 * (mean / std)**2`` (1e-6 at mean/std = 1e5).
What remains is the local float32 statistics' own error, as for single-process batch norm: the
local means are rounded to float32 (half an ulp of the mean), which enters the between-rank part of
the variance; measured on float32 channels with mean 1e4 and std 0.1 over 3 ranks: ~2e-4 relative
(the foundation's bound for local statistics is 1e-3). Naive float32 sums of x and x^2 give noise.
A shared shift (e.g. ``running_mean``) would cancel even that, but it is only right if every rank
holds bitwise the same shift; a float64 payload is right whatever the buffers hold, for 8 more
bytes per channel. torch's SyncBatchNorm instead all-gathers ``(mean, invstd, count)`` and
rebuilds the variance from ``invstd`` and ``eps``.

Gradients: the all-reduce is an autograd Function whose backward all-reduces the gradient of the
payload (sum), so input gradients equal those of batch norm on the concatenated batch. Gradients
of ``weight``/``bias`` stay per rank (DDP or the caller sums them), as in torch.

Uneven batches and a rank with an empty batch (count 0) are exact: such a rank contributes zeros,
still takes part in both collectives, and gets an empty output. A rank that died makes the
collective fail after the process group's timeout (``init_process_group(timeout=...)``) with a
RuntimeError naming the layer. The first training forward also checks, with one small
all-reduce, that all ranks agree on the number of channels.

Without an initialized process group (or with a group of one rank) the layer is a plain bnkit
batch norm; the first time that happens without a process group a warning is printed.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..stats import Moments, accumulation_dtype, reduce_dims
from .batchnorm import BatchNormBase

__all__ = ["SyncBatchNorm"]

_warned_no_process_group = False


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the backward sums the gradient over the ranks too."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(BatchNormBase):
    r"""Batch norm whose training statistics are those of the batches of all ranks concatenated.

    Same arguments as :class:`bnkit.BatchNormBase` (``torch.nn.SyncBatchNorm``'s order), plus
    ``process_group`` (default: the world). Any ``(N, C, *)`` input. See the module docstring for
    the collective, its precision, empty/uneven batches and failure behaviour. Running statistics
    are updated on every rank from the global statistics (unbiased with the global count), so they
    stay identical across ranks.

    Shape:
        Input ``(N, C, *)``, N may differ per rank and be 0; output the same shape.
    """

    _global_batch = True  # a batch of one or none here may be part of a larger one across ranks

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group
        self._channels_checked_for = None

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _collective(self, tensor: torch.Tensor, group, what: str, op=None) -> torch.Tensor:
        try:
            if op is not None:
                dist.all_reduce(tensor, op=op, group=group)
                return tensor
            return _AllReduceSum.apply(tensor, group)
        except RuntimeError as e:
            raise RuntimeError(
                f"{self.layer_name}: the all-reduce of {what} across {dist.get_world_size(group)} ranks failed: "
                f"a rank died, timed out, or called this layer a different number of times. Cause: {e}") from e

    def _check_channels(self, group, device) -> None:
        if self._channels_checked_for is group:
            return
        c = torch.tensor([self.num_features, -self.num_features], dtype=torch.int64, device=device)
        self._collective(c, group, "the channel count", op=dist.ReduceOp.MAX)
        if int(c[0]) != -int(c[1]):
            raise ValueError(f"{self.layer_name}: ranks disagree on num_features (between {-int(c[1])} and "
                             f"{int(c[0])}); every rank must build the same model")
        self._channels_checked_for = group

    def _batch_statistics(self, input: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        group = self._group() if self.training else None
        if group is None:
            global _warned_no_process_group
            if self.training and not _warned_no_process_group and not (dist.is_available() and dist.is_initialized()):
                _warned_no_process_group = True
                warnings.warn(f"{self.layer_name}: torch.distributed is not initialized, so SyncBatchNorm layers "
                              f"use this process's batch statistics only (like a single process). Call "
                              f"torch.distributed.init_process_group first to synchronize.", UserWarning, stacklevel=3)
            return super()._batch_statistics(input, update)
        self._check_channels(group, input.device)
        acc = accumulation_dtype(input.dtype)
        x = input.to(acc)
        n = input.numel() // self.num_features
        if n:
            var, mean = torch.var_mean(x, dim=reduce_dims(x.dim()), correction=0)
            # n * mean in float64: rounded in float32 it would be off by ~1e-7 * n * |mean|, which
            # times |mean| in q swamps M2 when |mean| >> std.
            mean, m2 = mean.double(), var.double() * n
        else:  # zeros that stay in the graph, so this rank joins the backward all-reduce too
            mean = m2 = x.sum(dim=reduce_dims(x.dim())).double()
        total = mean * n
        count = torch.full((1,), float(n), dtype=torch.float64, device=input.device)
        payload = torch.cat([count, total, m2 + total * mean])
        reduced = self._collective(payload, group, "batch statistics")
        c = self.num_features
        n_all = int(reduced[0])
        if n_all < 2:
            raise ValueError(f"{self.layer_name}: all ranks together hold {n_all} value(s) per channel "
                             f"(this rank's input shape {tuple(input.shape)}); batch statistics need at least 2")
        g_mean = reduced[1:c + 1] / n_all
        g_var = torch.clamp(reduced[c + 1:] / n_all - g_mean * g_mean, min=0)
        g_mean, g_var = g_mean.to(acc), g_var.to(acc)
        if self._moments_hooks:
            self._call_moments_hooks(Moments(torch.full_like(g_mean, float(n_all)), g_mean.detach(),
                                             (g_var * n_all).detach()))
        if update:
            self._update_running(g_mean, g_var, n_all)
        return g_mean, g_var

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """:func:`bnkit.convert_sync_batchnorm`: every batch norm of ``module`` becomes a bnkit.SyncBatchNorm.

        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` builds ``torch.nn.SyncBatchNorm`` layers
        whatever it is given, so bnkit layers passed through it lose their options.
        """
        from ..tools.conversion import convert_sync_batchnorm  # conversion imports this module
        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.process_group is None else s + f", process_group={self.process_group!r}"
