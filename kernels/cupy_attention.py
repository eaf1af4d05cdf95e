"""Attention's causal products on the GPU: cuBLAS calls on blocks of rows that skip the part
of each T x Tk matrix the causal mask hides (the ``cupy`` backend's causal_matmul_nt/_nn/_tn;
the references are in refgpt.nn.attention).

With the rows cut into n blocks, block i of the queries needs the keys up to the end of
block i only, so the three products cost (n + 1) / 2n of the full ones (5/8 for n = 4): one
strided-batched GEMM per block, batched over every (batch, head) pair at once. The GEMMs
write into the full result in place (cuBLAS takes the row pitch and the batch stride), so
nothing is copied; the scores' masked entries are then set to zero by a row kernel that
writes only those. P^T x is computed as (x^T P)^T, which keeps the T x Tk operand
untransposed (cuBLAS ran the transposed form several times slower on an H100).

cuBLAS is column-major: a row-major matrix with row pitch ld is, to cuBLAS, its transpose
with leading dimension ld, so a row-major C = op(A) op(B) is the column-major
C^T = op(B)^T op(A)^T: the same two operations with the operands swapped.

16-bit operands (refgpt.precision) go to cublasGemmStridedBatchedEx, on the tensor cores with
fp32 sums: the scores of causal_matmul_nt in fp32, the products of _nn and _tn rounded once to
the 16-bit type, as the references. The backward's dS is fp32 (as the reference keeps it), so
dS k and dS^T q widen their 16-bit operand and multiply in fp32 (cuBLAS's operands share one
type).
"""

from __future__ import annotations

import cupy as cp
import numpy as np
from cupy_backends.cuda.libs import cublas

from .cupy_gemm import COMPUTE_32F, GEMM_DEFAULT, cuda_type
from .cupy_half import is_half, narrow, widen

BLOCKS = 4                         # blocks of rows by default; 1 computes the full products

_ZERO = cp.RawModule(code=r"""
template <typename T>
__global__ void causal_zero(T* s, int T_, int Tk) {
    T* sr = s + (size_t)blockIdx.x * Tk;
    int last = Tk - T_ + (int)(blockIdx.x % T_);                 // keys 0..last are visible
    for (int j = last + 1 + threadIdx.x; j < Tk; j += blockDim.x) sr[j] = (T)0;
}
""", name_expressions=["causal_zero<float>", "causal_zero<double>"])
CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}   # dtype: C type


class _Batch:
    """x [..., R, C] as one strided batch of row-major matrices: base pointer, row pitch and
    batch stride in elements (x is copied first when its strides do not allow that)."""

    def __init__(self, x):
        x = x.reshape(-1, *x.shape[-2:])
        if x.strides[-1] != x.itemsize or x.strides[-2] < x.shape[-1] * x.itemsize:
            x = cp.ascontiguousarray(x)
        self.x, self.count, self.size = x, x.shape[0], x.itemsize
        self.ld, self.stride = x.strides[1] // x.itemsize, x.strides[0] // x.itemsize

    def at(self, row: int, col: int = 0) -> int:
        return self.x.data.ptr + (row * self.ld + col) * self.size


def _gemm(ta: bool, tb: bool, m: int, n: int, k: int, alpha: float, a: _Batch, a_at: int,
          b: _Batch, b_at: int, c: _Batch, c_at: int) -> None:
    """Row-major c = alpha op(a) op(b), op(a) [m, k] and op(b) [k, n], for every matrix of
    the batch; a_at, b_at, c_at are the matrices' first elements' addresses."""
    op = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}
    handle = cp.cuda.device.get_cublas_handle()
    if is_half(a.x) or is_half(c.x):                            # tensor cores, fp32 sums
        one, zero = np.array(alpha, np.float32), np.array(0, np.float32)
        cublas.gemmStridedBatchedEx(
            handle, op[tb], op[ta], n, m, k, one.ctypes.data,
            b_at, cuda_type(b.x.dtype), b.ld, b.stride, a_at, cuda_type(a.x.dtype), a.ld,
            a.stride, zero.ctypes.data, c_at, cuda_type(c.x.dtype), c.ld, c.stride, c.count,
            COMPUTE_32F, GEMM_DEFAULT)
        return
    dtype = c.x.dtype
    gemm = cublas.sgemmStridedBatched if dtype == np.float32 else cublas.dgemmStridedBatched
    one, zero = np.array(alpha, dtype), np.array(0, dtype)
    gemm(handle, op[tb], op[ta], n, m, k, one.ctypes.data,
         b_at, b.ld, b.stride, a_at, a.ld, a.stride, zero.ctypes.data, c_at, c.ld, c.stride,
         c.count)


