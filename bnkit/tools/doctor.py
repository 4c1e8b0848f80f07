"""Diagnose the batch-norm layers of a trained model on real data, and say how to fix what is wrong.

``bnkit.doctor(model, data)`` measures, for every batch-norm layer (bnkit or ``torch.nn``):

* **EMA vs population statistics.** The running statistics are an exponential moving average taken
  while the weights moved; the population statistics are those of the data under the final weights
  (measured with :func:`bnkit.calibrate`, PreciseBN, on a copy of the model). Errors:
  ``mean_error = max_c |mu_ema - mu_pop| / sqrt(var_pop + eps)`` (a shift in units of the channel's
  std) and ``var_error = max_c |var_ema - var_pop| / (var_pop + eps)`` (relative).
* **Train vs eval discrepancy.** On one probe batch, the layer itself is called on the input it gets
  in training mode, once in training mode (batch statistics; its statistics frozen, so nothing is
  updated) and once in eval mode (running statistics): ``rms(y_train - y_eval) / rms(y_train)`` of
  its outputs, so its channel ``axis``, activation and ghost/renormalized statistics count.
  The same ratio for the model output (batch-norm layers in training mode, every other module in eval,
  so dropout does not count) is in ``report.summary``.
* **Collapsed channels**: population variance ~ 0 (a dead ReLU or pruned filter upstream); eval then
  divides by ``sqrt(eps)``.
* **Too few updates for the momentum**: after ``n`` updates at momentum ``m`` the running statistics
  still hold ``(1 - m) ** n`` of their initial value (mean 0, variance 1); when that share alone
  explains a stale-statistics error, the finding names it (30 updates at 0.01: 74 %).
* **Configuration**: a momentum >= :data:`bnkit.stats.momentum.KERAS_LOOKALIKE_THRESHOLD` (a Keras
  decay such as 0.99 passed as torch momentum), layers
  left in training mode, layers without running statistics, batches that give one value per channel
  (training raises) or very few (noisy statistics), a DataLoader whose last batch has one sample.

Each problem becomes a :class:`Finding` with a concrete fix. ``print(report)`` / ``report.print()``
shows rich tables; ``report.save(dir)`` writes ``index.html``, ``report.json`` and PNG plots.
The model passed in is never changed: every measurement runs on copies.
"""
from __future__ import annotations

import copy
import html
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..stats.momentum import KERAS_LOOKALIKE_THRESHOLD, convert
from .fold import eval_affine
from .freezing import batch_norm_layers, check_initialized, frozen_stats, stats_frozen_mode

__all__ = ["doctor", "DoctorReport", "LayerDiagnosis", "Finding", "THRESHOLDS"]

#: When a measurement becomes a finding. Errors are ratios (0.1 = 10 %).
THRESHOLDS = {
    "stats_error": 0.1,          # mean_error or var_error above this: stale EMA statistics
    "train_eval_gap": 0.1,       # per-layer rms(y_train - y_eval) / rms(y_train)
    "collapsed_relative_var": 1e-6,  # channel var below this times the layer's median var
    "few_values": 16,            # values per channel per batch below this: noisy batch statistics
}

SEVERITIES = ("error", "warning", "info")

MODEL = "(model)"


@dataclass
class Finding:
    """One problem: where (a layer name or ``"(model)"``), how bad, what, and the fix."""

    layer: str
    severity: str
    problem: str
    fix: str


@dataclass
class LayerDiagnosis:
    """Measurements of one batch-norm layer; ``None`` where a measurement does not apply."""

    name: str
    kind: str
    channels: int
    momentum: float | None
    training: bool
    has_running_stats: bool
    mean_error: float | None = None
    var_error: float | None = None
    train_eval_gap: float | None = None
    collapsed_channels: list[int] = field(default_factory=list)
    min_values_per_channel: int | None = None
    ema_mean: list[float] | None = None
    ema_var: list[float] | None = None
    population_mean: list[float] | None = None
    population_var: list[float] | None = None


