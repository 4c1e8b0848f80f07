"""torch.fx symbolic tracing and the tools built on it see bnkit layers as torch.nn's: one leaf node each.

The reference is torch.nn itself: the same model with torch.nn layers is traced too, and the two
graphs, their outputs in train and eval, and the running statistics after training steps must be
equal. torchvision's feature extraction is tested where torchvision imports (not in the test extra).
"""
import copy
import warnings

import pytest
import torch
from torch import fx, nn

import bnkit


def _models(dims: int):
    """A small torch.nn model with batch norm of ``dims`` dimensions, and its bnkit conversion."""
    torch.manual_seed(0)
    if dims == 1:
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))
        shape = (8, 5)
    elif dims == 2:
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                              nn.BatchNorm2d(4, momentum=None))
        shape = (4, 3, 7, 6)
    else:
        model = nn.Sequential(nn.Conv3d(2, 5, 2), nn.BatchNorm3d(5), nn.ReLU())
        shape = (3, 2, 4, 4, 3)
    return model, bnkit.convert(copy.deepcopy(model), "bnkit"), shape


def _nodes(gm: fx.GraphModule):
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_symbolic_trace_graph_and_numbers_equal_torch_nn(dims):
    torch_model, model, shape = _models(dims)
    eager = copy.deepcopy(model)  # the traced graph calls the model's own layers
    traced_torch, traced = fx.symbolic_trace(torch_model), fx.symbolic_trace(model)
    assert _nodes(traced) == _nodes(traced_torch)
    assert all(isinstance(traced.get_submodule(t), bnkit.BatchNormBase) for op, t in _nodes(traced)
               if op == "call_module" and "BatchNorm" in type(traced_torch.get_submodule(t)).__name__)
    for training in (True, True, True, False):  # training steps, then eval
        for m in (traced, traced_torch, eager):
            m.train(training)
        x = torch.randn(*shape)
        y = traced(x)
        assert torch.equal(y, eager(x))  # tracing changes nothing: bit for bit
        torch.testing.assert_close(y, traced_torch(x))  # and torch.nn's numbers (bnkit's own parity tolerance)
    for key, value in traced_torch.state_dict().items():
        assert torch.equal(traced.state_dict()[key], eager.state_dict()[key]), key
        torch.testing.assert_close(traced.state_dict()[key], value, msg=key)


def test_traced_in_eval_and_mode_kept():
    torch_model, model, shape = _models(2)
    model.eval()
    traced = fx.symbolic_trace(model)
    assert not model.training and not any(m.training for m in model.modules())
    x = torch.randn(*shape)
    assert torch.equal(traced(x), torch_model.eval()(x))  # eval is torch's own computation


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = bnkit.BatchNorm1d(3, axis=-1, activation="silu")

    def forward(self, x, lengths):
        return self.bn(x, lengths=lengths) * 2  # (N, L, C) input


@pytest.mark.parametrize("make, args", [
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 1), bnkit.BatchNorm2d(4, activation="leaky_relu", momentum=bnkit.momentum.Decay(0.9))),
     lambda: (torch.randn(6, 2, 3, 3),)),
    (lambda: nn.Sequential(bnkit.GhostBatchNorm2d(2, virtual_batch_size=2)), lambda: (torch.randn(6, 2, 3, 3),)),
    (lambda: nn.Sequential(bnkit.BatchRenorm2d(2, rmax=1.5, dmax=0.5)), lambda: (torch.randn(6, 2, 3, 3),)),
    (lambda: nn.Sequential(bnkit.FrozenBatchNorm2d(2, activation="relu")), lambda: (torch.randn(6, 2, 3, 3),)),
    (lambda: nn.Sequential(bnkit.SyncBatchNorm(2)), lambda: (torch.randn(6, 2, 3),)),
    (lambda: _Masked(), lambda: (torch.randn(4, 5, 3), torch.tensor([5, 2, 3, 1]))),
])
def test_bnkit_options_trace_to_the_layers_own_computation(make, args):
    torch.manual_seed(0)
    eager = make()
    with torch.no_grad():
        for m in eager.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 2)
    traced = fx.symbolic_trace(copy.deepcopy(eager))
    assert [n.op for n in traced.graph.nodes].count("call_module") == \
        sum(isinstance(m, (bnkit.BatchNormBase, bnkit.FrozenBatchNorm, nn.Conv2d)) for m in eager.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyncBatchNorm without a process group says so
        for training in (True, True, False):
            eager.train(training), traced.train(training)
            torch.manual_seed(1)
            a = args()
            assert torch.equal(traced(*a), eager(*a))
    for key, value in eager.state_dict().items():
        assert torch.equal(traced.state_dict()[key], value), key


def test_mask_is_recorded_as_a_keyword_of_the_layer_call():
    model = _Masked()
    traced = fx.symbolic_trace(model)
    (call,) = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert call.target == "bn" and set(call.kwargs) == {"lengths"}


def test_domain_batch_norm_traces_the_selected_domain():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bnkit.DomainBatchNorm2d(3, num_domains=2))
    with bnkit.use_domain(model, 1):
        traced = fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1.domains.1"]
    x = torch.randn(4, 2, 3, 3)
    with bnkit.use_domain(model, 1):
        expected = model(x)
    assert torch.equal(traced(x), expected)


