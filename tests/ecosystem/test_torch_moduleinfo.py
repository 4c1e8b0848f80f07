"""torch's own module tests for BatchNorm1d/2d/3d, run with bnkit's classes in place of torch.nn's.

torch ships the inputs of its module tests (``torch.testing._internal.common_modules``: ``module_db``,
each ``ModuleInfo``'s ``module_inputs_func`` and ``module_error_inputs_func``), but not the file that
drives them (``test/test_modules.py`` in torch's repository). The checks of that file that run on a
CPU are written again here, as that file does them, with the same tolerances (torch's
``TestCase.assertEqual``), ``gradcheck``/``gradgradcheck`` and ``freeze_rng_state``; parametrized like
torch's ``@modules``: float32 and float64 (float64 only for gradients), train and eval mode.

Every check also runs with torch.nn's own class (``impl="torch"``): that is the control, since a
check that torch.nn fails would be one reproduced wrongly. Needs ``expecttest`` (which torch's test
utilities import; in the test extra).
"""
import tempfile
from copy import deepcopy
from itertools import chain, product
from operator import methodcaller
from unittest.mock import patch

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import bnkit

pytest.importorskip("expecttest")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_utils = pytest.importorskip("torch.testing._internal.common_utils")
from torch._subclasses.meta_utils import assert_metadata_eq  # noqa: E402

IMPLS = {"torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
         "bnkit": {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d, 3: bnkit.BatchNorm3d}}
INFOS = {d: next(m for m in common_modules.module_db if m.module_cls is IMPLS["torch"][d]) for d in (1, 2, 3)}
DTYPES = (torch.float32, torch.float64)
CASES = [pytest.param(impl, dims, dtype, training, id=f"{impl}-{dims}d-{str(dtype)[6:]}-{'train' if training else 'eval'}")
         for impl, dims, dtype, training in product(IMPLS, (1, 2, 3), DTYPES, (True, False))]
GRAD_CASES = [c for c in CASES if c.values[2] == torch.float64]
TRAIN_CASES = [c for c in CASES if c.values[3]]
DEVICE = "cpu"

check = common_utils.TestCase()  # torch's assertEqual (dtype-aware tolerances) and assertRaisesRegex
freeze_rng_state = common_utils.freeze_rng_state


def _inputs(dims, dtype, training, requires_grad, device=DEVICE):
    info = INFOS[dims]
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=training)


