"""FrozenBatchNorm vs eval-mode torch.nn; bnkit.convert / freeze / convert_sync_batchnorm keep everything."""
import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.conversion import convert


def _trained_bn(cls, c, shape, **kw):
    torch.manual_seed(0)
    bn = cls(c, **kw)
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("torch_cls,frozen_cls,shape", [
    (nn.BatchNorm1d, bnkit.FrozenBatchNorm1d, (4, 3)), (nn.BatchNorm1d, bnkit.FrozenBatchNorm1d, (4, 3, 5)),
    (nn.BatchNorm2d, bnkit.FrozenBatchNorm2d, (4, 3, 5, 5)), (nn.BatchNorm3d, bnkit.FrozenBatchNorm3d, (2, 3, 2, 3, 4))])
def test_frozen_loads_state_dict_and_equals_eval_torch(torch_cls, frozen_cls, shape):
    bn = _trained_bn(torch_cls, 3, shape).eval()
    frozen = frozen_cls(3)
    frozen.load_state_dict(bn.state_dict())                  # num_batches_tracked ignored, strict load
    assert sorted(k for k, _ in frozen.named_buffers()) == ["bias", "running_mean", "running_var", "weight"]
    assert list(frozen.parameters()) == []
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)   # train() changes nothing


def test_frozen_bad_input_names_layer():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): expected 4-D input"):
        bnkit.FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): expected 3 channels in dimension 1, got 4"):
        bnkit.FrozenBatchNorm2d(3)(torch.randn(2, 4, 2, 2))


def _model():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(2), nn.BatchNorm1d(4),
                      nn.Sequential(nn.BatchNorm1d(4, momentum=None, affine=False)))
    m.train()
    for _ in range(2):
        m(torch.randn(5, 2, 5, 5))
    m[1].weight.requires_grad_(False)
    return m


def test_round_trip_torch_bnkit_torch_is_exact():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    x = torch.randn(6, 2, 5, 5)
    y_before = model(x.clone())
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    convert(model, "bnkit")
    assert type(model[1]) is bnkit.BatchNorm2d and type(model[5][0]) is bnkit.BatchNorm1d
    assert model[1].weight is weight and not model[1].weight.requires_grad and model[1].training
    assert model[5][0].momentum is None and model[5][0].weight is None
    y_bnkit = model(x.clone())
    torch.testing.assert_close(y_bnkit, y_before, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, model_state[k], rtol=1e-5, atol=1e-6)
    model.load_state_dict(before)
    convert(model, "torch")
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x.clone()), y_before)          # the same torch layers again: bitwise


def test_dtype_device_training_flag_and_top_level_bn():
    bn = nn.BatchNorm2d(3, dtype=torch.float64).eval()
    new = convert(bn, "bnkit")
    assert type(new) is bnkit.BatchNorm2d and new.running_mean.dtype == torch.float64 and not new.training
    assert new.running_var is bn.running_var
    frozen = convert(bnkit.BatchNorm1d(3, activation="relu"), "frozen")
    assert type(frozen) is bnkit.FrozenBatchNorm1d and frozen.activation == "relu"


def test_freeze_equals_eval_model_and_survives_train():
    model = _model()
    model[5][0].running_mean.add_(0.5)
    x = torch.randn(4, 2, 5, 5)
    expected = model.eval()(x)
    model.train()
    out = bnkit.freeze(model)
    assert out is model and isinstance(model[1], bnkit.FrozenBatchNorm2d) and isinstance(model[5][0], bnkit.FrozenBatchNorm1d)
    assert model.training
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    back = convert(model, "torch")                          # unfreezing gives trainable torch layers again
    assert isinstance(back[1], nn.BatchNorm2d) and back[1].weight.requires_grad
    torch.testing.assert_close(back.eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_sync_conversion_keeps_parameters_buffers_extras_and_frozen_stats():
    bn = bnkit.BatchNorm2d(4, momentum=bnkit.momentum.Decay(0.9), activation="relu", nonfinite="raise")
    bnkit.freeze_stats(bn)
    model = nn.Sequential(bn, nn.BatchNorm1d(4, momentum=0.3))
    model[1].eval()
    params = [p for p in model.parameters()]
    bnkit.convert_sync_batchnorm(model)
    assert all(type(m) is bnkit.SyncBatchNorm for m in model)
    assert [p for p in model.parameters()] == params and all(a is b for a, b in zip(model.parameters(), params))
    assert model[0].activation == "relu" and model[0].nonfinite == "raise" and model[0].stats_frozen == "batch"
    assert model[0].momentum_convention == "decay" and abs(model[0].momentum - 0.1) < 1e-12
    assert model[1].momentum == 0.3 and not model[1].training and model[0].training
    with pytest.raises(ValueError, match="activation='relu', nonfinite='raise' has no equivalent"):
        convert(model, "torch")
    model[0].activation = "identity"
    with pytest.raises(ValueError, match="nonfinite='raise' has no equivalent"):  # torch.nn has no such check
        convert(model, "torch")
    model[0].nonfinite = "propagate"
    convert(model, "torch")
    assert type(model[0]) is nn.SyncBatchNorm and model[0].weight is params[0]
    torch_bn = nn.Sequential(nn.BatchNorm2d(2))
    bnkit.freeze_stats(torch_bn)
    convert(torch_bn, "bnkit")
    assert torch_bn[0].stats_frozen == "batch"


def test_refusals_leave_model_untouched():
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm2d(3, activation="relu"))
    first = model[0]
    with pytest.raises(ValueError, match=r"convert\(to='torch'\): 1 \(BatchNorm2d\(3\)\): activation='relu'"):
        convert(model, "torch")
    assert model[0] is first
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert(nn.Sequential(bnkit.GhostBatchNorm2d(3, virtual_batch_size=2)), "sync")
    with pytest.raises(ValueError, match="no running statistics to freeze"):
        bnkit.freeze(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="BatchRenorm has no 'torch' equivalent"):
        convert(bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0), "torch")
    with pytest.raises(ValueError, match="to must be one of"):
        convert(model, "keras")
    assert isinstance(bnkit.freeze(bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0)), bnkit.FrozenBatchNorm2d)


