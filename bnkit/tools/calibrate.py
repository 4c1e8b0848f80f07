"""Population statistics for batch norm: ``bnkit.calibrate`` (PreciseBN), exactly pooled.

Why this exists. The running statistics a BN layer keeps in training are an exponential moving
average of per-batch statistics measured while the weights were still moving, so they lag behind
the final weights; with large batches or short training (few updates) eval accuracy suffers
("Rethinking 'Batch' in BatchNorm", Wu & Johnson 2021). Recomputing the population statistics
with the final weights over ~10^4 samples fixes that. ``torch.optim.swa_utils.update_bn`` and
the first fvcore ``update_bn_stats`` do it by giving every batch the same weight whatever its size
and by averaging per-batch variances (which drops the between-batch term); they handle torch.nn
layers only, no distributed data, and measure every layer while all upstream layers still
normalize with batch statistics, which is not what eval will feed it.

``calibrate`` records, with a forward pre-hook, the input of every batch-norm layer (a call with
``mask=``/``lengths=`` through the layer's :meth:`~bnkit.BatchNormBase.register_moments_hook`, which
leaves the padding out) and keeps per-channel ``(count, mean, M2)`` merged with Chan's formula
(:class:`bnkit.stats.Moments`), so the result is exactly the statistics of the concatenation of every
activation the layer saw: ``running_mean`` is the pooled mean and ``running_var`` the pooled
*unbiased* variance, which is what ``torch.nn`` would store after one batch containing all the data
with ``momentum=1``.

Two modes:

* ``"precise"`` (PreciseBN): one pass; each layer's input is measured while every batch-norm
  layer normalizes with its batch statistics, as in training.
* ``"eval_consistent"``: a layer's input is measured while every upstream batch-norm layer
  already normalizes with its *new* population statistics (eval mode), i.e. on exactly the
  activations it will see in eval. The dependencies between layers are read from the autograd
  graph of the first pass; a layer's depth is 1 + the largest depth among the layers feeding it.
  Layers of the same depth are independent and share a pass, so the cost is one pass over the
  data per depth level (a plain chain of L layers: L passes; a ResNet: one per block boundary).
  The first pass also gives the depth-0 layers their statistics. Dependencies that bypass
  autograd (``detach``, ``no_grad`` blocks, integer routing) are not seen.

Choices, all deliberate:

* Every module other than the calibrated batch-norm layers runs in eval mode (dropout off), as at
  inference, whatever mode the model was in; every module's mode is restored afterwards, and so
  are bnkit freezes (``freeze_stats``) and every public attribute of a BN layer (momentum,
  ``track_running_stats``, ``last_train_batch_size``, ...); parameters and every other buffer are
  never touched. ``num_batches_tracked`` is left unchanged: it
  counts training updates (cumulative momentum and bnkit's momentum schedules read it) and
  calibration is not one.
* What is measured is what the layer normalizes: a bnkit layer's channel ``axis``, its ``mask=`` /
  ``lengths=`` (padding left out) and its ``variance`` kind (``"biased"`` layers store the biased one).
* A layer called several times in one forward (shared or reused) pools the inputs of all calls.
* A batch whose activations are non-finite in any calibrated layer is skipped for all layers, so
  every layer is calibrated on the same samples; it is counted in the report. In
  ``eval_consistent`` mode a batch skipped in one pass is left out of the later passes too.
* A batch that gives a layer a single value per channel (a last batch of one sample before a
  ``BatchNorm1d``) is left out of every layer's statistics, with a warning, and counted in the
  report. Its value would pool exactly into *that* layer, but the layer itself cannot normalize
  one value with batch statistics (torch raises; its variance is 0), so what every later layer
  would see from that batch is undefined. A batch of one sample with spatial positions has more
  than one value per channel and is pooled as any other.
* Limits: ``num_samples`` (if given) wins over ``num_batches``: batches are drawn until at least
  ``num_samples`` model inputs were drawn (the last batch is used whole). Otherwise at most
  ``num_batches`` batches are drawn; ``None`` for both uses the whole loader. Skipped batches count.
  A loader that runs out first warns and the data that came is used.
* Under ``torch.distributed`` every rank calibrates on its own shard and the per-layer
  ``(count, mean, M2)`` of all layers are exchanged in one stacked ``all_gather`` and merged in
  rank order with Chan's formula, so every rank ends with identical buffers. (An ``all_reduce`` of
  ``(count, sum, M2)`` would lose the between-rank term ``n_r (mean_r - mean)^2``, and one of
  ``(count, sum, sum of squares)`` cancels catastrophically when ``|mean| >> std``.)
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..nn import BatchNormBase
from ..stats import Moments
from .freezing import batch_norm_layers, check_initialized, frozen_stats

__all__ = ["calibrate", "CalibrationReport", "LayerCalibration", "MODES"]

MODES = ("precise", "eval_consistent")


@dataclass
class LayerCalibration:
    """What calibration did to one batch-norm layer.

    ``samples``: values per channel pooled into the statistics (N x spatial, over every call,
    batch and rank). ``mean_change``: largest ``|new_mean - old_mean| / sqrt(old_var + eps)`` over
    channels, the shift of the normalized activations in old standard deviations.
    ``var_change``: largest ``|new_var - old_var| / (old_var + eps)``. Both are ``None`` when the
    layer never ran and kept its statistics. ``level``: the pass that calibrated it (0 in precise mode).
    """

    name: str
    kind: str
    level: int
    samples: int
    mean_change: float | None
    var_change: float | None

    @property
    def updated(self) -> bool:
        return self.samples > 0


@dataclass
class CalibrationReport:
    """Returned by :func:`calibrate`. ``print(report)`` shows a table; ``rich.print(report)`` a rich one.

    ``batches``: batches whose activations entered the statistics (this rank). ``skipped_batches``:
    batches left out because some layer saw NaN/Inf. ``single_value_batches``: batches left out because
    they gave some layer one value per channel (see the module docstring). ``short_loader``: the loader
    ran out before ``num_samples``/``num_batches``. ``inputs``: model inputs drawn per pass on this rank (``None``
    when the batches have no tensor to count). ``passes``: passes over the data.
    """

    mode: str
    layers: list[LayerCalibration]
    batches: int
    skipped_batches: int
    short_loader: bool
    inputs: int | None
    passes: int
    single_value_batches: int = 0

    _COLUMNS = ("layer", "type", "level", "samples", "mean change (old std)", "var change (rel.)")

    def _title(self) -> str:
        return (f"bnkit.calibrate ({self.mode}): {self.batches} batches used, {self.skipped_batches} skipped "
                f"(non-finite), " + (f"{self.single_value_batches} left out (one value per channel), "
                                     if self.single_value_batches else "") + f"{self.passes} pass(es)"
                + (", loader shorter than asked" if self.short_loader else ""))

    def _rows(self) -> list[tuple[str, ...]]:
        def fmt(v):
            return "-" if v is None else f"{v:.3g}"

        return [(layer.name or "(model)", layer.kind, str(layer.level), str(layer.samples), fmt(layer.mean_change),
                 fmt(layer.var_change)) for layer in self.layers]

    def __rich__(self):
        from rich.table import Table

        table = Table(title=self._title())
        for col in self._COLUMNS:
            table.add_column(col, justify="left" if col in ("layer", "type") else "right")
        for row in self._rows():
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        try:
            from rich.console import Console
        except ImportError:  # rich comes with the demo extra; without it, the same table in plain text
            rows = [self._COLUMNS, *self._rows()]
            widths = [max(len(r[j]) for r in rows) for j in range(len(self._COLUMNS))]
            return "\n".join([self._title()] + ["  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                                                          for j, (c, w) in enumerate(zip(r, widths))).rstrip()
                                                for r in rows])
        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None).print(self.__rich__())
        return buf.getvalue().rstrip()


def _default_forward(model: nn.Module, batch: Any):
    """Tensor: ``model(batch)``; tuple/list: ``model(batch[0])``; dict: ``model(**batch)``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"calibrate: don't know how to feed a batch of type {type(batch).__name__} to the model; "
                    f"pass forward=lambda model, batch: model(...)")


