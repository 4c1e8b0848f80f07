"""``bnkit.convert``: swap every batch-norm layer of a model in place, losing nothing.

One mechanism behind ``convert(model, to=...)``, :func:`convert_sync_batchnorm` and :func:`freeze`:

==========  ==========================================================================
``to``      what each batch-norm layer becomes
==========  ==========================================================================
"bnkit"     ``torch.nn.BatchNorm1d/2d/3d`` -> ``bnkit.BatchNorm1d/2d/3d``,
            ``torch.nn.SyncBatchNorm`` -> ``bnkit.SyncBatchNorm``, frozen -> ``bnkit.BatchNorm*d``
"torch"     the reverse (bnkit sync -> ``torch.nn.SyncBatchNorm``, frozen -> ``torch.nn.BatchNorm*d``)
"sync"      any batch norm (torch or bnkit, Nd or sync) -> ``bnkit.SyncBatchNorm(process_group=...)``
"frozen"    any batch norm with running statistics -> ``bnkit.FrozenBatchNorm1d/2d/3d``
            (``FrozenBatchNorm`` for sync layers, whose input rank is not fixed)
==========  ==========================================================================

Kept: the *same* ``weight``/``bias`` Parameter objects (so an optimizer built before the
conversion keeps training them, and ``requires_grad`` is unchanged) and the same buffer tensors
(``running_mean``, ``running_var``, ``num_batches_tracked``), hence device and dtype; ``eps``,
``momentum``, ``affine``, ``track_running_stats``, the training flag, bnkit's extras between bnkit
layers, and frozen statistics (``bnkit.freeze_stats``) across torch <-> bnkit. Across the frozen
boundary values are *copied* (frozen layers hold buffers, not Parameters; a layer unfrozen gets new
Parameters with ``requires_grad=True`` and ``num_batches_tracked=0``). Hooks registered on the old
layers are not carried over (their handles belong to the old layer): a UserWarning names each layer
that had some. Layers already of the target kind are left as they are.

Refused with a ValueError naming the layer, before anything is swapped: a conversion that would
change the numbers (a bnkit ``activation``, ``virtual_batch_size`` or ``momentum_schedule`` to
torch; ``virtual_batch_size`` to sync; freezing a layer without running statistics), a bnkit
``nonfinite="raise"`` to torch (torch.nn layers have no such check: set ``layer.nonfinite =
"propagate"`` first to accept that; bnkit's default ``"skip"`` becomes torch's behaviour, where a
batch with NaN/Inf statistics enters the running statistics), ``BatchRenorm`` to "torch"/"sync"
(no equivalent), and a lazy layer not yet initialized (its ``num_features`` comes from the first
input). ``DomainBatchNorm`` is a container of plain layers, so its per-domain layers are
converted like any others.

Subclasses of these classes are converted only when the new layer computes what they compute: a
subclass that keeps its base's computation (``forward``, and bnkit's ``_batch_statistics``) and
holds no submodules and no parameters or buffers of its own, and timm's ``BatchNormAct2d``/``SyncBatchNormAct`` (batch norm, then ``drop``,
then ``act``) whose ``drop`` is ``Identity`` and whose ``act`` is ``Identity``, ``ReLU``,
``LeakyReLU`` or ``SiLU``: the activation becomes the bnkit layer's fused ``activation=``. Any other
subclass (its own forward, other submodules) is left as it is, with a UserWarning naming it.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ..nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from ..nn.lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from ..nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase
from ..nn.sync import SyncBatchNorm
from ..ops import activation_module
from .freezing import freeze_hook_ids, set_stats_frozen_mode, stats_frozen_mode

__all__ = ["convert", "convert_sync_batchnorm", "freeze", "TARGETS"]

TARGETS = ("bnkit", "torch", "sync", "frozen")

_DIMS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3), (BatchNorm1d, 1), (BatchNorm2d, 2),
         (BatchNorm3d, 3), (BatchRenorm1d, 1), (BatchRenorm2d, 2), (BatchRenorm3d, 3),
         (FrozenBatchNorm1d, 1), (FrozenBatchNorm2d, 2), (FrozenBatchNorm3d, 3))
_CLASSES = {"torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: nn.SyncBatchNorm},
            "bnkit": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d, None: SyncBatchNorm},
            "frozen": {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d, None: FrozenBatchNorm}}
# bnkit attributes that torch layers lack, copied between bnkit layers.
_EXTRAS = ("momentum_convention", "momentum_schedule", "activation", "negative_slope", "nonfinite",
           "axis", "single_sample", "example_weight", "variance", "memory_efficient")


# The classes whose computation convert knows; a subclass is checked against the nearest of them.
_KNOWN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
          nn.LazyBatchNorm2d, nn.LazyBatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm,
          LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
          GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, FrozenBatchNorm, FrozenBatchNorm1d,
          FrozenBatchNorm2d, FrozenBatchNorm3d, _BatchNorm)
# The methods that make up a layer's computation (bnkit's variants differ in _batch_statistics).
_COMPUTATION = ("forward", "_batch_statistics")
# timm's norm + activation layers (torch.nn subclasses): torch's batch norm, then self.drop, then self.act.
# Only their structure is checked (timm need not be installed); their forward is timm's own.
_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct")
_FUSABLE = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}
# The parameters and buffers of the known classes: a subclass with more holds state the new layer would drop.
_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_RENORM_TENSORS = _TENSORS | {"renorm_mean", "renorm_std"}


def _added_activation(m: nn.Module):
    """What ``m`` computes after its known base class: ``(activation, negative_slope)`` for a subclass
    that adds one (timm's norm-act layers), ``None`` for nothing, or a string saying why it is unknown."""
    if type(m) in _KNOWN:
        return None
    base = next(c for c in type(m).__mro__ if c in _KNOWN)
    extra = set(m._parameters) | set(m._buffers)
    extra -= _RENORM_TENSORS if issubclass(base, BatchRenormBase) else _TENSORS
    if extra:
        return f"it holds parameters or buffers ({', '.join(sorted(extra))}) that the new layer would not keep"
    children = dict(m.named_children())
    if type(m).__name__ in _NORM_ACT and not issubclass(base, (BatchNormBase, FrozenBatchNorm)) \
            and set(children) <= {"act", "drop"}:
        act, drop = children.get("act", nn.Identity()), children.get("drop", nn.Identity())
        if type(drop) is not nn.Identity or type(act) not in _FUSABLE:
            return (f"its drop={type(drop).__name__} / act={type(act).__name__} are not batch norm plus one of "
                    f"bnkit's fused activations ({', '.join(_FUSABLE.values())})")
        return _FUSABLE[type(act)], getattr(act, "negative_slope", 0.01)
    if children:
        return f"it holds submodules ({', '.join(children)}) that the new layer would not run"
    changed = [k for k in _COMPUTATION if getattr(type(m), k, None) is not getattr(base, k, None)]
    if changed:
        return f"it overrides {', '.join(changed)} of {base.__module__}.{base.__name__}"
    return None


def _dims(m: nn.Module):
    return next((d for cls, d in _DIMS if isinstance(m, cls)), None)


def _kind(m: nn.Module):
    """``"frozen"``, ``"renorm"``, ``"bnkit-sync"``, ``"bnkit"``, ``"torch-sync"``, ``"torch"`` or None."""
    for cls, kind in ((FrozenBatchNorm, "frozen"), (BatchRenormBase, "renorm"), (SyncBatchNorm, "bnkit-sync"),
                      (BatchNormBase, "bnkit"), (nn.SyncBatchNorm, "torch-sync"), (_BatchNorm, "torch")):
        if isinstance(m, cls):
            return kind
    return None


def _target_class(m: nn.Module, kind: str, to: str, where: str):
    """The class ``m`` becomes, or None to leave it as it is."""
    if to == "frozen":
        return None if kind == "frozen" else _CLASSES["frozen"][_dims(m)]
    if kind == "renorm":
        if to == "bnkit":
            return None
        raise ValueError(f"{where}: BatchRenorm has no {to!r} equivalent; convert it with to='frozen' or replace it")
    if to == "sync":
        return None if kind in ("bnkit-sync", "frozen") else SyncBatchNorm
    if kind.startswith(to):
        return None
    dims = None if kind.endswith("sync") else _dims(m)
    if dims is None and not kind.endswith("sync"):
        raise ValueError(f"{where}: cannot tell whether it is 1d, 2d or 3d; convert a BatchNorm1d/2d/3d instead")
    return _CLASSES[to][dims]


def _check_representable(m: nn.Module, to: str, where: str) -> None:
    if isinstance(m, BatchNormBase):
        lost = []
        if to == "torch":
            lost = [k for k, default in (("activation", "identity"), ("virtual_batch_size", None),
                                         ("momentum_schedule", None), ("axis", 1), ("variance", "unbiased"),
                                         ("example_weight", None), ("single_sample", "raise"))
                    if getattr(m, k) != default]
            lost += ["nonfinite"] if m.nonfinite == "raise" else []
        elif to == "sync" and m.virtual_batch_size is not None:
            lost = ["virtual_batch_size"]
        elif to == "frozen":
            lost = [k for k, default in (("axis", 1), ("example_weight", None)) if getattr(m, k) != default]
        if lost:
            fix = "unset it first"
            if "virtual_batch_size" in lost:  # a ghost layer's batches cannot be unset, only the layer replaced
                fix = ("a ghost layer stays one: to drop its virtual batches, replace it by the plain bnkit layer "
                       "(bnkit.BatchNorm1d/2d/3d; its state_dict loads as is)" +
                       (", and unset the others" if len(lost) > 1 else ""))
            raise ValueError(f"{where}: {', '.join(f'{k}={getattr(m, k)!r}' for k in lost)} has no equivalent in "
                             f"to={to!r} and would change the results; {fix}")
    if to == "frozen" and not isinstance(m, FrozenBatchNorm) and m.running_mean is None:
        raise ValueError(f"{where}: has no running statistics to freeze (track_running_stats=False)")
    if to == "torch" and isinstance(m, FrozenBatchNorm) and m.activation != "identity":
        raise ValueError(f"{where}: activation={m.activation!r} has no torch.nn batch-norm equivalent")


def _from_frozen(m: FrozenBatchNorm, cls) -> nn.Module:
    new = cls(m.num_features, m.eps, device=m.running_mean.device, dtype=m.running_mean.dtype)
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, key).copy_(getattr(m, key))
    if isinstance(new, BatchNormBase):
        new.activation, new.negative_slope = m.activation, m.negative_slope
    return new


