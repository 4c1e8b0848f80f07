"""``FrozenBatchNorm1d/2d/3d``: batch norm with fixed statistics and affine, as one scale and shift.

Fine-tuning detection/segmentation backbones at small batch sizes (torchvision, detectron2) keeps
each batch-norm layer's ``running_mean``, ``running_var``, ``weight`` and ``bias`` fixed. Here they
are *buffers*, not parameters, so no optimizer, ``requires_grad_()``, ``model.train()`` or
``update_bn`` can change them; the forward is one fused multiply-add per element::

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale
    y     = act(x * scale + shift)

which equals an eval-mode ``torch.nn.BatchNorm*d`` with the same state. A batch-norm state_dict
loads directly (``num_batches_tracked`` is ignored). ``bnkit.freeze(model)`` converts a model.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..ops import apply_activation, eval_scale_shift, resolve_activation
from ..stats import accumulation_dtype
from ..validation import check_input, refuse_removed
from .batchnorm import _METADATA_KEY
from .tracing import traced_call

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class FrozenBatchNorm(nn.Module):
    r"""Frozen batch norm over dimension 1 of an ``(N, C, *)`` input; the shared base.

    Args:
        num_features: C.
        eps: added to ``running_var``. Default 1e-5.
        device, dtype: of the buffers.
        activation: as in :class:`bnkit.BatchNorm2d`: a name or ``nn.ReLU()``, ``nn.LeakyReLU(slope)``,
            ``nn.SiLU()``, ``nn.Identity()`` (applied after the affine).

    Buffers: ``weight``, ``bias``, ``running_mean``, ``running_var`` (shape ``(C,)``).

    Shape:
        Input ``(N, C, *)``; output the same shape and dtype (arithmetic in float32 for half input).
    """

    _expected_dims: tuple[int, ...] = ()
    _dims_doc = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *, activation=None,
                 **removed):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if removed:  # negative_slope= was a keyword before activation modules
            refuse_removed(f"{type(self).__name__}({num_features})", removed, ("negative_slope",))
        # torchvision's FrozenBatchNorm2d takes any eps; a negative (or NaN) one gives NaN outputs for
        # channels with running_var < -eps, so it is refused as bnkit.BatchNorm2d refuses it.
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{type(self).__name__}({num_features}): eps must be a number >= 0, got {eps!r}")
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope = resolve_activation(self.layer_name, activation)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BatchNorm state_dict carries num_batches_tracked, which has no meaning once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        # A bnkit checkpoint records its eps (bnkit.BatchNorm2d warns on a mismatch, as here): the one
        # convention that changes a frozen layer's numbers.
        saved = (local_metadata.get(_METADATA_KEY) or {}).get("eps")
        if isinstance(saved, float) and not math.isclose(saved, self.eps, rel_tol=1e-9):
            warnings.warn(f"{self.layer_name} ({prefix.rstrip('.') or 'top level'}): the checkpoint was saved with "
                          f"eps={saved!r} (this layer: {self.eps!r}). The numbers will differ from the saved "
                          f"model's; construct the layer with eps={saved!r} to reproduce it.", UserWarning,
                          stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_and_shift(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused per-channel ``(scale, shift)`` in ``dtype``."""
        return eval_scale_shift(self.running_mean, self.running_var, self.weight, self.bias, self.eps, dtype)

    def eval_affine(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` such that the output is ``act(x * scale + shift)`` per channel (dimension 1),
        in training and eval alike; the same contract as :meth:`bnkit.BatchNormBase.eval_affine`."""
        return self.scale_and_shift(dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (traced := traced_call(self, input)) is not None:  # torch.fx: a leaf module
            return traced
        if isinstance(input, torch.Tensor) and self._expected_dims and input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{self.layer_name}: expected {want} input {self._dims_doc}, got {input.dim()}-D "
                             f"input of shape {tuple(input.shape)}")
        check_input(self.layer_name, input, self.num_features, dict(self.named_buffers()))
        acc = accumulation_dtype(input.dtype)
        scale, shift = self.scale_and_shift(acc)
        view = (1, -1) + (1,) * (input.dim() - 2)
        y = torch.addcmul(shift.view(view), input.to(acc), scale.view(view))
        return apply_activation(y, self.activation, self.negative_slope).to(input.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if self.activation != "identity":
            s += f", activation={self.activation!r}"
        return s


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen batch norm of a ``(N, C)`` or ``(N, C, L)`` input. See :class:`FrozenBatchNorm`."""

    _expected_dims = (2, 3)
    _dims_doc = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen batch norm of a ``(N, C, H, W)`` input. See :class:`FrozenBatchNorm`.

    >>> bn = torch.nn.BatchNorm2d(3).eval()
    >>> frozen = FrozenBatchNorm2d(3)
    >>> frozen.load_state_dict(bn.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.allclose(frozen(x), bn(x))
    True
    """

    _expected_dims = (4,)
    _dims_doc = "(N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen batch norm of a ``(N, C, D, H, W)`` input. See :class:`FrozenBatchNorm`."""

    _expected_dims = (5,)
    _dims_doc = "(N, C, D, H, W)"