@dataclass
class DoctorReport:
    """What :func:`doctor` found. ``summary`` holds model-level numbers (output gaps, batches, samples)."""

    layers: list[LayerDiagnosis]
    findings: list[Finding]
    summary: dict

    @property
    def ok(self) -> bool:
        """No error or warning finding."""
        return all(f.severity == "info" for f in self.findings)

    def findings_for(self, layer: str) -> list[Finding]:
        return [f for f in self.findings if f.layer == layer]

    # ---- terminal ----
    def tables(self):
        """``(layers_table, findings_table)`` as rich Tables."""
        Table = _need("rich.table", "printing").Table

        t = Table(title="batch-norm layers", title_justify="left")
        for col in ("layer", "type", "C", "momentum", "mode", "mean err", "var err", "train/eval gap",
                    "collapsed", "min values/ch"):
            t.add_column(col, justify="left" if col in ("layer", "type", "mode") else "right")
        for d in self.layers:
            t.add_row(d.name, d.kind, str(d.channels), _fmt(d.momentum), "train" if d.training else "eval",
                      _pct(d.mean_error), _pct(d.var_error), _pct(d.train_eval_gap),
                      str(len(d.collapsed_channels)), _fmt(d.min_values_per_channel))
        f = Table(title="findings", title_justify="left", show_lines=True)
        for col in ("severity", "layer", "problem", "fix"):
            f.add_column(col, overflow="fold")
        colour = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        for x in sorted(self.findings, key=lambda x: SEVERITIES.index(x.severity)):
            f.add_row(f"[{colour[x.severity]}]{x.severity}[/]", x.layer, x.problem, x.fix)
        return t, f

    def print(self, console=None) -> None:
        console = console or _need("rich.console", "printing").Console()
        layers, findings = self.tables()
        console.print(layers)
        console.print(_summary_line(self.summary))
        if self.findings:
            console.print(findings)
        else:
            console.print("[green]no findings: the batch-norm layers look healthy on this data[/]")

    def __str__(self) -> str:
        console = _need("rich.console", "printing").Console(width=120, force_terminal=False, no_color=True)  # plain text
        with console.capture() as cap:
            self.print(console)
        return cap.get()

    # ---- files ----
    def save(self, directory) -> Path:
        """Write ``index.html``, ``report.json``, ``layer_errors.png`` and ``ema_vs_population.png``
        into ``directory`` (created if missing; files in it with these names are replaced)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"summary": self.summary,
                                                     "findings": [asdict(f) for f in self.findings],
                                                     "layers": [asdict(d) for d in self.layers]}, indent=1))
        images = _plots(self, out)
        (out / "index.html").write_text(_html(self, images))
        return out


def _need(module: str, what: str):
    """Import ``module`` of the demo extra (rich, matplotlib), or say how to install it: the diagnosis
    itself needs neither, only the report's printing and plots do."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"bnkit.doctor: the report's {what} needs {module.split('.')[0]}, which is not installed: "
                          f'pip install "bnkit[demo]"') from None


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _share(v: float) -> str:
    """A fraction as a percentage with two significant digits below 1 % (74%, 100%, 0.18%)."""
    return f"{100 * v:.0f}%" if v >= 0.01 else f"{100 * v:.2g}%"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _summary_line(s: dict) -> str:
    parts = [f"{s.get('batches', 0)} batches, {s.get('samples', 0)} samples"]
    if s.get("output_gap_train_vs_eval") is not None:
        parts.append(f"model output, train vs eval mode: {_pct(s['output_gap_train_vs_eval'])} rms difference")
    if s.get("output_gap_ema_vs_population") is not None:
        parts.append(f"eval with EMA vs population statistics: {_pct(s['output_gap_ema_vs_population'])}")
    return "; ".join(parts)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt().clamp_min(1e-30))


def _batches(data, num_batches: int, batch_size: int) -> list:
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise ValueError(f"doctor: expected data of shape (N, ...) with a batch dimension, got shape "
                             f"{tuple(data.shape)}")
        return list(data[:num_batches * batch_size].split(batch_size))
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"doctor: data must be a tensor or an iterable of batches, got {type(data).__name__}") from None
    out = list(itertools.islice(it, num_batches))
    if not out:
        raise ValueError("doctor: data yielded no batch")
    return out