def _to_frozen(m: _BatchNorm, cls, activation) -> FrozenBatchNorm:
    extra = {"activation": activation_module(m.activation, m.negative_slope)} if isinstance(m, BatchNormBase) else {}
    if activation is not None:
        extra = {"activation": activation_module(*activation)}
    new = cls(m.num_features, m.eps, device=m.running_mean.device, dtype=m.running_mean.dtype, **extra)
    with torch.no_grad():
        new.running_mean.copy_(m.running_mean)
        new.running_var.copy_(m.running_var)
        if m.weight is not None:
            new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new


def _swap_batch_norm(m: _BatchNorm, cls, process_group, activation) -> nn.Module:
    kwargs = {"process_group": process_group if process_group is not None else getattr(m, "process_group", None)} \
        if cls in (SyncBatchNorm, nn.SyncBatchNorm) else {}
    # Built on the meta device: every tensor below is replaced by the old layer's own.
    new = cls(m.num_features, m.eps, affine=m.affine, track_running_stats=m.track_running_stats,
              device="meta", **kwargs)
    new.momentum = m.momentum
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, key, getattr(m, key, None))  # a registered parameter/buffer slot takes a tensor or None
    if isinstance(new, BatchNormBase) and isinstance(m, BatchNormBase):
        for key in _EXTRAS:
            setattr(new, key, getattr(m, key))
    elif isinstance(new, BatchNormBase):
        new.momentum_convention = "cumulative" if m.momentum is None else "momentum"
        if activation is not None:
            new.activation, new.negative_slope = activation
    mode = stats_frozen_mode(m)
    if mode is not None:
        set_stats_frozen_mode(new, mode)
    return new


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_moments_hooks")


