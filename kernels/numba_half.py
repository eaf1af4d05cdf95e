"""16-bit arrays for the numba kernels: conversions to and from float32 on numba's threads.

The numba kernels compute in float32 and float64. A 16-bit run (refgpt.precision) computes
in fp32 and stores 16 bits, so a kernel given 16-bit arrays widens them, runs its fp32 code
and rounds what it returns (each kernel of refgpt.kernels.numba_cpu and numba_attention says
which of its results are 16-bit): the same one rounding as the references, at the cost of
a pass over each 16-bit array. bfloat16 is the upper half of a float32, so both directions
are bit operations, parallel here:

    widen     f32 bits = b16 bits << 16
    narrow    b16 bits = (f32 bits + 0x7fff + bit 16 of f32) >> 16      round to nearest even
              (a nan keeps its sign and becomes a quiet nan)

float16 goes through NumPy's own conversions (a C loop, one core). ml_dtypes' (what
refgpt.precision uses) are the same roundings: the tests compare them bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FLAGS = dict(parallel=True, cache=True, nogil=True)


def is_half(a) -> bool:
    """Whether a is an array of a 16-bit float type (ml_dtypes' bfloat16 has kind V)."""
    return a.dtype.itemsize == 2 and a.dtype.kind in "fV"


@njit(**FLAGS)
def _bf16_to_f32(src, dst):
    for i in prange(src.size):
        dst[i] = np.uint32(src[i]) << 16


@njit(**FLAGS)
def _f32_to_bf16(src, dst):
    for i in prange(src.size):
        u = src[i]
        if (u & 0x7FFFFFFF) > 0x7F800000:                          # nan: quiet, sign kept
            dst[i] = (u >> 16) | 0x40
        else:
            dst[i] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@njit(**FLAGS)
def _bf16_to_f32_strided(src, dst):
    """The same for 4-D arrays of any strides (views of a qkv projection, a transpose)."""
    A, B, C, D = src.shape
    for ab in prange(A * B):
        i, j = ab // B, ab % B
        for k in range(C):
            for m in range(D):
                dst[i, j, k, m] = np.uint32(src[i, j, k, m]) << 16


@njit(**FLAGS)
def _f32_to_bf16_strided(src, dst):
    A, B, C, D = src.shape
    for ab in prange(A * B):
        i, j = ab // B, ab % B
        for k in range(C):
            for m in range(D):
                u = src[i, j, k, m]
                if (u & 0x7FFFFFFF) > 0x7F800000:
                    dst[i, j, k, m] = (u >> 16) | 0x40
                else:
                    dst[i, j, k, m] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16


def _as_4d(a: np.ndarray) -> np.ndarray | None:
    """a viewed as 4-D (leading axes of 1 added, no copy), or None above 4 axes."""
    return a.reshape((1,) * (4 - a.ndim) + a.shape) if a.ndim <= 4 else None


def widen(x: np.ndarray) -> np.ndarray:
    """A float32 array of x's values (x 16-bit): C-contiguous, or the transpose of one where
    x is a transpose (W^T, x^T), so that the GEMM takes it without a copy."""
    if x.dtype.kind == "f":                                         # float16
        return np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return widen(x.T).T
    out = np.empty(x.shape, np.float32)
    if x.flags.c_contiguous:
        _bf16_to_f32(x.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
    elif x.ndim <= 4:
        _bf16_to_f32_strided(_as_4d(x).view(np.uint16), _as_4d(out).view(np.uint32))
    else:
        out[...] = x
    return out


def narrow(y: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """y rounded to the 16-bit dtype, into out when given (then returned): for float32 y the
    bit kernels (contiguous, or up to 4-D of any strides), else the array library's cast."""
    dtype = np.dtype(dtype)
    if out is None:
        out = np.empty(y.shape, dtype)
    if dtype.kind == "f" or y.dtype != np.float32 or y.ndim > 4 or y.shape != out.shape:
        out[...] = y                        # NumPy's or ml_dtypes' cast: the same rounding
    elif y.flags.c_contiguous and out.flags.c_contiguous:
        _f32_to_bf16(y.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16))
    else:
        _f32_to_bf16_strided(_as_4d(y).view(np.uint32), _as_4d(out).view(np.uint16))
    return out
