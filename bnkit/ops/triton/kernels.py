"""Triton kernels for batch norm (+ fused activation), forward and backward.

Every input is viewed as ``(N, C, L)`` with element strides ``(sN, sC, sL)`` (``L`` = product of the
spatial sizes, which must be flattenable to one stride): contiguous NCHW has ``sL = 1``,
channels_last has ``sC = 1``, a 2-D ``(N, C)`` input has ``L = 1``. A program works on 3-D tiles
``[BLOCK_N, BLOCK_L, BLOCK_C]``; the stride that equals 1 is specialized by Triton, so the contiguous
axis is vectorized without any per-element division.

The grid is ``(channel blocks, splits)``. The tiles of one channel block are numbered
``t = nb * nbL + lb`` and split ``s`` owns the contiguous range ``[s * tps, (s + 1) * tps)``. Reductions
write fp32 per-split partials that are merged in split order: deterministic, no atomics. Launches are
what a small shape pays for, so the consumer kernel gets the per-channel results one of three ways
(its ``STATS``/``SUMS``): with one split it computes them itself (one launch per direction), with a
few it merges the partials in its prologue (two), with many a finalize kernel merges them once (three).

Training forward: [``_stats_kernel`` (per-split ``(count, mean, M2)``) -> [``_finalize_stats_kernel``]]
-> ``_normalize_kernel`` (normalize + affine + activation; writes the batch mean and biased variance).
Training backward: [``_grad_sums_kernel`` (``sum g``, ``sum g * xhat`` with ``g`` = dy times the
activation's derivative, rebuilt from x and the saved statistics) -> [``_finalize_sums_kernel``]] ->
``_grad_input_kernel`` (dbeta, dgamma, dx). Eval forward is ``_normalize_kernel`` alone. The running
statistics are not touched here: the layer updates them from the returned batch statistics.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: Activation codes shared by every kernel (constexpr, so each variant compiles to its own code).
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}

#: Where a consumer kernel gets the per-channel statistics / gradient sums (its ``STATS``/``SUMS``):
#: read (a finalize kernel or the caller wrote them), merged from a few splits' partials in its
#: prologue, or computed by itself when the grid has one split.
GIVEN, MERGE, OWN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _tile(t, nbL, N, L, C, sN, sL, sC, c, cmask,
          BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr):
    """Offsets, mask and number of valid (n, l) positions of tile ``t`` for channels ``c``."""
    nb = t // nbL
    lb = t - nb * nbL
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    ll = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (n < N)[:, None, None] & (ll < L)[None, :, None] & cmask[None, None, :]
    cc = c
    if INT64:  # N*C*L may pass 2**31: the products below must not wrap
        n = n.to(tl.int64)
        ll = ll.to(tl.int64)
        cc = c.to(tl.int64)
    off = n[:, None, None] * sN + ll[None, :, None] * sL + cc[None, None, :] * sC
    count = (tl.minimum(N - nb * BLOCK_N, BLOCK_N) * tl.minimum(L - lb * BLOCK_L, BLOCK_L)).to(tl.float32)
    return off, mask, count


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(dy, z, slope, ACT: tl.constexpr):
    """dy times act'(z); the masks follow torch (relu/leaky_relu: derivative 1 only where z > 0)."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope)
    elif ACT == 3:
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _tiles_stats(X, t0, t1, nbL, N, L, C, sN, sL, sC, c, cmask,
                 BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """(count, mean, M2) of tiles ``[t0, t1)``: a two-pass mean/M2 per tile in registers, Chan-merged."""
    n_acc = tl.zeros([BLOCK_C], tl.float32)
    mean_acc = tl.zeros([BLOCK_C], tl.float32)
    m2_acc = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t0, t1):
        off, mask, count = _tile(t, nbL, N, L, C, sN, sL, sC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        t_mean = tl.sum(tl.sum(x, axis=0), axis=0) / count
        d = tl.where(mask, x - t_mean[None, None, :], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=0), axis=0)
        total = n_acc + count
        delta = t_mean - mean_acc
        mean_acc += delta * (count / total)
        m2_acc += t_m2 + delta * delta * (n_acc * count / total)
        n_acc = total
    return n_acc, mean_acc, m2_acc


