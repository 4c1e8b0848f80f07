"""Keras ``BatchNormalization`` weights in and out of bnkit, with Keras's numbers.

Keras 3 and PyTorch differ in three conventions, and a port must change all three:

================  ==============================  ===========================
                  Keras 3                         PyTorch / bnkit default
================  ==============================  ===========================
momentum          weight of the OLD value (0.99)  weight of the NEW batch (0.1)
epsilon           1e-3                            1e-5
moving variance   biased batch variance           unbiased (n / (n - 1))
================  ==============================  ===========================

:func:`from_keras` builds a bnkit layer with ``momentum=bnkit.momentum.Decay(momentum)``,
``eps=epsilon`` and ``variance="biased"``, so that in training and in inference it gives Keras's outputs and moving
statistics::

    moving = momentum * moving + (1 - momentum) * batch          # batch variance biased
    y      = (x - mean) / sqrt(var + epsilon) * gamma + beta

Layout: Keras normalizes the last axis by default (channels last, ``(N, H, W, C)``); bnkit, like
torch, normalizes dimension 1, so feed it ``x.movedim(-1, 1)``. Keras itself is not needed: the
weights may come as the list ``layer.get_weights()`` returns or as a dict; a Keras layer object is
read directly when one is given (``pip install bnkit[keras]`` for the tests against real Keras).
"""
from __future__ import annotations

import numpy as np
import torch

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, FrozenBatchNorm
from ..stats.momentum import Decay
from .fold import eval_affine, not_affine_reason

__all__ = ["from_keras", "to_keras"]

KERAS_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")

# Input rank (batch dimension included) -> the bnkit class that accepts it.
_CLASS_FOR_NDIM = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


def _is_keras_layer(obj) -> bool:
    return hasattr(obj, "get_weights") and hasattr(obj, "epsilon") and hasattr(obj, "momentum")


def _layer_settings(layer) -> dict:
    """epsilon, momentum, center, scale and (if the layer is built) the input rank of a Keras layer."""
    name = f"from_keras({type(layer).__name__} {getattr(layer, 'name', '')!r})"
    if getattr(layer, "renorm", False):
        raise ValueError(f"{name}: the layer uses batch renormalization (renorm=True), which from_keras does not "
                         f"convert; only plain BatchNormalization layers are supported")
    if not isinstance(getattr(layer, "axis", -1), int):
        raise ValueError(f"{name}: the layer normalizes over several axes {layer.axis}; bnkit normalizes one "
                         f"channel axis")
    spec = getattr(layer, "input_spec", None)
    return {"epsilon": float(layer.epsilon), "momentum": float(layer.momentum), "center": bool(layer.center),
            "scale": bool(layer.scale), "ndim": getattr(spec, "ndim", None)}


def _named_weights(weights, center, scale) -> tuple[dict, bool, bool]:
    """Map a weights list (``get_weights()`` order) or dict to names; infer center/scale where not given."""
    if isinstance(weights, dict):
        unknown = set(weights) - set(KERAS_WEIGHT_NAMES)
        if unknown:
            raise ValueError(f"from_keras: unknown weight name(s) {sorted(unknown)}; expected {KERAS_WEIGHT_NAMES}")
        scale = "gamma" in weights if scale is None else scale
        center = "beta" in weights if center is None else center
    else:
        weights = list(weights)
        n_affine = len(weights) - 2  # how many of gamma, beta the list holds
        if center is None and scale is None:
            if n_affine == 1:
                raise ValueError("from_keras: got 3 weight arrays, which is either (gamma, moving_mean, "
                                 "moving_variance) or (beta, moving_mean, moving_variance); pass center= or scale=")
            center = scale = n_affine == 2
        elif center is None:
            center = n_affine - int(bool(scale)) == 1
        elif scale is None:
            scale = n_affine - int(bool(center)) == 1
    center, scale = bool(center), bool(scale)
    wanted = [n for n, on in zip(KERAS_WEIGHT_NAMES, (scale, center, True, True)) if on]
    if isinstance(weights, dict):
        named = dict(weights)
    elif len(weights) == len(wanted):
        named = dict(zip(wanted, weights))
    else:
        raise ValueError(f"from_keras: expected {len(wanted)} weight arrays {tuple(wanted)} for center={center}, "
                         f"scale={scale}, got {len(weights)}")
    if sorted(named) != sorted(wanted):
        raise ValueError(f"from_keras: expected weights {tuple(wanted)} for center={center}, scale={scale}, "
                         f"got {tuple(named)}")
    return named, center, scale


