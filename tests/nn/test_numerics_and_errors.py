"""Stable statistics, half precision, non-finite batches, and bad input (errors before any buffer change)."""
import copy
import warnings

import pytest
import torch

import bnkit
from bnkit.functional import batch_norm


def test_large_mean_small_std_float32_variance_is_accurate():
    x = torch.randn(64, 3, 16, 16, dtype=torch.float64) * 0.1 + 1e4
    x32 = x.float()
    bn = bnkit.BatchNorm2d(3, momentum=1.0)
    bn(x32)
    truth = x32.double().var(dim=(0, 2, 3), unbiased=True)
    rel = ((bn.running_var.double() - truth).abs() / truth).max().item()
    assert rel < 1e-3
    naive = (x32 * x32).mean((0, 2, 3)) - x32.mean((0, 2, 3)) ** 2  # what E[x^2]-E[x]^2 would give
    assert ((naive.double() - truth).abs() / truth).max().item() > 1e-1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_stats_match_torch(dtype):
    ours, theirs = bnkit.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = (torch.randn(8, 4, 5, 5) * 2 + 3).to(dtype)
    ya, yb = ours(x), theirs(x)
    assert ya.dtype == dtype and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(ya.float(), yb.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-4)
    exact = x.float().mean((0, 2, 3)) * 0.1
    torch.testing.assert_close(ours.running_mean, exact, rtol=1e-6, atol=1e-6)


def _tensors(m):  # parameters and buffers, without state_dict()'s hooks (which report skipped batches)
    return dict(list(m.named_parameters()) + list(m.named_buffers()))


def _snapshot(m):
    return {k: v.detach().clone() for k, v in _tensors(m).items()}


def _unchanged(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in _tensors(m).items())


@pytest.mark.parametrize("layer,x,match", [
    (bnkit.BatchNorm2d(4), torch.randn(2, 3, 4, 4), r"BatchNorm2d\(4\): expected 4 channels in dimension 1, got 3"),
    (bnkit.BatchNorm2d(4), torch.randn(2, 4, 4), r"BatchNorm2d\(4\): expected 4-D input \(N, C, H, W\), got 3-D"),
    (bnkit.BatchNorm1d(4), torch.randn(2, 4, 4, 4), r"BatchNorm1d\(4\): expected 2-D or 3-D input"),
    (bnkit.BatchNorm3d(4), torch.randn(2, 4, 4, 4), r"BatchNorm3d\(4\): expected 5-D input"),
    (bnkit.BatchNorm1d(4), torch.randn(1, 4), r"Expected more than 1 value per channel when training.*drop_last=True"),
    (bnkit.BatchNorm2d(4), torch.randn(1, 4, 1, 1), r"more than 1 value per channel.*GroupNorm"),
    (bnkit.BatchNorm2d(4), torch.randn(2, 4, 3, 3, dtype=torch.float64), r"weight has dtype torch.float32 but the input has dtype torch.float64"),
    (bnkit.BatchNorm2d(4), torch.ones(2, 4, 3, 3, dtype=torch.int64), r"expected a floating-point input"),
])
def test_bad_input_raises_before_any_buffer_changes(layer, x, match):
    snap = _snapshot(layer)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(x)
    assert _unchanged(layer, snap)


def test_buffer_on_wrong_device_is_reported():
    bn = bnkit.BatchNorm1d(3)
    bn.running_mean = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(3\): running_mean is on meta but the input is on cpu"):
        bn(torch.randn(4, 3))


def test_empty_batch_in_eval_returns_empty_like_torch():
    ours, theirs = bnkit.BatchNorm2d(4).eval(), torch.nn.BatchNorm2d(4).eval()
    x = torch.randn(0, 4, 3, 3)
    assert ours(x).shape == theirs(x).shape == x.shape


