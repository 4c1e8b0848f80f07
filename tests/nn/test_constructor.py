"""The constructor: torch's arguments plus six, one value per concept, and the migration messages."""
import dataclasses
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.momentum import Decay, HalfLife, Schedule

ALL_LAYERS = [lambda **kw: bnkit.BatchNorm2d(3, **kw), lambda **kw: bnkit.GhostBatchNorm2d(3, 2, **kw),
              lambda **kw: bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0, **kw), lambda **kw: bnkit.SyncBatchNorm(3, **kw),
              lambda **kw: bnkit.LazyBatchNorm2d(**kw), lambda **kw: bnkit.DomainBatchNorm2d(3, 2, **kw)]


def test_fourteen_arguments_torch_first():
    params = [p for p in inspect.signature(bnkit.BatchNorm2d.__init__).parameters.values()
              if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    names = [p.name for p in params]
    torch_names = [p for p in inspect.signature(nn.BatchNorm2d.__init__).parameters if p != "self"]
    assert names[:7] == torch_names[:7]  # same order as torch.nn positionally
    assert set(torch_names) <= set(names) and len(names) == 14
    assert set(names) - set(torch_names) == {"activation", "nonfinite", "axis", "single_sample", "example_weight",
                                             "variance"}


def _steps(layer, seed=0, n=4):
    torch.manual_seed(seed)
    for step in range(n):
        layer(torch.randn(6, 3, 2, 2) * (step + 1) + step)
    return layer


@pytest.mark.parametrize("value,torch_momentum,convention", [
    (Decay(0.99), 0.01, "decay"), (Decay(0.9), 0.1, "decay"), (HalfLife(10), 1 - 0.5 ** 0.1, "half_life"),
    (HalfLife(1), 0.5, "half_life"), (0.3, 0.3, "momentum"), (None, None, "cumulative")])
def test_momentum_values_equal_torch_numbers(value, torch_momentum, convention):
    ours = bnkit.BatchNorm2d(3, momentum=value)
    assert ours.momentum == pytest.approx(torch_momentum) if torch_momentum is not None else ours.momentum is None
    assert ours.momentum_convention == convention and ours.momentum_schedule is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn with momentum 0.5 is deliberate here
        theirs = nn.BatchNorm2d(3, momentum=torch_momentum)
    _steps(ours), _steps(theirs)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-6, atol=1e-7)


def test_schedule_value_is_evaluated_per_step_on_the_device():
    schedule = Schedule("linear", total_steps=3, start=0.2)
    ours = bnkit.BatchNorm2d(3, momentum=schedule)
    assert ours.momentum == 0.2 and ours.momentum_schedule is schedule and ours.momentum_convention == "momentum"
    theirs = nn.BatchNorm2d(3)
    torch.manual_seed(0)
    for step in range(1, 5):
        x = torch.randn(6, 3, 2, 2) + step
        theirs.momentum = (1 - min(step / 3, 1)) * 0.2 + min(step / 3, 1) / step  # the docstring's formula
        ours(x), theirs(x)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_callable_momentum_and_layer_momentum_stays_torch_float():
    bn = bnkit.BatchNorm1d(2, momentum=lambda step: 1.0)
    assert bn.momentum == 0.1 and callable(bn.momentum_schedule)
    x = torch.randn(8, 2)
    bn(x)
    torch.testing.assert_close(bn.running_mean, x.mean(0))


