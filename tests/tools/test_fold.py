"""bnkit.fold: the folded model's eval output equals the unfolded eval model's (the reference)."""
import copy

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.fold import fold


def _randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.05)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))


def _check_equal(model: nn.Module, x: torch.Tensor, rtol: float):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(m, torch.Generator().manual_seed(m.num_features))
    with torch.no_grad():
        want = model(x)
        folded, report = fold(model)
        got = folded.eval()(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()), str(report)
    scale = want.abs().max()
    assert (got - want).abs().max() <= rtol * scale, float((got - want).abs().max() / scale)
    return folded, report


# (layer, bn class, input shape)
CASES = {
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), nn.BatchNorm1d, (5, 4, 11)),
    "conv2d": (lambda b: nn.Conv2d(4, 6, 3, padding=1, bias=b), nn.BatchNorm2d, (5, 4, 7, 7)),
    "conv3d": (lambda b: nn.Conv3d(4, 6, 3, bias=b), nn.BatchNorm3d, (2, 4, 5, 5, 5)),
    "conv2d_groups_dilation": (lambda b: nn.Conv2d(4, 6, 3, groups=2, dilation=2, stride=2, bias=b),
                               nn.BatchNorm2d, (3, 4, 11, 11)),
    "depthwise": (lambda b: nn.Conv2d(6, 6, 3, groups=6, bias=b), nn.BatchNorm2d, (3, 6, 8, 8)),
    "convT1d": (lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, bias=b), nn.BatchNorm1d, (5, 4, 9)),
    "convT2d_groups": (lambda b: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2, output_padding=1,
                                                    bias=b), nn.BatchNorm2d, (3, 4, 6, 6)),
    "convT3d_groups": (lambda b: nn.ConvTranspose3d(6, 9, 2, groups=3, bias=b), nn.BatchNorm3d, (2, 6, 3, 3, 3)),
    "linear": (lambda b: nn.Linear(7, 6, bias=b), nn.BatchNorm1d, (9, 7)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bn_kind", ["torch", "bnkit"])
def test_each_layer_kind_float32(case, bias, bn_kind):
    make, torch_bn, shape = CASES[case]
    torch.manual_seed(0)
    layer = make(bias)
    c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = torch_bn(c) if bn_kind == "torch" else getattr(bnkit, torch_bn.__name__)(c)
    folded, report = _check_equal(nn.Sequential(layer, bn), torch.randn(shape), rtol=1e-5)
    assert [(p.bn, p.into, p.replaced_by) for p in report.folded] == [("1", "0", "Identity")]
    assert folded[0].bias is not None and report.not_folded == []


@pytest.mark.parametrize("case", ["conv2d_groups_dilation", "convT2d_groups", "convT3d_groups", "linear"])
def test_float64_is_exact(case):
    make, torch_bn, shape = CASES[case]
    torch.manual_seed(1)
    layer = make(False).double()
    c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    _check_equal(nn.Sequential(layer, torch_bn(c).double()), torch.randn(shape, dtype=torch.float64), rtol=1e-12)


def test_matches_torch_fuse_conv_bn_eval():
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(3, 5, 3, groups=1), nn.BatchNorm2d(5)
    _randomize_bn(bn, torch.Generator().manual_seed(3))
    ref = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    folded, _ = fold(nn.Sequential(conv, bn).eval())
    torch.testing.assert_close(folded[0].weight, ref.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(folded[0].bias, ref.bias, rtol=1e-6, atol=1e-7)


def test_nested_sequential_and_copy_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU(),
                          nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1)), nn.Dropout(0.0)),
                          nn.Sequential(nn.Conv2d(4, 4, 1)), nn.Sequential(bnkit.BatchNorm2d(4)))
    original = copy.deepcopy(model)
    folded, report = _check_equal(model, torch.randn(2, 3, 6, 6), 1e-5)
    assert sorted((p.bn, p.into) for p in report.folded) == [("0.1", "0.0"), ("4.0", "3.0")]
    # the copy was folded; the model given is untouched
    assert isinstance(model[0][1], nn.BatchNorm2d)
    assert torch.equal(model[0][0].weight, original[0][0].weight)
    same, _ = fold(model, inplace=True)
    assert same is model and isinstance(model[0][1], nn.Identity)


def test_bnkit_activation_is_kept_as_a_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, activation=nn.LeakyReLU(0.2)))
    folded, report = _check_equal(model, torch.randn(2, 3, 6, 6), 1e-5)
    assert isinstance(folded[1], nn.LeakyReLU) and folded[1].negative_slope == 0.2
    assert report.folded[0].replaced_by == "LeakyReLU"


