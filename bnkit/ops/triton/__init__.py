"""Fused Triton kernels for batch norm (+ activation). Importing this package imports Triton;
the rest of bnkit reaches it only through :mod:`bnkit.ops.backend`, lazily."""
from .ops import eval_forward, train_forward

__all__ = ["eval_forward", "train_forward"]
