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
import weakref

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import fold_moments
from ..nn.batchnorm import BatchNormBase
from ..stats import Moments
from .freezing import batch_norm_layers, stats_frozen_mode

__all__ = ["accumulate"]

# Layers inside an accumulate() context now: a second context on one of them is refused.
_ACCUMULATING: weakref.WeakSet = weakref.WeakSet()


class _Accumulator:
    """Pools one layer's batch statistics over ``steps`` micro-batches, then updates once."""

    def __init__(self, layer: _BatchNorm, steps: int):
        self.layer, self.steps = layer, steps
        self.pooled: Moments | None = None
        self.seen = 0

    def add(self, moments: Moments) -> None:
        self.pooled = moments if self.pooled is None else self.pooled.merge(moments)
        self.seen += 1
        if self.seen == self.steps:
            self.flush()

    def flush(self) -> None:
        if self.pooled is None:
            return
        layer, pooled = self.layer, self.pooled
        self.pooled, self.seen = None, 0
        if isinstance(layer, BatchNormBase):
            layer.fold_moments(pooled)
            return
        fold_moments(pooled, layer.running_mean, layer.running_var, layer.num_batches_tracked,
                     momentum=layer.momentum, name=type(layer).__name__)


def _torch_hooks(layer: _BatchNorm, acc: _Accumulator) -> list:
    """torch.nn layers: batch statistics without the update for each call (torch's own switch), and
    the moments pooled only after the layer accepted the batch."""
    saved = []  # the layer's own flag during one call

    def before(module, args):
        saved.append(module.track_running_stats)
        module.track_running_stats = False

    def after(module, args, kwargs, output):
        if not module.training:  # eval normalizes with the running statistics: nothing to pool (as bnkit's hook)
            return
        with torch.no_grad():
            acc.add(Moments.of(args[0] if args else kwargs["input"]))

    def restore(module, args, output):
        if saved:  # always_call: also after a call that failed in an earlier hook
            module.track_running_stats = saved.pop()

    return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after, with_kwargs=True),
            layer.register_forward_hook(restore, always_call=True)]


def _live(layer: _BatchNorm) -> bool:
    """The layer would update its running statistics in training (not frozen, tracked, buffers present)."""
    return stats_frozen_mode(layer) is None and layer.track_running_stats and layer.running_mean is not None


@contextlib.contextmanager
def accumulate(model: torch.nn.Module, steps: int):
    """``with bnkit.accumulate(model, steps=k):`` update running statistics once per k micro-batches.

    Works on bnkit and ``torch.nn`` batch-norm layers. Layers whose statistics are frozen (or not
    tracked) are left alone. A batch a layer refuses (wrong shape, a batch of one) is not pooled. A live
    ghost layer (``virtual_batch_size``) is refused on entry.
    The model's mode, momentum and conventions are unchanged. bnkit layers are driven through their
    public API (``stats_frozen``, :meth:`~bnkit.BatchNormBase.register_moments_hook`,
    :meth:`~bnkit.BatchNormBase.fold_moments`); contexts do not nest on the same layer.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"accumulate: steps must be a positive int, got {steps!r}")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"accumulate: {type(model).__name__} has no batch-norm layer")
    for name, layer in layers:
        if layer in _ACCUMULATING:
            raise RuntimeError(f"accumulate: {getattr(layer, 'layer_name', type(layer).__name__)} "
                               f"({name or 'the model'}) is already inside an accumulate() context")
    live = [layer for _, layer in layers if _live(layer)]
    for name, layer in layers:  # refused here, before any layer is touched: in forward it came part-way
        if layer in live and getattr(layer, "virtual_batch_size", None) is not None:
            raise ValueError(f"accumulate: {layer.layer_name} ({name or 'the model'}): ghost-batch statistics "
                             f"(virtual_batch_size={layer.virtual_batch_size}) cannot be pooled over micro-batches "
                             f"as one batch; use plain batch norm, or freeze its statistics (bnkit.freeze_stats)")
    accumulators, handles = [], []
    for layer in live:
        acc = _Accumulator(layer, steps)
        accumulators.append(acc)
        _ACCUMULATING.add(layer)
        if isinstance(layer, BatchNormBase):
            layer.stats_frozen = "batch"
            handles.append(layer.register_moments_hook(lambda _layer, moments, acc=acc: acc.add(moments)))
        else:
            handles += _torch_hooks(layer, acc)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for acc in accumulators:
            if isinstance(acc.layer, BatchNormBase):
                acc.layer.stats_frozen = None
            _ACCUMULATING.discard(acc.layer)
            acc.flush()
