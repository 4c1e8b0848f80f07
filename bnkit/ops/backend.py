"""Which implementation runs a layer: the torch path or the fused Triton kernels.

``bnkit.set_backend("auto" | "torch" | "triton")`` (or the environment variable ``BNKIT_BACKEND``,
read when no backend was set in code):

* ``"auto"`` (default): the Triton kernels for a CUDA tensor only where a measured table shipped with
  bnkit (:mod:`bnkit.ops.kernel_table`: device, date, command, rows) says they beat torch's own
  kernel by at least 10% (large NCHW training, large channels_last bfloat16 training with at most 64
  channels, large eval) on a GPU of the capability it was measured on, or when the layer asks for
  ``memory_efficient=True`` in training (only the kernels can free the input); torch's path otherwise,
  and always for CPU tensors. The decision is cached per shape, strides and dtype and reads nothing
  from the device.
* ``"torch"``: always the torch path.
* ``"triton"``: always the kernels; an error if Triton is missing or the tensor is on the CPU, except
  that with ``TRITON_INTERPRET=1`` (set before Triton is imported) CPU tensors run in Triton's
  interpreter, slowly: that is how the kernels are tested without a GPU.

float64 input, empty input and layer features the kernels do not cover (ghost, sync, renorm, ...)
stay on the torch path whatever the backend. The kernels differentiate once: a second derivative
through them (a loss on gradients taken with ``create_graph=True``) raises; the torch path has it.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .kernel_table import CAPABILITY, matching_row

__all__ = ["BACKENDS", "set_backend", "get_backend", "kernels_for", "auto_uses_kernels", "measured_here"]

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_state: dict = {"backend": None, "env": None, "ops": None, "import_error": None}


def set_backend(name: str | None) -> None:
    """Select the backend for every bnkit layer; ``None`` goes back to ``BNKIT_BACKEND`` / ``"auto"``."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"bnkit.set_backend: expected one of {BACKENDS} or None, got {name!r}")
    _state["backend"] = name
    _state["env"] = None


def get_backend() -> str:
    """The backend in force: the one set in code, else ``BNKIT_BACKEND`` (read when first needed and
    again after ``set_backend(None)``: layers ask on every call), else ``"auto"``."""
    if _state["backend"] is not None:
        return _state["backend"]
    if _state["env"] is None:
        name = os.environ.get("BNKIT_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"environment variable BNKIT_BACKEND={name!r}: expected one of {BACKENDS}")
        _state["env"] = name
    return _state["env"]


def _triton_ops():
    """The Triton ops module, or None when Triton does not import (the error is kept for messages)."""
    if _state["ops"] is None and _state["import_error"] is None:
        try:
            from . import triton as ops
            _state["ops"] = ops
        except ImportError as e:
            _state["import_error"] = e
    return _state["ops"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _layout(shape: tuple, stride: tuple) -> str | None:
    """"nchw" when the flattened spatial axis is contiguous, "nhwc" when the channels are, else None."""
    spatial = [(size, st) for size, st in zip(shape[2:], stride[2:]) if size > 1]
    if not spatial:
        return None  # (N, C) or spatial size 1: not measured
    if spatial[-1][1] == 1:
        return "nchw"
    return "nhwc" if stride[1] == 1 else None


@functools.lru_cache(maxsize=4096)
def auto_uses_kernels(shape: tuple, stride: tuple, dtype: torch.dtype, training: bool) -> bool:
    """Backend "auto"'s decision for a CUDA tensor of this shape, strides and dtype (see kernel_table)."""
    return matching_row("train" if training else "eval", _layout(shape, stride), str(dtype).split(".")[-1],
                        math.prod(shape), shape[1]) is not None


@functools.lru_cache(maxsize=None)
def measured_here(device_index: int) -> bool:
    """Whether the CUDA device is of the compute capability the kernel table was measured on."""
    return tuple(torch.cuda.get_device_capability(device_index)) == CAPABILITY


def kernels_for(x: torch.Tensor, training: bool, memory_efficient: bool = False):
    """The module of Triton ops to run ``x`` with, or None for the torch path.

    ``training``: the layer normalizes with batch statistics; ``memory_efficient``: it asks to keep only
    its output for backward, which only the kernels do.
    """
    backend = get_backend()
    if backend == "torch" or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return None
    if backend == "auto":
        if not x.is_cuda or not ((memory_efficient and training) or (
                measured_here(x.get_device()) and auto_uses_kernels(x.shape, x.stride(), x.dtype, training))):
            return None
        return _triton_ops()
    ops = _triton_ops()
    if ops is None:
        raise RuntimeError(f"bnkit backend 'triton' was requested but Triton does not import "
                           f"({_state['import_error']}); pip install 'bnkit[triton]' or use set_backend('auto')")
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        raise RuntimeError(f"bnkit backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 "
                           f"set before Triton is imported); got a tensor on {x.device}")
    return ops
