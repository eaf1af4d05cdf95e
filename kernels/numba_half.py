"""16-bit arrays for the numba kernels: conversions to and from float32 on numba's threads.

The numba kernels compute in float32 and float64. A 16-bit run (refgpt.precision) computes
in fp32 and stores 16 bits, so a kernel given 16-bit arrays widens them, runs its fp32 code
and rounds what it returns (each kernel of refgpt.kernels.numba_cpu and numba_attention says
which of its results are 16-bit): the same one rounding as the references, at the cost of
a pass over each 16-bit array. Both directions are bit operations, parallel here. bfloat16
is the upper half of a float32:

    widen     f32 bits = b16 bits << 16
    narrow    b16 bits = (f32 bits + 0x7fff + bit 16 of f32) >> 16      round to nearest even
              (a nan keeps its sign and becomes a quiet nan)

float16 (1 sign, 5 exponent bits biased by 15, 10 mantissa bits) moves its exponent by
127 - 15 = 112 and its mantissa by 13 bits, with its subnormals (m 2^-24) normalised on the
way up, and on the way down rounds the dropped 13 bits (more below 2^-14, where the half is
subnormal) to nearest even; 65520 and above become inf. NumPy's and ml_dtypes' conversions
(what refgpt.precision uses) are the same roundings: the tests compare them bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

FLAGS = dict(parallel=True, cache=True, nogil=True)


def is_half(a) -> bool:
    """Whether a is an array of a 16-bit float type (ml_dtypes' bfloat16 has kind V)."""
    return a.dtype.itemsize == 2 and a.dtype.kind in "fV"


@njit(inline="always")
def _widen_bits(h, fp16):
    """The float32 bits of the 16-bit value whose bits are h."""
    h = np.uint32(h)
    if not fp16:
        return h << 16
    sign, e, m = (h & 0x8000) << 16, np.int32((h >> 10) & 0x1F), h & 0x3FF
    if e == 0x1F:                                                   # inf, nan
        return sign | 0x7F800000 | (m << 13)
    if e == 0:
        if m == 0:
            return sign
        e = 1                                                       # subnormal: normalise
        while (m & 0x400) == 0:
            m <<= 1
            e -= 1
        m &= 0x3FF
    return sign | (np.uint32(e + 112) << 23) | (m << 13)           # 112 = 127 - 15


@njit(inline="always")
def _narrow_bits(u, fp16):
    """The 16-bit bits of the float32 whose bits are u, rounded to nearest even."""
    if not fp16:
        if (u & 0x7FFFFFFF) > 0x7F800000:                          # nan: quiet, sign kept
            return (u >> 16) | 0x40
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    sign, a = (u >> 16) & 0x8000, u & 0x7FFFFFFF
    if a > 0x7F800000:                                              # nan: payload kept (NumPy)
        r = 0x7C00 | (a & 0x7FFFFF) >> 13
        return sign | (r if r != 0x7C00 else 0x7C01)
    if a >= 0x477FF000:                                             # 65520 and up: inf
        return sign | 0x7C00
    if a >= 0x38800000:                                             # a normal half
        h, rem = (a - 0x38000000) >> 13, a & 0x1FFF
    else:                                                           # subnormal, or zero
        shift = 126 - np.int32(a >> 23)
        if shift > 24:
            return sign
        m = (a & 0x7FFFFF) | 0x800000
        h, rem = m >> shift, m & ((np.uint32(1) << shift) - 1)
        if rem > (np.uint32(1) << (shift - 1)) or (rem == (np.uint32(1) << (shift - 1))
                                                  and h & 1):
            h += 1
        return sign | h
    if rem > 0x1000 or (rem == 0x1000 and h & 1):
        h += 1
    return sign | h


def words(a: np.ndarray) -> np.ndarray:
    """An array as the kernels below take it: a 16-bit one as its words, uint16 for bfloat16
    and int16 for float16, so that the format is the words' type, known when a kernel is
    compiled (a format passed as a flag at run time keeps LLVM from vectorising the loops:
    5-8x slower); any other array as it is."""
    if not is_half(a):
        return a
    return a.view(np.int16 if a.dtype.kind == "f" else np.uint16)


def value(h):
    """(in numba kernels) The number an element stands for: a 16-bit word (see words) widened
    to float32, a float as it is. One kernel then serves every precision."""


def stored(x, like):
    """(in numba kernels) x as like's elements store it: rounded to nearest even as a 16-bit
    word of like's format, or cast to like's float type."""


def computed(x, like):
    """(in numba kernels) x in the type like's elements compute in: float32 for 16-bit words,
    like's own float type otherwise."""


def _format(numba_type):
    """(16-bit words?, float16's?) of an element type."""
    return numba_type in (types.uint16, types.int16), numba_type == types.int16


@overload(value)
def _value(h):
    half, fp16 = _format(h)                     # the format, fixed when compiled
    if not half:
        return lambda h: h

    def widened(h):
        return np.uint32(_widen_bits(np.uint16(h), fp16)).view(np.float32)
    return widened


@overload(stored)
def _stored(x, like):
    half, fp16 = _format(like.dtype)
    kind = (np.int16 if fp16 else np.uint16) if half else as_dtype(like.dtype).type

    def rounded(x, like):
        return kind(_narrow_bits(np.float32(x).view(np.uint32), fp16))
    return rounded if half else (lambda x, like: kind(x))


@overload(computed)
def _computed(x, like):
    kind = np.float32 if _format(like.dtype)[0] else as_dtype(like.dtype).type
    return lambda x, like: kind(x)


@njit(**FLAGS)
def _to_f32(src, dst, fp16):
    for i in prange(src.size):
        dst[i] = _widen_bits(src[i], fp16)


@njit(**FLAGS)
def _from_f32(src, dst, fp16):
    for i in prange(src.size):
        dst[i] = _narrow_bits(src[i], fp16)


@njit(**FLAGS)
def _to_f32_strided(src, dst, fp16):
    """The same for 4-D arrays of any strides (views of a qkv projection, a transpose)."""
    A, B, C, D = src.shape
    for ab in prange(A * B):
        i, j = ab // B, ab % B
        for k in range(C):
            for m in range(D):
                dst[i, j, k, m] = _widen_bits(src[i, j, k, m], fp16)


@njit(**FLAGS)
def _from_f32_strided(src, dst, fp16):
    A, B, C, D = src.shape
    for ab in prange(A * B):
        i, j = ab // B, ab % B
        for k in range(C):
            for m in range(D):
                dst[i, j, k, m] = _narrow_bits(src[i, j, k, m], fp16)


def _as_4d(a: np.ndarray) -> np.ndarray | None:
    """a viewed as 4-D (leading axes of 1 added, no copy), or None above 4 axes."""
    return a.reshape((1,) * (4 - a.ndim) + a.shape) if a.ndim <= 4 else None


def widen(x: np.ndarray) -> np.ndarray:
    """A float32 array of x's values (x 16-bit): C-contiguous, or the transpose of one where
    x is a transpose (W^T, x^T), so that the GEMM takes it without a copy."""
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return widen(x.T).T
    out, fp16 = np.empty(x.shape, np.float32), x.dtype.kind == "f"
    if x.flags.c_contiguous:
        _to_f32(x.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32), fp16)
    elif x.ndim <= 4:
        _to_f32_strided(_as_4d(x).view(np.uint16), _as_4d(out).view(np.uint32), fp16)
    else:
        out[...] = x
    return out