class Residual(nn.Module):
    def __init__(self, reuse: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), bnkit.BatchNorm2d(4)
        self.reuse = reuse

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        out = self.bn2(z) + x
        return out + z if self.reuse else out


def test_fx_traced_model_keeps_its_class():
    folded, report = _check_equal(Residual(), torch.randn(2, 4, 5, 5), 1e-5)
    assert report.method == "fx" and isinstance(folded, Residual)
    assert {p.bn for p in report.folded} == {"bn1", "bn2"}


def test_conv_output_used_elsewhere_is_not_folded():
    model = Residual(reuse=True).eval()
    folded, report = fold(model)
    assert [p.bn for p in report.folded] == ["bn1"]
    [skip] = report.not_folded
    assert skip.bn == "bn2" and "also used" in skip.reason and "conv2" in skip.reason
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return self.head(torch.relu(self.body(x)))


def test_untraceable_model_falls_back_to_sequential_chains():
    model = Untraceable().eval()
    _randomize_bn(model.head, torch.Generator().manual_seed(5))
    folded, report = fold(model)
    assert report.method == "sequential" and "TraceError" in report.trace_error
    assert [p.bn for p in report.folded] == ["body.1"]
    assert [n.bn for n in report.not_folded] == ["head"]
    x = torch.randn(2, 3, 6, 6).abs()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_reasons_for_not_folding():
    shared = nn.Conv2d(3, 3, 1)
    no_stats = nn.BatchNorm2d(3, track_running_stats=False)
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3),         # not after a conv
                          nn.Conv2d(3, 3, 1), no_stats,           # batch statistics even in eval
                          shared, nn.BatchNorm2d(3), shared)      # conv called twice
    folded, report = fold(model.train())
    reasons = {n.bn: n.reason for n in report.not_folded}
    assert "not from a conv/linear" in reasons["1"]
    assert "track_running_stats=False" in reasons["3"]
    assert "called 2 times" in reasons["5"]
    assert report.folded == []
    assert str(report).count("NOT folded") == 3


def test_training_mode_layer_folds_with_running_stats_and_says_so():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    _randomize_bn(model[1], torch.Generator().manual_seed(0))
    folded, report = fold(model)
    assert "training mode" in report.folded[0].note
    x = torch.randn(6, 4)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_module_registered_twice_is_not_folded_in_sequential_fallback():
    conv = nn.Conv2d(3, 3, 1)
    model = Untraceable()
    model.body = nn.Sequential(conv, nn.BatchNorm2d(3))
    model.head = nn.Sequential(conv, nn.BatchNorm2d(3))  # the same conv object lives in two chains
    _, report = fold(model.eval())
    assert report.method == "sequential" and report.folded == []
    assert all("0 is shared (registered 2 times" in n.reason for n in report.not_folded), report


# ---- eval_affine: the one decision whether eval is a plain per-channel affine map ----
def _random_state(bn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.05)
        for t in (bn.weight, bn.bias):
            if t is not None:
                t.copy_(torch.randn(c, generator=gen))
    return bn


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False}, {"axis": -1}, {"eps": 1e-3}])
def test_eval_affine_reproduces_eval_output(kwargs):
    bn = _random_state(bnkit.BatchNorm2d(5, **kwargs)).eval()
    x = torch.randn(3, 5, 4, 4) if bn.axis == 1 else torch.randn(3, 4, 4, 5)
    scale, shift = bn.eval_affine()
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == shift.shape == (5,)
    view = (1, 5, 1, 1) if bn.axis == 1 else (1, 1, 1, 5)
    with torch.no_grad():
        torch.testing.assert_close(x * scale.view(view) + shift.view(view), bn(x), rtol=1e-6, atol=1e-6)
    # torch.nn with the same state (channel dimension 1) is the independent reference
    ref = nn.BatchNorm2d(5, eps=bn.eps, affine=bn.affine).eval()
    ref.load_state_dict({k: v for k, v in bn.state_dict().items()
                         if k in ref.state_dict()} | ({"bias": torch.zeros(5)} if kwargs.get("bias") is False else {}),
                        strict=True)
    x1 = x if bn.axis == 1 else x.movedim(-1, 1)
    with torch.no_grad():
        want = ref(x1) if bn.axis == 1 else ref(x1).movedim(1, -1)
    torch.testing.assert_close(bn(x), want, rtol=1e-6, atol=1e-6)


