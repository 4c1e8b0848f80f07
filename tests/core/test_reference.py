"""The torch path against the NumPy specification, float64 gradcheck, and hypothesis properties."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit import reference as ref


def _module_for(ndim):
    return {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}[ndim]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5).map(lambda s: [s[0] + 1] + s[1:]),
       affine=st.booleans(), momentum=st.sampled_from([0.1, 0.5, 1.0]), scale=st.floats(0.1, 10.0),
       shift=st.floats(-100.0, 100.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_forward_backward_and_running_update_match_reference(shape, affine, momentum, scale, shift, dtype):
    torch.manual_seed(len(shape))
    c = shape[1]
    bn = _module_for(len(shape))(c, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_(True)
    y = bn(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    xn, dyn = x.detach().double().numpy(), dy.double().numpy()
    g = bn.weight.detach().double().numpy() if affine else None
    b = bn.bias.detach().double().numpy() if affine else None
    y_ref, mean, var = ref.forward_train(xn, g, b, bn.eps)
    dx_ref, dg_ref, db_ref = ref.backward_train(dyn, xn, g, bn.eps)
    n = xn.size // c
    rm_ref, rv_ref = ref.update_running(np.zeros(c), np.ones(c), mean, var, n, momentum)
    # float32 loses about |shift| / scale ulps in x - mean (the conditioning of the data, not of the method)
    rtol = (1e-5 if dtype == torch.float32 else 1e-11) * (1 + abs(shift) / scale)
    # absolute scale: outputs and dx are O(1) per element times gamma*invstd for dx
    np.testing.assert_allclose(y.detach().double().numpy(), y_ref, rtol=rtol, atol=rtol)
    invstd = 1 / np.sqrt(var + bn.eps)
    np.testing.assert_allclose(x.grad.double().numpy(), dx_ref, rtol=rtol,
                               atol=rtol * (1 + invstd.max()) * np.abs(dyn).max() * 4)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), rm_ref, rtol=rtol, atol=rtol * (1 + abs(shift)))
    np.testing.assert_allclose(bn.running_var.double().numpy(), rv_ref, rtol=rtol * 10, atol=rtol)
    if affine:
        mag = np.abs(dyn).sum() * 10
        np.testing.assert_allclose(bn.weight.grad.double().numpy(), dg_ref, rtol=rtol, atol=rtol * mag)
        np.testing.assert_allclose(bn.bias.grad.double().numpy(), db_ref, rtol=rtol, atol=rtol * mag)


def test_eval_forward_and_backward_match_reference():
    bn = bnkit.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
        bn.weight.copy_(torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    bn.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    args = (bn.running_mean.numpy(), bn.running_var.numpy())
    g, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), ref.forward_eval(x.detach().numpy(), *args, g, b, bn.eps), rtol=1e-12)
    dx, dg, db = ref.backward_eval(dy.numpy(), x.detach().numpy(), *args, g, bn.eps)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-12)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dg, rtol=1e-10)
    np.testing.assert_allclose(bn.bias.grad.numpy(), db, rtol=1e-10)


def test_hand_computed_worked_example():
    bn = bnkit.BatchNorm2d(1, eps=1e-300, dtype=torch.float64)  # torch refuses eps=0 in training; 0.75 + 1e-300 == 0.75
    y = bn(torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]]], dtype=torch.float64))
    s = 1 / np.sqrt(0.75)  # mean 0.5, biased variance 0.75
    np.testing.assert_allclose(y.flatten().detach().numpy(), [0.5 * s, 0.5 * s, -1.5 * s, 0.5 * s], rtol=1e-14)
    assert bn.running_mean.item() == pytest.approx(0.05)        # 0.9 * 0 + 0.1 * 0.5
    assert bn.running_var.item() == pytest.approx(1.0)          # 0.9 * 1 + 0.1 * (0.75 * 4 / 3)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "silu"])
def test_gradcheck_float64(training, activation):
    bn = bnkit.BatchNorm2d(2, dtype=torch.float64, activation=activation, track_running_stats=not training)
    bn.train(training)
    if not training:
        bn = bnkit.BatchNorm2d(2, dtype=torch.float64, activation=activation).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_activation_matches_torch_composition():
    x = torch.randn(8, 4, 3, 3)
    for act, fn in [("relu", torch.relu), ("silu", torch.nn.functional.silu),
                    ("leaky_relu", lambda t: torch.nn.functional.leaky_relu(t, 0.2))]:
        ours = bnkit.BatchNorm2d(4, activation=torch.nn.LeakyReLU(0.2) if act == "leaky_relu" else act)
        theirs = torch.nn.BatchNorm2d(4)
        torch.testing.assert_close(ours(x), fn(theirs(x)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        bnkit.BatchNorm2d(4, activation="gelu")