def test_empty_batch_in_training_like_torch():
    """Detection/segmentation models send empty batches: empty output, gradients flow, statistics untouched."""
    ours, theirs = bnkit.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y, y_ref = ours(x), theirs(x)
    assert y.shape == y_ref.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and ours.weight.grad is not None
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # torch counts the empty batch too
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("eps", [-1.0, 0.0])
def test_eps_is_checked_where_torch_checks_it(eps):
    ours, theirs = bnkit.BatchNorm2d(3, eps=eps), torch.nn.BatchNorm2d(3, eps=eps)  # both construct
    snap = _snapshot(ours)
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        theirs(x)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): batch_norm eps must be positive during training"):
        ours(x)
    assert _unchanged(ours, snap)
    ours.eval(), theirs.eval()
    if eps < 0:
        with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): batch_norm eps must be non-negative"):
            ours(x)
    else:
        torch.testing.assert_close(ours(x), theirs(x))


def test_constructor_errors_name_the_layer():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnkit.BatchNorm2d(0)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnkit.BatchNorm2d(True)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        bnkit.BatchNorm2d(3, nonfinite="ignore")
    with pytest.raises(TypeError, match=r"BatchNorm2d\(3\): axis must be an int"):
        bnkit.BatchNorm2d(3, axis="x")
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): example_weight must be"):
        bnkit.BatchNorm2d(3, example_weight="foo")
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3\): "):
        bnkit.BatchNorm2d(3, momentum=1.5)
    for make, name in ((lambda: bnkit.momentum.Decay(-0.1), r"Decay\(-0.1\)"),
                       (lambda: bnkit.momentum.HalfLife(0), r"HalfLife\(0\)")):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            make()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        bnkit.BatchNorm2d(3, nonfinite="ignore")


def _nan_batch():
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_nonfinite_skip_keeps_running_stats_and_reports_without_a_sync(momentum):
    bn = bnkit.BatchNorm2d(3, momentum=momentum)
    bn(torch.randn(4, 3, 2, 2))
    snap = _snapshot(bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is read back during the step, so nothing is said there
        y = bn(_nan_batch())
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, 0]).all()
    assert _unchanged(bn, snap)  # num_batches_tracked too: the cumulative average is not diluted
    x = torch.randn(4, 3, 2, 2)
    bn(x)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)  # the same as never having seen the NaN batch
    ref.load_state_dict(snap)
    ref(x)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 2
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\): 1 training batch\(es\) .* NaN/Inf"):
        bn.eval()  # the host reads the counter here, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, then reset
        bn.train()
        bn.eval()
        bn.state_dict()
    bn.train()
    bn(_nan_batch())
    bn(_nan_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # state_dict() reads nothing (EMA helpers call it every step)
        bn.state_dict()
    with pytest.warns(RuntimeWarning, match=r"2 training batch\(es\)"):
        assert bnkit.nonfinite_report(bn) == {"": 2}


def test_nonfinite_raise_and_propagate():
    bn = bnkit.BatchNorm2d(3, nonfinite="raise")
    snap = _snapshot(bn)
    with pytest.raises(FloatingPointError, match="left unchanged"):
        bn(_nan_batch())
    assert _unchanged(bn, snap)
    ours, theirs = bnkit.BatchNorm2d(3, nonfinite="propagate"), torch.nn.BatchNorm2d(3)
    x = _nan_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    assert torch.isnan(ours.running_var[1])


def test_functional_matches_torch_functional_and_cumulative_needs_count():
    x = torch.randn(6, 3, 4) * 2 + 1
    rm_a, rv_a, rm_b, rv_b = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    ya = batch_norm(x, rm_a, rv_a, w, b, training=True, momentum=0.3, eps=1e-3)
    yb = torch.nn.functional.batch_norm(x, rm_b, rv_b, w, b, training=True, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((rm_a, rv_a), (rm_b, rv_b))
    torch.testing.assert_close(batch_norm(x, rm_a, rv_a, w, b), torch.nn.functional.batch_norm(x, rm_b, rv_b, w, b),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        batch_norm(x, rm_a, rv_a, training=True, momentum=None)
    count = torch.tensor(0)
    batch_norm(x, rm_a, rv_a, training=True, momentum=None, num_batches_tracked=count)
    assert count.item() == 1
    torch.testing.assert_close(rm_a, x.mean((0, 2)))


def test_deepcopy_keeps_conventions():
    bn = bnkit.BatchNorm2d(3, momentum=bnkit.momentum.Decay(0.97), activation="relu")
    c = copy.deepcopy(bn)
    assert c.momentum == pytest.approx(0.03) and c.activation == "relu" and repr(c) == repr(bn)


@pytest.mark.parametrize("momentum", [-1.0, 5.0, float("nan"), True, "0.1"])
def test_functional_momentum_is_checked_before_any_change(momentum):
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"batch_norm: momentum must be a number in \[0, 1\]"):
        batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=momentum)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_functional_eps_and_buffer_pairs_as_torch():
    x = torch.randn(4, 3)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)
        with pytest.raises(ValueError, match=r"batch_norm: batch_norm eps must be positive during training"):
            batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        batch_norm(x, torch.zeros(3), None, training=True)


