"""Gradient accumulation that does not change the running statistics' meaning.

With k micro-batches of b samples per optimizer step, plain batch norm updates its running
statistics k times per step, each from b samples (so momentum acts k times faster, and each
estimate is noisier). Inside ``with bnkit.accumulate(model, steps=k):`` each micro-batch still
normalizes with its own statistics (the forward and gradients are unchanged), but the running
statistics are updated once per k micro-batches, from the exact pooled statistics of the k*b
samples (Chan merge), i.e. exactly as one batch of k*b samples would have updated them.

Micro-batches left over when the context exits (fewer than k) are folded in as one update.

An alternative some use is to normalize each micro-batch with the pooled statistics of the
previous step (constants): it makes the forward independent of the micro-batch size but removes
the batch-statistic term from the gradient; bnkit does not implement it (normalizing with the
running statistics is available as ``bnkit.freeze_stats(model, use_running=True)``).
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .freezing import batch_norm_layers
from .functional import batch_statistics_update
from .nn.batchnorm import BatchNormBase
from .stats import Moments, batch_moments

__all__ = ["accumulate"]


class _Accumulator:
    """Pools one layer's batch statistics over ``steps`` micro-batches, then updates once."""

    def __init__(self, layer: _BatchNorm, steps: int):
        self.layer, self.steps = layer, steps
        self.pooled: Moments | None = None
        self.seen = 0

    def add(self, mean: torch.Tensor, var: torch.Tensor, n) -> None:
        count = torch.as_tensor(n, dtype=mean.dtype, device=mean.device).expand_as(mean)
        part = Moments(count, mean, var * count)
        self.pooled = part if self.pooled is None else self.pooled.merge(part)
        self.seen += 1
        if self.seen == self.steps:
            self.flush()

    def flush(self) -> None:
        if self.pooled is None:
            return
        layer, pooled = self.layer, self.pooled
        self.pooled, self.seen = None, 0
        if isinstance(layer, BatchNormBase):
            name, momentum = layer.layer_name, layer._update_momentum()
            nonfinite, variance = layer.nonfinite, layer.variance
        else:
            name, momentum, nonfinite, variance = type(layer).__name__, layer.momentum, "skip", "unbiased"
        n = pooled.count[0] if pooled.count.numel() else 0
        batch_statistics_update(name, pooled.mean, pooled.var(), n, layer.running_mean, layer.running_var,
                                momentum, layer.num_batches_tracked, nonfinite, variance)


def _torch_pre_hook(acc: _Accumulator):
    def hook(module, args):
        if module.training and module.track_running_stats and module.running_mean is not None:
            x = args[0]
            with torch.no_grad():
                mean, var = batch_moments(x)
            module.track_running_stats = False  # torch: batch statistics, no update, for this call only
            module._bnkit_accumulating = True
            acc.add(mean, var, x.numel() // x.shape[1])
    return hook


def _torch_post_hook(module, args, output):
    if getattr(module, "_bnkit_accumulating", False):
        module.track_running_stats = True
        module._bnkit_accumulating = False


@contextlib.contextmanager
def accumulate(model: torch.nn.Module, steps: int):
    """``with bnkit.accumulate(model, steps=k):`` update running statistics once per k micro-batches.

    Works on bnkit and ``torch.nn`` batch-norm layers. Layers whose statistics are frozen are left
    alone. The model's mode, momentum and conventions are unchanged.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"accumulate: steps must be a positive int, got {steps!r}")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"accumulate: {type(model).__name__} has no batch-norm layer")
    accumulators, handles = [], []
    for _, layer in layers:
        acc = _Accumulator(layer, steps)
        accumulators.append(acc)
        if isinstance(layer, BatchNormBase):
            if layer.stats_sink is not None:
                raise RuntimeError(f"accumulate: {layer.layer_name} is already inside an accumulate() context")
            layer.stats_sink = acc.add
        else:
            handles += [layer.register_forward_pre_hook(_torch_pre_hook(acc)),
                        layer.register_forward_hook(_torch_post_hook, always_call=True)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for acc in accumulators:
            if isinstance(acc.layer, BatchNormBase):
                acc.layer.stats_sink = None
            acc.flush()
