"""bnkit.doctor: planted problems are found (and nothing is found on a healthy model).

Population statistics come from bnkit.calibrate (the ``calibrate`` fixture in conftest.py).
"""
import copy
import pathlib
import warnings

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.doctor import doctor

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2 + 1


def _model(momentum=0.1, track=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track),
                         nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), bnkit.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4))


@pytest.fixture
def healthy(calibrate):
    model = _model()
    calibrate(model, list(_data().split(128)), num_batches=4, progress=False)
    return model.eval()


def _codes(report, layer):
    return " | ".join(f.problem for f in report.findings_for(layer))


def test_healthy_model_has_no_findings_and_is_not_modified(healthy):
    before = copy.deepcopy(healthy.state_dict())
    report = doctor(healthy, _data(), batch_size=128)
    assert report.findings == [], [f.problem for f in report.findings]
    assert report.ok and [d.name for d in report.layers] == ["1", "4", "9"]
    assert all(d.mean_error < 1e-4 and d.var_error < 1e-4 for d in report.layers)
    assert report.summary["samples"] == 512 and report.summary["batches"] == 4
    assert all(torch.equal(before[k], v) for k, v in healthy.state_dict().items())
    assert not healthy.training


def test_error_measures_equal_hand_computed_values(healthy):
    bn = healthy[1]
    std0 = float((bn.running_var[0] + bn.eps).sqrt())
    var1 = float(bn.running_var[1])
    with torch.no_grad():
        bn.running_mean[0] += 0.5 * std0
        bn.running_var[1] *= 1.3
    d = doctor(healthy, _data(), batch_size=128).layers[0]
    assert d.mean_error == pytest.approx(0.5, rel=1e-4)
    assert d.var_error == pytest.approx(0.3 * var1 / (var1 + bn.eps), rel=1e-4)


def test_stale_statistics_are_found_in_that_layer_only(healthy):
    with torch.no_grad():
        healthy[4].running_mean += 3.0
    report = doctor(healthy, _data(), batch_size=128)
    assert "EMA running statistics differ" in _codes(report, "4")
    assert "bnkit.calibrate" in report.findings_for("4")[0].fix
    assert report.findings_for("1") == []
    assert report.summary["output_gap_ema_vs_population"] > 0.01


def test_keras_momentum_is_found(calibrate):
    model = _model(momentum=0.99)
    calibrate(model, list(_data().split(128)), num_batches=4, progress=False)
    report = doctor(model.eval(), _data(), batch_size=128)
    [f] = report.findings_for("1")
    assert "Keras" in f.problem and "momentum=0.01" in f.fix and "momentum=bnkit.momentum.Decay(0.99)" in f.fix


def _trained_statistics(momentum, updates):
    """The test model after ``updates`` training-mode batches (running statistics only, no optimizer)."""
    model = _model(momentum=momentum)
    data = _data(n=64 * updates, seed=1)
    with torch.no_grad():
        for batch in data.split(64):
            model.train()(batch)
    return model.eval()


def test_too_few_updates_for_the_momentum_is_named_as_the_cause():
    model = _trained_statistics(momentum=0.01, updates=30)
    report = doctor(model, _data(), batch_size=128)
    found = report.findings_for("1")
    assert "EMA running statistics differ" in _codes(report, "1")
    [f] = [f for f in found if "too few updates" in f.problem]
    share = 0.99 ** 30  # 0.7397: the initial mean 0 / variance 1 still weighs 74 %
    assert "(1 - 0.01)^30 = 74%" in f.problem and f"{share:.0%}" == "74%"
    assert "bnkit.calibrate" in f.fix and "momentum=None" in f.fix
    assert f"{1 - 0.05 ** (1 / 30):.2g}" in f.fix       # the momentum that forgets 95 % in 30 updates: 0.095
    assert not any("Keras" in f.problem for f in report.findings)  # not the convention finding
    # the initial value's part of the mean error, by hand from the population statistics
    d = report.layers[0]
    pm, pv = torch.tensor(d.population_mean), torch.tensor(d.population_var)
    part = share * float((pm.abs() / (pv + 1e-5).sqrt()).max())
    assert f"mean off by {100 * part:.1f}% of a std" in f.problem


