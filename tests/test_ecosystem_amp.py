"""AMP: under torch.autocast, bnkit layers keep the input dtype, keep float32 statistics, and match torch.nn.

Tolerance: both libraries compute in float32 and round the output once to the low-precision dtype;
float32 results that differ in their last bits may round to neighbouring bfloat16/float16 values,
so outputs are compared to one unit in the last place (rtol 2**-7 for bfloat16, 2**-10 for float16)
and the float32 statistics and parameter gradients to float32 rounding.
"""
import pytest
import torch

import bnkit

CASES = [("cpu", torch.bfloat16)] + [("cuda", dt) for dt in (torch.float16, torch.bfloat16)]
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


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


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("source", ["float32", "low", "conv"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_autocast_matches_torch_nn(device, dtype, source, training):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a GPU")
    ours, theirs = _pair(device)
    ours.train(training), theirs.train(training)
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, device=device)
    x = (torch.randn(6, 4, 5, 5, device=device) * 3 + 2).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        inputs = {"float32": x, "low": x.to(dtype), "conv": conv(x)}[source]
        y_ours, y_theirs = ours(inputs), theirs(inputs)
    assert y_ours.dtype == y_theirs.dtype == inputs.dtype
    torch.testing.assert_close(y_ours, y_theirs, rtol=ULP.get(inputs.dtype, 1e-6), atol=1e-5)
    for m in (ours, theirs):
        assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == int(training)

    grad = torch.randn(y_ours.shape, device=device).to(y_ours.dtype)
    g_ours = torch.autograd.grad(y_ours, (ours.weight, ours.bias), grad)
    g_theirs = torch.autograd.grad(y_theirs, (theirs.weight, theirs.bias), grad)
    for a, b in zip(g_ours, g_theirs):
        assert a.dtype == torch.float32
        # Both accumulate in float32, in different orders (measured on CPU: <= 2e-6 relative).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