def test_value_classes_repr_frozen_and_equal():
    assert repr(Decay(0.99)) == "Decay(0.99)" and repr(HalfLife(10)) == "HalfLife(10)"
    assert repr(Schedule("cosine", total_steps=5)) == "Schedule('cosine', start=0.1, total_steps=5)"
    assert Decay(0.99) == Decay(0.99) and hash(HalfLife(3)) == hash(HalfLife(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decay(0.99).value = 0.9
    assert "momentum=Decay(0.99)" in repr(bnkit.BatchNorm2d(3, momentum=Decay(0.99)))
    assert "momentum=HalfLife(10)" in repr(bnkit.BatchNorm2d(3, momentum=HalfLife(10)))
    assert "momentum=Schedule('linear', start=0.1, total_steps=4)" in repr(
        bnkit.BatchNorm2d(3, momentum=Schedule("linear", total_steps=4)))
    assert "momentum=0.1" in repr(bnkit.BatchNorm2d(3))


@pytest.mark.parametrize("bad,error,match", [
    ("cosine", TypeError, r"BatchNorm2d\(3\): momentum='cosine'.*Schedule\('cosine', total_steps"),
    (1.5, ValueError, r"BatchNorm2d\(3\): momentum must be in \[0, 1\]"),
    ([0.1], TypeError, r"BatchNorm2d\(3\): momentum must be a number.*Decay, HalfLife, Schedule"),
    (True, TypeError, r"BatchNorm2d\(3\): momentum must be a number")])
def test_bad_momentum_values(bad, error, match):
    with pytest.raises(error, match=match):
        bnkit.BatchNorm2d(3, momentum=bad)
    with pytest.raises(ValueError, match=r"^Schedule\('linear', start=2"):
        Schedule("linear", total_steps=3, start=2)


def test_checkpoint_conventions_unchanged():
    """The metadata a layer built with ``decay=0.99`` recorded (bnkit 0.1) is what Decay(0.99) records now,
    so old checkpoints load into the equivalent new layer silently and warn against a different one."""
    old_metadata = {"eps": 1e-3, "momentum": 0.01, "momentum_convention": "decay", "variance": "biased"}
    source = bnkit.BatchNorm2d(3, eps=1e-3, momentum=Decay(0.99), variance="biased")
    sd = source.state_dict()
    assert sd._metadata[""]["bnkit_conventions"] == old_metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.BatchNorm2d(3, eps=1e-3, momentum=Decay(0.99), variance="biased").load_state_dict(sd)
    with pytest.warns(UserWarning, match=r"momentum_convention='decay' \(this layer: 'momentum'\)"):
        bnkit.BatchNorm2d(3, eps=1e-3, momentum=0.01, variance="biased").load_state_dict(sd)


@pytest.mark.parametrize("kw,new", [
    ({"decay": 0.99}, r"decay=0.99 is now momentum=bnkit.momentum.Decay\(0.99\)"),
    ({"half_life": 10}, r"half_life=10 is now momentum=bnkit.momentum.HalfLife\(10\)"),
    ({"momentum_schedule": "cosine", "total_steps": 5},
     r"momentum_schedule='cosine' is now momentum=bnkit.momentum.Schedule\('cosine'.*total_steps=5 is now"),
    ({"momentum_schedule": abs}, r"momentum_schedule=<built-in function abs> is now momentum=<the callable>"),
    ({"negative_slope": 0.2}, r"negative_slope=0.2 is now activation=torch.nn.LeakyReLU\(0.2\)"),
    ({"virtual_batch_size": 4}, r"virtual_batch_size=4 is now bnkit.GhostBatchNorm1d/2d/3d\(C, virtual_batch_size=4"),
    ({"memory_efficient": True}, r"memory_efficient=True is now layer.memory_efficient = True"),
    ({"momentun": 0.1}, r"unexpected keyword argument\(s\) 'momentun'")])
@pytest.mark.parametrize("make", ALL_LAYERS)
def test_removed_keywords_give_the_new_spelling(make, kw, new):
    if make is ALL_LAYERS[1] and "virtual_batch_size" in kw:
        pytest.skip("GhostBatchNorm*d takes virtual_batch_size")
    with pytest.raises(TypeError, match=r"(BatchNorm|Renorm)\w*\((3|0)\): " + new):
        make(**kw)


@pytest.mark.parametrize("module,name,slope,fn", [
    (nn.ReLU(), "relu", 0.01, F.relu), (nn.LeakyReLU(0.2), "leaky_relu", 0.2, lambda t: F.leaky_relu(t, 0.2)),
    (nn.LeakyReLU(), "leaky_relu", 0.01, F.leaky_relu), (nn.SiLU(), "silu", 0.01, F.silu),
    (nn.Identity(), "identity", 0.01, lambda t: t), ("leaky_relu", "leaky_relu", 0.01, F.leaky_relu)])
def test_activation_modules(module, name, slope, fn):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 2)
    ours, theirs = bnkit.BatchNorm2d(3, activation=module), nn.BatchNorm2d(3)
    assert (ours.activation, ours.negative_slope) == (name, slope)
    torch.testing.assert_close(ours(x), fn(theirs(x)))
    torch.testing.assert_close(ours.eval()(x), fn(theirs.eval()(x)))


class _MyReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("bad", [nn.GELU(), _MyReLU(), nn.Sigmoid()])
def test_other_activation_modules_refused(bad):
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): activation .* cannot be fused"):
        bnkit.BatchNorm2d(3, activation=bad)


