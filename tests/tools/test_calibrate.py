"""bnkit.calibrate against independent references: torch.nn on one giant batch, float64 statistics of
concatenated activations, full-eval activations, single-process runs for the distributed merge."""
from __future__ import annotations

import copy
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnkit
from bnkit.tools.freezing import stats_frozen_mode


def _batches(shape_tail, sizes, mean=0.0, std=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + shape_tail, generator=g, dtype=dtype) * std + mean) for n in sizes]


def _bn_layers(model):
    return [m for _, m in bnkit.batch_norm_layers(model)]


def _pooled_inputs(model, batches, train_bn: bool):
    """float64 ``(mean, unbiased var)`` of each BN layer's inputs over all batches (concatenated).

    ``train_bn=True``: every BN normalizes with batch statistics (its running update is irrelevant:
    a copy runs); ``False``: full eval mode.
    """
    model = copy.deepcopy(model)
    model.eval()
    layers = _bn_layers(model)
    for m in layers:
        m.train(train_bn)
    seen = {id(m): [] for m in layers}
    handles = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].detach()))
               for m in layers]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    out = []
    for m in layers:
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen[id(m)]], dim=1).double()
        out.append((x.mean(1), x.var(1, unbiased=True)))
    return out


def _assert_running_equals(model, reference, rtol=1e-10, atol=1e-12):
    for m, (mean, var) in zip(_bn_layers(model), reference):
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=rtol, atol=atol)
        torch.testing.assert_close(m.running_var.double(), var, rtol=rtol, atol=atol)


class Branchy(nn.Module):
    """stem BN (level 0) -> two parallel branches with a BN each (level 1) -> BN after the sum (level 2)."""

    def __init__(self, torch_branch=nn.BatchNorm2d):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bnkit.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), bnkit.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), torch_branch(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 3, 3), bnkit.BatchNorm2d(3, momentum=None))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.a(h) + self.b(h))


def _branchy_data(sizes=(6, 3, 8, 5, 2), seed=0):
    return _batches((2, 5, 5), sizes, mean=1.5, std=2.0, seed=seed)


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("layer_cls, tail", [
    (bnkit.BatchNorm1d, (3,)), (bnkit.BatchNorm1d, (3, 4)), (bnkit.BatchNorm2d, (3, 4, 2)),
    (bnkit.BatchNorm3d, (3, 2, 3, 2)), (nn.BatchNorm1d, (3,)), (nn.BatchNorm2d, (3, 4, 2)),
    (nn.BatchNorm3d, (3, 2, 3, 2)), (nn.SyncBatchNorm, (3, 4, 2)),
    # variants whose batch statistics are not one batch's: the layer's whole input is still what is pooled
    (lambda c, dtype: bnkit.GhostBatchNorm2d(c, virtual_batch_size=4, dtype=dtype), (3, 4, 2)),
    (lambda c, dtype: bnkit.BatchRenorm2d(c, rmax=3.0, dmax=5.0, dtype=dtype), (3, 4, 2)),
    (bnkit.SyncBatchNorm, (3, 4, 2))])
def test_pooled_statistics_equal_one_giant_batch(layer_cls, tail):
    sizes = (2, 9, 31, 5)  # unequal: an equal-weight average of batches would be wrong
    data = _batches(tail, sizes, mean=3.0, std=2.0)
    model = nn.Sequential(layer_cls(3, dtype=torch.float64))
    report = bnkit.calibrate(model, data, num_batches=None, progress=False)

    giant = nn.BatchNorm1d(3, momentum=1.0, dtype=torch.float64) if len(tail) <= 2 else \
        getattr(nn, f"BatchNorm{len(tail) - 1}d")(3, momentum=1.0, dtype=torch.float64)
    giant(torch.cat(data))
    torch.testing.assert_close(model[0].running_mean, giant.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, giant.running_var, rtol=1e-12, atol=1e-12)
    values_per_channel = sum(sizes) * (torch.Size(tail[1:]).numel())
    assert report.layers[0].samples == values_per_channel and report.batches == len(sizes)

    equal_weight = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(data, equal_weight)  # torch: mean of per-batch unbiased variances
    assert not torch.allclose(equal_weight[0].running_var, giant.running_var, rtol=1e-3)