def _count_inputs(batch: Any) -> int | None:
    """Samples in a batch: dimension 0 of its first tensor (depth first), ``None`` if it has none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = _count_inputs(item)
        if n is not None:
            return n
    return None


def _check_arguments(model, data, num_samples, num_batches, mode, forward) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"calibrate: mode must be one of {MODES}, got {mode!r}")
    for arg, value in (("num_samples", num_samples), ("num_batches", num_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"calibrate: {arg} must be a positive int or None, got {value!r}")
    check_initialized(model, "calibrate")
    if forward is not None and not callable(forward):
        raise TypeError(f"calibrate: forward must be a callable (model, batch) -> output, got {type(forward).__name__}")
    if mode == "eval_consistent" and torch.is_inference_mode_enabled():
        raise ValueError("calibrate: mode='eval_consistent' reads the layer dependencies from the autograd graph, "
                         "which torch.inference_mode() disables; call it outside inference_mode (it uses no_grad "
                         "itself)")
    if mode == "eval_consistent" and isinstance(data, Iterator):
        raise ValueError(f"calibrate: mode='eval_consistent' reads the data once per depth level, but data is a "
                         f"one-shot iterator ({type(data).__name__}); pass a DataLoader, list or other re-iterable")


class _Batches:
    """Draws batches from ``data`` up to the limit; records whether the loader ran out first."""

    def __init__(self, data: Iterable, num_samples: int | None, num_batches: int | None):
        self.data, self.num_samples, self.num_batches = data, num_samples, num_batches
        self.drawn, self.inputs, self.short = 0, 0, False

    def _done(self) -> bool:
        if self.num_samples is not None:
            return self.inputs >= self.num_samples
        return self.num_batches is not None and self.drawn >= self.num_batches

    def __iter__(self):
        it = iter(self.data)
        while not self._done():
            try:
                batch = next(it)
            except StopIteration:
                self.short = self.num_samples is not None or self.num_batches is not None
                return
            n = _count_inputs(batch)
            if n is None and self.num_samples is not None:
                raise TypeError(f"calibrate: num_samples={self.num_samples} needs batches holding a tensor to count "
                                f"samples in, got {type(batch).__name__}; use num_batches= instead")
            self.drawn += 1
            self.inputs = None if n is None or self.inputs is None else self.inputs + n
            yield self.drawn - 1, batch, n

    @property
    def total(self) -> int | None:
        if self.num_samples is not None:
            return self.num_samples
        if self.num_batches is not None:
            return self.num_batches
        return len(self.data) if hasattr(self.data, "__len__") else None


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _padding_given(args: tuple, kwargs: dict) -> bool:
    """Whether a call passes bnkit's ``mask=`` or ``lengths=`` (``forward(input, mask=None, lengths=None)``)."""
    extra = dict(zip(("mask", "lengths"), args[1:]), **kwargs)
    return extra.get("mask") is not None or extra.get("lengths") is not None


