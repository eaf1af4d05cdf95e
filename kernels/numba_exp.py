"""exp(x) in float32 as plain arithmetic, so that LLVM can vectorise the loops that call it.

Numba compiles ``math.exp`` to a call into the C library, one element at a time: a loop that
calls it cannot use SIMD (NumPy's own exp has hand-written SIMD paths; Numba's would need
Intel's SVML, which recent llvmlite builds do not link). ``vexpf`` is the textbook exp,
written out so that every step is an instruction LLVM can widen (8 float32 lanes on AVX2):

    x = n ln2 + r,  n = round(x / ln2),  |r| <= ln2 / 2        (Cody-Waite: ln2 = hi + lo)
    exp(r) ~ 1 + r + r^2 (Q0 + Q1 r + ... + Q5 r^5)            (Cephes' polynomial for float32)
    exp(x) = 2^n exp(r),  2^n built from its bits: (n + 127) << 23

n is rounded by adding and subtracting 1.5 * 2^23, which leaves n in the low bits of the sum
(no float-to-int conversion); 2^n is applied as 2^(n-1) * 2 so that n = 128 stays in range.
Within 1 ulp of the correctly rounded exp over [-86.6, 88.72] (NumPy's float32 exp is within
2; tests/test_kernels.py), 0 below -86.6 (the true value is below 2.4e-38, where float32
loses precision), inf above, NaN kept. The kernels whose loops call it (the cross-entropy,
the float32 GELU) run about twice as fast as with libm's exp (benchmarks/README.md).

``vexp_of(x)`` is what the kernels call: vexpf for float32, and for float64 libm's exp
(within 0.5 ulp, as NumPy's). float64 is the precision runs are validated in, against the
NumPy reference and across parallel layouts (some of which compute the same exp through
NumPy), so it keeps NumPy's rounding; its speed matters less. (A float64 version written
the same way, within 2 ulp, served only GELU's float64 kernels and was dropped for this.)

``vexp_of`` is an overload compiled on its own, without its caller's fastmath flags:
"reassoc" would let LLVM fold the rounding trick ``(x + ROUND) - ROUND`` to x (a test calls
it from a reassociating loop). Numba caches the kernels that use it under their own file's
timestamp, so after editing this file delete kernels/__pycache__/*.nbi and *.nbc.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

F32 = np.float32
LOG2E = F32(1.4426950408889634)
LN2_HI, LN2_LO = F32(0.693359375), F32(-2.12194440e-4)       # ln 2 = LN2_HI + LN2_LO
ROUND = F32(12582912.0)                                       # 1.5 * 2^23
ROUND_BITS = struct.unpack("<i", struct.pack("<f", ROUND))[0]
LO, HI = F32(-86.6), F32(88.72)
ZERO, ONE, TWO, INF = F32(0.0), F32(1.0), F32(2.0), F32(np.inf)
Q5, Q4, Q3, Q2, Q1, Q0 = (F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                           4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


@intrinsic
def _half_pow2(typingctx, t):
    """2^(n-1) as a float32, where t = n + ROUND (n in t's low mantissa bits)."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        n_biased = builder.sub(builder.bitcast(args[0], i32), ir.Constant(i32, ROUND_BITS - 126))
        return builder.bitcast(builder.shl(n_biased, ir.Constant(i32, 23)), ir.FloatType())
    return types.float32(types.float32), codegen


@njit(inline="always")
def vexpf(x):
    xc = min(max(x, LO), HI)
    t = xc * LOG2E + ROUND                        # n = round(x / ln 2) sits in t's low bits
    n = t - ROUND
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = Q5
    p = p * r + Q4
    p = p * r + Q3
    p = p * r + Q2
    p = p * r + Q1
    p = p * r + Q0
    y = (p * (r * r) + r + ONE) * _half_pow2(t) * TWO
    if x < LO:
        return ZERO
    if x > HI:
        return INF
    return y if x == x else x                     # NaN stays NaN


def vexp_of(x):
    """exp(x): vexpf for float32, libm's exp otherwise (in compiled code; see above)."""
    return math.exp(x)


@overload(vexp_of)
def _vexp_of(x):
    if x == types.float32:
        return lambda x: vexpf(x)
    return lambda x: math.exp(x)
