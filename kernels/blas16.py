"""16-bit GEMMs with fp32 accumulation, where this machine's BLAS has one, found at import:

    C (fp32) = alpha op(A) op(B) + beta C        A, B: bfloat16 or float16, as 16-bit words

    MKL       cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32 (the ``mkl`` wheel: libmkl_rt in
              the environment's lib folder): AVX512-BF16 and AMX-BF16 units on Intel CPUs
              (2.1-2.7x the sgemm with AMX); elsewhere MKL's own emulation, so it is taken by
              default on Intel CPUs only (on an AMD Zen 4 the fallback beat it: 167-180
              against 114-150 GFLOP/s, docs/mixed-precision.md)
    OpenBLAS  cblas_sbgemm (bfloat16), in builds made with BUILD_BFLOAT16, such as the
              OpenBLAS of some Linux distributions (NumPy's own does not export it)

Each is a CBLAS call of the same shape as cblas_sgemm, so the numba backend tiles it over its
threads exactly as it tiles sgemm (refgpt.kernels.numba_gemm). Where none is found, 16-bit
GEMMs take the documented fallback (refgpt.kernels.numba_gemm): the 16-bit values widened to
fp32 and multiplied by the fp32 GEMM (the same memory and communication savings, fp32's
speed). REFGPT_BLAS16 chooses one: ``mkl`` (on any CPU), ``openblas`` (where found) or
``none`` (to measure the fallback).

MKL runs sequentially here (its own threads would compete with numba's, which call it one
tile each), and with 32-bit integers (LP64).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

MKL_SEQUENTIAL, MKL_LP64 = 1, 0                        # mkl_service.h's enum values


def _signature(index=ctypes.c_int):
    args = [ctypes.c_int] * 3 + [index] * 3 + [ctypes.c_float, ctypes.c_void_p, index,
                                               ctypes.c_void_p, index, ctypes.c_float,
                                               ctypes.c_void_p, index]
    return ctypes.CFUNCTYPE(None, *args)


def _function(lib, name, index=ctypes.c_int):
    """The C function as a ctypes function pointer numba can call, or None."""
    fn = getattr(lib, name, None)
    return None if fn is None else _signature(index)(ctypes.cast(fn, ctypes.c_void_p).value)


def _intel_cpu() -> bool:
    """Whether this CPU is Intel's (the one MKL runs its bf16 and AMX code paths on)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any("GenuineIntel" in line for line in info if line.startswith("vendor_id"))
    except OSError:
        return False


def _mkl():
    """(library name, {dtype name: gemm}) from MKL's single dynamic library, or None."""
    folders = [Path(sys.prefix) / "lib", *(Path(p) for p in
                                         os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)]
    for folder in folders:
        for path in sorted(folder.glob("libmkl_rt.so*")):
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            lib.MKL_Set_Threading_Layer(MKL_SEQUENTIAL)
            lib.MKL_Set_Interface_Layer(MKL_LP64)
            found = {"bfloat16": _function(lib, "cblas_gemm_bf16bf16f32"),
                     "float16": _function(lib, "cblas_gemm_f16f16f32")}
            found = {k: v for k, v in found.items() if v is not None}
            if found:
                return f"MKL ({path.name})", found
    return None


def _openblas_sbgemm():
    """("OpenBLAS", {"bfloat16": sbgemm}) from an OpenBLAS already loaded that exports it."""
    from threadpoolctl import ThreadpoolController
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        handle = ctypes.CDLL(lib.filepath)
        for name, index in (("cblas_sbgemm", ctypes.c_int), ("cblas_sbgemm64_", ctypes.c_int64),
                            ("scipy_cblas_sbgemm64_", ctypes.c_int64)):
            fn = _function(handle, name, index)
            if fn is not None:
                return f"OpenBLAS ({Path(lib.filepath).name})", {"bfloat16": fn}
    return None


def find(choice: str | None = None) -> tuple[str, dict]:
    """(where the 16-bit GEMMs come from, {dtype name: cblas function}); ("none ...", {}).
    choice: REFGPT_BLAS16's value (module docstring); by default MKL on an Intel CPU, else
    OpenBLAS."""
    choice = (choice or "").lower()
    if choice == "none":
        return "none (REFGPT_BLAS16=none)", {}
    mkl = choice == "mkl" or (choice == "" and _intel_cpu())
    found = ((_mkl() if mkl else None)
             or (_openblas_sbgemm() if choice in ("", "openblas") else None))
    return found or ("none (the fallback: widened to fp32, the fp32 GEMM)", {})


SOURCE, GEMM16 = find(os.environ.get("REFGPT_BLAS16"))


def gemm_for(dtype) -> object | None:
    """The 16-bit GEMM for arrays of this dtype, or None."""
    return GEMM16.get(np.dtype(dtype).name)