def test_a_bare_layer_as_root_is_refused_with_the_way_out():
    layer = bnkit.BatchNorm2d(3).eval()
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(3\): .*is the root.*Sequential\(layer\)"):
        fx.symbolic_trace(layer)
    assert not layer.training
    traced = fx.symbolic_trace(nn.Sequential(layer))
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(traced(x), layer(x))


def test_a_layer_with_hooks_is_refused_before_anything_runs_twice():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bnkit.BatchNorm2d(3)).eval()
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(3\) \(1\): has forward hooks"):
        fx.symbolic_trace(model)
    assert not model.training


def test_fx_quantization_traces_but_fuses_only_torch_layers():
    """prepare_fx traces a bnkit model but, looking modules up by type, neither fuses nor quantizes bnkit
    layers; bnkit.convert(model, "torch") first gives torch's fused, quantized model."""
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qconfig_mapping
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes for torch.ao quantization
        prepared = quantize_fx.prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
        assert type(prepared.get_submodule("1")) is bnkit.BatchNorm2d  # not fused into the conv
        torch_model = bnkit.convert(copy.deepcopy(model), "torch")
        prepared = quantize_fx.prepare_fx(torch_model, get_default_qconfig_mapping(), (x,))
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
        prepared(x)
        quantized = quantize_fx.convert_fx(prepared)
    assert (quantized(x) - expected).abs().max() < 0.05 * expected.abs().max()


def _feature_extraction():
    try:
        from torchvision.models import feature_extraction
    except Exception as e:  # not installed, or a build that does not load with this torch
        pytest.skip(f"torchvision is not usable here: {type(e).__name__}: {e}")
    return feature_extraction


@pytest.mark.parametrize("training", [True, False])
def test_torchvision_feature_extraction_as_with_torch_nn(training):
    feature_extraction = _feature_extraction()
    from torchvision.models import resnet18
    torch.manual_seed(0)
    torch_model = resnet18(num_classes=4).train(training)
    model = bnkit.convert(copy.deepcopy(torch_model), "bnkit")
    assert feature_extraction.get_graph_node_names(model) == feature_extraction.get_graph_node_names(torch_model)
    assert model.training == training and all(m.training == training for m in model.modules())
    nodes = ["layer1.0.bn1", "layer2.1.relu_1", "layer4"]
    extract_torch = feature_extraction.create_feature_extractor(torch_model, nodes).train(training)
    extract = feature_extraction.create_feature_extractor(model, nodes).train(training)
    assert isinstance(extract.get_submodule("layer1.0.bn1"), bnkit.BatchNorm2d)
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32)
        a, b = extract_torch(x), extract(x)
        assert all(torch.equal(a[k], b[k]) for k in nodes)
    assert torch.equal(extract.get_submodule("layer1.0.bn1").running_mean,
                       extract_torch.get_submodule("layer1.0.bn1").running_mean)