def test_channels_last_padding_and_biased_variance_follow_the_layer():
    """axis=-1, lengths= (padding left out) and variance="biased": the statistics the layer itself uses."""
    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(3, axis=-1, variance="biased", dtype=torch.float64)

        def forward(self, x, lengths):
            return self.bn(x, lengths=lengths)

    g = torch.Generator().manual_seed(4)
    data = [{"x": torch.randn(n, 6, 3, generator=g, dtype=torch.float64) * 2 + 1,
             "lengths": torch.randint(1, 7, (n,), generator=g)} for n in (3, 5, 2)]
    model = Sequence()
    report = bnkit.calibrate(model, data, num_batches=None, progress=False)
    valid = torch.cat([b["x"][n, :length] for b in data for n, length in enumerate(b["lengths"].tolist())])
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(model.bn.running_var, valid.var(0, unbiased=False))
    assert report.layers[0].samples == len(valid)
    assert model.bn.last_train_batch_size is None  # state the layer records in training is put back
    assert not model.bn._moments_hooks  # the per-call observation hooks are gone


def test_mask_keyword_and_a_masked_batch_of_one_value():
    """mask= is measured like lengths=; a batch whose mask leaves one valid value per channel is left out of
    every layer (warning), as an unmasked batch of one value is. Reference: float64 of the valid values."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(2, dtype=torch.float64)
            self.head = nn.BatchNorm1d(2, dtype=torch.float64)

        def forward(self, x, mask):
            return self.head(self.bn(x, mask=mask))

    g = torch.Generator().manual_seed(5)
    data = [{"x": torch.randn(4, 2, 5, generator=g, dtype=torch.float64), "mask": torch.rand(4, 5, generator=g) < 0.6}
            for _ in range(3)]
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[2, 3] = True
    data.insert(1, {"x": torch.randn(4, 2, 5, generator=g, dtype=torch.float64), "mask": one})
    model = Masked()
    with pytest.warns(RuntimeWarning, match=r"batch 1: 4 sample\(s\), layer 'bn'"):
        report = bnkit.calibrate(model, data, num_batches=None, progress=False)
    kept = [b for k, b in enumerate(data) if k != 1]
    valid = torch.cat([b["x"].transpose(1, 2)[b["mask"]] for b in kept])
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(model.bn.running_var, valid.var(0))
    assert report.layers[0].samples == len(valid) and report.single_value_batches == 1 and report.batches == 3
    assert not model.bn._moments_hooks


def test_bad_mask_is_the_layers_error_and_nothing_changes():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(2)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    model = Masked()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"x": torch.randn(4, 2, 5), "mask": torch.ones(4, 5, dtype=torch.bool)},
            {"x": torch.randn(4, 2, 5), "mask": torch.ones(4, 6, dtype=torch.bool)}]
    with pytest.raises(ValueError, match=r"BatchNorm1d\(2\): mask must be a bool tensor shaped like the input"):
        bnkit.calibrate(model, data, num_batches=None, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.bn._moments_hooks and not model.bn._forward_pre_hooks


def test_float32_large_mean_stays_accurate():
    """mean 1e4, std 1 in float32: stable merges keep the variance; the float64 giant batch is the reference."""
    data = _batches((2, 8), (64, 17, 100, 3), mean=1e4, std=1.0, dtype=torch.float32, seed=3)
    model = nn.Sequential(bnkit.BatchNorm1d(2))
    bnkit.calibrate(model, data, num_batches=None, progress=False)
    x = torch.cat(data).double().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(model[0].running_mean.double(), x.mean(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(model[0].running_var.double(), x.var(1), rtol=1e-3, atol=0)


def test_deep_model_precise_equals_concatenated_train_mode_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(5, 6), bnkit.BatchNorm1d(6)).double()
    data = _batches((2, 5, 5), (4, 7, 3, 10), mean=-1.0, std=3.0)
    reference = _pooled_inputs(model, data, train_bn=True)
    report = bnkit.calibrate(model, data, num_batches=None, progress=False)
    _assert_running_equals(model, reference)
    assert report.passes == 1 and [layer.level for layer in report.layers] == [0, 0, 0]


def test_layer_called_twice_pools_both_calls():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv1d(2, 3, 1), nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.c1(x)).sum() + self.bn(self.c2(x)).sum()

    model = Shared().double()
    data = _batches((2, 6), (5, 8))
    report = bnkit.calibrate(model, data, num_batches=None, progress=False)
    with torch.no_grad():
        acts = [model.c1(b) for b in data] + [model.c2(b) for b in data]
    x = torch.cat([a.transpose(0, 1).reshape(3, -1) for a in acts], dim=1)
    torch.testing.assert_close(model.bn.running_mean, x.mean(1))
    torch.testing.assert_close(model.bn.running_var, x.var(1))
    assert report.layers[0].samples == 13 * 6 + 13 * 4


# ------------------------------------------------------------------------------------------- eval_consistent

def test_eval_consistent_matches_full_eval_inputs_one_pass_per_level():
    data = _branchy_data()
    model = Branchy().double()
    calls = []
    report = bnkit.calibrate(model, data, num_batches=None, mode="eval_consistent", progress=False,
                             forward=lambda m, b: (calls.append(1), m(b)))
    assert [layer.level for layer in report.layers] == [0, 1, 1, 2]
    assert report.passes == 3 and len(calls) == 3 * len(data)
    _assert_running_equals(model, _pooled_inputs(model, data, train_bn=False))

    precise = Branchy().double()
    bnkit.calibrate(precise, data, num_batches=None, progress=False)
    full_eval = _pooled_inputs(precise, data, train_bn=False)
    head = _bn_layers(precise)[-1]
    assert not torch.allclose(head.running_var.double(), full_eval[-1][1], rtol=1e-3)


def test_eval_consistent_self_dependent_layer_warns():
    bn = bnkit.BatchNorm1d(3, dtype=torch.float64)
    model = nn.Sequential(bn, nn.Linear(3, 3, dtype=torch.float64), bn)
    with pytest.warns(RuntimeWarning, match="applied to its own output"):
        report = bnkit.calibrate(model, _batches((3,), (4, 4)), num_batches=None, mode="eval_consistent",
                                 progress=False)
    assert report.layers[0].samples == 16


# ------------------------------------------------------------------------------------------- state and modes

class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


def _stateful_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), bnkit.BatchNorm1d(5, momentum=0.3), nn.Dropout(0.5), _WithBuffer(),
                          nn.Linear(5, 5), nn.BatchNorm1d(5, momentum=None), nn.ReLU(),
                          nn.Linear(5, 5), bnkit.BatchNorm1d(5)).double()
    return model


@pytest.mark.parametrize("mode", ["precise", "eval_consistent"])
def test_state_is_restored_and_parameters_untouched(mode):
    model = _stateful_model()
    model.train()
    model[4].eval()
    model[1].stats_frozen = "running"
    bnkit.freeze_stats(model[5])  # a torch.nn layer frozen through bnkit's hooks
    for m in _bn_layers(model):
        m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]

    data = _batches((4,), (6, 9, 4), seed=2)
    bnkit.calibrate(model, data, num_batches=None, mode=mode, progress=False)

    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert model[1].stats_frozen == "running" and stats_frozen_mode(model[5]) == "batch"
    assert model[5].track_running_stats and model[1].momentum == 0.3 and model[5].momentum is None
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.running_{s}" for i in (1, 5, 8) for s in ("mean", "var")}


def test_model_in_eval_mode_and_dropout_give_same_result_as_train_mode():
    data = _batches((4,), (6, 9, 4), seed=2)
    in_train, in_eval = _stateful_model().train(), _stateful_model().eval()
    bnkit.calibrate(in_train, data, num_batches=None, progress=False)
    bnkit.calibrate(in_eval, data, num_batches=None, progress=False)
    assert not in_eval.training and all(not m.training for m in in_eval.modules())
    for a, b in zip(_bn_layers(in_train), _bn_layers(in_eval)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    # dropout off, BN with batch statistics: the reference with the same settings
    _assert_running_equals(in_eval, _pooled_inputs(_stateful_model(), data, train_bn=True))


def test_failure_part_way_restores_buffers_and_modes():
    model = Branchy().double().train()
    data = _branchy_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def forward(m, batch):  # fails in the second pass, after level 0 was written
        calls.append(1)
        if len(calls) == len(data) + 2:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        bnkit.calibrate(model, data, num_batches=None, mode="eval_consistent", forward=forward, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(stats_frozen_mode(m) is None for m in _bn_layers(model))


# ------------------------------------------------------------------------------------------------ data

def test_loader_forms_give_the_same_statistics():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(3, dtype=torch.float64)

        def forward(self, x, label=None):
            return self.bn(x)

    data = _batches((3,), (5, 6))
    labels = [torch.zeros(len(b)) for b in data]
    forms = {
        "tensor": (data, None),
        "tuple": ([(x, y) for x, y in zip(data, labels)], None),
        "list": ([[x, y] for x, y in zip(data, labels)], None),
        "dict": ([{"x": x, "label": y} for x, y in zip(data, labels)], None),
        "forward": ([{"pixels": x} for x in data], lambda m, b: m(b["pixels"])),
    }
    results = []
    for loader, forward in forms.values():
        model = Keyword()
        bnkit.calibrate(model, loader, num_batches=None, forward=forward, progress=False)
        results.append((model.bn.running_mean, model.bn.running_var))
    for mean, var in results[1:]:
        assert torch.equal(mean, results[0][0]) and torch.equal(var, results[0][1])
    with pytest.raises(TypeError, match="forward="):
        bnkit.calibrate(Keyword(), [{1, 2}], progress=False)


def test_short_loader_warns_and_uses_what_came():
    data = _batches((3,), (5, 6, 7))
    model = nn.Sequential(bnkit.BatchNorm1d(3, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="ran out after 3 batches, before num_batches=10"):
        report = bnkit.calibrate(model, data, num_batches=10, progress=False)
    assert report.short_loader and report.batches == 3 and report.inputs == 18
    _assert_running_equals(model, _pooled_inputs(model, data, train_bn=True))


def test_num_samples_takes_precedence_and_stops_after_the_batch_that_reaches_it():
    data = _batches((3,), (4, 4, 4, 4, 4))
    model = nn.Sequential(bnkit.BatchNorm1d(3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = bnkit.calibrate(model, data, num_samples=10, num_batches=1, progress=False)
    assert report.batches == 3 and report.inputs == 12 and not report.short_loader
    _assert_running_equals(model, _pooled_inputs(model, data[:3], train_bn=True))
    with pytest.warns(RuntimeWarning, match="before num_samples=100"):
        assert bnkit.calibrate(model, data, num_samples=100, progress=False).short_loader
    two = bnkit.calibrate(model, data, num_batches=2, progress=False)
    assert two.batches == 2 and two.inputs == 8


def test_nonfinite_batch_is_skipped_for_all_layers_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bnkit.BatchNorm1d(4, nonfinite="raise"), nn.Linear(4, 2),
                          nn.BatchNorm1d(2)).double()
    good = _batches((3,), (5, 6, 7))
    bad = good[1].clone()
    bad[2, 1] = float("nan")
    clean = copy.deepcopy(model)
    bnkit.calibrate(clean, good, num_batches=None, progress=False)
    for mode in ("precise", "eval_consistent"):
        m = copy.deepcopy(model)
        report = bnkit.calibrate(m, [good[0], bad, good[1], good[2]], num_batches=None, mode=mode, progress=False)
        assert report.skipped_batches == 1 and report.batches == 3
        if mode == "precise":
            for a, b in zip(_bn_layers(m), _bn_layers(clean)):
                assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        else:
            _assert_running_equals(m, _pooled_inputs(m, good, train_bn=False))


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_raises_before_any_change():
    with pytest.raises(ValueError, match="Sequential has no batch-norm layer"):
        bnkit.calibrate(nn.Sequential(nn.Linear(2, 2)), [torch.randn(3, 2)], progress=False)
    with pytest.raises(ValueError, match="no batch-norm layer with running statistics"):
        bnkit.calibrate(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(3, 2)])
    model = nn.Sequential(bnkit.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, match in (({"mode": "fast"}, "mode must be one of"), ({"num_batches": 0}, "num_batches"),
                          ({"num_samples": 2.5}, "num_samples"), ({"forward": 3}, "forward must be")):
        with pytest.raises((ValueError, TypeError), match=match):
            bnkit.calibrate(model, [torch.randn(3, 2)], progress=False, **kwargs)
    with pytest.raises(ValueError, match="one-shot iterator"):
        bnkit.calibrate(model, (torch.randn(3, 2) for _ in range(2)), mode="eval_consistent", progress=False)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        bnkit.calibrate(model, [torch.randn(3, 2)], mode="eval_consistent", progress=False)
    with pytest.raises(ValueError, match="every batch gave some layer a single value per channel"):
        bnkit.calibrate(model, [torch.randn(1, 2), torch.randn(1, 2)], num_batches=None, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a generator is fine for the one-pass mode
    bnkit.calibrate(model, (torch.randn(3, 2) for _ in range(2)), num_batches=None, progress=False)
    assert not torch.equal(before["0.running_var"], model[0].running_var)


def test_layer_that_never_runs_is_left_unchanged_and_reported():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = bnkit.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Partly()
    with pytest.warns(RuntimeWarning, match=r"\['unused'\] never ran"):
        report = bnkit.calibrate(model, [torch.randn(4, 2)], num_batches=None, progress=False)
    assert torch.equal(model.unused.running_var, torch.ones(2))
    assert report.layers[1].samples == 0 and report.layers[1].mean_change is None
    text = str(report)
    assert "unused" in text and "BatchNorm1d" in text and "precise" in text


# ------------------------------------------------------------------------------------------------ output

def test_progress_prints_only_when_asked(capsys):
    model = nn.Sequential(bnkit.BatchNorm1d(2))
    data = [torch.randn(4, 2) for _ in range(3)]
    bnkit.calibrate(model, data, num_batches=None, progress=False)
    assert capsys.readouterr() == ("", "")
    bnkit.calibrate(model, data, num_batches=None, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "calibrate" in captured.err and "100%" in captured.err


def test_report_changes_are_relative_to_the_old_statistics():
    model = nn.Sequential(bnkit.BatchNorm1d(1, eps=1e-12))
    model[0].running_mean.fill_(1.0)
    model[0].running_var.fill_(4.0)
    x = torch.tensor([[3.0], [5.0]])  # mean 4, unbiased var 2
    layer = bnkit.calibrate(model, [x], num_batches=None, progress=False).layers[0]
    assert layer.mean_change == pytest.approx((4 - 1) / 2) and layer.var_change == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ distributed


class OnlyLargeBatches(nn.Module):
    """``late`` runs only on batches of 6 or more, so in the 2-rank test rank 1 never runs it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.early, self.late = nn.Sequential(nn.Conv2d(2, 3, 3), bnkit.BatchNorm2d(3)), nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.early(x)
        return self.late(h) if len(x) >= 6 else h


