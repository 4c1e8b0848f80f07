"""Layer options: inference example weighing, the single-sample policy, freezing that survives
train(), conventions recorded in the state_dict, the biased-variance convention."""
import io
import warnings

import pytest
import torch

import bnkit


def test_example_weighing_matches_mixture_formula():
    bn = bnkit.BatchNorm2d(2, example_weight=0.25)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    bn.eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64).float()
    y = bn(x)
    a = 0.25
    xd = x.double()
    mu_e = xd.mean((2, 3))
    var_e = xd.var((2, 3), unbiased=False)
    mu = a * mu_e + (1 - a) * bn.running_mean.double()
    var = a * var_e + (1 - a) * bn.running_var.double() + a * (1 - a) * (mu_e - bn.running_mean.double()) ** 2
    expected = (xd - mu[..., None, None]) / torch.sqrt(var[..., None, None] + bn.eps)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    bn.example_weight = 0.0  # alpha = 0 is plain eval
    torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                                     bn.bias), rtol=1e-6, atol=1e-6)


def test_example_weight_auto_uses_training_batch_size():
    bn = bnkit.BatchNorm2d(2, example_weight="auto").eval()
    with pytest.raises(RuntimeError, match="has not seen a training batch"):
        bn(torch.randn(2, 2, 3, 3))
    bn.train()
    bn(torch.randn(8, 2, 3, 3))
    bn.eval()
    assert bn._example_weight() == pytest.approx(1 / 8)


def test_single_sample_policies():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="drop_last=True.*eval\\(\\).*freeze_stats.*GroupNorm"):
        bnkit.BatchNorm1d(3)(x)
    bn = bnkit.BatchNorm1d(3, single_sample="use_running")
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    y = bn(x)
    torch.testing.assert_close(y, (x - 0.5) / torch.sqrt(torch.tensor(1 + 1e-5)) * bn.weight + bn.bias)
    assert bn.num_batches_tracked.item() == 0
    bn = bnkit.BatchNorm1d(3, single_sample="skip_update")
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bn(x), bn.bias.detach().expand(1, 3))
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(3))
    bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 1


def test_freeze_then_model_train_leaves_buffers_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), bnkit.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    bnkit.freeze_stats(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def test_conventions_travel_with_the_checkpoint_and_mismatch_warns():
    keras_like = bnkit.BatchNorm2d(3, eps=1e-3, momentum=bnkit.momentum.Decay(0.99), variance="biased")
    sd = _roundtrip(keras_like.state_dict())
    assert sd._metadata[""]["bnkit_conventions"]["eps"] == 1e-3
    with pytest.warns(UserWarning, match=r"eps=0.001 \(this layer: 1e-05\).*variance='biased'"):
        bnkit.BatchNorm2d(3).load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.BatchNorm2d(3, eps=1e-3, momentum=bnkit.momentum.Decay(0.99), variance="biased").load_state_dict(sd)
        bnkit.BatchNorm2d(3).load_state_dict(torch.nn.BatchNorm2d(3).state_dict())  # plain torch: silent
        torch.nn.BatchNorm2d(3).load_state_dict(sd)  # and torch.nn still loads bnkit checkpoints


def test_biased_variance_option_stores_biased_variance():
    bn = bnkit.BatchNorm1d(2, variance="biased", momentum=1.0)
    x = torch.randn(5, 2)
    bn(x)
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=False))
