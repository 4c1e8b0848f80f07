"""Activations that can follow batch norm in the same layer (fused on the GPU path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["activation_module", "ACTIVATIONS", "check_activation", "resolve_activation", "apply_activation", "check_memory_efficient"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu")

# Exact classes, not isinstance: a subclass may change forward, which the fused kernels would not follow.
_MODULES = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}


def check_activation(layer: str, activation: str | None) -> str:
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"{layer}: unknown activation {activation!r}; expected one of {ACTIVATIONS} or None")
    return name


def resolve_activation(layer: str, activation) -> tuple[str, float]:
    """``(name, negative_slope)`` of a layer's ``activation=``: a name from :data:`ACTIVATIONS`, ``None``,
    or a module ``nn.Identity()``, ``nn.ReLU()``, ``nn.LeakyReLU(slope)`` or ``nn.SiLU()``. The name
    ``"leaky_relu"`` means torch's default slope 0.01; ``nn.LeakyReLU`` carries its own."""
    if not isinstance(activation, nn.Module):
        return check_activation(layer, activation), 0.01
    name = _MODULES.get(type(activation))
    if name is None:
        raise ValueError(f"{layer}: activation {activation!r} cannot be fused into batch norm; pass one of "
                         f"nn.Identity(), nn.ReLU(), nn.LeakyReLU(slope), nn.SiLU() or a name in {ACTIVATIONS}, "
                         f"or put the module after the layer")
    return name, float(activation.negative_slope) if name == "leaky_relu" else 0.01


def activation_module(name: str, negative_slope: float = 0.01) -> nn.Module:
    """The torch module that computes activation ``name`` (the inverse of :func:`resolve_activation`)."""
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return {"identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU}[name]()


def check_memory_efficient(layer: str, memory_efficient: bool, activation: str, negative_slope: float) -> bool:
    """Saving only the output for backward needs an activation that can be inverted."""
    if memory_efficient and not (activation == "identity" or (activation == "leaky_relu" and negative_slope > 0)):
        raise ValueError(f"{layer}: memory_efficient=True keeps only the output for backward, so the activation "
                         f"must be invertible (identity, or leaky_relu with negative_slope > 0); got "
                         f"activation={activation!r}, negative_slope={negative_slope}")
    return bool(memory_efficient)


def apply_activation(y: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    if activation == "identity":
        return y
    # a layer's activation attribute set after construction reaches here unchecked: never run it as identity
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
