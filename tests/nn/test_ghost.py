"""Ghost batch norm (``bnkit.GhostBatchNorm*d``) against torch.nn applied to each chunk."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnkit


def _chunked_torch(x, weight, bias, size):
    """Reference: torch's training-mode batch norm applied to each consecutive chunk alone."""
    return torch.cat([F.batch_norm(c, None, None, weight, bias, training=True) for c in x.split(size)])


@pytest.mark.parametrize("cls,shape,size", [
    (bnkit.GhostBatchNorm2d, (12, 3, 4, 5), 4),     # divides
    (bnkit.GhostBatchNorm2d, (10, 3, 4, 5), 4),     # last chunk of 2
    (bnkit.GhostBatchNorm1d, (11, 5), 3),           # 1-D input, last chunk of 2
    (bnkit.GhostBatchNorm3d, (5, 2, 2, 3, 2), 2),   # last chunk of one sample, 12 values
])
def test_forward_and_backward_equal_plain_bn_per_chunk(cls, shape, size):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    bn = cls(shape[1], virtual_batch_size=size, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = bn(x), _chunked_torch(xr, w, b, size)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.weight.grad, w.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.bias.grad, b.grad, rtol=0, atol=1e-11)


def test_running_stats_updated_once_from_mean_of_ghost_statistics():
    torch.manual_seed(1)
    x = torch.randn(12, 3, 2, 2, dtype=torch.float64) * 2 + 1
    bn = bnkit.GhostBatchNorm2d(3, momentum=0.1, virtual_batch_size=4, dtype=torch.float64)
    bn(x)
    chunks = x.numpy().reshape(3, 4, 3, 2, 2)
    ghost_means = chunks.mean(axis=(1, 3, 4))                       # (G, C)
    ghost_unbiased = np.stack([c.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1) for c in chunks])
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * ghost_means.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * ghost_unbiased.mean(0), rtol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_running_var_with_uneven_chunks_is_pooled_within_chunk_variance():
    torch.manual_seed(2)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    bn = bnkit.GhostBatchNorm1d(2, momentum=1.0, virtual_batch_size=3, dtype=torch.float64)
    bn(x)
    flat = [c.transpose(0, 1).reshape(2, -1).numpy() for c in x.split(3)]   # 9, 9, 3 values
    m2 = sum(((c - c.mean(1, keepdims=True)) ** 2).sum(1) for c in flat)
    np.testing.assert_allclose(bn.running_var.numpy(), m2 / (21 - 3), rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean.numpy(), x.mean((0, 2)).numpy(), rtol=1e-12)


def test_one_chunk_equals_torch_nn_including_running_stats():
    torch.manual_seed(3)
    x = torch.randn(8, 4, 3, 3)
    ours, ref = bnkit.GhostBatchNorm2d(4, virtual_batch_size=8), torch.nn.BatchNorm2d(4)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_eval_ignores_virtual_batch_size():
    torch.manual_seed(4)
    ours, ref = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for b in (ours, ref):
            b.running_mean.fill_(0.5)
            b.running_var.fill_(2.0)
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_last_chunk_of_one_value_raises_before_buffers_change():
    bn = bnkit.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): virtual_batch_size=4 .* chunks \[4, 1\]"):
        bn(torch.randn(5, 3))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_var, torch.ones(3))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_virtual_batch_size(bad):
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): virtual_batch_size must be a positive int"):
        bnkit.GhostBatchNorm2d(3, virtual_batch_size=bad)


def test_channels_last_kept():
    x = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last)
    y = bnkit.GhostBatchNorm2d(3, virtual_batch_size=4)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _chunked_torch(x, None, None, 4))


def test_biased_variance_stores_the_pooled_biased_variance():
    """variance="biased" stores sum_g m2_g / n (tf-keras' mean of the chunks' biased variances); with one
    chunk that is plain biased batch norm. It stored the unbiased m2 / (n - G) whatever the option."""
    torch.manual_seed(5)
    x = torch.randn(7, 2, 3, dtype=torch.float64) * 2 + 1
    bn = bnkit.GhostBatchNorm1d(2, momentum=1.0, virtual_batch_size=3, variance="biased", dtype=torch.float64)
    bn(x)
    flat = [c.transpose(0, 1).reshape(2, -1).numpy() for c in x.split(3)]   # 9, 9, 3 values
    m2 = sum(((c - c.mean(1, keepdims=True)) ** 2).sum(1) for c in flat)
    np.testing.assert_allclose(bn.running_var.numpy(), m2 / 21, rtol=1e-12)
    one_chunk = bnkit.GhostBatchNorm1d(2, momentum=0.3, virtual_batch_size=8, variance="biased", dtype=torch.float64)
    plain = bnkit.BatchNorm1d(2, momentum=0.3, variance="biased", dtype=torch.float64)
    one_chunk(x), plain(x)
    torch.testing.assert_close(one_chunk.running_var, plain.running_var, rtol=1e-12, atol=0)
    torch.testing.assert_close(one_chunk.running_var, 0.7 + 0.3 * x.var((0, 2), correction=0), rtol=1e-12, atol=0)


def test_eval_without_running_stats_uses_the_whole_batch_as_torch_nn():
    """"Eval ignores virtual_batch_size" also without running statistics: torch.nn normalizes the whole
    batch there; chunking made the output depend on the chunks (1.6 off) and a last chunk of one raise."""
    torch.manual_seed(6)
    x = torch.randn(8, 3, 4) * 2 + torch.arange(8.0).view(8, 1, 1)
    ours = bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, track_running_stats=False).eval()
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
    torch.testing.assert_close(ours(x), ref(x))
    x5 = torch.randn(5, 3)
    ours.virtual_batch_size = 4                     # chunks [4, 1] in training
    torch.testing.assert_close(ours(x5), ref(x5))
    ours.virtual_batch_size = 2
    ours.train()                                    # training still chunks
    torch.testing.assert_close(ours(x), _chunked_torch(x, ours.weight, ours.bias, 2))


def test_single_sample_use_running_applies_as_in_the_plain_layer():
    ours = bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, single_sample="use_running")
    plain = bnkit.BatchNorm1d(3, single_sample="use_running")
    with torch.no_grad():
        for bn in (ours, plain):
            bn.running_mean.fill_(0.5)
            bn.running_var.fill_(2.0)
    x = torch.randn(1, 3)
    torch.testing.assert_close(ours(x), plain(x))    # the eval output, buffers unchanged
    assert int(ours.num_batches_tracked) == 0


def test_empty_batch_as_the_plain_layer():
    ours, plain = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), torch.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2)
    assert ours(x).shape == plain(x).shape == x.shape
    assert torch.equal(ours.running_var, plain.running_var)
    assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked) == 1


@pytest.mark.parametrize("make", [lambda: bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, single_sample="skip_update"),
                                  lambda: bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0, single_sample="skip_update")])
def test_single_sample_skip_update_applies_to_the_variants(make):
    """A batch of one under 'skip_update': x - mean is exactly 0, so the output is the bias (then the
    activation) and nothing updates, as for the plain layer (the variants used to raise)."""
    layer = make()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.25, -0.5, 1.0]))
    y = layer(torch.randn(1, 3) * 10)
    assert torch.equal(y, layer.bias.detach().expand(1, 3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))
