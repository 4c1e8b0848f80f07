"""The torch path of the kernel (bnkit/ops/torch_ops.py, activations.py) against float64 references:
autograd's gradcheck in float64 for every activation, torch.nn's eval computation, and the activation
names the ops accept."""
import pytest
import torch
import torch.nn.functional as F

import bnkit
from bnkit.ops import apply_activation, eval_scale_shift, normalize, normalize_running

ACTIVATIONS = [("identity", 0.01), ("relu", 0.01), ("leaky_relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", 1.0),
               ("silu", 0.01)]


def _float64(c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c, 2, 3, generator=g, dtype=torch.float64)
    mean, var = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    return x, mean, var, weight, bias


@pytest.mark.parametrize("activation,slope", ACTIVATIONS, ids=str)
def test_normalize_gradcheck_float64(activation, slope):
    # every input differentiable, the statistics included (what ghost/renorm/sync backpropagate through)
    args = [t.requires_grad_() for t in _float64()]
    assert torch.autograd.gradcheck(lambda *t: normalize(*t, 1e-5, activation, slope), args)
    x, mean, var, weight, bias = (t.detach() for t in args)
    view = (1, -1, 1, 1)
    want = apply_activation((x - mean.view(view)) / (var.view(view) + 1e-5).sqrt() * weight.view(view)
                            + bias.view(view), activation, slope)
    torch.testing.assert_close(normalize(x, mean, var, weight, bias, 1e-5, activation, slope), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normalize_running(x, mean, var, weight, bias, 1e-5, activation, slope), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_normalize_keeps_dtype_and_channels_last_and_computes_in_float32(dtype):
    x, mean, var, weight, bias = _float64(5)
    x = (x * 3 + 1).to(dtype).to(memory_format=torch.channels_last)
    y = normalize(x, mean.float(), var.float(), weight.half(), None, 1e-5, "silu")
    view = (1, -1, 1, 1)
    want = F.silu((x.double() - mean.float().double().view(view)) / (var.float().double().view(view) + 1e-5).sqrt()
                  * weight.half().double().view(view))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2 * torch.finfo(dtype).eps * want.abs().max().item())


def test_eval_scale_shift_is_the_eval_map():
    x, mean, var, weight, bias = _float64()
    for w, b in ((weight, bias), (None, None)):
        scale, shift = eval_scale_shift(mean, var, w, b, 1e-3, torch.float64)
        want = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-3)
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gelu", "ReLU", torch.nn.ReLU()], ids=repr)
def test_unknown_activation_is_an_error_not_identity(name):
    # apply_activation ran anything it did not know as identity: a layer whose activation attribute
    # was set to "gelu", "ReLU" or nn.ReLU() after construction silently lost its activation
    message = f"unknown activation {name!r}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=message):
        apply_activation(torch.randn(3), name)
    bn = bnkit.BatchNorm2d(3)
    bn.activation = name
    for mode in ("train", "eval"):
        with pytest.raises(ValueError, match=message):
            getattr(bn, mode)()(torch.randn(4, 3, 2, 2))
