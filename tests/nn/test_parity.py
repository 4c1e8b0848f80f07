"""bnkit.BatchNorm*d equals torch.nn.BatchNorm*d: outputs, gradients, buffers, state_dicts."""
import itertools
import warnings

import pytest
import torch

import bnkit

CASES = [  # (bnkit class, torch class, input shape)
    (bnkit.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (bnkit.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    (bnkit.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (bnkit.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 5)),
]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _layout(x, kind):
    if kind == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if kind == "noncontiguous":
        return x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, permuted strides
    return x


def _pair(ours_cls, theirs_cls, dtype, **kw):
    ours, theirs = ours_cls(3, dtype=dtype, **kw), theirs_cls(3, dtype=dtype, **kw)
    if kw.get("affine", True):
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, 3, dtype=dtype))
                m.bias.copy_(torch.linspace(-0.2, 0.3, 3, dtype=dtype))
    return ours, theirs


def _check_step(ours, theirs, x, tol):
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **tol)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    # dgamma/dbeta are sums of n terms whose order differs from ATen's: their relative error is measured
    # against the sum of the terms' magnitudes (the condition of a sum), not against the (maybe tiny) sum.
    dims = (0,) + tuple(range(2, x.dim()))
    xd = x.detach().double()
    xhat = (xd - xd.mean(dims, keepdim=True)).abs() / xd.std(dims, keepdim=True)
    magnitude = (dy.double().abs() * (1 + xhat)).sum(dims).max().item()
    for (na, pa), (nb, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=tol["rtol"], atol=tol["atol"] * magnitude,
                                   msg=lambda m, na=na: f"{na}: {m}")
    for (na, ba), (nb, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert na == nb
        torch.testing.assert_close(ba, bb, **tol, msg=lambda m, na=na: f"{na}: {m}")
    return ya


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine,track,momentum", [
    (a, t, m) for a, t, m in itertools.product([True, False], [True, False], [0.1, None, 0.3]) if t or m == 0.1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_parity_train_then_eval(ours_cls, theirs_cls, shape, dtype, affine, track, momentum, layout):
    tol = TOL[dtype]
    ours, theirs = _pair(ours_cls, theirs_cls, dtype, affine=affine, track_running_stats=track, momentum=momentum)
    for step in range(3):  # several steps so momentum / cumulative averaging matter
        x = _layout(torch.randn(shape, dtype=dtype) * (step + 1) + step, layout)
        y = _check_step(ours, theirs, x, tol)
        if layout == "channels_last" and x.dim() in (4, 5):
            assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    ours.eval()
    theirs.eval()
    _check_step(ours, theirs, _layout(torch.randn(shape, dtype=dtype) + 1, layout), tol)


def test_state_dict_round_trip_both_ways():
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) * 2 + 1)
    ours = bnkit.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 4, 3, 3)
    for m in (ours, theirs, back):
        m.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_old_checkpoint_without_num_batches_tracked_loads():
    theirs = torch.nn.BatchNorm1d(3)
    theirs(torch.randn(5, 3))
    sd = theirs.state_dict()
    del sd["num_batches_tracked"]  # checkpoints before torch's _version = 2 lack it
    ours, again = bnkit.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (ours, again):
        m.num_batches_tracked.fill_(7)
        m.load_state_dict(_old(sd))
    assert ours.num_batches_tracked.item() == again.num_batches_tracked.item()  # torch keeps the current count
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, again.running_var)


def _old(sd):
    from collections import OrderedDict
    out = OrderedDict(sd)
    out._metadata = {"": {"version": 1}}
    return out


def test_eval_without_running_stats_uses_batch_stats():
    ours = bnkit.BatchNorm2d(3, track_running_stats=False).eval()
    theirs = torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2) + 3
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_isinstance_tools_find_bnkit_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), bnkit.BatchNorm1d(4))
    loader = [torch.randn(16, 4) + 2 for _ in range(3)]
    torch.optim.swa_utils.update_bn(loader, model)  # resets, momentum=None, runs: only works on _BatchNorm layers
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in loader])
    # update_bn's quantity: equal-weight mean of per-batch statistics (equal batch sizes: mean is pooled mean)
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    assert model[1].num_batches_tracked.item() == 3


def test_bnkit_module_has_torch_parameters_and_buffers():
    ours, theirs = bnkit.BatchNorm3d(5), torch.nn.BatchNorm3d(5)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert ours.num_batches_tracked.dtype == torch.long
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_shared_torch_op_core_matches_torch(ours_cls, theirs_cls, shape, dtype, layout):
    # Layers take torch's ATen kernel in the plain eager case; the shared torch-op core (functional form,
    # torch.compile, masks, stateless) must give the same numbers and gradients.
    tol = TOL[dtype]
    x = _layout(torch.randn(shape, dtype=dtype) * 3 + 2, layout)
    w = torch.linspace(0.5, 1.5, 3, dtype=dtype, requires_grad=True)
    b = torch.linspace(-0.2, 0.3, 3, dtype=dtype, requires_grad=True)
    outs = []
    for fn in (bnkit.functional.batch_norm, torch.nn.functional.batch_norm):
        xa = x.detach().clone().requires_grad_(True)
        rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        y = fn(xa, rm, rv, w, b, training=True, momentum=0.3)
        dy = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
        grads = torch.autograd.grad(y, (xa, w, b), dy)
        outs.append((y, rm, rv) + grads)
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, rtol=tol["rtol"], atol=tol["atol"] * 100)