def test_shared_layer_replaced_everywhere():
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    convert(model, "bnkit")
    assert model[0] is model[2] and type(model[0]) is bnkit.BatchNorm1d


def test_convert_refuses_options_torch_cannot_represent_and_keeps_them_between_bnkit_layers():
    model = torch.nn.Sequential(bnkit.BatchNorm1d(3, axis=-1, variance="biased"))
    with pytest.raises(ValueError, match=r"axis=-1, variance='biased' has no equivalent in to='torch'"):
        bnkit.convert(model, to="torch")
    bnkit.convert(model, to="sync")
    assert isinstance(model[0], bnkit.SyncBatchNorm)
    assert model[0].axis == -1 and model[0].variance == "biased"


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-5", True])
def test_frozen_refuses_a_bad_eps_naming_the_layer(eps):
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): eps must be a number >= 0"):
        bnkit.FrozenBatchNorm2d(3, eps=eps)


def test_frozen_eps_zero_equals_torch_eval():
    bn = nn.BatchNorm2d(3, eps=0.0).eval()  # torch refuses eps=0 in training only
    bn.load_state_dict(_trained_bn(nn.BatchNorm2d, 3, (4, 3, 5, 5)).state_dict())
    frozen = bnkit.FrozenBatchNorm2d(3, eps=0.0)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)


def test_frozen_takes_activation_modules_and_freeze_keeps_the_slope():
    bn = bnkit.BatchNorm2d(3, activation=torch.nn.LeakyReLU(0.2)).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.2, 3.0]))
    x = torch.randn(4, 3, 5, 5)
    ref = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias), 0.2)
    frozen = bnkit.freeze(torch.nn.Sequential(bn))[0]
    assert type(frozen) is bnkit.FrozenBatchNorm2d and frozen.negative_slope == 0.2
    torch.testing.assert_close(frozen(x), ref)
    direct = bnkit.FrozenBatchNorm2d(3, activation=torch.nn.LeakyReLU(0.2))
    direct.load_state_dict(bn.state_dict())
    torch.testing.assert_close(direct(x), ref)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\): activation .* cannot be fused"):
        bnkit.FrozenBatchNorm2d(3, activation=torch.nn.GELU())


def test_frozen_layers_refuse_the_old_slope_keyword_with_the_new_spelling():
    with pytest.raises(TypeError, match=r"FrozenBatchNorm2d\(3\): negative_slope=0.2 is now "
                                        r"activation=torch.nn.LeakyReLU\(0.2\)"):
        bnkit.FrozenBatchNorm2d(3, negative_slope=0.2)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        bnkit.FrozenBatchNorm2d(3, momentum=0.1)


@pytest.mark.parametrize("to", ["bnkit", "frozen", "sync"])
def test_hooks_on_a_replaced_layer_are_named_not_dropped_silently(to):
    # A forward hook (feature extraction, activation statistics) on a batch-norm layer stopped running after
    # convert without a word: the new layer does not have it.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out))
    bnkit.freeze_stats(model[2])  # bnkit's own freeze hooks are carried over, not reported
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm2d\(4\)\): its 1 hook\(s\)") as caught:
        model = bnkit.convert(model, to)
    assert not [w for w in caught if "2 (BatchNorm2d(4))" in str(w.message)]
    model(torch.randn(2, 3, 5, 5))
    assert seen == []  # the premise: the hook is gone with the old layer
    if to != "frozen":
        assert bnkit.stats_frozen_mode(model[2]) == "batch"
