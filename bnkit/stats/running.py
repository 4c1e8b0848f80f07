"""Running-statistic updates (the population estimate), PyTorch convention.

``new = (1 - momentum) * old + momentum * batch``; ``running_var`` receives the unbiased batch
variance. ``momentum`` may be a float or a 0-d tensor (the cumulative average ``1 / num_batches``
stays on the device, without a host sync). ``keep`` is an optional 0-d bool tensor: where it is
False the old values are kept (a batch with non-finite statistics is skipped, sync-free).
"""
from __future__ import annotations

import torch

__all__ = ["update_running_stats"]


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                         mean: torch.Tensor, unbiased_var: torch.Tensor, momentum,
                         keep: torch.Tensor | None = None) -> None:
    for buf, new in ((running_mean, mean), (running_var, unbiased_var)):
        if buf is None:
            continue
        new = new.detach().to(buf.dtype)
        updated = buf * (1 - momentum) + new * momentum
        if keep is not None:
            updated = torch.where(keep, updated, buf)
        buf.copy_(updated)
