"""Compute backends: which implementation runs each kernel of the model.

The model's math is written once, in NumPy, in refgpt.nn: every piece that a faster backend
may replace (a fused element-wise pass, the attention's batched products, the AdamW update)
is a plain function marked ``@kernel`` next to the layer that calls it. A backend is a table
{function name: implementation}; ``set_backend`` makes it current for the whole process:

    numpy   the readable reference (the @kernel functions themselves)
    numba   fused, parallel CPU kernels from refgpt.kernels.numba_cpu, each tested against
            its reference in float64 and float32 (tests/test_kernels.py)
    cupy    the same model on an NVIDIA GPU: arrays are CuPy arrays (``array_module``), the
            references run on them through NumPy's dispatch (__array_ufunc__,
            __array_function__; GEMMs go to cuBLAS), and refgpt.kernels.cupy_gpu replaces the
            kernels that need it (fused element-wise kernels, and those that build index or
            mask arrays). Ranks use GPU (rank mod GPUs per node); every parallel layout
            (data, 1-D and 2-D tensor, pipeline, ZeRO) runs its collectives through the host
            (MPI is not assumed to read GPU memory).

A kernel the backend does not provide falls back to the reference, so a backend may be
partial; ``kernel_names(backend)`` lists what it replaces.
"""

from __future__ import annotations

import functools

BACKENDS = ("numpy", "numba", "cupy")
_reference: dict = {}
_active: dict = {}
_current = "numpy"
_xp = None                                       # cupy under the cupy backend, else numpy


def kernel(fn):
    """Mark fn as the reference of a replaceable kernel (called through the current backend)."""
    name = fn.__name__
    _reference[name] = fn

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        return _active.get(name, fn)(*args, **kwargs)
    dispatch.reference = fn
    return dispatch


def _table(name: str) -> dict:
    if name == "numpy":
        return {}
    if name == "numba":
        from .kernels import numba_cpu
        return numba_cpu.KERNELS
    if name == "cupy":
        from .kernels import cupy_gpu
        return cupy_gpu.KERNELS
    raise ValueError(f"--backend must be one of {BACKENDS}, got {name!r}")


def set_backend(name: str) -> None:
    global _current
    from . import nn, optim  # noqa: F401  (importing them registers every reference)
    from .parallel import shared  # noqa: F401
    table = _table(name)
    unknown = set(table) - set(_reference)
    if unknown:
        raise RuntimeError(f"backend {name} provides kernels with no reference: {sorted(unknown)}")
    _active.clear()
    _active.update(table)
    _current = name
    global _xp
    if name == "cupy":
        import cupy
        _xp = cupy
    else:
        _xp = None


def current() -> str:
    return _current


def reference(name: str):
    """The NumPy reference of a kernel."""
    from . import nn, optim  # noqa: F401
    from .parallel import shared  # noqa: F401
    return _reference[name]


def kernel_names(name: str) -> list[str]:
    return sorted(_table(name))


def array_module():
    """The module that creates arrays: numpy, or cupy under the cupy backend."""
    if _xp is None:
        import numpy
        return numpy
    return _xp


def to_device(a):
    """a as an array of the current backend (a no-op for numpy)."""
    return a if _xp is None else _xp.asarray(a)


def to_host(a):
    """a as a NumPy array (copies a GPU array to the host)."""
    return a.get() if hasattr(a, "get") else a


def synchronize() -> None:
    """Wait for the GPU's queued work (before timing it, or before MPI reads its memory)."""
    if _xp is not None:
        _xp.cuda.get_current_stream().synchronize()


def use_gpu(rank: int) -> None:
    """Under the cupy backend, rank r of a node's ranks uses GPU r mod (GPUs on the node)."""
    if _xp is not None:
        _xp.cuda.Device(rank % _xp.cuda.runtime.getDeviceCount()).use()
