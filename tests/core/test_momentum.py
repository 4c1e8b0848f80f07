"""Momentum conventions: conversions, exactly-one-of, the Keras look-alike warning, schedules."""
import math
import warnings

import pytest
import torch

import bnkit
from bnkit.momentum import Decay, HalfLife, Schedule


@pytest.mark.parametrize("value,src,dst,expected", [
    (0.99, "decay", "momentum", 0.01),
    (0.1, "momentum", "decay", 0.9),
    (1.0, "half_life", "momentum", 0.5),       # after one step the old value weighs 1/2
    (0.5, "momentum", "half_life", 1.0),
    (0.0, "momentum", "half_life", math.inf),
])
def test_convert_hand_values(value, src, dst, expected):
    assert bnkit.momentum.convert(value, src, dst) == pytest.approx(expected)


@pytest.mark.parametrize("h", [0.5, 3.0, 10.0, 100.0])
def test_half_life_halves_a_batch_weight_after_h_steps(h):
    m = bnkit.momentum.convert(h, "half_life", "momentum")
    assert (1 - m) ** h == pytest.approx(0.5)
    assert bnkit.momentum.convert(m, "momentum", "half_life") == pytest.approx(h)


def test_decay_layer_follows_keras_update_rule():
    bn = bnkit.BatchNorm1d(2, momentum=Decay(0.9))
    x = torch.randn(16, 2) * 3 + 1
    bn(x)
    batch_mean = x.mean(0)
    torch.testing.assert_close(bn.running_mean, 0.9 * torch.zeros(2) + 0.1 * batch_mean)
    assert "momentum=Decay(0.9)" in repr(bn)
    torch.testing.assert_close(bnkit.BatchNorm1d(2, momentum=HalfLife(2)).momentum, 1 - 0.5 ** 0.5)


def test_one_momentum_value_and_bad_values():
    with pytest.raises(TypeError, match=r"BatchNorm2d\(4\): decay=0.9 is now momentum=bnkit.momentum.Decay\(0.9\)"):
        bnkit.BatchNorm2d(4, momentum=0.1, decay=0.9)
    with pytest.raises(TypeError, match=r"decay=0.9 is now .*; half_life=3 is now momentum=bnkit.momentum.HalfLife"):
        bnkit.BatchNorm2d(4, decay=0.9, half_life=3)
    with pytest.raises(ValueError, match="decay must be in"):
        bnkit.BatchNorm2d(4, momentum=Decay(1.5))
    with pytest.raises(ValueError, match="half_life must be > 0"):
        bnkit.BatchNorm2d(4, momentum=HalfLife(0))


def test_keras_lookalike_momentum_warns_with_the_fix():
    with pytest.warns(UserWarning,
                      match=r"BatchNorm2d\(4\): momentum=0.99 .* write momentum=bnkit.momentum.Decay\(0.99\)"):
        bnkit.BatchNorm2d(4, momentum=0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.BatchNorm2d(4, momentum=0.1)
        bnkit.BatchNorm2d(4, momentum=1.0)  # a deliberate "use the last batch"
        bnkit.BatchNorm2d(4, momentum=Decay(0.99))


def test_momentum_none_is_cumulative_average_like_torch():
    ours, theirs = bnkit.BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    xs = [torch.randn(n, 3) * 2 + i for i, n in enumerate([4, 9, 5])]
    for x in xs:
        ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))  # equal weights


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_named_schedules_ramp_from_ema_to_cumulative(kind):
    s = Schedule(kind, start=0.1, total_steps=10)
    assert s(0) == pytest.approx(0.1)
    assert s(10) == pytest.approx(1 / 10)
    assert s(25) == pytest.approx(1 / 25)   # after the ramp: the cumulative factor
    mid = 0.5 * 0.1 + 0.5 * (1 / 5)         # both ramps are at 1/2 half way
    assert s(5) == pytest.approx(mid)


def test_layer_honours_callable_schedule():
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 if step == 1 else 0.0

    bn = bnkit.BatchNorm1d(2, momentum=schedule)
    x1, x2 = torch.randn(8, 2) + 5, torch.randn(8, 2) - 5
    bn(x1)
    bn(x2)
    assert seen == [1, 2]
    torch.testing.assert_close(bn.running_mean, x1.mean(0))  # momentum 1 then 0: first batch only
    assert bn.num_batches_tracked.item() == 2


def test_named_schedule_on_layer_and_errors():
    bn = bnkit.BatchNorm1d(2, momentum=Schedule("linear", total_steps=4, start=0.2))
    assert bn.momentum_schedule(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"the 'cosine' momentum schedule needs total_steps"):
        Schedule("cosine")
    with pytest.raises(ValueError, match="unknown momentum schedule"):
        Schedule("exp")
    with pytest.raises(TypeError, match=r"BatchNorm1d\(2\): momentum='cosine': .*Schedule\('cosine', total_steps"):
        bnkit.BatchNorm1d(2, momentum="cosine")


@pytest.mark.parametrize("value", [Decay(0.99), Decay(0.0), HalfLife(10), HalfLife(1 / 3), HalfLife(6.579),
                                   HalfLife(0.1), HalfLife(1e-9), HalfLife(math.inf)])
def test_the_layer_repr_rebuilds_its_momentum(value):
    """The momentum= in a layer's repr, evaluated, builds a layer with the same torch momentum."""
    layer = bnkit.BatchNorm2d(2, momentum=value)
    written = repr(layer).split("momentum=")[1].split(", affine")[0]
    rebuilt = bnkit.BatchNorm2d(2, momentum=eval(written, {"Decay": Decay, "HalfLife": HalfLife}))
    assert rebuilt.momentum == pytest.approx(layer.momentum, rel=1e-11, abs=0)
