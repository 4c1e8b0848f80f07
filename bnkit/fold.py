"""Fold batch norm into the preceding convolution or linear layer, for inference.

In eval, batch norm is a per-channel affine map of its input ``z``:

.. math:: \\mathrm{BN}(z) = z \\cdot s + (\\beta - \\mu s), \\qquad s = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}

with the running statistics ``mu = running_mean``, ``sigma^2 = running_var``. When ``z`` is the
output of a convolution or linear layer ``z = W * x + b``, the map folds into that layer:
``W' = W s`` (per output channel) and ``b' = (b - mu) s + beta``; the batch-norm layer becomes
``nn.Identity`` (or, for a bnkit layer with a fused activation, that activation as its own module).
The arithmetic runs in float64 and is stored in the layer's dtype.

Which pairs fold is found in one of two ways:

* ``torch.fx`` (preferred): the model is traced symbolically (batch-norm, conv and linear layers
  are leaves). A batch-norm call folds when its only input is a conv/linear call whose output has
  no other user, and each of the two modules is called exactly once. The graph is only used for
  this analysis: the model keeps its class and structure, only the two modules change.
* ``nn.Sequential`` chains, when the model cannot be traced: a batch-norm layer folds when the
  element before it (the last leaf of a nested ``Sequential`` counts) is a conv/linear layer.

Everything that does not fold is reported with the reason, never silently skipped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .freezing import batch_norm_layers

__all__ = ["fold", "FoldReport", "FoldedPair", "NotFolded"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _CONV + _CONV_T + (nn.Linear,)


@dataclass
class FoldedPair:
    """One batch-norm layer folded into ``into``; ``replaced_by`` is what now stands in its place."""

    bn: str
    into: str
    into_type: str
    replaced_by: str
    note: str = ""


@dataclass
class NotFolded:
    """A batch-norm layer left in place, and why."""

    bn: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold` did. ``method`` is ``"fx"`` or ``"sequential"`` (see the module docstring)."""

    method: str
    folded: list[FoldedPair] = field(default_factory=list)
    not_folded: list[NotFolded] = field(default_factory=list)
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fold ({self.method}): {len(self.folded)} folded, {len(self.not_folded)} not folded"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model ({self.trace_error}); used nn.Sequential chains")
        lines += [f"  folded {p.bn} into {p.into} ({p.into_type}) -> {p.replaced_by}" + (f"; {p.note}" if p.note else "")
                  for p in self.folded]
        lines += [f"  NOT folded {n.bn}: {n.reason}" for n in self.not_folded]
        return "\n".join(lines)