@triton.jit
def _stats_kernel(X, CNT_P, MEAN_P, M2_P, N, C, L, sN, sL, sC, nbL, n_tiles, tps,
                  BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Per-split (count, mean, M2) of the split's tiles."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s = tl.program_id(1)
    n_acc, mean_acc, m2_acc = _tiles_stats(X, s * tps, tl.minimum(s * tps + tps, n_tiles), nbL, N, L, C, sN, sL, sC,
                                           c, cmask, BLOCK_N, BLOCK_L, BLOCK_C, INT64)
    p = s * C + c
    tl.store(CNT_P + p, n_acc, mask=cmask)
    tl.store(MEAN_P + p, mean_acc, mask=cmask)
    tl.store(M2_P + p, m2_acc, mask=cmask)


@triton.jit
def _merge_stats(CNT_P, MEAN_P, M2_P, c, cmask, C, splits, BLOCK_C: tl.constexpr):
    """``(mean, biased var)``: the split partials Chan-merged in split order (deterministic)."""
    n_acc = tl.zeros([BLOCK_C], tl.float32)
    mean_acc = tl.zeros([BLOCK_C], tl.float32)
    m2_acc = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, splits):
        count = tl.load(CNT_P + s * C + c, mask=cmask, other=0.0)
        mean = tl.load(MEAN_P + s * C + c, mask=cmask, other=0.0)
        m2 = tl.load(M2_P + s * C + c, mask=cmask, other=0.0)
        total = tl.maximum(n_acc + count, 1.0)
        delta = mean - mean_acc
        mean_acc += delta * (count / total)
        m2_acc += m2 + delta * delta * (n_acc * count / total)
        n_acc += count
    return mean_acc, m2_acc / tl.maximum(n_acc, 1.0)  # masked channels have n = 0


