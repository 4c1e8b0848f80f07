"""torch tools that look layers up by exact type or compile their Python: the way through is one line.

``torch.ao.quantization.fuse_modules`` finds its fuser by the exact classes of the modules, and
``torch.jit.script`` compiles a module's Python forward, which bnkit's is not written for; so both
refuse bnkit layers, and ``bnkit.convert(model, "torch")`` (which refuses options torch.nn cannot
represent) is the step before them. ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` builds
torch.nn layers from anything it is given; ``bnkit.convert_sync_batchnorm`` keeps bnkit's options.
These tests back the compatibility table in the README: the failures are asserted too, so the
table gets updated when they start to work.
"""
import copy
import io

import pytest
import torch
from torch import nn

import bnkit


class _ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


def _trained():
    torch.manual_seed(0)
    model = _ConvBnRelu()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6) * 2 + 1)
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-1, 1)
    return model


def test_fuse_modules_after_convert_to_torch():
    from torch.ao.quantization import fuse_modules
    model = _trained().eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):  # looked up by exact type
        fuse_modules(copy.deepcopy(model), [["conv1", "bn1", "relu"]])
    fused = fuse_modules(bnkit.convert(copy.deepcopy(model), "torch"), [["conv1", "bn1", "relu"]])
    assert type(fused.conv1) is torch.ao.nn.intrinsic.ConvReLU2d and type(fused.bn1) is nn.Identity
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # batch norm folded into the conv


def test_convert_before_fusing_refuses_what_torch_cannot_fuse():
    model = _trained().eval()
    model.bn1.activation = "silu"
    with pytest.raises(ValueError, match=r"bn1 \(BatchNorm2d\(4\)\): activation='silu' has no equivalent"):
        bnkit.convert(model, "torch")
    assert type(model.bn1) is bnkit.BatchNorm2d


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_jit_script_after_convert_to_torch_trains_and_evaluates_the_same():
    model = _trained()
    with pytest.raises(Exception):  # bnkit's forward is not TorchScript
        torch.jit.script(copy.deepcopy(model))
    scripted = torch.jit.script(bnkit.convert(copy.deepcopy(model), "torch"))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for training in (True, True, False):
        model.train(training), loaded.train(training)
        x = torch.randn(4, 3, 6, 6)
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.bn1.running_var, model.bn1.running_var)
    assert int(loaded.bn1.num_batches_tracked) == int(model.bn1.num_batches_tracked) == 5


def test_torch_convert_sync_batchnorm_drops_bnkit_options_and_bnkits_keeps_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchNorm2d(4, activation="relu", nonfinite="raise")).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    by_torch = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(by_torch[1]) is nn.SyncBatchNorm and (by_torch(x) < 0).any()  # the activation is gone
    for convert in (bnkit.convert_sync_batchnorm, bnkit.SyncBatchNorm.convert_sync_batchnorm):
        synced = convert(copy.deepcopy(model))
        assert type(synced[1]) is bnkit.SyncBatchNorm
        assert (synced[1].activation, synced[1].nonfinite) == ("relu", "raise")
        assert torch.equal(synced(x), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input checks compare traced shapes
def test_jit_trace_of_an_eval_model_needs_no_conversion():
    model = _trained().eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 6, 6))
    assert "aten::batch_norm" in str(traced.bn1.graph)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(traced(x), model(x))
