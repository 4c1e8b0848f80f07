"""bnkit layers are instances of the matching torch.nn classes, so the ecosystem's isinstance checks find them.

fvcore's and timm's own helpers are used where they install; faithful copies of their checks run always.
"""
import pytest
import torch
from torch import nn

import bnkit


def _model(bn=bnkit.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3), bn(4))


@pytest.mark.parametrize("ours,theirs", [
    (bnkit.BatchNorm1d(3), nn.BatchNorm1d), (bnkit.BatchNorm2d(3), nn.BatchNorm2d),
    (bnkit.BatchNorm3d(3), nn.BatchNorm3d), (bnkit.LazyBatchNorm2d(), nn.BatchNorm2d),
    (bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0), nn.BatchNorm2d), (bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0), nn.BatchNorm1d),
])
def test_isinstance_of_the_torch_class(ours, theirs):
    assert isinstance(ours, theirs) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(bnkit.BatchNorm2d(3), nn.BatchNorm1d)


def test_repr_and_state_dict_are_torchs():
    ours, theirs = bnkit.BatchNorm2d(5, momentum=0.2), nn.BatchNorm2d(5, momentum=0.2)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]


def _fvcore_get_bn_modules(model):  # fvcore.nn.precise_bn.get_bn_modules, faithfully
    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return [m for m in model.modules() if m.training and isinstance(m, types)]


def _timm_freeze_count(model):  # timm.layers.norm's freeze_batch_norm_2d check, faithfully
    return sum(isinstance(m, (nn.modules.batchnorm.BatchNorm2d, nn.modules.batchnorm.SyncBatchNorm))
               for m in model.modules())


def test_faithful_copies_of_fvcore_and_timm_checks_find_every_layer():
    model = _model()
    assert len(_fvcore_get_bn_modules(model)) == 2
    assert _timm_freeze_count(model) == 2
    decay = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]  # weight-decay filters
    assert decay == ["1", "4"]


def test_fvcore_precise_bn_updates_bnkit_layers():
    precise_bn = pytest.importorskip("fvcore.nn.precise_bn")
    model = _model()
    data = [torch.randn(8, 3, 8, 8) * 2 + 1 for _ in range(4)]
    assert len(precise_bn.get_bn_modules(model)) == 2
    precise_bn.update_bn_stats(model, data, num_iters=4)
    ref = _model(nn.BatchNorm2d)
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    precise_bn.update_bn_stats(ref, data, num_iters=4)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


def test_timm_freeze_finds_bnkit_layers():
    timm_norm = pytest.importorskip("timm.layers")
    model = timm_norm.freeze_batch_norm_2d(_model())
    assert sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules()) == 2


def test_swa_update_bn_resets_and_recomputes_bnkit_layers():
    model = _model()
    data = [torch.randn(8, 3, 8, 8) + 3 for _ in range(3)]
    ref = _model(nn.BatchNorm2d)
    ref.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn(data, model)
    torch.optim.swa_utils.update_bn(data, ref)
    torch.testing.assert_close(model[4].running_mean, ref[4].running_mean)
    torch.testing.assert_close(model[4].running_var, ref[4].running_var)
