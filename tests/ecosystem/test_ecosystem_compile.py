"""torch.compile: bnkit layers compile with fullgraph=True (no graph break) and give eager's numbers.

One tiny model holds every configuration that takes a different code path (float momentum and the
cumulative average, affine on and off, a named momentum schedule, Keras-style biased variance), so
the whole matrix costs one compilation per mode; compiling is slow on small CPU machines.
"""
import copy

import numpy as np
import torch

import bnkit
from bnkit import reference


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        bnkit.BatchNorm2d(4, momentum=None),                                   # cumulative average
        torch.nn.Flatten(1),
        torch.nn.Linear(4 * 4 * 4, 6),
        bnkit.BatchNorm1d(6, momentum=0.1, affine=False, activation="relu"),
        bnkit.BatchNorm1d(6, momentum=bnkit.momentum.Schedule("cosine", total_steps=3)),  # evaluated on the device
        bnkit.BatchNorm1d(6, momentum=bnkit.momentum.Decay(0.99), eps=1e-3, variance="biased"),  # Keras conventions
    )


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_compile_fullgraph_matches_eager_train_and_eval():
    eager = _model()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)  # a graph break raises
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # three steps: the cumulative factor and the schedule change every step
        x = torch.randn(5, 3, 6, 6, generator=gen) * 2 + 1
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_module.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=f"step {step}: grad of {name}")
    state_e, state_c = _bn_state(eager), _bn_state(compiled_module)
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], rtol=1e-6, atol=1e-7, msg=key)
        assert state_c[key].dtype == state_e[key].dtype, key
    assert int(state_c["1.num_batches_tracked"]) == 3

    eager.eval()
    compiled_module.eval()
    x = torch.randn(5, 3, 6, 6, generator=gen)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert _bn_state(compiled_module)["1.num_batches_tracked"] == 3  # eval changes nothing


def test_named_schedule_needs_no_host_sync():
    # The schedule is evaluated on num_batches_tracked as a tensor: the same factors as the int path.
    sched = bnkit.momentum.Schedule("cosine", 0.1, 10)
    steps = torch.arange(1, 15, dtype=torch.float64)
    on_device = sched(steps)
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float64
    expected = torch.tensor([sched(int(s)) for s in steps], dtype=torch.float64)
    torch.testing.assert_close(on_device, expected, rtol=1e-14, atol=0)
    for kind in ("constant", "linear"):
        s = bnkit.momentum.Schedule(kind, 0.2, 4)
        torch.testing.assert_close(s(steps), torch.tensor([s(int(k)) for k in steps], dtype=torch.float64))


def test_named_schedule_layer_matches_reference_float64():
    layer = bnkit.BatchNorm1d(3, momentum=bnkit.momentum.Schedule("cosine", total_steps=4), dtype=torch.float64)
    sched = layer.momentum_schedule
    mean, var = np.zeros(3), np.ones(3)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        x = torch.randn(7, 3, generator=gen, dtype=torch.float64) * step
        layer(x)
        _, batch_mean, batch_var = reference.forward_train(x.numpy())
        mean, var = reference.update_running(mean, var, batch_mean, batch_var, 7, sched(step))
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12, atol=1e-14)
