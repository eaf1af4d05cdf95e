"""Attention's batched products for the numba backend: GEMMs that skip the causal mask's zeros.

Per head, attention multiplies by T x Tk matrices that are zero past the causal boundary
(row i, the query at position p0 + i, sees keys j <= p0 + i; p0 = Tk - T is the KV-cache
offset): the scores S = q k^T and their gradient dP~ = dO v^T are only needed there, and P, its
dropout and dS are zero beyond it. Cut the rows into blocks of ``block`` queries [i0, i1):
block r sees keys [0, j1) with j1 = min(Tk, p0 + i1), and key block [j0, j1) is seen by
queries [i, T) with i = max(0, j0 - p0). Each block is then one GEMM over its visible part:

    nt:  S[i0:i1, :j1]  = scale a[i0:i1] b[:j1]^T      (the rest of S set to zero)
    nn:  O[i0:i1]       = scale P[i0:i1, :j1] v[:j1]
    tn:  dv[j0:j1]      = scale P[i:, j0:j1]^T x[i:]

With n blocks per sequence that is (n + 1) / 2n of the full products' FLOPs (62% at n = 4,
53% at n = 16). The blocks' GEMMs are calls to the CBLAS sgemm/dgemm of the BLAS that NumPy
links (passed to the kernels as first-class functions; where none is found, the backend
leaves these three products to the references). Calling NumPy's own BLAS matters: the
OpenBLAS that SciPy bundles ran these block shapes several times slower. The calls read
strided views (q, k and v where c_attn's output holds them, one row of 3C per token) and
write strided views (O with its heads already merged), so no operand is copied. The (batch, head, block) triples run in parallel on numba's threads;
BLAS is limited to one thread while they run (OneBlasThread, restored after), so the cores
are not oversubscribed.

The block size is the tile parameter. Smaller blocks skip more of the masked FLOPs; larger
ones make GEMMs long enough for BLAS to run near its peak. Measured with
``benchmarks/attention_blocks.py``, the fastest block grew with the sequence: about T / 8, but
not below a smallest block that depends on the CPU (16 on the AVX2 development machine, 32 on
an AVX-512 Xeon; between neighbouring blocks the gaps were within the machines' run-to-run
noise, see benchmarks/README.md). ``PRESETS`` holds (smallest block, blocks per sequence)
per CPU family, picked from the CPU Numba compiles for (``numba_target``).
REFGPT_ATTENTION_BLOCK overrides it with a preset's name, or with one block size for every
length.

16-bit operands go to the BLAS's 16-bit GEMM where it has one (refgpt.kernels.blas16), blocks
as above, each product summed in fp32; without one they are widened to float32
(refgpt.kernels.numba_half). Either way the scores of causal_matmul_nt stay fp32, and the
products of causal_matmul_nn and _tn are rounded once to the 16-bit type, as the references
do.
"""

from __future__ import annotations

import ctypes
import os

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from .blas16 import gemm_for
from .numba_half import is_half, narrow, widen

PRESETS = {            # CPU family: (smallest block, blocks per sequence)
    "avx2": (16, 8),
    "avx512": (32, 8),
    "a64fx": (32, 8),  # not measured (no A64FX was at hand): AVX-512's, the same vector width
}


def numba_target() -> tuple[str, dict[str, bool]]:
    """The CPU Numba compiles for and its features: NUMBA_CPU_NAME and NUMBA_CPU_FEATURES where
    set, else what LLVM reads off this machine. LLVM reads /proc/cpuinfo, which an emulator
    may not fake: under qemu-user, which passes the host's through, an emulated A64FX reads as
    a "generic" aarch64 with no features, so Numba would compile without SVE unless the
    environment names the target (docs/a64fx.md)."""
    name = numba.config.CPU_NAME
    if not name or name == "host":
        name = llvm.get_host_cpu_name()
    if numba.config.CPU_FEATURES is None:
        return name, dict(llvm.get_host_cpu_features())
    return name, {f[1:]: f[0] == "+" for f in numba.config.CPU_FEATURES.split(",") if f}


