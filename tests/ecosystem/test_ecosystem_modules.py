"""Module protocol, side by side with torch.nn: lazy layers, torch.func.functional_call, deepcopy,
pickling a whole model, .to(device, dtype), reset_running_stats() and reset_parameters()."""
import copy
import io

import pytest
import torch
import torch.nn as tnn

import bnkit

PAIRS = [(bnkit.BatchNorm1d, tnn.BatchNorm1d, (6, 3, 5)), (bnkit.BatchNorm2d, tnn.BatchNorm2d, (4, 3, 3, 3)),
         (bnkit.BatchNorm3d, tnn.BatchNorm3d, (2, 3, 2, 3, 2))]
LAZY = [(bnkit.LazyBatchNorm1d, tnn.LazyBatchNorm1d, bnkit.BatchNorm1d, (6, 3)),
        (bnkit.LazyBatchNorm2d, tnn.LazyBatchNorm2d, bnkit.BatchNorm2d, (4, 3, 3, 3)),
        (bnkit.LazyBatchNorm3d, tnn.LazyBatchNorm3d, bnkit.BatchNorm3d, (2, 3, 2, 3, 2))]


def _assert_same_state(ours, theirs, rtol=1e-6, atol=1e-6):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def _train_steps(module, x, steps=2):
    for k in range(steps):
        module((x * (k + 1) + k).requires_grad_()).square().sum().backward()


@pytest.mark.parametrize("lazy,torch_lazy,becomes,shape", LAZY)
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_lazy_matches_torch_lazy(lazy, torch_lazy, becomes, shape, affine, track):
    ours, theirs = lazy(affine=affine, track_running_stats=track), torch_lazy(affine=affine, track_running_stats=track)
    assert ours.has_uninitialized_params() and theirs.has_uninitialized_params()
    assert [k for k in ours.state_dict()] == [k for k in theirs.state_dict()]
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert type(ours) is becomes and ours.num_features == theirs.num_features == 3
    _assert_same_state(ours, theirs)
    _train_steps(ours, x), _train_steps(theirs, x)
    _assert_same_state(ours, theirs, rtol=1e-5)


def test_lazy_keeps_bnkit_options_and_loads_a_state_dict():
    source = bnkit.BatchNorm2d(3, momentum=bnkit.momentum.Decay(0.9), activation="relu", variance="biased")
    _train_steps(source, torch.randn(4, 3, 2, 2))
    lazy = bnkit.LazyBatchNorm2d(momentum=bnkit.momentum.Decay(0.9), activation="relu", variance="biased")
    lazy.load_state_dict(source.state_dict())  # torch's lazy load hook materializes from the checkpoint
    _assert_same_state(lazy, source, rtol=0, atol=0)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(lazy(x), source(x), rtol=0, atol=0)
    assert type(lazy) is bnkit.BatchNorm2d and lazy.num_features == 3
    assert (lazy.activation, lazy.variance, lazy.momentum_convention) == ("relu", "biased", "decay")
    _assert_same_state(lazy, source, rtol=0, atol=0)  # the training step above updated both alike


def test_lazy_rejects_bad_first_input_before_materializing():
    lazy = bnkit.LazyBatchNorm2d()
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d.*4-D.*3-D"):
        lazy(torch.randn(2, 3, 4))
    assert lazy.has_uninitialized_params()


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_functional_call_with_external_state(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3), theirs_cls(3)
    x = torch.randn(*shape)
    for momentum in (0.1, None):
        ours.momentum = theirs.momentum = momentum
        params = {k: v.clone() for k, v in theirs.state_dict().items()}
        params["weight"] = torch.rand(3, requires_grad=True) + 0.5
        params_ours = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
        y_t = torch.func.functional_call(theirs, params, (x,))
        y_o = torch.func.functional_call(ours, params_ours, (x,))
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
        # Training-mode running statistics are updated in the passed tensors, not the module's buffers.
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(params_ours[key], params[key], msg=key)
        assert int(params_ours["num_batches_tracked"]) == 1 and int(ours.num_batches_tracked) == 0
        g_t, = torch.autograd.grad(y_t.square().sum(), params["weight"])
        g_o, = torch.autograd.grad(y_o.square().sum(), params_ours["weight"])
        torch.testing.assert_close(g_o, g_t, rtol=1e-5, atol=1e-5)


