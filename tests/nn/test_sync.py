"""SyncBatchNorm with 2-3 local gloo processes against single-process torch.nn on the concatenated batch."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnkit
import bnkit.nn.sync as sync_module

C = 4


def _init(rank, world, init_file, timeout_s=30):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _check_against_concatenated(rank, ranks, sizes, dtype, group, atol):
    """Layer on this rank's slice vs torch.nn.BatchNorm2d on the batches of ``ranks`` concatenated.

    float64: within ``atol`` absolutely; float32: within ``atol`` absolutely *or* relatively (both
    sides round differently at mean 50, std 3).
    """
    rtol = 0 if dtype == torch.float64 else atol
    gen = torch.Generator().manual_seed(sum(sizes) * 7 + len(ranks))
    x_full = torch.randn(sum(sizes), C, 3, 2, generator=gen, dtype=dtype) * 3 + 50
    g_full = torch.randn(x_full.shape, generator=gen, dtype=dtype)
    weight, bias = torch.rand(C, generator=gen, dtype=dtype) + 0.5, torch.randn(C, generator=gen, dtype=dtype)
    start = sum(sizes[:ranks.index(rank)])
    part = slice(start, start + sizes[ranks.index(rank)])

    ours = bnkit.SyncBatchNorm(C, momentum=0.3, process_group=group, dtype=dtype)
    ref = torch.nn.BatchNorm2d(C, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    for step in range(2):
        x = x_full[part].clone().requires_grad_()
        xr = x_full.clone().requires_grad_()
        y, yr = ours(x), ref(xr)
        torch.testing.assert_close(y, yr[part], rtol=rtol, atol=atol)
        (y * g_full[part]).sum().backward()
        (yr * g_full).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad[part], rtol=rtol, atol=atol)
        for name in ("weight", "bias"):
            summed = getattr(ours, name).grad.clone()
            dist.all_reduce(summed, group=group)
            torch.testing.assert_close(summed, getattr(ref, name).grad, rtol=rtol, atol=atol * 100)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=rtol, atol=atol)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=rtol, atol=atol)
        ours.zero_grad()
        ref.zero_grad()
    assert int(ours.num_batches_tracked) == 2
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x_full[part]), ref(x_full)[part], rtol=rtol, atol=atol)


def _equality_worker(rank, world, init_file):
    _init(rank, world, init_file)
    _check_against_concatenated(rank, [0, 1, 2], [3, 0, 5], torch.float64, None, 1e-10)   # rank 1 empty
    _check_against_concatenated(rank, [0, 1, 2], [2, 5, 1], torch.float32, None, 1e-5)
    # Precision: float32 channels with mean 1e4 and std 0.1; the float64 merge keeps the variance.
    gen = torch.Generator().manual_seed(5)
    x_full = (torch.randn(12, C, 4, 4, generator=gen, dtype=torch.float64) * 0.1 + 1e4).float()
    precise = bnkit.SyncBatchNorm(C, momentum=1.0)
    precise(x_full[[0, 4, 7][rank]:[4, 7, 12][rank]])
    truth = x_full.double().transpose(0, 1).reshape(C, -1).var(dim=1)
    torch.testing.assert_close(precise.running_var.double(), truth, rtol=1e-3, atol=0)   # the foundation's bound for local BN
    # Sub-groups: every rank creates every group, in the same order.
    pair, alone = dist.new_group([0, 2]), dist.new_group([1])
    if rank == 1:
        _check_against_concatenated(rank, [1], [4], torch.float64, alone, 1e-10)
    else:
        _check_against_concatenated(rank, [0, 2], [3, 2], torch.float64, pair, 1e-10)
    # A model built with different channel counts on different ranks: a clear error on every rank.
    bad = bnkit.SyncBatchNorm(C + (rank == 0))
    try:
        bad(torch.randn(2, C + (rank == 0), 2, 2))
    except ValueError as e:
        assert "ranks disagree on num_features (between 4 and 5)" in str(e), e
    else:
        raise AssertionError("mismatched channel counts were not detected")
    dist.destroy_process_group()


def test_equals_single_process_bn_on_concatenated_batch(tmp_path):
    mp.spawn(_equality_worker, args=(3, str(tmp_path / "store")), nprocs=3)


def _dead_rank_worker(rank, world, init_file, result_file):
    _init(rank, world, init_file, timeout_s=3)
    bn = bnkit.SyncBatchNorm(3)
    if rank == 1:
        os._exit(0)             # dies before the collective
    start = time.monotonic()
    try:
        bn(torch.randn(4, 3))
    except RuntimeError as e:
        with open(result_file, "w") as f:
            f.write(f"{time.monotonic() - start:.1f}|{e}")
    # Skip interpreter teardown: destroying a gloo group whose peer vanished may abort the process
    # ("terminate called without an active exception") after the error above was already raised.
    os._exit(0)


def test_dead_rank_fails_with_clear_error_instead_of_hanging(tmp_path):
    result = tmp_path / "result"
    mp.spawn(_dead_rank_worker, args=(2, str(tmp_path / "store"), str(result)), nprocs=2)
    elapsed, message = result.read_text().split("|", 1)
    assert message.startswith("SyncBatchNorm(3): the all-reduce of the channel count across 2 ranks failed")
    assert float(elapsed) < 15


def test_without_process_group_falls_back_to_local_bn_with_one_warning(monkeypatch):
    monkeypatch.setattr(sync_module, "_warned_no_process_group", False)
    torch.manual_seed(0)
    x = torch.randn(6, C, 3, 3)
    ours, ref = bnkit.SyncBatchNorm(C), torch.nn.BatchNorm2d(C)
    with pytest.warns(UserWarning, match="torch.distributed is not initialized"):
        y = ours(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnkit.SyncBatchNorm(C)(x)                      # second layer, second call: no warning


def test_virtual_batch_size_refused():
    with pytest.raises(TypeError, match=r"SyncBatchNorm\(4\): virtual_batch_size=2 is now"):
        bnkit.SyncBatchNorm(4, virtual_batch_size=2)
