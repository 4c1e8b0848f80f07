"""Launchers: tensors in, tensors out, no autograd. They choose the tiles and the split of the grid.

Host time is the whole budget of a small batch norm on a GPU, so the hot path does no planning: the
plan (tiles, splits, strides, int64 decision) is cached per shape and strides, and after its first
launch each kernel is called through Triton's compiled-kernel launcher, cached per plan, constants and
pointer signature (dtype, 16-byte alignment: what Triton specializes on), which skips Triton's
per-call argument binding.

``tuning`` overrides the choice (tests use small tiles and several splits so that the tile loops,
the masks, the split merges and the int64 offsets all run on tiny tensors; a GPU session can tune with it).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

from . import kernels as K

#: ``block``: (BLOCK_N, BLOCK_L, BLOCK_C) or None (automatic); ``programs``: target number of
#: programs per reduction or None (4 per SM on CUDA, 8 elsewhere); ``int64``: force 64-bit offsets
#: (True) or decide from the largest offset (None); ``stats``: how the consumer kernels get the
#: per-channel statistics and gradient sums, None (automatic: computed by themselves with one split,
#: merged in their prologue with up to ``MERGE_SPLITS``, else a finalize kernel), or forced "merge" /
#: "finalize".
tuning = {"block": None, "programs": None, "int64": None, "stats": None}

#: Elements per tile: enough bytes in flight per program, 32 fp32 registers per thread at 8 warps.
TILE_ELEMENTS = 4096
#: Up to this many splits the consumer kernel merges the partials in its prologue (each of its programs
#: re-reads them all) instead of a separate finalize launch.
MERGE_SPLITS = 8
GIVEN, MERGE, OWN = (int(mode.value) for mode in (K.GIVEN, K.MERGE, K.OWN))  # the kernels' STATS / SUMS
_STATS = {"own": OWN, "merge": MERGE, "finalize": GIVEN}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 costs microseconds per call)."""
    return 1 << max(n - 1, 0).bit_length()


