"""``BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm*d``.

The classes derive from ``torch.nn.modules.batchnorm._BatchNorm`` on purpose: tools that look
for batch-norm layers with ``isinstance(m, _BatchNorm)`` (``torch.optim.swa_utils.update_bn``,
fvcore's PreciseBN, DDP helpers, timm) find bnkit layers too, and state_dict loading (including
checkpoints older than ``num_batches_tracked``) is torch's own. The forward is bnkit's.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..functional import (SINGLE_SAMPLE_POLICIES, VARIANCE_KINDS, _channel_back, _channel_first, _check_choice,
                          _check_mask, _write_back, batch_statistics_update, check_nonfinite_policy, forward_core,
                          mask_from_lengths, native_train_forward)
from ..ops import check_activation, check_memory_efficient, is_exporting, normalize
from ..ops.backend import kernels_for
from ..stats import accumulation_dtype, batch_moments, ghost_statistics
from ..validation import check_batch_size
from ..stats import momentum as momentum_lib
from ..validation import check_input

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
            the cumulative average. Values >= 0.75 warn: they look like a Keras decay.
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
        bias: with ``affine=True``, whether beta is learned (torch's ``bias=`` keyword).
        nonfinite: a batch whose statistics are NaN/Inf: ``"skip"`` its running update (default, warns),
            ``"raise"``, or ``"propagate"`` (torch's behaviour).
        axis: the channel dimension (default 1; ``-1`` takes ``(N, L, C)`` input without transposes).
        single_sample: one value per channel in training: ``"raise"`` (default, the message names the
            fixes), ``"use_running"`` (normalize with the running statistics, no update) or
            ``"skip_update"`` (normalize with its own statistics, i.e. output ``bias``, no update).
        example_weight: inference example weighing (Summers & Dinneen 2020), eval only: ``None`` (off),
            a weight alpha in [0, 1], or ``"auto"`` for ``1 / B`` with B the last training batch size.
        variance: which variance the running update stores, ``"unbiased"`` (torch) or ``"biased"``
            (Keras, Flax).
        memory_efficient: Triton path, training: keep only the output for backward (In-Place ABN), so
            the input can be freed; needs an invertible activation (identity, leaky_relu with a positive
            slope) and no weight entry equal to 0. Ignored on the torch path.
        virtual_batch_size: ghost batch norm (Hoffer et al., 2017). In training, the batch is split
            along N into consecutive chunks of this many samples (the last chunk is smaller when
            the size does not divide N), and each chunk is normalized with its own statistics,
            exactly as plain batch norm on that chunk. The running statistics are updated *once*
            per step (tf-keras' rule) with the chunk-size-weighted mean of the chunk means and the
            pooled within-chunk unbiased variance ``sum_g m2_g / (n - G)`` (= the mean of the
            chunks' unbiased variances when chunks are equal); ``num_batches_tracked`` += 1.
            A chunk of one value per channel raises. Eval ignores it. Default ``None`` (off).

    ``forward(input, mask=None, lengths=None)``: ``mask`` (bool, the input's shape without the
    channel dimension; False marks padding) or ``lengths`` (``(N,)`` valid lengths of a 3-D input)
    keep padded elements out of the batch and running statistics; they pass through unchanged.

    The state_dict records the layer's conventions (eps, momentum, its convention, variance kind) in
    its metadata; loading a bnkit checkpoint whose conventions differ warns. Plain torch checkpoints
    load silently, and torch.nn loads bnkit checkpoints.

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory format.
    """

    _expected_dims: tuple[int, ...] = ()
    _dims_doc = "(N, C, *)"
    _min_features = 1  # lazy layers start with 0 channels, as torch's do

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=_UNSET, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, decay: float | None = None,
                 half_life: float | None = None, momentum_schedule=None, total_steps: int | None = None,
                 activation: str | None = None, negative_slope: float = 0.01, nonfinite: str = "skip",
                 bias: bool = True, axis: int = 1, single_sample: str = "raise", example_weight=None,
                 variance: str = "unbiased", memory_efficient: bool = False, virtual_batch_size: int | None = None):
        name = f"{type(self).__name__}({num_features})"
        if not isinstance(num_features, int) or num_features < self._min_features:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if not eps >= 0:
            raise ValueError(f"{name}: eps must be >= 0, got {eps}")
        given = momentum is not _UNSET
        resolved, convention = momentum_lib.resolve(name, momentum if given else 0.1, decay, half_life,
                                                    momentum_given=given)
        # torch >= 2.6 has bias=; pass it only when asked for so older torch keeps working
        super().__init__(num_features, eps, resolved, affine, track_running_stats, device, dtype,
                         **({} if bias else {"bias": False}))
        self.momentum_convention = convention
        self.momentum_schedule = momentum_lib.make_schedule(name, momentum_schedule, resolved, total_steps)
        self.activation = check_activation(name, activation)
        self.negative_slope = negative_slope
        self.nonfinite = check_nonfinite_policy(name, nonfinite)
        self.memory_efficient = check_memory_efficient(name, memory_efficient, self.activation, negative_slope)
        self.stats_frozen = None
        self.axis = axis
        self.single_sample = _check_choice(name, "single_sample", single_sample, SINGLE_SAMPLE_POLICIES)
        self.variance = _check_choice(name, "variance", variance, VARIANCE_KINDS)
        if not (example_weight is None or example_weight == "auto" or 0.0 <= example_weight <= 1.0):
            raise ValueError(f"{name}: example_weight must be None, 'auto' or in [0, 1], got {example_weight!r}")
        self.example_weight = example_weight
        self.last_train_batch_size = None  # for example_weight="auto"
        self.stats_sink = None  # set by bnkit.accumulate: receives batch statistics instead of the running update
        _register_state_dict_post_hook(self, _record_conventions)
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
        if isinstance(self.momentum_schedule, momentum_lib.Schedule) and self.num_batches_tracked is not None:
            # Evaluated on the device (no host sync), in the statistics' precision.
            step = self.num_batches_tracked.to(accumulation_dtype(self.running_mean.dtype)) + 1
            return self.momentum_schedule(step)
        step = 1 + (int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0)
        return float(self.momentum_schedule(step))

    def _example_weight(self):
        if self.training or self.example_weight is None:
            return None
        if self.example_weight != "auto":
            return float(self.example_weight)
        if not self.last_train_batch_size:
            raise RuntimeError(f"{self.layer_name}: example_weight='auto' is 1 / training batch size, but this layer "
                               f"has not seen a training batch; pass example_weight=<alpha> instead")
        return 1.0 / self.last_train_batch_size

    def _kernel_forward(self, x: torch.Tensor, mask):
        """The plain case through a fused kernel, else None (the shared torch-op core runs).

        Plain: no mask, no accumulation, no example weighing, unbiased running variance, at least two
        values per channel, no custom batch statistics (ghost, renorm, sync), not exporting. Then CUDA
        tensors take the Triton kernels (see ``bnkit.set_backend``) and, in eager mode, everything else
        takes torch's own ATen kernel in training. Semantics (checks, non-finite policy, momentum,
        counts) are the same on every path; eval always uses torch's ``batch_norm(training=False)``.
        """
        if mask is not None or self.stats_sink is not None or self.variance != "unbiased" or is_exporting() \
                or self._custom_batch_statistics():
            return None
        use_batch = self._uses_batch_stats()
        if not use_batch and self._example_weight() is not None:
            return None
        if use_batch and x.numel() // max(x.shape[1], 1) < 2:
            return None
        update = use_batch and self._updates_running_stats()
        fused = kernels_for(x, use_batch, self.memory_efficient)
        if fused is not None:
            if not use_batch:
                return fused.eval_forward(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                          self.activation, self.negative_slope)
            y, mean, var = fused.train_forward(x, self.weight, self.bias, self.eps, self.activation,
                                               self.negative_slope, self.memory_efficient)
            if update:
                batch_statistics_update(self.layer_name, mean, var, x.numel() // x.shape[1], self.running_mean,
                                        self.running_var, self._update_momentum(), self.num_batches_tracked,
                                        self.nonfinite)
            return y
        if not use_batch or torch.compiler.is_compiling() or self.eps <= 0:  # ATen refuses eps=0 in training
            return None
        return native_train_forward(self.layer_name, x, self.weight, self.bias,
                                    self.running_mean if update else None, self.running_var if update else None,
                                    self.num_batches_tracked if update else None,
                                    self._update_momentum() if update else None, self.eps, self.nonfinite,
                                    self.activation, self.negative_slope)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, torch.Tensor):
            self._check_input_dim(input)
        x = _channel_first(input, self.axis)
        self._check(x)
        if lengths is not None:
            if mask is not None:
                raise ValueError(f"{self.layer_name}: pass mask= or lengths=, not both")
            mask = mask_from_lengths(self.layer_name, x, lengths)
        if mask is not None:
            mask = _check_mask(self.layer_name, x, mask)
        if self.training:
            self.last_train_batch_size = x.shape[0]
        y = self._kernel_forward(x, mask)
        if y is not None:
            return _channel_back(y, self.axis)
        if self._custom_batch_statistics() and self._uses_batch_stats():
            if mask is not None:
                raise ValueError(f"{self.layer_name}: mask=/lengths= are not supported together with "
                                 f"{'virtual_batch_size' if self.virtual_batch_size else type(self).__name__}")
            mean, var = self._batch_statistics(x)
            y = normalize(x, mean, var, self.weight, self.bias, self.eps, self.activation, self.negative_slope)
            return _channel_back(y, self.axis)
        update = self._updates_running_stats()
        y, new = forward_core(
            self.layer_name, x, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            use_batch_stats=self._uses_batch_stats(), update=update and self.stats_sink is None,
            momentum=self._update_momentum() if update and self.stats_sink is None else None, eps=self.eps,
            activation=self.activation, negative_slope=self.negative_slope, nonfinite=self.nonfinite,
            variance=self.variance, mask=mask, single_sample=self.single_sample,
            example_weight=self._example_weight(), stats_sink=self.stats_sink if update else None)
        if new is not None:
            _write_back(new, self.running_mean, self.running_var, self.num_batches_tracked)
        return _channel_back(y, self.axis)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get(_METADATA_KEY)
        if saved is not None:
            mine = _conventions(self)
            diffs = [f"{k}={saved[k]!r} (this layer: {mine[k]!r})" for k in mine
                     if k in saved and not _same(saved[k], mine[k])]
            if diffs:
                warnings.warn(f"{self.layer_name} ({prefix or 'top level'}): the checkpoint was saved with other batch-norm "
                              f"conventions: {', '.join(diffs)}. The numbers will differ from the saved model's; "
                              f"construct the layer with the saved values to reproduce it.", UserWarning, stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _custom_batch_statistics(self) -> bool:
        """True when ``_batch_statistics`` is not plain batch statistics (ghost BN, or a subclass's own)."""
        return self.virtual_batch_size is not None or \
            type(self)._batch_statistics is not BatchNormBase._batch_statistics

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
        """Fold ``(mean, biased var over n values)`` (``n=None``: ``var`` is unbiased) into the running stats,
        or hand them to ``bnkit.accumulate``."""
        if not self._updates_running_stats():
            return
        if self.stats_sink is not None:
            if n is None:
                raise ValueError(f"{self.layer_name}: bnkit.accumulate cannot pool ghost-batch statistics "
                                 f"(virtual_batch_size); use plain batch norm inside accumulate()")
            self.stats_sink(mean.detach(), var.detach(), n)
            return
        batch_statistics_update(self.layer_name, mean, var, n, self.running_mean, self.running_var,
                                self._update_momentum(), self.num_batches_tracked, self.nonfinite, self.variance)

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
        for attr, default in (("axis", 1), ("single_sample", "raise"), ("example_weight", None),
                              ("variance", "unbiased")):
            if getattr(self, attr) != default:
                s += f", {attr}={getattr(self, attr)!r}"
        if self.virtual_batch_size is not None:
            s += f", virtual_batch_size={self.virtual_batch_size}"
        return s


_METADATA_KEY = "bnkit_conventions"


def _conventions(layer: BatchNormBase) -> dict:
    return {"eps": layer.eps, "momentum": layer.momentum, "momentum_convention": layer.momentum_convention,
            "variance": layer.variance}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _record_conventions(module, state_dict, prefix, local_metadata) -> None:
    local_metadata[_METADATA_KEY] = _conventions(module)


def _register_state_dict_post_hook(module: torch.nn.Module, hook) -> None:
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    register(hook)


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
