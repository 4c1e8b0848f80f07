"""How far through a ramp a step is: the one rule behind every ``step -> value`` schedule.

:class:`bnkit.momentum.Schedule` (momentum from the EMA toward the cumulative average) and
:class:`bnkit.nn.LinearRamp` (BatchRenorm's ``rmax``/``dmax`` warm-up) both ask "what fraction
of the ramp is done at step t". Layers ask it on the device, with the step a 0-d tensor made from
``num_batches_tracked``, so a training call reads nothing back to the host; users and doctests ask
it with a Python number. The same expression serves both.

>>> progress(7, 4, delay=5), progress(torch.tensor([0.0, 7.0, 20.0]), 4, delay=5).tolist()
(0.5, [0.0, 0.5, 1.0])
>>> progress(1, 4, shape="cosine"), progress(4, 4, shape="cosine")  # slow start: 0.146 where linear is 0.25
(0.1464466094067262, 1.0)
"""
from __future__ import annotations

import math

import torch

__all__ = ["clamp", "progress", "SHAPES"]

#: How the fraction grows from 0 to 1 over the ramp.
SHAPES = ("linear", "cosine")


def clamp(value, low, high=None):
    """``value`` limited to ``[low, high]`` (no upper limit with ``high=None``): a number for a number, a
    tensor on its device for a tensor."""
    if isinstance(value, torch.Tensor):
        return value.clamp(low, high)
    return max(value, low) if high is None else min(max(value, low), high)


def progress(step, length: int, delay: int = 0, shape: str = "linear"):
    """The fraction of a ramp done at ``step``: 0 up to ``delay``, 1 from ``delay + length`` on, and in
    between linear in the step (``shape="linear"``) or half a cosine period (``"cosine"``: slow at both
    ends). ``step`` is a number (a float comes back) or a tensor (a tensor on its device comes back)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown ramp shape {shape!r}; expected one of {SHAPES}")
    t = clamp((step - delay if delay else step) / length, 0.0, 1.0)
    if shape == "linear":
        return t
    return 0.5 - 0.5 * (torch.cos(math.pi * t) if isinstance(t, torch.Tensor) else math.cos(math.pi * t))
