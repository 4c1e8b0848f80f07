"""The Triton kernels, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), at tiny shapes.

References: the torch path of the same layer (forward, autograd gradients, running statistics,
num_batches_tracked) and the NumPy specification in bnkit/reference.py. Small tiles and several
splits are forced so that tile loops, masks on odd sizes and the split merges all run.
"""
import os

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when it (and its own jit'd library functions) and bnkit's kernels are
# imported: set it for those imports only, and again (monkeypatched) while this module's tests run.
_interpret_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bnkit[triton]')")
    from bnkit.ops.triton import launch  # noqa: E402
finally:
    if _interpret_before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _interpret_before

import bnkit  # noqa: E402
from bnkit import reference  # noqa: E402
from bnkit.ops import backend  # noqa: E402

SMALL = {"block": (2, 4, 2), "programs": 3, "int64": None}  # BLOCK_N, BLOCK_L, BLOCK_C


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The launchers, with Triton in interpreter mode (needed at call time by the backend check)."""
    if type(triton.language.standard.zeros).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set (another test imported it first); "
                    "run this file on its own")
    saved = dict(launch.tuning)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield launch
    launch.tuning.update(saved)
    backend.set_backend(None)


@pytest.fixture()
def tiles(interpreter):
    """Small tiles and 3 programs per reduction, restored afterwards."""
    saved = dict(interpreter.tuning)
    interpreter.tuning.update(SMALL)
    yield interpreter.tuning
    interpreter.tuning.update(saved)


def _np_act(z, activation, slope=0.01):
    if activation == "relu":
        return np.maximum(z, 0), (z > 0).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(z > 0, z, z * slope), np.where(z > 0, 1.0, slope)
    if activation == "silu":
        s = 1 / (1 + np.exp(-z))
        return z * s, s * (1 + z * (1 - s))
    return z, np.ones_like(z)


def _pair(cls, c, seed=0, **kw):
    """Two identical layers with random affine parameters: one per backend."""
    torch.manual_seed(seed)
    a = cls(c, **kw)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.normal_()
    b = cls(c, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _run(layer, x, dy, name):
    """Forward + backward of ``layer`` on backend ``name``: (y, dx, dweight, dbias)."""
    backend.set_backend(name)
    try:
        x = x.detach().clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
    finally:
        backend.set_backend(None)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_matches_torch_path_and_numpy(tiles, activation, channels_last):
    # odd sizes: no dimension is a multiple of the (2, 4, 2) tile
    x = torch.randn(3, 5, 7, 3, dtype=torch.float64).float() * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(x.shape)
    ours, theirs = _pair(bnkit.BatchNorm2d, 5,
                         activation=torch.nn.LeakyReLU(0.2) if activation == "leaky_relu" else activation)
    y, dx, dw, db = _run(ours, x, dy, "triton")
    y_t, dx_t, dw_t, db_t = _run(theirs, x, dy, "torch")
    for a, b in ((y, y_t), (dx, dx_t), (dw, dw_t), (db, db_t),
                 (ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
        _close(a, b, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1

    gamma, beta = ours.weight.detach().numpy(), ours.bias.detach().numpy()
    z, mean, var = reference.forward_train(x.numpy(), gamma, beta)
    y_ref, dact = _np_act(z, activation, 0.2)
    dx_ref, dg_ref, db_ref = reference.backward_train(dy.numpy() * dact, x.numpy(), gamma)
    rm, rv = reference.update_running(np.zeros(5), np.ones(5), mean, var, x.numel() // 5, 0.1)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dg_ref), (db, db_ref), (ours.running_mean, rm),
                 (ours.running_var, rv)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)


def _ndhwc(x):
    return x.to(memory_format=torch.channels_last_3d)


def _nlc(x):  # (N, C, L) seen through a transpose of an (N, L, C) tensor: channels contiguous
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("shape,layout", [((6, 3), None), ((2, 3), None), ((3, 4, 5), None), ((3, 4, 5), _nlc),
                                          ((2, 3, 2, 3, 3), None), ((2, 3, 2, 3, 3), _ndhwc), ((1, 3, 5, 1), None)],
                         ids=["1d", "1d-tiny", "1d-L", "1d-NLC", "3d", "3d-channels_last", "N=1"])
def test_dims_and_tiny_batches(tiles, shape, layout):
    cls = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}[len(shape)]
    x, dy = torch.randn(shape) + 1, torch.randn(shape)
    if layout is not None:
        x = layout(x)
    ours, theirs = _pair(cls, shape[1], activation="relu")
    got = _run(ours, x, dy, "triton")
    for a, b in zip(got, _run(theirs, x, dy, "torch")):
        _close(a, b, 1e-5)
    assert got[0].stride() == x.stride()  # the output keeps the input's memory layout
    _close(ours.running_var, theirs.running_var, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_statistics(interpreter, dtype):
    x = (torch.randn(4, 6, 5, 5) * 3 + 10).to(dtype).to(memory_format=torch.channels_last)
    dy = torch.randn(x.shape).to(dtype)
    ours, theirs = _pair(bnkit.BatchNorm2d, 6, activation="silu")
    y, dx, dw, db = _run(ours, x, dy, "triton")
    y_t, dx_t, dw_t, db_t = _run(theirs, x, dy, "torch")
    assert y.dtype == dx.dtype == dtype and dw.dtype == ours.running_mean.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # one rounding of the output in the input dtype
    for a, b in ((y, y_t), (dx, dx_t)):
        _close(a, b, tol)
    for a, b in ((dw, dw_t), (db, db_t)):
        _close(a, b, 1e-3 * x.numel() / 6)  # sums of dtype-rounded terms over 100 values
    # the statistics themselves are exact fp32 reductions of the same half values
    _close(ours.running_mean, theirs.running_mean, 1e-5)
    _close(ours.running_var, theirs.running_var, 1e-5)


def test_eval_forward_and_backward(interpreter):
    ours, theirs = _pair(bnkit.BatchNorm2d, 4, activation="leaky_relu")
    ours.running_mean.normal_()
    ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x, dy = torch.randn(3, 4, 3, 5), torch.randn(3, 4, 3, 5)
    for a, b in zip(_run(ours, x, dy, "triton"), _run(theirs, x, dy, "torch")):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("momentum,nonfinite", [(None, "propagate"), (0.3, "propagate"), (None, "skip")])
def test_running_statistics_over_steps(interpreter, momentum, nonfinite):
    # "propagate" updates inside the finalize kernel; "skip" goes through the foundation's update
    ours, theirs = _pair(bnkit.BatchNorm1d, 3, momentum=momentum, nonfinite=nonfinite)
    for step in range(3):
        x = torch.randn(5 + step, 3, 4) * (step + 1) + step
        for bn, name in ((ours, "triton"), (theirs, "torch")):
            backend.set_backend(name)
            bn(x)
        backend.set_backend(None)
    _close(ours.running_mean, theirs.running_mean, 1e-5)
    _close(ours.running_var, theirs.running_var, 1e-5)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


def test_nonfinite_batch_skipped_like_torch_path(interpreter):
    ours, theirs = _pair(bnkit.BatchNorm2d, 3)
    x = torch.randn(2, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    backend.set_backend("triton")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        y = ours(x)
    backend.set_backend(None)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert ours.num_batches_tracked.item() == 0
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    ours.nonfinite = "raise"
    backend.set_backend("triton")
    with pytest.raises(FloatingPointError, match="left unchanged"):
        ours(x)
    backend.set_backend(None)
    assert ours.num_batches_tracked.item() == 0


def test_int64_offsets_path(interpreter):
    interpreter.tuning.update(int64=True)
    try:
        ours, theirs = _pair(bnkit.BatchNorm2d, 3, activation="relu")
        x, dy = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)
        for a, b in zip(_run(ours, x, dy, "triton"), _run(theirs, x, dy, "torch")):
            _close(a, b, 1e-5)
    finally:
        interpreter.tuning.update(int64=None)
    big = torch.empty_strided((2, 3, 2**30), (3 * 2**30, 2**30, 1), device="meta")
    small = torch.empty(2, 3, 2**20, device="meta")
    assert interpreter.plan(big).meta["INT64"] and not interpreter.plan(small).meta["INT64"]


def test_grad_output_with_other_layout_and_noncontiguous_input(interpreter):
    ours, theirs = _pair(bnkit.BatchNorm2d, 3)
    x = torch.randn(2, 5, 4, 3)[:, 1:4, :, ::2]  # spatial dimensions do not flatten: copied
    dy = torch.randn(2, 3, 4, 2).to(memory_format=torch.channels_last)
    for a, b in zip(_run(ours, x, dy, "triton"), _run(theirs, x, dy, "torch")):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_memory_efficient_mode(tiles, activation):
    x, dy = torch.randn(3, 4, 5, 3) * 2 - 1, torch.randn(3, 4, 5, 3)
    ours, theirs = _pair(bnkit.BatchNorm2d, 4,
                         activation=torch.nn.LeakyReLU(0.1) if activation == "leaky_relu" else activation)
    ours.memory_efficient = theirs.memory_efficient = True
    for a, b in zip(_run(ours, x, dy, "triton"), _run(theirs, x, dy, "torch")):
        _close(a, b, 1e-4)


def _saved_bytes(model, x):
    """Bytes of distinct storages autograd keeps for backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


def test_memory_efficient_frees_the_input(interpreter):
    # conv -> BN -> conv: the first conv's output (BN's input) is needed only by a regular BN
    def model(memory_efficient):
        torch.manual_seed(0)
        bn = bnkit.BatchNorm2d(4, activation="leaky_relu")
        bn.memory_efficient = memory_efficient
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1, bias=False), bn, torch.nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 2, 4, 4)
    backend.set_backend("triton")
    try:
        saved = {m: _saved_bytes(model(m), x) for m in (False, True)}
    finally:
        backend.set_backend(None)
    assert saved[False] - saved[True] == 2 * 4 * 4 * 4 * 4  # N*C*H*W*itemsize: BN's input is freed


