"""NumPy executable specification of batch normalization.

Everything in bnkit is tested against these few functions (and against ``torch.nn``).
They are written for clarity, in float64, with the channel axis at position 1:
an input of shape ``(N, C, *spatial)`` has ``n = N * prod(spatial)`` values per channel.

Training forward, per channel c::

    mean_c = sum(x) / n
    var_c  = sum((x - mean_c)**2) / n                 # biased: used to normalize
    y      = (x - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c

Running statistics (PyTorch convention, ``momentum`` = weight of the new batch)::

    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * n / (n - 1)   # unbiased

Eval forward uses ``running_mean`` / ``running_var`` in place of the batch statistics.

The worked example (one channel, four values):

>>> import numpy as np
>>> x = np.array([[[[1.0, 1.0], [-1.0, 1.0]]]])
>>> y, mean, var = forward_train(x)          # eps = 1e-5
>>> np.trunc(y * 1e4) / 1e4                   # 0.5 / sqrt(0.75 + 1e-5) = 0.57734...
array([[[[ 0.5773,  0.5773],
         [-1.732 ,  0.5773]]]])
>>> float(mean[0]), float(var[0])
(0.5, 0.75)
"""
from __future__ import annotations

import numpy as np

__all__ = ["forward_train", "forward_eval", "backward_train", "backward_eval", "update_running"]


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got shape {x.shape}")
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray | None, x: np.ndarray, default: float) -> np.ndarray:
    c = x.shape[1]
    v = np.full(c, default, dtype=np.float64) if v is None else np.asarray(v, dtype=np.float64)
    return v.reshape((1, c) + (1,) * (x.ndim - 2))


def forward_train(x, gamma=None, beta=None, eps=1e-5):
    """Normalize with the batch statistics. Returns ``(y, mean, biased_var)``."""
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x)
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x, 0.0)) ** 2).mean(axis=axes)
    y = forward_eval(x, mean, var, gamma, beta, eps)
    return y, mean, var


def forward_eval(x, mean, var, gamma=None, beta=None, eps=1e-5):
    """Normalize with given statistics (eval mode uses the running statistics)."""
    x = np.asarray(x, dtype=np.float64)
    xhat = (x - _per_channel(mean, x, 0.0)) / np.sqrt(_per_channel(var, x, 1.0) + eps)
    return xhat * _per_channel(gamma, x, 1.0) + _per_channel(beta, x, 0.0)


def backward_train(dy, x, gamma=None, eps=1e-5):
    """Gradients of the training forward: ``(dx, dgamma, dbeta)``.

    With ``xhat = (x - mean) * invstd`` and n values per channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n)
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x, 0.0)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _per_channel(mean, x, 0.0)) * _per_channel(invstd, x, 1.0)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dx = (_per_channel(gamma, x, 1.0) * _per_channel(invstd, x, 1.0)
          * (dy - _per_channel(dbeta, x, 0.0) / n - xhat * _per_channel(dgamma, x, 0.0) / n))
    return dx, dgamma, dbeta


def backward_eval(dy, x, mean, var, gamma=None, eps=1e-5):
    """Gradients of the eval forward (statistics are constants): ``(dx, dgamma, dbeta)``."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x)
    invstd = 1.0 / np.sqrt(_per_channel(var, x, 1.0) + eps)
    xhat = (x - _per_channel(mean, x, 0.0)) * invstd
    return dy * _per_channel(gamma, x, 1.0) * invstd, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def update_running(running_mean, running_var, mean, biased_var, n, momentum):
    """One running-statistic update; ``momentum`` is PyTorch's (weight of the new batch).

    Returns the new ``(running_mean, running_var)``; the variance stored is unbiased.
    """
    if n < 2:
        raise ValueError("the unbiased variance needs at least 2 values per channel")
    unbiased = np.asarray(biased_var, dtype=np.float64) * n / (n - 1)
    new_mean = (1 - momentum) * np.asarray(running_mean, dtype=np.float64) + momentum * np.asarray(mean)
    new_var = (1 - momentum) * np.asarray(running_var, dtype=np.float64) + momentum * unbiased
    return new_mean, new_var