def from_keras(weights, ndim: int | None = None, *, epsilon: float | None = None, momentum: float | None = None,
               center: bool | None = None, scale: bool | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> BatchNormBase:
    """A bnkit layer that holds a Keras ``BatchNormalization`` layer's weights and gives Keras's numbers.

    Args:
        weights: a Keras layer (its epsilon, momentum, center, scale and, once built, input rank are
            read), or the list ``layer.get_weights()`` returns (``[gamma], [beta], moving_mean,
            moving_variance``: gamma only with ``scale``, beta only with ``center``), or a dict with
            those names. Arrays may be NumPy arrays, tensors or Keras variables.
        ndim: rank of the input including the batch dimension: 2 or 3 give ``BatchNorm1d``, 4
            ``BatchNorm2d``, 5 ``BatchNorm3d``. Read from a built Keras layer when not given.
        epsilon, momentum: Keras's (defaults 1e-3 and 0.99, or the layer's). ``momentum`` is Keras's
            convention, the weight of the old value; the layer gets
            ``momentum=bnkit.momentum.Decay(momentum)``.
        center, scale: whether beta / gamma exist; inferred from the layer, the dict keys or the list
            length when not given. A missing one is fixed (beta = 0, gamma = 1, not trainable), as in Keras.
        device, dtype: of the new layer's parameters and buffers.

    Returns:
        A :class:`bnkit.BatchNorm1d/2d/3d` with ``eps=epsilon``, ``momentum=bnkit.momentum.Decay(momentum)``
        and ``variance="biased"``, expecting channels in dimension 1 (``x.movedim(-1, 1)`` for Keras's
        channels-last data).

    >>> import numpy as np
    >>> bn = from_keras([np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)], ndim=4)
    >>> type(bn).__name__, bn.eps, bn.momentum, bn.momentum_convention, bn.variance
    ('BatchNorm2d', 0.001, 0.01, 'decay', 'biased')
    """
    settings = _layer_settings(weights) if _is_keras_layer(weights) else {}
    source = f"from_keras({type(weights).__name__} {getattr(weights, 'name', '')!r})" if settings else "from_keras"
    if settings:
        weights = weights.get_weights()
        if not weights:  # the weights are created by build(); an empty list would be read as "4 expected, got 0"
            raise ValueError(f"{source}: the layer has no weights yet (it is not built): call it on an input or "
                             f"layer.build(input_shape) first")
    center = settings.get("center") if center is None else center
    scale = settings.get("scale") if scale is None else scale
    named, center, scale = _named_weights(weights, center, scale)
    ndim = settings.get("ndim") if ndim is None else ndim
    if ndim not in _CLASS_FOR_NDIM:
        raise ValueError(f"from_keras: pass ndim=, the input rank including the batch dimension (2 or 3 for "
                         f"BatchNorm1d, 4 for BatchNorm2d, 5 for BatchNorm3d); got ndim={ndim!r}")
    tensors = {k: torch.as_tensor(np.asarray(v), dtype=dtype, device=device) for k, v in named.items()}
    sizes = {k: tuple(t.shape) for k, t in tensors.items()}
    channels = tensors["moving_mean"].numel()
    if any(len(s) != 1 or s[0] != channels for s in sizes.values()) or channels == 0:
        raise ValueError(f"{source}: every weight must be a 1-D array of the same positive length (the "
                         f"channel count), got shapes {sizes}")
    bad = (~(tensors["moving_variance"] >= 0)).nonzero().flatten().tolist()  # negative or NaN
    if bad:
        raise ValueError(f"{source}: moving_variance must be >= 0, got "
                         f"{tensors['moving_variance'][bad[:5]].tolist()} in channel(s) {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}; eval would divide by the square root of a "
                         f"negative number (NaN)")
    layer = _CLASS_FOR_NDIM[ndim](
        channels, eps=settings.get("epsilon", 1e-3) if epsilon is None else epsilon,
        momentum=Decay(settings.get("momentum", 0.99) if momentum is None else momentum),
        affine=center or scale, variance="biased", device=device, dtype=dtype)
    with torch.no_grad():
        layer.running_mean.copy_(tensors["moving_mean"])
        layer.running_var.copy_(tensors["moving_variance"])
        if layer.affine:
            for param, key, fill, present in ((layer.weight, "gamma", 1.0, scale), (layer.bias, "beta", 0.0, center)):
                if present:
                    param.copy_(tensors[key])
                else:
                    param.fill_(fill)
                param.requires_grad_(present)
    return layer


def _fixed_at(param, value: float) -> bool:
    """Whether an affine parameter is absent, or a non-trainable Parameter holding only ``value``: how
    :func:`from_keras` builds a Keras layer's missing gamma (1) or beta (0), so ``center``/``scale`` come back."""
    if param is None:
        return True
    return isinstance(param, torch.nn.Parameter) and not param.requires_grad and bool((param == value).all())


def _keras_activation(layer) -> str:
    """The Keras layer that applies ``layer``'s fused activation, as code."""
    if layer.activation == "leaky_relu":
        return f"keras.layers.LeakyReLU(negative_slope={layer.negative_slope!r})"
    return f"keras.layers.Activation({layer.activation!r})"


def to_keras(layer: BatchNormBase | FrozenBatchNorm | torch.nn.modules.batchnorm._BatchNorm, *,
             split_activation: bool = False) -> tuple[list, dict]:
    """``(weights, config)`` for ``keras.layers.BatchNormalization(**config).set_weights(weights)``.

    ``weights`` is the float32 NumPy list in ``get_weights()`` order (gamma only with ``scale``, beta
    only with ``center``); ``config`` holds ``epsilon``, ``momentum`` (Keras's convention, ``1 - torch
    momentum``), ``center`` (the layer has a bias) and ``scale`` (it has a weight); a bias Parameter
    fixed at 0 / a weight fixed at 1 (``requires_grad=False``, as :func:`from_keras` builds Keras's
    ``center=False`` / ``scale=False``) counts as absent, so a Keras layer's config survives the round
    trip. The channel axis is left to the caller (Keras's default -1 is channels last). The running
    variance is copied as it is:
    torch's unbiased estimate and Keras's biased one estimate the same population variance. A momentum
    schedule is not carried over (its base momentum is). A ``FrozenBatchNorm*d`` gives
    ``trainable=False`` (Keras then always uses the moving statistics) and Keras's default momentum.

    Refused, with the reason: no running statistics, ``momentum=None``, or an eval that is not the
    plain per-channel map Keras computes (``example_weight``; see :meth:`bnkit.BatchNormBase.eval_affine`).
    A bnkit ``activation=`` (relu, leaky_relu, silu) has no place in Keras's layer: it is refused
    unless ``split_activation=True``, which returns the batch norm alone; then add the Keras layer
    the error message names (e.g. ``keras.layers.Activation("relu")``) after it.

    >>> weights, config = to_keras(torch.nn.BatchNorm2d(2))
    >>> [w.tolist() for w in weights], config
    ([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], {'epsilon': 1e-05, 'momentum': 0.9, 'center': True, 'scale': True})
    """
    name = f"to_keras({type(layer).__name__}({layer.num_features}))"
    if eval_affine(layer) is None:
        raise ValueError(f"{name}: {not_affine_reason(layer)}; a Keras BatchNormalization layer always "
                         f"normalizes with its moving statistics in inference")
    frozen = isinstance(layer, FrozenBatchNorm)
    if not frozen and layer.momentum is None:
        raise ValueError(f"{name}: momentum=None (cumulative average) has no Keras equivalent; set "
                         f"layer.momentum (torch convention) before converting")
    activation = getattr(layer, "activation", "identity")
    if activation != "identity" and not split_activation:
        raise ValueError(f"{name}: activation={activation!r} is applied after the batch norm, and Keras's "
                         f"BatchNormalization has none; pass split_activation=True and put "
                         f"{_keras_activation(layer)} after the Keras layer")
    scale, center = not _fixed_at(layer.weight, 1.0), not _fixed_at(layer.bias, 0.0)
    tensors = [t for t, on in ((layer.weight, scale), (layer.bias, center)) if on]
    weights = [t.detach().cpu().float().numpy() for t in tensors + [layer.running_mean, layer.running_var]]
    config = {"epsilon": float(layer.eps), "momentum": 0.99 if frozen else round(1.0 - layer.momentum, 15),
              "center": center, "scale": scale}
    if frozen:
        config["trainable"] = False
    return weights, config
