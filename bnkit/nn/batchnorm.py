"""``BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm*d``.

``bnkit.BatchNorm2d`` *is a* ``torch.nn.BatchNorm2d`` (a subclass), so every ``isinstance`` check in
the ecosystem (``torch.optim.swa_utils.update_bn``, fvcore's PreciseBN, timm's freezing, weight-decay
filters, DDP helpers) finds it, and state_dict loading (including checkpoints older than
``num_batches_tracked``) is torch's own. The forward is bnkit's; which route a call takes is
decided in one place, :meth:`BatchNormBase.forward`.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.utils.hooks import RemovableHandle

from ..ops import check_memory_efficient, eval_scale_shift, normalize, resolve_activation
from ..ops.activations import apply_activation
from ..ops.backend import get_backend, kernels_for
from ..stats import Moments, accumulation_dtype, batch_moments, masked_moments
from ..stats import example_weighted_moments
from ..stats import momentum as momentum_lib
from ..stats.running import candidates, commit, enough_values, nonfinite_flag, stored_variance
from ..validation import (NONFINITE_POLICIES, SINGLE_SAMPLE_POLICIES, VARIANCE_KINDS, channel_back, channel_first,
                          check_batch_size, check_choice, check_eps, check_input, check_mask, mask_from_lengths,
                          nonfinite_message)
from ..validation import refuse_removed
from .tracing import traced_call

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "STATS_FROZEN_MODES", "nonfinite_report"]

#: ``stats_frozen`` values: ``None`` (normal), ``"batch"`` (normalize with batch statistics, no
#: running update), ``"running"`` (normalize with the running statistics even in training).
STATS_FROZEN_MODES = (None, "batch", "running")

# Read-modify-write of the running buffers is atomic across threads (torch.nn's in-kernel update is).
_UPDATE_LOCK = threading.Lock()


class BatchNormBase(_TorchBatchNorm):
    r"""Batch normalization over dimension 1 of an ``(N, C, *)`` input; the shared base.

    .. math:: y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta\Big)

    In training, mean and (biased) variance are the batch's, per channel, over N and the spatial
    dimensions; the running statistics are updated with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch``. In eval, the running statistics are
    used (batch statistics when ``track_running_stats=False``). All of this equals ``torch.nn``,
    including an empty batch (empty output, statistics unchanged, ``num_batches_tracked`` + 1).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability. Default 1e-5 (Keras uses 1e-3). As in
            torch, checked when used: > 0 in training, >= 0 in eval.
        momentum: how the running statistics follow the batches, one value: a number, PyTorch's
            convention, the weight of the *new* batch (default 0.1); ``None`` for the cumulative
            average; ``bnkit.momentum.Decay(0.99)`` (Keras/TF/Flax: the weight of the *old* value);
            ``bnkit.momentum.HalfLife(steps)`` (update steps after which a batch's weight has
            halved); ``bnkit.momentum.Schedule("constant" | "linear" | "cosine", total_steps=...,
            start=0.1)`` (evaluated on the device: ramp from the EMA toward the cumulative average);
            or a callable ``step -> momentum`` (step counts from 1; one host read of the step per
            training call). Numbers >= 0.5 (momentum.KERAS_LOOKALIKE_THRESHOLD) warn: Keras-like.
            ``layer.momentum`` is torch's number (``None`` when cumulative; a schedule's ``start``),
            ``layer.momentum_convention`` the convention and ``layer.momentum_schedule`` the schedule.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default True.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
        device, dtype: of the parameters and buffers.
        bias: with ``affine=True``, whether beta is learned (torch's ``bias=`` keyword).
        activation: applied after the affine (fused on the GPU path): ``None``/``"identity"``,
            ``"relu"``, ``"leaky_relu"`` (slope 0.01) or ``"silu"``, or the module ``nn.Identity()``,
            ``nn.ReLU()``, ``nn.LeakyReLU(slope)`` or ``nn.SiLU()``. Read back as ``layer.activation``
            (the name) and ``layer.negative_slope``.
        nonfinite: a batch whose statistics are NaN/Inf: ``"skip"`` its running update (default;
            decided on the device, no host read; skipped batches are counted on the device
            and reported with a warning at ``.eval()`` or by :func:`bnkit.nonfinite_report`;
            ``state_dict()`` reads nothing, EMA helpers call it every step), ``"raise"`` (an error at once,
            buffers unchanged; one host read per training call) or ``"propagate"`` (torch's behaviour).
        axis: the channel dimension (default 1; ``-1`` takes ``(N, L, C)`` input without transposes).
        single_sample: one value per channel in training: ``"raise"`` (default, the message names the
            fixes), ``"use_running"`` (normalize with the running statistics, no update) or
            ``"skip_update"`` (normalize with its own statistics, i.e. output ``bias``, no update).
        example_weight: inference example weighing (Summers & Dinneen 2020), eval only: ``None`` (off),
            a weight alpha in [0, 1], or ``"auto"`` for ``1 / B`` with B the last training batch size.
        variance: which variance the running update stores, ``"unbiased"`` (torch) or ``"biased"``
            (Keras, Flax).

    Keywords of earlier versions (``decay=``, ``half_life=``, ``momentum_schedule=``, ``total_steps=``,
    ``negative_slope=``, ``virtual_batch_size=``, ``memory_efficient=``) raise a TypeError that gives
    the new spelling. :attr:`memory_efficient` is set on the layer; ghost batch norm is
    :class:`bnkit.GhostBatchNorm2d` etc.; renormalized and synchronized statistics are
    :class:`bnkit.BatchRenorm2d` and :class:`bnkit.SyncBatchNorm`: each variant changes only the
    batch-statistics step (``_batch_statistics``) and takes the same arguments.

    ``forward(input, mask=None, lengths=None)``: ``mask`` (bool, the input's shape without the
    channel dimension; False marks padding) or ``lengths`` (``(N,)`` integer valid lengths of a 3-D
    input, best on the CPU as for ``pack_padded_sequence``) keep padded elements out of the batch
    and running statistics, whatever values they hold; they pass through unchanged. A batch with
    fewer than 2 valid values per channel leaves the running statistics unchanged (counted and reported
    like a non-finite batch; a fully masked batch returns its input, as Keras does).

    The state_dict records the layer's conventions (eps, momentum, its convention, variance kind) in
    its metadata; loading a bnkit checkpoint whose conventions differ warns. Plain torch checkpoints
    load silently, and torch.nn loads bnkit checkpoints.

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory format.
    """

    _expected_dims: tuple[int, ...] = ()
    _dims_doc = "(N, C, *)"
    _min_features = 1  # lazy layers start with 0 channels, as torch's do

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True, activation=None,
                 nonfinite: str = "skip", axis: int = 1, single_sample: str = "raise", example_weight=None,
                 variance: str = "unbiased", **removed):
        cls = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < self._min_features:
            raise ValueError(f"{cls}: num_features must be a positive int, got {num_features!r}")
        name = f"{cls}({num_features})"
        if removed:
            refuse_removed(name, removed)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps):
            raise TypeError(f"{name}: eps must be a number, got {eps!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"{name}: axis must be an int (the channel dimension, e.g. 1 or -1), got {axis!r}")
        resolved, convention, schedule = momentum_lib.resolve(name, momentum)
        # torch >= 2.6 has bias=; pass it only when asked for so older torch keeps working
        super().__init__(num_features, eps, resolved, affine, track_running_stats, device=device, dtype=dtype,
                         **({} if bias else {"bias": False}))
        self.momentum_convention = convention
        self.momentum_schedule = schedule
        self.activation, self.negative_slope = resolve_activation(name, activation)
        self.nonfinite = check_choice(name, "nonfinite", nonfinite, NONFINITE_POLICIES)
        self._memory_efficient = False
        self.stats_frozen = None
        self.axis = axis
        self.single_sample = check_choice(name, "single_sample", single_sample, SINGLE_SAMPLE_POLICIES)
        self.variance = check_choice(name, "variance", variance, VARIANCE_KINDS)
        if not (example_weight is None or example_weight == "auto"
                or (isinstance(example_weight, (int, float)) and not isinstance(example_weight, bool)
                    and 0.0 <= example_weight <= 1.0)):
            raise ValueError(f"{name}: example_weight must be None, 'auto' or a number in [0, 1], "
                             f"got {example_weight!r}")
        self.example_weight = example_weight
        self.last_train_batch_size = None  # for example_weight="auto"
        # Batches whose running update the on-device guard skipped since the last report. A plain tensor
        # attribute, not a buffer: parameters, buffers and state_dict stay exactly torch.nn's.
        self._nonfinite_skipped = _skip_counter(device)
        self._moments_hooks: OrderedDict = OrderedDict()
        _register_state_dict_post_hook(self, _record_conventions)

    def __setstate__(self, state: dict) -> None:
        # Whole-model pickles of bnkit 0.1 held these as plain attributes; they are properties now.
        state = dict(state)
        if "memory_efficient" in state:
            state["_memory_efficient"] = state.pop("memory_efficient")
        size = state.pop("virtual_batch_size", None)
        state.pop("stats_sink", None)  # replaced by register_moments_hook
        state.setdefault("_moments_hooks", OrderedDict())
        state["_nonfinite_skipped"] = _skip_counter(None, state.get("_nonfinite_skipped"))  # moved on the first update
        super().__setstate__(state)
        if size is not None and type(self)._batch_statistics is BatchNormBase._batch_statistics:
            from . import ghost  # ghost imports this module
            self.__class__ = {BatchNorm1d: ghost.GhostBatchNorm1d, BatchNorm2d: ghost.GhostBatchNorm2d,
                              BatchNorm3d: ghost.GhostBatchNorm3d}[type(self)]
            self.virtual_batch_size = size

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.to_empty() move parameters and buffers; the skip counter (not a buffer) follows
        # the running statistics' device here, so no training step has to copy it there (a copy a CUDA
        # graph capture refuses). It stays float32 whatever dtype the buffers get: it counts batches.
        module = super()._apply(fn, recurse)
        running_mean = self._buffers.get("running_mean")
        skipped = self._nonfinite_skipped
        if running_mean is not None and skipped.device != running_mean.device:
            self._nonfinite_skipped = _skip_counter(running_mean.device, None if skipped.is_meta else skipped)
        return module

    def reset_running_stats(self) -> None:
        """torch's reset, and the skipped-batch count with it (skips before a reset are not this run's)."""
        super().reset_running_stats()
        skipped = self.__dict__.get("_nonfinite_skipped")  # None while torch's __init__ calls this
        if skipped is not None:
            with torch.no_grad():
                skipped.zero_()

    @property
    def memory_efficient(self) -> bool:
        """Triton path, training: keep only the output for backward (In-Place ABN), so the input can
        be freed. Set it on the layer (``layer.memory_efficient = True``); it needs an invertible
        activation (identity, or leaky_relu with a positive slope), checked at assignment, and no
        weight entry equal to 0. Ignored on the torch path. Default False."""
        return self._memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self._memory_efficient = check_memory_efficient(self.layer_name, value, self.activation, self.negative_slope)

    @property
    def virtual_batch_size(self) -> int | None:
        """``None``: this layer normalizes with plain batch statistics (ghost batch norm is
        :class:`bnkit.GhostBatchNorm2d` etc., where this is the chunk size)."""
        return None

    @virtual_batch_size.setter
    def virtual_batch_size(self, value) -> None:
        if value is not None:
            raise AttributeError(f"{self.layer_name}: ghost batch norm is a layer class of its own: "
                                 f"bnkit.GhostBatchNorm1d/2d/3d({self.num_features}, virtual_batch_size={value!r})")

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self._expected_dims and input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{self.layer_name}: expected {want} input {self._dims_doc}, got {input.dim()}-D "
                             f"input of shape {tuple(input.shape)}")

    # ---- public hooks for tools ------------------------------------------------------------------
    def register_moments_hook(self, hook) -> RemovableHandle:
        """Observe training batches: ``hook(layer, moments)`` after every forward that normalizes with
        plain batch statistics, with the batch's per-channel :class:`bnkit.stats.Moments` (count, mean,
        M2; detached, in the accumulation dtype; padding left out). Tools (``bnkit.accumulate``) build
        on it; it costs one extra reduction per call while a hook is registered. Returns a handle
        whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._moments_hooks)
        self._moments_hooks[handle.id] = hook
        return handle

    def fold_moments(self, moments: Moments) -> None:
        """Fold the pooled statistics of one or more batches into the running statistics as ONE
        update, with this layer's momentum, variance kind and non-finite policy (what one batch
        holding all those values would have done)."""
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(f"{self.layer_name}: has no running statistics to fold moments into")
        count = moments.count
        if count.numel() and count.dim():
            count = count[0]
        self._update_running(moments.mean, moments.var(), count)

    # ---- the forward: which route runs, and why, in one place -------------------------------------
    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        axis = self.axis
        if axis == 1 and type(input) is torch.Tensor and input.dim() in self._expected_dims:
            x = input  # the common case, checked without building a message
        else:
            if (traced := traced_call(self, input, mask, lengths)) is not None:  # torch.fx: a leaf module
                return traced
            x = channel_first(self.layer_name, input, axis, self._check_input_dim)
        if lengths is not None or mask is not None:
            mask = self._mask(x, mask, lengths)
        buffers = self._buffers  # one dict lookup each instead of Module.__getattr__ per access
        running = buffers.get("running_mean") is not None and buffers.get("running_var") is not None
        training = self.training
        batch_stats = (training and self.stats_frozen != "running") or not running
        if not self.eps > 0:
            check_eps(self.layer_name, self.eps, batch_stats)
        if not batch_stats:
            y = self._eval_route(x, mask)
        else:
            update = training and running and self.track_running_stats and self.stats_frozen is None
            y = self._train_route(x, mask, update)
            if training and x.shape[0] and self.last_train_batch_size != x.shape[0]:  # empty batches: no size
                self.last_train_batch_size = x.shape[0]
        return y if axis == 1 else channel_back(y, axis, input)

    def _eval_route(self, x: torch.Tensor, mask) -> torch.Tensor:
        """Running statistics: torch's ``batch_norm(training=False)`` (or the eval kernel), or the
        composed ops when example weighing mixes in per-example statistics."""
        alpha = self._example_weight()
        if alpha is not None:
            return self._composed_eval(x, mask, alpha)
        kernels = kernels_for(x, False) if x.is_cuda or _cpu_kernels_forced() else None
        if kernels is not None:
            self._check(x)
            y = kernels.eval_forward(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                     self.activation, self.negative_slope)
        else:
            y = self._explained(x, self._aten, x, self.running_mean, self.running_var, False, 0.0)
            y = apply_activation(y, self.activation, self.negative_slope)
        return y if mask is None else torch.where(mask.unsqueeze(1), y, x)

    def _train_route(self, x: torch.Tensor, mask, update: bool) -> torch.Tensor:
        """Batch statistics. Plain batches go through torch's ATen kernel (or a Triton kernel where
        the measured table says it wins); masks, custom batch statistics (ghost, renorm, sync) and
        the biased-variance convention go through composed torch ops."""
        custom = self._custom_batch_statistics()
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        local = not self._global_batch  # SyncBatchNorm: the values of all ranks decide, not this one's
        if n == 1 and mask is None and local:
            if self.single_sample == "use_running" and self.running_mean is not None:
                return self._eval_route(x, None)
            if self.single_sample == "skip_update":  # plain statistics, any layer: x - mean is exactly 0, no update
                return self._composed_train(x, None, False, plain=True)
            check_batch_size(self.layer_name, x)
        if n == 0 and local:  # an empty batch: torch's own call (empty output, only the count grows), any layer
            custom = False
        if mask is not None or custom or self.variance != "unbiased":
            return self._composed_train(x, mask, update)
        if self._moments_hooks:
            self._check(x)
            self._call_moments_hooks(Moments.of(x))
        kernels = kernels_for(x, True, self.memory_efficient) if n > 1 and (x.is_cuda or _cpu_kernels_forced()) \
            else None
        if kernels is not None:
            self._check(x)
            y, mean, var = kernels.train_forward(x, self.weight, self.bias, self.eps, self.activation,
                                                 self.negative_slope, self.memory_efficient)
            if update:
                self._update_running(mean, var, n)
            return y
        return apply_activation(self._train_aten(x, n, update), self.activation, self.negative_slope)

    def _train_aten(self, x: torch.Tensor, n: int, update: bool) -> torch.Tensor:
        """torch's own fused training kernel; the running update happens on a scratch copy that the
        guard then commits on the device (the scratch, not the buffers, is what autograd saves).

        torch's CPU kernels for channels_last input and for input with one value per sample and
        channel (``(N, C)``, ``(N, C, 1, 1)``, ...) compute the variance as E[x^2] - E[x]^2, which
        cancels when |mean| >> std; its contiguous kernel does not. So on the CPU channels_last input
        runs contiguous (the output keeps the input's layout), and float32/float64 input with one value
        per sample and channel is shifted by its first sample (batch norm does not change under a
        per-channel shift). Not float16/bfloat16: there ``x - x[0]`` would round at the shift's scale,
        or overflow, where torch's float32 accumulation does not.
        """
        shift = None
        if x.is_cpu and n > 1:
            layout = _channels_last_format(x)
            if layout is not None:
                y = self._train_aten(_Contiguous.apply(x, layout), n, update)
                return y.contiguous(memory_format=layout)
            if n == x.shape[0] and x.dtype in _SHIFTED_DTYPES:
                shift = x[0].detach()  # (C, 1, ...): broadcasts over x
                x = x - shift
        if not update:
            return self._explained(x, self._aten, x, None, None, True, 0.0)
        momentum = self._momentum_for_update()
        if n == 0 or (self.nonfinite == "propagate" and shift is None and isinstance(momentum, float)):
            # torch.nn's own call: the kernel updates the buffers in place (an empty batch: it skips the
            # statistics and only the count grows, as in torch.nn)
            buffers = self._buffers
            nbt = buffers.get("num_batches_tracked")
            if nbt is not None:
                nbt.add_(1)
            stats = (None, None) if n == 0 else (buffers["running_mean"], buffers["running_var"])
            return self._explained(x, self._aten, x, *stats, True, momentum if n else 0.0)
        return self._explained(x, _locked, self._aten_update, x, momentum, shift)

    def _aten_update(self, x: torch.Tensor, momentum, shift: torch.Tensor | None) -> torch.Tensor:
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        ema_in_kernel = isinstance(momentum, float)
        if shift is not None and (shift.dim() > 1 or shift.dtype != running_mean.dtype):
            shift = shift.reshape(-1).to(running_mean.dtype)
        if not ema_in_kernel:  # momentum 1 leaves the batch's (mean, unbiased var) in the scratch
            new_mean, new_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        elif shift is None:  # torch's own EMA, bit for bit
            new_mean, new_var = running_mean.clone(), running_var.clone()
        else:  # the kernel sees x - shift: its running mean too
            new_mean, new_var = running_mean - shift, running_var.clone()
        y = self._aten(x, new_mean, new_var, True, momentum if ema_in_kernel else 1.0)
        if shift is not None:
            new_mean = new_mean + shift
        if not ema_in_kernel:
            new_mean, new_var = candidates(running_mean, running_var, buffers.get("num_batches_tracked"),
                                           new_mean, new_var, momentum)
        self._commit(new_mean, new_var)
        return y

    def _composed_train(self, x: torch.Tensor, mask, update: bool, plain: bool = False) -> torch.Tensor:
        self._check(x)
        if mask is not None:
            if self._custom_batch_statistics():
                raise ValueError(f"{self.layer_name}: mask=/lengths= are not supported by {type(self).__name__}")
            mean, var, count = masked_moments(x, mask)
            if self._moments_hooks:
                self._call_moments_hooks(Moments(count, mean.detach(), (var * count).detach()))
            if update:
                self._update_running(mean, var, count[0] if count.numel() else count)
            y = normalize(x, mean, var, self.weight, self.bias, self.eps, self.activation, self.negative_slope)
            return torch.where(mask.unsqueeze(1), y, x)
        statistics = BatchNormBase._batch_statistics if plain else type(self)._batch_statistics  # plain: not ghost/renorm
        mean, var = statistics(self, x, update)
        return normalize(x, mean, var, self.weight, self.bias, self.eps, self.activation, self.negative_slope)

    def _composed_eval(self, x: torch.Tensor, mask, alpha: float) -> torch.Tensor:
        self._check(x)
        acc = accumulation_dtype(x.dtype)
        mean, var = example_weighted_moments(x, self.running_mean.to(acc), self.running_var.to(acc), alpha, mask)
        y = normalize(x, mean, var, self.weight, self.bias, self.eps, self.activation, self.negative_slope)
        return y if mask is None else torch.where(mask.unsqueeze(1), y, x)

    # ---- the pieces the routes share ---------------------------------------------------------------
    def _aten(self, x, running_mean, running_var, training: bool, momentum: float) -> torch.Tensor:
        params = self._parameters
        return torch.batch_norm(x, params.get("weight"), params.get("bias"), running_mean, running_var, training,
                                momentum, self.eps, torch.backends.cudnn.enabled)

    def _explained(self, x: torch.Tensor, fn, *args):
        """``fn(*args)`` unchecked (the fast path: ATen checks shapes, devices and dtypes itself);
        when it refuses the input, the error names the layer and the cause. Buffers change only at
        the end of a step, so a refused input leaves them as they were."""
        try:
            return fn(*args)
        except (RuntimeError, TypeError, ValueError):
            self._check(x)
            raise

    def _check(self, x: torch.Tensor) -> None:
        check_input(self.layer_name, x, self.num_features, {"weight": self.weight, "bias": self.bias,
                    "running_mean": self.running_mean, "running_var": self.running_var}, self.axis)

    def _mask(self, x: torch.Tensor, mask, lengths) -> torch.Tensor:
        if lengths is not None:
            if mask is not None:
                raise ValueError(f"{self.layer_name}: pass mask= or lengths=, not both")
            return mask_from_lengths(self.layer_name, x, lengths)
        return check_mask(self.layer_name, x, mask)

    def _momentum_for_update(self):
        """The torch-convention momentum for this update: a float, a 0-d tensor (a named schedule,
        on the device) or None (cumulative average, resolved on the device)."""
        if self.momentum_schedule is None:
            if self.momentum is None and self._buffers.get("num_batches_tracked") is None:
                raise ValueError(f"{self.layer_name}: momentum=None (cumulative average) counts batches in "
                                 f"num_batches_tracked, which this layer does not have; restore it "
                                 f"(layer.num_batches_tracked = torch.tensor(0)) or pass a float momentum")
            return self.momentum
        if isinstance(self.momentum_schedule, momentum_lib.Schedule) and self.num_batches_tracked is not None:
            step = self.num_batches_tracked.to(accumulation_dtype(self.running_mean.dtype)) + 1
            return self.momentum_schedule(step)
        step = 1 + (int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0)
        return momentum_lib.check_value(self.layer_name, self.momentum_schedule(step), step)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n) -> torch.Tensor | None:
        """Fold ``(mean, biased var over n values)`` into the running statistics (``n=None``: ``var``
        is already the unbiased estimate). ``n`` may be a tensor (masked batches): fewer than 2
        values leave the statistics unchanged. Read-modify-write under the update lock. Returns the
        device-side ``keep`` condition (None under ``"propagate"``) for statistics kept alongside."""
        return _locked(self._fold, mean.detach(), var.detach(), n)

    def _fold(self, mean: torch.Tensor, var: torch.Tensor, n) -> torch.Tensor | None:
        var = stored_variance(var, n, self.variance == "unbiased")
        new_mean, new_var = candidates(self.running_mean, self.running_var, self.num_batches_tracked, mean, var,
                                       self._momentum_for_update())
        return self._commit(new_mean, new_var, enough_values(n))

    def _commit(self, new_mean, new_var, enough: torch.Tensor | None = None) -> torch.Tensor | None:
        """The non-finite policy, then the one in-place update (:func:`bnkit.stats.running.commit`). On
        every route the values to store decide: a batch is skipped when it would make the running
        statistics NaN/Inf (NaN/Inf in the batch, a variance beyond the buffers' dtype, or statistics
        already NaN/Inf). ``enough``: a masked batch's device-side "at least 2 values"."""
        keep = skip = None
        if self.nonfinite != "propagate":
            skip = nonfinite_flag(new_mean, new_var)
            keep = skip.logical_not()
        if self.nonfinite == "raise" and not bool(keep):  # the one policy that reads the host, by design
            rows = torch.stack([new_mean, new_var])
            bad = (~torch.isfinite(rows)).any(0).nonzero().flatten().tolist()
            raise FloatingPointError(nonfinite_message(self.layer_name, bad) + "the running statistics were left "
                                     "unchanged (nonfinite='raise').")
        if enough is not None:
            keep, skip = (enough if keep is None else keep & enough), None
        buffers = self._buffers
        running_mean = buffers["running_mean"]
        skipped = self._nonfinite_skipped
        if skipped.device != running_mean.device and keep is not None:  # DataParallel replicas, unpickled layers
            skipped = _skip_counter(running_mean.device, None if skipped.is_meta else skipped)
            self._nonfinite_skipped = skipped
        commit(running_mean, buffers["running_var"], buffers.get("num_batches_tracked"), new_mean, new_var, keep,
               skipped, skip)
        return keep

    def _call_moments_hooks(self, moments: Moments) -> None:
        for hook in list(self._moments_hooks.values()):
            hook(self, moments)

    def _example_weight(self):
        if self.training or self.example_weight is None:
            return None
        if self.example_weight != "auto":
            return float(self.example_weight)
        if not self.last_train_batch_size:
            raise RuntimeError(f"{self.layer_name}: example_weight='auto' is 1 / training batch size, but this layer "
                               f"has not seen a training batch; pass example_weight=<alpha> instead")
        return 1.0 / self.last_train_batch_size

    _global_batch = False  # True where the batch spans processes (SyncBatchNorm): no local batch-size policy

    def _custom_batch_statistics(self) -> bool:
        """True when ``_batch_statistics`` is not plain batch statistics (a subclass's own: ghost, renorm, sync)."""
        return type(self)._batch_statistics is not BatchNormBase._batch_statistics

    def _batch_statistics(self, input: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(mean, var)`` that normalize this batch, shape ``(C,)`` or per sample ``(N, C)``.

        With ``update`` also folds the batch into the running statistics. This is the one step that
        ghost, synchronized and renormalized batch norm change.
        """
        n = check_batch_size(self.layer_name, input) if self.single_sample == "raise" else input.numel() // \
            input.shape[1]
        mean, var = batch_moments(input)
        if self._moments_hooks:
            self._call_moments_hooks(Moments(torch.full_like(mean, float(n)), mean.detach(), (var * n).detach()))
        if update:
            self._update_running(mean, var, n)
        return mean, var

    # ---- reporting skipped batches, when the host reads anyway --------------------------------------
    def train(self, mode: bool = True):
        if not mode and self.training:
            self.report_nonfinite()
        return super().train(mode)

    def report_nonfinite(self, reset: bool = True) -> int:
        """How many training batches the non-finite guard skipped since the last report; warns when
        any were. This reads one value from the device (``.eval()`` calls it)."""
        return nonfinite_report(self, reset).get("", 0)

    def _reported(self, count: int, reset: bool) -> int:
        """Warn about ``count`` skipped batches (read from the counter by the caller) and reset it."""
        if count:
            warnings.warn(f"{self.layer_name}: {count} training batch(es) since the last report would have made the "
                          f"running statistics NaN/Inf (NaN/Inf in the batch, a batch variance beyond the buffers' "
                          f"dtype, or statistics that already were NaN/Inf) or had fewer than 2 valid values per "
                          f"channel, and were skipped: the running statistics and num_batches_tracked are "
                          f"unchanged by them (nonfinite='skip'). Check the input and the learning rate; "
                          f"nonfinite='raise' stops at the first one.",
                          RuntimeWarning, stacklevel=4)
            if reset:
                with torch.no_grad():
                    self._nonfinite_skipped.zero_()
        return count

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

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.momentum_convention in ("decay", "half_life") or self.momentum_schedule is not None:
            # torch's repr says momentum=<the torch number>; say the value the layer was built with
            s = s.replace(f"momentum={self.momentum}", "momentum=" + momentum_lib.describe(
                self.momentum, self.momentum_convention, self.momentum_schedule), 1)
        if self.activation == "leaky_relu" and self.negative_slope != 0.01:
            s += f", activation=LeakyReLU(negative_slope={self.negative_slope})"
        elif self.activation != "identity":
            s += f", activation={self.activation!r}"
        if self.nonfinite != "skip":
            s += f", nonfinite={self.nonfinite!r}"
        if self.stats_frozen is not None:
            s += f", stats_frozen={self.stats_frozen!r}"
        for attr, default in (("axis", 1), ("single_sample", "raise"), ("example_weight", None),
                              ("variance", "unbiased")):
            if getattr(self, attr) != default:
                s += f", {attr}={getattr(self, attr)!r}"
        return s

    def eval_affine(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Eval as a per-channel affine map, or ``None`` when eval is not one.

        Returns ``(scale, shift)``, each of shape ``(C,)`` in ``dtype`` (float32 by default; ``bnkit.fold``
        asks for float64), such that the eval output is ``act(x * scale + shift)`` per channel along
        ``axis``: ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
        ``None`` when no fixed weights can reproduce eval: no running statistics (eval normalizes with
        the batch's own), ``example_weight`` set (each example's statistics are mixed in), or a lazy
        layer not yet initialized. Non-finite running statistics give a non-finite map. This is the one
        place that decides the question for ``bnkit.fold``, ``bnkit.to_keras`` and ``bnkit.doctor``.
        """
        if self.running_mean is None or self.running_var is None or self.example_weight is not None \
                or isinstance(self.running_mean, torch.nn.parameter.UninitializedBuffer):
            return None
        return eval_scale_shift(self.running_mean, self.running_var, self.weight, self.bias, self.eps, dtype)


def nonfinite_report(model: torch.nn.Module, reset: bool = True) -> dict:
    """``{qualified name: batches skipped}`` for every bnkit layer in ``model`` whose non-finite guard
    skipped batches since the last report; each such layer also warns. Reads the counters back in one
    transfer per device: call it where a sync is fine (end of an epoch, before a checkpoint)."""
    report = {}
    if torch.compiler.is_compiling():
        return report
    by_device: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, BatchNormBase) and m._nonfinite_skipped.device.type != "meta":
            by_device.setdefault(m._nonfinite_skipped.device, []).append((name, m))
    for layers in by_device.values():
        counts = torch.stack([m._nonfinite_skipped for _, m in layers]).tolist()
        for (name, m), count in zip(layers, counts):
            if m._reported(int(count), reset):
                report[name] = int(count)
    return report