def test_eval_affine_is_none_when_eval_is_not_a_fixed_map():
    assert bnkit.BatchNorm2d(3, example_weight=0.5).eval_affine() is None
    assert bnkit.BatchNorm2d(3, example_weight="auto").eval_affine() is None
    assert bnkit.BatchNorm2d(3, track_running_stats=False).eval_affine() is None
    assert bnkit.LazyBatchNorm2d().eval_affine() is None
    scale, shift = bnkit.BatchNorm2d(3).eval_affine(torch.float64)  # fresh: 1 / sqrt(1 + eps), 0
    assert scale.dtype == torch.float64
    torch.testing.assert_close(scale, torch.full((3,), (1 + 1e-5) ** -0.5, dtype=torch.float64), rtol=1e-15, atol=0)
    assert torch.equal(shift, torch.zeros(3, dtype=torch.float64))


def test_frozen_eval_affine_matches_eval_torch():
    ref = _random_state(nn.BatchNorm2d(4)).eval()
    frozen = bnkit.FrozenBatchNorm2d(4)
    frozen.load_state_dict(ref.state_dict())
    scale, shift = frozen.eval_affine()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(x * scale.view(1, 4, 1, 1) + shift.view(1, 4, 1, 1), ref(x), rtol=1e-6, atol=1e-6)


def _unchanged_and_reported(model, x, fragment):
    model.eval()
    with torch.no_grad():
        want = model(x)
        folded, report = fold(model)
        got = folded.eval()(x)
    assert report.folded == [] and len(report.not_folded) == 1, str(report)
    assert fragment in report.not_folded[0].reason, str(report)
    assert torch.equal(got, want)  # the layer stays: outputs bit-identical


def test_example_weight_is_not_folded():
    torch.manual_seed(0)
    bn = _random_state(bnkit.BatchNorm2d(4, example_weight=0.5))
    _unchanged_and_reported(nn.Sequential(nn.Conv2d(3, 4, 3), bn), torch.randn(2, 3, 6, 6), "example_weight=0.5")


def test_axis_other_than_the_conv_channels_is_not_folded():
    torch.manual_seed(0)
    # out_channels == width: the shapes fit, but axis=-1 normalizes the width, not the conv's channels
    bn = _random_state(bnkit.BatchNorm2d(5, axis=-1))
    _unchanged_and_reported(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), bn), torch.randn(2, 3, 5, 5), "axis=-1")
    bn = _random_state(bnkit.BatchNorm1d(6, axis=2))
    _unchanged_and_reported(nn.Sequential(nn.Linear(4, 6), bn), torch.randn(2, 6, 4), "axis=2")


def test_linear_then_axis_minus_one_folds_for_any_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _random_state(bnkit.BatchNorm1d(6, axis=-1))).eval()
    x = torch.randn(3, 7, 4)  # (N, L, features): axis=-1 is the Linear's features
    with torch.no_grad():
        want = model(x)
        folded, report = fold(model)
        got = folded(x)
    assert len(report.folded) == 1, str(report)
    # float32: each output is a 4-term dot product plus the affine, rounded at ~6e-8 relative per step
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_frozen_batch_norm_folds():
    torch.manual_seed(0)
    frozen = [bnkit.FrozenBatchNorm2d(4), bnkit.FrozenBatchNorm2d(6, activation="relu")]
    for f in frozen:
        f.load_state_dict(_random_state(nn.BatchNorm2d(f.num_features)).state_dict())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen[0], nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False), frozen[1])
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
        folded, report = fold(model)
        got = folded(x)
    assert [(p.bn, p.replaced_by) for p in report.folded] == [("1", "Identity"), ("4", "ReLU")], str(report)
    assert report.not_folded == [] and not any(isinstance(m, bnkit.FrozenBatchNorm) for m in folded.modules())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("make", [lambda: bnkit.BatchRenorm2d(4, rmax=3.0, dmax=5.0), lambda: bnkit.SyncBatchNorm(4),
                                  lambda: bnkit.LazyBatchNorm2d(), lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
                                  lambda: bnkit.BatchNorm2d(4, activation=nn.LeakyReLU(0.2)),
                                  lambda: bnkit.BatchNorm2d(4, variance="biased", momentum=bnkit.momentum.Decay(0.9))],
                         ids=["renorm", "sync", "lazy", "ghost", "leaky_relu", "keras_conventions"])
