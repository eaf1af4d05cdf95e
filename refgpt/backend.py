"""Compute backends: which implementation runs each kernel of the model.

The model's math is written once, in NumPy, in refgpt.nn: every piece that a faster backend
may replace (a fused element-wise pass, the attention's batched products, the AdamW update)
is a plain function marked ``@kernel(...)`` next to the layer that calls it. The decorator
names, per backend, the module of refgpt.kernels that holds a function of the same name and
contract:

    numpy   the readable reference (the @kernel functions themselves)
    numba   fused, parallel CPU kernels (refgpt.kernels.numba_*), each tested against its
            reference in float64 and float32 (tests/test_kernels.py)
    cupy    the same model on an NVIDIA GPU: arrays are CuPy arrays (``array_module``), the
            references run on them through NumPy's dispatch (__array_ufunc__,
            __array_function__; GEMMs go to cuBLAS), and refgpt.kernels.cupy_* replace the
            kernels that need it (fused element-wise kernels, those that build index or mask
            arrays, flash-style attention). Ranks use GPU (rank mod GPUs per node); every
            parallel layout runs its collectives through the host (MPI is not assumed to read
            GPU memory).

A kernel the backend does not name falls back to the reference, and so does a call that an
implementation declines by returning NotImplemented (a shape or a case it does not cover),
so a backend may be partial. 16-bit arrays (refgpt.precision) go to an implementation only
where the decorator lists its backend in ``half``; elsewhere the reference computes them. refgpt.kernels imports nothing from refgpt: the table of what
replaces what lives here, in the decorators, beside the references.

The backend in use is a context, as decimal's local contexts are: inside ``with
Backend("numba"):`` every @kernel call runs numba's implementation, and the previous backend
returns on exit; outside any ``with`` the references run. So nothing has to be reset, and
two models with different backends can run in one process (the tests compare them so).
Options are arguments: ``Backend("cupy", fused_attention=False)`` keeps the cuBLAS attention
path; ``Backend("cupy", tf32=True)`` lets cuBLAS run float32 GEMMs on the tensor cores in
TF32 (inputs rounded to 10 mantissa bits, sums in fp32: ``--tf32``, as PyTorch's
allow_tf32); ``instrument`` wraps every kernel call (a profiler's hook).
"""

from __future__ import annotations

import functools
import importlib
from contextvars import ContextVar

import numpy as np

from .config import BACKENDS
from .precision import is_half

_current: ContextVar = ContextVar("refgpt_backend", default=None)

# kernels whose cupy implementation is the fused attention (Backend(fused_attention=False)
# leaves them to the references, which run the cuBLAS products)
FUSED_ATTENTION = ("attention_forward", "attention_backward", "attention_block_forward",
                   "attention_block_backward")


def kernel(half: tuple = (), **implementations):
    """Mark a function as the reference of a replaceable kernel. implementations: backend name
    -> module of refgpt.kernels holding the replacement under the function's own name; half:
    the backends whose implementation also takes 16-bit arrays."""
    unknown = (set(implementations) | set(half)) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}")

    def mark(fn):
        @functools.wraps(fn)
        def dispatch(*args, **kwargs):
            backend = _current.get()
            return (fn if backend is None else backend.resolve(dispatch))(*args, **kwargs)
        dispatch.reference = fn
        dispatch.implementations = implementations
        dispatch.half = half
        return dispatch
    return mark


def kernels_in(*modules) -> dict:
    """{name: kernel} of every @kernel function defined in the given modules."""
    return {name: f for m in modules for name, f in vars(m).items()
            if callable(f) and hasattr(f, "implementations")}


class Backend:
    """A backend by name, with its options; ``with backend:`` makes it the current one."""

    def __init__(self, name: str = "numpy", fused_attention: bool = True, instrument=None,
                 tf32: bool = False):
        """instrument(name, fn) -> fn: wraps every kernel as it is resolved (timing)."""
        if name not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {name!r}")
        if tf32 and name != "cupy":
            raise ValueError("tf32 is a GPU's mode: Backend('cupy', tf32=True)")
        self.name, self.fused_attention, self.instrument = name, fused_attention, instrument
        self.tf32 = tf32
        self._xp = np if name != "cupy" else None
        if name == "numba":                  # before numba starts a pool: refgpt.kernels
            from .kernels import select_thread_pool
            select_thread_pool()
        self._resolved: dict = {}
        self._tokens: list = []

    @property
    def xp(self):
        """The array module: numpy, or cupy (imported when first needed)."""
        if self._xp is None:
            import cupy
            self._xp = cupy
        return self._xp

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def __enter__(self) -> "Backend":
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._tokens.pop())

    def replaces(self, kern) -> bool:
        """Whether this backend runs its own implementation of kern."""
        if self.name == "cupy" and not self.fused_attention and kern.__name__ in FUSED_ATTENTION:
            return False
        return self.name in kern.implementations

    def implementation(self, kern):
        """This backend's own function for kern (which may decline a call), or None."""
        if not self.replaces(kern):
            return None
        module = importlib.import_module(f"refgpt.kernels.{kern.implementations[self.name]}")
        return getattr(module, kern.__name__)

    def resolve(self, kern):
        """The function that runs kern here: the implementation, falling back to the
        reference where there is none or where it declines (looked up once per backend)."""
        fn = self._resolved.get(kern)
        if fn is None:
            impl = self.implementation(kern)
            fn = (kern.reference if impl is None else
                  _with_fallback(impl, kern.reference, self.name in kern.half))
            if self.instrument is not None:
                fn = self.instrument(kern.__name__, fn)
            self._resolved[kern] = fn
        return fn

    def use_gpu(self, rank: int) -> None:
        """Under cupy, rank r of a node's ranks uses GPU r mod (GPUs on the node); with tf32,
        its cuBLAS handle may run float32 GEMMs in TF32 (CUBLAS_TF32_TENSOR_OP_MATH)."""
        if self.name == "cupy":
            self.xp.cuda.Device(rank % self.xp.cuda.runtime.getDeviceCount()).use()
            from cupy_backends.cuda.libs import cublas
            mode = 3 if self.tf32 else 0     # CUBLAS_TF32_TENSOR_OP_MATH, CUBLAS_DEFAULT_MATH
            cublas.setMathMode(self.xp.cuda.device.get_cublas_handle(), mode)


def _with_fallback(impl, reference, half: bool):
    """impl, or the reference where impl returns NotImplemented or (unless half) is given a
    16-bit array."""
    def half_array(a) -> bool:
        return hasattr(a, "dtype") and is_half(a.dtype)

    @functools.wraps(impl)
    def call(*args, **kwargs):
        if not half and any(half_array(a) for a in (*args, *kwargs.values())):
            return reference(*args, **kwargs)
        out = impl(*args, **kwargs)
        return reference(*args, **kwargs) if out is NotImplemented else out
    return call



def current() -> Backend | None:
    """The backend of the enclosing ``with``, or None (the references)."""
    return _current.get()


def array_module():
    """The module that creates arrays: numpy, or cupy under the cupy backend."""
    backend = _current.get()
    return np if backend is None else backend.xp


def to_device(a):
    """a as an array of the current backend (a no-op for numpy)."""
    xp = array_module()
    return a if xp is np else xp.asarray(a)


def to_host(a):
    """a as a NumPy array (copies a GPU array to the host)."""
    return a.get() if hasattr(a, "get") else a


def synchronize() -> None:
    """Wait for the GPU's queued work (before timing it, or before MPI reads its memory)."""
    xp = array_module()
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
