"""DomainBatchNorm against one torch.nn batch norm per domain."""
import pytest
import torch
from torch import nn

import bnkit


def _batches(seed):
    gen = torch.Generator().manual_seed(seed)
    # Domain 0 and domain 1 have different statistics.
    return [(i % 2, torch.randn(6, 3, 4, 4, generator=gen) * (1 + 2 * (i % 2)) + 5 * (i % 2)) for i in range(6)]


@pytest.mark.parametrize("shared", [True, False])
def test_equals_separate_torch_bn_per_domain(shared):
    ours = bnkit.DomainBatchNorm2d(3, num_domains=2, shared_affine=shared)
    refs = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    with torch.no_grad():
        for d, layer in enumerate(ours.domains):
            layer.weight.add_(0.5 * d)       # shared: both add to the one weight
        for d, ref in enumerate(refs):
            ref.weight.copy_(ours.domains[d].weight)
    for d, x in _batches(0):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa, domain=d), refs[d](xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
    for d in (0, 1):
        torch.testing.assert_close(ours.domains[d].running_mean, refs[d].running_mean)
        torch.testing.assert_close(ours.domains[d].running_var, refs[d].running_var)
        assert int(ours.domains[d].num_batches_tracked) == 3
    params = list(ours.parameters())
    if shared:      # one weight/bias pair, whose gradient is the sum of both domains'
        assert len(params) == 2
        torch.testing.assert_close(ours.domains[0].weight.grad, refs[0].weight.grad + refs[1].weight.grad)
    else:
        assert len(params) == 4
        torch.testing.assert_close(ours.domains[1].weight.grad, refs[1].weight.grad)
    x = torch.randn(2, 3, 4, 4)
    ours.eval(), refs[1].eval()
    torch.testing.assert_close(ours(x, domain=1), refs[1](x))


def test_use_domain_context_manager_in_a_model_and_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnkit.DomainBatchNorm2d(3, 2), nn.ReLU())
    x = torch.randn(4, 3, 2, 2)
    with bnkit.use_domain(model, 1):
        model(x)
        with bnkit.use_domain(model, 0):
            model(x)
        assert model[1].active_domain == 1
    assert model[1].active_domain is None
    assert [int(layer.num_batches_tracked) for layer in model[1].domains] == [1, 1]
    copy = nn.Sequential(nn.Conv2d(3, 3, 1), bnkit.DomainBatchNorm2d(3, 2), nn.ReLU())
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy[1].domains[1].running_mean, model[1].domains[1].running_mean)


def test_frozen_per_domain_via_freeze():
    bn = bnkit.DomainBatchNorm1d(2, 2)
    bn(torch.randn(8, 2) + 3, domain=1)
    bnkit.freeze(bn)
    assert all(isinstance(layer, bnkit.FrozenBatchNorm1d) for layer in bn.domains)
    x = torch.randn(3, 2)
    expected = (x - bn.domains[1].running_mean) / torch.sqrt(bn.domains[1].running_var + 1e-5)
    torch.testing.assert_close(bn(x, domain=1), expected)


def test_bad_domain():
    bn = bnkit.DomainBatchNorm3d(2, 3)
    x = torch.randn(2, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm3d\(2, num_domains=3\): no domain selected"):
        bn(x)
    with pytest.raises(ValueError, match=r"domain must be an int in \[0, 2\], got 3"):
        bn(x, domain=3)
    with pytest.raises(ValueError, match="use_domain: DomainBatchNorm3d"):
        with bnkit.use_domain(bn, -1):
            pass
    with pytest.raises(ValueError, match="num_domains must be a positive int"):
        bnkit.DomainBatchNorm2d(3, 0)


def _per_domain_checkpoint(same: bool):
    per_domain = bnkit.DomainBatchNorm2d(3, num_domains=2, shared_affine=False)
    with torch.no_grad():
        for d, layer in enumerate(per_domain.domains):
            layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]) + (0 if same else d))
            layer.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
            layer.running_mean.fill_(d + 1.0)
    return per_domain.state_dict()


def test_shared_affine_refuses_a_checkpoint_with_different_per_domain_affine():
    shared = bnkit.DomainBatchNorm2d(3, num_domains=2, shared_affine=True)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), shared)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    state = {f"1.{k}": v for k, v in _per_domain_checkpoint(same=False).items()} | {
        f"0.{k}": v for k, v in model[0].state_dict().items()}
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d\(3, num_domains=2\) \(1\): shared_affine=True keeps one "
                                         r"weight for all domains, but the checkpoint's weight of domain\(s\) \[1\] "
                                         r"differs from domain 0's.*shared_affine=False"):
        model.load_state_dict(state)
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items())  # nothing of the layer loaded


def test_shared_affine_loads_a_per_domain_checkpoint_with_equal_affine_exactly():
    shared = bnkit.DomainBatchNorm2d(3, num_domains=2, shared_affine=True)
    state = _per_domain_checkpoint(same=True)
    shared.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in shared.state_dict().items())
    assert shared.domains[0].weight is shared.domains[1].weight  # still shared


def test_bad_num_features_names_the_layer():
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d\(0, num_domains=2\): num_features must be a positive "
                                         r"int, got 0"):
        bnkit.DomainBatchNorm2d(0, num_domains=2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm1d\(True, num_domains=2\): num_features"):
        bnkit.DomainBatchNorm1d(True, num_domains=2)


def test_shared_affine_stays_one_pair_after_assign_loading_and_overwriting_conversions():
    """load_state_dict(assign=True) (meta-device initialization) gave each domain its own copy of the
    checkpoint's weight/bias, and so did .double() under overwrite_module_params_on_conversion: the
    domains then trained separate parameters (4 instead of 2), silently."""
    src = bnkit.DomainBatchNorm2d(3, num_domains=3)
    with torch.no_grad():
        src.domains[0].weight.uniform_(0.5, 1.5)
    with torch.device("meta"):
        ours = bnkit.DomainBatchNorm2d(3, num_domains=3)
    ours.load_state_dict(src.state_dict(), assign=True)
    assert len(list(ours.parameters())) == 2
    assert all(d.weight is ours.domains[0].weight and d.bias is ours.domains[0].bias for d in ours.domains)
    torch.testing.assert_close(ours.domains[2].weight, src.domains[0].weight)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        ours.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert len(list(ours.parameters())) == 2 and ours.domains[1].weight.dtype == torch.float64
    assert ours.domains[1].weight is ours.domains[0].weight


def test_a_frozen_domain_model_loads_its_own_state_dict():
    """After bnkit.freeze the domains are FrozenBatchNorm (no .affine): load_state_dict raised AttributeError."""
    bn = bnkit.DomainBatchNorm1d(2, 2)
    bn(torch.randn(8, 2) + 3, domain=1)
    frozen = bnkit.freeze(bn)
    copy = bnkit.freeze(bnkit.DomainBatchNorm1d(2, 2))
    copy.load_state_dict(frozen.state_dict())
    x = torch.randn(3, 2)
    torch.testing.assert_close(copy(x, domain=1), frozen(x, domain=1))
    torch.testing.assert_close(copy.domains[1].running_mean, bn.domains[1].running_mean)
