"""Gradient accumulation: running statistics updated once per k micro-batches, as one big batch."""
import copy

import pytest
import torch

import bnkit


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


@pytest.mark.parametrize("bn_cls", [bnkit.BatchNorm1d, torch.nn.BatchNorm1d])
def test_accumulate_pools_only_batches_the_layer_accepted(bn_cls):
    bn = bn_cls(3)
    good = [torch.randn(4, 3) + 1, torch.randn(4, 3) - 2]
    with bnkit.accumulate(bn, steps=2):
        bn(good[0])
        for bad in (torch.randn(1, 3), torch.randn(4, 5)):  # a batch of one; a wrong channel count
            with pytest.raises((ValueError, RuntimeError)):
                bn(bad)
            assert bn.track_running_stats  # put back after each call, also a refused one
        bn(good[1])
    ref = torch.nn.BatchNorm1d(3)
    ref(torch.cat(good))
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1
    assert not [k for k in vars(bn) if k.startswith("_bnkit")]  # accumulate leaves nothing on the layer


@pytest.mark.parametrize("bn_cls", [bnkit.BatchNorm1d, torch.nn.BatchNorm1d])
def test_nested_accumulate_is_refused_and_leaves_the_layer_as_it_was(bn_cls):
    bn = bn_cls(3)
    with bnkit.accumulate(bn, steps=2):
        with pytest.raises(RuntimeError, match="already inside an accumulate"):
            with bnkit.accumulate(bn, steps=3):
                pass
    x = torch.randn(4, 3)
    bn(x)  # back to normal: one update per call
    ref = torch.nn.BatchNorm1d(3)
    ref(x)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="steps must be a positive int"):
        with bnkit.accumulate(bn, steps=True):
            pass


@pytest.mark.parametrize("bn_cls", [bnkit.BatchNorm1d, torch.nn.BatchNorm1d])
def test_eval_mode_calls_inside_the_context_are_not_pooled(bn_cls):
    # A validation batch between micro-batches normalizes with the running statistics and must not enter
    # them (torch.nn itself does not update in eval); before the fix torch.nn layers pooled it (mean off
    # by 2.6 here) and counted an extra update.
    torch.manual_seed(0)
    micro = [torch.randn(4, 3) + 1, torch.randn(4, 3) - 1]
    bn = bn_cls(3)
    with bnkit.accumulate(bn, steps=2):
        bn(micro[0])
        bn.eval()
        bn(torch.randn(4, 3) * 10 + 50)
        bn.train()
        bn(micro[1])
    ref = torch.nn.BatchNorm1d(3)
    ref(torch.cat(micro))
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_torch_layer_called_with_the_input_keyword_is_pooled():
    # torch.nn.BatchNorm*d.forward(input): bn(input=x) is a valid call; accumulate's hook read args[0]
    # only and raised IndexError.
    micro = [torch.randn(4, 3) + 1, torch.randn(4, 3) - 1]
    bn = torch.nn.BatchNorm1d(3)
    with bnkit.accumulate(bn, steps=2):
        for x in micro:
            bn(input=x)
    ref = torch.nn.BatchNorm1d(3)
    ref(torch.cat(micro))
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_ghost_layer_is_refused_before_any_layer_changes():
    # The ghost layer refused its moments hook only in its forward, after the layers before it had pooled the
    # micro-batch; the context's exit then folded that into their running statistics (num_batches_tracked 1).
    model = torch.nn.Sequential(bnkit.BatchNorm1d(3), torch.nn.BatchNorm1d(3),
                                bnkit.GhostBatchNorm1d(3, virtual_batch_size=2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"accumulate: GhostBatchNorm1d\(3\) \(2\): ghost-batch statistics"):
        with bnkit.accumulate(model, steps=2):
            model(torch.randn(8, 3) + 5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].stats_frozen is None and not model[0]._moments_hooks and not model[1]._forward_hooks
    bnkit.freeze_stats(model[2])  # frozen, it is left alone and the others accumulate
    with bnkit.accumulate(model, steps=2):
        model(torch.randn(8, 3))
    assert model[0].num_batches_tracked.item() == 1 and model[2].num_batches_tracked.item() == 0


def test_batch_renorm_under_accumulate_updates_its_renorm_statistics_as_one_batch():
    """renorm_mean/renorm_std (what r and d are measured against) fold the pooled micro-batches too:
    they stayed at 0 and 1 under accumulate (r, d then measured against a fresh layer forever)."""
    torch.manual_seed(0)
    ours = bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0, renorm_momentum=0.1).double()
    one_batch = bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0, renorm_momentum=0.1).double()
    xs = [torch.randn(8, 3, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    with bnkit.accumulate(ours, steps=2):
        for x in xs:
            ours(x)
    one_batch(torch.cat(xs))
    for name, value in one_batch.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=1e-15, msg=name)
    assert not torch.equal(ours.renorm_mean, torch.zeros(3, dtype=torch.float64))