def test_no_update_finding_on_a_well_trained_or_calibrated_model(calibrate):
    # 0.9^200 = 7e-10 of the initial value left (after 60 updates, 0.2% would still be 156% of the tiny
    # variance, ~0.001, of the last layer's channels: a true finding)
    trained = _trained_statistics(momentum=0.1, updates=200)
    report = doctor(trained, _data(), batch_size=128)
    assert not any("too few updates" in f.problem for f in report.findings), report.findings
    few = _trained_statistics(momentum=0.01, updates=30)
    calibrate(few, list(_data().split(128)), num_batches=4, progress=False)
    assert int(few[1].num_batches_tracked) == 30          # calibration is not training: 74 % by the formula
    report = doctor(few, _data(), batch_size=128)
    assert not any("too few updates" in f.problem for f in report.findings), report.findings



def test_a_checkpoint_without_the_counter_is_not_blamed_on_too_few_updates():
    model = _trained_statistics(momentum=0.01, updates=30)
    model[1].num_batches_tracked.zero_()   # as torch does when loading a checkpoint without the counter
    report = doctor(model, _data(), batch_size=128)
    assert "EMA running statistics differ" in _codes(report, "1") and "too few updates" not in _codes(report, "1")
    model[1].reset_running_stats()         # never trained: 0 updates, the initial values themselves
    assert "(1 - 0.01)^0 = 100%" in _codes(doctor(model, _data(), batch_size=128), "1")


def test_keras_threshold_is_the_documented_constant(calibrate):
    from bnkit.stats.momentum import KERAS_LOOKALIKE_THRESHOLD

    assert KERAS_LOOKALIKE_THRESHOLD == 0.5
    assert "`momentum` >= 0.5" in (ROOT / "README.md").read_text()
    for momentum, flagged in ((0.6, True), (0.5, True), (0.45, False)):
        model = _model(momentum=momentum)
        calibrate(model, list(_data().split(128)), num_batches=4, progress=False)
        report = doctor(model.eval(), _data(), batch_size=128)
        assert any("Keras" in f.problem for f in report.findings_for("1")) == flagged, momentum
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bnkit.BatchNorm2d(3, momentum=momentum)
        assert any("looks like a Keras" in str(w.message) for w in caught) == flagged, momentum


def test_layer_left_in_train_mode_is_an_error(healthy):
    healthy[4].train()
    report = doctor(healthy, _data(), batch_size=128)
    [f] = report.findings_for("4")
    assert f.severity == "error" and "training mode" in f.problem and "model.eval()" in f.fix


def test_collapsed_channel_is_found(calibrate):
    model = _model()
    with torch.no_grad():
        model[3].weight[2].zero_()  # channel 2 of the second conv outputs its bias: a constant
    calibrate(model, list(_data().split(128)), num_batches=4, progress=False)
    report = doctor(model.eval(), _data(), batch_size=128)
    assert report.layers[1].collapsed_channels == [2]
    assert "1 of 6 channels" in _codes(report, "4")


def test_batch_of_one_and_loader_without_drop_last(healthy):
    data = _data(n=257)  # 2 batches of 128 and a last batch of 1
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    report = doctor(healthy, loader)
    assert report.layers[2].min_values_per_channel == 1          # BatchNorm1d after pooling sees N values
    assert "single value per channel" in _codes(report, "9")
    assert "drop_last=True" in report.findings_for("(model)")[0].fix
    assert report.findings_for("1") == []                        # 64 values per channel even for one image


def test_few_values_and_no_running_stats(calibrate):
    model = _model(track=False)
    calibrate(model, list(_data().split(128)), num_batches=4, progress=False)
    report = doctor(model.eval(), _data(n=64), batch_size=8)
    assert "track_running_stats=False" in _codes(report, "1")
    assert "only 8 values per channel" in _codes(report, "9")


def test_save_writes_html_json_and_plots(healthy, tmp_path):
    healthy[1].momentum = 0.9
    report = doctor(healthy, _data(), batch_size=128)
    out = report.save(tmp_path / "rep")
    assert sorted(p.name for p in out.iterdir()) == ["ema_vs_population.png", "index.html", "layer_errors.png",
                                                    "report.json"]
    page = (out / "index.html").read_text()
    assert "momentum=0.9" in page and "layer_errors.png" in page
    assert (out / "layer_errors.png").read_bytes()[:4] == b"\x89PNG"
    assert "Keras" in str(report)


