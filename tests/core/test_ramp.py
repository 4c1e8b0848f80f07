"""The ramp rule (bnkit.stats.ramp.progress) that LinearRamp and momentum.Schedule share: hand-computed
values, and the same numbers for a Python step (host) and a tensor step (device, as layers evaluate it)."""
import math

import pytest
import torch

from bnkit.momentum import Schedule
from bnkit.nn import LinearRamp
from bnkit.stats.ramp import progress

STEPS = list(range(0, 30)) + [1000]


def test_progress_hand_values():
    assert [progress(s, 4, delay=2) for s in (0, 2, 3, 4, 6, 9)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert progress(2, 4, shape="cosine") == pytest.approx(0.5)
    assert progress(1, 4, shape="cosine") == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    with pytest.raises(ValueError, match=r"unknown ramp shape 'exp'"):
        progress(1, 4, shape="exp")


@pytest.mark.parametrize("ramp", [LinearRamp(1.0, 3.0, steps=10, hold=5), LinearRamp(0.0, 5.0, steps=3),
                                  Schedule("linear", start=0.2, total_steps=7),
                                  Schedule("cosine", start=0.1, total_steps=10), Schedule("constant", start=0.3)],
                         ids=repr)
def test_host_and_device_steps_agree(ramp):
    host = torch.tensor([ramp(s) for s in STEPS], dtype=torch.float64)
    device = ramp(torch.tensor(STEPS, dtype=torch.float64))
    assert isinstance(device, torch.Tensor) and device.dtype == torch.float64
    torch.testing.assert_close(device, host, rtol=0, atol=1e-15)
