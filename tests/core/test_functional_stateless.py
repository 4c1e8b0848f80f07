"""The stateless functional form: (y, new_stats), under torch.func transforms."""
import pytest
import torch

from bnkit.functional import batch_norm_stateless


def _stats(c):
    return {"running_mean": torch.zeros(c), "running_var": torch.ones(c), "num_batches_tracked": torch.tensor(0)}


def test_stateless_matches_module_and_leaves_inputs_untouched():
    x = torch.randn(6, 3, 4)
    params = {"weight": torch.rand(3) + 0.5, "bias": torch.randn(3)}
    stats = _stats(3)
    y, new = batch_norm_stateless(x, params, stats, training=True)
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(params["weight"])
        bn.bias.copy_(params["bias"])
    torch.testing.assert_close(y, bn(x), rtol=1e-6, atol=1e-6)
    for k in stats:
        torch.testing.assert_close(new[k], getattr(bn, k))
    assert torch.equal(stats["running_mean"], torch.zeros(3))  # input stats not modified
    y_eval, same = batch_norm_stateless(x, params, new, training=False)
    bn.eval()
    torch.testing.assert_close(y_eval, bn(x), rtol=1e-6, atol=1e-6)
    assert all(same[k] is new[k] for k in new)  # eval: the same tensors come back


def test_stateless_under_grad_vmap_jacrev():
    x = torch.randn(5, 2, 3)
    w, b = torch.rand(2) + 0.5, torch.randn(2)
    stats = _stats(2)

    def loss(w, x):
        y, _ = batch_norm_stateless(x, {"weight": w, "bias": b}, stats)
        return (y * torch.arange(y.numel()).reshape(y.shape)).sum()

    g = torch.func.grad(loss)(w, x)
    wr = w.clone().requires_grad_(True)
    loss(wr, x).backward()
    torch.testing.assert_close(g, wr.grad)
    # vmap over a stack of batches: each gets its own statistics and its own running update
    xs = torch.randn(4, 5, 2, 3)
    ys, news = torch.func.vmap(lambda xb: batch_norm_stateless(xb, {"weight": w, "bias": b}, stats))(xs)
    for i in range(4):
        yi, ni = batch_norm_stateless(xs[i], {"weight": w, "bias": b}, stats)
        torch.testing.assert_close(ys[i], yi)
        torch.testing.assert_close(news["running_var"][i], ni["running_var"])
    jac = torch.func.jacrev(lambda xx: batch_norm_stateless(xx, None, None)[0])(x)
    assert jac.shape == x.shape + x.shape
    xr = x.clone().requires_grad_(True)
    row = torch.autograd.grad(batch_norm_stateless(xr, None, None)[0][0, 0, 0], xr)[0]
    torch.testing.assert_close(jac[0, 0, 0], row)


def test_stateless_bad_input_gets_the_clear_error():
    with pytest.raises(ValueError, match=r"batch_norm_stateless: expected an input of shape \(N, C, \*\)"):
        batch_norm_stateless(torch.randn(3), None, None)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fold_moments_equals_torch_on_the_whole_batch(momentum):
    """Pooled micro-batch moments folded into plain buffers: what torch.nn does with the whole batch."""
    from bnkit.functional import fold_moments
    from bnkit.stats import Moments
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, dtype=torch.float64) * 2 + 5
    ref = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    ref(x)
    mean, var, nbt = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    pooled = Moments.of(x[:5]).merge(Moments.of(x[5:]))
    fold_moments(pooled, mean, var, nbt, momentum=momentum)
    torch.testing.assert_close(mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert nbt.item() == 1
    bad = Moments.of(torch.full((4, 3, 2), float("nan"), dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="layer7: this batch would make the running statistics NaN/Inf"):
        fold_moments(bad, mean, var, nbt, momentum=momentum, name="layer7")
    torch.testing.assert_close(mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    assert nbt.item() == 1
    with pytest.raises(ValueError, match="layer7.*momentum"):
        fold_moments(pooled, mean, var, nbt, momentum=-1.0, name="layer7")
