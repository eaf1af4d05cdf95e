"""What each precision stores, computes and rounds: the policy every op of refgpt.nn follows.

float64 and float32 runs compute every op in their own type, as they always have. A 16-bit
run (``--bf16``: bfloat16, 8 bits of mantissa; ``--fp16``: IEEE half, 11 bits and a narrow
range) keeps 16 bits where memory and bandwidth are spent and 32 bits where accuracy is:

    16-bit   the model's parameters (the working copy), every activation a layer returns or
             saves for backward, the attention probabilities, the logits and their gradient
    fp32     the arithmetic of every op (inputs widened, one rounding of each output: a GEMM
             accumulates its dot products in fp32 and rounds C once); LayerNorm's and the
             softmax's row statistics, kept as fp32; the loss; the gradient buffer, which
             the weight-gradient GEMMs accumulate into directly across micro-batches
             (Megatron's main_grad with gradient-accumulation fusion), so a micro-batch's
             contribution is never rounded to 16 bits; the optimizer's master weights and
             AdamW's moments (refgpt.optim.mixed)

``wide(x)`` is the type an op computes in (float32 for a 16-bit x, x's own otherwise) and
``narrow(y, dtype)`` the rounding of a result to the stored type (round to nearest, ties to
even, as ml_dtypes and every 16-bit unit do). An op's docstring says what it rounds where.

bfloat16 comes from ml_dtypes (the numpy dtype JAX and CuPy use); float16 is numpy's own.
"""

from __future__ import annotations

import numpy as np

DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16")


def dtype_of(name: str) -> np.dtype:
    """The numpy dtype of a --dtype name (bfloat16 needs ml_dtypes: the `mixed` extra)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ModuleNotFoundError:
            raise ModuleNotFoundError("--bf16 needs ml_dtypes: pip install 'refgpt[mixed]'") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_half(dtype) -> bool:
    """A 16-bit floating type (bfloat16, whose numpy kind is V, or float16)."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and dtype.kind in "fV"


def compute_dtype(dtype) -> np.dtype:
    """The type an op of this input type computes in: fp32 for 16 bits, itself otherwise."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def wide(x: np.ndarray) -> np.ndarray:
    """x in its compute type (no copy where that is its own)."""
    return x.astype(compute_dtype(x.dtype), copy=False)


def narrow(y: np.ndarray, dtype) -> np.ndarray:
    """y rounded to dtype (no copy where it has it already)."""
    return y.astype(dtype, copy=False)