class _SingleValueBatch(Exception):
    """Raised by a capture hook, before the layer normalizes, for a batch that gives it one value per channel."""

    def __init__(self, layer: int, samples: int):
        super().__init__(layer, samples)
        self.layer, self.samples = layer, samples


class _Capture:
    """Adds each captured layer's input moments to the current batch; merged per batch.

    A forward pre-hook (torch's public API) measures the input of every call, with the channels on the
    layer's ``axis`` (bnkit; 1 for torch.nn). A call that passes ``mask=``/``lengths=`` (plain bnkit layers
    only) is measured instead by the layer's own :meth:`~bnkit.BatchNormBase.register_moments_hook`,
    registered for that call: the layer checks the padding and leaves it out itself. The moments hook is
    not used for every call because ghost layers refuse it and synchronized layers report the moments
    of all ranks, while calibrate merges each rank's own (see the module docstring).
    """

    def __init__(self, modules: list[nn.Module], indices: list[int], names: list[str]):
        self.names = names
        self.batch: dict[int, Moments] = {}
        self.total: dict[int, Moments] = {}
        self.handles = [modules[i].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in indices]
        self.per_call: list = []  # moments hooks of masked calls, removed when they fire (or by remove())

    def _add(self, i: int, m: Moments, values: int, samples: int) -> None:
        if values == 1:  # the layer cannot normalize it with batch statistics: see the module docstring
            raise _SingleValueBatch(i, samples)
        self.batch[i] = m if i not in self.batch else self.batch[i].merge(m)

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            x = _layer_input(args, kwargs)
            if _padding_given(args, kwargs) and isinstance(module, BatchNormBase):
                def observe(layer, moments):
                    handle.remove()
                    self._add(i, moments, int(moments.count[0]), x.shape[0])
                handle = module.register_moments_hook(observe)
                self.per_call.append(handle)
                return
            axis = getattr(module, "axis", 1)
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or not -x.dim() <= axis < x.dim():
                return  # the layer refuses this input itself, with a message naming it
            if x.shape[axis] != module.num_features and not isinstance(module, BatchNormBase):
                # bnkit layers say it themselves; torch's batch-statistics call names a weight size only
                raise ValueError(f"calibrate: layer {self.names[i]!r}, {type(module).__name__}({module.num_features}): "
                                 f"expected {module.num_features} channels in dimension 1, got {x.shape[axis]} "
                                 f"(input shape {tuple(x.shape)})")
            self._add(i, Moments.of(x.movedim(axis, 1)), x.numel() // max(x.shape[axis], 1), x.shape[0])
        return hook

    def end_batch(self) -> bool:
        """Merge the batch into the totals if every layer's moments are finite; return whether it was."""
        batch, self.batch = self.batch, {}
        finite = [torch.isfinite(m.mean).all() & torch.isfinite(m.m2).all() for m in batch.values()]
        if finite and not bool(torch.stack(finite).all()):
            return False
        for i, m in batch.items():
            self.total[i] = m if i not in self.total else self.total[i].merge(m)
        return True

    def remove(self) -> None:
        for h in self.handles + self.per_call:
            h.remove()


class _DependencyProbe:
    """Which calibrated layers feed each calibrated layer, read from the autograd graph of a forward.

    Each layer's output is replaced by ``leaf.clone()`` of a detached copy (same values; the clone,
    not the leaf, so an in-place ReLU that follows still works); the clone's grad_fn node marks the
    layer. A layer's input depends on the marked nodes reachable from its grad_fn.
    """

    def __init__(self, modules: list[nn.Module]):
        self.deps = [0] * len(modules)  # bitmask of the layers feeding layer i
        self.marks: dict[Any, int] = {}
        self.memo: dict[Any, int] = {}
        self.handles = []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post_hook(i)))

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            self.deps[i] |= self._upstream(_layer_input(args, kwargs).grad_fn)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            out = output.detach().requires_grad_().clone()
            self.marks[out.grad_fn] = 1 << i
            return out
        return hook

    def _upstream(self, root) -> int:
        # Iterative post-order walk (graphs of deep models exceed Python's recursion limit), memoized
        # over the whole forward so the total cost is one visit per autograd node.
        if root is None:
            return 0
        memo, marks = self.memo, self.marks
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            if node in marks:
                memo[node] = marks[node]
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if expanded:
                mask = 0
                for c in children:
                    mask |= memo[c]
                memo[node] = mask
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
        return memo[root]

    def end_batch(self) -> None:
        self.marks.clear()
        self.memo.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _merge_dependencies(deps: list[int], device) -> list[int]:
    """OR the dependency masks over ranks, so every rank computes the same levels (and pass count)."""
    if not _distributed():
        return deps
    n = len(deps)
    matrix = torch.tensor([[(d >> j) & 1 for j in range(n)] for d in deps], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(matrix, op=torch.distributed.ReduceOp.MAX)
    return [sum(1 << j for j in range(n) if matrix[i, j] > 0) for i in range(n)]


def _stores_unbiased(module: nn.Module) -> bool:
    """torch.nn stores the unbiased variance; a bnkit layer with ``variance="biased"`` the biased one."""
    return getattr(module, "variance", "unbiased") == "unbiased"


def _levels(deps: list[int], names: list[str]) -> list[int]:
    """Depth of each layer: 0 without upstream layers, else 1 + the deepest upstream layer."""
    n = len(deps)
    for i in range(n):
        if (deps[i] >> i) & 1:
            warnings.warn(f"calibrate: layer {names[i]!r} is applied to its own output; in mode='eval_consistent' "
                          f"its later calls are measured while its earlier calls normalize with batch statistics",
                          RuntimeWarning, stacklevel=3)
    upstream = [[j for j in range(n) if j != i and (deps[i] >> j) & 1] for i in range(n)]
    level: list[int | None] = [None] * n
    while None in level:
        ready = [i for i in range(n) if level[i] is None and all(level[j] is not None for j in upstream[i])]
        if not ready:  # a cycle through reused layers: break it at the first remaining layer
            i = level.index(None)
            cut = [names[j] for j in upstream[i] if level[j] is None]
            warnings.warn(f"calibrate: layers {[names[i]] + cut} feed each other (reused layers); ignoring the "
                          f"dependencies of {names[i]!r} on {cut} to order them", RuntimeWarning, stacklevel=3)
            upstream[i] = [j for j in upstream[i] if level[j] is not None]
            ready = [i]
        for i in ready:
            level[i] = 1 + max((level[j] for j in upstream[i]), default=-1)
    return level


def _all_merge(moments: list[Moments]) -> list[Moments]:
    """Merge per-layer moments over ranks: one stacked all_gather, Chan merges in rank order."""
    if not _distributed() or not moments:
        return moments
    flat = torch.cat([torch.stack([m.count, m.mean, m.m2]).double() for m in moments], dim=1)
    parts = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, flat)
    merged = Moments(*parts[0])
    for p in parts[1:]:
        merged = merged.merge(Moments(*p))
    # Kept in float64: a rank that never ran a layer holds float32 zeros, and casting back to each rank's
    # own dtype would round the ranks differently.
    sizes = [m.mean.numel() for m in moments]
    return [Moments(*chunk) for chunk in zip(*(torch.split(x, sizes) for x in (merged.count, merged.mean, merged.m2)))]


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    try:  # rich comes with the demo extra; without it calibration runs without a bar
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        enabled = False
    if not enabled:
        yield None
        return

    with Progress(console=Console(stderr=True)) as bar:
        yield bar


