"""The Triton path as ``torch.library`` custom ops with fake (meta) implementations, wrapped in
``torch.autograd.Function`` s:

* ``bnkit::train_forward``  (x, weight, bias, running buffers...) -> (y, mean, var, invstd)
* ``bnkit::eval_forward``   (x, mean, var, weight, bias, ...) -> y
* ``bnkit::backward``       (dy, saved, mean, stat, weight, bias, ...) -> (dx, dgamma, dbeta)

Under ``torch.compile`` the Functions call the ops, so the graph holds three opaque, shape-known ops
(the first mutates the running buffers and is functionalized). In eager mode they call the launchers
directly: the custom-op dispatcher costs tens of microseconds per call, which is the whole budget of a
small batch norm on a GPU. :func:`train_forward` and :func:`eval_forward` below are what the layers call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...functional import batch_statistics_update
from . import launch

__all__ = ["train_forward", "eval_forward"]


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=torch.float32)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _call(op, launcher, *args):
    return op(*args) if torch.compiler.is_compiling() else launcher(*args)


@torch.library.custom_op("bnkit::train_forward", mutates_args=("running_mean", "running_var"))
def _train_forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: float,
                      cumulative: bool, unbias: float, eps: float, activation: str,
                      negative_slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch.train_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                cumulative, unbias, eps, activation, negative_slope)


@_train_forward_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, cumulative, unbias, eps,
      activation, negative_slope):
    return torch.empty_like(launch.as_ncl(x)), _stat_like(x), _stat_like(x), _stat_like(x)


@torch.library.custom_op("bnkit::eval_forward", mutates_args=())
def _eval_forward_op(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, activation: str, negative_slope: float) -> Tensor:
    return launch.eval_forward(x, mean, var, weight, bias, eps, activation, negative_slope)


@_eval_forward_op.register_fake
def _(x, mean, var, weight, bias, eps, activation, negative_slope):
    return torch.empty_like(launch.as_ncl(x))


@torch.library.custom_op("bnkit::backward", mutates_args=())
def _backward_op(dy: Tensor, saved: Tensor, mean: Tensor, stat: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, training: bool, stat_is_var: bool, activation: str,
                 negative_slope: float, from_output: bool) -> tuple[Tensor, Tensor, Tensor]:
    return launch.backward(dy, saved, mean, stat, weight, bias, eps, training, stat_is_var, activation,
                           negative_slope, from_output)


@_backward_op.register_fake
def _(dy, saved, mean, stat, weight, bias, eps, training, stat_is_var, activation, negative_slope, from_output):
    return torch.empty_like(launch.as_ncl(saved)), _stat_like(saved), _stat_like(saved)


def _backward(dy, saved, mean, stat, weight, bias, *config):
    dx, dgamma, dbeta = _call(_backward_op, launch.backward, dy, saved, mean, stat, weight, bias, *config)
    return dx, _as_param_grad(dgamma, weight), _as_param_grad(dbeta, bias)


def _as_param_grad(grad: Tensor, param: Tensor | None) -> Tensor | None:
    return None if param is None else grad.to(param.dtype)


class _TrainForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                unbias, eps, activation, negative_slope, save_output):
        y, mean, var, invstd = _call(_train_forward_op, launch.train_forward, x, weight, bias, running_mean,
                                     running_var, num_batches_tracked, momentum, cumulative, unbias, eps,
                                     activation, negative_slope)
        ctx.mark_non_differentiable(mean, var, invstd)
        # In-Place ABN: with an invertible activation the output is enough to rebuild xhat, so the
        # input need not stay alive for backward.
        ctx.save_for_backward(y if save_output else x, mean, invstd, weight, bias)
        ctx.config = (eps, True, False, activation, negative_slope, save_output)
        return y, mean, var, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinvstd):
        return _backward(dy, *ctx.saved_tensors, *ctx.config) + (None,) * 10


def _train_forward_no_grad(*args):
    return _call(_train_forward_op, launch.train_forward, *args[:-1])  # the last one is save_output


class _EvalForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, activation, negative_slope):
        y = _call(_eval_forward_op, launch.eval_forward, x, mean, var, weight, bias, eps, activation, negative_slope)
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.config = (eps, False, True, activation, negative_slope, False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight, bias = ctx.saved_tensors
        dx, dgamma, dbeta = _backward(dy, x, mean, var, weight, bias, *ctx.config)
        return dx, None, None, dgamma, dbeta, None, None, None


# ---- what the layers call --------------------------------------------------------------------------
def train_forward(name: str, x: Tensor, n: int, weight, bias, running_mean, running_var, num_batches_tracked,
                  momentum, update: bool, nonfinite: str, eps: float, activation: str, negative_slope: float,
                  save_output: bool = False) -> Tensor:
    """Training forward with batch statistics over ``n`` values per channel (already checked).

    With ``update`` the running statistics follow bnkit's semantics exactly: under
    ``nonfinite="propagate"`` (no host sync) the update runs inside the finalize kernel, with
    ``num_batches_tracked`` incremented first and the cumulative factor read on the device; under
    ``"skip"``/``"raise"`` the batch statistics go through the foundation's
    :func:`bnkit.functional.batch_statistics_update` (which needs the finiteness of every channel
    before any buffer changes, hence one host sync in eager mode, as on the torch path).
    """
    in_kernel = update and nonfinite == "propagate" and (momentum is not None or num_batches_tracked is not None)
    if in_kernel and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    forward = _TrainForward.apply if _needs_grad(x, weight, bias) else _train_forward_no_grad
    y, mean, var, _ = forward(
        x, weight, bias, running_mean if in_kernel else None, running_var if in_kernel else None,
        num_batches_tracked if in_kernel and momentum is None else None, 0.0 if momentum is None else float(momentum),
        in_kernel and momentum is None, n / (n - 1), eps, activation, negative_slope, save_output)
    if update and not in_kernel:
        batch_statistics_update(name, mean, var, n, running_mean, running_var, momentum, num_batches_tracked,
                                nonfinite)
    return y


def eval_forward(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float, activation: str,
                 negative_slope: float) -> Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with the given (running) statistics."""
    if not _needs_grad(x, weight, bias):  # inference: no autograd bookkeeping
        return _call(_eval_forward_op, launch.eval_forward, x, mean, var, weight, bias, eps, activation,
                     negative_slope)
    return _EvalForward.apply(x, mean, var, weight, bias, eps, activation, negative_slope)

