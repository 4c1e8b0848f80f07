"""Findings of review 17, each against torch.nn or float64 (xfail(strict) where bnkit is wrong today).

The CPU ``(N, C)`` route of ``_train_aten`` shifts the input by its first row (``x - x[0]``) in the
*input's* dtype, and ``_aten_update`` gives the kernel ``running_mean - shift`` in the *buffers'*
dtype. In float16/bfloat16 both roundings are at the scale of the shift, not of the data: outputs
and running means lose digits torch.nn keeps, and ``x - x[0]`` can overflow float16.
"""
import copy

import pytest
import torch

import bnkit

LOW = [torch.float16, torch.bfloat16]


def _batch_norm64(x):
    x = x.double()
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)


@pytest.mark.xfail(strict=True, reason="CPU (N, C) shift: x - x[0] rounds in float16/bfloat16 (mixed-dtype layer)")
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_2d_input_float32_layer_matches_torch(dtype):
    """The 4-D twin of this test (test_half_input_float32_stats_match_torch) passes: only (N, C) shifts."""
    torch.manual_seed(0)
    x = (torch.randn(64, 4) * 2 + 3).to(dtype)
    ours, theirs = bnkit.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    y, y_ref = ours(x), theirs(x)
    exact = x.double().mean(0) * 0.1
    torch_err = (theirs.running_mean.double() - exact).abs().max().item()
    ours_err = (ours.running_mean.double() - exact).abs().max().item()
    assert torch_err < 1e-7  # measured ~2e-8 (a running mean ~0.3)
    assert ours_err < 1e-6  # bnkit, seeds 0-2: float16 7e-6 to 4e-5, bfloat16 1e-4 to 3e-4
    truth = _batch_norm64(x)
    assert (y.double() - truth).abs().max() <= 2 * (y_ref.double() - truth).abs().max()


@pytest.mark.xfail(strict=True, reason="CPU (N, C) shift: running_mean - x[0] rounds at the shift's scale in the "
                                       "buffers' low-precision dtype (a bfloat16 running mean of 1.56 comes out 0)")
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_2d_layer_running_mean_with_a_large_first_row(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    x[0] = 1000.0  # one outlying sample first in the batch; the batch mean is ~15.6
    x = x.to(dtype)
    ours, theirs = bnkit.BatchNorm1d(4).to(dtype), torch.nn.BatchNorm1d(4).to(dtype)
    ours(x), theirs(x)
    exact = x.double().mean(0) * 0.1  # ~1.56; torch.nn: within one ulp of it
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert ((theirs.running_mean.double() - exact).abs() <= ulp).all()
    # bnkit: float16 1.5 (4 ulps off), bfloat16 0.0
    assert ((ours.running_mean.double() - exact).abs() <= 2 * ulp).all()


@pytest.mark.xfail(strict=True, reason="CPU (N, C) shift: x - x[0] overflows float16 (inf - inf: NaN output, the "
                                       "batch skipped) where torch.nn's float accumulation is finite")
@pytest.mark.parametrize("float32_layer", [True, False])
def test_float16_2d_input_whose_range_exceeds_float16_max(float32_layer):
    x = torch.tensor([[4e4], [-4e4], [0.0], [1.0]], dtype=torch.float16)  # every value finite, differences not
    ours, theirs = bnkit.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
    if not float32_layer:
        ours.half(), theirs.half()
    y, y_ref = ours(x), theirs(x)
    assert torch.isfinite(y_ref).all()
    assert torch.isfinite(y).all()  # bnkit: all NaN
    assert ours.num_batches_tracked.item() == 1  # bnkit: 0, counted as a skipped batch


@pytest.mark.xfail(strict=True, reason="torch.where(..., out=buffer) has no vmap batching rule (and the skip counter "
                                       "is not batched): torch.func's model-ensembling recipe fails for bnkit layers")
def test_vmap_model_ensemble_as_torch_nn():
    """torch.func's documented ensembling recipe (stack_module_state + functional_call + vmap) trains a
    stack of torch.nn batch norms, each updating its own (batched) running statistics."""
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(0)
    x = torch.randn(3, 8, 2, 4, 4)
    results = []
    for cls in (torch.nn.BatchNorm2d, bnkit.BatchNorm2d):
        models = [cls(2) for _ in range(3)]
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        y = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))(params, buffers, x)
        results.append((y, buffers))
    (y_ref, b_ref), (y, b) = results
    torch.testing.assert_close(y, y_ref)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(b[name], b_ref[name])