@triton.jit
def _merge_sums(SG_P, SGX_P, c, cmask, C, splits, BLOCK_C: tl.constexpr):
    """``(sum g, sum g * xhat)``: the split partials summed in split order (deterministic)."""
    sg = tl.zeros([BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, splits):
        sg += tl.load(SG_P + s * C + c, mask=cmask, other=0.0)
        sgx += tl.load(SGX_P + s * C + c, mask=cmask, other=0.0)
    return sg, sgx


@triton.jit
def _finalize_stats_kernel(CNT_P, MEAN_P, M2_P, MEAN, VAR, C, splits, BLOCK_C: tl.constexpr):
    """Many splits: merge the partials once, for every channel block, before ``_normalize_kernel``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, var = _merge_stats(CNT_P, MEAN_P, M2_P, c, cmask, C, splits, BLOCK_C)
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(VAR + c, var, mask=cmask)


@triton.jit
def _finalize_sums_kernel(SG_P, SGX_P, DBETA, DGAMMA, C, splits, BLOCK_C: tl.constexpr):
    """Many splits: ``dbeta = sum g``, ``dgamma = sum g * xhat`` once, before ``_grad_input_kernel``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sg, sgx = _merge_sums(SG_P, SGX_P, c, cmask, C, splits, BLOCK_C)
    tl.store(DBETA + c, sg, mask=cmask)
    tl.store(DGAMMA + c, sgx, mask=cmask)


@triton.jit
def _affine(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    gamma = tl.full(c.shape, 1.0, tl.float32)
    if HAS_W:
        gamma = tl.load(W + c, mask=cmask, other=1.0).to(tl.float32)
    beta = tl.zeros(c.shape, tl.float32)
    if HAS_B:
        beta = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    return gamma, beta


@triton.jit
def _channel_params(MEAN, VAR, W, B, c, cmask, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel ``mean``, ``invstd``, ``gamma`` and ``beta`` in fp32."""
    mean = tl.load(MEAN + c, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(VAR + c, mask=cmask, other=1.0).to(tl.float32)
    gamma, beta = _affine(W, B, c, cmask, HAS_W, HAS_B)
    return mean, 1.0 / tl.sqrt(var + eps), gamma, beta


@triton.jit
def _normalize_kernel(X, Y, MEAN, VAR, W, B, CNT_P, MEAN_P, M2_P, N, C, L, sN, sL, sC, nbL, n_tiles, tps, splits,
                      eps, slope, STATS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """``y = act((x - mean) * (invstd * gamma) + beta)``: one subtract and one FMA per element.

    ``STATS``: where mean and variance come from. ``GIVEN``: read from ``MEAN``/``VAR`` (eval: the
    running statistics; training with many splits: the finalize kernel's). ``MERGE`` (a few splits):
    merged from the partials here, no finalize launch. ``OWN`` (one split: this program sees every
    tile of its channels): computed here from x, the only launch of the forward. With ``MERGE`` and
    ``OWN`` the programs of split 0 write ``MEAN``/``VAR``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s = tl.program_id(1)
    if STATS == GIVEN:
        mean, invstd, gamma, beta = _channel_params(MEAN, VAR, W, B, c, cmask, eps, HAS_W, HAS_B)
    else:
        if STATS == MERGE:
            mean, var = _merge_stats(CNT_P, MEAN_P, M2_P, c, cmask, C, splits, BLOCK_C)
        else:
            n, mean, m2 = _tiles_stats(X, 0, n_tiles, nbL, N, L, C, sN, sL, sC, c, cmask, BLOCK_N, BLOCK_L, BLOCK_C,
                                       INT64)
            var = m2 / tl.maximum(n, 1.0)
        if s == 0:
            tl.store(MEAN + c, mean, mask=cmask)
            tl.store(VAR + c, var, mask=cmask)
        invstd = 1.0 / tl.sqrt(var + eps)
        gamma, beta = _affine(W, B, c, cmask, HAS_W, HAS_B)
    scale = (invstd * gamma)[None, None, :]
    mean = mean[None, None, :]
    beta = beta[None, None, :]
    for t in range(s * tps, tl.minimum(s * tps + tps, n_tiles)):
        off, mask, count = _tile(t, nbL, N, L, C, sN, sL, sC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        y = _activate((x - mean) * scale + beta, slope, ACT)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _recompute(S, off, mask, mean, invstd, gamma, beta, slope, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """``(xhat, z)`` of one tile, z = xhat * gamma + beta the activation's input.

    From the input x: ``xhat = (x - mean) * invstd``. From the output y (memory-saving mode, invertible
    activation, gamma != 0): ``z = act^-1(y)``, ``xhat = (z - beta) / gamma``.
    """
    v = tl.load(S + off, mask=mask, other=0.0).to(tl.float32)
    if FROM_OUTPUT:
        z = v
        if ACT == 2:
            z = tl.where(v > 0, v, v / slope)
        xhat = (z - beta) / gamma
    else:
        xhat = (v - mean) * invstd
        z = xhat * gamma + beta
    return xhat, z


@triton.jit
def _tiles_grad_sums(DY, S, t0, t1, nbL, N, L, C, sN, sL, sC, dN, dL, dC, c, cmask, mean, invstd, gamma, beta, slope,
                     ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """``sum g`` and ``sum g * xhat`` over tiles ``[t0, t1)``, g = dy * act'(z) (the mask is rebuilt, never stored)."""
    sg = tl.zeros([BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t0, t1):
        off, mask, count = _tile(t, nbL, N, L, C, sN, sL, sC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        doff, _, _ = _tile(t, nbL, N, L, C, dN, dL, dC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        xhat, z = _recompute(S, off, mask, mean, invstd, gamma, beta, slope, ACT, FROM_OUTPUT)
        dy = tl.load(DY + doff, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask, _activation_grad(dy, z, slope, ACT), 0.0)
        sg += tl.sum(tl.sum(g, axis=0), axis=0)
        sgx += tl.sum(tl.sum(g * xhat, axis=0), axis=0)
    return sg, sgx


@triton.jit
def _grad_sums_kernel(DY, S, MEAN, VAR, W, B, SG_P, SGX_P, N, C, L, sN, sL, sC, dN, dL, dC,
                      nbL, n_tiles, tps, eps, slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      FROM_OUTPUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                      INT64: tl.constexpr):
    """Per-split ``sum g`` and ``sum g * xhat`` of the split's tiles."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s = tl.program_id(1)
    mean, invstd, gamma, beta = _channel_params(MEAN, VAR, W, B, c, cmask, eps, HAS_W, HAS_B)
    sg, sgx = _tiles_grad_sums(DY, S, s * tps, tl.minimum(s * tps + tps, n_tiles), nbL, N, L, C, sN, sL, sC, dN, dL,
                               dC, c, cmask, mean[None, None, :], invstd[None, None, :], gamma[None, None, :],
                               beta[None, None, :], slope, ACT, FROM_OUTPUT, BLOCK_N, BLOCK_L, BLOCK_C, INT64)
    tl.store(SG_P + s * C + c, sg, mask=cmask)
    tl.store(SGX_P + s * C + c, sgx, mask=cmask)


@triton.jit
def _grad_input_kernel(DY, S, DX, MEAN, VAR, W, B, DBETA, DGAMMA, SG_P, SGX_P, N, C, L, sN, sL, sC, dN, dL, dC,
                       nbL, n_tiles, tps, splits, count, eps, slope, TRAINING: tl.constexpr, SUMS: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """``dx = gamma * invstd * (g - dbeta / n - xhat * dgamma / n)`` (training) or ``gamma * invstd * g``.

    ``SUMS`` as ``STATS`` in ``_normalize_kernel``: ``GIVEN`` (``_finalize_sums_kernel`` wrote
    ``DBETA``/``DGAMMA``), ``MERGE`` (summed from the partials here) or ``OWN`` (one split: computed
    here from dy and x, the only launch of the backward); with the last two the programs of split 0
    write ``DBETA``/``DGAMMA``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s = tl.program_id(1)
    mean, invstd, gamma, beta = _channel_params(MEAN, VAR, W, B, c, cmask, eps, HAS_W, HAS_B)
    k = (gamma * invstd)[None, None, :]
    mean, invstd, gamma, beta = mean[None, None, :], invstd[None, None, :], gamma[None, None, :], beta[None, None, :]
    if SUMS == GIVEN:
        sg = tl.load(DBETA + c, mask=cmask, other=0.0)
        sgx = tl.load(DGAMMA + c, mask=cmask, other=0.0)
    else:
        if SUMS == MERGE:
            sg, sgx = _merge_sums(SG_P, SGX_P, c, cmask, C, splits, BLOCK_C)
        else:
            sg, sgx = _tiles_grad_sums(DY, S, 0, n_tiles, nbL, N, L, C, sN, sL, sC, dN, dL, dC, c, cmask, mean, invstd,
                                       gamma, beta, slope, ACT, FROM_OUTPUT, BLOCK_N, BLOCK_L, BLOCK_C, INT64)
        if s == 0:
            tl.store(DBETA + c, sg, mask=cmask)
            tl.store(DGAMMA + c, sgx, mask=cmask)
    mean_g = (sg / count)[None, None, :]
    mean_gx = (sgx / count)[None, None, :]
    for t in range(s * tps, tl.minimum(s * tps + tps, n_tiles)):
        off, mask, _ = _tile(t, nbL, N, L, C, sN, sL, sC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        doff, _, _ = _tile(t, nbL, N, L, C, dN, dL, dC, c, cmask, BLOCK_N, BLOCK_L, INT64)
        xhat, z = _recompute(S, off, mask, mean, invstd, gamma, beta, slope, ACT, FROM_OUTPUT)
        dy = tl.load(DY + doff, mask=mask, other=0.0).to(tl.float32)
        g = _activation_grad(dy, z, slope, ACT)
        if TRAINING:
            g = g - mean_g - xhat * mean_gx
        tl.store(DX + off, (k * g).to(DX.dtype.element_ty), mask=mask)