@contextlib.contextmanager
def _calibration_state(model: nn.Module, modules: list[nn.Module]):
    """Batch statistics without running updates in every BN layer, the rest in eval; all restored after.

    Running buffers are restored too if calibration fails part-way (eval_consistent writes between passes).
    """
    training = [(m, m.training) for m in model.modules()]
    # Public attributes of every BN layer (momentum, flags, bnkit's last_train_batch_size, ...) are put
    # back as they were, with setattr, whatever the layer's forward recorded during calibration.
    attributes = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for _, m in batch_norm_layers(model)]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in modules]
    try:
        with frozen_stats(model):
            for m, _ in training:
                m.training = False
            yield
    except BaseException:
        with torch.no_grad():
            for m, (mean, var) in zip(modules, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        raise
    finally:
        for m, flag in training:
            m.training = flag
        for m, attrs in attributes:
            for k, v in attrs.items():
                if getattr(m, k, None) is not v:
                    setattr(m, k, v)


def _read_pass(model: nn.Module, batches: _Batches, forward, capture: _Capture, probe: _DependencyProbe | None,
               skipped: set[int], single: dict[int, tuple[int, int]], bar, description: str) -> None:
    """One pass over the data: forward each batch, keep it or add its index to ``skipped`` (non-finite) or
    ``single`` (index -> (layer, samples): one value per channel); hooks removed after."""
    task = None if bar is None else bar.add_task(description, total=batches.total)
    try:
        for index, batch, n in batches:
            if index in skipped or index in single:
                continue
            try:
                with torch.enable_grad() if probe is not None else torch.no_grad():
                    forward(model, batch)
            except _SingleValueBatch as e:
                single[index] = (e.layer, e.samples)
                capture.batch.clear()
            else:
                if not capture.end_batch():
                    skipped.add(index)
            if probe is not None:
                probe.end_batch()
            if bar is not None:
                bar.advance(task, n if batches.num_samples is not None else 1)
    finally:
        capture.remove()
        if probe is not None:
            probe.remove()


def calibrate(model: nn.Module, data: Iterable, num_samples: int | None = None, num_batches: int | None = 200,
              mode: str = "precise", forward: Callable[[nn.Module, Any], Any] | None = None,
              progress: bool = True) -> CalibrationReport:
    r"""Recompute the population statistics of every batch-norm layer in ``model`` from ``data``.

    For each layer with running statistics (bnkit or ``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm),
    over all values :math:`x` of a channel in the layer's inputs (every sample, position, call,
    batch and rank, :math:`n` values in all):

    .. math:: \text{running\_mean} = \frac{1}{n}\sum x, \qquad
              \text{running\_var} = \frac{1}{n-1}\sum (x - \text{running\_mean})^2

    merged exactly and stably (Chan) from per-batch ``(count, mean, M2)``.

    Args:
        model: the network; its modes, freezes, parameters and other buffers are left as they were.
        data: an iterable of batches: tensors, tuples/lists (the first element is the input) or
            dicts (passed as keyword arguments); anything else with ``forward=``.
        num_samples: stop once this many samples (dimension 0 of the batch's first tensor) were
            drawn; takes precedence over ``num_batches``.
        num_batches: otherwise, stop after this many batches; ``None`` (with ``num_samples=None``)
            reads the whole loader.
        mode: ``"precise"`` (one pass, upstream layers normalize with batch statistics, as in
            training) or ``"eval_consistent"`` (one pass per depth level, upstream layers use their
            new population statistics, as in eval; needs a re-iterable ``data``).
        forward: ``forward(model, batch)`` runs the model on one batch, for custom calls
            (moving to a device, several inputs, ...).
        progress: show a rich progress bar on stderr; ``False`` prints nothing.

    Returns:
        A :class:`CalibrationReport` (per-layer samples and change of the statistics, batches used
        and skipped, whether the loader was short, passes).

    Raises:
        ValueError: no batch-norm layer with running statistics, a lazy module not initialized yet, a bad
            argument, or a one-shot iterator (or ``torch.inference_mode``) with ``mode="eval_consistent"``.
            Nothing is changed when it raises, also when the model's forward raises part-way.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> report = calibrate(model, [torch.randn(8, 3) for _ in range(5)], num_batches=None, progress=False)
    >>> report.batches, report.layers[0].samples
    (5, 40)
    """
    _check_arguments(model, data, num_samples, num_batches, mode, forward)
    named = [(name, m) for name, m in batch_norm_layers(model)
             if m.running_mean is not None and m.running_var is not None]
    if not named:
        raise ValueError(f"calibrate: {type(model).__name__} has no batch-norm layer with running statistics "
                         f"(bnkit or torch.nn BatchNorm*d / SyncBatchNorm with track_running_stats=True); "
                         f"nothing to calibrate")
    names, modules = [n for n, _ in named], [m for _, m in named]
    forward = forward or _default_forward
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in modules]
    results: dict[int, Moments] = {}
    level = [0] * len(modules)
    skipped: set[int] = set()
    single: dict[int, tuple[int, int]] = {}
    overflow: dict[int, Moments] = {}  # layers whose statistics do not fit their buffers' dtype

    with _calibration_state(model, modules), _progress_bar(progress) as bar:
        passes, depth, first = 1, 0, None
        while depth < passes:
            # Pass 0 measures every layer (and, in eval_consistent mode, finds the levels); pass d > 0
            # re-measures level d with levels < d normalizing with their new statistics.
            probe = _DependencyProbe(modules) if mode == "eval_consistent" and depth == 0 else None
            captured = [i for i in range(len(modules)) if depth == 0 or level[i] == depth]
            for i, m in enumerate(modules):
                m.training = level[i] >= depth
            batches = _Batches(data, num_samples, num_batches)
            capture = _Capture(modules, captured, names)
            _read_pass(model, batches, forward, capture, probe, skipped, single, bar,
                       "calibrate" if mode == "precise" else f"calibrate level {depth}")
            if first is None:
                first = batches
                if single and len(single) + len(skipped) == batches.drawn:
                    raise ValueError(f"calibrate: every batch gave some layer a single value per channel (layer "
                                     f"{names[next(iter(single.values()))[0]]!r}); batch statistics need more "
                                     f"than 1 value per channel: pass larger batches")
                if single:
                    index, (layer, samples) = next(iter(single.items()))
                    warnings.warn(f"calibrate: {len(single)} batch(es) gave a layer a single value per channel "
                                  f"(batch {index}: {samples} sample(s), layer {names[layer]!r}); batch statistics "
                                  f"of one value are undefined, so these batches are left out of every layer's "
                                  f"statistics. DataLoader(..., drop_last=True) avoids them", RuntimeWarning,
                                  stacklevel=2)
                if batches.short:
                    limit = f"num_samples={num_samples}" if num_samples is not None else f"num_batches={num_batches}"
                    warnings.warn(f"calibrate: the loader ran out after {batches.drawn} batches, before {limit}; "
                                  f"calibrated on what came", RuntimeWarning, stacklevel=2)
            if probe is not None:
                level = _levels(_merge_dependencies(probe.deps, modules[0].running_mean.device), names)
                passes = max(level) + 1
            done = [i for i in captured if level[i] == depth]
            merged = _all_merge([capture.total.get(i, Moments.zeros(modules[i].num_features,
                                                                   device=modules[i].running_mean.device))
                                 for i in done])
            with torch.no_grad():
                for i, m in zip(done, merged):
                    if m.count[0] > 0:
                        layer = modules[i]
                        mean = m.mean.to(layer.running_mean.dtype)
                        var = m.var(unbiased=_stores_unbiased(layer)).to(layer.running_var.dtype)
                        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                            overflow[i] = m  # beyond the buffers' dtype (float16: 65504): inf would be stored
                            continue
                        results[i] = m
                        layer.running_mean.copy_(mean)
                        layer.running_var.copy_(var)
            depth += 1

    if overflow:
        i, m = next(iter(overflow.items()))
        big = torch.maximum(m.mean.abs(), m.var(unbiased=_stores_unbiased(modules[i])))
        c = int(big.argmax())
        warnings.warn(f"calibrate: the population statistics of layer(s) {[names[j] for j in overflow]} do not fit "
                      f"their buffers' dtype (layer {names[i]!r}, {modules[i].running_var.dtype}: channel {c} has "
                      f"mean {float(m.mean[c]):.4g}, variance {float(big[c]):.4g}); storing them would make the running "
                      f"statistics inf, so they are unchanged. Keep batch-norm layers in float32 to calibrate them",
                      RuntimeWarning, stacklevel=2)
    never = [names[i] for i in range(len(modules)) if i not in results and i not in overflow]
    if never:
        warnings.warn(f"calibrate: layer(s) {never} never ran on the data; their running statistics are unchanged",
                      RuntimeWarning, stacklevel=2)
    return CalibrationReport(
        mode=mode, layers=[_layer_report(names[i], modules[i], level[i], results.get(i), *old[i])
                           for i in range(len(modules))],
        batches=first.drawn - len(skipped) - len(single), skipped_batches=len(skipped), short_loader=first.short,
        inputs=first.inputs, passes=passes, single_value_batches=len(single))


def _layer_report(name: str, module: nn.Module, level: int, moments: Moments | None,
                  old_mean: torch.Tensor, old_var: torch.Tensor) -> LayerCalibration:
    if moments is None:
        return LayerCalibration(name, type(module).__name__, level, 0, None, None)
    old_mean, old_var = old_mean.to(moments.mean.dtype), old_var.to(moments.mean.dtype)
    mean_change = ((moments.mean - old_mean).abs() / torch.sqrt(old_var + module.eps)).max().item()
    new_var = moments.var(unbiased=_stores_unbiased(module))
    var_change = ((new_var - old_var).abs() / (old_var + module.eps)).max().item()
    return LayerCalibration(name, type(module).__name__, level, int(moments.count[0].item()), mean_change, var_change)
