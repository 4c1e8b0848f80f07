"""Stop running-statistic updates while gamma/beta (and everything else) keep training.

``requires_grad=False`` does not stop batch norm's running statistics, and ``model.train()``
undoes a ``bn.eval()``. A freeze here is a property of the layer, not of its train/eval mode, so
it survives ``model.train()`` until :func:`unfreeze_stats`. It works on bnkit layers (the
``stats_frozen`` attribute) and on ``torch.nn`` batch-norm layers (through forward hooks that
switch the layer for the duration of one call).

``use_running=False`` (default): training-mode layers still normalize with the batch statistics.
``use_running=True``: they normalize with the running statistics, as in eval, while gradients
still flow to gamma, beta and the input.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..nn.batchnorm import BatchNormBase

__all__ = ["freeze_stats", "unfreeze_stats", "frozen_stats", "stats_frozen_mode", "set_stats_frozen_mode",
           "batch_norm_layers", "check_initialized", "freeze_hook_ids"]

_HOOKS = "_bnkit_freeze_hooks"
_MODE = "_bnkit_stats_frozen"


def batch_norm_layers(model: torch.nn.Module):
    """``(qualified_name, module)`` for every batch-norm layer (bnkit or torch.nn) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def check_initialized(model: torch.nn.Module, tool: str) -> None:
    """Raise a ValueError naming every lazy module of ``model`` not initialized yet: its tensors have no
    shape, so the tools can neither copy nor read them (torch's own error names no module)."""
    lazy = [f"{n or '(model)'!r} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"{tool}: lazy module(s) {', '.join(lazy)} not initialized yet (a lazy module reads its "
                         f"sizes from its first input); run one forward pass or load a state_dict first")


def _torch_pre_hook(module, args):
    saved = (module.training, module.track_running_stats)
    object.__setattr__(module, "_bnkit_saved_flags", saved)
    if getattr(module, _MODE) == "running" and module.running_mean is not None:
        module.training = False
    else:
        module.track_running_stats = False  # torch: batch statistics, no update, no count


def _torch_post_hook(module, args, output):
    module.training, module.track_running_stats = module._bnkit_saved_flags


def freeze_hook_ids(module: torch.nn.Module) -> set[int]:
    """Ids of the forward hooks :func:`set_stats_frozen_mode` registered on a ``torch.nn`` layer."""
    return {handle.id for handle in getattr(module, _HOOKS, ())}


def stats_frozen_mode(module: torch.nn.Module):
    """``None`` if the layer's statistics are live, else ``"batch"`` or ``"running"``."""
    if isinstance(module, BatchNormBase):
        return module.stats_frozen
    return getattr(module, _MODE, None)


def set_stats_frozen_mode(module: _BatchNorm, mode) -> None:
    """Set one layer's freeze state, the counterpart of :func:`stats_frozen_mode`: ``None`` (live),
    ``"batch"`` or ``"running"``; bnkit layers through ``stats_frozen``, torch.nn layers through hooks."""
    if mode not in (None, "batch", "running"):
        raise ValueError(f"set_stats_frozen_mode: mode must be None, 'batch' or 'running', got {mode!r}")
    if isinstance(module, BatchNormBase):
        module.stats_frozen = mode
        return
    for handle in getattr(module, _HOOKS, ()):
        handle.remove()
    if mode is None:
        for attr in (_HOOKS, _MODE):
            if hasattr(module, attr):
                delattr(module, attr)
        return
    setattr(module, _MODE, mode)
    setattr(module, _HOOKS, (module.register_forward_pre_hook(_torch_pre_hook),
                             module.register_forward_hook(_torch_post_hook, always_call=True)))


def freeze_stats(model: torch.nn.Module, use_running: bool = False) -> torch.nn.Module:
    """Freeze the running statistics of every batch-norm layer in ``model`` (the model itself may be one).

    Returns ``model``. Raises if the model has no batch-norm layer.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"freeze_stats: {type(model).__name__} has no batch-norm layer")
    for _, m in layers:
        set_stats_frozen_mode(m, "running" if use_running else "batch")
    return model


def unfreeze_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`freeze_stats`: running statistics update again in training mode."""
    for _, m in batch_norm_layers(model):
        set_stats_frozen_mode(m, None)
    return model


@contextlib.contextmanager
def frozen_stats(model: torch.nn.Module, use_running: bool = False):
    """``with frozen_stats(model):`` freezes, then restores each layer's previous freeze state."""
    layers = batch_norm_layers(model)
    previous = [stats_frozen_mode(m) for _, m in layers]
    freeze_stats(model, use_running)
    try:
        yield model
    finally:
        for (_, m), mode in zip(layers, previous):
            set_stats_frozen_mode(m, mode)