def test_bad_input():
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        doctor(nn.Linear(2, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="batch dimension"):
        doctor(_model(), torch.tensor(1.0))


def test_torchscript_models_get_the_configuration_checks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.9), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          bnkit.BatchNorm2d(4)).eval()
    model[1].train()
    scripted = nn.Sequential(*model[:4])  # bnkit layers are not scriptable; torch.jit.trace takes them
    torch.jit.save(torch.jit.script(scripted), tmp_path / "s.pt")
    torch.jit.save(torch.jit.trace(model, _data(n=4)), tmp_path / "t.pt")
    for path, names in (("s.pt", ["1"]), ("t.pt", ["1", "4"])):
        report = doctor(torch.jit.load(tmp_path / path), _data(), batch_size=128)
        assert [d.name for d in report.layers] == names
        assert "training mode" in _codes(report, "1")
        assert "TorchScript" in report.findings_for("(model)")[0].problem
    assert report.summary["output_gap_train_vs_eval"] == 0  # a trace fixed each layer's mode when it was taken
    scripted_report = doctor(torch.jit.load(tmp_path / "s.pt"), _data())
    assert scripted_report.summary["output_gap_train_vs_eval"] > 0
    assert "Keras" in _codes(scripted_report, "1")  # a scripted layer keeps its momentum


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(data=torch.randn(0, 3, 8, 8)), "0 samples"),
    (dict(data=[torch.randn(0, 3, 8, 8), torch.randn(0, 3, 8, 8)]), "0 samples"),
    (dict(data=torch.full((64, 3, 8, 8), float("nan"))), "not finite: 12288 NaN/Inf"),
    (dict(data=[torch.randn(8, 3, 8, 8), (torch.randn(8, 3, 8, 8).index_fill(0, torch.tensor([5]), float("inf")),
                                          torch.zeros(8))]), "the first in sample 5 of batch 1"),
    (dict(data=_data(), num_batches=0), "num_batches must be a positive int, got 0"),
    (dict(data=_data(), batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(data=_data(), batch_size=True), "batch_size must be a positive int, got True"),
    (dict(data=_data(), mode="fast"), "mode must be one of ('precise', 'eval_consistent'), got 'fast'"),
])
def test_bad_data_and_arguments_are_refused_before_any_measurement(kwargs, fragment):
    model = _model().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as e:
        doctor(model, **kwargs)
    assert fragment in str(e.value) and str(e.value).startswith("doctor: ")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_train_eval_gap_follows_the_layers_axis_and_eval_map():
    # axis=-1 on (N, L, C) data: the gap is measured over the layer's channels (was: dimension 1)
    torch.manual_seed(0)
    layer = bnkit.BatchNorm1d(5, axis=-1)
    model = nn.Sequential(nn.Linear(3, 5), layer).eval()
    with torch.no_grad():
        layer.running_mean.fill_(10.0)  # stale: eval output is far from the training output
    x = torch.randn(32, 7, 3)
    report = doctor(model, x, batch_size=32, num_batches=1)
    d = {d.name: d for d in report.layers}["1"]
    with torch.no_grad():
        z = model[0](x)
        y_train = (z - z.mean((0, 1))) / torch.sqrt(z.var((0, 1), unbiased=False) + 1e-5)
        y_eval = (z - 10.0) / torch.sqrt(torch.ones(5) + 1e-5)
    want = float((y_train - y_eval).pow(2).mean().sqrt() / y_train.pow(2).mean().sqrt())
    assert d.train_eval_gap == pytest.approx(want, rel=1e-4)
    # example_weight: eval is not the running-statistics map, so that gap is not claimed
    model[1] = bnkit.BatchNorm1d(5, axis=-1, example_weight=0.5)
    assert {d.name: d for d in doctor(model, x, batch_size=32, num_batches=1).layers}["1"].train_eval_gap is None


