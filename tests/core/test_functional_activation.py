"""The functional forms take ``activation=`` exactly as the layers do (a name or nn.ReLU(), nn.LeakyReLU(s),
nn.SiLU(), nn.Identity()), checked against torch's batch norm followed by torch's activation, and refuse
the old ``negative_slope=`` keyword with the new spelling."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.functional import batch_norm, batch_norm_stateless

CASES = [(None, lambda t: t), ("identity", lambda t: t), ("relu", F.relu), ("leaky_relu", F.leaky_relu),
         ("silu", F.silu), (nn.Identity(), lambda t: t), (nn.ReLU(), F.relu), (nn.SiLU(), F.silu),
         (nn.LeakyReLU(), F.leaky_relu), (nn.LeakyReLU(0.2), lambda t: F.leaky_relu(t, 0.2)),
         (nn.LeakyReLU(-0.5), lambda t: F.leaky_relu(t, -0.5))]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=g, dtype=torch.float64)
    return x, w, b


@pytest.mark.parametrize("activation,fn", CASES, ids=repr)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_activation_equals_torch_then_activation(activation, fn, training):
    x, w, b = _data()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training=training, activation=activation)
    torch.testing.assert_close(y, fn(F.batch_norm(x, rm_t, rv_t, w, b, training=training)), rtol=0, atol=1e-12)
    torch.testing.assert_close((rm, rv), (rm_t, rv_t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation,fn", CASES, ids=repr)
def test_stateless_activation_equals_torch_then_activation_and_the_layer(activation, fn):
    x, w, b = _data(1)
    y, _ = batch_norm_stateless(x, {"weight": w, "bias": b}, None, activation=activation)
    torch.testing.assert_close(y, fn(F.batch_norm(x, None, None, w, b, training=True)), rtol=0, atol=1e-12)
    layer = bnkit.BatchNorm1d(3, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-12)


RM, RV = torch.zeros(3), torch.ones(3)


@pytest.mark.parametrize("call,name", [
    (lambda **kw: batch_norm(torch.randn(4, 3), RM, RV, training=True, **kw), "batch_norm"),
    (lambda **kw: batch_norm_stateless(torch.randn(4, 3), None, {"running_mean": RM, "running_var": RV}, **kw),
     "batch_norm_stateless")])
def test_old_negative_slope_keyword_names_the_new_spelling(call, name):
    with pytest.raises(TypeError, match=rf"^{name}: negative_slope=0.2 is now activation=torch.nn.LeakyReLU\(0.2\)$"):
        call(activation="leaky_relu", negative_slope=0.2)
    # the layers' other old keywords never applied to the functional form: plainly unexpected here
    with pytest.raises(TypeError, match=rf"^{name}: unexpected keyword argument\(s\) 'decay'$"):
        call(decay=0.9)
    with pytest.raises(ValueError, match=rf"^{name}: activation GELU\(approximate='none'\) cannot be fused"):
        call(activation=nn.GELU())
    with pytest.raises(ValueError, match=rf"^{name}: unknown activation 'tanh'"):
        call(activation="tanh")
    assert torch.equal(RM, torch.zeros(3)) and torch.equal(RV, torch.ones(3))  # refused before any update