@pytest.mark.xfail(strict=True, reason="torch's CPU kernel takes its E[x^2] - E[x]^2 path for every input with one "
                                       "value per sample and channel, not only 2-D; bnkit shifts only x.dim() == 2")
@pytest.mark.parametrize("shape,make", [((8192, 2, 1), bnkit.BatchNorm1d), ((8192, 2, 1, 1), bnkit.BatchNorm2d),
                                        ((8192, 2, 1, 1, 1), bnkit.BatchNorm3d)])
def test_large_mean_spatial_size_one_is_as_stable_as_2d(shape, make):
    """(N, C, 1, 1) is what a global pooling (squeeze-excitation, heads) feeds a BatchNorm2d; in memory it
    is the (N, C) input test_routes.py::test_large_mean_statistics_are_stable_where_torch_cpu_cancels covers."""
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) + 1e6).float()
    layer = make(2, momentum=1.0)
    y = layer(x)
    flat = x.reshape(shape[0], 2).double()
    truth = flat.var(0)
    assert ((layer.running_var.double() - truth).abs() / truth).max() < 1e-3  # bnkit: ~9e2, as torch.nn
    assert (y.reshape(shape[0], 2).double() - _batch_norm64(flat)).abs().max() < 1e-3  # bnkit: ~5


@pytest.mark.xfail(strict=True, reason="nonfinite_flag caches its 1.0 per device in a module-level dict: a real "
                                       "tensor there breaks a step under FakeTensorMode, a FakeTensor there breaks "
                                       "every later eager step on that device")
@pytest.mark.parametrize("first", ["eager", "fake"])
def test_training_step_under_fake_tensor_mode_as_torch_nn(first, monkeypatch):
    """Fake-tensor tools (memory/shape estimation) run a training step of torch.nn layers under
    FakeTensorMode; a bnkit step there must work, and must not change what a later eager step does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bnkit.stats import running
    monkeypatch.setattr(running, "_ONE", {})  # a fresh process: nothing cached yet

    def eager():
        layer = bnkit.BatchNorm2d(3)
        layer(torch.randn(4, 3, 2, 2))
        return layer.num_batches_tracked.item()

    def fake():
        with FakeTensorMode():
            for cls in (torch.nn.BatchNorm2d, bnkit.BatchNorm2d):
                layer = cls(3)
                assert layer(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)

    if first == "eager":
        assert eager() == 1
        fake()  # bnkit: AssertionError from FakeTensorMode (zeros_like of the cached real 1.0)
    else:
        fake()
        assert eager() == 1  # bnkit: AssertionError (the cached FakeTensor in a real step)


@pytest.mark.xfail(strict=True, reason="the cumulative-average error comes from bnkit.stats.running._factor without "
                                       "the layer's name (house rule: errors name the layer)")
def test_cumulative_momentum_without_num_batches_tracked_names_the_layer():
    """torch.nn silently keeps the statistics (factor 0) here; bnkit refuses, buffers unchanged, but the
    message does not say which layer."""
    layer = bnkit.BatchNorm1d(3, momentum=None)
    layer.num_batches_tracked = None  # as after loading into a layer built with it deleted, or by a user
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\)"):
        layer(torch.randn(8, 3, 4))
    assert torch.equal(layer.running_mean, torch.zeros(3))


@pytest.mark.xfail(strict=True, reason="the aten route's guard checks the new running values in the buffers' dtype, "
                                       "the composed routes check the batch statistics: a float16 layer whose EMA "
                                       "overflows float16 skips the batch on one route and stores inf on the other")
def test_float16_running_variance_overflow_is_one_decision_on_every_route():
    """Batch statistics finite (float32 accumulation), the float16 running variance not (std ~1000):
    torch.nn stores inf and counts the batch. bnkit's plain route skips it (and its warning, or
    nonfinite='raise''s error, says the *batch statistics* are NaN/Inf); with an all-True mask, the same
    layer on the same data stores inf like torch.nn."""
    torch.manual_seed(0)
    x = (torch.randn(8, 2, 3) * 1000).half()
    plain, masked = bnkit.BatchNorm1d(2).half(), bnkit.BatchNorm1d(2).half()
    plain(x)
    masked(x, mask=torch.ones(8, 3, dtype=torch.bool))
    assert masked.num_batches_tracked.item() == 1 and torch.isinf(masked.running_var).all()  # as torch.nn
    assert plain.num_batches_tracked.item() == masked.num_batches_tracked.item()  # plain: 0 (skipped)
    assert torch.equal(plain.running_var, masked.running_var)  # plain: [1, 1]