def test_momentum_schedule_value_is_checked():
    bn = bnkit.BatchNorm1d(3, momentum=lambda step: 5.0)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): momentum_schedule returned 5.0 for step 1"):
        bn(torch.randn(4, 3))
    assert bn.num_batches_tracked.item() == 0


def test_axis_errors_show_the_input_as_given():
    bn = bnkit.BatchNorm1d(5, axis=-1)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\): expected 5 channels in dimension -1, got 7 "
                                         r"\(input shape \(4, 3, 7\)\)"):
        bn(torch.randn(4, 3, 7))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\): axis=9 is out of range for a 3-D input"):
        bnkit.BatchNorm1d(5, axis=9)(torch.randn(4, 5, 3))


def test_refused_batch_does_not_change_last_train_batch_size():
    bn = bnkit.BatchNorm2d(3, example_weight="auto")
    bn(torch.randn(8, 3, 2, 2))
    with pytest.raises(ValueError):
        bn(torch.randn(5, 4, 2, 2))  # wrong channel count: refused
    assert bn.last_train_batch_size == 8
    bn(torch.randn(0, 3, 2, 2))  # an empty batch is accepted (as torch) but has no size to remember
    assert bn.last_train_batch_size == 8
    bn.eval()
    assert bn(torch.randn(2, 3, 2, 2)).shape == (2, 3, 2, 2)


def test_nonfinite_report_names_the_layers_that_skipped():
    model = torch.nn.Sequential(bnkit.BatchNorm2d(3), torch.nn.Sequential(bnkit.BatchNorm2d(3)))
    model[0](torch.randn(4, 3, 2, 2))
    model[1][0](_nan_batch())
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\): 1 training batch"):
        assert bnkit.nonfinite_report(model) == {"1.0": 1}
    assert bnkit.nonfinite_report(model) == {}  # reset after a report
    model[1][0](_nan_batch())
    model[1][0].reset_running_stats()  # a fresh start: earlier skips are not reported after it
    assert bnkit.nonfinite_report(model) == {}


def test_cumulative_momentum_without_num_batches_tracked_names_the_layer():
    """torch.nn silently keeps the statistics (factor 0) here; bnkit refuses, names the layer, buffers unchanged."""
    layer = bnkit.BatchNorm1d(3, momentum=None)
    layer.num_batches_tracked = None  # as after loading into a layer built with it deleted, or by a user
    for x, mask in ((torch.randn(8, 3, 4), None), (torch.randn(8, 3, 4), torch.ones(8, 4, dtype=torch.bool))):
        with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): momentum=None .* num_batches_tracked"):
            layer(x, mask=mask)
        assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))


