"""bnkit.stats.Moments: Chan merges against float64 statistics of the concatenated data."""
import pytest
import torch

import bnkit
from bnkit.stats import Moments


def _float64_moments(x):
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(1)
    return flat.shape[1], mean, ((flat - mean[:, None]) ** 2).sum(1)


@pytest.mark.parametrize("sizes", [(0, 5), (5, 0), (0, 0, 3), (1, 4), (4, 1), (1, 1)])
def test_merge_with_empty_and_one_sample_parts_gives_the_statistics_of_the_concatenation(sizes):
    torch.manual_seed(0)
    parts = [torch.randn(n, 3, 2, 2) * 2 + 7 for n in sizes]
    merged = Moments.of(parts[0])
    for p in parts[1:]:
        merged = merged.merge(Moments.of(p))
    count, mean, m2 = _float64_moments(torch.cat(parts))
    assert merged.count.tolist() == [count] * 3
    torch.testing.assert_close(merged.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged.m2.double(), m2, rtol=1e-5, atol=1e-5)


def test_moments_of_an_empty_batch_are_zero_not_nan():
    m = Moments.of(torch.randn(0, 3, 4, dtype=torch.float16))
    assert m.mean.dtype == torch.float32
    assert m.count.tolist() == m.mean.tolist() == m.m2.tolist() == [0.0] * 3


def test_accumulate_with_an_empty_micro_batch_pools_the_other_one_as_torch_does():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2) + 5
    bn, ref = bnkit.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with bnkit.accumulate(bn, steps=2):
        bn(x)
        bn(x[:0])
    ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bnkit.nonfinite_report(bn) == {}


def test_merge_of_large_counts_does_not_overflow():
    # float16 moments: the product of the counts (90000) is beyond float16's 65504, the merged m2 is not
    a = Moments(*(torch.tensor([v], dtype=torch.float16) for v in (300.0, 0.0, 300.0)))
    b = Moments(*(torch.tensor([v], dtype=torch.float16) for v in (300.0, 1.0, 300.0)))
    m = a.merge(b)
    assert (m.count.item(), m.mean.item(), m.m2.item()) == (600.0, 0.5, 750.0)  # 300 + 300 + 1 * 300*300/600


@pytest.mark.xfail(strict=True, reason="counts are kept in the moments' float32: beyond 2**24 adding a small "
                                       "part no longer changes the count")
def test_counts_beyond_float32_integers_keep_growing():
    big = Moments(torch.tensor([2.0 ** 25]), torch.tensor([0.0]), torch.tensor([2.0 ** 25]))
    one = Moments(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]))
    m = big
    for _ in range(10):
        m = m.merge(one)
    assert m.count.item() == 2 ** 25 + 10