def _flat_stride(shape: tuple, stride: tuple) -> int | None:
    """The one stride of the flattened spatial dimensions (1 when there are none), or None."""
    dims = [(size, st) for size, st in zip(shape[2:], stride[2:]) if size > 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return dims[-1][1] if dims else 1


def _dense(shape: tuple, stride: tuple) -> bool:
    """Non-overlapping and dense (some permutation of a contiguous layout): only then does
    ``torch.empty_like`` give the output the input's strides, which the kernels write it with."""
    expected = 1
    for st, size in sorted((st, size) for size, st in zip(shape, stride) if size > 1):
        if st != expected:
            return False
        expected *= size
    return True


def _max_offset(shape: tuple, stride: tuple) -> int:
    return sum((size - 1) * abs(st) for size, st in zip(shape, stride))


@dataclass(frozen=True)
class Plan:
    """Everything a launch needs, cached per shape and strides (host time is the budget of small shapes)."""
    key: tuple  # what the plan was built from: part of the compiled-launcher cache key
    C: int
    splits: int
    stats: int  # kernels.OWN (1 launch per direction), MERGE (2) or GIVEN (3: finalize kernels)
    grid: tuple[int, int]
    shape_args: tuple[int, int, int]  # N, C, L
    strides: tuple[int, ...]  # sN, sL, sC of x (then dN, dL, dC of dy for backward)
    tile_args: tuple[int, int, int]  # nbL, n_tiles, tps
    blocks: tuple[tuple[str, object], ...]  # BLOCK_N, BLOCK_L, BLOCK_C, INT64 (constexprs)
    num_warps: int


def _auto_block(N: int, C: int, L: int, sL: int, sC: int) -> tuple[int, int, int]:
    if sC == 1 and C > 1 and (sL != 1 or L == 1):  # channels_last / (N, C): vectors along C
        bc = min(_pow2(C), 64)
        bl = min(_pow2(L), max(1, TILE_ELEMENTS // bc))
    else:  # NCHW: vectors along the contiguous spatial axis, one channel per program
        bc = 1
        bl = min(_pow2(L), TILE_ELEMENTS)
    bn = min(_pow2(N), max(1, TILE_ELEMENTS // (bc * bl)))
    return bn, bl, bc


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.device("cuda", index)).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _plan(shape: tuple, stride: tuple, other_stride: tuple | None, device: torch.device, tuned: tuple) -> Plan | None:
    """The plan for an ``(N, C, *)`` tensor, or None when its spatial dimensions do not flatten to one
    stride or it is not dense (the caller copies it). ``other_stride``: the gradient's strides
    (backward, same shape; read only, so it need not be dense)."""
    sL = _flat_stride(shape, stride)
    dL = _flat_stride(shape, other_stride) if other_stride is not None else 1
    if sL is None or dL is None or not _dense(shape, stride):
        return None
    N, C = shape[0], shape[1]
    L = math.prod(shape[2:])
    sN, sC = stride[0], stride[1]
    block = tuning["block"] or _auto_block(N, C, L, sL, sC)
    nbL = _cdiv(L, block[1])
    n_tiles = _cdiv(N, block[0]) * nbL
    programs = tuning["programs"]
    if programs is None:
        programs = 4 * _sm_count(device.index) if device.type == "cuda" else 8
    # >= `programs` programs in all, but never more splits than tiles
    splits = max(1, min(n_tiles, _cdiv(programs, _cdiv(C, block[2]))))
    tps = _cdiv(n_tiles, splits)
    splits = _cdiv(n_tiles, tps)
    int64 = tuning["int64"]
    if int64 is None:
        int64 = max(_max_offset(shape, s) for s in (stride, other_stride) if s is not None) >= 2**31
    stats = tuning["stats"] or ("own" if splits == 1 else "merge" if splits <= MERGE_SPLITS else "finalize")
    strides = (sN, sL, sC) if other_stride is None else (sN, sL, sC, other_stride[0], dL, other_stride[1])
    return Plan((shape, stride, other_stride, device, tuned), C, splits, _STATS[stats],
                (_cdiv(C, block[2]), splits), (N, C, L), strides, (nbL, n_tiles, tps),
                (("BLOCK_N", block[0]), ("BLOCK_L", block[1]), ("BLOCK_C", block[2]), ("INT64", bool(int64))),
                8 if math.prod(block) >= 2048 else 4)


def plan(x: torch.Tensor, dy: torch.Tensor | None = None) -> Plan:
    """The (cached) plan of ``x``; with ``dy`` (same shape), of a backward over both. Both must have
    spatial dimensions that flatten to one stride (see :func:`prepare`)."""
    p = _plan(x.shape, x.stride(), None if dy is None else dy.stride(), x.device, tuple(tuning.values()))
    if p is None:
        raise ValueError(f"bnkit Triton launch: strides {x.stride()} do not flatten the spatial dimensions")
    return p


def prepare(x: torch.Tensor, dy: torch.Tensor | None = None):
    """``(x, dy, plan)``; a tensor whose spatial dimensions do not flatten to one stride is copied
    (contiguous) first, and so is an ``x`` that is not dense (a channel slice, an expanded tensor: the
    output, allocated like ``x``, would not get its strides). The plan lookup is the only work in the
    common case."""
    tuned = tuple(tuning.values())
    dstride = None if dy is None else dy.stride()
    p = _plan(x.shape, x.stride(), dstride, x.device, tuned)
    if p is None:
        x = as_ncl(x)
        if dy is not None and _flat_stride(dy.shape, dstride) is None:
            dy = dy.contiguous()
        p = _plan(x.shape, x.stride(), None if dy is None else dy.stride(), x.device, tuned)
    return x, dy, p


def as_ncl(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is dense and its spatial dimensions flatten to one stride, else a
    contiguous copy (the layout of the outputs: fake implementations use it)."""
    shape, stride = x.shape, x.stride()
    return x if _flat_stride(shape, stride) is not None and _dense(shape, stride) else x.contiguous()


def _signature(*tensors) -> tuple:
    """What Triton specializes a pointer argument on: its dtype and 16-byte alignment (None: absent)."""
    return tuple(None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


_launchers: dict = {}
_MAX_LAUNCHERS = 4096  # shapes that vary (sequence lengths) must not grow it without bound: oldest out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, grid, key: tuple, args: tuple, consts: tuple, num_warps: int) -> None:
    """``kernel[grid](*args, **consts)``, the first time through Triton's JIT entry, then through the
    compiled kernel it returned. ``key`` must determine every specialization Triton makes (constants,
    the integer arguments, pointer dtypes and alignment); ``consts`` are the kernel's trailing
    constexpr parameters, in signature order."""
    full_key = (kernel, grid, key, consts)
    run = _launchers.get(full_key)
    if run is not None:
        run(*args, *(value for _, value in consts))
        return
    compiled = kernel[grid](*args, **dict(consts), num_warps=num_warps)
    if compiled is not None and not _interpreting():  # the interpreter compiles nothing to reuse
        # the JIT entry pads a short grid with 1s; the compiled kernel's runner reads grid[0..2] as given
        if len(_launchers) >= _MAX_LAUNCHERS:
            del _launchers[next(iter(_launchers))]
        _launchers[full_key] = compiled[tuple(grid) + (1,) * (3 - len(grid))]


def _device_ctx(x: torch.Tensor):
    """Triton launches on the current CUDA device: switch only when x lives on another one."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _dense_vectors(*vectors):
    """The per-channel tensors as the kernels read them (element ``c`` at ``base + c``): a strided or
    expanded one (a parameter sliced from a larger one) is copied; contiguous ones pass as they are."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def _f32(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=x.device)


def train_forward(x, weight, bias, eps: float, activation: str, negative_slope: float):
    """Batch statistics and ``act((x - mean) / sqrt(var + eps) * weight + bias)``.

    Returns ``(y, mean, biased var)``; the statistics are fp32 ``(C,)``. Nothing else is written.
    """
    x, _, p = prepare(x)
    weight, bias = _dense_vectors(weight, bias)
    C = p.C
    mean, var = _f32(C, x), _f32(C, x)  # returned: must not alias each other
    cnt_p, mean_p, m2_p = (mean,) * 3 if p.stats == OWN else \
        torch.empty(3, p.splits * C, dtype=torch.float32, device=x.device).unbind()
    y = torch.empty_like(x)
    key = (p.key, _signature(x, weight, bias))
    with _device_ctx(x):
        if p.stats != OWN:
            _launch(K._stats_kernel, p.grid, key, (x, cnt_p, mean_p, m2_p, *p.shape_args, *p.strides, *p.tile_args),
                    p.blocks, p.num_warps)
        if p.stats == GIVEN:
            _launch(K._finalize_stats_kernel, (p.grid[0],), key, (cnt_p, mean_p, m2_p, mean, var, C, p.splits),
                    p.blocks[2:3], 4)
        _normalize(x, y, mean, var, weight, bias, p, key, eps, activation, negative_slope, p.stats,
                   (cnt_p, mean_p, m2_p))
    return y, mean, var


def _normalize(x, y, mean, var, weight, bias, p: Plan, key, eps, activation, negative_slope, stats, partials):
    """The normalize launch; ``stats`` says whether it reads ``mean``/``var``, merges the ``partials``
    (count, mean, M2) or computes the statistics itself (see ``kernels._normalize_kernel``).

    ``eps`` and the slope go to the kernels as Python floats: Triton specializes an int argument
    (1 becomes a compiled-in constant, others i32), which the launcher cache key does not record."""
    _launch(K._normalize_kernel, p.grid, key,
            (x, y, mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
             *partials, *p.shape_args, *p.strides, *p.tile_args, p.splits, float(eps), float(negative_slope)),
            (("STATS", stats), ("HAS_W", weight is not None), ("HAS_B", bias is not None),
             ("ACT", K.ACT_CODES[activation])) + p.blocks, p.num_warps)


def eval_forward(x, mean, var, weight, bias, eps: float, activation: str, negative_slope: float):
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with given (running) statistics."""
    x, _, p = prepare(x)
    mean, var, weight, bias = _dense_vectors(mean, var, weight, bias)
    y = torch.empty_like(x)
    with _device_ctx(x):
        _normalize(x, y, mean, var, weight, bias, p, (p.key, _signature(x, mean, var, weight, bias)), eps, activation,
                   negative_slope, GIVEN, (mean, mean, mean))
    return y


def backward(dy, saved, mean, var, weight, bias, eps: float, training: bool, activation: str,
             negative_slope: float, from_output: bool):
    """``(dx, dgamma, dbeta)``; ``saved`` is the input x, or the output y when ``from_output``.

    ``mean``/``var`` are the statistics the forward normalized with (biased batch variance, or the
    running variance in eval). With ``training`` they are the batch's and dx carries their gradient.
    """
    saved, dy, p = prepare(saved, dy)
    mean, var, weight, bias = _dense_vectors(mean, var, weight, bias)
    C = p.C
    dbeta, dgamma = _f32(C, saved), _f32(C, saved)  # returned: must not alias each other
    sg_p, sgx_p = (dbeta, dbeta) if p.stats == OWN else \
        torch.empty(2, p.splits * C, dtype=torch.float32, device=saved.device).unbind()
    dx = torch.empty_like(saved)
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    key = (p.key, _signature(dy, saved, mean, var, weight, bias))
    eps, negative_slope = float(eps), float(negative_slope)  # see _normalize
    flags = (("HAS_W", weight is not None), ("HAS_B", bias is not None), ("ACT", K.ACT_CODES[activation]),
             ("FROM_OUTPUT", from_output)) + p.blocks
    with _device_ctx(saved):
        if p.stats != OWN:
            _launch(K._grad_sums_kernel, p.grid, key, (dy, saved, mean, var, w, b, sg_p, sgx_p, *p.shape_args,
                                                       *p.strides, *p.tile_args, eps, negative_slope),
                    flags, p.num_warps)
        if p.stats == GIVEN:
            _launch(K._finalize_sums_kernel, (p.grid[0],), key, (sg_p, sgx_p, dbeta, dgamma, C, p.splits),
                    p.blocks[2:3], 4)
        n, _, length = p.shape_args
        _launch(K._grad_input_kernel, p.grid, key,
                (dy, saved, dx, mean, var, w, b, dbeta, dgamma, sg_p, sgx_p, *p.shape_args, *p.strides, *p.tile_args,
                 p.splits, float(n * length), eps, negative_slope),
                (("TRAINING", training), ("SUMS", p.stats)) + flags, p.num_warps)
    return dx, dgamma, dbeta
