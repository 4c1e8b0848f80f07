"""Launchers: tensors in, tensors out, no autograd. They choose the tiles and the split of the grid.

``tuning`` overrides the choice (tests use small tiles and several splits so that the tile loops,
the masks and the split merges all run on tiny tensors; a GPU session can tune with it).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from . import kernels as K

#: ``block``: (BLOCK_N, BLOCK_L, BLOCK_C) or None (automatic); ``programs``: target number of
#: programs per reduction or None (4 per SM on CUDA, 8 elsewhere); ``int64``: force 64-bit offsets
#: (True) or decide from the largest offset (None).
tuning = {"block": None, "programs": None, "int64": None}

#: Elements per tile: enough bytes in flight per program, 32 fp32 registers per thread at 8 warps.
TILE_ELEMENTS = 4096


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 costs microseconds per call)."""
    return 1 << max(n - 1, 0).bit_length()


def as_ncl(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its spatial dimensions flatten to one stride, else a contiguous copy."""
    return x if _spatial_stride(x) is not None else x.contiguous()


def _spatial_stride(x: torch.Tensor) -> int | None:
    """The one stride of the flattened spatial dimensions (1 when there are none), or None."""
    return _flat_stride(tuple(x.shape), x.stride())


def _flat_stride(shape: tuple, stride: tuple) -> int | None:
    dims = [(size, st) for size, st in zip(shape[2:], stride[2:]) if size > 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return dims[-1][1] if dims else 1


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(sN, sL, sC)`` of an ``(N, C, *)`` tensor seen as ``(N, C, L)``."""
    return t.stride(0), _spatial_stride(t), t.stride(1)


@dataclass(frozen=True)
class Plan:
    """Everything a launch needs, cached per shape (host time is the budget of small shapes)."""
    C: int
    splits: int
    grid: tuple[int, int]
    shape_args: tuple[int, int, int]  # N, C, L
    strides: tuple[int, int, int]  # sN, sL, sC of x
    tile_args: tuple[int, int, int]  # nbL, n_tiles, tps
    meta: dict  # BLOCK_N, BLOCK_L, BLOCK_C, INT64, num_warps


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


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def plan(x: torch.Tensor, *others: torch.Tensor) -> Plan:
    """Tiles and splits for ``x`` (already ``as_ncl``); ``others`` only widen the int64 decision.

    Cached by shapes, strides and device: a training loop sees the same few shapes again and again.
    """
    wide = any(_max_offset(t) >= 2**31 for t in (x,) + others)
    return _plan(tuple(x.shape), x.stride(), x.device, wide, tuple(tuning.values()))


@functools.lru_cache(maxsize=1024)
def _plan(shape, stride, device, wide: bool, _tuning_key) -> Plan:
    N, C = shape[0], shape[1]
    L = math.prod(shape[2:])
    sN, sL, sC = stride[0], _flat_stride(shape, stride), stride[1]
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
        int64 = wide
    meta = dict(BLOCK_N=block[0], BLOCK_L=block[1], BLOCK_C=block[2], INT64=int64,
                num_warps=8 if math.prod(block) >= 2048 else 4)
    return Plan(C, splits, (_cdiv(C, block[2]), splits), (N, C, L), (sN, sL, sC), (nbL, n_tiles, tps), meta)


def _device_ctx(x: torch.Tensor):
    """Triton launches on the current CUDA device: switch only when x lives on another one."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def train_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum: float,
                  cumulative: bool, unbias: float, eps: float, activation: str, negative_slope: float):
    """Batch statistics, normalize + affine + activation, and (when running buffers are given) the
    running-statistic update. Returns ``(y, mean, biased var, invstd)``; statistics in fp32."""
    x = as_ncl(x)
    p = plan(x)
    C = p.C
    f32 = dict(dtype=torch.float32, device=x.device)
    cnt_p, mean_p, m2_p = torch.empty(3, p.splits * C, **f32).unbind()
    mean, var, invstd = (torch.empty(C, **f32) for _ in range(3))  # returned: must not alias each other
    y = torch.empty_like(x)
    update = running_mean is not None
    with _device_ctx(x):
        K._stats_kernel[p.grid](x, cnt_p, mean_p, m2_p, *p.shape_args, *p.strides, *p.tile_args, **p.meta)
        K._finalize_stats_kernel[(p.grid[0],)](
            cnt_p, mean_p, m2_p, mean, var, invstd,
            running_mean if update else mean, running_var if update else var,
            num_batches_tracked if cumulative else mean, C, p.splits, eps, momentum, unbias,
            UPDATE=update, CUMULATIVE=cumulative, BLOCK_C=p.meta["BLOCK_C"])
        _normalize(x, y, mean, invstd, weight, bias, p, eps, False, activation, negative_slope)
    return y, mean, var, invstd


def _normalize(x, y, mean, stat, weight, bias, p: Plan, eps, stat_is_var, activation, negative_slope):
    K._normalize_kernel[p.grid](
        x, y, mean, stat, weight if weight is not None else mean, bias if bias is not None else mean,
        *p.shape_args, *p.strides, *p.tile_args, eps, negative_slope,
        STAT_IS_VAR=stat_is_var, HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=K.ACT_CODES[activation], **p.meta)


def eval_forward(x, mean, var, weight, bias, eps: float, activation: str, negative_slope: float):
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with given (running) statistics."""
    x = as_ncl(x)
    p = plan(x)
    y = torch.empty_like(x)
    with _device_ctx(x):
        _normalize(x, y, mean, var, weight, bias, p, eps, True, activation, negative_slope)
    return y


def backward(dy, saved, mean, stat, weight, bias, eps: float, training: bool, stat_is_var: bool,
             activation: str, negative_slope: float, from_output: bool):
    """``(dx, dgamma, dbeta)``; ``saved`` is the input x, or the output y when ``from_output``.

    ``stat`` is invstd, or the variance when ``stat_is_var`` (eval: the running statistics). With
    ``training`` the statistics are the batch's and dx carries their gradient.
    """
    saved = as_ncl(saved)
    dy = dy if _spatial_stride(dy) is not None else dy.contiguous()
    p = plan(saved, dy)
    C = p.C
    f32 = dict(dtype=torch.float32, device=saved.device)
    sg_p, sgx_p = torch.empty(2, p.splits * C, **f32).unbind()
    dbeta, dgamma = torch.empty(C, **f32), torch.empty(C, **f32)  # returned: must not alias each other
    dx = torch.empty_like(saved)
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    flags = dict(STAT_IS_VAR=stat_is_var, HAS_W=weight is not None, HAS_B=bias is not None,
                 ACT=K.ACT_CODES[activation], FROM_OUTPUT=from_output, **p.meta)
    strides = (*p.strides, *_strides(dy))
    with _device_ctx(saved):
        K._grad_sums_kernel[p.grid](dy, saved, mean, stat, w, b, sg_p, sgx_p, *p.shape_args, *strides,
                                    *p.tile_args, eps, negative_slope, **flags)
        K._finalize_sums_kernel[(p.grid[0],)](sg_p, sgx_p, dbeta, dgamma, C, p.splits, BLOCK_C=p.meta["BLOCK_C"])
        n, _, length = p.shape_args
        K._grad_input_kernel[p.grid](dy, saved, dx, mean, stat, w, b, dbeta, dgamma, *p.shape_args, *strides,
                                     *p.tile_args, float(n * length), eps, negative_slope, TRAINING=training, **flags)
    return dx, dgamma, dbeta
