"""16-bit arrays for the cupy kernels: conversions to and from float32 on the GPU.

A 16-bit run (refgpt.precision) stores 16 bits and computes in fp32. The GEMMs take 16-bit
operands directly (cuBLAS on tensor cores, refgpt.kernels.cupy_gemm and cupy_attention).
The CUDA kernels read and write 16-bit arrays themselves: ``SOURCE`` gives them two storage
types, ``bf16`` and ``f16`` (16-bit words, so no CUDA header is needed), ``ld(x)``, which
widens any stored value (float, double, bf16, f16) to its compute type, and ``st<T>(v)``,
which rounds a computed value to storage type T once. The row kernels of
refgpt.kernels.cupy_gpu are templates over the stored type T and the wide type W of their
fp32 results; the element-wise kernels of a 16-bit run are here (GELU forward and backward,
the fused bias + GELU, the residual add), each one pass over its arrays.

bfloat16 is the upper half of a float32, so both directions are bit operations:

    widen     f32 bits = b16 bits << 16
    narrow    b16 bits = (f32 bits + 0x7fff + bit 16 of f32) >> 16      round to nearest even
              (a nan keeps its sign and becomes a quiet nan)

float16 goes through the hardware's conversions (PTX cvt). The tests compare both with
ml_dtypes' roundings bit for bit.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

SOURCE = r"""
struct bf16 { unsigned short u; };
struct f16 { unsigned short u; };
__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ double ld(double x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __uint_as_float(((unsigned int)x.u) << 16); }
__device__ __forceinline__ float ld(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.u));
    return f;
}
template <typename T> __device__ __forceinline__ T st(double v);
template <> __device__ __forceinline__ float st<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ double st<double>(double v) { return v; }
template <> __device__ __forceinline__ bf16 st<bf16>(double v) {
    unsigned int u = __float_as_uint((float)v);              // nearest even; a nan stays quiet
    bf16 r;
    r.u = (u & 0x7FFFFFFFu) > 0x7F800000u ? (unsigned short)((u >> 16) | 0x40u)
                                          : (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return r;
}
template <> __device__ __forceinline__ f16 st<f16>(double v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.u) : "f"((float)v));
    return r;
}
"""

_ELEMENTWISE = r"""
#define EACH(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
                        i += (long long)gridDim.x * blockDim.x)
template <typename T>
__global__ void gelu_forward16(const T* x, T* y, long long n, int tanh_form) {
    EACH(i, n) y[i] = st<T>(gelu_value<float>(ld(x[i]), tanh_form));
}
template <typename T, typename O>
__global__ void gelu_backward16(const T* x, const T* dy, O* dx, long long n, int tanh_form) {
    EACH(i, n) dx[i] = st<O>(ld(dy[i]) * gelu_slope<float>(ld(x[i]), tanh_form));
}
template <typename T>           // f + b rounded into f, then GELU of that rounded sum
__global__ void bias_gelu_forward16(T* f, const T* b, T* y, long long n, int C, int tanh_form) {
    EACH(i, n) {
        T s = st<T>(ld(f[i]) + ld(b[i % C]));
        f[i] = s;
        y[i] = st<T>(gelu_value<float>(ld(s), tanh_form));
    }
}
template <typename T>
__global__ void residual16(const T* x, const T* y, T* out, long long n) {
    EACH(i, n) out[i] = st<T>(ld(x[i]) + ld(y[i]));
}
"""


def ctype(dtype) -> str:
    """The CUDA type of SOURCE that stores dtype."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 2:
        return "f16" if dtype.kind == "f" else "bf16"
    return {4: "float", 8: "double"}[dtype.itemsize]


def wide_dtype(dtype):
    """The type an op of a dtype input computes and keeps fp32 results in."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


class Elementwise:
    """The 16-bit element-wise kernels, compiled with the GELU formulas of refgpt.kernels.
    cupy_gpu (gelu_source: gelu_value and gelu_slope); arrays are made C-contiguous first,
    each kernel strides over all of them."""

    def __init__(self, gelu_source: str):
        self.module = cp.RawModule(code=SOURCE + gelu_source + _ELEMENTWISE, name_expressions=[
            f"{k}<{t}>" for k in ("gelu_forward16", "bias_gelu_forward16", "residual16")
            for t in ("bf16", "f16")] + [f"gelu_backward16<{t}, {o}>" for t in ("bf16", "f16")
                                         for o in (t, "float")])

    def _run(self, name: str, n: int, args: tuple) -> None:
        blocks = max(1, min(-(-n // 256), 16384))
        self.module.get_function(name)((blocks,), (256,), args)

    def gelu_forward(self, x, tanh_form: bool):
        x = cp.ascontiguousarray(x)
        y = cp.empty_like(x)
        self._run(f"gelu_forward16<{ctype(x.dtype)}>", x.size,
                  (x, y, cp.int64(x.size), cp.int32(tanh_form)))
        return y

    def gelu_backward(self, x, dy, tanh_form: bool, out_dtype):
        x, dy = cp.ascontiguousarray(x), cp.ascontiguousarray(dy)
        dx = cp.empty(dy.shape, out_dtype)
        self._run(f"gelu_backward16<{ctype(x.dtype)}, {ctype(out_dtype)}>", x.size,
                  (x, dy, dx, cp.int64(x.size), cp.int32(tanh_form)))
        return dx

    def bias_gelu_forward(self, f, b, tanh_form: bool):
        if not f.flags.c_contiguous:
            raise ValueError("bias_gelu_forward adds the bias in place to a C-contiguous array")
        y = cp.empty_like(f)
        b = cp.ascontiguousarray(b)
        self._run(f"bias_gelu_forward16<{ctype(f.dtype)}>", f.size,
                  (f, b, y, cp.int64(f.size), cp.int32(b.size), cp.int32(tanh_form)))
        return y

    def residual(self, x, branch):
        x, branch = cp.ascontiguousarray(x), cp.ascontiguousarray(branch)
        out = cp.empty_like(x)
        self._run(f"residual16<{ctype(x.dtype)}>", x.size,
                  (x, branch, out, cp.int64(x.size)))
        return out


_NARROW_BF16 = cp.ElementwiseKernel(
    "uint32 u", "uint16 b",
    """
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) b = (unsigned short)((u >> 16) | 0x40u);
    else b = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    """, "refgpt_narrow_bf16")

_WIDEN_BF16 = cp.ElementwiseKernel("uint16 b", "uint32 u", "u = ((unsigned int)b) << 16;",
                                   "refgpt_widen_bf16")


def is_half(a) -> bool:
    """Whether a is an array of a 16-bit float type (ml_dtypes' bfloat16 has kind V)."""
    return hasattr(a, "dtype") and a.dtype.itemsize == 2 and a.dtype.kind in "fV"


def widen(x):
    """A C-contiguous float32 array of x's values (x 16-bit)."""
    if x.dtype.kind == "f":                                         # float16
        return cp.ascontiguousarray(x, dtype=cp.float32)
    out = cp.empty(x.shape, cp.float32)
    _WIDEN_BF16(x.view(cp.uint16), out.view(cp.uint32))
    return out


def narrow(y, dtype, out=None):
    """float32 y rounded to the 16-bit dtype, into out when given (then returned)."""
    out = cp.empty(y.shape, dtype) if out is None else out
    if out.dtype.kind == "f":                                       # float16
        out[...] = y
    else:
        _NARROW_BF16(cp.asarray(y, dtype=cp.float32).view(cp.uint32), out.view(cp.uint16))
    return out