def _distributed_worker(rank, world, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        shard = _branchy_data()[rank::world]  # uneven shards: 3 and 2 batches of different sizes
        results = {}
        for mode in ("precise", "eval_consistent"):
            model = Branchy().double()
            report = bnkit.calibrate(model, shard, num_batches=None, mode=mode, progress=False)
            results[mode] = (model.state_dict(), [layer.samples for layer in report.layers])
        model = OnlyLargeBatches().double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 1: 'late' never ran here
            bnkit.calibrate(model, shard, num_batches=None, progress=False)
        results["layer unused on rank 1"] = (model.state_dict(), None)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_two_ranks_equal_single_process_on_the_union(tmp_path):
    world, deadline = 2, time.monotonic() + 120
    ctx = mp.spawn(_distributed_worker, args=(world, str(tmp_path)), nprocs=world, join=False)
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed calibration did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for mode in ("precise", "eval_consistent"):
        single = Branchy().double()
        report = bnkit.calibrate(single, _branchy_data(), num_batches=None, mode=mode, progress=False)
        for key, value in single.state_dict().items():
            assert torch.equal(ranks[0][mode][0][key], ranks[1][mode][0][key]), key
            torch.testing.assert_close(ranks[0][mode][0][key], value, rtol=1e-12, atol=1e-12)
        assert ranks[0][mode][1] == [layer.samples for layer in report.layers]
    single = OnlyLargeBatches().double()
    bnkit.calibrate(single, _branchy_data(), num_batches=None, progress=False)
    for key, value in single.state_dict().items():
        a, b = ranks[0]["layer unused on rank 1"][0][key], ranks[1]["layer unused on rank 1"][0][key]
        assert torch.equal(a, b), key
        torch.testing.assert_close(a, value)


@pytest.mark.parametrize("mode", ["precise", "eval_consistent"])
def test_last_batch_of_one_sample_is_left_out_with_a_warning(mode):
    """33 samples in batches of 8 (DataLoader, drop_last=False): the last batch gives the BatchNorm1d layers
    one value per channel. Reference: float64 statistics of the 4 full batches (torch's update_bn raises here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), bnkit.BatchNorm1d(2)).double()
    x = torch.randn(33, 3, dtype=torch.float64) * 2 + 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.optim.swa_utils.update_bn(loader, copy.deepcopy(model))
    reference = _pooled_inputs(model, list(x[:32].split(8)), train_bn=mode == "precise")
    if mode == "eval_consistent":  # upstream layers normalize with their new (population) statistics
        full = copy.deepcopy(model)
        bnkit.calibrate(full, list(x[:32].split(8)), num_batches=None, mode=mode, progress=False)
        reference = _pooled_inputs(full, list(x[:32].split(8)), train_bn=False)
    with pytest.warns(RuntimeWarning, match=r"1 batch\(es\) gave a layer a single value per channel \(batch 4: "
                                            r"1 sample\(s\), layer '1'\).*drop_last=True"):
        report = bnkit.calibrate(model, loader, num_batches=None, mode=mode, progress=False)
    _assert_running_equals(model, reference)
    assert report.batches == 4 and report.single_value_batches == 1 and report.skipped_batches == 0
    assert [layer.samples for layer in report.layers] == [32, 32]
    assert "1 left out (one value per channel)" in " ".join(str(report).split())


def test_last_batch_of_one_sample_with_spatial_positions_is_pooled():
    """One sample of 4x4 positions gives 16 values per channel: pooled like any batch (float64 of all 33)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double()
    x = torch.randn(33, 2, 6, 6, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = bnkit.calibrate(model, loader, num_batches=None, progress=False)
    with torch.no_grad():
        z = model[0](x).transpose(0, 1).reshape(3, -1)
    _assert_running_equals(model, [(z.mean(1), z.var(1, unbiased=True))])
    assert report.batches == 5 and report.single_value_batches == 0 and report.layers[0].samples == 33 * 16


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm1d, bnkit.LazyBatchNorm1d])
def test_lazy_layer_not_initialized_is_named(lazy):
    # torch's own error ("Attempted to use an uninitialized parameter in <method 'clone' ...>") names no module.
    model = nn.Sequential(nn.Conv1d(4, 4, 1), lazy())
    with pytest.raises(ValueError, match=r"calibrate: lazy module\(s\) '1' \(LazyBatchNorm1d\) not initialized"):
        bnkit.calibrate(model, [torch.randn(8, 4, 5)], progress=False)
    model(torch.randn(8, 4, 5))  # initialized: calibrates like any layer
    xs = [torch.randn(8, 4, 5) for _ in range(2)]
    bnkit.calibrate(model, xs, num_batches=None, progress=False)
    z = torch.cat([model[0](x) for x in xs]).detach().double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[1].running_var.double(), z.var(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_cls", [nn.BatchNorm1d, bnkit.BatchNorm1d])
def test_float16_statistics_beyond_the_dtype_leave_the_layer_unchanged_with_a_warning(layer_cls):
    # channel 0 has variance ~9e4 > float16's 65504: calibrate stored running_var = inf without a word
    # (eval then outputs the bias on that channel), while the report showed a finite change.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), layer_cls(2)).half()
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([300.0, 1.0])))
        model[0].bias.zero_()
    xs = [torch.randn(16, 2).half() for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['1'\] do not fit .*torch.float16: channel 0") as caught:
        report = bnkit.calibrate(model, xs, num_batches=None, progress=False)
    assert not any("never ran" in str(w.message) for w in caught)
    assert torch.equal(model[1].running_var, torch.ones(2, dtype=torch.float16))
    assert torch.equal(model[1].running_mean, torch.zeros(2, dtype=torch.float16))
    assert report.layers[0].samples == 0 and report.layers[0].var_change is None


def test_report_prints_without_rich(monkeypatch):
    # `pip install bnkit` has no rich (demo extra): print(report), as the README shows, raised
    # "No module named 'rich'".
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    report = bnkit.calibrate(model, [torch.randn(8, 3) for _ in range(5)], num_batches=None, progress=False)
    with_rich = str(report)
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now raises ImportError
    text = str(report).splitlines()
    assert text[0] == "bnkit.calibrate (precise): 5 batches used, 0 skipped (non-finite), 1 pass(es)"
    assert text[0] in with_rich
    assert text[1].split()[:4] == ["layer", "type", "level", "samples"]
    assert [line.split()[:4] for line in text[2:]] == [["1", "BatchNorm1d", "0", "40"], ["3", "BatchNorm1d", "0", "40"]]


def test_wrong_channel_count_in_a_torch_layer_is_named_and_nothing_changes():
    # torch's own error inside calibrate said "weight should contain 5 elements not 4", naming no layer.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5), nn.BatchNorm1d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"calibrate: layer '3', BatchNorm1d\(4\): expected 4 channels in dimension 1, "
                                         r"got 5 \(input shape \(8, 5\)\)"):
        bnkit.calibrate(model, [torch.randn(8, 3) for _ in range(2)], num_batches=None, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
