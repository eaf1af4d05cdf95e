"""Fast kernels, installed as ``refgpt.kernels``: numba_* hold the Numba kernels of the ``numba``
backend and cupy_* the CuPy kernels of the ``cupy`` backend. Each function has the name and
the contract of a ``@kernel`` reference in refgpt (which names the module that replaces it:
refgpt.backend), is tested against it, and may decline a call by returning NotImplemented.
Nothing here imports refgpt.

The numba backend runs every GEMM of the step on Numba's threads too, with BLAS on one thread
inside each (numba_gemm), so Numba's pool is the only one at work. ``select_thread_pool``
makes that pool OpenMP's, whose threads wait for the next parallel loop by spinning for a
while before they sleep, so a launch is cheap, where the "workqueue" pool, whose threads sleep
at once, must wake them, and a step has a hundred launches. (With two pools, the GEMMs' and
Numba's, spinning against each other, OpenMP was the slower choice; benchmarks/README.md
has the figures.) Two cautions that come with OpenMP: a process that also runs PyTorch should
import torch before Numba starts its pool (in the other order PyTorch's step ran several
times slower in the benchmarks' process), and GNU OpenMP's pool does not survive fork()
(refgpt starts no forked workers).
"""

import os


def select_thread_pool() -> None:
    """Make Numba's thread pool OpenMP's (falling back to "workqueue" where no OpenMP runtime
    loads), unless NUMBA_THREADING_LAYER chooses. Call it before anything starts the pool (a
    parallel kernel, or setting Numba's thread count); afterwards it changes nothing."""
    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
        numba.config.THREADING_LAYER = "default"
