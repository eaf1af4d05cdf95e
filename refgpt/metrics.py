"""FLOPs, model-FLOPs utilisation and the machine's measured GEMM rate.

Two FLOP counts per iteration, for a global batch of B sequences of s tokens, l layers,
hidden h, vocabulary V and N parameters:

* Megatron-LM's formula (Narayanan et al. 2021, eq. 3), which counts the activation
  recomputation forward too (4 passes instead of 3):
      F_megatron = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))
* Model FLOPs (PaLM's convention): 6 N per token for the parameter GEMMs (forward + backward)
  plus 12 l h s per token for attention scores and values (causal masking not discounted):
      F_model = B s (6 N + 12 l h s)
  N counts every parameter that takes part in a GEMM or elementwise op, i.e. all but the
  position table, with the real (unpadded) vocabulary.

MFU = F_model / time / (measured GEMM rate of this process), the rate being the best of a few
square matmuls in the run's dtype, timed at start-up.
"""

from __future__ import annotations

import time

import numpy as np

from .backend import synchronize, to_device


def megatron_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    return 96.0 * batch * seq * layers * hidden**2 * (
        1.0 + seq / (6.0 * hidden) + vocab / (16.0 * layers * hidden))


def model_params(cfg) -> int:
    """N of the model-FLOPs formula: all parameters except wpe, real vocabulary rows only."""
    C, L = cfg.hidden_size, cfg.num_layers
    per_block = 12 * C * C + 13 * C
    return cfg.vocab_size * C + L * per_block + 2 * C


def model_flops(cfg, batch: int) -> float:
    s, L, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    return batch * s * (6.0 * model_params(cfg) + 12.0 * L * h * s)


def measure_gemm_rate(dtype=np.float32, n: int = 1024, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul in this process (threads as currently set), on the
    current backend's device (a GPU under the cupy backend)."""
    rng = np.random.default_rng(0)
    a = to_device(rng.standard_normal((n, n)).astype(dtype))
    b = to_device(rng.standard_normal((n, n)).astype(dtype))
    a @ b                                                        # warm-up
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
