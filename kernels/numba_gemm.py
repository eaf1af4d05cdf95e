"""The model's dense GEMMs for the numba backend, run on numba's threads.

A training step alternates GEMMs with element-wise kernels, a hundred times or more. With
NumPy's matmul, the GEMMs run on the BLAS's own thread pool and the kernels on numba's: two
pools on the same cores, each going to sleep while the other works, so nearly every call
first wakes a sleeping thread, which on a virtual machine takes longer than a small kernel's
arithmetic (benchmarks/README.md, "One thread pool for the step").

So here the GEMMs run on numba's pool too, as tiles: C [M, N] is cut into a grid of
pm x pn tiles, one per thread (pm pn = threads, the tiles as near square as the grid allows),
and each thread calls the single-threaded BLAS on its tile:

    C[i0:i1, j0:j1] = op(A)[i0:i1, :] op(B)[:, j0:j1]        (+ C[i0:i1, j0:j1]: add_matmul)

The FLOPs are the same; each element is the same dot product over K, summed as the BLAS
sums it. With one pool for everything, numba's pool can be one that waits by spinning
(OpenMP's: see refgpt.kernels), and a launch is cheap.

    matmul(a, b, bias)    a @ b (+ bias on every row), a new array
    add_matmul(c, a, b)   c += a @ b in place (beta = 1): a weight gradient accumulates in its
                          buffer, with no temporary product and no separate add

Operands are 2-D arrays whose rows or columns are contiguous (a transposed view is BLAS's
transpose flag, not a copy); anything else goes to the reference.

16-bit operands (bfloat16, float16) go to the BLAS's 16-bit GEMM with fp32 accumulation where
there is one (refgpt.kernels.blas16), tiled the same way into an fp32 C: matmul then rounds C
once to 16 bits, each thread its own tile right after its GEMM, while the tile is still in
its cache (or, rounded=False, returns C in fp32); add_matmul adds into its fp32 C directly. Without one, the fallback: the operands widened to fp32 on numba's threads
(refgpt.kernels.numba_half) and the fp32 GEMM above.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import njit, prange

from .blas16 import gemm_for
from .numba_half import is_half, narrow, stored, widen, words
from .numba_attention import GEMM, NO_TRANS, ROW_MAJOR, TRANS, OneBlasThread, blas_operand


@functools.lru_cache(maxsize=256)
def tile_grid(M: int, N: int, threads: int) -> tuple[int, int]:
    """(pm, pn): tiles down and across C [M, N], pm pn = threads (or fewer when a side has
    fewer rows than that), chosen so that a tile's sides are closest in ratio."""
    best = None
    for pm in range(1, threads + 1):
        if threads % pm:
            continue
        pn = threads // pm
        if pm > M or pn > N:
            continue
        skew = abs(math.log((M / pm) / (N / pn)))
        if best is None or skew < best[0]:
            best = (skew, pm, pn)
    return (best[1], best[2]) if best else (1, 1)


@njit(parallel=True, cache=True, nogil=True)
def _tiled(gemm, ta, tb, a, b, beta, c, pm, pn, bias, out):
    """c = op(a) op(b) (+ c when beta = 1) in pm x pn tiles, one task each. With a bias (not
    empty; only for beta = 0), each tile is first filled with it and the GEMM adds to that
    (beta = 1): BLAS itself zeroes C before it accumulates when beta = 0, so the bias costs
    no pass of its own. a and b are the arrays as stored (op transposes them when ta / tb),
    rows contiguous. With out (16-bit words, refgpt.kernels.numba_half.words; not empty),
    each tile of c is then rounded into out by the thread that made it."""
    M, N = c.shape
    K = a.shape[0] if ta else a.shape[1]
    lda, ldb = a.strides[0] // a.itemsize, b.strides[0] // b.itemsize      # leading dimensions
    ldc = c.strides[0] // c.itemsize
    for t in prange(pm * pn):
        i0, i1 = (t // pn) * M // pm, (t // pn + 1) * M // pm
        j0, j1 = (t % pn) * N // pn, (t % pn + 1) * N // pn
        a_rows = a[:, i0:] if ta else a[i0:]                      # op(a)[i0:, :]
        b_cols = b[j0:] if tb else b[:, j0:]                      # op(b)[:, j0:]
        tile_beta = beta
        if bias.size:                   # the tile starts as the bias, and the GEMM adds to it
            for i in range(i0, i1):
                c[i, j0:j1] = bias[j0:j1]
            tile_beta = 1.0
        gemm(ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, i1 - i0, j1 - j0,
             K, 1.0, a_rows.ctypes, lda, b_cols.ctypes, ldb, tile_beta, c[i0:, j0:].ctypes, ldc)
        if out.size:
            for i in range(i0, i1):
                for j in range(j0, j1):
                    out[i, j] = stored(c[i, j], out)


def _run(c, a, b, beta, bias=None, out=None) -> bool:
    """c = a @ b (+ c) (+ bias) through the tiled kernel; False when BLAS cannot take the
    operands. 16-bit a and b: c and bias are fp32, and the GEMM is the 16-bit one; out (a
    16-bit array like c, optional): c rounded into it."""
    half = a.dtype.itemsize == 2
    gemm = gemm_for(a.dtype) if half else GEMM.get(c.dtype) if GEMM else None
    kind = np.dtype(np.float32) if half else c.dtype
    if (gemm is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]
            or c.shape != (a.shape[0], b.shape[1]) or b.dtype != a.dtype or c.dtype != kind
            or not half and a.dtype != c.dtype or 0 in a.shape or 0 in b.shape
            or bias is not None and (bias.shape != (c.shape[1],) or bias.dtype != kind)):
        return False                            # the reference computes it, or says why not
    ops = (blas_operand(a), blas_operand(b), blas_operand(c))
    if None in ops or ops[2][0] != NO_TRANS:
        return False
    ta, tb = ops[0][0] == TRANS, ops[1][0] == TRANS
    a, b = (a.T if ta else a), (b.T if tb else b)
    if half:                                    # the BLAS reads 16-bit words
        a, b = a.view(np.uint16), b.view(np.uint16)
    pm, pn = tile_grid(*c.shape, numba.get_num_threads())
    with OneBlasThread():                       # one BLAS thread per tile: numba's threads
        _tiled(gemm, ta, tb, a, b, float(beta), c, pm, pn,
               np.empty(0, c.dtype) if bias is None else bias,
               np.empty((0, 0), np.uint16) if out is None else words(out))
    return True


def matmul(a, b, bias=None, rounded=True):
    if is_half(a):                              # 16 bits: the 16-bit GEMM, else the fallback
        if a.ndim != 2 or b.ndim != 2 or b.dtype != a.dtype:
            return NotImplemented
        c = np.empty((a.shape[0], b.shape[1]), np.float32)
        out = np.empty(c.shape, a.dtype) if rounded else None
        bias32 = None if bias is None else widen(bias)
        if _run(c, a, b, 0.0, bias32, out):
            return out if rounded else c
        c = matmul(widen(a), widen(b), bias32)
        return narrow(c, a.dtype) if rounded else c
    if a.ndim == 2 and b.ndim == 2:
        c = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
        if _run(c, a, b, 0.0, bias):
            return c
    c = a @ b
    if bias is not None:
        c += bias
    return c


def add_matmul(c, a, b):
    if _run(c, a, b, 1.0):
        return None
    if is_half(a):                              # the fallback, into an fp32 c
        if c.dtype != np.float32 or b.dtype != a.dtype:
            return NotImplemented
        return add_matmul(c, widen(a), widen(b))
    c += a @ b
    return None