def _skip_counter(device, count: torch.Tensor | None = None) -> torch.Tensor:
    """The skipped-batch counter: float32 (exact to 2**24 batches) so the guard's float flag adds to
    it in one dispatch; ``count``, an earlier counter (other device, or a long one from an older
    pickle), carries over."""
    if count is None:
        return torch.zeros((), dtype=torch.float32, device=device)
    return count.to(device=device if device is not None else count.device, dtype=torch.float32)


_SHIFTED_DTYPES = (torch.float32, torch.float64)


def _cpu_kernels_forced() -> bool:
    """CPU tensors take the kernels only when forced (Triton's interpreter, in tests)."""
    return get_backend() == "triton"


def _locked(fn, *args):
    """``fn(*args)`` holding the update lock in eager mode; plainly while torch.compile traces (no
    threads inside a graph, and Dynamo does not trace locks)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    with _UPDATE_LOCK:
        return fn(*args)


class _Contiguous(torch.autograd.Function):
    """``x.contiguous()`` whose gradient keeps ``x``'s layout (channels_last in, channels_last dx out,
    as torch.nn gives)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout), None


def _channels_last_format(x: torch.Tensor):
    """``torch.channels_last(_3d)`` when ``x`` (4-D/5-D, more than one channel) is laid out that way, else None."""
    if x.dim() not in (4, 5) or x.shape[1] < 2 or x.is_contiguous():
        return None
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return layout if x.is_contiguous(memory_format=layout) else None


