"""Input checks shared by the functional form and every layer.

Each check raises before any buffer changes, with a message that names the layer, what was
expected and what arrived. None of them reads a tensor's values on the device: they look at
shapes, dtypes and devices (and at CPU-held ``lengths``), so a training step stays asynchronous.
"""
from __future__ import annotations

import torch

__all__ = ["check_input", "check_batch_size", "check_choice", "check_eps", "check_momentum", "check_mask",
           "mask_from_lengths", "channel_first", "channel_back", "nonfinite_message", "refuse_removed",
           "SINGLE_VALUE_FIXES", "NONFINITE_POLICIES", "SINGLE_SAMPLE_POLICIES", "VARIANCE_KINDS", "REMOVED_KEYWORDS"]

NONFINITE_POLICIES = ("skip", "raise", "propagate")
SINGLE_SAMPLE_POLICIES = ("raise", "use_running", "skip_update")
VARIANCE_KINDS = ("unbiased", "biased")

SINGLE_VALUE_FIXES = ("use DataLoader(..., drop_last=True) so no last batch of one remains; call model.eval() "
                      "for inference; freeze the statistics (bnkit.freeze_stats(model, use_running=True)); "
                      "or use GroupNorm for batches of one")

_HALF = (torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_choice(name: str, what: str, value, choices):
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise ValueError(f"{name}: {what} must be one of {choices}, got {value!r}")
    return value


def check_eps(name: str, eps: float, training: bool) -> None:
    """torch's rule, checked where torch checks it (when the layer runs): > 0 with batch statistics, >= 0 else."""
    if training and not eps > 0:
        raise ValueError(f"{name}: batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"{name}: batch_norm eps must be non-negative, but got {eps}")


def check_momentum(name: str, momentum) -> None:
    """A torch-convention momentum: a number in [0, 1] or None (cumulative average)."""
    if momentum is None or isinstance(momentum, torch.Tensor):
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: momentum must be a number in [0, 1] (weight of the new batch) or None "
                         f"(cumulative average), got {momentum!r}")


# The keywords the layers (and, for negative_slope, the functional form) took before one value per
# concept (bnkit 0.1), and how to write them now.
REMOVED_KEYWORDS = {
    "decay": lambda v: f"momentum=bnkit.momentum.Decay({v!r})",
    "half_life": lambda v: f"momentum=bnkit.momentum.HalfLife({v!r})",
    "momentum_schedule": lambda v: (f"momentum=bnkit.momentum.Schedule({v!r}, total_steps=..., start=...)"
                                    if isinstance(v, str) else "momentum=<the callable>"),
    "total_steps": lambda v: f"momentum=bnkit.momentum.Schedule(..., total_steps={v!r})",
    "negative_slope": lambda v: f"activation=torch.nn.LeakyReLU({v!r})",
    "virtual_batch_size": lambda v: f"bnkit.GhostBatchNorm1d/2d/3d(C, virtual_batch_size={v!r}, ...)",
    "memory_efficient": lambda v: f"layer.memory_efficient = {v!r} after construction",
}


def refuse_removed(name: str, removed: dict, applicable=tuple(REMOVED_KEYWORDS)) -> None:
    """A TypeError for keyword arguments the caller does not take, giving the new spelling of those in
    ``applicable`` (the old keywords this caller used to take; others are reported as unexpected)."""
    unknown = [k for k in removed if k not in applicable]
    if unknown:
        raise TypeError(f"{name}: unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    raise TypeError(f"{name}: " + "; ".join(f"{k}={v!r} is now {REMOVED_KEYWORDS[k](v)}" for k, v in removed.items()))


def nonfinite_message(name: str, bad_channels: list) -> str:
    return (f"{name}: this batch would make the running statistics NaN/Inf in channel(s) {bad_channels[:10]}"
            f"{' ...' if len(bad_channels) > 10 else ''} (NaN/Inf in the batch, a batch variance beyond the "
            f"buffers' dtype, or running statistics that already are NaN/Inf); ")


def channel_first(name: str, x, axis: int, check_dim=None):
    """``x`` with its channel axis moved to dimension 1, after the checks that need the user's layout
    (a tensor, the layer's number of dimensions, an axis in range). Messages show the input as given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
    if check_dim is not None:
        check_dim(x)
    if axis == 1:
        return x
    ndim = x.dim()
    if not -ndim <= axis < ndim or ndim < 2:
        raise ValueError(f"{name}: axis={axis} is out of range for a {ndim}-D input of shape {_shape(x)}")
    return x if axis % ndim == 1 else x.movedim(axis, 1)


def channel_back(y: torch.Tensor, axis: int, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`channel_first` on an output, in the memory format of the input ``like``: torch's
    kernels return 3-D ``(N, C, L)`` contiguous, which moved back is not a contiguous ``(N, L, C)``
    (one copy then; 4-D/5-D channels-last outputs move back contiguous as they are)."""
    if axis == 1 or axis % y.dim() == 1:
        return y
    y = y.movedim(1, axis)
    return y.contiguous() if not y.is_contiguous() and like.is_contiguous() else y


def check_input(name: str, x: torch.Tensor, num_features: int | None, tensors: dict, axis: int = 1) -> None:
    """Check ``x`` (N, C, *) against the layer's channel count and its parameters/buffers.

    ``tensors`` maps names (``weight``, ``running_mean``, ...) to tensors or None. ``axis``: where the
    channels are in the user's input, for the message.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected an input of shape (N, C, *) with at least 2 dimensions, "
                         f"got {x.dim()}-D input of shape {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
    channels = x.shape[1]
    if num_features is not None and channels != num_features:
        where = "dimension 1" if axis == 1 else f"dimension {axis}"
        shape = _shape(x if axis == 1 else x.movedim(1, axis))
        raise ValueError(f"{name}: expected {num_features} channels in {where}, got {channels} "
                         f"(input shape {shape})")
    for key, t in tensors.items():
        if t is None:
            continue
        if t.numel() != channels:
            raise ValueError(f"{name}: {key} has {t.numel()} elements but the input has {channels} channels")
        if t.device != x.device:
            raise RuntimeError(f"{name}: {key} is on {t.device} but the input is on {x.device}; "
                               f"move the layer with .to({str(x.device)!r})")
        if t.dtype != x.dtype and not (x.dtype in _HALF and t.dtype == torch.float32):
            raise TypeError(f"{name}: {key} has dtype {t.dtype} but the input has dtype {x.dtype}; "
                            f"convert one of them (half/bfloat16 input with float32 parameters is allowed)")


def check_batch_size(name: str, x: torch.Tensor) -> int:
    """Values per channel for batch statistics; raises for an empty batch or a single value."""
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    if x.numel() == 0:
        raise ValueError(f"{name}: got an empty batch (input shape {_shape(x)}); batch statistics of zero "
                         f"values are undefined and the running statistics were left unchanged. "
                         f"Skip empty batches before calling the model.")
    if n == 1:
        raise ValueError(f"{name}: Expected more than 1 value per channel when training, got input size "
                         f"{_shape(x)}. Batch statistics of one value are undefined. Fixes: {SINGLE_VALUE_FIXES}.")
    return n


def check_mask(name: str, x: torch.Tensor, mask) -> torch.Tensor:
    """A bool tensor on ``x``'s device shaped like ``x`` (channel-first) without its channel dimension."""
    want = (x.shape[0],) + tuple(x.shape[2:])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a bool torch.Tensor of shape {want}, got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != want:
        raise ValueError(f"{name}: mask must be a bool tensor shaped like the input without its channel "
                         f"dimension, {want}; got {mask.dtype} of shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise RuntimeError(f"{name}: mask is on {mask.device} but the input is on {x.device}; move it with "
                           f".to({str(x.device)!r})")
    return mask


def mask_from_lengths(name: str, x: torch.Tensor, lengths) -> torch.Tensor:
    """Padding mask ``(N, L)`` for a channel-first ``(N, C, L)`` tensor: position l of example n is valid
    when ``l < lengths[n]``. ``lengths`` held on the CPU (a tensor or a list, as ``pack_padded_sequence``
    wants) are checked against ``0 <= lengths <= L`` without touching the device and copied to it without
    a synchronization; lengths on a device cost one host read for that check."""
    if x.dim() != 3:
        raise ValueError(f"{name}: lengths= needs a 3-D input (N, C, L) or (N, L, C) with axis=-1, "
                         f"got {x.dim()}-D input")
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: lengths must be a 1-D integer tensor or list, got {type(lengths).__name__}") \
                from e
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name}: lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"{name}: lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
    values = lengths.detach().cpu().numpy() if lengths.device.type != "meta" else None
    if values is not None and values.size and (values.min() < 0 or values.max() > x.shape[2]):
        raise ValueError(f"{name}: lengths must be in [0, {x.shape[2]}] (the input's length), got "
                         f"min {int(values.min())}, max {int(values.max())}")
    # non_blocking: lengths in pageable host memory are staged at once, without the stream
    # synchronization a blocking host-to-device copy costs on a GPU
    return torch.arange(x.shape[2], device=x.device) < lengths.to(x.device, non_blocking=True).unsqueeze(1)