def test_deepcopy_and_pickle_whole_model():
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, activation="relu", momentum=bnkit.momentum.Schedule(
                                                                      "linear", total_steps=5, start=0.1)),
                           tnn.Flatten(1), bnkit.BatchNorm1d(16, momentum=None, variance="biased"))
    x = torch.randn(5, 3, 4, 4)
    _train_steps(model, x)
    bnkit.freeze_stats(model[1])
    for clone in (copy.deepcopy(model), _save_load(model)):
        assert clone[1] is not model[1] and clone[1].running_mean.data_ptr() != model[1].running_mean.data_ptr()
        for attr in ("momentum", "momentum_convention", "activation", "variance", "stats_frozen", "eps"):
            assert getattr(clone[1], attr) == getattr(model[1], attr), attr
            assert getattr(clone[3], attr) == getattr(model[3], attr), attr
        assert repr(clone[1].momentum_schedule) == repr(model[1].momentum_schedule)
        _assert_same_state(clone, model, rtol=0, atol=0)
        # Both copies continue training identically, and the original is untouched by the clone's steps.
        before = {k: v.clone() for k, v in model.state_dict().items()}
        reference = copy.deepcopy(model)
        _train_steps(clone, x, 1), _train_steps(reference, x, 1)
        _assert_same_state(clone, reference, rtol=0, atol=0)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole module is not a weights-only checkpoint


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_to_dtype_and_device_like_torch(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3), theirs_cls(3)
    _train_steps(ours, torch.randn(*shape)), theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        m.to("cpu", torch.float64)
    _assert_same_state(ours, theirs, rtol=0, atol=0)
    assert ours.running_var.dtype == ours.weight.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.half(), theirs.half()
    _assert_same_state(ours, theirs, rtol=0, atol=0)
    assert ours.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_reset_running_stats_and_parameters(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3), theirs_cls(3)
    x = torch.randn(*shape) * 2 + 3
    for m in (ours, theirs):
        _train_steps(m, x)
        with torch.no_grad():
            m.weight.mul_(3)
            m.bias.add_(1)
    ours.reset_running_stats(), theirs.reset_running_stats()
    _assert_same_state(ours, theirs)
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_var, torch.ones(3))
    assert not torch.equal(ours.weight, torch.ones(3))  # parameters untouched by reset_running_stats
    ours.reset_parameters(), theirs.reset_parameters()
    _assert_same_state(ours, theirs)
    assert torch.equal(ours.weight, torch.ones(3)) and torch.equal(ours.bias, torch.zeros(3))


def test_vmap_model_ensemble_trains_like_torch_nn_and_skips_per_model():
    """torch.func's ensembling recipe (stack_module_state + functional_call + vmap) in training mode: each
    model updates its own (batched) running statistics as torch.nn's do; a model whose batch is NaN skips
    it on its own, the others update (the skip counter is no buffer: under torch.func only
    num_batches_tracked shows the skip, as the README says)."""
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(0)
    x = torch.randn(3, 8, 2, 4, 4)
    results = []
    for cls in (tnn.BatchNorm2d, bnkit.BatchNorm2d):
        models = [cls(2) for _ in range(3)]
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        y = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))(params, buffers, x)
        results.append((y, buffers))
    (y_ref, b_ref), (y, b) = results
    torch.testing.assert_close(y, y_ref)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(b[name], b_ref[name])

    bad = x.clone()
    bad[1, 0, 0] = float("nan")  # model 1's batch only
    before = {k: v.clone() for k, v in b.items()}
    vmap(lambda p, b_, xb: functional_call(base, (p, b_), (xb,)))(params, b, bad)
    assert b["num_batches_tracked"].tolist() == [2, 1, 2]
    assert torch.equal(b["running_mean"][1], before["running_mean"][1])
    assert torch.equal(b["running_var"][1], before["running_var"][1])
    for i in (0, 2):  # the others: torch's EMA of their own batch
        ref = tnn.BatchNorm2d(2)
        ref.running_mean.copy_(before["running_mean"][i]), ref.running_var.copy_(before["running_var"][i])
        ref(bad[i])
        torch.testing.assert_close(b["running_mean"][i], ref.running_mean)
        torch.testing.assert_close(b["running_var"][i], ref.running_var)


@pytest.mark.parametrize("first", ["eager", "fake"])
def test_training_step_under_fake_tensor_mode_as_torch_nn(first, monkeypatch):
    """Fake-tensor tools (memory and shape estimation) run a training step under FakeTensorMode: a bnkit
    step works there as torch.nn's does, and changes nothing a later eager step does (the guard's
    per-device 1.0 is cached for real tensors only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bnkit.stats import running
    monkeypatch.setattr(running, "_ONE", {})  # a fresh process: nothing cached yet

    def eager():
        layer = bnkit.BatchNorm2d(3)
        layer(torch.randn(4, 3, 2, 2))
        return layer.num_batches_tracked.item()

    def fake():
        with FakeTensorMode():
            for cls in (tnn.BatchNorm2d, bnkit.BatchNorm2d):
                layer = cls(3)
                assert layer(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)

    if first == "eager":
        assert eager() == 1
        fake()
    else:
        fake()
        assert eager() == 1
    assert all(type(t) is torch.Tensor for t in running._ONE.values())