def _build(cls, module_input, dtype, training):
    m = cls(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
    m.to(DEVICE).to(dtype)
    return m.train(training)


def _assert_parameters_and_buffers_are(module, device, dtype):
    for kind, items in (("Parameter", module.named_parameters()), ("Buffer", module.named_buffers())):
        for name, t in items:
            check.assertEqual(t.device, torch.device(device), f"{kind} {name} is on {t.device}")
            if t.dtype.is_floating_point:
                check.assertEqual(t.dtype, dtype, f"{kind} {name} has dtype {t.dtype}")


def _traverse(obj, fn):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_traverse(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _traverse(o, fn) for k, o in obj.items()}
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_forward(impl, dims, dtype, training):
    cls = IMPLS[impl][dims]
    to_dtype = {torch.float32: methodcaller("float"), torch.float64: methodcaller("double")}[dtype]
    for module_input in _inputs(dims, dtype, training, requires_grad=False):
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with freeze_rng_state():
            m = _build(cls, module_input, dtype, training)
            out = m(*args, **kwargs)
            to_dtype(m)
            m(*args, **kwargs)
            _assert_parameters_and_buffers_are(m, DEVICE, dtype)
        # Not in torch's test (its BatchNorm inputs have no reference_fn): torch.nn as the reference.
        reference = _build(IMPLS["torch"][dims], module_input, dtype, training)
        check.assertEqual(out, reference(*args, **kwargs))
        reference(*args, **kwargs)
        check.assertEqual(m.state_dict(), reference.state_dict())


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_factory_kwargs(impl, dims, dtype, training):
    cls = IMPLS[impl][dims]
    for module_input in _inputs(dims, dtype, training, requires_grad=False):
        args, kwargs = module_input.constructor_input.args, dict(module_input.constructor_input.kwargs)
        # Does the module create parameters or buffers from tensors it was not given? (torch checks, then skips if not)
        parameter_new = common_utils.mock_wrapper(nn.Parameter.__new__)
        register_buffer = common_utils.mock_wrapper(nn.Module.register_buffer)
        with patch.object(nn.Parameter, "__new__", parameter_new), \
                patch.object(nn.Module, "register_buffer", register_buffer):
            cls(*args, **kwargs).train(training)
        given = common_utils.get_tensors_from(args, kwargs)
        calls = chain(parameter_new.mock.call_args_list, register_buffer.mock.call_args_list)
        if not any(common_utils.get_tensors_from(a, k) and not given & common_utils.get_tensors_from(a, k)
                   for a, k in calls):
            continue
        m = cls(*args, **kwargs, device=DEVICE, dtype=dtype).train(training)
        _assert_parameters_and_buffers_are(m, DEVICE, dtype)


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_repr(impl, dims, dtype, training):
    for module_input in _inputs(dims, dtype, training, requires_grad=False):
        m = _build(IMPLS[impl][dims], module_input, dtype, training)
        m.__repr__()
        str(m)


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_pickle(impl, dims, dtype, training):
    for module_input in _inputs(dims, dtype, training, requires_grad=False):
        args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with freeze_rng_state():
            m = _build(IMPLS[impl][dims], module_input, dtype, training)
            out = m(*args, **kwargs)
            with tempfile.TemporaryFile() as f:
                torch.save(m, f)
                f.seek(0)
                copy = torch.load(f, weights_only=False)  # the module this test just saved
                check.assertEqual(out, copy(*args, **kwargs))


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_non_contiguous_tensors(impl, dims, dtype, training):
    def non_contiguous(obj):
        def make(t):
            if t.dim() == 0:
                return t
            out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
            out.requires_grad = t.requires_grad
            return out
        return _traverse(obj, make)

    def grads(obj):
        return _traverse(obj, lambda t: t.grad if t.requires_grad else None)

    def zero_grad(obj):
        def clear(t):
            t.grad = None
        _traverse(obj, clear)

    for module_input in _inputs(dims, dtype, training, requires_grad=True):
        in_args, in_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        m = _build(IMPLS[impl][dims], module_input, dtype, training)
        _traverse((in_args, in_kwargs), lambda t: t.retain_grad() if t.requires_grad else None)
        with freeze_rng_state():
            default_out = m(*in_args, **in_kwargs)
            grad_out = default_out.clone().detach_().normal_()
            default_out.backward(grad_out, retain_graph=True)
        default_in_grads = deepcopy(grads((in_args, in_kwargs)))
        default_param_grads = deepcopy([p.grad for p in m.parameters()])
        inputs = [(in_args, in_kwargs), non_contiguous((in_args, in_kwargs))]
        for (a, k), g in product(inputs, [grad_out, non_contiguous(grad_out)]):
            g = deepcopy(g)
            zero_grad((a, k))
            zero_grad(list(m.parameters()))
            with freeze_rng_state():
                out = m(*a, **k)
                out.backward(g, retain_graph=True)
            check.assertEqual(out, default_out)
            check.assertEqual(grads((a, k)), default_in_grads, atol=1e-4, rtol=0)
            check.assertEqual([p.grad for p in m.parameters()], default_param_grads)


def _check_gradients(impl, dims, dtype, training, gradcheck):
    for module_input in _inputs(dims, dtype, training, requires_grad=True):
        m = _build(IMPLS[impl][dims], module_input, dtype, training)
        params = tuple(m.parameters())
        in_args, in_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        assert not in_kwargs  # batch norm's inputs are positional

        def fn(*flat):
            with freeze_rng_state():
                return pytree.tree_leaves(m(*pytree.tree_unflatten(flat, spec)[:len(in_args)]))

        flat, spec = pytree.tree_flatten(in_args + params)
        assert gradcheck(fn, flat, nondet_tol=0.0)  # the total derivative
        was = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad = False
        for p, old in zip(params, was):  # then each parameter's with the input's
            p.requires_grad = old
            flat, spec = pytree.tree_flatten(in_args + params)
            assert gradcheck(fn, flat, nondet_tol=0.0)
            p.requires_grad = False


@pytest.mark.parametrize("impl, dims, dtype, training", GRAD_CASES)
def test_grad(impl, dims, dtype, training):
    _check_gradients(impl, dims, dtype, training, common_utils.gradcheck)


@pytest.mark.parametrize("impl, dims, dtype, training", GRAD_CASES)
def test_gradgrad(impl, dims, dtype, training):
    assert INFOS[dims].supports_gradgrad
    _check_gradients(impl, dims, dtype, training, common_utils.gradgradcheck)


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_memory_format(impl, dims, dtype, training):
    affects_out = INFOS[dims].module_memformat_affects_out
    special = {4: torch.channels_last, 5: torch.channels_last_3d}

    def to_format(fmt, obj):
        def convert(t):
            if fmt in special.values() and special.get(t.dim()) is not fmt:
                return t.clone().detach().requires_grad_(t.requires_grad)
            return t.clone().to(memory_format=fmt).detach().requires_grad_(t.requires_grad)
        return _traverse(obj, convert)

    def check_format(obj, in_fmt, module_fmt):
        def one(t):
            fmt = special.get(t.dim())
            if fmt is not None and (in_fmt is fmt or (module_fmt is fmt and affects_out)):
                assert t.is_contiguous(memory_format=fmt)
            else:
                assert t.is_contiguous()
        _traverse(obj, one)

    def diff(obj):
        return tuple(t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor) and t.requires_grad)

    for module_input in _inputs(dims, dtype, training, requires_grad=True):
        dim = module_input.forward_input.args[0].dim()
        in_fmts = [torch.contiguous_format] + ([special[dim]] if dim in special else [])
        module_fmts = [torch.preserve_format, torch.contiguous_format] + ([special[dim]] if dim in special else [])
        with freeze_rng_state():
            m = _build(IMPLS[impl][dims], module_input, dtype, training)
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            desired = m(*args, **kwargs)
            if training and diff(desired):
                ref_grad_out = tuple(torch.rand_like(t) for t in diff(desired))
                ref_grad_in = torch.autograd.grad(diff(desired), diff((args, kwargs, tuple(m.parameters()))),
                                                  grad_outputs=ref_grad_out)
            for in_fmt in in_fmts:
                args, kwargs = to_format(in_fmt, module_input.forward_input.args), \
                    to_format(in_fmt, module_input.forward_input.kwargs)
                for module_fmt in module_fmts:
                    m.to(memory_format=module_fmt)
                    out = m(*args, **kwargs)
                    if in_fmt != torch.contiguous_format or module_fmt != torch.contiguous_format:
                        check.assertEqual(out, desired)
                    check_format(out, in_fmt, module_fmt)
                    if training and diff(out):
                        grad_out = tuple(torch.empty_like(a).copy_(b) for a, b in zip(diff(out), ref_grad_out))
                        grad_in = torch.autograd.grad(diff(out), diff((args, kwargs, tuple(m.parameters()))),
                                                      grad_outputs=grad_out)
                        if in_fmt != torch.contiguous_format or module_fmt != torch.contiguous_format:
                            check.assertEqual(grad_in, ref_grad_in)
                        check_format(grad_in, in_fmt, module_fmt)