@pytest.mark.parametrize("route", ["aten", "mask", "biased"])
def test_a_batch_that_would_make_the_running_statistics_inf_is_one_decision_on_every_route(route):
    """Batch statistics finite (float32 accumulation), the float16 running variance after the update
    not (std ~1000: 0.9 + 0.1 * 1e6 > 65504). Every route skips the batch and says why; torch.nn
    stores inf, which makes every later eval output ~0."""
    torch.manual_seed(0)
    x = (torch.randn(8, 2, 3) * 1000).half()
    theirs = torch.nn.BatchNorm1d(2).half()
    theirs(x)
    assert torch.isinf(theirs.running_var).all()  # the premise: torch.nn's update overflows
    kwargs = {"variance": "biased"} if route == "biased" else {}
    layer = bnkit.BatchNorm1d(2, **kwargs).half()
    call = (lambda: layer(x, mask=torch.ones(8, 3, dtype=torch.bool))) if route == "mask" else (lambda: layer(x))
    y = call()
    assert torch.isfinite(y).all()
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_var, torch.ones(2, dtype=torch.float16))
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(2\): 1 training batch\(es\) .* would have made the running "
                                            r"statistics NaN/Inf"):
        layer.eval()
    layer.train()
    layer.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match=r"would make the running statistics NaN/Inf in channel\(s\) \[0, 1\]"):
        call()


def test_functional_cumulative_average_without_a_count_names_the_caller():
    """momentum=None without num_batches_tracked: the error came from bnkit.stats.running without the name."""
    from bnkit.functional import batch_norm_stateless, fold_moments
    from bnkit.stats import Moments
    x = torch.randn(6, 3, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"^layer3: momentum=None \(cumulative average\) needs num_batches_tracked"):
        batch_norm(x, rm, rv, training=True, momentum=None, name="layer3")
    with pytest.raises(ValueError, match=r"^batch_norm_stateless: momentum=None \(cumulative average\) needs"):
        batch_norm_stateless(x, None, {"running_mean": rm, "running_var": rv}, momentum=None)
    with pytest.raises(ValueError, match=r"^fold_moments: momentum=None \(cumulative average\) needs"):
        fold_moments(Moments.of(x), rm, rv, momentum=None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    batch_norm(x, rm, rv, training=False, momentum=None)   # eval: no update, no count needed


@pytest.mark.parametrize("cls", [bnkit.FrozenBatchNorm1d, bnkit.FrozenBatchNorm2d, bnkit.FrozenBatchNorm3d])
def test_frozen_layers_refuse_a_bool_num_features_naming_the_layer(cls):
    """FrozenBatchNorm2d(True) failed inside torch.ones ("must be tuple of ints, not bool"), unnamed."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: num_features must be a positive int, got True$"):
        cls(True)


@pytest.mark.parametrize("stats", [True, False])
def test_functional_empty_training_batch_as_torch(stats):
    x = torch.randn(0, 3, 2, 2)
    ours = (torch.zeros(3), torch.ones(3)) if stats else (None, None)
    theirs = (torch.zeros(3), torch.ones(3)) if stats else (None, None)
    count = torch.tensor(4) if stats else None
    y = batch_norm(x, *ours, training=True, num_batches_tracked=count)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, *theirs, training=True))
    if stats:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert int(count) == 5  # counted, as torch.nn.BatchNorm2d counts an empty batch


def test_frozen_layer_warns_when_a_checkpoint_was_saved_with_another_eps():
    """bnkit.BatchNorm2d warns when a checkpoint's recorded eps differs; FrozenBatchNorm2d loaded it silently and
    normalized with its own eps (the output off by ~5e-3 relative at running_var 0.1, eps 1e-3 vs 1e-5)."""
    saved = torch.nn.Sequential(bnkit.BatchNorm2d(3, eps=1e-3))
    with torch.no_grad():
        saved[0].running_var.fill_(0.1)
    frozen = torch.nn.Sequential(bnkit.FrozenBatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"^FrozenBatchNorm2d\(3\) \(0\): the checkpoint was saved with eps=0.001 "
                                         r"\(this layer: 1e-05\)"):
        frozen.load_state_dict(saved.state_dict())
    same = torch.nn.Sequential(bnkit.FrozenBatchNorm2d(3, eps=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved.state_dict())
        frozen.load_state_dict(torch.nn.Sequential(torch.nn.BatchNorm2d(3)).state_dict())  # no record: torch's own
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(same(x), saved.eval()(x))
