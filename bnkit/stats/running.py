"""The running-statistics update, written once: EMA or cumulative average, and the non-finite guard.

PyTorch's convention: ``new = (1 - momentum) * old + momentum * batch``, ``running_var`` receives
the unbiased batch variance (or the biased one, for layers that keep Keras's convention), and
``momentum=None`` is the cumulative average, factor ``1 / num_batches_tracked`` counted after the
increment. ``momentum`` may be a float or a 0-d tensor (a schedule evaluated on the device).

The guard (``nonfinite="skip"``, the default) runs on the device: ``keep`` is a 0-d bool tensor,
True when the batch's statistics are finite; the buffers take the new values only where ``keep``
(``torch.where``), ``num_batches_tracked`` grows by ``keep`` and a skipped-batch counter by
``~keep``. Nothing is read back to the host, so a training step stays asynchronous and a CUDA
graph can capture it; the layers report skipped batches when the host reads anyway (``.eval()``,
``state_dict()``, :func:`bnkit.nonfinite_report`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ema", "nonfinite_flag", "finite", "stored_variance", "enough_values", "candidates", "commit", "updated",
           "RunningStats", "update_running_stats"]


def nonfinite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d float32 tensor: 1.0 when some element of the tensors is NaN/Inf, else 0.0 (no host read).

    One fused check (the op ``torch.amp.GradScaler`` uses to find inf/NaN gradients: it sets the flag
    and multiplies by 1.0, which changes nothing) instead of ``isfinite(t).all()`` per tensor, five
    dispatches each. The plain ``isfinite`` form under torch.compile (which fuses it), under
    ``torch.func`` transforms (no batching rule for the fused op), for bfloat16 (CUDA's fused op
    lacks it), for tensor subclasses (FakeTensor, ...), on devices other than CPU and CUDA, and while
    a CUDA graph captures the first call on a device."""
    flag = _fused_flag(tensors)
    return flag if flag is not None else _all_finite(tensors).logical_not().to(torch.float32)


def finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: every element of every tensor is finite (no host read)."""
    flag = _fused_flag(tensors)
    return flag.logical_not() if flag is not None else _all_finite(tensors)


def _all_finite(tensors) -> torch.Tensor:
    keep = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        keep = keep & torch.isfinite(t).all()
    return keep


def _fused_flag(tensors) -> torch.Tensor | None:
    """The fused check's flag, or None where only the ``isfinite`` form works (see nonfinite_flag)."""
    if type(tensors[0]) is not torch.Tensor:  # a subclass (FakeTensor, DTensor, ...): no cached real 1.0 in it
        return None
    one = _ONE.get(tensors[0].device)
    if one is None:
        one = _one(tensors[0].device)
    if one is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or any(
            t.dtype not in _FUSED_DTYPES for t in tensors):
        return None
    flag = torch.zeros_like(one)
    torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), flag, one)
    return flag


_ONE: dict = {}
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16)


def _one(device: torch.device) -> torch.Tensor | None:
    """The cached float32 1.0 on ``device`` (the check's unscale factor); None while a CUDA graph is
    capturing (a new tensor would be filled only at replay), and on devices without the fused check."""
    if device.type not in ("cpu", "cuda", "meta") or torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    one = torch.ones((), dtype=torch.float32, device=device)
    if type(one) is not torch.Tensor:  # made under a mode (FakeTensorMode): never cached for real steps
        return None
    return _ONE.setdefault(device, one)


def stored_variance(var: torch.Tensor, n, unbiased: bool) -> torch.Tensor:
    """The variance a running update stores from a biased batch variance over ``n`` values: Bessel's
    ``var * n / (n - 1)`` (torch's convention) or ``var`` itself (Keras's; or ``n=None``: ``var`` is
    already the estimate to store). ``n`` may be a 0-d tensor (masked batches), kept on the device."""
    if not unbiased or n is None:
        return var
    if isinstance(n, torch.Tensor):
        return var * (n / torch.clamp(n - 1, min=1)).to(var.dtype)
    return var * (n / (n - 1))


