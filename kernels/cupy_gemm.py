"""The layers' GEMMs in 16 bits on the GPU's tensor cores: the ``cupy`` backend's matmul and
add_matmul (references in refgpt.nn.linear).

cuBLAS's cublasGemmEx takes bfloat16 or float16 operands, multiplies them on the tensor
cores and sums the products in fp32 (CUBLAS_COMPUTE_32F), then writes C in the type asked:
16 bits (rounded once: the reference's narrow(wide(a) @ wide(b))) or fp32. So

    matmul         y = a b (+ bias): with a bias, C in fp32, the bias added, then one rounding
                   (as the reference); without, C rounded by cuBLAS; rounded=False: fp32
    add_matmul     c += a b with an fp32 c (the gradient buffer): beta = 1, nothing rounded

float32 and float64 operands are declined (NotImplemented): the reference's ``@`` on CuPy
arrays is already cuBLAS's sgemm or dgemm.

cuBLAS is column-major: a row-major C = A B is the column-major C^T = B^T A^T, so the
operands go in swapped; a row-major operand is its own transpose to cuBLAS (op N), a
column-major one (a transposed view, such as W^T or x^T) is op T.
"""

from __future__ import annotations

import cupy as cp
import numpy as np
from cupy_backends.cuda.libs import cublas

from .cupy_half import is_half, narrow, widen

CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14        # cudaDataType
COMPUTE_32F = 68                                      # cublasComputeType_t: fp32 sums
GEMM_DEFAULT = -1                                     # cuBLAS picks the (tensor-core) kernel


def cuda_type(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return CUDA_R_32F
    return CUDA_R_16F if dtype.kind == "f" else CUDA_R_16BF


def _operand(x):
    """2-D x as cuBLAS sees it: (array, op, leading dimension) of x^T in column-major."""
    if x.flags.c_contiguous:
        return x, cublas.CUBLAS_OP_N, max(1, x.shape[1])
    if x.flags.f_contiguous:
        return x, cublas.CUBLAS_OP_T, max(1, x.shape[0])
    x = cp.ascontiguousarray(x)
    return x, cublas.CUBLAS_OP_N, max(1, x.shape[1])


def gemm(a, b, c, beta: float = 0.0) -> None:
    """c = a b + beta c for 2-D a [M, K], b [K, N] (16-bit, the same type) and C-contiguous
    c [M, N] (16-bit or fp32), the products summed in fp32."""
    (M, K), N = a.shape, b.shape[1]
    a, op_a, lda = _operand(a)
    b, op_b, ldb = _operand(b)
    one, zero = np.array(1.0, np.float32), np.array(beta, np.float32)
    cublas.gemmEx(cp.cuda.device.get_cublas_handle(), op_b, op_a, N, M, K, one.ctypes.data,
                  b.data.ptr, cuda_type(b.dtype), ldb, a.data.ptr, cuda_type(a.dtype), lda,
                  zero.ctypes.data, c.data.ptr, cuda_type(c.dtype), max(1, N), COMPUTE_32F,
                  GEMM_DEFAULT)


def matmul(a, b, bias=None, rounded=True):
    if not (is_half(a) and a.dtype == b.dtype and a.ndim == b.ndim == 2):
        return NotImplemented
    fp32 = bias is not None or not rounded
    y = cp.empty((a.shape[0], b.shape[1]), cp.float32 if fp32 else a.dtype)
    gemm(a, b, y)
    if bias is not None:
        y += widen(bias)
    return narrow(y, a.dtype) if fp32 and rounded else y


def add_matmul(c, a, b):
    if not (is_half(a) and a.dtype == b.dtype and c.dtype == np.float32
            and c.flags.c_contiguous and a.ndim == b.ndim == 2):
        return NotImplemented
    gemm(a, b, c, beta=1.0)
