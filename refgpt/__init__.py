"""refgpt: a framework-free GPT in NumPy with hand-written backward passes.

Layers live in :mod:`refgpt.nn`, the optimizer in :mod:`refgpt.optim`, data handling in
:mod:`refgpt.data`; ``python -m refgpt.train`` / ``.prepare`` / ``.generate`` are the entry points.

Importing refgpt before NumPy shortens how long OpenBLAS's idle threads spin after a GEMM
(OPENBLAS_THREAD_TIMEOUT, unless it is set already): 2^16 cycles, about 20 us, instead of
OpenBLAS's 2^28 (about 0.1 s). The numba backend's kernels run between GEMMs, and while
OpenBLAS's threads spin they share the cores with them: on the 2-core development machine
the ~5M model's training step took 550-613 ms with 2^16 against 635-650 ms with the default
(three runs each; benchmarks/README.md). OpenBLAS reads the variable when it loads, so it has
no effect where NumPy was imported first; ``python -m refgpt.train`` and the benchmarks
import refgpt first.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

__version__ = "0.1.0"
