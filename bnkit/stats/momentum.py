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

>>> convert(0.99, "decay", "momentum")
0.01
>>> round(convert(0.1, "momentum", "half_life"), 3)
6.579
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Union

import torch

__all__ = ["convert", "resolve", "check_value", "Schedule", "make_schedule",
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


def resolve(layer: str, momentum, decay=None, half_life=None, momentum_given: bool = True):
    """Return ``(torch_momentum_or_None, convention_name)`` from exactly one convention.

    ``momentum_given`` tells whether ``momentum`` was passed by the caller (its default 0.1 does
    not conflict with ``decay=`` or ``half_life=``).
    """
    try:
        return _resolve(layer, momentum, decay, half_life, momentum_given)
    except (TypeError, ValueError) as e:
        if str(e).startswith(layer):
            raise
        raise type(e)(f"{layer}: {e}") from None


def _resolve(layer: str, momentum, decay, half_life, momentum_given: bool):
    given = [name for name, v in (("decay", decay), ("half_life", half_life)) if v is not None]
    if momentum_given and given:
        given.insert(0, "momentum")
    if len(given) > 1:
        raise ValueError(f"{layer}: pass exactly one of momentum=, decay=, half_life=; got {', '.join(given)}")
    if decay is not None:
        return _to_momentum(decay, "decay"), "decay"
    if half_life is not None:
        return _to_momentum(half_life, "half_life"), "half_life"
    if momentum is None:
        return None, "cumulative"
    m = _to_momentum(momentum, "momentum")
    if KERAS_LOOKALIKE_THRESHOLD <= m < 1.0:
        warnings.warn(
            f"{layer}: momentum={m} is PyTorch's convention (weight of the NEW batch), so running statistics "
            f"will mostly follow the latest batch. It looks like a Keras/TF/Flax momentum (weight of the OLD "
            f"value). If that is what you meant, write decay={m} (equal to momentum={round(1 - m, 12)}).",
            UserWarning, stacklevel=5)
    return m, "momentum"


def check_value(layer: str, value, step: int) -> float:
    """A Python schedule's momentum for ``step``, checked: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{layer}: momentum_schedule returned {value!r} for step {step}; a torch-convention "
                         f"momentum must be a number in [0, 1]")
    return float(value)


def _clip(v, lo, hi):
    if isinstance(v, torch.Tensor):
        return v.clamp(lo, hi)
    return max(v, lo) if hi is None else min(max(v, lo), hi)


def _cos(v):
    return torch.cos(v) if isinstance(v, torch.Tensor) else math.cos(v)


class Schedule:
    """A momentum schedule: ``schedule(step) -> torch momentum`` for update step ``step`` (1-based).

    ``constant``: always ``start``. ``linear`` / ``cosine``: ramps, over ``total_steps``, from the
    EMA momentum ``start`` toward the cumulative average, i.e. the factor used at step t is::

        (1 - a(t)) * start + a(t) * 1 / t,   a(t) = ramp(min(t / total_steps, 1))

    so late in training every batch weighs about the same, as in an average over the whole run.
    """

    def __init__(self, kind: str, start: float = 0.1, total_steps: int | None = None):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown momentum schedule {kind!r}; expected 'constant', 'linear' or 'cosine'")
        if kind != "constant" and (total_steps is None or total_steps < 1):
            raise ValueError(f"the {kind!r} momentum schedule needs total_steps >= 1, got {total_steps}")
        self.kind, self.start, self.total_steps = kind, _to_momentum(start, "momentum"), total_steps

    def ramp(self, step):
        if self.kind == "constant":
            return 0.0
        t = _clip(step / self.total_steps, 0.0, 1.0)
        return t if self.kind == "linear" else 0.5 - 0.5 * _cos(math.pi * t)

    def __call__(self, step):
        """``step`` is an int, or a tensor (then the result is a tensor on its device: layers pass
        ``num_batches_tracked + 1`` as a float tensor, so no host sync happens, eager or compiled)."""
        a = self.ramp(step)
        return (1.0 - a) * self.start + a / _clip(step, 1, None)

    def __repr__(self) -> str:
        extra = "" if self.kind == "constant" else f", total_steps={self.total_steps}"
        return f"Schedule({self.kind!r}, start={self.start}{extra})"


ScheduleLike = Union[None, str, Callable[[int], float]]


def make_schedule(layer: str, schedule: ScheduleLike, momentum: float | None, total_steps: int | None):
    """Normalize the ``momentum_schedule=`` argument of a layer to a callable or ``None``."""
    if schedule is None or callable(schedule):
        return schedule
    if isinstance(schedule, str):
        start = 0.1 if momentum is None else momentum
        try:
            return Schedule(schedule, start, total_steps)
        except ValueError as e:
            raise ValueError(f"{layer}: {e}") from None
    raise TypeError(f"{layer}: momentum_schedule must be a callable step -> momentum, a name, or None; "
                    f"got {type(schedule).__name__}")