_METADATA_KEY = "bnkit_conventions"


def _conventions(layer: BatchNormBase) -> dict:
    return {"eps": layer.eps, "momentum": layer.momentum, "momentum_convention": layer.momentum_convention,
            "variance": layer.variance}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _record_conventions(module, state_dict, prefix, local_metadata) -> None:
    # No report of skipped batches here: timm's ModelEmaV2 and the like call state_dict() every
    # step, and a report reads a value back from the device.
    local_metadata[_METADATA_KEY] = _conventions(module)


def _register_state_dict_post_hook(module: torch.nn.Module, hook) -> None:
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    register(hook)


class BatchNorm1d(BatchNormBase, torch.nn.BatchNorm1d):
    """Batch norm over a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input. See :class:`BatchNormBase`.

    >>> bn = BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    >>> isinstance(bn, torch.nn.BatchNorm1d)
    True
    """

    _expected_dims = (2, 3)
    _dims_doc = "(N, C) or (N, C, L)"


class BatchNorm2d(BatchNormBase, torch.nn.BatchNorm2d):
    """Batch norm over a 4-D ``(N, C, H, W)`` input. See :class:`BatchNormBase`.

    >>> bn = BatchNorm2d(1)
    >>> y = bn(torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]]))
    >>> [round(v, 4) for v in y.flatten().tolist()]
    [0.5773, 0.5773, -1.732, 0.5773]
    """

    _expected_dims = (4,)
    _dims_doc = "(N, C, H, W)"


class BatchNorm3d(BatchNormBase, torch.nn.BatchNorm3d):
    """Batch norm over a 5-D ``(N, C, D, H, W)`` input. See :class:`BatchNormBase`."""

    _expected_dims = (5,)
    _dims_doc = "(N, C, D, H, W)"