def test_ghost_layers_are_batch_norm_layers():
    for cls, torch_cls, bnkit_cls in ((bnkit.GhostBatchNorm1d, nn.BatchNorm1d, bnkit.BatchNorm1d),
                                      (bnkit.GhostBatchNorm2d, nn.BatchNorm2d, bnkit.BatchNorm2d),
                                      (bnkit.GhostBatchNorm3d, nn.BatchNorm3d, bnkit.BatchNorm3d)):
        layer = cls(4, virtual_batch_size=2, momentum=Decay(0.9), activation=nn.ReLU())
        assert isinstance(layer, torch_cls) and isinstance(layer, bnkit_cls) and layer.virtual_batch_size == 2
        assert layer.momentum == pytest.approx(0.1) and layer.activation == "relu"
    assert "GhostBatchNorm2d(4, virtual_batch_size=2, eps=1e-05" in repr(bnkit.GhostBatchNorm2d(4, 2))


def test_ghost_state_dict_and_per_chunk_numbers():
    torch.manual_seed(0)
    ghost = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2, dtype=torch.float64)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    y = ghost(x)
    ref = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(2)])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    plain = nn.BatchNorm2d(3, dtype=torch.float64)
    plain.load_state_dict(ghost.state_dict())
    torch.testing.assert_close(plain.eval()(x), ghost.eval()(x))


def test_ghost_virtual_batch_size_is_validated_and_plain_layers_refuse_it():
    ghost = bnkit.GhostBatchNorm1d(3, 4)
    ghost.virtual_batch_size = 2
    assert ghost.virtual_batch_size == 2
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): virtual_batch_size must be a positive int"):
        ghost.virtual_batch_size = 0
    assert ghost.virtual_batch_size == 2
    plain = bnkit.BatchNorm1d(3)
    assert plain.virtual_batch_size is None
    with pytest.raises(AttributeError, match=r"BatchNorm1d\(3\): ghost batch norm is a layer class"):
        plain.virtual_batch_size = 4
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): mask=/lengths= are not supported"):
        ghost(torch.randn(4, 3, 5), lengths=torch.tensor([5, 4, 3, 2]))


def test_ghost_conversion():
    model = nn.Sequential(bnkit.GhostBatchNorm2d(3, virtual_batch_size=2))
    ghost = model[0]
    assert bnkit.convert(model, "bnkit")[0] is ghost  # bnkit -> bnkit keeps the ghost layer
    with pytest.raises(ValueError, match=r"virtual_batch_size=2 has no equivalent in to='torch'"):
        bnkit.convert(model, "torch")
    with pytest.raises(ValueError, match=r"virtual_batch_size=2 has no equivalent in to='sync' .* replace it by the "
                                         r"plain bnkit layer"):
        bnkit.convert(model, "sync")
    assert model[0] is ghost
    plain = bnkit.BatchNorm2d(3)  # what the message says to do: it loads the ghost layer's state and converts
    plain.load_state_dict(ghost.state_dict())
    assert isinstance(bnkit.convert(nn.Sequential(plain), "sync")[0], bnkit.SyncBatchNorm)


