"""Keras weights: from_keras/to_keras against Keras 3's formulas, and against Keras itself when installed.

Keras 3 (read from keras/src/layers/normalization/batch_normalization.py)::

    moving = momentum * moving + (1 - momentum) * batch      # batch variance biased (divided by n)
    y      = (x - mean) / sqrt(var + epsilon) * gamma + beta
"""
import os

import numpy as np
import pytest
import torch

import bnkit


def _keras_step(x, gamma, beta, moving_mean, moving_var, momentum, epsilon, training):
    """Keras's BatchNormalization on channels-last NumPy data, in float64. Returns y and new moving stats."""
    axes = tuple(range(x.ndim - 1))
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_var = momentum * moving_var + (1 - momentum) * var
    else:
        mean, var = moving_mean, moving_var
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta, moving_mean, moving_var


def _random_weights(c, rng):
    return [rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c), rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)]


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_from_keras_list_gives_keras_numbers(ndim):
    rng = np.random.default_rng(ndim)
    weights = _random_weights(4, rng)
    bn = bnkit.from_keras([w.astype(np.float32) for w in weights], ndim=ndim, momentum=0.9, epsilon=1e-3)
    assert type(bn) is {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}[ndim]
    gamma, beta, moving_mean, moving_var = weights
    shape = (6,) + (3,) * (ndim - 2) + (4,)  # channels last, as Keras holds it
    for step in range(3):
        x = rng.normal(2.0, 3.0, shape)
        y_k, moving_mean, moving_var = _keras_step(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-3, True)
        y = bn(torch.tensor(x, dtype=torch.float32).movedim(-1, 1)).movedim(1, -1)
        np.testing.assert_allclose(y.detach().numpy(), y_k, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), moving_var, rtol=1e-5, atol=1e-6)
    bn.eval()
    x = rng.normal(0.0, 1.0, shape)
    y_k, _, _ = _keras_step(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-3, False)
    y = bn(torch.tensor(x, dtype=torch.float32).movedim(-1, 1)).movedim(1, -1)
    np.testing.assert_allclose(y.detach().numpy(), y_k, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_from_keras_center_scale_and_dict(center, scale):
    rng = np.random.default_rng(0)
    gamma, beta, mean, var = _random_weights(3, rng)
    names = {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var}
    as_dict = {k: v for k, v in names.items() if (k != "gamma" or scale) and (k != "beta" or center)}
    as_list = list(as_dict.values())
    x = rng.normal(size=(8, 3))
    expected, _, _ = _keras_step(x, gamma if scale else 1.0, beta if center else 0.0, mean, var, 0.99, 1e-3, False)
    for bn in (bnkit.from_keras(as_dict, ndim=2), bnkit.from_keras(as_list, ndim=2, center=center, scale=scale)):
        assert bn.affine == (center or scale)
        if bn.affine:  # the missing one is fixed, as in Keras
            assert bn.weight.requires_grad == scale and bn.bias.requires_grad == center
        y = bn.eval()(torch.tensor(x, dtype=torch.float32))
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_from_keras_errors():
    w = [np.ones(3)] * 4
    with pytest.raises(ValueError, match="from_keras: pass ndim="):
        bnkit.from_keras(w)
    with pytest.raises(ValueError, match=r"3 weight arrays.*pass center= or scale="):
        bnkit.from_keras(w[:3], ndim=4)
    with pytest.raises(ValueError, match=r"expected 4 weight arrays"):
        bnkit.from_keras(w[:3], ndim=4, center=True, scale=True)
    with pytest.raises(ValueError, match=r"same positive length.*'moving_variance': \(4,\)"):
        bnkit.from_keras(w[:3] + [np.ones(4)], ndim=4)
    with pytest.raises(ValueError, match="unknown weight name"):
        bnkit.from_keras({"moving_mean": w[0], "moving_varaince": w[0]}, ndim=4)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): variance must be one of .*'population'"):
        bnkit.BatchNorm2d(3, variance="population")


