"""BatchRenorm against torch.nn (rmax=1, dmax=0), the paper's formula, and float64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bnkit
from bnkit.nn.renorm import LinearRamp


def _set_renorm_stats(bn, mean, std):
    with torch.no_grad():
        bn.renorm_mean.copy_(mean)
        bn.renorm_std.copy_(std)


def test_rmax_1_dmax_0_equals_torch_nn_forward_backward_running():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3) * 2 + 3
    ours = bnkit.BatchRenorm2d(4, rmax=1.0, dmax=0.0)
    ref = torch.nn.BatchNorm2d(4)
    _set_renorm_stats(ours, torch.full((4,), 10.0), torch.full((4,), 0.1))   # far from the batch: r, d clip
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_matches_paper_formula_unclipped_and_updates_renorm_stats():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, dtype=torch.float64) * 1.5 + 0.5
    bn = bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0, renorm_momentum=0.05, dtype=torch.float64)
    mu, sigma = torch.tensor([0.3, 0.6, 0.4], dtype=torch.float64), torch.tensor([1.2, 1.6, 1.4], dtype=torch.float64)
    _set_renorm_stats(bn, mu, sigma)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    xa = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    y = bn(xa)
    # The paper, written out: r and d are computed from detached statistics.
    mb = xr.mean((0, 2), keepdim=True)
    sb = torch.sqrt(xr.var((0, 2), correction=0, keepdim=True) + bn.eps)
    r = (sb.detach() / sigma.view(1, 3, 1)).clamp(1 / 3, 3)
    d = ((mb.detach() - mu.view(1, 3, 1)) / sigma.view(1, 3, 1)).clamp(-5, 5)
    assert ((r > 1 / 3) & (r < 3)).all() and ((d > -5) & (d < 5)).all() and not torch.allclose(r, torch.ones_like(r))
    yr = ((xr - mb) / sb * r + d) * w.view(1, 3, 1) + b.view(1, 3, 1)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.weight.grad, w.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.bias.grad, b.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.renorm_mean, 0.95 * mu + 0.05 * mb.flatten().detach())
    torch.testing.assert_close(bn.renorm_std, 0.95 * sigma + 0.05 * sb.flatten().detach())
    torch.testing.assert_close(bn.running_mean, 0.1 * mb.flatten().detach())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var((0, 2), correction=1))


@pytest.mark.parametrize("renorm_mean,renorm_std", [(-500.0, 100.0), (50.0, 0.01)])
def test_gradcheck_float64_where_r_and_d_clip(renorm_mean, renorm_std):
    # With r and d at their bounds they are locally constant, so finite differences see the same
    # function autograd differentiates (elsewhere r, d depend on x but are constants by design).
    torch.manual_seed(2)
    bn = bnkit.BatchRenorm2d(2, rmax=2.0, dmax=0.5, dtype=torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        _set_renorm_stats(bn, torch.full((2,), renorm_mean), torch.full((2,), renorm_std))
        return functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_float64_rmax_1_dmax_0():
    torch.manual_seed(3)
    bn = bnkit.BatchRenorm1d(3, rmax=1, dmax=0, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bn(x), (x,))


def test_schedules_use_update_step_and_warmup_starts_as_plain_bn():
    seen = []
    bn = bnkit.BatchRenorm1d(2, rmax=lambda s: seen.append(s) or 1.0 + s, dmax=0.0)
    for _ in range(3):
        bn(torch.randn(4, 2))
    assert seen == [1, 2, 3]
    kw = bnkit.renorm_warmup(40, hold=5, dmax_steps=25)
    assert (kw["rmax"](5), kw["dmax"](5)) == (1.0, 0.0)
    assert (kw["rmax"](25), kw["dmax"](30)) == (2.0, 5.0)
    assert (kw["rmax"](10**6), kw["dmax"](10**6)) == (3.0, 5.0)
    torch.manual_seed(4)
    x = torch.randn(6, 3, 4)
    warm = bnkit.BatchRenorm1d(3, **kw)
    _set_renorm_stats(warm, torch.full((3,), 5.0), torch.full((3,), 9.0))
    torch.testing.assert_close(warm(x), F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [({"rmax": 0.5, "dmax": 5.0}, r"BatchRenorm2d\(4\): rmax must be a number >= 1, got 0.5"),
                                    ({"rmax": 3.0, "dmax": -1}, r"BatchRenorm2d\(4\): dmax must be a number >= 0, got -1"),
                                    ({}, r"BatchRenorm2d\(4\): pass the bounds of r and d, .*renorm_warmup"),
                                    ({"rmax": 3.0}, r"BatchRenorm2d\(4\): pass the bounds of r and d"),
                                    ({"rmax": 3.0, "dmax": 5.0, "renorm_momentum": 2.0}, r"renorm_momentum must be in \[0, 1\]"),
                                    # a str/None/bool failed inside the comparison ('<=' not supported), unnamed
                                    ({"rmax": 3.0, "dmax": 5.0, "renorm_momentum": "0.1"},
                                     r"BatchRenorm2d\(4\): renorm_momentum must be in \[0, 1\] .*got '0.1'"),
                                    ({"rmax": 3.0, "dmax": 5.0, "renorm_momentum": None}, r"BatchRenorm2d\(4\): renorm_momentum"),
                                    ({"rmax": 3.0, "dmax": 5.0, "renorm_momentum": True}, r"BatchRenorm2d\(4\): renorm_momentum"),
                                    ({"rmax": 3.0, "dmax": 5.0, "track_running_stats": False}, "track_running_stats must be True")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        bnkit.BatchRenorm2d(4, **kw)


def test_bad_schedule_value_raises_before_buffers_change():
    bn = bnkit.BatchRenorm2d(2, rmax=3.0, dmax=lambda step: -0.5)
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(2\): dmax must be a number >= 0 \(schedule value at step 1\)"):
        bn(torch.randn(2, 2, 2, 2))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.renorm_std, torch.ones(2))


@pytest.mark.parametrize("kw,msg", [
    (lambda: bnkit.renorm_warmup(10, rmax=0.5), r"rmax must be a number >= 1 \(the ramp's end value\), got 0.5"),
    (lambda: bnkit.renorm_warmup(10, dmax=-5.0), r"dmax must be a number >= 0 \(the ramp's end value\), got -5.0"),
    (lambda: {"rmax": LinearRamp(0.5, 3.0, 10), "dmax": 1.0}, r"rmax must be a number >= 1 \(the ramp's start value\)")])
def test_a_ramp_outside_the_bounds_is_refused_at_construction(kw, msg):
    """Ramps run on the device where no check can raise; out-of-range ends gave clamp(lo > hi) silently:
    renorm_warmup(1, rmax=0.5, dmax=-5) made every training output mean -5, std 0.5."""
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(3\): " + msg):
        bnkit.BatchRenorm1d(3, **kw())


def test_float64_layer_evaluates_its_ramps_in_float64():
    """The ramp at step 1 (rmax 1.2, dmax 0.5) must clip like the numbers 1.2 and 0.5: in float32 the bounds
    were 1.2000000477 and r, d were ~1.4e-7 off in a float64 layer."""
    torch.manual_seed(5)
    x = torch.randn(8, 3, 5, dtype=torch.float64) * 2 + 1
    ramp = bnkit.BatchRenorm1d(3, rmax=LinearRamp(1.0, 3.0, 10), dmax=LinearRamp(0.0, 5.0, 10), dtype=torch.float64)
    fixed = bnkit.BatchRenorm1d(3, rmax=1.2, dmax=0.5, dtype=torch.float64)
    for bn in (ramp, fixed):
        _set_renorm_stats(bn, torch.full((3,), 3.0), torch.full((3,), 0.5))   # r and d clip
    torch.testing.assert_close(ramp(x), fixed(x), rtol=0, atol=1e-14)


def test_single_sample_use_running_applies_as_in_the_plain_layer():
    torch.manual_seed(7)
    ours = bnkit.BatchRenorm1d(3, rmax=3.0, dmax=5.0, single_sample="use_running")
    plain = bnkit.BatchNorm1d(3, single_sample="use_running")
    with torch.no_grad():
        for bn in (ours, plain):
            bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = torch.randn(1, 3)
    torch.testing.assert_close(ours(x), plain(x))   # the eval output
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked) == 0


def test_reset_returns_the_renormalization_statistics_to_a_fresh_layers():
    """reset_parameters()/reset_running_stats() zeroed num_batches_tracked (the warm-up restarts) but kept the
    old renorm_mean/renorm_std: a re-initialized layer computed r and d from the previous run's statistics."""
    torch.manual_seed(8)
    bn = bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0, renorm_momentum=0.5)
    fresh = bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0, renorm_momentum=0.5)
    for _ in range(3):
        bn(torch.randn(4, 3, 2, 2) * 3 + 4)
    bn.reset_parameters()
    for name, buffer in fresh.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[name], buffer, rtol=0, atol=0, msg=name)
    x = torch.randn(4, 3, 2, 2) * 3 + 4
    torch.testing.assert_close(bn(x), fresh(x), rtol=0, atol=0)


def test_empty_batch_as_the_plain_layer():
    ours, plain = bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0), torch.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2)
    assert ours(x).shape == plain(x).shape == x.shape
    assert torch.equal(ours.running_var, plain.running_var) and torch.equal(ours.renorm_std, torch.ones(3))
    assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked) == 1


def test_threads_lose_no_renorm_update():
    """Two threads training one layer on the same batch: after 600 updates renorm_mean is
    mean * (1 - (1 - m)^600) whatever the order; the renorm update ran outside the update lock and lost
    updates (4e-3 off, every run of 5)."""
    import threading
    layer = bnkit.BatchRenorm1d(4, rmax=3.0, dmax=5.0, renorm_momentum=0.01).double()
    x = torch.randn(16, 4, dtype=torch.float64) + 3

    def work():
        for _ in range(300):
            layer(x)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert layer.num_batches_tracked.item() == 600
    torch.testing.assert_close(layer.renorm_mean, x.mean(0) * (1 - 0.99 ** 600), rtol=0, atol=1e-12)