def _check_arguments(model, num_batches, batch_size, mode) -> None:
    from .calibrate import MODES

    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be a torch.nn.Module, got {type(model).__name__}")
    for arg, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"doctor: {arg} must be a positive int, got {value!r}")
    if mode not in MODES:
        raise ValueError(f"doctor: mode must be one of {MODES}, got {mode!r}")
    check_initialized(model, "doctor")


def _batch_input(batch):
    """The input tensor of a batch (the batch, or its first element), or None when there is none."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    return None


def _check_batches(batches: list) -> None:
    """Refuse data without samples or with NaN/Inf inputs: every measurement would be empty or NaN."""
    inputs = [x for x in map(_batch_input, batches) if x is not None]
    if inputs and all(x.dim() == 0 or x.shape[0] == 0 for x in inputs):
        raise ValueError(f"doctor: the data holds 0 samples (batch shapes {sorted({tuple(x.shape) for x in inputs})})")
    bad = [~torch.isfinite(x) if x.is_floating_point() or x.is_complex() else None for x in map(_batch_input, batches)]
    counts = [0 if b is None else int(b.sum()) for b in bad]
    if any(counts):
        k = next(i for i, c in enumerate(counts) if c)
        sample = int(bad[k].reshape(bad[k].shape[0], -1).any(1).nonzero()[0]) if bad[k].dim() else 0
        raise ValueError(f"doctor: the data is not finite: {sum(counts)} NaN/Inf input values (the first in sample "
                         f"{sample} of batch {k}); statistics of such data are NaN. Clean or drop those samples first")


def _call(model: nn.Module, batch, forward):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(f"doctor: cannot feed a batch of type {type(batch).__name__} to the model; "
                    f"pass forward=lambda model, batch: ... ")


def _capture_calls(model: nn.Module, names: list[str]):
    """Forward pre-hooks recording each named layer's call arguments ``(args, kwargs)``; returns (store, remove)."""
    store: dict[str, list[tuple]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, kwargs, n=n: store[n].append((args, kwargs)), with_kwargs=True) for n in names]
    return store, lambda: [h.remove() for h in handles]


def _call_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _values_per_channel(layer: nn.Module, args: tuple, kwargs: dict) -> int:
    """Values per channel in one call's input: the elements over the size of the layer's channel ``axis``."""
    x = _call_input(args, kwargs)
    return x.numel() // x.shape[getattr(layer, "axis", 1)]


def _single_value_behaviour(bn: nn.Module) -> str:
    """What training does with a batch of one value per channel: ``"raise"``, ``"use_running"`` (eval's
    numbers: bnkit's ``single_sample`` or a freeze on the running statistics) or ``"skip_update"``."""
    if not isinstance(bn, torch.jit.ScriptModule) and stats_frozen_mode(bn) == "running":
        return "use_running"
    return getattr(bn, "single_sample", "raise")


