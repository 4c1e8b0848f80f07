"""torch.export and ONNX: eval-mode bnkit layers export as one standard batch-norm node.

While exporting, the eval path calls torch's own ``batch_norm(training=False)`` (see
``bnkit.ops.normalize_running``), so torch.export holds aten's batch-norm op and ONNX a
``BatchNormalization`` node; onnxruntime's output equals PyTorch's within 1e-5.
The ONNX tests need ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``test`` extra) and skip without them.
"""
import warnings

import pytest
import torch

import bnkit

SHAPES = {bnkit.BatchNorm1d: (4, 3), bnkit.BatchNorm2d: (2, 3, 5, 4), bnkit.BatchNorm3d: (2, 3, 3, 2, 2)}


def _eval_layer(cls, **kwargs):
    torch.manual_seed(0)
    layer = cls(3, **kwargs).eval()
    with torch.no_grad():  # statistics and parameters far from the defaults, so a mix-up shows
        layer.running_mean.uniform_(-2, 2)
        layer.running_var.uniform_(0.5, 3)
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 2)
            layer.bias.uniform_(-1, 1)
    return layer


def _batch_norm_nodes(graph_module):
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


@pytest.mark.parametrize("cls,strict", [(cls, False) for cls in SHAPES] + [(bnkit.BatchNorm2d, True)])
def test_torch_export_holds_one_batch_norm_op(cls, strict):
    layer = _eval_layer(cls)
    x = torch.randn(*SHAPES[cls])
    ep = torch.export.export(layer, (x,), strict=strict)
    assert len(_batch_norm_nodes(ep.graph_module)) == 1, ep.graph_module.code
    decomposed = ep.run_decompositions({})  # the core ATen IR that backends and ONNX consume
    assert [str(n.target) for n in _batch_norm_nodes(decomposed.graph_module)] == \
        ["aten._native_batch_norm_legit_no_training.default"]
    reference = torch.nn.modules.batchnorm.__dict__[cls.__name__](3).eval()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(ep.module()(x), reference(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ep.module()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_eager_eval_is_torchs_computation():
    # Eval is torch's own batch_norm(training=False): the same bits as torch.nn, also for a channel whose
    # mean is large next to its std (where x * scale + shift cancels digits, in torch and bnkit alike).
    layer = bnkit.BatchNorm1d(1).eval()
    torch_layer = torch.nn.BatchNorm1d(1).eval()
    x = (1e4 + 0.1 * torch.randn(64, 1, dtype=torch.float64)).float()
    for m in (layer, torch_layer):
        m.running_mean.fill_(1e4)
        m.running_var.fill_(0.01)
    assert torch.equal(layer(x), torch_layer(x))


@pytest.fixture(scope="module")
def onnx():
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the test extra)")
    pytest.importorskip("onnxruntime", reason="comparing with onnxruntime needs it (the test extra)")
    return pytest.importorskip("onnx")


def _onnx_ops(model_proto):
    return [n.op_type for n in model_proto.graph.node]


def _run_ort(path_or_bytes, x):
    import onnxruntime as ort

    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("cls,kwargs", [(bnkit.BatchNorm1d, {}), (bnkit.BatchNorm2d, {"activation": "relu"}),
                                        (bnkit.BatchNorm3d, {"affine": False})])
def test_onnx_dynamo_exporter_batch_normalization(onnx, cls, kwargs, tmp_path):
    layer = _eval_layer(cls, **kwargs)
    x = torch.randn(*SHAPES[cls])
    program = torch.onnx.export(layer, (x,), dynamo=True, verbose=False)  # torch 2.13's default exporter
    ops = _onnx_ops(program.model_proto)
    assert ops.count("BatchNormalization") == 1, ops
    assert ("Relu" in ops) == (kwargs.get("activation") == "relu")
    path = tmp_path / "bn.onnx"
    program.save(path)
    torch.testing.assert_close(_run_ort(str(path), x), layer(x), rtol=1e-5, atol=1e-5)


def test_onnx_legacy_exporter_batch_normalization(onnx, tmp_path):
    layer = _eval_layer(bnkit.BatchNorm2d)
    x = torch.randn(*SHAPES[bnkit.BatchNorm2d])
    path = tmp_path / "bn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and warns about traced checks
        torch.onnx.export(layer, (x,), str(path), dynamo=False)
    assert _onnx_ops(onnx.load(str(path))) == ["BatchNormalization"]
    torch.testing.assert_close(_run_ort(str(path), x), layer(x), rtol=1e-5, atol=1e-5)


def test_onnx_conv_bn_model_folds_and_matches(onnx, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1), bnkit.BatchNorm2d(4)).eval()
    for _, bn in bnkit.batch_norm_layers(model):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = _onnx_ops(program.model_proto)
    assert "Sub" not in ops and "Div" not in ops, ops  # folded into the convolutions, or BatchNormalization
    path = tmp_path / "model.onnx"
    program.save(path)
    x5 = torch.randn(5, 3, 9, 9)  # another batch size through the dynamic dimension
    torch.testing.assert_close(_run_ort(str(path), x5), model(x5), rtol=1e-5, atol=1e-5)