def test_to_keras_round_trip():
    torch.manual_seed(0)
    layer = bnkit.BatchNorm2d(3, momentum=bnkit.momentum.Decay(0.95), eps=1e-3, variance="biased")
    layer(torch.randn(4, 3, 2, 2))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
    weights, config = bnkit.to_keras(layer)
    assert config == {"epsilon": 1e-3, "momentum": 0.95, "center": True, "scale": True}
    back = bnkit.from_keras(weights, ndim=4, momentum=config["momentum"], epsilon=config["epsilon"])
    assert back.state_dict().keys() == layer.state_dict().keys()
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(back.state_dict()[key], layer.state_dict()[key]), key
    assert back.momentum == layer.momentum and back.variance == "biased"
    with pytest.raises(ValueError, match=r"to_keras\(BatchNorm1d\(2\)\): momentum=None"):
        bnkit.to_keras(bnkit.BatchNorm1d(2, momentum=None))


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 is optional: pip install bnkit[keras]")
    if keras.backend.backend() != "torch" or not keras.__version__.startswith("3"):
        pytest.skip(f"needs Keras 3 with the torch backend, found Keras {keras.__version__} "
                    f"with {keras.backend.backend()!r}")
    return keras


@pytest.mark.parametrize("center,scale", [(True, True), (False, True)])
def test_against_real_keras(keras, center, scale):
    rng = np.random.default_rng(1)
    k_layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, center=center, scale=scale)
    k_layer.build((None, 5, 5, 4))
    k_layer.set_weights([w.astype(np.float32) for w, on in zip(_random_weights(4, rng), (scale, center, 1, 1)) if on])
    bn = bnkit.from_keras(k_layer)  # epsilon, momentum, center, scale and ndim=4 are read from the layer
    assert type(bn) is bnkit.BatchNorm2d and bn.eps == 1e-3 and bn.momentum == pytest.approx(0.1)
    for step in range(3):
        x = rng.normal(1.0, 2.0, (6, 5, 5, 4)).astype(np.float32)
        y_k = np.asarray(keras.ops.convert_to_numpy(k_layer(x, training=True)))
        y = bn(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).detach().numpy()
        np.testing.assert_allclose(y, y_k, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
        k_mean, k_var = k_layer.get_weights()[-2:]
        np.testing.assert_allclose(bn.running_mean.numpy(), k_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), k_var, rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
    y_k = np.asarray(keras.ops.convert_to_numpy(k_layer(x, training=False)))
    y = bn.eval()(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).detach().numpy()
    np.testing.assert_allclose(y, y_k, rtol=1e-5, atol=1e-5)
    weights, config = bnkit.to_keras(bn)
    k_back = keras.layers.BatchNormalization(**config)
    k_back.build((None, 5, 5, 4))
    k_back.set_weights(weights)
    y_back = np.asarray(keras.ops.convert_to_numpy(k_back(x, training=False)))
    np.testing.assert_allclose(y_back, y_k, rtol=1e-5, atol=1e-5)


def _trained(layer, shape=(6, 3, 4, 4), seed=0):
    torch.manual_seed(seed)
    for _ in range(2):
        layer(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 2)
    return layer.eval()


def _keras_eval(weights, config, x_last):
    """Keras's inference formula (see the module docstring) applied to (weights, config), float64."""
    w = [np.asarray(a, np.float64) for a in weights]
    gamma = w.pop(0) if config["scale"] else 1.0
    beta = w.pop(0) if config["center"] else 0.0
    return _keras_step(x_last, gamma, beta, w[0], w[1], config["momentum"], config["epsilon"], training=False)[0]


def test_to_keras_without_bias_gives_center_false():
    layer = _trained(bnkit.BatchNorm2d(3, bias=False))
    weights, config = bnkit.to_keras(layer)
    assert config["center"] is False and config["scale"] is True and len(weights) == 3
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = layer.double()(x).movedim(1, -1).detach().numpy()
    np.testing.assert_allclose(_keras_eval(weights, config, x.movedim(1, -1).numpy()), y, rtol=1e-6, atol=1e-6)
    torch_layer = _trained(torch.nn.BatchNorm2d(3, bias=False))  # torch.nn too
    assert bnkit.to_keras(torch_layer)[1]["center"] is False


def test_to_keras_frozen_batch_norm():
    ref = _trained(torch.nn.BatchNorm2d(3))
    frozen = bnkit.FrozenBatchNorm2d(3)
    frozen.load_state_dict(ref.state_dict())
    weights, config = bnkit.to_keras(frozen)
    assert config == {"epsilon": 1e-5, "momentum": 0.99, "center": True, "scale": True, "trainable": False}
    x = torch.randn(2, 3, 4, 4)
    np.testing.assert_allclose(_keras_eval(weights, config, x.movedim(1, -1).double().numpy()),
                               ref(x).movedim(1, -1).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_to_keras_refuses_what_keras_cannot_compute():
    layer = _trained(bnkit.BatchNorm2d(3, activation="relu"))
    with pytest.raises(ValueError, match=r"to_keras\(BatchNorm2d\(3\)\): activation='relu'.*split_activation=True.*"
                                         r"keras.layers.Activation\('relu'\)"):
        bnkit.to_keras(layer)
    with pytest.raises(ValueError, match=r"keras.layers.LeakyReLU\(negative_slope=0.2\)"):
        bnkit.to_keras(bnkit.BatchNorm2d(3, activation=torch.nn.LeakyReLU(0.2)))
    weights, config = bnkit.to_keras(layer, split_activation=True)  # the batch norm alone; relu added by the user
    x = torch.randn(2, 3, 4, 4)
    y_keras = np.maximum(_keras_eval(weights, config, x.movedim(1, -1).double().numpy()), 0)
    np.testing.assert_allclose(y_keras, layer(x).movedim(1, -1).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"to_keras\(BatchNorm2d\(3\)\): example_weight=0.5"):
        bnkit.to_keras(bnkit.BatchNorm2d(3, example_weight=0.5))
    with pytest.raises(ValueError, match=r"to_keras\(BatchNorm2d\(3\)\): it has no running statistics"):
        bnkit.to_keras(torch.nn.BatchNorm2d(3, track_running_stats=False))


def test_from_keras_refuses_negative_moving_variance():
    w = [np.ones(3), np.zeros(3), np.zeros(3), np.array([1.0, -0.5, float("nan")])]
    with pytest.raises(ValueError, match=r"from_keras: moving_variance must be >= 0, got \[-0.5, nan\] in "
                                         r"channel\(s\) \[1, 2\]"):
        bnkit.from_keras(w, ndim=4)


def test_real_keras_negative_variance_names_the_layer_and_activation_split(keras):
    k_layer = keras.layers.BatchNormalization(name="bn7")
    k_layer.build((None, 4, 4, 3))
    k_layer.set_weights([np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                         np.array([1.0, -2.0, 1.0], np.float32)])
    with pytest.raises(ValueError, match=r"from_keras\(BatchNormalization 'bn7'\): moving_variance must be >= 0"):
        bnkit.from_keras(k_layer)
    layer = _trained(bnkit.BatchNorm2d(3, activation="relu", bias=False))
    weights, config = bnkit.to_keras(layer, split_activation=True)
    k_model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization(**config),
                                keras.layers.Activation("relu")])
    k_model.layers[0].set_weights(weights)
    x = torch.randn(2, 3, 4, 4)
    y_k = np.asarray(keras.ops.convert_to_numpy(k_model(x.movedim(1, -1).numpy(), training=False)))
    np.testing.assert_allclose(y_k, layer(x).movedim(1, -1).detach().numpy(), rtol=1e-5, atol=1e-5)
    frozen = bnkit.FrozenBatchNorm2d(3)
    frozen.load_state_dict(_trained(torch.nn.BatchNorm2d(3)).state_dict())
    weights, config = bnkit.to_keras(frozen)
    k_frozen = keras.layers.BatchNormalization(**config)
    k_frozen.build((None, 4, 4, 3))
    k_frozen.set_weights(weights)
    y_k = np.asarray(keras.ops.convert_to_numpy(k_frozen(x.movedim(1, -1).numpy(), training=True)))  # frozen
    np.testing.assert_allclose(y_k, frozen(x).movedim(1, -1).numpy(), rtol=1e-5, atol=1e-5)


def test_real_keras_layer_not_built_yet_is_refused_as_such(keras):
    with pytest.raises(ValueError, match=r"from_keras\(BatchNormalization 'bn3'\): the layer has no weights yet "
                                         r"\(it is not built\)"):
        bnkit.from_keras(keras.layers.BatchNormalization(name="bn3"))


@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_from_keras_then_to_keras_keeps_center_and_scale(center, scale):
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = _random_weights(3, rng)
    weights = [w for w, on in ((gamma, scale), (beta, center), (mean, True), (var, True)) if on]
    back, config = bnkit.to_keras(bnkit.from_keras(weights, ndim=4, center=center, scale=scale))
    assert (config["center"], config["scale"]) == (center, scale)
    for got, want in zip(back, weights):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    frozen_torch = torch.nn.BatchNorm2d(3)  # a trainable bias of zeros is a bias: only a fixed one is absent
    frozen_torch.weight.requires_grad_(False)
    assert [bnkit.to_keras(frozen_torch)[1][k] for k in ("center", "scale")] == [True, False]
