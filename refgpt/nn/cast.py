"""The two conversions of refgpt.precision as kernels, for the ops of refgpt.nn:

    wide(x)           x in the type ops compute in (16-bit -> fp32; others: x itself)
    narrow(y, dtype)  y rounded to the stored type, nearest even (y itself where it is dtype)

The references are NumPy's (ml_dtypes') casts, which run on one core; the numba backend's are
the bit kernels of refgpt.kernels.numba_half on its threads, equal bit for bit
(tests/test_kernels.py). Attention's probabilities [B, H, T, T] are the largest array a step
rounds: on one core their rounding took longer than the softmax that made them.
"""

from __future__ import annotations

import numpy as np

from .. import precision
from ..backend import kernel


@kernel(numba="numba_half", half=("numba",))
def wide(x: np.ndarray) -> np.ndarray:
    return precision.wide(x)


@kernel(numba="numba_half", half=("numba",))
def narrow(y: np.ndarray, dtype) -> np.ndarray:
    return precision.narrow(y, dtype)