def _user_hooks(m: nn.Module) -> int:
    """Hooks registered on ``m`` by its user (not bnkit's freeze hooks, which the conversion carries over)."""
    own = freeze_hook_ids(m)
    return sum(1 for d in _HOOK_DICTS for k in getattr(m, d, {}) if k not in own)


def _replacement(m: nn.Module, to: str, process_group, where: str, left_alone: list, dropped: list):
    kind = _kind(m)
    if kind is None:
        return None
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() and not kind.startswith(to):
        raise ValueError(f"{where}: is not initialized yet (a lazy layer reads num_features from its first "
                         f"input); run one forward pass or load a state_dict before converting it")
    cls = _target_class(m, kind, to, where)
    if cls is None:
        return None
    activation = _added_activation(m)
    if isinstance(activation, str):
        left_alone.append(f"{where}: left as it is, because {activation}; a {cls.__name__} would not compute "
                          f"the same")
        return None
    _check_representable(m, to, where)
    if _user_hooks(m):
        dropped.append(f"{where}: its {_user_hooks(m)} hook(s) (register_forward_hook and the like) stay on the old "
                       f"layer and do not run on the new {cls.__name__}; register them again on it")
    if kind == "frozen":
        new = _from_frozen(m, cls)
    elif to == "frozen":
        new = _to_frozen(m, cls, activation)
    else:
        new = _swap_batch_norm(m, cls, process_group, activation)
    return new.train(m.training)


