"""The running-statistics rule (bnkit.stats.running): the non-finite check and the one in-place commit,
against torch.isfinite and hand-computed values."""
import pytest
import torch

from bnkit.stats.running import commit, finite, nonfinite_flag

SPECIALS = (float("nan"), float("inf"), -float("inf"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_fused_check_agrees_with_isfinite(dtype):
    torch.manual_seed(0)
    for special in SPECIALS + (None,):
        for where in range(6):
            a, b = torch.randn(2, 3, dtype=dtype), torch.randn(5, dtype=dtype)
            if special is not None:
                (a.view(-1)[where] if where < 3 else b[where - 3:where - 2]).fill_(special)
            want = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            before = (a.clone(), b.clone())
            flag = nonfinite_flag(a, b)
            assert flag.dtype == torch.float32 and flag.shape == () and flag.item() == (0.0 if want else 1.0)
            assert finite(a, b).item() is want
            for t, old in zip((a, b), before):  # the check multiplies by 1.0: nothing changes, -0.0 included
                torch.testing.assert_close(t, old, equal_nan=True, rtol=0, atol=0)


def test_the_check_keeps_signed_zeros_and_works_on_meta():
    z = torch.tensor([-0.0, 0.0, 1.0])
    assert finite(z).item() and torch.equal(torch.signbit(z), torch.tensor([True, False, False]))
    assert finite(torch.empty(2, 3, device="meta")).device.type == "meta"


def test_the_check_under_vmap_is_per_sample():
    """torch.func has no batching rule for the fused op: the isfinite form runs there, per sample."""
    x = torch.randn(4, 3)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    assert torch.vmap(finite)(x).tolist() == [True, False, True, False]


@pytest.mark.parametrize("flag", [False, True])
def test_commit_takes_new_values_only_where_kept_and_counts(flag):
    mean, var, nbt, skipped = torch.zeros(2), torch.ones(2), torch.tensor(5), torch.zeros(())
    for new_mean, expect_kept in ((torch.tensor([1.0, 2.0]), True), (torch.tensor([float("nan"), 3.0]), False)):
        new_var = torch.tensor([4.0, 5.0])
        skip = nonfinite_flag(new_mean, new_var)
        keep = skip.logical_not()
        old = (mean.clone(), var.clone())
        commit(mean, var, nbt, new_mean, new_var, keep, skipped, skip if flag else None)
        assert torch.equal(mean, new_mean if expect_kept else old[0])
        assert torch.equal(var, new_var if expect_kept else old[1])
    assert nbt.item() == 6 and skipped.item() == 1.0
    commit(mean, var, nbt, torch.tensor([7.0, 8.0]), torch.tensor([9.0, 9.0]), None)  # no guard: always taken
    assert mean.tolist() == [7.0, 8.0] and var.tolist() == [9.0, 9.0] and nbt.item() == 7
