"""Padding masks / lengths (padding never read, no host reads) and any channel axis."""
import pytest
import torch

import bnkit


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


@pytest.mark.parametrize("variance", ["unbiased", "biased"])
def test_fully_masked_batch_is_finite_and_leaves_statistics_like_keras(variance):
    bn = bnkit.BatchNorm1d(3, axis=-1, variance=variance)
    x = torch.randn(2, 4, 3) + 5
    mask = torch.zeros(2, 4, dtype=torch.bool)
    y = bn(x, mask=mask)
    assert torch.equal(y, x)  # every position is padding: passed through, finite
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert bn.num_batches_tracked.item() == 0


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


@pytest.mark.parametrize("case", ["layer train", "layer eval", "ghost eval", "functional eval"])
def test_axis_last_output_keeps_the_contiguous_layout_of_the_input(case):
    from bnkit.functional import batch_norm
    x = torch.randn(4, 5, 3)
    if case == "functional eval":
        y = batch_norm(x, torch.zeros(3), torch.ones(3), training=False, axis=-1)
    else:
        layer = (bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, axis=-1) if case.startswith("ghost")
                 else bnkit.BatchNorm1d(3, axis=-1))
        y = layer.train(case.endswith("train"))(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x.transpose(1, 2), torch.zeros(3), torch.ones(3),
                                                                 training=case.endswith("train")).transpose(1, 2))
    assert y.is_contiguous()
    assert y.view(4, -1).shape == (4, 15)