def test_memory_efficient_needs_invertible_activation():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\): memory_efficient=True .* invertible"):
        bnkit.BatchNorm2d(4, activation="relu").memory_efficient = True


def test_backend_selection(interpreter, monkeypatch):
    x = torch.randn(2, 3)
    assert backend.kernels_for(x) is None  # auto: CPU tensors take the torch path
    backend.set_backend("triton")
    assert backend.kernels_for(x) is not None
    assert backend.kernels_for(x.double()) is None  # float64 stays on the torch path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        backend.kernels_for(x)
    backend.set_backend(None)
    monkeypatch.setenv("BNKIT_BACKEND", "torch")
    assert bnkit.get_backend() == "torch"
    monkeypatch.setenv("BNKIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BNKIT_BACKEND='cuda'"):
        bnkit.get_backend()
    with pytest.raises(ValueError, match="set_backend"):
        bnkit.set_backend("gpu")


def test_custom_ops_fake_and_schema(interpreter):
    x, w, b = torch.randn(2, 3, 3), torch.rand(3) + 0.5, torch.randn(3)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.bnkit.eval_forward.default, (x, mean, var, w, b, 1e-5, "silu", 0.01),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.bnkit.backward.default,
                          (torch.randn(2, 3, 3), x, mean, var, w, b, 1e-5, True, False, "leaky_relu", 0.1, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.bnkit.train_forward.default,
                          (x, w, b, torch.zeros(3), torch.ones(3), None, 0.1, False, 1.2, 1e-5, "relu", 0.01),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_custom_ops(interpreter):
    # fullgraph: the mutating op (running-stat update in the finalize kernel) functionalizes, no graph break
    ours, theirs = _pair(bnkit.BatchNorm2d, 4, activation="relu", momentum=None, nonfinite="propagate")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x, dy = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for a, b in zip(_run(compiled, x, dy, "triton"), _run(theirs, x, dy, "torch")):
        _close(a, b, 1e-5)
    _close(ours.running_var, theirs.running_var, 1e-6)
    assert ours.num_batches_tracked.item() == 1


def test_no_grad_paths_skip_autograd(interpreter):
    ours, theirs = _pair(bnkit.BatchNorm2d, 3, activation="silu", nonfinite="propagate")
    x = torch.randn(2, 3, 4, 5)
    outputs = []
    for bn, name in ((ours, "triton"), (theirs, "torch")):
        backend.set_backend(name)
        with torch.no_grad():
            train_y = bn(x)
            bn.eval()
            outputs.append((train_y, bn(x)))
        backend.set_backend(None)
    for a, b in zip(*outputs):
        assert a.grad_fn is None
        _close(a, b, 1e-5)
    _close(ours.running_var, theirs.running_var, 1e-6)
