"""AMP: under torch.autocast, bnkit layers keep the input dtype and float32 statistics, and are as
accurate as torch.nn: both are compared to a float64 reference computed from the same input values.

Tolerances are error bounds that any implementation computing in float32 and rounding once to the
low-precision dtype meets, so the test holds whichever library is the more accurate one (on a GPU
torch.nn's bfloat16 weight gradient is the less accurate: 9.5e-3 relative error against 2.6e-7 for
bnkit's kernels):

* outputs: one rounding to the output dtype (relative 2**-8 for bfloat16, 2**-11 for float16), plus
  float32 arithmetic;
* running statistics: float32 reductions over 150 values;
* weight/bias gradients (sums over N*H*W of ``grad * xhat`` and ``grad``): each term rounded at most
  once to the low-precision dtype and accumulated in float32, so the error of a channel's sum is at
  most ``2 * unit roundoff * sum(|term|)``.
"""
import pytest
import torch

import bnkit

CASES = [("cpu", torch.bfloat16)] + [("cuda", dt) for dt in (torch.float16, torch.bfloat16)]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
EPS, MOMENTUM = 1e-5, 0.1


def _pair(device):
    torch.manual_seed(0)
    ours, theirs = bnkit.BatchNorm2d(4, device=device), torch.nn.BatchNorm2d(4, device=device)
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _reference(layer, x, grad, training):
    """float64: output, new running statistics, weight/bias gradients and their error scales."""
    x, grad = x.detach().double(), grad.double()
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        n = x.numel() // x.shape[1]
        rm, rv = (1 - MOMENTUM) * rm + MOMENTUM * mean, (1 - MOMENTUM) * rv + MOMENTUM * var * n / (n - 1)
    else:
        mean, var = rm, rv
    view = (1, -1, 1, 1)
    xhat = (x - mean.view(view)) / (var.view(view) + EPS).sqrt()
    y = xhat * w.view(view) + b.view(view)
    dw_terms, db_terms = grad * xhat, grad
    return dict(y=y, running_mean=rm, running_var=rv,
                dweight=dw_terms.sum((0, 2, 3)), dbias=db_terms.sum((0, 2, 3)),
                dweight_scale=dw_terms.abs().sum((0, 2, 3)), dbias_scale=db_terms.abs().sum((0, 2, 3)))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("source", ["float32", "low", "conv"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_autocast_matches_float64_reference(device, dtype, source, training):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a GPU")
    ours, theirs = _pair(device)
    ours.train(training), theirs.train(training)
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, device=device)
    x = (torch.randn(6, 4, 5, 5, device=device) * 3 + 2).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        inputs = {"float32": x, "low": x.to(dtype), "conv": conv(x)}[source]
        before = {"running_mean": ours.running_mean.clone(), "running_var": ours.running_var.clone()}
        y_ours, y_theirs = ours(inputs), theirs(inputs)
    grad = torch.randn(y_ours.shape, device=device).to(y_ours.dtype)
    ref_layer = torch.nn.BatchNorm2d(4, device=device)
    ref_layer.load_state_dict({**theirs.state_dict(), **before})
    ref = _reference(ref_layer, inputs, grad, training)
    u = UNIT_ROUNDOFF[inputs.dtype]
    for name, layer, y in (("bnkit", ours, y_ours), ("torch.nn", theirs, y_theirs)):
        assert y.dtype == inputs.dtype, name
        assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32, name
        assert int(layer.num_batches_tracked) == int(training), name
        torch.testing.assert_close(y.double(), ref["y"], rtol=2 * u, atol=1e-5, msg=lambda m: f"{name} output: {m}")
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(layer, stat).double(), ref[stat], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {stat}: {m}")
        dweight, dbias = torch.autograd.grad(y, (layer.weight, layer.bias), grad)
        assert dweight.dtype == dbias.dtype == torch.float32, name
        for what, got in (("dweight", dweight), ("dbias", dbias)):
            err = (got.double() - ref[what]).abs()
            bound = 2 * max(u, 150 * UNIT_ROUNDOFF[torch.float32]) * ref[what + "_scale"] + 1e-6
            assert (err <= bound).all(), f"{name} {what}: error {err.tolist()} > bound {bound.tolist()}"
