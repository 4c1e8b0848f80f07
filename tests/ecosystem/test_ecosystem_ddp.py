"""DDP: a bnkit model trains under DistributedDataParallel exactly as the same torch.nn model does.

Two local processes (gloo, spawn, a file store: no port to race for) each train a bnkit model and an identical torch.nn
model, DDP-wrapped with the default ``broadcast_buffers=True``: at each forward rank 0's running
statistics are broadcast, then each rank updates them with its own batch. Parameters, gradients
and buffers of the two models must agree on every rank. A bnkit.SyncBatchNorm model under DDP must
train exactly as one process on the concatenated batch.
"""

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as tnn

import bnkit

STEPS = 3


def _model(bn2d, bn1d):
    torch.manual_seed(0)  # same initial weights on both ranks and in both models
    return tnn.Sequential(tnn.Conv2d(2, 4, 3), bn2d(4), tnn.ReLU(), tnn.Flatten(1), tnn.Linear(4 * 4 * 4, 3),
                          bn1d(3, momentum=None))


def _in_group(rank, world, out_dir, train):
    """``train(rank, out_dir)`` in a gloo group of ``world`` processes. Its DDP models are freed before the
    group is destroyed: a DistributedDataParallel still alive at interpreter exit, after
    ``destroy_process_group``, aborts the process (std::terminate in the reducer's teardown) in about one
    run in four with torch 2.13 on CPU, whatever the model; freed first, 0 of 30."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        train(rank, out_dir)
        gc.collect()
    finally:
        dist.destroy_process_group()


def _train_both(rank, out_dir):
    results = {}
    for name, (bn2d, bn1d) in {"bnkit": (bnkit.BatchNorm2d, bnkit.BatchNorm1d),
                               "torch": (tnn.BatchNorm2d, tnn.BatchNorm1d)}.items():
        model = tnn.parallel.DistributedDataParallel(_model(bn2d, bn1d))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(STEPS):
            x = torch.randn(5, 2, 6, 6, generator=gen) * (1 + rank) + rank
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results[name] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        results[name + "_grads"] = [p.grad.clone() for p in model.parameters()]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_trains_like_torch_nn(tmp_path):
    mp.spawn(_in_group, args=(2, str(tmp_path), _train_both), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, res in enumerate(ranks):
        assert res["bnkit"].keys() == res["torch"].keys()
        for key, ours in res["bnkit"].items():
            torch.testing.assert_close(ours, res["torch"][key], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
        for g_ours, g_theirs in zip(res["bnkit_grads"], res["torch_grads"]):
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
        assert int(res["bnkit"]["1.num_batches_tracked"]) == STEPS
    # DDP averaged the gradients: parameters agree across ranks; the running statistics do not (each rank
    # updated rank 0's broadcast values with its own last batch), exactly as with torch.nn.
    torch.testing.assert_close(ranks[0]["bnkit"]["1.weight"], ranks[1]["bnkit"]["1.weight"])
    assert not torch.allclose(ranks[0]["bnkit"]["1.running_mean"], ranks[1]["bnkit"]["1.running_mean"])


def _train_sync(rank, out_dir):
    model = tnn.parallel.DistributedDataParallel(bnkit.convert(_model(bnkit.BatchNorm2d, bnkit.BatchNorm1d),
                                                               to="sync"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x = _sync_batch(step)[rank * 5:(rank + 1) * 5]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, f"{out_dir}/sync{rank}.pt")


def _sync_batch(step):
    return torch.randn(10, 2, 6, 6, generator=torch.Generator().manual_seed(step)) * 2 + 1


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_sync_batch_norm_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_in_group, args=(2, str(tmp_path), _train_sync), nprocs=2, join=True)
    reference = _model(tnn.BatchNorm2d, tnn.BatchNorm1d)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(STEPS):  # equal shards: DDP's mean of per-rank mean losses is the mean over the batch
        opt.zero_grad()
        reference(_sync_batch(step)).square().mean().backward()
        opt.step()
    for rank in range(2):
        got = torch.load(tmp_path / f"sync{rank}.pt")
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"rank {rank} {k}: {m}")