def test_eval_affine_of_trained_variants_is_their_eval(make):
    torch.manual_seed(0)
    layer = make()
    for _ in range(3):
        layer.train()(torch.randn(6, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
        x = torch.randn(5, 4, 3, 3)
        scale, shift = layer.eval_affine()
        y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if layer.activation == "leaky_relu":
            y = torch.nn.functional.leaky_relu(y, 0.2)
        torch.testing.assert_close(layer.eval()(x), y, rtol=1e-6, atol=1e-6)


def test_tied_weight_is_not_folded():
    # c2.weight is c1.weight (tied): folding b1 into c1 rescales c2 too (and then b2 rescales both),
    # so the folded eval output was off by 1.6 (float64) with both reported as folded.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2.weight = self.c1.weight

        def forward(self, x):
            return self.b1(self.c1(x)) + self.b2(self.c2(x))

    torch.manual_seed(0)
    model = Tied().double().eval()
    for bn in (model.b1, model.b2):
        _randomize_bn(bn, torch.Generator().manual_seed(bn.num_features))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        folded, report = fold(model)
        torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    assert not report.folded, str(report)
    assert {n.bn for n in report.not_folded} == {"b1", "b2"}
    assert all("tied" in n.reason and "c1.weight" in str(report) for n in report.not_folded)


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm2d, bnkit.LazyBatchNorm2d])
def test_lazy_layer_not_initialized_is_named(lazy):
    # fold deep-copies the model; torch's error on the copy ("Attempted to use an uninitialized parameter in
    # <function Tensor.__deepcopy__>") named no module. to_keras of a torch.nn lazy layer crashed the same way.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), lazy())
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"fold: lazy module\(s\) '1' \(LazyBatchNorm2d\) not initialized"):
            fold(model, inplace=inplace)
    assert bnkit.tools.fold.eval_affine(model[1]) is None
    with pytest.raises(ValueError, match="lazy layer that has not been initialized"):
        bnkit.to_keras(model[1])


@pytest.mark.parametrize("domain", [0, 1])
def test_domain_batch_norm_layers_are_not_folded(domain):
    # Under use_domain(d) torch.fx sees only domain d's layer: it was folded into the shared conv, and the
    # other domain then normalized the folded output (float64 eval off by ~1.8 for it).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.DomainBatchNorm2d(4, num_domains=2)).double().eval()
    for bn in model[1].domains:
        _randomize_bn(bn, torch.Generator().manual_seed(domain))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = [model[1](model[0](x), domain=d) for d in (0, 1)]
        with bnkit.use_domain(model, domain):
            folded, report = fold(model)
        for d in (0, 1):
            torch.testing.assert_close(folded[1](folded[0](x), domain=d), want[d], rtol=1e-12, atol=1e-12)
    assert not report.folded and all("DomainBatchNorm" in n.reason for n in report.not_folded), str(report)


def test_modules_with_forward_hooks_are_not_folded():
    # torch.fx does not see hooks: a hook scaling the conv's output then scaled the folded (already
    # normalized) output (float64 eval off by 1.2), and a hook on the batch-norm layer was dropped with it.
    torch.manual_seed(0)
    for hooked in (0, 1):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
        _randomize_bn(model[1], torch.Generator().manual_seed(0))
        model[hooked].register_forward_hook(lambda module, args, out: out * 2)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        with torch.no_grad():
            want = model(x)
            folded, report = fold(model)
            torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
        [why] = report.not_folded
        assert f"{hooked} has forward hooks" in why.reason
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    _randomize_bn(model[1], torch.Generator().manual_seed(0))
    bnkit.freeze_stats(model[1])  # bnkit's own freeze hooks do not change eval: it folds
    with torch.no_grad():
        folded, report = fold(model)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert len(report.folded) == 1, str(report)


def test_forward_branching_on_training_is_traced_as_in_eval():
    # fold of a model in training mode traced the training branch, where the conv output feeds the batch norm
    # only; in eval it is also added after it, so folding changed the eval output by 1.75 (float64).
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.conv(x)
            return self.bn(z) if self.training else self.bn(z) + z

    torch.manual_seed(0)
    model = Branching().double()
    _randomize_bn(model.bn, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for inplace in (False, True):
        model.train()
        folded, report = fold(model, inplace=inplace)
        assert folded.training and folded.bn.training  # modes as they were
        with torch.no_grad():
            torch.testing.assert_close(folded.eval()(x), model.eval()(x), rtol=1e-12, atol=1e-12)
        assert not report.folded and "also used by" in report.not_folded[0].reason