@pytest.mark.parametrize("impl, dims, dtype, training", TRAIN_CASES)
def test_if_train_and_eval_modes_differ(impl, dims, dtype, training):
    for module_input in _inputs(dims, dtype, training, requires_grad=False):
        m = _build(IMPLS[impl][dims], module_input, dtype, training)
        delattr(m, "training")  # a forward that reads the flag must fail on it: BatchNorm's ModuleInfo says it does
        try:
            m(*module_input.forward_input.args, **module_input.forward_input.kwargs)
        except AttributeError as e:
            if "'training'" not in str(e):
                raise
            assert INFOS[dims].train_and_eval_differ


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_device_ctx_init(impl, dims, dtype, training):
    cls = IMPLS[impl][dims]
    on_cpu = _inputs(dims, dtype, training, requires_grad=False)
    with torch.device("meta"):
        on_meta = _inputs(dims, dtype, training, requires_grad=False, device=None)
    for cpu_input, meta_input in zip(on_cpu, on_meta):
        m_cpu = cls(*cpu_input.constructor_input.args, **cpu_input.constructor_input.kwargs)
        with torch.device("meta"):
            m = cls(*meta_input.constructor_input.args, **meta_input.constructor_input.kwargs)
        for p_meta, p_cpu in chain(zip(m.parameters(), m_cpu.parameters()), zip(m.buffers(), m_cpu.buffers())):
            assert p_meta.is_meta
            assert_metadata_eq(check.assertEqual, p_meta, p_cpu)


@pytest.mark.parametrize("impl, dims, dtype, training", CASES)
def test_errors(impl, dims, dtype, training):
    cls, info = IMPLS[impl][dims], INFOS[dims]
    for error_input in info.module_error_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=False,
                                                     training=training):
        module_input = error_input.module_error_input
        c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        if error_input.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with check.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                cls(*c_args, **c_kwargs)
        else:
            m = cls(*c_args, **c_kwargs)  # torch's test builds it without .train(training)
            with check.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                m(*module_input.forward_input.args, **module_input.forward_input.kwargs)
