"""bnkit.convert never changes what a model computes: batch-norm subclasses with behaviour of their own.

timm's ``BatchNormAct2d`` (a torch.nn.BatchNorm2d subclass running ``drop`` then ``act`` after batch
norm) is converted with its activation fused; subclasses convert cannot reproduce are left alone
with a warning naming them. The reference is the model before conversion. A faithful copy of timm's
class is used here; the last tests use timm itself where it imports (not in the test extra).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit


class BatchNormAct2d(nn.BatchNorm2d):
    """timm 1.0's ``timm.layers.norm_act.BatchNormAct2d``: its structure and forward (BN, drop, act)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(**(act_kwargs or {})) if apply_act else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


def _model(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)  # so activations cut somewhere
    for _ in range(2):
        model(torch.randn(4, 3, 6, 6))
    return model


def _same_computation(before: nn.Module, after: nn.Module, steps: int = 2):
    """Outputs, gradients and running statistics equal through train steps and in eval."""
    for training in [True] * steps + [False]:
        before.train(training), after.train(training)
        x = torch.randn(4, 3, 6, 6)
        a, b = before(x), after(x)
        torch.testing.assert_close(b, a)
        a.square().sum().backward(), b.square().sum().backward()
    torch.testing.assert_close(after.state_dict(), before.state_dict())
    for (name, p), q in zip(before.named_parameters(), after.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("act, expected", [
    (dict(act_layer=nn.ReLU), ("relu", 0.01)), (dict(act_layer=nn.SiLU), ("silu", 0.01)),
    (dict(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}), ("leaky_relu", 0.2)),
    (dict(apply_act=False), ("identity", 0.01))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_norm_act_becomes_bnkit_with_its_activation(act, expected, momentum):
    before = _model(BatchNormAct2d(4, momentum=momentum, **act))
    after = copy.deepcopy(before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.convert(after, "bnkit")
    assert type(after[1]) is bnkit.BatchNorm2d
    assert (after[1].activation, after[1].negative_slope) == expected and after[1].momentum == momentum
    _same_computation(before, after)


def test_norm_act_to_frozen_keeps_the_activation():
    before = _model(BatchNormAct2d(4, act_layer=nn.SiLU)).eval()
    after = bnkit.freeze(copy.deepcopy(before))
    assert type(after[1]) is bnkit.FrozenBatchNorm2d and after[1].activation == "silu"
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(after(x), before(x))


@pytest.mark.parametrize("to", ["bnkit", "sync", "frozen"])
@pytest.mark.parametrize("norm, why", [
    (lambda: BatchNormAct2d(4, act_layer=nn.GELU), r"its drop=Identity / act=GELU are not batch norm plus one of bnkit's fused"),
    (lambda: BatchNormAct2d(4, drop_layer=lambda: nn.Dropout(0.1)), r"its drop=Dropout / act=ReLU"),
    (lambda: _Scaled(4), r"it overrides forward of torch.nn.modules.batchnorm.BatchNorm2d"),
    (lambda: _WithGate(4), r"it holds submodules \(gate\)"),
    (lambda: _WithBuffer(4), r"it holds parameters or buffers \(calls\) that the new layer would not keep")])
def test_subclass_convert_cannot_reproduce_is_left_alone_with_a_warning(to, norm, why):
    model = _model(norm())
    layer = model[1]
    with pytest.warns(UserWarning, match=rf"convert\(to='{to}'\): 1 \({type(layer).__name__}\(4\)\): left as it "
                                         rf"is, because {why}"):
        bnkit.convert(model, to)
    assert model[1] is layer


class _Scaled(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


class _WithGate(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.gate = nn.Sigmoid()


class _WithBuffer(nn.BatchNorm2d):
    """Torch's computation, plus state of its own in the state_dict."""

    def __init__(self, c):
        super().__init__(c)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))


class _Renamed(nn.BatchNorm2d):
    """A subclass that changes nothing in the computation (e.g. only its constructor's defaults)."""

    def __init__(self, c):
        super().__init__(c, momentum=0.3)


def test_subclass_with_torchs_computation_is_converted():
    before = _model(_Renamed(4))
    after = copy.deepcopy(before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.convert(after, "bnkit")
    assert type(after[1]) is bnkit.BatchNorm2d and after[1].momentum == 0.3
    _same_computation(before, after)


class _BnkitScaled(bnkit.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_bnkit_subclass_with_its_own_forward_is_not_turned_into_torch():
    model = _model(_BnkitScaled(4))
    with pytest.warns(UserWarning, match=r"1 \(_BnkitScaled\(4\)\): left as it is, because it overrides forward "
                                         r"of bnkit.nn.batchnorm.BatchNorm2d"):
        bnkit.convert(model, "torch")
    assert type(model[1]) is _BnkitScaled


@pytest.mark.parametrize("lazy, to", [(bnkit.LazyBatchNorm2d, "torch"), (bnkit.LazyBatchNorm2d, "sync"),
                                      (bnkit.LazyBatchNorm2d, "frozen"), (nn.LazyBatchNorm2d, "bnkit")])
def test_uninitialized_lazy_layer_is_refused_then_converted_after_a_forward(lazy, to):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), lazy())
    with pytest.raises(ValueError, match=rf"convert\(to='{to}'\): 1 \({lazy.__name__}\(0\)\): is not initialized "
                                         rf"yet .*run one forward pass"):
        bnkit.convert(model, to)
    assert type(model[1]) is lazy
    model(torch.randn(2, 3, 4, 4))
    bnkit.convert(model, to)
    assert model[1].num_features == 4 and model[1].running_mean.shape == (4,)


def _timm():
    try:
        import timm
    except Exception as e:  # not installed, or torchvision (which timm imports) does not load here
        pytest.skip(f"timm is not usable here: {type(e).__name__}: {e}")
    return timm


def test_timm_efficientnet_converts_with_its_activations():
    timm = _timm()
    torch.manual_seed(0)
    before = timm.create_model("efficientnet_b0", num_classes=5)
    norm_act = [m for m in before.modules() if type(m).__name__ == "BatchNormAct2d"]
    for _ in range(2):
        before(torch.randn(2, 3, 64, 64))
    after = copy.deepcopy(before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.convert(after, "bnkit")
    converted = [m for m in after.modules() if isinstance(m, bnkit.BatchNorm2d)]
    assert len(converted) == len(norm_act) == 49
    assert sum(m.activation == "silu" for m in converted) == \
        sum(isinstance(m.act, nn.SiLU) for m in norm_act) > 0
    for training in (True, False):
        before.train(training), after.train(training)
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(after(x), before(x))
    torch.testing.assert_close(after.state_dict(), before.state_dict())


def test_timm_norm_act_with_other_activation_is_left_alone():
    timm = _timm()
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
    model = nn.Sequential(TimmBatchNormAct2d(3, act_layer=nn.GELU))
    with pytest.warns(UserWarning, match=r"0 \(BatchNormAct2d\(3\)\): left as it is"):
        bnkit.convert(model, "bnkit")
    assert type(model[0]) is TimmBatchNormAct2d


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm 1.0's ``SyncBatchNormAct``: torch's SyncBatchNorm, then ``drop`` and ``act`` where present."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def test_sync_norm_act_becomes_bnkit_sync_with_its_activation():
    norm = SyncBatchNormAct(4)
    norm.act = nn.LeakyReLU(0.3)
    before = _model(norm).eval()
    after = bnkit.convert(copy.deepcopy(before), "bnkit")
    assert type(after[1]) is bnkit.SyncBatchNorm
    assert (after[1].activation, after[1].negative_slope) == ("leaky_relu", 0.3)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(after(x), before(x))
