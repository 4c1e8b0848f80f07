"""The Triton path behind a small interface: tensors in, tensors out. No layer names, no NaN policy,
no running buffers: the layer updates its running statistics from the returned batch statistics.

* :func:`train_forward` ``(x, weight, bias, eps, activation, negative_slope, save_output) -> (y, mean, var)``
* :func:`eval_forward` ``(x, mean, var, weight, bias, eps, activation, negative_slope) -> y``

Each is a ``torch.library`` custom op (``bnkit::train_forward``, ``bnkit::eval_forward``, and
``bnkit::backward`` for both) with a fake implementation, wrapped in a ``torch.autograd.Function``.
Under ``torch.compile`` the Functions call the ops, so the graph holds opaque, shape-known ops; in
eager mode they call the launchers directly: the custom-op dispatcher costs tens of microseconds per
call, which is the whole budget of a small batch norm on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import check_memory_efficient
from . import launch

__all__ = ["train_forward", "eval_forward"]


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=torch.float32)


@torch.library.custom_op("bnkit::train_forward", mutates_args=())
def _train_forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, activation: str,
                      negative_slope: float) -> tuple[Tensor, Tensor, Tensor]:
    return launch.train_forward(x, weight, bias, eps, activation, negative_slope)


@_train_forward_op.register_fake
def _(x, weight, bias, eps, activation, negative_slope):
    return torch.empty_like(launch.as_ncl(x)), _stat_like(x), _stat_like(x)


@torch.library.custom_op("bnkit::eval_forward", mutates_args=())
def _eval_forward_op(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, activation: str, negative_slope: float) -> Tensor:
    return launch.eval_forward(x, mean, var, weight, bias, eps, activation, negative_slope)


@_eval_forward_op.register_fake
def _(x, mean, var, weight, bias, eps, activation, negative_slope):
    return torch.empty_like(launch.as_ncl(x))


@torch.library.custom_op("bnkit::backward", mutates_args=())
def _backward_op(dy: Tensor, saved: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, training: bool, activation: str, negative_slope: float,
                 from_output: bool) -> tuple[Tensor, Tensor, Tensor]:
    return launch.backward(dy, saved, mean, var, weight, bias, eps, training, activation, negative_slope, from_output)


@_backward_op.register_fake
def _(dy, saved, mean, var, weight, bias, eps, training, activation, negative_slope, from_output):
    return torch.empty_like(launch.as_ncl(saved)), _stat_like(saved), _stat_like(saved)


def _backward(dy, saved, mean, var, weight, bias, *config):
    run = _backward_op if torch.compiler.is_compiling() else launch.backward
    dx, dgamma, dbeta = run(dy, saved, mean, var, weight, bias, *config)
    grads = dx, _as_param_grad(dgamma, weight), _as_param_grad(dbeta, bias)
    # create_graph=True: the kernels' gradients are constants to autograd, so a loss on them (a gradient
    # penalty) would silently lose its share of the second derivative: make differentiating them fail
    inputs = [t for t in (dy, saved, weight, bias) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and inputs:
        grads = tuple(None if g is None else _NoSecondDerivative.apply(g, *inputs) for g in grads)
    return grads


class _NoSecondDerivative(torch.autograd.Function):
    """``grad`` itself, attached to the tensors it was computed from; differentiating it is an error."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()  # not a view: autograd forbids in-place changes to a Function's views of its inputs

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("bnkit's Triton batch-norm kernels cannot differentiate twice (a loss on gradients "
                           "taken with create_graph=True); run this model with bnkit.set_backend('torch')")


def _as_param_grad(grad: Tensor, param: Tensor | None) -> Tensor | None:
    return None if param is None else grad.to(param.dtype)


class _TrainForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation, negative_slope, save_output):
        run = _train_forward_op if torch.compiler.is_compiling() else launch.train_forward
        y, mean, var = run(x, weight, bias, eps, activation, negative_slope)
        ctx.mark_non_differentiable(mean, var)
        # In-Place ABN: with an invertible activation the output is enough to rebuild xhat, so the
        # input need not stay alive for backward.
        ctx.save_for_backward(y if save_output else x, mean, var, weight, bias)
        ctx.config = (eps, True, activation, negative_slope, save_output)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _backward(dy, *ctx.saved_tensors, *ctx.config) + (None,) * 4


class _EvalForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, activation, negative_slope):
        run = _eval_forward_op if torch.compiler.is_compiling() else launch.eval_forward
        y = run(x, mean, var, weight, bias, eps, activation, negative_slope)
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.config = (eps, False, activation, negative_slope, False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight, bias = ctx.saved_tensors
        dx, dgamma, dbeta = _backward(dy, x, mean, var, weight, bias, *ctx.config)
        return dx, None, None, dgamma, dbeta, None, None, None


def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, activation: str,
                  negative_slope: float, save_output: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: ``(y, mean, var)`` with the batch's per-channel mean and biased variance.

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)`` has the input's dtype and layout and is
    differentiable with respect to ``x``, ``weight`` and ``bias`` (the batch statistics' gradient
    included). ``mean``/``var`` are fp32 ``(C,)`` and not differentiable. ``save_output`` keeps ``y``
    instead of ``x`` for backward (invertible activation, no zero weight). Running statistics are
    the caller's: nothing else is read or written, and nothing is read back to the host.
    """
    if _needs_grad(x, weight, bias):
        if save_output:  # checked here too: a layer's activation attributes can change after memory_efficient
            check_memory_efficient("bnkit Triton train_forward(save_output=True)", True, activation, negative_slope)
        return _TrainForward.apply(x, weight, bias, eps, activation, negative_slope, save_output)
    run = _train_forward_op if torch.compiler.is_compiling() else launch.train_forward
    return run(x, weight, bias, eps, activation, negative_slope)


def eval_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                 activation: str, negative_slope: float) -> Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with given (running) statistics, which are
    constants for autograd; differentiable with respect to ``x``, ``weight`` and ``bias``."""
    if _needs_grad(x, weight, bias):
        return _EvalForward.apply(x, mean, var, weight, bias, eps, activation, negative_slope)
    run = _eval_forward_op if torch.compiler.is_compiling() else launch.eval_forward
    return run(x, mean, var, weight, bias, eps, activation, negative_slope)