def test_memory_efficient_is_a_validated_property():
    bn = bnkit.BatchNorm2d(4)
    assert bn.memory_efficient is False
    bn.memory_efficient = True
    assert bn.memory_efficient is True
    leaky = bnkit.BatchNorm2d(4, activation=nn.LeakyReLU(0.2))
    leaky.memory_efficient = True
    for act in ("relu", "silu", nn.LeakyReLU(0.0)):
        bn = bnkit.BatchNorm2d(4, activation=act)
        with pytest.raises(ValueError, match=r"BatchNorm2d\(4\): memory_efficient=True .* invertible"):
            bn.memory_efficient = True
        assert bn.memory_efficient is False
    # it travels with conversion between bnkit layers
    assert bnkit.convert(nn.Sequential(leaky), "sync")[0].memory_efficient is True


def test_whole_model_pickles_of_the_keyword_api_keep_their_behaviour():
    """A pickled layer from before held ``virtual_batch_size`` and ``memory_efficient`` as attributes."""
    torch.manual_seed(0)
    ghost = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2)
    state = {k: v for k, v in ghost.__dict__.items() if k != "_virtual_batch_size"}
    old = bnkit.BatchNorm2d.__new__(bnkit.BatchNorm2d)
    old.__setstate__({**state, "virtual_batch_size": 2, "memory_efficient": True})
    assert type(old) is bnkit.GhostBatchNorm2d and old.virtual_batch_size == 2 and old.memory_efficient is True
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(old(x), ghost(x))


def test_whole_model_pickles_from_before_the_core_rebuild_still_run():
    """bnkit 0.1 layers had a ``stats_sink`` and no skip counter or moments hooks."""
    fresh = bnkit.BatchNorm2d(3)
    state = {k: v for k, v in fresh.__dict__.items() if k not in ("_moments_hooks", "_nonfinite_skipped")}
    old = bnkit.BatchNorm2d.__new__(bnkit.BatchNorm2d)
    old.__setstate__({**state, "stats_sink": None})
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(old(x), torch.nn.BatchNorm2d(3)(x))
    assert old.num_batches_tracked.item() == 1 and not hasattr(old, "stats_sink")


def test_pickles_with_a_long_skip_counter_keep_counting():
    """The skip counter was a long tensor before it became float32 (one dispatch per guarded update)."""
    fresh = bnkit.BatchNorm2d(3)
    state = dict(fresh.__dict__, _nonfinite_skipped=torch.tensor(2))
    old = bnkit.BatchNorm2d.__new__(bnkit.BatchNorm2d)
    old.__setstate__(state)
    old(torch.full((4, 3, 2, 2), float("nan")))
    with pytest.warns(RuntimeWarning, match="3 training batch"):
        assert old.report_nonfinite() == 3


def test_lazy_layers_read_the_channels_from_axis_and_keep_bias_false():
    """axis=-1 takes (N, L, C): num_features is C (it was read from dimension 1, then the first call raised);
    bias=False gives no beta, as torch.nn.LazyBatchNorm1d(bias=False) (one was created and trained)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    lazy = bnkit.LazyBatchNorm1d(axis=-1, dtype=torch.float64)
    y = lazy(x)
    assert lazy.num_features == 3 and lazy.running_mean.shape == (3,)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(y, ref(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(lazy.running_var, ref.running_var)
    ours, theirs = bnkit.LazyBatchNorm1d(bias=False), torch.nn.LazyBatchNorm1d(bias=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.bias is None and theirs.bias is None
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] == ["weight"]
    assert "bias=False" in repr(ours)