class _LeafTracer(torch.fx.Tracer):
    """Keeps batch-norm layers (bnkit's live outside ``torch.nn``) and conv/linear layers opaque."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm,) + _FOLDABLE) or super().is_leaf_module(m, qualname)


def _fx_candidates(model: nn.Module) -> dict[str, str | NotFolded]:
    """``bn name -> producer name`` for foldable pairs, or ``NotFolded`` with the reason. Raises if untraceable."""
    graph = _LeafTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out: dict[str, str | NotFolded] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _BatchNorm):
            continue
        bn = node.target
        src = node.args[0] if node.args else None
        producer = src.target if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if calls[bn] > 1:
            out[bn] = NotFolded(bn, f"the layer is called {calls[bn]} times in forward; folding would change every call")
        elif len(node.args) != 1 or node.kwargs:
            out[bn] = NotFolded(bn, "called with extra arguments")
        elif producer is None or not isinstance(model.get_submodule(producer), _FOLDABLE):
            what = f"'{src.target}' ({src.op})" if isinstance(src, torch.fx.Node) else repr(src)
            out[bn] = NotFolded(bn, f"its input comes from {what}, not from a conv/linear layer")
        elif len(src.users) > 1:
            others = sorted(u.name for u in src.users if u is not node)
            out[bn] = NotFolded(bn, f"the output of {producer} is also used by {others}; folding would change it there")
        elif calls[producer] > 1:
            out[bn] = NotFolded(bn, f"{producer} is called {calls[producer]} times in forward")
        else:
            out[bn] = producer
    return out


def _edge_leaf(module: nn.Module, name: str, last: bool) -> tuple[str, nn.Module]:
    """The first (or last) non-Sequential module that an element of a Sequential chain starts (ends) with."""
    while type(module).forward is nn.Sequential.forward and len(module) > 0:
        key = list(module._modules)[-1 if last else 0]
        module, name = module._modules[key], f"{name}.{key}"
    return name, module


def _sequential_candidates(model: nn.Module) -> dict[str, str]:
    """``bn name -> producer name`` for every batch-norm layer right after a conv/linear in a Sequential chain."""
    out: dict[str, str] = {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        items = [(f"{seq_name}.{k}" if seq_name else k, m) for k, m in seq._modules.items() if m is not None]
        for (a_name, a), (b_name, b) in zip(items, items[1:]):
            p_name, producer = _edge_leaf(a, a_name, last=True)
            c_name, consumer = _edge_leaf(b, b_name, last=False)
            if isinstance(consumer, _BatchNorm) and isinstance(producer, _FOLDABLE):
                out[c_name] = p_name
    return out


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _why_not_foldable(bn: _BatchNorm, layer: nn.Module, producer: str) -> str | None:
    if bn.running_mean is None or bn.running_var is None:
        return ("it has no running statistics (track_running_stats=False): it normalizes with batch statistics "
                "even in eval, which no fixed weight can reproduce")
    if torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        return f"the weight of {producer} is parametrized (e.g. weight/spectral norm); remove the parametrization first"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{producer} is a lazy layer that has not been initialized; run one forward first"
    if _out_channels(layer) != bn.num_features:
        return f"{producer} has {_out_channels(layer)} output channels but the layer normalizes {bn.num_features}"
    if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
        return "its running statistics contain NaN/Inf"
    return None


def _activation_module(bn: _BatchNorm) -> nn.Module:
    """What replaces the folded layer: Identity, or the activation a bnkit layer applied after its affine."""
    activation = getattr(bn, "activation", "identity")
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(bn.negative_slope)
    if activation == "silu":
        return nn.SiLU()
    return nn.Identity()


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """Rewrite ``layer``'s weight and bias so that ``layer(x)`` equals ``bn.eval()(layer(x))`` before the call."""
    w = layer.weight
    f64 = dict(dtype=torch.float64, device=w.device)
    scale = torch.rsqrt(bn.running_var.to(**f64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(**f64)
    shift = -bn.running_mean.to(**f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(**f64)
    w64 = w.to(torch.float64)
    if isinstance(layer, _CONV_T):
        # ConvTranspose weights are (in, out/groups, *k): output channel g*(out/groups)+j lives in
        # column j of the rows of group g, so scale a (groups, in/groups, out/groups, *k) view.
        g = layer.groups
        view = w64.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (view * s).reshape(w.shape)
    else:  # Conv and Linear: (out, ...)
        new_w = w64 * scale.reshape(-1, *([1] * (w.dim() - 1)))
    old_b = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(scale)
    new_b = old_b * scale + shift
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def fold(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every batch-norm layer that follows a conv/linear layer into it, for inference.

    Works on bnkit and ``torch.nn`` batch-norm layers after ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``
    (any ``groups``, ``dilation``, ``stride``, ``padding``, with or without bias) and ``Linear``.
    The folded model's eval output equals the unfolded model's eval output (float rounding only);
    folding always uses the running statistics, i.e. eval behaviour, whatever the layer's mode.

    Args:
        model: any module; torch.fx-traceable models and ``nn.Sequential`` chains (nested too).
        inplace: ``False`` (default) folds a deep copy and leaves ``model`` untouched; ``True``
            changes ``model`` itself (and returns it).

    Returns:
        ``(folded_model, report)``: the model keeps its class (folded layers become ``nn.Identity``
        or, for a bnkit layer with ``activation=``, that activation module), and a
        :class:`FoldReport` listing each fold and each layer that was not folded with the reason.

    Caveat: a ``Linear`` followed by ``BatchNorm1d`` folds per output feature, which is what the pair
    computes for ``(N, features)`` input; for ``(N, L, features)`` input batch norm normalizes dimension
    1 (L), so such a pair is not batch norm over the Linear's features and must not be folded.

    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded, report = fold(m)
    >>> folded[1], len(report.folded)
    (Identity(), 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = batch_norm_layers(model)
    try:
        candidates = _fx_candidates(model)
        report = FoldReport("fx")
    except Exception as e:  # any tracing failure (data-dependent control flow, unsupported ops)
        candidates = _sequential_candidates(model)
        first_line = (str(e).strip().splitlines() or [""])[0]
        report = FoldReport("sequential", trace_error=f"{type(e).__name__}: {first_line[:200]}")
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for name, bn in layers:
        found = candidates.get(name)
        if found is None:
            reason = ("it is not called in forward" if report.method == "fx" else
                      "it does not directly follow a conv/linear layer in an nn.Sequential chain "
                      "(and the model could not be traced with torch.fx)")
            report.not_folded.append(NotFolded(name, reason))
            continue
        if isinstance(found, NotFolded):
            report.not_folded.append(found)
            continue
        layer = model.get_submodule(found)
        shared = [n for n, m in ((name, bn), (found, layer)) if uses[id(m)] > 1]
        reason = (f"{shared[0]} is shared (registered {uses[id(model.get_submodule(shared[0]))]} times in the model)"
                  if shared else _why_not_foldable(bn, layer, found))
        if reason:
            report.not_folded.append(NotFolded(name, reason))
            continue
        _fold_into(layer, bn)
        replacement = _activation_module(bn)
        _replace(model, name, replacement)
        note = "was in training mode; folded with its running statistics (eval behaviour)" if bn.training else ""
        report.folded.append(FoldedPair(name, found, type(layer).__name__, type(replacement).__name__, note))
    return model, report
