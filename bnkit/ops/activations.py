"""Activations that can follow batch norm in the same layer (fused on the GPU path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_activation", "apply_activation"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu")


def check_activation(layer: str, activation: str | None) -> str:
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"{layer}: unknown activation {activation!r}; expected one of {ACTIVATIONS} or None")
    return name


def apply_activation(y: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y