def host_preset() -> str:
    """The preset for the CPU Numba compiles for: a64fx for Fujitsu's A64FX, avx512 for x86
    with AVX-512F, and avx2 otherwise (the development machine's)."""
    name, features = numba_target()
    if name == "a64fx":
        return "a64fx"
    return "avx512" if features.get("avx512f") else "avx2"


def tiling(setting: str | None = None) -> tuple[str, int | None]:
    """(preset, fixed block or None) for REFGPT_ATTENTION_BLOCK's value: a preset's name, a
    positive integer (that block at every length), or None (this CPU's preset)."""
    if setting is None or setting in PRESETS:
        return setting or host_preset(), None
    if setting.isdigit() and int(setting) > 0:
        return host_preset(), int(setting)
    raise ValueError(f"REFGPT_ATTENTION_BLOCK must be one of {sorted(PRESETS)} or a positive "
                     f"integer, got {setting!r}")


PRESET, BLOCK = tiling(os.environ.get("REFGPT_ATTENTION_BLOCK"))


def block_for(T: int) -> int:
    """The block of queries (or keys) for sequences of length T."""
    smallest, per_sequence = PRESETS[PRESET]
    return BLOCK or max(smallest, T // per_sequence)


FLAGS = dict(parallel=True, cache=True, nogil=True)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112                      # CBLAS's enum values


def _find_cblas(blas):
    """{dtype: cblas_?gemm} from NumPy's BLAS (threadpoolctl reports where it is loaded from;
    NumPy's own wheels bundle an ILP64 OpenBLAS whose symbols carry a suffix), or None."""
    libs = sorted((lib.filepath for lib in blas.lib_controllers),
                  key=lambda path: "numpy" not in path)
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix, suffix, index in (("scipy_cblas_", "64_", ctypes.c_int64),
                                      ("cblas_", "64_", ctypes.c_int64),
                                      ("scipy_cblas_", "", ctypes.c_int), ("cblas_", "", ctypes.c_int)):
            if all(hasattr(lib, f"{prefix}{t}gemm{suffix}") for t in "sd"):
                found = {}
                for t, dtype, real in (("s", np.float32, ctypes.c_float), ("d", np.float64, ctypes.c_double)):
                    fn = getattr(lib, f"{prefix}{t}gemm{suffix}")
                    args = [ctypes.c_int] * 3 + [index] * 3 + [real, ctypes.c_void_p, index,
                                                               ctypes.c_void_p, index, real,
                                                               ctypes.c_void_p, index]
                    found[np.dtype(dtype)] = ctypes.CFUNCTYPE(None, *args)(ctypes.cast(fn, ctypes.c_void_p).value)
                return found
    return None


BLAS = ThreadpoolController().select(user_api="blas")      # the BLAS libraries loaded here
GEMM = _find_cblas(BLAS)


class OneBlasThread:
    """BLAS on one thread while numba's threads each call it (restored after), through
    threadpoolctl's library controllers' get and set: its limit() does the same at several
    times the cost, at a hundred calls a step."""

    def __enter__(self):
        self.saved = [(lib, lib.get_num_threads()) for lib in BLAS.lib_controllers]
        for lib, n in self.saved:
            if n != 1:
                lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, n in self.saved:
            if n != 1:
                lib.set_num_threads(n)


@njit(inline="always")
def _gemm(gemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc):
    """Row-major c[m, n] = alpha op(a) op(b), where op transposes when ta / tb; a, b, c are
    views whose first element starts the matrix and whose row stride is lda, ldb, ldc."""
    gemm(ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, m, n, k, alpha,
         a.ctypes, lda, b.ctypes, ldb, 0.0, c.ctypes, ldc)


@njit(inline="always")
def _ld(x):
    """The row stride of the matrices x[n, h] in elements (BLAS's leading dimension)."""
    return x.strides[2] // x.itemsize


@njit(inline="always")
def _task(w, H, nb):
    """Task w of the prange: (batch, head, block)."""
    return w // (H * nb), (w // nb) % H, w % nb


@njit(**FLAGS)
def _nt(gemm, a, b, out, scale, block):
    B, H, T, _ = a.shape
    Tk, D, p0 = b.shape[2], a.shape[3], b.shape[2] - a.shape[2]
    nb = (T + block - 1) // block
    lda, ldb, ldc = _ld(a), _ld(b), _ld(out)
    for w in prange(B * H * nb):
        n, h, r = _task(w, H, nb)
        i0, i1 = r * block, min(T, r * block + block)
        j1 = min(Tk, p0 + i1)
        _gemm(gemm, False, True, i1 - i0, j1, D, scale, a[n, h, i0:], lda, b[n, h], ldb,
              out[n, h, i0:], ldc)
        for i in range(i0, i1):
            for j in range(p0 + i + 1, Tk):
                out[n, h, i, j] = 0.0


@njit(**FLAGS)
def _nn(gemm, p, v, out, scale, block):
    B, H, T, Tk = p.shape
    D, p0 = v.shape[3], Tk - T
    nb = (T + block - 1) // block
    lda, ldb, ldc = _ld(p), _ld(v), _ld(out)
    for w in prange(B * H * nb):
        n, h, r = _task(w, H, nb)
        i0, i1 = r * block, min(T, r * block + block)
        _gemm(gemm, False, False, i1 - i0, D, min(Tk, p0 + i1), scale, p[n, h, i0:], lda,
              v[n, h], ldb, out[n, h, i0:], ldc)


@njit(**FLAGS)
def _tn(gemm, p, x, out, scale, block):
    B, H, T, Tk = p.shape
    D, p0 = x.shape[3], Tk - T
    nb = (Tk + block - 1) // block
    lda, ldb, ldc = _ld(p), _ld(x), _ld(out)
    for w in prange(B * H * nb):
        n, h, r = _task(w, H, nb)
        j0, j1 = r * block, min(Tk, r * block + block)
        i = max(0, j0 - p0)                                        # the first query seeing j0
        _gemm(gemm, True, False, j1 - j0, D, T - i, scale, p[n, h, i:, j0:], lda,
              x[n, h, i:], ldb, out[n, h, j0:], ldc)


def _rows(*arrays):
    """The kernels take [B, H, rows, columns] and pass row strides to BLAS, so each matrix
    row must be contiguous."""
    if any(a.ndim != 4 for a in arrays):
        raise ValueError(f"numba's causal products take [B, H, T, D] arrays, got shapes "
                         f"{[a.shape for a in arrays]}")
    return tuple(a if _blas_rows(a) else np.ascontiguousarray(a) for a in arrays)


def blas_operand(a):
    """(CBLAS transpose flag, leading dimension) of the matrices in a's last two axes when
    their rows (or columns) are contiguous with a stride BLAS can take, or None (a length-1
    axis may carry any stride, which BLAS cannot take as a leading dimension)."""
    n, (rows, cols), (row_stride, col_stride) = a.itemsize, a.shape[-2:], a.strides[-2:]
    if col_stride == n and row_stride >= n * max(1, cols) and row_stride % n == 0:
        return NO_TRANS, row_stride // n
    if row_stride == n and col_stride >= n * max(1, rows) and col_stride % n == 0:
        return TRANS, col_stride // n
    return None


def _blas_rows(a):
    """Whether BLAS can take a's matrices as they are, row by row (as the kernels pass them)."""
    layout = blas_operand(a)
    return layout is not None and layout[0] == NO_TRANS


def _merged(B, H, T, D, dtype):
    """An output [B, H, T, D] laid out as [B, T, H, D] (heads merged, as c_proj reads it)."""
    return np.empty((B, T, H, D), dtype).transpose(0, 2, 1, 3)


def _gemm16(x, y):
    """The BLAS's 16-bit GEMM (refgpt.kernels.blas16) when x and y are both 16-bit of one
    type and it has one, else None."""
    return gemm_for(x.dtype) if is_half(x) and x.dtype == y.dtype else None


def causal_matmul_nt(a, b, scale=1.0):
    gemm16 = _gemm16(a, b)
    if gemm16 is not None:                      # 16 bits: the scores in fp32, from the
        a, b = _rows(a, b)                      # 16-bit GEMM on the words as they are
        out = np.empty((*a.shape[:-1], b.shape[-2]), np.float32)
        with OneBlasThread():
            _nt(gemm16, a.view(np.uint16), b.view(np.uint16), out, scale, block_for(a.shape[2]))
        return out
    if is_half(a):                              # 16 bits: the scores in fp32
        return causal_matmul_nt(widen(a), widen(b), scale)
    if GEMM is None:                            # NumPy's BLAS exposes no CBLAS
        return NotImplemented
    a, b = _rows(a, b)
    out = np.empty((*a.shape[:-1], b.shape[-2]), a.dtype)
    with OneBlasThread():
        _nt(GEMM[a.dtype], a, b, out, scale, block_for(a.shape[2]))
    return out


def _into(out, shape, dtype):
    """Where a product goes: out when its rows are contiguous (BLAS writes it as it is),
    else a new array in the heads-merged layout (copied into out after, when given)."""
    if out is not None and _blas_rows(out):
        return out
    return _merged(*shape, dtype)


def causal_matmul_nn(p, v, scale=1.0, out=None):
    gemm16 = _gemm16(p, v)
    if gemm16 is not None:                      # 16 bits: summed in fp32, rounded once
        p, v = _rows(p, v)
        res = _merged(*p.shape[:3], v.shape[-1], np.float32)
        with OneBlasThread():
            _nn(gemm16, p.view(np.uint16), v.view(np.uint16), res, scale, block_for(p.shape[2]))
        return narrow(res, v.dtype, out=out)
    if is_half(v):                              # 16 bits: in fp32, rounded once to v's type
        res = causal_matmul_nn(widen(p) if is_half(p) else p, widen(v), scale)
        return res if res is NotImplemented else narrow(res, v.dtype, out=out)
    if GEMM is None:                            # NumPy's BLAS exposes no CBLAS
        return NotImplemented
    p, v = _rows(p, v)
    dest = _into(out, (*p.shape[:3], v.shape[-1]), p.dtype)
    with OneBlasThread():
        _nn(GEMM[p.dtype], p, v, dest, scale, block_for(p.shape[2]))
    return _copied(dest, out)


def causal_matmul_tn(p, x, scale=1.0, out=None):
    gemm16 = _gemm16(p, x)
    if gemm16 is not None:                      # 16 bits: summed in fp32, rounded once
        p, x = _rows(p, x)
        res = _merged(*p.shape[:2], p.shape[-1], x.shape[-1], np.float32)
        with OneBlasThread():
            _tn(gemm16, p.view(np.uint16), x.view(np.uint16), res, scale, block_for(p.shape[3]))
        return narrow(res, x.dtype, out=out)
    if is_half(x):                              # 16 bits: in fp32, rounded once to x's type
        res = causal_matmul_tn(widen(p) if is_half(p) else p, widen(x), scale)
        return res if res is NotImplemented else narrow(res, x.dtype, out=out)
    if GEMM is None:                            # NumPy's BLAS exposes no CBLAS
        return NotImplemented
    p, x = _rows(p, x)
    dest = _into(out, (*p.shape[:2], p.shape[-1], x.shape[-1]), p.dtype)
    with OneBlasThread():
        _tn(GEMM[p.dtype], p, x, dest, scale, block_for(p.shape[3]))
    return _copied(dest, out)


def _copied(dest, out):
    if out is None or out is dest:
        return dest
    out[...] = dest
    return out
