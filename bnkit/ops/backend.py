"""Which implementation runs a layer: the torch path or the fused Triton kernels.

``bnkit.set_backend("auto" | "torch" | "triton")`` (or the environment variable ``BNKIT_BACKEND``,
read when no backend was set in code):

* ``"auto"`` (default): Triton kernels for CUDA tensors when Triton imports, the torch path otherwise.
* ``"torch"``: always the torch path.
* ``"triton"``: always the kernels; an error if Triton is missing or the tensor is on the CPU, except
  that with ``TRITON_INTERPRET=1`` (set before Triton is imported) CPU tensors run in Triton's
  interpreter, slowly: that is how the kernels are tested without a GPU.

float64 input, empty input and layer features the kernels do not cover (ghost, sync, renorm, ...)
stay on the torch path whatever the backend.
"""
from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "set_backend", "get_backend", "kernels_for"]

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_state: dict = {"backend": None, "ops": None, "import_error": None}


def set_backend(name: str | None) -> None:
    """Select the backend for every bnkit layer; ``None`` goes back to ``BNKIT_BACKEND`` / ``"auto"``."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"bnkit.set_backend: expected one of {BACKENDS} or None, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    """The backend in force: the one set in code, else ``BNKIT_BACKEND``, else ``"auto"``."""
    if _state["backend"] is not None:
        return _state["backend"]
    name = os.environ.get("BNKIT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable BNKIT_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


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


def kernels_for(x: torch.Tensor, training: bool = True, activation: str = "identity"):
    """The module of Triton ops to run ``x`` with, or None for the torch path."""
    backend = get_backend()
    if backend == "torch" or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return None
    if backend == "auto":
        return _triton_ops() if x.is_cuda else None
    ops = _triton_ops()
    if ops is None:
        raise RuntimeError(f"bnkit backend 'triton' was requested but Triton does not import "
                           f"({_state['import_error']}); pip install 'bnkit[triton]' or use set_backend('auto')")
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        raise RuntimeError(f"bnkit backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 "
                           f"set before Triton is imported); got a tensor on {x.device}")
    return ops
