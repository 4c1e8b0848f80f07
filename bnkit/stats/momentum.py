"""Momentum conventions, converted without ambiguity.

Three ways of saying how fast running statistics follow the batches, all stored in
bnkit as PyTorch's ``momentum`` (the weight of the *new* batch):

=============  =============================  ===========  =====================
convention     meaning                        typical      equals torch momentum
=============  =============================  ===========  =====================
``momentum``   weight of the new batch        0.1          ``momentum``
``decay``      weight of the old value (Keras 0.99         ``1 - decay``
               / TF / Flax "momentum")
``half_life``  steps until a batch's weight   6.6          ``1 - 0.5 ** (1 / half_life)``
               has halved
=============  =============================  ===========  =====================

``momentum=None`` keeps PyTorch's cumulative average: the k-th batch gets weight ``1/k``.

A layer's ``momentum=`` takes exactly one value: a number (torch), ``None``, :class:`Decay`,
:class:`HalfLife`, :class:`Schedule` (evaluated on the device) or a callable ``step -> momentum``
(one host read of the step per training call)::

    bnkit.BatchNorm2d(64, momentum=bnkit.momentum.Decay(0.99))      # Keras momentum=0.99
    bnkit.BatchNorm2d(64, momentum=bnkit.momentum.HalfLife(10))
    bnkit.BatchNorm2d(64, momentum=bnkit.momentum.Schedule("cosine", total_steps=10_000, start=0.1))

>>> convert(0.99, "decay", "momentum")
0.01
>>> round(convert(0.1, "momentum", "half_life"), 3)
6.579
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .ramp import clamp, progress

__all__ = ["convert", "resolve", "describe", "check_value", "Decay", "HalfLife", "Schedule",
           "KERAS_LOOKALIKE_THRESHOLD"]

CONVENTIONS = ("momentum", "decay", "half_life")

#: A torch-convention momentum at or above this looks like a Keras/TF decay passed by mistake: the
#: layer warns and ``bnkit.doctor`` reports it. At 0.5 the newest batch weighs as much as all earlier
#: ones together (a half-life of one update), which no useful torch setting does, while every usual
#: Keras/TF/Flax decay (0.9, 0.99, 0.999, and the rarer 0.5-0.7) is caught.
KERAS_LOOKALIKE_THRESHOLD = 0.5


def _to_momentum(value: float, convention: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{convention} must be a number, got {value!r}")
    if convention == "momentum":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {value}")
        return float(value)
    if convention == "decay":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {value}")
        return round(1.0 - float(value), 15)
    if convention == "half_life":
        if not value > 0:
            raise ValueError(f"half_life must be > 0 (in update steps), got {value}")
        return 1.0 - 0.5 ** (1.0 / float(value))
    raise ValueError(f"unknown momentum convention {convention!r}; expected one of {CONVENTIONS}")


def convert(value: float, from_: str, to: str) -> float:
    """Convert a momentum value between ``"momentum"`` (torch), ``"decay"`` (Keras) and ``"half_life"``.

    >>> convert(0.1, "momentum", "decay")
    0.9
    >>> convert(1.0, "half_life", "momentum")
    0.5
    """
    m = _to_momentum(value, from_)
    if to == "momentum":
        return m
    if to == "decay":
        return round(1.0 - m, 15)
    if to == "half_life":
        if m == 0.0:
            return math.inf
        if m == 1.0:
            return 0.0
        return math.log(0.5) / math.log1p(-m)
    raise ValueError(f"unknown momentum convention {to!r}; expected one of {CONVENTIONS}")


def _checked(label: str, value, convention: str) -> float:
    """``value`` as a torch momentum; a bad one raises an error that starts with ``label``."""
    try:
        return _to_momentum(value, convention)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{label}: {e}") from None


@dataclass(frozen=True)
class Decay:
    """The Keras/TF/Flax convention: the weight of the *old* value (Keras' ``momentum=0.99``).

    ``BatchNorm2d(C, momentum=bnkit.momentum.Decay(0.99))`` equals torch's ``momentum=0.01``.

    >>> Decay(0.99).momentum
    0.01
    """

    value: float

    def __post_init__(self):
        _checked(f"Decay({self.value!r})", self.value, "decay")

    @property
    def momentum(self) -> float:
        """The torch-convention momentum (weight of the new batch)."""
        return _to_momentum(self.value, "decay")

    def __repr__(self) -> str:
        return f"Decay({self.value!r})"


@dataclass(frozen=True)
class HalfLife:
    """The number of update steps after which a batch's weight in the running statistics has halved.

    >>> HalfLife(1).momentum
    0.5
    """

    steps: float

    def __post_init__(self):
        _checked(f"HalfLife({self.steps!r})", self.steps, "half_life")

    @property
    def momentum(self) -> float:
        """The torch-convention momentum (weight of the new batch)."""
        return _to_momentum(self.steps, "half_life")

    def __repr__(self) -> str:
        return f"HalfLife({self.steps!r})"


def resolve(layer: str, value):
    """A layer's ``momentum=`` argument as ``(torch_momentum_or_None, convention, schedule_or_None)``.

    ``value`` is a number (torch convention), ``None`` (cumulative average), :class:`Decay`,
    :class:`HalfLife`, :class:`Schedule` or a Python callable ``step -> momentum``. The torch
    momentum of a schedule is its ``start`` (a callable's is torch's default 0.1): torch code that
    reads ``layer.momentum`` gets a number, while the updates follow the schedule.
    """
    if value is None:
        return None, "cumulative", None
    if isinstance(value, Decay):
        return value.momentum, "decay", None
    if isinstance(value, HalfLife):
        return value.momentum, "half_life", None
    if isinstance(value, Schedule):
        return value.start, "momentum", value
    if isinstance(value, str):
        raise TypeError(f"{layer}: momentum={value!r}: a named schedule is written "
                        f"momentum=bnkit.momentum.Schedule({value!r}, total_steps=...)")
    if callable(value):
        return 0.1, "momentum", value
    try:
        m = _to_momentum(value, "momentum")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{layer}: {e} (or None, bnkit.momentum.Decay, HalfLife, Schedule or a callable "
                      f"step -> momentum)") from None
    if KERAS_LOOKALIKE_THRESHOLD <= m < 1.0:
        warnings.warn(
            f"{layer}: momentum={m} is PyTorch's convention (weight of the NEW batch), so running statistics "
            f"will mostly follow the latest batch. It looks like a Keras/TF/Flax momentum (weight of the OLD "
            f"value). If that is what you meant, write momentum=bnkit.momentum.Decay({m}) (equal to "
            f"momentum={round(1 - m, 12)}).", UserWarning, stacklevel=3)
    return m, "momentum", None


def describe(momentum: float | None, convention: str, schedule) -> str:
    """The ``momentum=`` value that builds a layer with these settings, as written in its repr."""
    if schedule is not None:
        return repr(schedule) if isinstance(schedule, Schedule) else getattr(schedule, "__name__", repr(schedule))
    if convention == "decay" and momentum is not None:
        return repr(Decay(convert(momentum, "momentum", "decay")))
    if convention == "half_life" and momentum is not None:
        half_life = convert(momentum, "momentum", "half_life")
        if 0 < half_life < math.inf:  # momentum 1 or 0 (HalfLife(1e-9), HalfLife(inf)) is written as the number
            return f"HalfLife({half_life:.12g})"  # 12 digits: HalfLife(1/3) rebuilds, 9.999999999999998 reads 10
    return repr(momentum)


def check_value(layer: str, value, step: int) -> float:
    """A Python schedule's momentum for ``step``, checked: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{layer}: momentum_schedule returned {value!r} for step {step}; a torch-convention "
                         f"momentum must be a number in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class Schedule:
    """A momentum schedule: ``schedule(step) -> torch momentum`` for update step ``step`` (1-based).

    ``constant``: always ``start``. ``linear`` / ``cosine``: ramps, over ``total_steps``, from the
    EMA momentum ``start`` toward the cumulative average, i.e. the factor used at step t is::

        (1 - a(t)) * start + a(t) * 1 / t,   a(t) = ramp(min(t / total_steps, 1))

    so late in training every batch weighs about the same, as in an average over the whole run.
    A layer built with ``momentum=Schedule(...)`` evaluates it on the device (no host read).

    >>> Schedule("linear", total_steps=4, start=0.2)(4)
    0.25
    """

    kind: str
    start: float = 0.1
    total_steps: int | None = None

    def __post_init__(self):
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown momentum schedule {self.kind!r}; expected 'constant', 'linear' or 'cosine'")
        if self.kind != "constant" and (isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int)
                                        or self.total_steps < 1):
            raise ValueError(f"the {self.kind!r} momentum schedule needs total_steps >= 1, got {self.total_steps}")
        label = f"Schedule({self.kind!r}, start={self.start!r})"
        object.__setattr__(self, "start", _checked(label, self.start, "momentum"))

    def ramp(self, step):
        """``a(step)``, the weight of the cumulative average in the momentum (0 for ``constant``)."""
        return 0.0 if self.kind == "constant" else progress(step, self.total_steps, shape=self.kind)

    def __call__(self, step):
        """``step`` is an int, or a tensor (then the result is a tensor on its device: layers pass
        ``num_batches_tracked + 1`` as a float tensor, so no host sync happens, eager or compiled)."""
        a = self.ramp(step)
        return (1.0 - a) * self.start + a / clamp(step, 1)

    def __repr__(self) -> str:
        extra = "" if self.kind == "constant" else f", total_steps={self.total_steps}"
        return f"Schedule({self.kind!r}, start={self.start}{extra})"
