"""Input checks shared by the functional form and every layer.

Each check raises before any buffer changes, with a message that names the layer, what was
expected and what arrived.
"""
from __future__ import annotations

import torch

__all__ = ["check_input", "check_batch_size", "SINGLE_VALUE_FIXES"]

SINGLE_VALUE_FIXES = ("use DataLoader(..., drop_last=True) so no last batch of one remains; call model.eval() "
                      "for inference; freeze the statistics (bnkit.freeze_stats(model, use_running=True)); "
                      "or use GroupNorm for batches of one")

_HALF = (torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_input(name: str, x: torch.Tensor, num_features: int | None, tensors: dict) -> None:
    """Check ``x`` (N, C, *) against the layer's channel count and its parameters/buffers.

    ``tensors`` maps names (``weight``, ``running_mean``, ...) to tensors or None.
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
        raise ValueError(f"{name}: expected {num_features} channels in dimension 1, got {channels} "
                         f"(input shape {_shape(x)})")
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
