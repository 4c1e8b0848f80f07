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


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("layer,x,match", [
    (bnkit.BatchNorm2d(4), torch.randn(2, 3, 4, 4), r"BatchNorm2d\(4\): expected 4 channels in dimension 1, got 3"),
    (bnkit.BatchNorm2d(4), torch.randn(2, 4, 4), r"BatchNorm2d\(4\): expected 4-D input \(N, C, H, W\), got 3-D"),
    (bnkit.BatchNorm1d(4), torch.randn(2, 4, 4, 4), r"BatchNorm1d\(4\): expected 2-D or 3-D input"),
    (bnkit.BatchNorm3d(4), torch.randn(2, 4, 4, 4), r"BatchNorm3d\(4\): expected 5-D input"),
    (bnkit.BatchNorm1d(4), torch.randn(1, 4), r"Expected more than 1 value per channel when training.*drop_last=True"),
    (bnkit.BatchNorm2d(4), torch.randn(1, 4, 1, 1), r"more than 1 value per channel.*GroupNorm"),
    (bnkit.BatchNorm2d(4), torch.randn(0, 4, 3, 3), r"BatchNorm2d\(4\): got an empty batch"),
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


def test_constructor_errors_name_the_layer():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnkit.BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): eps must be >= 0"):
        bnkit.BatchNorm2d(3, eps=-1.0)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        bnkit.BatchNorm2d(3, nonfinite="ignore")


def _nan_batch():
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    return x


def test_nonfinite_skip_keeps_running_stats_and_warns_output_shows_nan():
    bn = bnkit.BatchNorm2d(3, momentum=None)
    bn(torch.randn(4, 3, 2, 2))
    snap = _snapshot(bn)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\): batch statistics are NaN/Inf in channel\(s\) \[1\]"):
        y = bn(_nan_batch())
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, 0]).all()
    assert _unchanged(bn, snap)  # num_batches_tracked too: the cumulative average is not diluted
    x = torch.randn(4, 3, 2, 2)
    bn(x)
    assert bn.num_batches_tracked.item() == 2


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
    bn = bnkit.BatchNorm2d(3, decay=0.97, activation="relu")
    c = copy.deepcopy(bn)
    assert c.momentum == pytest.approx(0.03) and c.activation == "relu" and repr(c) == repr(bn)
