"""``DomainBatchNorm1d/2d/3d``: separate batch-norm statistics per data domain (split BN).

Training on several domains (source/target in domain adaptation, clean/adversarial examples as in
Xie et al.'s AdvProp, real/synthetic data; Wu & Johnson, "Rethinking Batch in BatchNorm", Sec. 5)
with one set of statistics mixes populations that differ, and eval then uses statistics that fit
none of them. Here each domain has its own ``bnkit.BatchNorm*d`` (its own batch statistics in
training, running statistics and ``num_batches_tracked``); the affine ``weight``/``bias`` is one
shared pair (``shared_affine=True``, the usual choice) or one per domain.

The domain is chosen per call with ``forward(x, domain=d)`` or, for a whole model whose
``forward`` you do not want to change, with ``with bnkit.use_domain(model, d): model(x)``.
A batch holds one domain; split mixed batches before the model.

The per-domain layers are ordinary bnkit layers in ``self.domains``, so ``bnkit.freeze_stats``,
``bnkit.convert`` and ``bnkit.freeze`` act on each of them (shared parameters stay shared).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d", "use_domain"]


class DomainBatchNorm(nn.Module):
    r"""Per-domain batch norm; the shared base (subclasses choose the per-domain layer class).

    Args:
        num_features: C.
        num_domains: how many domains (>= 1); domains are ``0 .. num_domains - 1``.
        shared_affine: one ``weight``/``bias`` for all domains (default) or one per domain.
        eps, momentum, affine, track_running_stats, device, dtype, and keyword arguments of
            :class:`bnkit.BatchNormBase` (``activation=``, ``variance=``, ...): for every domain's layer.

    Shape:
        Input as the per-domain layer (e.g. ``(N, C, H, W)`` for ``DomainBatchNorm2d``); same output shape.
    """

    _layer_cls: type = BatchNorm2d

    def __init__(self, num_features: int, num_domains: int, shared_affine: bool = True, eps: float = 1e-5,
                 momentum=0.1, affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 **kwargs):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}({num_features!r}, num_domains={num_domains!r}): num_features "
                             f"must be a positive int, got {num_features!r}")
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"{type(self).__name__}({num_features}): num_domains must be a positive int, "
                             f"got {num_domains!r}")
        self.num_features, self.num_domains, self.shared_affine = num_features, num_domains, shared_affine
        self.domains = nn.ModuleList(
            self._layer_cls(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
            for _ in range(num_domains))
        self._tie_affine()
        # load_state_dict(assign=True) gives each domain the checkpoint's own tensor (equal ones: checked in
        # _load_from_state_dict); tie them again, or the domains would train separate copies
        self.register_load_state_dict_post_hook(_tie_after_load)
        #: the domain used when ``forward`` gets no ``domain=``; set by :func:`use_domain`.
        self.active_domain = None

    def _tie_affine(self) -> None:
        """Every domain's ``weight``/``bias`` is domain 0's Parameter (``shared_affine=True`` and affine domains;
        after ``bnkit.freeze`` they are buffers, copies that never change)."""
        if not (self.shared_affine and isinstance(getattr(self.domains[0], "weight", None), nn.Parameter)):
            return
        for layer in self.domains[1:]:
            layer.weight, layer.bias = self.domains[0].weight, self.domains[0].bias

    def _apply(self, fn, recurse: bool = True):
        # with torch.__future__.set_overwrite_module_params_on_conversion(True), .to()/.double() make a new
        # Parameter per domain: tie them again
        module = super()._apply(fn, recurse)
        self._tie_affine()
        return module

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features}, num_domains={self.num_domains})"

    def forward(self, input: torch.Tensor, domain: int | None = None) -> torch.Tensor:
        d = self.active_domain if domain is None else domain
        if d is None:
            raise ValueError(f"{self.layer_name}: no domain selected; call it with domain=d or inside "
                             f"`with bnkit.use_domain(model, d):`")
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < self.num_domains:
            raise ValueError(f"{self.layer_name}: domain must be an int in [0, {self.num_domains - 1}], got {d!r}")
        return self.domains[d](input)

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, shared_affine={self.shared_affine}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # With shared_affine the domains hold one weight/bias under every domain's key, so loading copies
        # each domain's entry into the same tensor in turn and the last one wins. A checkpoint with
        # per-domain affine values loads only if they are equal; otherwise nothing here is loaded.
        if self.shared_affine and getattr(self.domains[0], "weight", None) is not None:  # frozen: no .affine
            for key in ("weight", "bias"):
                given = [(d, state_dict[k]) for d in range(self.num_domains)
                         if (k := f"{prefix}domains.{d}.{key}") in state_dict]
                differ = [d for d, t in given[1:] if t.shape == given[0][1].shape and not torch.equal(t, given[0][1])]
                if differ:
                    raise ValueError(f"{self.layer_name} ({prefix.rstrip('.') or 'top level'}): shared_affine=True "
                                     f"keeps one {key} for all domains, but the checkpoint's {key} of domain(s) "
                                     f"{differ} differs from domain {given[0][0]}'s (it was saved with "
                                     f"shared_affine=False); construct the layer with shared_affine=False to "
                                     f"load it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _tie_after_load(module: DomainBatchNorm, incompatible_keys) -> None:
    module._tie_affine()  # a module-level function, not a lambda: whole-model pickles keep working


class DomainBatchNorm1d(DomainBatchNorm):
    """Per-domain :class:`bnkit.BatchNorm1d`. See :class:`DomainBatchNorm`."""

    _layer_cls = BatchNorm1d


class DomainBatchNorm2d(DomainBatchNorm):
    """Per-domain :class:`bnkit.BatchNorm2d`. See :class:`DomainBatchNorm`.

    >>> bn = DomainBatchNorm2d(3, num_domains=2)
    >>> y = bn(torch.randn(4, 3, 2, 2), domain=1)
    >>> int(bn.domains[1].num_batches_tracked), int(bn.domains[0].num_batches_tracked)
    (1, 0)
    """

    _layer_cls = BatchNorm2d


class DomainBatchNorm3d(DomainBatchNorm):
    """Per-domain :class:`bnkit.BatchNorm3d`. See :class:`DomainBatchNorm`."""

    _layer_cls = BatchNorm3d


@contextlib.contextmanager
def use_domain(model: nn.Module, domain: int):
    """``with use_domain(model, d):`` every :class:`DomainBatchNorm` in ``model`` uses domain ``d``.

    The previous selection is restored on exit (so the blocks nest). Raises if the model has none.
    """
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm)]
    if not layers:
        raise ValueError(f"use_domain: {type(model).__name__} has no DomainBatchNorm layer")
    for m in layers:
        if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < m.num_domains:
            raise ValueError(f"use_domain: {m.layer_name}: domain must be an int in [0, {m.num_domains - 1}], "
                             f"got {domain!r}")
    previous = [m.active_domain for m in layers]
    for m in layers:
        m.active_domain = domain
    try:
        yield model
    finally:
        for m, d in zip(layers, previous):
            m.active_domain = d
