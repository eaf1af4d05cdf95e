"""Fast kernels, installed as ``refgpt.kernels``: numba_cpu holds the Numba kernels of the
``numba`` backend and cupy_gpu the CuPy kernels of the ``cupy`` backend (refgpt.backend),
each tested against the NumPy reference it replaces.

Importing this package selects Numba's OpenMP thread pool (unless NUMBA_THREADING_LAYER is
set; where no OpenMP runtime loads, Numba falls back to its "workqueue" pool). The numba
backend runs every GEMM of the step on Numba's threads too, with BLAS on one thread inside
each (refgpt.kernels.numba_gemm), so this pool is the only one at work, and OpenMP's threads
wait for the next parallel loop by spinning for a while before they sleep: a launch costs
about 2 us, where the workqueue pool, whose threads sleep at once, took 60-100 us to wake them
on the 2-core development machine (a virtual machine), and a step has a hundred launches.
(Before the GEMMs moved onto Numba's threads, the two pools spinning against each other made
the step 20% slower with OpenMP than with one Numba thread.) The pool must be chosen before
Numba starts one, so code that sets Numba's thread count imports this package first. Two
cautions that come with OpenMP: a process that also runs PyTorch should import torch before
Numba starts its pool (in the other order PyTorch's step ran 7x slower in the benchmarks'
process), and GNU OpenMP's pool does not survive fork() (refgpt starts no forked workers).
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    numba.config.THREADING_LAYER = "default"
