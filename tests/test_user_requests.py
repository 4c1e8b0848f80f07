"""Issue 8: accumulation, masks, any channel axis, the stateless functional form, example weighing,
single-sample policy, freezing that survives train(), conventions in the state_dict."""
import io
import warnings

import pytest
import torch

import bnkit
from bnkit.functional import batch_norm_stateless


# --- gradient accumulation ------------------------------------------------------------------------

@pytest.mark.parametrize("bn_cls", [bnkit.BatchNorm2d, torch.nn.BatchNorm2d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulate_equals_one_big_batch(bn_cls, momentum):
    k, b = 4, 3
    micro = [torch.randn(b, 2, 3, 3) * (i + 1) + i for i in range(2 * k)]
    ours = bn_cls(2, momentum=momentum)
    with bnkit.accumulate(ours, steps=k):
        for i, x in enumerate(micro):
            y = ours(x)
            ref = torch.nn.functional.batch_norm(x, None, None, ours.weight, ours.bias, training=True)
            torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)  # normalization unchanged
    big = torch.nn.BatchNorm2d(2, momentum=momentum)
    big(torch.cat(micro[:k]))
    big(torch.cat(micro[k:]))
    torch.testing.assert_close(ours.running_mean, big.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, big.running_var, rtol=1e-5, atol=1e-6)
    assert ours.num_batches_tracked.item() == 2


def test_accumulate_flushes_leftovers_and_restores_layers():
    bn = bnkit.BatchNorm1d(3)
    xs = [torch.randn(4, 3) + 2 for _ in range(3)]
    with bnkit.accumulate(bn, steps=5):
        for x in xs:
            bn(x)
        assert bn.num_batches_tracked.item() == 0
    assert bn.num_batches_tracked.item() == 1 and bn.stats_frozen is None and not bn._moments_hooks
    ref = torch.nn.BatchNorm1d(3)
    ref(torch.cat(xs))
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        with bnkit.accumulate(bn, steps=0):
            pass


# --- masks / lengths ------------------------------------------------------------------------------

def test_mask_equals_bn_on_valid_elements_and_leaves_padding_untouched():
    x = torch.randn(3, 4, 6)
    lengths = torch.tensor([6, 2, 4])
    ours, ref = bnkit.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    y = ours(x, lengths=lengths)
    valid = torch.cat([x[i, :, :n] for i, n in enumerate(lengths.tolist())], dim=1)  # (C, total)
    y_ref = ref(valid.t()).t()
    got = torch.cat([y[i, :, :n] for i, n in enumerate(lengths.tolist())], dim=1)
    torch.testing.assert_close(got, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert torch.equal(y[1, :, 2:], x[1, :, 2:]) and torch.equal(y[2, :, 4:], x[2, :, 4:])
    mask = torch.arange(6) < lengths[:, None]
    torch.testing.assert_close(bnkit.BatchNorm1d(4)(x, mask=mask), y)


def test_mask_errors():
    bn = bnkit.BatchNorm1d(2)
    snap = bn.running_mean.clone()
    x = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor shaped like the input without its channel"):
        bn(x, mask=torch.ones(2, 2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"BatchNorm1d\(2\): mask must be a bool torch.Tensor"):
        bn(x, mask=[[True, True, False], [True, False, False]])
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(2\): mask is on meta but the input is on cpu"):
        bn(x, mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=r"BatchNorm1d\(2\): lengths must hold integers"):
        bn(x, lengths=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(2\): lengths must be in \[0, 3\].*max 4"):
        bn(x, lengths=torch.tensor([4, 1]))
    assert torch.equal(bn.running_mean, snap) and bn.num_batches_tracked.item() == 0


def test_mask_with_fewer_than_two_valid_values_leaves_statistics_and_is_reported():
    """No host read decides it: the batch normalizes its valid value (output = bias) and is counted."""
    bn = bnkit.BatchNorm1d(2)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.randn(2, 2, 3)
    y = bn(x, lengths=torch.tensor([1, 0]))
    torch.testing.assert_close(y[0, :, 0], bn.bias.detach())
    assert torch.equal(y[0, :, 1:], x[0, :, 1:]) and torch.equal(y[1], x[1])
    assert torch.equal(bn.running_mean, torch.zeros(2)) and bn.num_batches_tracked.item() == 0
    with pytest.warns(RuntimeWarning, match="fewer than 2 valid values"):
        bn.eval()


def test_fully_masked_batch_is_finite_and_leaves_statistics_like_keras():
    bn = bnkit.BatchNorm1d(3, axis=-1)
    x = torch.randn(2, 4, 3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    y = bn(x, mask=mask)
    assert torch.equal(y, x)  # every position is padding: passed through, finite
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_padding_values_never_matter():
    x = torch.randn(3, 4, 6)
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(6) < lengths[:, None]
    poisoned = x.clone()
    poisoned[1, :, 2] = float("nan")
    poisoned[2, :, 5] = float("inf")
    poisoned[1, :, 4] = 1e30
    a, b = bnkit.BatchNorm1d(4), bnkit.BatchNorm1d(4)
    ya, yb = a(x, lengths=lengths), b(poisoned, lengths=lengths)
    torch.testing.assert_close(ya[mask.unsqueeze(1).expand_as(ya)], yb[mask.unsqueeze(1).expand_as(yb)])
    torch.testing.assert_close(a.running_var, b.running_var)
    assert b.num_batches_tracked.item() == 1
    a.eval(), b.eval()
    ew = bnkit.BatchNorm1d(4, example_weight=0.5)
    ew.load_state_dict(a.state_dict())
    ew.eval()
    za, zb = ew(x, mask=mask), ew(poisoned, mask=mask)
    torch.testing.assert_close(za[mask.unsqueeze(1).expand_as(za)], zb[mask.unsqueeze(1).expand_as(zb)])


# --- any channel axis -----------------------------------------------------------------------------

def test_axis_last_equals_transpose_bn_transpose():
    x = torch.randn(4, 7, 5, requires_grad=True)  # (N, L, C)
    ours, ref = bnkit.BatchNorm1d(5, axis=-1), torch.nn.BatchNorm1d(5)
    y = ours(x)
    y_ref = ref(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, x, dy)[0]
    g_ref = torch.autograd.grad(y_ref, x, dy)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match=r"expected 5 channels in dimension 1, got 7"):
        bnkit.BatchNorm1d(5)(x)  # forgot axis=-1: the message shows what arrived


# --- stateless functional form --------------------------------------------------------------------

def _stats(c):
    return {"running_mean": torch.zeros(c), "running_var": torch.ones(c), "num_batches_tracked": torch.tensor(0)}


def test_stateless_matches_module_and_leaves_inputs_untouched():
    x = torch.randn(6, 3, 4)
    params = {"weight": torch.rand(3) + 0.5, "bias": torch.randn(3)}
    stats = _stats(3)
    y, new = batch_norm_stateless(x, params, stats, training=True)
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(params["weight"])
        bn.bias.copy_(params["bias"])
    torch.testing.assert_close(y, bn(x), rtol=1e-6, atol=1e-6)
    for k in stats:
        torch.testing.assert_close(new[k], getattr(bn, k))
    assert torch.equal(stats["running_mean"], torch.zeros(3))  # input stats not modified
    y_eval, same = batch_norm_stateless(x, params, new, training=False)
    bn.eval()
    torch.testing.assert_close(y_eval, bn(x), rtol=1e-6, atol=1e-6)
    assert all(same[k] is new[k] for k in new)  # eval: the same tensors come back


def test_stateless_under_grad_vmap_jacrev():
    x = torch.randn(5, 2, 3)
    w, b = torch.rand(2) + 0.5, torch.randn(2)
    stats = _stats(2)

    def loss(w, x):
        y, _ = batch_norm_stateless(x, {"weight": w, "bias": b}, stats)
        return (y * torch.arange(y.numel()).reshape(y.shape)).sum()

    g = torch.func.grad(loss)(w, x)
    wr = w.clone().requires_grad_(True)
    loss(wr, x).backward()
    torch.testing.assert_close(g, wr.grad)
    # vmap over a stack of batches: each gets its own statistics and its own running update
    xs = torch.randn(4, 5, 2, 3)
    ys, news = torch.func.vmap(lambda xb: batch_norm_stateless(xb, {"weight": w, "bias": b}, stats))(xs)
    for i in range(4):
        yi, ni = batch_norm_stateless(xs[i], {"weight": w, "bias": b}, stats)
        torch.testing.assert_close(ys[i], yi)
        torch.testing.assert_close(news["running_var"][i], ni["running_var"])
    jac = torch.func.jacrev(lambda xx: batch_norm_stateless(xx, None, None)[0])(x)
    assert jac.shape == x.shape + x.shape
    xr = x.clone().requires_grad_(True)
    row = torch.autograd.grad(batch_norm_stateless(xr, None, None)[0][0, 0, 0], xr)[0]
    torch.testing.assert_close(jac[0, 0, 0], row)


# --- inference example weighing -------------------------------------------------------------------

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


# --- batch of one ---------------------------------------------------------------------------------

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


# --- freezing survives model.train() --------------------------------------------------------------

def test_freeze_then_model_train_leaves_buffers_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), bnkit.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    bnkit.freeze_stats(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- conventions recorded -------------------------------------------------------------------------

def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def test_conventions_travel_with_the_checkpoint_and_mismatch_warns():
    keras_like = bnkit.BatchNorm2d(3, eps=1e-3, decay=0.99, variance="biased")
    sd = _roundtrip(keras_like.state_dict())
    assert sd._metadata[""]["bnkit_conventions"]["eps"] == 1e-3
    with pytest.warns(UserWarning, match=r"eps=0.001 \(this layer: 1e-05\).*variance='biased'"):
        bnkit.BatchNorm2d(3).load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.BatchNorm2d(3, eps=1e-3, decay=0.99, variance="biased").load_state_dict(sd)
        bnkit.BatchNorm2d(3).load_state_dict(torch.nn.BatchNorm2d(3).state_dict())  # plain torch: silent
        torch.nn.BatchNorm2d(3).load_state_dict(sd)  # and torch.nn still loads bnkit checkpoints


def test_biased_variance_option_stores_biased_variance():
    bn = bnkit.BatchNorm1d(2, variance="biased", momentum=1.0)
    x = torch.randn(5, 2)
    bn(x)
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=False))


def test_stateless_bad_input_gets_the_clear_error():
    with pytest.raises(ValueError, match=r"batch_norm_stateless: expected an input of shape \(N, C, \*\)"):
        batch_norm_stateless(torch.randn(3), None, None)