def _train_eval_gap(layer: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """``rms(y_train - y_eval) / rms(y_train)`` of the layer's own output on one call's input (its channel
    axis, activation, ghost or renormalized statistics), training with frozen statistics so nothing is
    updated. A call's ``mask=``/``lengths=`` are passed on: padding is returned unchanged in both modes,
    so it adds nothing to the difference and its values to ``rms(y_train)``. ``None`` where eval is not
    the running-statistics map (no running statistics, ``example_weight``): the question this gap
    answers does not apply there."""
    if eval_affine(layer) is None:
        return None
    training = layer.training
    try:
        with frozen_stats(layer):
            y_train = layer.train()(*args, **kwargs)
        y_eval = layer.eval()(*args, **kwargs)
    finally:
        layer.train(training)
    return _rel_rms(y_train, y_eval)


def _population(model: nn.Module, batches: list, forward, mode: str, progress: bool):
    """A copy of ``model`` whose running statistics are the population statistics of ``batches``."""
    from .calibrate import calibrate  # lazy: calibrate is its own module with its own dependencies

    calibrated = copy.deepcopy(model)
    calibrate(calibrated, batches, num_batches=len(batches), mode=mode, forward=forward, progress=progress)
    return calibrated


@torch.no_grad()
def doctor(model: nn.Module, data, num_batches: int = 50, batch_size: int = 64, forward=None,
           mode: str = "precise", progress: bool = False, thresholds: dict | None = None) -> DoctorReport:
    """Diagnose every batch-norm layer of ``model`` on ``data``; see the module docstring.

    Args:
        model: the model as it is used for inference (its train/eval flags are part of the diagnosis).
            Never modified.
        data: an ``(N, ...)`` input tensor (split into batches of ``batch_size``) or an iterable of
            batches (tensors, or tuples/lists whose first element is the input; a DataLoader is also
            checked for a last batch of one).
        num_batches: at most this many batches are used.
        forward: ``forward(model, batch)`` for batches the model cannot take as they come.
        mode: passed to :func:`bnkit.calibrate` for the population statistics (``"precise"`` measures
            the quantity the EMA estimates; ``"eval_consistent"`` what each layer sees in eval).
        progress: show calibrate's progress bar.
        thresholds: overrides of :data:`THRESHOLDS`.

    Returns:
        :class:`DoctorReport`.

    Raises:
        ValueError: ``num_batches``/``batch_size`` not a positive int, an unknown ``mode``, a model
            without batch-norm layers, data with 0 samples or with NaN/Inf inputs.
    """
    _check_arguments(model, num_batches, batch_size, mode)
    limits = {**THRESHOLDS, **(thresholds or {})}
    layers = _bn_layers(model)
    if not layers:
        raise ValueError(f"doctor: {type(model).__name__} has no batch-norm layer")
    batches = _batches(data, num_batches, batch_size)
    _check_batches(batches)
    names = [n for n, _ in layers]
    measure = _measure_script if isinstance(model, torch.jit.ScriptModule) else _measure_eager
    measured = measure(model, names, batches, forward, mode, progress)
    findings = list(measured.findings)

    diagnoses = []
    for name, bn in layers:
        values = [v for v in measured.values.get(name, ()) if v]
        # torch.jit.trace keeps only parameters and buffers of a layer, not momentum or num_features
        running_mean, running_var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        channels = getattr(bn, "num_features", None) or (running_mean.numel() if running_mean is not None else 0)
        d = LayerDiagnosis(name, getattr(bn, "original_name", type(bn).__name__), channels,
                           getattr(bn, "momentum", None), bn.training,
                           running_mean is not None and running_var is not None,
                           min_values_per_channel=min(values, default=None))
        if d.has_running_stats:
            d.ema_mean, d.ema_var = running_mean.double().tolist(), running_var.double().tolist()
            if name in measured.gaps:
                d.train_eval_gap = measured.gaps[name]
        cal = measured.calibrated.get(name)
        if cal is not None and cal.running_mean is not None:
            pm, pv = cal.running_mean.double(), cal.running_var.double()
            d.population_mean, d.population_var = pm.tolist(), pv.tolist()
            if d.has_running_stats:
                em, ev = bn.running_mean.double(), bn.running_var.double()
                d.mean_error = float(((em - pm).abs() / (pv + bn.eps).sqrt()).max())
                d.var_error = float(((ev - pv).abs() / (pv + bn.eps)).max())
        var = d.population_var or d.ema_var
        if var is not None:
            v = torch.tensor(var, dtype=torch.float64)
            floor = max(float(v.median()) * limits["collapsed_relative_var"], 1e-12)
            d.collapsed_channels = (v <= floor).nonzero().flatten().tolist()
        diagnoses.append(d)
        findings += _layer_findings(d, bn, limits, model.training)

    # which layers a last batch of one sample makes raise (unknown for TorchScript: no per-layer calls)
    raising = None if measured.one_per_sample is None else [
        name for name, bn in layers if name in measured.one_per_sample and _single_value_behaviour(bn) == "raise"]
    findings += _data_findings(data, raising)
    y_eval = measured.y_eval
    summary = {"batches": len(batches), "samples": measured.samples, "mode": mode,
               "output_gap_train_vs_eval": _rel_rms(measured.y_train, y_eval)
               if _both_tensors(measured.y_train, y_eval) else None,
               "output_gap_ema_vs_population": _rel_rms(measured.y_pop, y_eval)
               if _both_tensors(measured.y_pop, y_eval) else None}
    return DoctorReport(diagnoses, findings, summary)


@dataclass
class _Measured:
    """What the data passes produced (per-layer entries are missing where they could not be measured)."""

    samples: int = 0
    values: dict = field(default_factory=dict)      # layer -> fewest values per channel, per batch
    gaps: dict = field(default_factory=dict)        # layer -> train/eval gap of its output on the probe batch
    calibrated: dict = field(default_factory=dict)  # layer -> the layer holding population statistics
    y_train: object = None
    y_eval: object = None
    y_pop: object = None
    findings: list = field(default_factory=list)
    one_per_sample: set | None = None               # layers given one value per channel per sample (eager only)


def _measure_eager(model: nn.Module, names: list[str], batches: list, forward, mode: str, progress: bool) -> _Measured:
    m = _Measured()
    # Shapes of every layer's input over all batches, in eval mode (never fails, never updates).
    probe = copy.deepcopy(model).eval()
    store, remove = _capture_calls(probe, names)
    layers = {n: probe.get_submodule(n) for n in names}
    values = m.values = {n: [] for n in names}  # values[n][i]: fewest values per channel in batch i
    m.one_per_sample = set()
    for batch in batches:
        _call(probe, batch, forward)
        if store[names[0]]:
            args, kwargs = store[names[0]][0]
            m.samples += (args[0] if args else kwargs["input"]).shape[0]
        for n in names:
            values[n].append(min((_values_per_channel(layers[n], *call) for call in store[n]), default=0))
            if any(_values_per_channel(layers[n], *call) == _call_input(*call).shape[0] for call in store[n]):
                m.one_per_sample.add(n)
            store[n].clear()

    # The probe batch (the one with the most values per channel) in eval mode and with the batch-norm
    # layers in training mode with frozen statistics, so that nothing is updated.
    def fewest(k):  # the fewest values per channel any layer gets from batch k (0: no layer called)
        return min((values[n][k] for n in names if values[n][k]), default=0)

    i = max(range(len(batches)), key=fewest)
    probe_batch = batches[i]
    m.y_eval = _call(probe, probe_batch, forward)
    for n in names:
        store[n].clear()
    if fewest(i) > 1:
        for n in names:  # only the batch-norm layers: dropout and the like stay in eval, as in calibrate
            layers[n].train()
        with frozen_stats(probe):
            m.y_train = _call(probe, probe_batch, forward)
    remove()
    # Each layer called by itself, in training and in eval mode, on the input it got in training mode
    # (its first call on the probe batch).
    m.gaps = {n: _train_eval_gap(layers[n], *store[n][0]) for n in names if store[n]}

    # Batches that give some layer a single value per channel cannot run in training mode.
    trainable = [b for k, b in enumerate(batches) if fewest(k) > 1]
    if not trainable:
        m.findings.append(Finding(MODEL, "warning", "population statistics not measured: every batch gives "
                                  "some layer a single value per channel", "pass larger batches"))
    else:
        try:
            calibrated = _population(model, trainable, forward, mode, progress)
            m.y_pop = _call(calibrated.eval(), probe_batch, forward)
            m.calibrated = {n: calibrated.get_submodule(n) for n in names}
        except Exception as e:  # one failed measurement should not cost the rest of the diagnosis
            m.findings.append(Finding(MODEL, "warning", f"population statistics not measured: bnkit.calibrate "
                                      f"failed with {type(e).__name__}: {e}",
                                      "fix the error above (run bnkit.calibrate(model, data) to see it in full)"))
    return m


def _measure_script(model, names, batches, forward, mode, progress) -> _Measured:
    """TorchScript modules take no forward hooks: only the model-level train/eval output gap is measured."""
    m = _Measured(findings=[Finding(MODEL, "info", "TorchScript model: per-layer measurements (population "
                                    "statistics, per-layer train/eval gap, values per channel) need forward hooks, "
                                    "which TorchScript modules do not support",
                                    "save the eager model with torch.save(model, path) for the full diagnosis")])
    probe = copy.deepcopy(model).eval()
    batch = max(batches, key=lambda b: b.shape[0] if isinstance(b, torch.Tensor) else 0)
    m.samples = sum(b.shape[0] for b in batches if isinstance(b, torch.Tensor))
    m.y_eval = _call(probe, batch, forward)
    if m.samples:
        for _, layer in _bn_layers(probe):  # only the batch-norm layers: dropout and the like stay in eval
            layer.train()
        m.y_train = _call(probe, batch, forward)  # a copy: its running statistics may change
    return m


_BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def _bn_layers(model: nn.Module) -> list:
    """Batch-norm layers of an eager model, or of a TorchScript model (found by their original class name)."""
    if isinstance(model, torch.jit.ScriptModule):
        return [(n, m) for n, m in model.named_modules() if getattr(m, "original_name", "") in _BN_NAMES]
    return batch_norm_layers(model)

def _both_tensors(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape


def _layer_findings(d: LayerDiagnosis, bn: nn.Module, limits: dict, model_training: bool) -> list[Finding]:
    out = []

    def add(severity, problem, fix):
        out.append(Finding(d.name, severity, problem, fix))

    if d.momentum is not None and d.momentum >= 1:  # as a Keras decay it would never update: not a lookalike
        add("warning", f"momentum={d.momentum:g} in PyTorch's convention gives the newest batch all the weight: "
                       f"the running statistics are those of the last batch only",
            "use a momentum such as 0.1, or momentum=None (cumulative average); then bnkit.calibrate(model, loader)")
    elif d.momentum is not None and d.momentum >= KERAS_LOOKALIKE_THRESHOLD:
        add("warning", f"momentum={d.momentum:g} in PyTorch's convention gives the newest batch {d.momentum:.0%} "
                       f"of the weight: the running statistics follow the last few batches only. It looks like a "
                       f"Keras/TF decay passed as torch momentum.",
            f"use momentum={convert(d.momentum, 'decay', 'momentum'):g} (torch), or bnkit's "
            f"momentum=bnkit.momentum.Decay({d.momentum:g}); then bnkit.calibrate(model, loader)")
    # freeze_stats changes what training mode does: "running" is eval's computation, "batch" updates nothing
    frozen = None if isinstance(bn, torch.jit.ScriptModule) else stats_frozen_mode(bn)
    if d.training and frozen != "running":
        add("warning" if model_training else "error",
            "the layer is in training mode: at inference it normalizes with the statistics of each batch "
            "(outputs depend on the other samples)"
            + (" (its running statistics are frozen by freeze_stats, so they are not updated)" if frozen else
               " and keeps updating its running statistics")
            + (" (the whole model is in training mode)" if model_training else
               " although the model is in eval mode (a submodule was switched back with .train())"),
            "call model.eval() before inference; "
            + ("or bnkit.freeze_stats(model, use_running=True) normalizes with the running statistics in "
               "either mode" if frozen else
               "to keep statistics fixed while training, bnkit.freeze_stats(model) (survives model.train())"))
    if not d.has_running_stats:
        add("warning", "no running statistics (track_running_stats=False): eval uses batch statistics, so "
                       "outputs depend on the batch and a batch of one fails",
            "construct the layer with track_running_stats=True and run bnkit.calibrate(model, loader)")
    errs = [e for e in (d.mean_error, d.var_error) if e is not None]
    if errs and max(errs) > limits["stats_error"]:
        add("error" if max(errs) > 5 * limits["stats_error"] else "warning",
            f"the EMA running statistics differ from the population statistics of the data: mean off by "
            f"{_pct(d.mean_error)} of a std, variance off by {_pct(d.var_error)} (worst channel)",
            "recompute them: bnkit.calibrate(model, train_loader) (PreciseBN) before evaluating or exporting; "
            "or end training with momentum=None / momentum=bnkit.momentum.Schedule('cosine', total_steps=...)")
    if errs and max(errs) > limits["stats_error"]:
        out += _too_few_updates(d, bn, limits)
    if d.train_eval_gap is not None and d.train_eval_gap > limits["train_eval_gap"]:
        add("warning", f"train and eval outputs of this layer differ by {_pct(d.train_eval_gap)} (rms) on the "
                       f"same input",
            "bnkit.calibrate(model, loader) if the running statistics are stale; with small batches use larger "
            "ones, bnkit's ghost/renorm layers, or GroupNorm")
    if d.collapsed_channels:
        shown = d.collapsed_channels[:10]
        add("warning", f"{len(d.collapsed_channels)} of {d.channels} channels have (almost) zero variance "
                       f"(channels {shown}{' ...' if len(d.collapsed_channels) > 10 else ''}): their input is "
                       f"constant, so eval divides by sqrt(eps) and the channel carries no information",
            "check for dead ReLUs upstream (lower the learning rate, check initialization) or prune these "
            "channels; bnkit.fold(model) then removes the batch norm for inference")
    v = d.min_values_per_channel
    single_value = _single_value_behaviour(bn)
    if v == 1 and single_value == "use_running":
        pass  # such a batch is normalized with the running statistics, as in eval: nothing raises
    elif v == 1 and single_value == "skip_update":
        add("warning", "a batch gives this layer a single value per channel: with single_sample='skip_update' "
                       "training normalizes it with its own statistics, so the layer outputs its bias for it",
            "DataLoader(..., drop_last=True); or single_sample='use_running'")
    elif v == 1:
        add("error", "a batch gives this layer a single value per channel: training on it raises "
                     "'Expected more than 1 value per channel when training'",
            "DataLoader(..., drop_last=True); or bnkit.freeze_stats(model, use_running=True); or GroupNorm")
    elif v is not None and v < limits["few_values"]:
        add("warning", f"only {v} values per channel in the smallest batch: batch statistics are noisy, "
                       f"training and eval disagree",
            "use larger batches, bnkit's ghost/renorm batch norm, frozen statistics, or GroupNorm")
    return out


def _too_few_updates(d: LayerDiagnosis, bn: nn.Module, limits: dict) -> list[Finding]:
    """A stale-statistics finding's cause when it is the initial value the EMA has not yet forgotten.

    Applies to a fixed momentum only: a cumulative average (momentum=None) gives the initial value
    no weight after one update, and a bnkit schedule's weights depend on its ramp."""
    m, n = d.momentum, getattr(bn, "num_batches_tracked", None)
    if (not isinstance(m, (int, float)) or isinstance(m, bool) or n is None or d.population_mean is None
            or getattr(bn, "momentum_schedule", None) is not None):
        return []
    n = int(n)
    if n == 0 and (any(v != 0 for v in d.ema_mean) or any(v != 1 for v in d.ema_var)):
        return []  # a counter of 0 with other statistics: loaded from a checkpoint without the counter
    share = (1.0 - m) ** n  # the initial value's weight in an EMA after n updates
    pm, pv = torch.tensor(d.population_mean), torch.tensor(d.population_var)
    # EMA = share * initial + (1 - share) * (average of the batches): the first term's part of the error
    mean_part = share * float((pm.abs() / (pv + bn.eps).sqrt()).max())
    var_part = share * float(((1.0 - pv).abs() / (pv + bn.eps)).max())
    if max(mean_part, var_part) <= limits["stats_error"]:
        return []
    enough = 1.0 - 0.05 ** (1.0 / n) if n else None
    larger = (f"with a larger momentum (>= {enough:.2g} leaves < 5% of the initial value after {n} updates), "
              if enough is not None and enough > m else "")
    return [Finding(d.name, "error" if max(mean_part, var_part) > 5 * limits["stats_error"] else "warning",
                    f"too few updates for the momentum: after {n} updates at momentum={m:g}, (1 - {m:g})^{n} = "
                    f"{_share(share)} of the running statistics is still the initial value (mean 0, variance 1); "
                    f"that alone puts the mean off by {_pct(mean_part)} of a std and the variance by "
                    f"{_pct(var_part)}",
                    f"bnkit.calibrate(model, train_loader) (no training needed); or train longer, {larger}"
                    f"or with momentum=None (cumulative average) or a bnkit.momentum.Schedule")]


def _data_findings(data, raising: list[str] | None) -> list[Finding]:
    """A DataLoader whose last batch has one sample: an error naming the layers that raise on it (``raising``;
    ``None`` when unknown), else a warning (one sample's statistics)."""
    if not isinstance(data, torch.utils.data.DataLoader) or data.drop_last or not data.batch_size:
        return []
    try:  # the sampler decides how many samples an epoch draws (a subset, this rank's shard, ...)
        n = len(data.dataset) if isinstance(data.dataset, torch.utils.data.IterableDataset) else len(data.sampler)
    except TypeError:
        return []
    if n % data.batch_size != 1:
        return []
    last = f"the DataLoader's last batch has one sample ({n} samples, batch_size={data.batch_size}, drop_last=False)"
    if raising == []:  # every layer gets several values per channel from one sample, or handles a single one
        return [Finding(MODEL, "warning", f"{last}: its batch statistics come from one sample, a noisy update of "
                                          f"the running statistics", "DataLoader(..., drop_last=True)")]
    return [Finding(MODEL, "error", f"{last}: training raises on it"
                    + (f" (layers {raising} get one value per channel from it)" if raising else ""),
                    "DataLoader(..., drop_last=True)")]


def _plots(report: DoctorReport, out: Path) -> list[str]:
    matplotlib = _need("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d.name for d in report.layers]
    written = []
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.2))
    width = 0.27
    for i, (key, label) in enumerate((("mean_error", "mean error (std)"), ("var_error", "variance error"),
                                      ("train_eval_gap", "train/eval gap"))):
        vals = [getattr(d, key) or 0.0 for d in report.layers]
        ax.bar([j + (i - 1) * width for j in range(len(names))], [100 * v for v in vals], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("per layer: EMA vs population statistics, train vs eval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "layer_errors.png", dpi=100)
    plt.close(fig)
    written.append("layer_errors.png")

    measured = [d for d in report.layers if d.population_var is not None and d.ema_var is not None][:8]
    if measured:
        fig, axes = plt.subplots(2, len(measured), figsize=(2.6 * len(measured) + 0.6, 5.2), squeeze=False)
        for j, d in enumerate(measured):
            for i, (ema, pop, label) in enumerate(((d.ema_mean, d.population_mean, "mean"),
                                                   (d.ema_var, d.population_var, "variance"))):
                ax = axes[i][j]
                ax.scatter(pop, ema, s=10)
                lo, hi = min(pop + ema), max(pop + ema)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.set_title(f"{d.name}: {label}", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.set_xlabel("population", fontsize=7)
                ax.set_ylabel("EMA (running)", fontsize=7)
        fig.suptitle("running (EMA) vs population statistics per channel; on the line = exact", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "ema_vs_population.png", dpi=100)
        plt.close(fig)
        written.append("ema_vs_population.png")
    return written


def _html(report: DoctorReport, images: list[str]) -> str:
    e = html.escape
    cols = ("layer", "type", "C", "momentum", "mode", "mean err", "var err", "train/eval gap", "collapsed",
            "min values/ch")
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
            d.name, d.kind, d.channels, _fmt(d.momentum), "train" if d.training else "eval", _pct(d.mean_error),
            _pct(d.var_error), _pct(d.train_eval_gap), len(d.collapsed_channels), _fmt(d.min_values_per_channel)))
        + "</tr>" for d in report.layers)
    found = "".join(f"<tr class='{f.severity}'><td>{f.severity}</td><td>{e(f.layer)}</td><td>{e(f.problem)}</td>"
                    f"<td>{e(f.fix)}</td></tr>" for f in sorted(report.findings,
                                                                  key=lambda x: SEVERITIES.index(x.severity)))
    found = (f"<table><tr><th>severity</th><th>layer</th><th>problem</th><th>fix</th></tr>{found}</table>"
             if report.findings else "<p>No findings: the batch-norm layers look healthy on this data.</p>")
    imgs = "".join(f"<p><img src='{e(i)}' alt='{e(i)}'></p>" for i in images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bnkit doctor report</title><style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }} .error td:first-child {{ color: #b00; }}
.warning td:first-child {{ color: #a60; }} img {{ max-width: 100%; }}</style></head><body>
<h1>bnkit doctor report</h1><p>{e(_summary_line(report.summary))}</p>
<h2>Findings</h2>{found}
<h2>Batch-norm layers</h2><table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{rows}</table>
<p>mean err: max over channels of |EMA mean - population mean| / population std. var err: max relative error of
the running variance. train/eval gap: rms difference of the layer's output with batch vs running statistics on
one probe batch.</p>
<h2>Plots</h2>{imgs}</body></html>
"""
