"""torch.compile: bnkit layers compile with fullgraph=True (no graph break) and give eager's numbers.

One tiny model holds every configuration that takes a different code path (float momentum and the
cumulative average, affine on and off, a named momentum schedule, Keras-style biased variance), so
the whole matrix costs one compilation per mode; compiling is slow on small CPU machines.
"""
import copy

import torch

import bnkit


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        bnkit.BatchNorm2d(4, momentum=None),                                   # cumulative average
        torch.nn.Flatten(1),
        torch.nn.Linear(4 * 4 * 4, 6),
        bnkit.BatchNorm1d(6, momentum=0.1, affine=False, activation="relu"),
        bnkit.BatchNorm1d(6, momentum_schedule="cosine", total_steps=3),       # evaluated on the device
        bnkit.BatchNorm1d(6, decay=0.99, eps=1e-3, variance="biased"),          # Keras conventions
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
    sched = bnkit.momentum.cosine_ramp(10, start=0.1)
    steps = torch.arange(1, 15)
    on_device = sched(steps)
    assert isinstance(on_device, torch.Tensor)
    expected = torch.tensor([sched(int(s)) for s in steps])
    torch.testing.assert_close(on_device, expected, rtol=1e-6, atol=0)