def test_doctor_calls_the_layers_channels_last_activation_and_ghost():
    """axis=-1 with a fused ReLU, then a ghost layer on (N, L, C): the train/eval gap is the layers' own
    outputs (activation, ghost sub-batches), against torch.nn on the transposed input in float64; the
    population statistics against float64 by hand; the model's buffers are unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), bnkit.BatchNorm1d(5, axis=-1, activation="relu"), nn.Linear(5, 4),
                          bnkit.GhostBatchNorm1d(4, virtual_batch_size=8, axis=-1)).double().eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.linspace(-1.0, 1.0, 5))  # stale: eval differs from training
        model[1].running_var.fill_(2.0)
        model[3].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 7, 3, dtype=torch.float64)
    report = doctor(model, x, batch_size=32, num_batches=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(not m.training for m in model.modules())

    def torch_bn(layer, z, training):  # torch.nn with the layer's parameters and buffers, channels on dim 1
        ref = nn.BatchNorm1d(layer.num_features, dtype=torch.float64)
        ref.load_state_dict(layer.state_dict())
        return ref.train(training)(z.transpose(1, 2)).transpose(1, 2)

    def gap(y_train, y_eval):
        return float((y_train - y_eval).pow(2).mean().sqrt() / y_train.pow(2).mean().sqrt())

    with torch.no_grad():
        z1 = model[0](x)
        y1_train, y1_eval = torch_bn(model[1], z1, True).relu(), torch_bn(model[1], z1, False).relu()
        z3 = model[2](y1_train)  # in training mode the ghost layer's input comes from layer 1 with batch statistics
        y3_train = torch.cat([torch_bn(model[3], chunk, True) for chunk in z3.split(8)])
        y3_eval = torch_bn(model[3], z3, False)
    layers = {d.name: d for d in report.layers}
    assert layers["1"].train_eval_gap == pytest.approx(gap(y1_train, y1_eval), rel=1e-9)
    assert layers["3"].train_eval_gap == pytest.approx(gap(y3_train, y3_eval), rel=1e-9)
    assert "train and eval outputs of this layer differ" in _codes(report, "1")
    # population statistics (precise mode): every value of each layer's input, as in training
    for name, z in (("1", z1), ("3", z3)):
        flat = z.reshape(-1, z.shape[-1])
        torch.testing.assert_close(torch.tensor(layers[name].population_mean, dtype=torch.float64), flat.mean(0))
        torch.testing.assert_close(torch.tensor(layers[name].population_var, dtype=torch.float64), flat.var(0))


def test_doctor_passes_a_layers_lengths_on():
    """A layer called with lengths=: padding stays out of its statistics in both the train/eval gap and the
    population statistics (float64 by hand over the valid positions; padding holds large values)."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(3, axis=-1, dtype=torch.float64)

        def forward(self, x, lengths):
            return self.bn(x, lengths=lengths)

    model = Padded().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 9, 3, generator=g, dtype=torch.float64) * 2 + 1
    lengths = torch.randint(2, 10, (16,), generator=g)
    valid = torch.arange(9)[None, :] < lengths[:, None]
    x[~valid] = 50.0
    report = doctor(model, [(x, lengths)], forward=lambda m, b: m(*b))
    v = x[valid]
    mean, var = v.mean(0), v.var(0, unbiased=False)
    y_train = torch.where(valid[..., None], (x - mean) / torch.sqrt(var + 1e-5), x)
    y_eval = torch.where(valid[..., None], (x - 0.3) / torch.sqrt(torch.tensor(1.0 + 1e-5, dtype=torch.float64)), x)
    want = float((y_train - y_eval).pow(2).mean().sqrt() / y_train.pow(2).mean().sqrt())
    [d] = report.layers
    assert d.train_eval_gap == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(torch.tensor(d.population_mean, dtype=torch.float64), mean)
    torch.testing.assert_close(torch.tensor(d.population_var, dtype=torch.float64), v.var(0))


@pytest.mark.parametrize("layer", ["1", "4"])  # torch.nn and bnkit
def test_train_mode_layer_frozen_on_running_statistics_is_not_blamed(healthy, layer):
    # freeze_stats(use_running=True) makes a training-mode layer compute exactly its eval output and update
    # nothing; doctor called that an error ("normalizes with the statistics of each batch ... keeps updating").
    x = _data()[:64]
    with torch.no_grad():
        want = healthy(x)
    bnkit.freeze_stats(healthy, use_running=True)
    healthy.get_submodule(layer).train()
    with torch.no_grad():
        assert torch.equal(healthy(x), want)  # the premise: eval's numbers
    report = doctor(healthy, _data(), batch_size=128)
    assert not [f for f in report.findings_for(layer) if "training mode" in f.problem], _codes(report, layer)
    # frozen on batch statistics: still a finding, without the claim that the statistics keep updating
    bnkit.freeze_stats(healthy)
    [f] = [f for f in doctor(healthy, _data(), batch_size=128).findings_for(layer) if "training mode" in f.problem]
    assert f.severity == "error" and "keeps updating" not in f.problem and "use_running=True" in f.fix


def test_lazy_layer_not_initialized_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"doctor: lazy module\(s\) '1' \(LazyBatchNorm2d\) not initialized"):
        doctor(model, _data(64))


