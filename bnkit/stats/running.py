"""Running-statistic updates (the population estimate), PyTorch convention.

``new = (1 - momentum) * old + momentum * batch``; ``running_var`` receives the unbiased batch
variance (or the biased one, for layers that keep Keras's convention). ``momentum`` may be a float
or a 0-d tensor (the cumulative average ``1 / num_batches`` stays on the device, without a host
sync). ``keep`` is an optional 0-d bool tensor: where it is False the old values are kept (a batch
with non-finite statistics is skipped, sync-free).
"""
from __future__ import annotations

import torch

__all__ = ["ema", "update_running_stats"]


def ema(old: torch.Tensor, new: torch.Tensor, momentum, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Out of place: ``(1 - momentum) * old + momentum * new`` in ``old``'s dtype, or ``old`` where not ``keep``."""
    new = new.detach().to(old.dtype)
    updated = old * (1 - momentum) + new * momentum
    return updated if keep is None else torch.where(keep, updated, old)


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                         mean: torch.Tensor, unbiased_var: torch.Tensor, momentum,
                         keep: torch.Tensor | None = None) -> None:
    """In place: :func:`ema` into the buffers that exist."""
    for buf, new in ((running_mean, mean), (running_var, unbiased_var)):
        if buf is not None:
            buf.copy_(ema(buf, new, momentum, keep))
