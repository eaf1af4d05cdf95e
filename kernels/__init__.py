"""Fast kernels, installed as ``refgpt.kernels``: numba_cpu holds the Numba kernels of the
``numba`` backend and cupy_gpu the CuPy kernels of the ``cupy`` backend (refgpt.backend),
each tested against the NumPy reference it replaces.

Importing this package selects Numba's "workqueue" thread pool (unless NUMBA_THREADING_LAYER
is set). Numba's default OpenMP pool spins after each parallel loop, as OpenBLAS's threads do
after each GEMM, so alternating kernels and GEMMs left each waiting for cores the other held
(measured on 2 cores: the training step 20% slower than with one Numba thread), and a second
OpenMP runtime in the process slowed PyTorch's own OpenMP 4x in the side-by-side benchmark.
The workqueue pool sleeps when idle. It must be chosen before Numba starts any pool, so code
that sets Numba's thread count imports this package first.
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