def wide(x: np.ndarray):
    """refgpt.nn.cast.wide: a 16-bit x widened (widen), NotImplemented for the others (their
    reference returns them as they are)."""
    return widen(x) if x.dtype.itemsize == 2 else NotImplemented


def narrow(y: np.ndarray, dtype, out: np.ndarray | None = None):
    """y rounded to the 16-bit dtype, into out when given (then returned): for float32 y the
    bit kernels (contiguous, or up to 4-D of any strides), else the array library's cast.
    y itself where it has dtype already and no out is given; NotImplemented for a dtype of
    more than 16 bits (refgpt.nn.cast's reference: NumPy's cast)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize != 2:
        return NotImplemented
    if out is None and y.dtype == dtype:
        return y
    if out is None:
        out = np.empty(y.shape, dtype)
    fp16 = dtype.kind == "f"
    if y.dtype != np.float32 or y.ndim > 4 or y.shape != out.shape:
        out[...] = y                        # NumPy's or ml_dtypes' cast: the same rounding
    elif y.flags.c_contiguous and out.flags.c_contiguous:
        _from_f32(y.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16), fp16)
    else:
        _from_f32_strided(_as_4d(y).view(np.uint32), _as_4d(out).view(np.uint16), fp16)
    return out


def round_into(out: np.ndarray, x: np.ndarray) -> None:
    """The master weights rounded into the 16-bit parameters on numba's threads (ml_dtypes'
    cast, the reference, runs on one core)."""
    narrow(x, out.dtype, out=out)
