"""``BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm*d``.

The classes derive from ``torch.nn.modules.batchnorm._BatchNorm`` on purpose: tools that look
for batch-norm layers with ``isinstance(m, _BatchNorm)`` (``torch.optim.swa_utils.update_bn``,
fvcore's PreciseBN, DDP helpers, timm) find bnkit layers too, and state_dict loading (including
checkpoints older than ``num_batches_tracked``) is torch's own. The forward is bnkit's.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..functional import batch_statistics_update, check_nonfinite_policy
from ..ops import check_activation, normalize
from ..stats import accumulation_dtype, batch_moments, ghost_statistics
from ..stats import momentum as momentum_lib
from ..validation import check_batch_size, check_input

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "STATS_FROZEN_MODES"]

_UNSET = object()

#: ``stats_frozen`` values: ``None`` (normal), ``"batch"`` (normalize with batch statistics, no
#: running update), ``"running"`` (normalize with the running statistics even in training).
STATS_FROZEN_MODES = (None, "batch", "running")


class BatchNormBase(_TorchBatchNorm):
    r"""Batch normalization over dimension 1 of an ``(N, C, *)`` input; the shared base.

    .. math:: y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta\Big)

    In training, mean and (biased) variance are the batch's, per channel, over N and the spatial
    dimensions; the running statistics are updated with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch``. In eval, the running statistics are
    used (batch statistics when ``track_running_stats=False``). All of this equals ``torch.nn``.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability. Default 1e-5 (Keras uses 1e-3).
        momentum: PyTorch's convention, the weight of the *new* batch (default 0.1), or ``None`` for
            the cumulative average. Values >= 0.5 warn: they look like a Keras decay.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
        device, dtype: of the parameters and buffers.
        decay: Keras/TF/Flax convention instead of ``momentum``: the weight of the *old* value (0.99).
        half_life: instead of ``momentum``: update steps after which a batch's weight has halved.
        momentum_schedule: a callable ``step -> momentum`` (step counts from 1), or ``"constant"``,
            ``"linear"`` or ``"cosine"`` (ramp from the EMA toward the cumulative average over
            ``total_steps``; see :class:`bnkit.stats.momentum.Schedule`).
        total_steps: length of a named ramp schedule, in update steps.
        activation: ``None``/``"identity"``, ``"relu"``, ``"leaky_relu"`` or ``"silu"``, applied after the affine.
        negative_slope: of ``leaky_relu``.
        nonfinite: a batch whose statistics are NaN/Inf: ``"skip"`` its running update (default, warns),
            ``"raise"``, or ``"propagate"`` (torch's behaviour).
        virtual_batch_size: ghost batch norm (Hoffer et al., 2017). In training, the batch is split
            along N into consecutive chunks of this many samples (the last chunk is smaller when
            the size does not divide N), and each chunk is normalized with its own statistics,
            exactly as plain batch norm on that chunk. The running statistics are updated *once*
            per step (tf-keras' rule) with the chunk-size-weighted mean of the chunk means and the
            pooled within-chunk unbiased variance ``sum_g m2_g / (n - G)`` (= the mean of the
            chunks' unbiased variances when chunks are equal); ``num_batches_tracked`` += 1.
            A chunk of one value per channel raises. Eval ignores it. Default ``None`` (off).

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory format.
    """

    _expected_dims: tuple[int, ...] = ()
    _dims_doc = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=_UNSET, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, decay: float | None = None,
                 half_life: float | None = None, momentum_schedule=None, total_steps: int | None = None,
                 activation: str | None = None, negative_slope: float = 0.01, nonfinite: str = "skip",
                 virtual_batch_size: int | None = None):
        name = f"{type(self).__name__}({num_features})"
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if not eps >= 0:
            raise ValueError(f"{name}: eps must be >= 0, got {eps}")
        given = momentum is not _UNSET
        resolved, convention = momentum_lib.resolve(name, momentum if given else 0.1, decay, half_life,
                                                    momentum_given=given)
        super().__init__(num_features, eps, resolved, affine, track_running_stats, device, dtype)
        self.momentum_convention = convention
        self.momentum_schedule = momentum_lib.make_schedule(name, momentum_schedule, resolved, total_steps)
        self.activation = check_activation(name, activation)
        self.negative_slope = negative_slope
        self.nonfinite = check_nonfinite_policy(name, nonfinite)
        self.stats_frozen = None
        if virtual_batch_size is not None and (isinstance(virtual_batch_size, bool)
                                               or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
            raise ValueError(f"{name}: virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self._expected_dims and input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{self.layer_name}: expected {want} input {self._dims_doc}, got {input.dim()}-D "
                             f"input of shape {tuple(input.shape)}")

    def _check(self, input: torch.Tensor) -> None:
        if isinstance(input, torch.Tensor):
            self._check_input_dim(input)
        check_input(self.layer_name, input, self.num_features,
                    {"weight": self.weight, "bias": self.bias,
                     "running_mean": self.running_mean, "running_var": self.running_var})
        if self.stats_frozen not in STATS_FROZEN_MODES:
            raise ValueError(f"{self.layer_name}: stats_frozen must be one of {STATS_FROZEN_MODES}, "
                             f"got {self.stats_frozen!r}")

    def _has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    def _uses_batch_stats(self) -> bool:
        if not self._has_running_stats():
            return True
        return self.training and self.stats_frozen != "running"

    def _updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats and self.stats_frozen is None \
            and self._has_running_stats()

    def _update_momentum(self):
        """The torch-convention momentum for this update (None: cumulative average)."""
        if self.momentum_schedule is None:
            return self.momentum
        step = 1 + (int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0)
        return float(self.momentum_schedule(step))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check(input)
        if not self._uses_batch_stats():
            acc = accumulation_dtype(input.dtype)
            return normalize(input, self.running_mean.to(acc), self.running_var.to(acc), self.weight, self.bias,
                             self.eps, self.activation, self.negative_slope)
        mean, var = self._batch_statistics(input)
        return normalize(input, mean, var, self.weight, self.bias, self.eps, self.activation, self.negative_slope)

    def _batch_statistics(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(mean, var)`` that normalize this batch, shape ``(C,)`` or per sample ``(N, C)``.

        Also folds the batch into the running statistics when the layer updates them. This is the
        one step that ghost, synchronized and renormalized batch norm change.
        """
        if self.virtual_batch_size is not None:
            mean, var, pooled = ghost_statistics(self.layer_name, input, self.virtual_batch_size)
            self._update_running(*pooled, None)
            return mean, var
        n = check_batch_size(self.layer_name, input)
        mean, var = batch_moments(input)
        self._update_running(mean, var, n)
        return mean, var

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int | None) -> None:
        """Fold ``(mean, biased var over n values)`` (``n=None``: ``var`` is unbiased) into the running stats."""
        if self._updates_running_stats():
            batch_statistics_update(self.layer_name, mean, var, n, self.running_mean, self.running_var,
                                    self._update_momentum(), self.num_batches_tracked, self.nonfinite)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.momentum_convention == "decay":
            s += f", decay={momentum_lib.convert(self.momentum, 'momentum', 'decay')}"
        elif self.momentum_convention == "half_life":
            s += f", half_life={momentum_lib.convert(self.momentum, 'momentum', 'half_life'):.6g}"
        if self.momentum_schedule is not None:
            s += f", momentum_schedule={self.momentum_schedule!r}"
        if self.activation != "identity":
            s += f", activation={self.activation!r}"
        if self.nonfinite != "skip":
            s += f", nonfinite={self.nonfinite!r}"
        if self.stats_frozen is not None:
            s += f", stats_frozen={self.stats_frozen!r}"
        if self.virtual_batch_size is not None:
            s += f", virtual_batch_size={self.virtual_batch_size}"
        return s


class BatchNorm1d(BatchNormBase):
    """Batch norm over a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input. See :class:`BatchNormBase`.

    >>> bn = BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """

    _expected_dims = (2, 3)
    _dims_doc = "(N, C) or (N, C, L)"


class BatchNorm2d(BatchNormBase):
    """Batch norm over a 4-D ``(N, C, H, W)`` input. See :class:`BatchNormBase`.

    >>> bn = BatchNorm2d(1)
    >>> y = bn(torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]]))
    >>> [round(v, 4) for v in y.flatten().tolist()]
    [0.5773, 0.5773, -1.732, 0.5773]
    """

    _expected_dims = (4,)
    _dims_doc = "(N, C, H, W)"


class BatchNorm3d(BatchNormBase):
    """Batch norm over a 5-D ``(N, C, D, H, W)`` input. See :class:`BatchNormBase`."""

    _expected_dims = (5,)
    _dims_doc = "(N, C, D, H, W)"
