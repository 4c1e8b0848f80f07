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

A pair folds only when the batch-norm layer's eval is exactly that affine map over the producer's
channels: :func:`eval_affine` (``layer.eval_affine()`` for bnkit layers) gives the map, or ``None``
when there is none (no running statistics, ``example_weight``); a bnkit layer must normalize the
producer's channel dimension (``axis``). bnkit's ``FrozenBatchNorm*d`` fold like batch norm.

Everything that does not fold is reported with the reason, never silently skipped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.domain import DomainBatchNorm
from ..nn.frozen import FrozenBatchNorm
from ..ops import activation_module, eval_scale_shift
from .freezing import check_initialized, freeze_hook_ids

__all__ = ["fold", "eval_affine", "FoldReport", "FoldedPair", "NotFolded"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _CONV + _CONV_T + (nn.Linear,)
_NORM = (_BatchNorm, FrozenBatchNorm)


def eval_affine(layer: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``layer.eval_affine(dtype)`` of a bnkit layer, the same map for a ``torch.nn`` batch-norm layer.

    ``(scale, shift)`` of shape ``(C,)`` with eval output ``act(x * scale + shift)`` per channel, or
    ``None`` when eval is not such a map (a torch layer without running statistics, or a lazy one not
    initialized yet).
    """
    if hasattr(layer, "eval_affine"):
        return layer.eval_affine(dtype)
    if layer.running_mean is None or layer.running_var is None \
            or isinstance(layer.running_mean, nn.parameter.UninitializedBuffer):
        return None
    return eval_scale_shift(layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps, dtype)


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Batch-norm layers (bnkit, ``torch.nn``) and bnkit's FrozenBatchNorm layers of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NORM)]


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
        return isinstance(m, _NORM + _FOLDABLE) or super().is_leaf_module(m, qualname)


def _fx_candidates(model: nn.Module) -> dict[str, str | NotFolded]:
    """``bn name -> producer name`` for foldable pairs, or ``NotFolded`` with the reason. Raises if untraceable.

    Traced in eval mode (the modes are restored after): the folded model is for inference, and a forward
    that branches on ``self.training`` may use a conv's output elsewhere only in eval."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        graph = _LeafTracer().trace(model.eval())
    finally:
        for m, training in modes:
            m.training = training
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out: dict[str, str | NotFolded] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _NORM):
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
            if isinstance(consumer, _NORM) and isinstance(producer, _FOLDABLE):
                out[c_name] = p_name
    return out


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _wrong_axis_reason(bn: nn.Module, layer: nn.Module, producer: str) -> str | None:
    """Why ``bn`` does not normalize the producer's output channels, or None when it does."""
    axis = getattr(bn, "axis", 1)  # bnkit layers may normalize another dimension; the rest use dimension 1
    if isinstance(layer, nn.Linear):
        # (N, features): dimension 1 is the last; axis=-1 is the last whatever the rank (see fold's caveat)
        if axis in (1, -1):
            return None
        where = "the last dimension"
    else:
        ndim = layer.weight.dim()  # a conv's output has as many dimensions as its weight: (N, C, *spatial)
        if axis in (1, 1 - ndim):
            return None
        where = "dimension 1"
    return (f"it normalizes axis={axis}, but the output channels of {producer} ({type(layer).__name__}) are "
            f"{where} of its output; the conv/linear weight cannot scale that dimension")


def not_affine_reason(bn: nn.Module) -> str:
    """Why ``eval_affine(bn)`` is None, in words (fold and to_keras report it)."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return ("it has no running statistics (track_running_stats=False): it normalizes with batch statistics "
                "even in eval, which no fixed weight can reproduce")
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "it is a lazy layer that has not been initialized; run one forward first"
    if getattr(bn, "example_weight", None) is not None:
        return (f"example_weight={bn.example_weight!r}: eval mixes each example's own statistics into the "
                f"running ones, which no fixed weight can reproduce")
    return "its eval output is not a fixed per-channel affine map (eval_affine() is None)"


def _fold_map(bn: nn.Module, layer: nn.Module, producer: str) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The float64 ``(scale, shift)`` to fold into ``layer``, or the reason it cannot be folded exactly."""
    if torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        return f"the weight of {producer} is parametrized (e.g. weight/spectral norm); remove the parametrization first"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{producer} is a lazy layer that has not been initialized; run one forward first"
    affine = eval_affine(bn, torch.float64)
    if affine is None:
        return not_affine_reason(bn)
    wrong_axis = _wrong_axis_reason(bn, layer, producer)
    if wrong_axis:
        return wrong_axis
    if _out_channels(layer) != bn.num_features:
        return f"{producer} has {_out_channels(layer)} output channels but the layer normalizes {bn.num_features}"
    if not (torch.isfinite(affine[0]).all() and torch.isfinite(affine[1]).all()):
        return "its running statistics or affine parameters contain NaN/Inf"
    return affine


@torch.no_grad()
def _fold_into(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Rewrite ``layer``'s weight and bias so that ``layer(x)`` equals ``layer(x) * scale + shift`` (per output
    channel) before the call; ``scale``, ``shift`` in float64."""
    w = layer.weight
    scale, shift = scale.to(w.device), shift.to(w.device)
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


def _has_forward_hooks(m: nn.Module) -> bool:
    """Forward (pre-)hooks other than bnkit's freeze hooks (which do not change eval): torch.fx does not see them."""
    own = freeze_hook_ids(m)
    return any(k not in own for hooks in (m._forward_pre_hooks, m._forward_hooks) for k in hooks)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def fold(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every batch-norm layer that follows a conv/linear layer into it, for inference.

    Works on bnkit and ``torch.nn`` batch-norm layers and bnkit's ``FrozenBatchNorm*d`` after
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any ``groups``, ``dilation``, ``stride``, ``padding``,
    with or without bias) and ``Linear``. The folded model's eval output equals the unfolded model's
    eval output (float rounding only); folding always uses the running statistics, i.e. eval
    behaviour, whatever the layer's mode. A layer whose eval is not a fixed per-channel affine map
    (:func:`eval_affine` is ``None``: no running statistics, ``example_weight``), or that normalizes
    another dimension than the producer's channels (a bnkit ``axis``), is left in place and reported.

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
    check_initialized(model, "fold")
    if not inplace:
        model = copy.deepcopy(model)
    layers = _norm_layers(model)
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
    # A weight or bias tied to another module (the same Parameter registered twice) changes there too.
    param_names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(pname)
    # The layers of a DomainBatchNorm share their input: a trace (under use_domain) sees only one of them.
    domain_of = {id(b): dn_name for dn_name, dn in model.named_modules() if isinstance(dn, DomainBatchNorm)
                 for b in dn.modules() if b is not dn}
    for name, bn in layers:
        if id(bn) in domain_of:
            report.not_folded.append(NotFolded(name, f"it is one domain's layer of {domain_of[id(bn)]!r} "
                                                     f"(DomainBatchNorm): the other domains normalize the same input, "
                                                     f"which folding would change"))
            continue
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
        tied = [n for t in (layer.weight, layer.bias) if t is not None
                for n in param_names.get(id(t), ()) if n.rpartition(".")[0] != found]
        hooked = [n for n, m in ((found, layer), (name, bn)) if _has_forward_hooks(m)]
        if shared:
            folding = f"{shared[0]} is shared (registered {uses[id(model.get_submodule(shared[0]))]} times in the model)"
        elif tied:
            folding = f"a parameter of {found} is tied to {tied}; folding would change it there"
        elif hooked:
            folding = (f"{hooked[0]} has forward hooks, which would see the folded values (or be dropped with the "
                       f"batch-norm layer); remove them first")
        else:
            folding = _fold_map(bn, layer, found)
        if isinstance(folding, str):  # the reason it cannot fold exactly
            report.not_folded.append(NotFolded(name, folding))
            continue
        _fold_into(layer, *folding)
        # what replaces the folded layer: Identity, or the activation a bnkit layer applied after its affine
        replacement = activation_module(getattr(bn, "activation", "identity"), getattr(bn, "negative_slope", 0.01))
        _replace(model, name, replacement)
        note = ("was in training mode; folded with its running statistics (eval behaviour)"
                if bn.training and isinstance(bn, _BatchNorm) else "")
        report.folded.append(FoldedPair(name, found, type(layer).__name__, type(replacement).__name__, note))
    return model, report
