"""Context parallelism's ring blocks for the numba backend: attention_block_forward and
attention_block_backward (their references, with the math, are in refgpt.nn.attention),
fused flash-style, so that no [B, H, n, nk] array is ever written.

A block is this rank's n queries against n keys of one ring step, all visible or (the
diagonal block) query i seeing keys j <= i. The forward runs one task per (batch, head,
tile of ``block`` queries) on numba's threads; each task keeps its tile's scores in a
buffer of its own, tile x nk, small enough to stay in cache, and makes of them in one pass
the probabilities, their log-sum-exp and the output:

    S = q_t k^T / sqrt(D)                          (BLAS, into the tile's buffer)
    m = rowmax S,  P = exp(S - m),  l = rowsum P   (numba_cpu's softmax row, in place)
    P = P / l,  O_t = P v,  lse_t = m + log l

The backward runs one task per (batch, head), over the tiles of its queries in turn, so
the task alone adds into its head's dK and dV (no two threads write one row):

    P = exp(q_t k^T / sqrt(D) - lse_t)      dV += P^T dO_t       dP = dO_t v^T
    dS = P * (dP - delta_t)                 dq_t += dS k / sqrt(D)
    dK += dS^T q_t / sqrt(D)

Each product is a call to the CBLAS GEMM that NumPy links (refgpt.kernels.numba_attention
finds it, and runs BLAS on one thread while numba's threads call it), reading q, k, v and
dO where they are (strided views of the c_attn output, or the arrays the ring received)
and adding into the accumulators with beta = 1. The tile is numba_attention's block for
the sequence length: the same trade (longer GEMMs against a smaller buffer).

Declined (NotImplemented: the reference runs): attention dropout's mask, 16-bit arrays,
operands of different types, and a NumPy without a CBLAS.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_attention import (FLAGS, GEMM, NO_TRANS, ROW_MAJOR, TRANS, OneBlasThread,
                              _blas_rows, _ld, _task, block_for)
from .numba_cpu import _softmax_row
from .numba_exp import vexp_of


@njit(inline="always")
def _gemm(gemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major c[m, n] = alpha op(a) op(b) + beta c (op transposes when ta / tb)."""
    gemm(ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, m, n, k, alpha,
         a.ctypes, lda, b.ctypes, ldb, beta, c.ctypes, ldc)


@njit(**FLAGS)
def _forward(gemm, q, k, v, o, lse, causal, scale, block):
    B, H, n, D = q.shape
    nk = k.shape[2]
    tiles = (n + block - 1) // block
    ldq, ldk, ldv, ldo = _ld(q), _ld(k), _ld(v), _ld(o)
    for w in prange(B * H * tiles):
        b, h, r = _task(w, H, tiles)
        i0, i1 = r * block, min(n, r * block + block)
        cols = i1 if causal else nk                        # the keys any row of the tile sees
        s = np.empty((i1 - i0, cols), q.dtype)
        _gemm(gemm, False, True, i1 - i0, cols, D, scale, q[b, h, i0:], ldq, k[b, h], ldk,
              0.0, s, cols)
        for i in range(i1 - i0):
            seen = i0 + i + 1 if causal else cols
            mx, total = _softmax_row(s, s, i, seen)
            for j in range(seen, cols):
                s[i, j] = 0.0
            lse[b, h, i0 + i] = mx + math.log(total)
        _gemm(gemm, False, False, i1 - i0, D, cols, 1.0, s, cols, v[b, h], ldv, 0.0,
              o[b, h, i0:], ldo)


@njit(**FLAGS)
def _backward(gemm, q, k, v, do, lse, delta, dq, dk, dv, causal, scale, block):
    B, H, n, D = q.shape
    nk = k.shape[2]
    ldq, ldk, ldv, ldg = _ld(q), _ld(k), _ld(v), _ld(do)
    ldgq, ldgk, ldgv = _ld(dq), _ld(dk), _ld(dv)
    for w in prange(B * H):
        b, h = w // H, w % H
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            rows, cols = i1 - i0, (i1 if causal else nk)
            p = np.empty((rows, cols), q.dtype)
            dp = np.empty((rows, cols), q.dtype)
            _gemm(gemm, False, True, rows, cols, D, scale, q[b, h, i0:], ldq, k[b, h], ldk,
                  0.0, p, cols)
            for i in range(rows):
                seen = i0 + i + 1 if causal else cols
                for j in range(seen):
                    p[i, j] = vexp_of(p[i, j] - lse[b, h, i0 + i])
                for j in range(seen, cols):
                    p[i, j] = 0.0
            _gemm(gemm, True, False, cols, D, rows, 1.0, p, cols, do[b, h, i0:], ldg, 1.0,
                  dv[b, h], ldgv)                                          # dV += P^T dO
            _gemm(gemm, False, True, rows, cols, D, 1.0, do[b, h, i0:], ldg, v[b, h], ldv,
                  0.0, dp, cols)                                           # dP = dO v^T
            for i in range(rows):
                e = delta[b, h, i0 + i]
                for j in range(cols):
                    dp[i, j] = p[i, j] * (dp[i, j] - e)                    # dS
            _gemm(gemm, False, False, rows, D, cols, scale, dp, cols, k[b, h], ldk, 1.0,
                  dq[b, h, i0:], ldgq)                                     # dq += dS k
            _gemm(gemm, True, False, cols, D, rows, scale, dp, cols, q[b, h, i0:], ldq, 1.0,
                  dk[b, h], ldgk)                                          # dK += dS^T q


def _usable(*arrays) -> bool:
    """One float type throughout (float32 or float64, which the BLAS has), rows BLAS can
    read as they are, and a BLAS found."""
    t = arrays[0].dtype
    return (GEMM is not None and t in GEMM and all(a.dtype == t for a in arrays)
            and all(_blas_rows(a) for a in arrays if a.ndim == 4))


def attention_block_forward(q, k, v, causal, mask=None):
    if mask is not None or not _usable(q, k, v):
        return NotImplemented
    B, H, n, D = q.shape
    o = np.empty((B, H, n, D), q.dtype)
    lse = np.empty((B, H, n), q.dtype)
    with OneBlasThread():
        _forward(GEMM[q.dtype], q, k, v, o, lse, bool(causal), 1.0 / math.sqrt(D),
                 block_for(n))
    return o, lse


def attention_block_backward(q, k, v, do, lse, delta, causal, mask, dq, dk, dv):
    if mask is not None or not _usable(q, k, v, do, lse, delta, dq, dk, dv):
        return NotImplemented
    with OneBlasThread():
        _backward(GEMM[q.dtype], q, k, v, do, lse, delta, dq, dk, dv, bool(causal),
                  1.0 / math.sqrt(q.shape[-1]), block_for(q.shape[2]))