def convert(model: nn.Module, to: str = "bnkit", *, process_group=None) -> nn.Module:
    """Swap every batch-norm layer of ``model`` in place (see the module docstring) and return the model.

    If ``model`` itself is a batch-norm layer, its replacement is returned. ``process_group`` is
    only for ``to="sync"``. A layer used at several places in the model is replaced by one new
    layer at all of them.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(convert(model, "bnkit")[1]).__name__
    'BatchNorm2d'
    >>> type(convert(model, "frozen")[1]).__name__
    'FrozenBatchNorm2d'
    """
    if to not in TARGETS:
        raise ValueError(f"convert: to must be one of {TARGETS}, got {to!r}")
    if process_group is not None and to != "sync":
        raise ValueError(f"convert: process_group is only used with to='sync', got to={to!r}")
    replacements, left_alone, dropped = {}, [], []
    for name, m in model.named_modules():
        new = _replacement(m, to, process_group, f"convert(to={to!r}): {name or 'the model'} "
                                                 f"({type(m).__name__}({getattr(m, 'num_features', '?')}))",
                           left_alone, dropped)
        if new is not None:
            replacements[id(m)] = new
    for message in left_alone + dropped:
        warnings.warn(message, UserWarning, stacklevel=2)
    # Every replacement is built before the first swap, so a refusal leaves the model untouched.
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``convert(model, "sync", process_group=...)``: every batch norm becomes :class:`bnkit.SyncBatchNorm`.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (shares the Parameter objects) but for
    torch.nn and bnkit layers, keeping buffers, requires_grad, the training flag and bnkit's options.
    Use this (or ``bnkit.SyncBatchNorm.convert_sync_batchnorm``) on models with bnkit layers: torch's
    classmethod turns every batch norm, bnkit's too, into a ``torch.nn.SyncBatchNorm`` and drops
    bnkit's options (activation, non-finite policy, momentum schedule, ...) without a word.
    """
    return convert(model, "sync", process_group=process_group)


def freeze(model: nn.Module) -> nn.Module:
    """``convert(model, "frozen")``: every batch norm becomes a ``FrozenBatchNorm*d`` (in place; returns model).

    As torchvision/detectron2 do for fine-tuning: statistics and affine become fixed buffers.
    """
    return convert(model, "frozen")
