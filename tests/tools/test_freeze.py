"""Frozen statistics: no running update, gamma/beta still train, survives model.train(), torch.nn layers too."""
import pytest
import torch

import bnkit


def _model(bn_cls):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn_cls(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1),
                               bn_cls(2))


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("bn_cls", [bnkit.BatchNorm2d, torch.nn.BatchNorm2d])
@pytest.mark.parametrize("use_running", [False, True])
def test_freeze_survives_train_and_keeps_affine_training(bn_cls, use_running):
    model = _model(bn_cls)
    model(torch.randn(8, 3, 6, 6))  # some non-trivial running statistics
    bnkit.freeze_stats(model, use_running=use_running)
    model.eval()
    model.train()  # must not undo the freeze
    before = _buffers(model)
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    out = model(x)
    out.sum().backward()
    for k, v in _buffers(model).items():
        assert torch.equal(v, before[k]), k
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    assert model[1].training  # the mode flag is the user's; only the statistics are frozen
    # which statistics normalized: compare layer 1 against torch.nn in the matching mode
    ref = torch.nn.BatchNorm2d(4)
    ref.load_state_dict(model[1].state_dict())
    ref.train(not use_running)
    h = model[0](x)
    torch.testing.assert_close(model[1](h), ref(h), rtol=1e-6, atol=1e-6)
    bnkit.unfreeze_stats(model)
    model(x)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_frozen_stats_context_restores_previous_state():
    model = _model(bnkit.BatchNorm2d)
    bnkit.freeze_stats(model[4:])  # last layer already frozen before the context
    with bnkit.frozen_stats(model, use_running=True):
        assert model[1].stats_frozen == "running" and model[4].stats_frozen == "running"
    assert model[1].stats_frozen is None and model[4].stats_frozen == "batch"
    tmodel = _model(torch.nn.BatchNorm2d)
    with bnkit.frozen_stats(tmodel):
        tmodel(torch.randn(4, 3, 6, 6))
    assert tmodel[1].num_batches_tracked.item() == 0
    tmodel(torch.randn(4, 3, 6, 6))
    assert tmodel[1].num_batches_tracked.item() == 1 and tmodel[1].track_running_stats


def test_freeze_without_batch_norm_is_an_error():
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        bnkit.freeze_stats(torch.nn.Linear(2, 2))


def test_frozen_batch_of_one_with_running_stats_is_allowed():
    bn = bnkit.BatchNorm1d(3)
    bnkit.freeze_stats(bn, use_running=True)
    y = bn(torch.randn(1, 3))  # the fix the batch-of-one error message suggests
    assert y.shape == (1, 3)


def test_set_stats_frozen_mode_per_layer_on_torch_and_bnkit_layers():
    from bnkit.tools.freezing import set_stats_frozen_mode, stats_frozen_mode
    for layer in (torch.nn.BatchNorm1d(3), bnkit.BatchNorm1d(3)):
        set_stats_frozen_mode(layer, "batch")
        assert stats_frozen_mode(layer) == "batch"
        x = torch.randn(4, 3) + 2
        y = layer(x)
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias,
                                                                     training=True))
        assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked.item() == 0
        set_stats_frozen_mode(layer, None)
        layer(x)
        assert layer.num_batches_tracked.item() == 1
        with pytest.raises(ValueError, match="mode must be None, 'batch' or 'running'"):
            set_stats_frozen_mode(layer, "frozen")