def _blocks(n: int, blocks: int):
    size = -(-n // blocks)
    return [(r, min(n, r + size)) for r in range(0, n, size)]


def causal_matmul_nt(a, b, scale=1.0, blocks=BLOCKS):
    """scale a b^T, zero where key j comes after query i; rows of queries in blocks."""
    a, b = _one_type(a, b)
    T, D, Tk = a.shape[-2], a.shape[-1], b.shape[-2]
    s = cp.empty((*a.shape[:-2], T, Tk), cp.float32 if is_half(a) else a.dtype)
    A, B, S = _Batch(a), _Batch(b), _Batch(s)
    for r0, r1 in _blocks(T, blocks):
        kv = min(Tk, r1 + Tk - T)                                # keys the block's rows see
        _gemm(False, True, r1 - r0, kv, D, scale, A, A.at(r0), B, B.at(0), S, S.at(r0))
    kern = _ZERO.get_function(f"causal_zero<{CTYPE[s.dtype]}>")
    kern((s.size // Tk,), (256,), (s, cp.int32(T), cp.int32(Tk)))
    return s


def causal_matmul_nn(p, v, scale=1.0, out=None, blocks=BLOCKS):
    """scale p v for p [..., T, Tk], zero past the causal boundary; rows in blocks. (cuBLAS's
    strided batches take one stride per batch, so a given out is filled by a copy.)"""
    want = v.dtype if out is None else out.dtype
    p, v = _one_type(p, v)
    T, Tk, D = p.shape[-2], p.shape[-1], v.shape[-1]
    res = cp.empty((*p.shape[:-1], D), _result_type(p, want))
    P, V, O = _Batch(p), _Batch(v), _Batch(res)
    for r0, r1 in _blocks(T, blocks):
        kv = min(Tk, r1 + Tk - T)
        _gemm(False, False, r1 - r0, D, kv, scale, P, P.at(r0), V, V.at(0), O, O.at(r0))
    return _copied(res, out, want)


def causal_matmul_tn(p, x, scale=1.0, out=None, blocks=BLOCKS):
    """scale p^T x as (x^T p)^T for p [..., T, Tk], zero past the causal boundary; the
    result's rows (keys) in blocks, each summed over the queries that see them."""
    want = x.dtype if out is None else out.dtype
    p, x = _one_type(p, x)
    T, Tk, D = p.shape[-2], p.shape[-1], x.shape[-1]
    out_t = cp.empty((*p.shape[:-2], D, Tk), _result_type(p, want))
    P, X, O = _Batch(p), _Batch(x), _Batch(out_t)
    for c0, c1 in _blocks(Tk, blocks):
        r0 = max(0, c0 - (Tk - T))                               # first query that sees c0
        _gemm(True, False, D, c1 - c0, T - r0, scale, X, X.at(r0), P, P.at(r0, c0), O,
              O.at(0, c0))
    return _copied(out_t.swapaxes(-1, -2), out, want)


def _one_type(a, b):
    """a and b in one type (cuBLAS's operands share one): fp32 where one of them is (dS)."""
    if a.dtype == b.dtype:
        return a, b
    return (widen(a) if is_half(a) else a), (widen(b) if is_half(b) else b)


def _result_type(operand, want):
    """The type cuBLAS writes: the wanted type, except fp32 from fp32 operands (cuBLAS does
    not round their products to 16 bits)."""
    return operand.dtype if want.itemsize == 2 and not is_half(operand) else want


def _copied(result, out, want):
    """result where it goes: into out, or as itself; rounded once to want (16 bits) if it
    was computed in fp32."""
    if result.dtype != want:
        return narrow(result, want, out=out)
    if out is None:
        return result
    if is_half(out):                                  # a copy of 16-bit words, bit for bit
        out.view(cp.uint16)[...] = result.view(cp.uint16)
    else:
        out[...] = result
    return out