def test_last_batch_of_one_is_counted_from_the_sampler(healthy):
    # The DataLoader draws len(sampler) samples per epoch, not len(dataset): a subset of 257 of 300 images
    # ends in a batch of one (doctor said nothing), the first 256 of 257 images do not (doctor said it did).
    def loader_finding(n_data, n_drawn):
        data = _data(n=n_data)
        sampler = torch.utils.data.SubsetRandomSampler(range(n_drawn), generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(data, batch_size=128, sampler=sampler)
        assert len([b for b in loader][-1]) == (n_drawn - 1) % 128 + 1  # the premise, counted by iterating
        return [f for f in doctor(healthy, loader, num_batches=3).findings_for("(model)") if "DataLoader" in f.problem]

    [f] = loader_finding(300, 257)
    assert "257 samples" in f.problem and "drop_last=True" in f.fix
    assert loader_finding(257, 256) == []


def test_model_train_eval_gap_is_batch_norms_not_dropouts(calibrate, tmp_path):
    # The model-level train/eval gap ran the whole model in training mode, dropout included: a calibrated
    # model with Dropout(0.5) showed 0.68 where its batch norm alone accounts for ~0.1. Reference: the same
    # model with the dropout replaced by Identity (its eval), which must give the identical summary.
    def model(drop):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.BatchNorm1d(32), nn.ReLU(), drop, nn.Linear(32, 4))

    data = _data()
    with_dropout, reference = model(nn.Dropout(0.5)), model(nn.Identity())
    for m in (with_dropout, reference):
        calibrate(m, list(data.split(128)), num_batches=4, progress=False)
        m.eval()
    gaps = [doctor(m, data, batch_size=128).summary["output_gap_train_vs_eval"] for m in (with_dropout, reference)]
    assert 0 < gaps[0] == gaps[1] < 0.3, gaps
    torch.jit.save(torch.jit.script(with_dropout), tmp_path / "d.pt")  # TorchScript: the same
    torch.jit.save(torch.jit.script(reference), tmp_path / "r.pt")
    gaps = [doctor(torch.jit.load(tmp_path / p), data, batch_size=128).summary["output_gap_train_vs_eval"]
            for p in ("d.pt", "r.pt")]
    assert 0 < gaps[0] == gaps[1] < 0.3, gaps


@pytest.mark.parametrize("setup,expected", [
    (lambda m: None, "error"),                                             # torch.nn: training raises
    (lambda m: setattr(m[1], "single_sample", "use_running"), None),        # bnkit handles it: eval's numbers
    (lambda m: bnkit.freeze_stats(m, use_running=True), None),              # frozen on the running statistics
    (lambda m: setattr(m[1], "single_sample", "skip_update"), "warning"),   # works, outputs the bias
])
def test_single_value_batch_finding_follows_what_training_does(calibrate, setup, expected):
    # doctor said "training on it raises" (an error) for layers that train on such a batch without raising.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), bnkit.BatchNorm1d(4))
    data = torch.randn(257, 4)  # two batches of 128 and one of 1
    calibrate(model, list(data[:256].split(128)), num_batches=None, progress=False)
    setup(model)
    model.train()
    try:
        model(data[:1])
        raised = False
    except ValueError:
        raised = True
    assert raised == (expected == "error")  # the premise, from the layer itself
    model.eval()
    found = [f.severity for f in doctor(model, data, batch_size=128).findings_for("1") if "single value" in f.problem]
    assert found == ([expected] if expected else [])


def test_loader_last_batch_of_one_is_an_error_only_where_a_layer_raises(calibrate):
    # A model of BatchNorm2d layers trains on one image (H x W values per channel); doctor said "training
    # raises on it" (an error) for every loader ending in a batch of one.
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), bnkit.BatchNorm2d(4))
    with_linear = nn.Sequential(*convs, nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))
    loader = torch.utils.data.DataLoader(_data(n=257), batch_size=128)
    for model, severity, named in ((convs, "warning", None), (with_linear, "error", "['7']")):
        calibrate(model, list(_data(n=256).split(128)), num_batches=None, progress=False)
        model.train()
        try:
            model(_data(n=1))
            raised = False
        except ValueError:
            raised = True
        assert raised == (severity == "error")  # the premise, from the model itself
        model.eval()
        [f] = [f for f in doctor(model, loader).findings_for("(model)") if "DataLoader" in f.problem]
        assert f.severity == severity and "drop_last=True" in f.fix
        assert named is None or named in f.problem


def test_momentum_one_is_not_fixed_with_a_momentum_that_never_updates():
    # momentum=1 was read as a Keras decay of 1 and the fix said "use momentum=0 (torch), or
    # bnkit.momentum.Decay(1)": both never update the running statistics.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=1.0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrate's and the layer's own notes
        [f] = [f for f in doctor(model, _data(256)).findings_for("1") if "momentum=1 " in f.problem]
    assert "last batch only" in f.problem and "Keras" not in f.problem
    assert "momentum=0 " not in f.fix and "Decay(1)" not in f.fix and "momentum=None" in f.fix