def enough_values(n) -> torch.Tensor | None:
    """For a count known only on the device (a masked batch): a 0-d bool, at least 2 values, whatever
    variance is stored. None for a count known on the host (checked there, before the batch runs)."""
    return n >= 2 if isinstance(n, torch.Tensor) else None


def ema(old: torch.Tensor, new: torch.Tensor, momentum) -> torch.Tensor:
    """Out of place: ``(1 - momentum) * old + momentum * new`` in ``old``'s dtype."""
    new = new.detach().to(old.dtype)
    return old * (1 - momentum) + new * momentum


def _factor(momentum, num_batches_tracked: torch.Tensor | None, dtype: torch.dtype):
    """The momentum of this update: as given, or ``1 / (num_batches_tracked + 1)`` for ``None``."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / (num_batches_tracked.to(dtype) + 1)


def candidates(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked, mean: torch.Tensor,
               var: torch.Tensor, momentum) -> tuple[torch.Tensor, torch.Tensor]:
    """The running statistics after folding in ``(mean, var)``, were the batch kept (out of place).

    ``var`` is the variance to store (unbiased for torch's convention).
    """
    m = _factor(momentum, num_batches_tracked, running_mean.dtype)
    return ema(running_mean, mean, m), ema(running_var, var, m)


class RunningStats(NamedTuple):
    """Running statistics (``None`` where the layer has no such buffer)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None


def updated(running_mean, running_var, num_batches_tracked, new_mean, new_var,
            keep: torch.Tensor | None) -> RunningStats:
    """Out of place (for ``torch.func``): the statistics after one batch, :func:`candidates` ``(new_mean,
    new_var)`` where ``keep``, the old ones elsewhere; the batch counted where ``keep``."""
    if keep is not None:
        new_mean, new_var = torch.where(keep, new_mean, running_mean), torch.where(keep, new_var, running_var)
    count = None
    if num_batches_tracked is not None:
        count = num_batches_tracked + (1 if keep is None else keep.to(num_batches_tracked.dtype))
    return RunningStats(new_mean, new_var, count)


def commit(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked, new_mean: torch.Tensor,
           new_var: torch.Tensor, keep: torch.Tensor | None, skipped: torch.Tensor | None = None,
           skip: torch.Tensor | None = None) -> None:
    """In place, the one place buffers change: take ``(new_mean, new_var)`` where ``keep`` (all when None),
    count the kept batch in ``num_batches_tracked`` and a skipped one in ``skipped`` (not under
    ``torch.func`` transforms, where it cannot be: see below). ``skip``: ``~keep``
    as the float flag of :func:`nonfinite_flag`, when the caller has it (spares a dispatch; ``skipped``
    is then a float counter). The new values must not require grad (callers detach): no ``no_grad``
    context here, it costs as much as a dispatch."""
    if keep is None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    if torch._C._are_functorch_transforms_active():  # torch.func: where(out=) has no batching rule
        running_mean.copy_(torch.where(keep, new_mean, running_mean))
        running_var.copy_(torch.where(keep, new_var, running_var))
        # the counter is no buffer (vmap's ensembling gives it no per-model copy) and a transform refuses
        # in-place updates of a captured tensor: not counted; num_batches_tracked shows the skips (README)
        skipped = None
    else:
        torch.where(keep, new_mean, running_mean, out=running_mean)
        torch.where(keep, new_var, running_var, out=running_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(keep)
    if skipped is not None:
        skipped.add_(~keep if skip is None else skip)


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, momentum, keep: torch.Tensor | None = None) -> None:
    """In place EMA of a pair of buffers without a batch counter (batch renorm's ``renorm_mean/std``)."""
    commit(running_mean, running_var, None, *candidates(running_mean, running_var, None, mean, var, momentum), keep)
