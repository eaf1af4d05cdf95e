"""Fast kernels, installed as ``refgpt.kernels``: Numba kernels for CPUs and CuPy kernels for
GPUs, each tested against the readable NumPy layers in :mod:`refgpt.nn`.

No kernel has landed yet: the NumPy path is the only backend (the Numba and CuPy backends are
issue #8).
"""
