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

MFU = F_model / time / (GEMM rate x ranks). The rate is the best this machine has shown for
the run's dtype, backend and thread count: square matmuls timed at start-up (for a fraction
of a second, so that one slow moment cannot decide it), the best of earlier runs kept in a
file of refgpt's cache, and raised to what a step achieves. A busy start-up therefore cannot
make MFU pass 100%: the figure is against the best rate seen, not the last.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .backend import array_module, synchronize, to_device
from .nn.moe import is_moe_layer


def megatron_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                   extra_macs: float = 0.0) -> float:
    """Megatron-LM's FLOPs per step (Narayanan et al. 2021, with its recomputation's fourth
    pass: 96 = 4 passes x 2 FLOPs x 12 h^2 multiply-adds per token and layer); extra_macs:
    multiply-adds per token beyond the dense layers' (experts: moe_extra_macs)."""
    return 96.0 * batch * seq * layers * hidden**2 * (
        1.0 + seq / (6.0 * hidden) + vocab / (16.0 * layers * hidden)) \
        + 8.0 * batch * seq * extra_macs


def moe_extra_macs(cfg) -> float:
    """A token's multiply-adds per step beyond a dense model's: in each MoE layer, k - 1 more
    MLPs (8 h^2 each) and the router (h E)."""
    h = cfg.hidden_size
    moe = sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))
    return moe * (8 * h * h * (cfg.moe_router_topk - 1) + h * cfg.num_experts)


def model_params(cfg) -> int:
    """N of the model-FLOPs formula: all parameters except wpe, real vocabulary rows only;
    with experts, the active ones (a token's k experts' MLPs and the router)."""
    C = cfg.hidden_size
    return cfg.vocab_size * C + sum(block_params(cfg, i) for i in range(cfg.num_layers)) + 2 * C


def block_params(cfg, i: int) -> int:
    """Block i's active parameters: its own, and in an MoE layer a token's k - 1 more experts'
    MLPs and the router."""
    C = cfg.hidden_size
    mlp = 8 * C * C + 5 * C
    return 12 * C * C + 13 * C + is_moe_layer(cfg, i) * ((cfg.moe_router_topk - 1) * mlp
                                                          + C * cfg.num_experts)


def model_flops(cfg, batch: int) -> float:
    s, L, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    return batch * s * (6.0 * model_params(cfg) + 12.0 * L * h * s)


def stage_flops(cfg, batch: int, p: int, v: int = 1) -> list[float]:
    """model_flops split over the p ranks of a pipeline whose p v chunks hold equal numbers of
    blocks (rank g holds chunks g, g + p, ...): each block's FLOPs where it runs, and the
    language-model head's (the tied wte as the output GEMM: 6 V C a token) and the final
    LayerNorm's on the rank of the last chunk. The list sums to model_flops. A stage with
    the head does the most: at GPT-2 124M's vocabulary the head is as much as 5 blocks."""
    s, C, L = cfg.seq_length, cfg.hidden_size, cfg.num_layers

    def block(i: int) -> float:                 # 6 N of its parameters, 12 C s of attention
        return 6.0 * block_params(cfg, i) + 12.0 * C * s

    per = L // (p * v)
    out = [0.0] * p
    for chunk in range(p * v):
        out[chunk % p] += batch * s * sum(block(i) for i in range(chunk * per, (chunk + 1) * per))
    out[(p * v - 1) % p] += head_flops(cfg, batch)
    return out


def head_flops(cfg, batch: int) -> float:
    """The model FLOPs of the language-model head (the tied wte as the output GEMM) and the
    final LayerNorm, which run on the last pipeline stage."""
    C = cfg.hidden_size
    return batch * cfg.seq_length * 6.0 * (cfg.vocab_size * C + 2 * C)


def measure_gemm_rate(dtype=np.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n x n matmul in this process (threads as currently set), on the
    current backend's device, over at least three matmuls and `seconds`: the layers' GEMM
    (refgpt.nn.linear.matmul: a 16-bit one where the backend has it)."""
    from .nn.linear import matmul
    rng = np.random.default_rng(0)
    a = to_device(rng.standard_normal((n, n)).astype(dtype))
    b = to_device(rng.standard_normal((n, n)).astype(dtype))
    matmul(a, b)                                                 # warm-up
    synchronize()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        matmul(a, b)
        synchronize()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2.0 * n**3 / best


class GemmRate:
    """The GEMM rate MFU divides by (module docstring): measured now, never below the best of
    earlier runs with the same key (remembered in `path`), raised to what a step achieves."""

    def __init__(self, measured: float, key: str, path=None):
        self.key, self.path = key, path
        self.known = self._read()
        self.rate = max(measured, self.known.get(key, 0.0))

    @classmethod
    def measure(cls, dtype, key: str, path=None) -> "GemmRate":
        """Measured in this process: for a fraction of a second the first time this key is
        seen, three matmuls when an earlier run's best is at hand."""
        seen = key in cls(0.0, key, path).known
        return cls(measure_gemm_rate(dtype, seconds=0.0 if seen else 0.3), key, path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return {}                           # no file yet, or a damaged one: start afresh

    def observe(self, flops_per_s: float) -> None:
        """A step computed at this rate (per rank): the machine can, so the rate is at least it."""
        self.rate = max(self.rate, flops_per_s)

    def save(self) -> None:
        """Remember the rate for later runs (one writer: world rank 0)."""
        if self.path is None or self.rate <= self.known.get(self.key, 0.0):
            return
        self.known[self.key] = self.rate
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def machine_key(backend: str, dtype) -> str:
    """What a GEMM rate depends on: the device (the CPU, or the GPU), the BLAS threads of this
    process, the dtype and the backend."""
    xp = array_module()
    if xp is not np:
        device = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
    else:
        import llvmlite.binding as llvm
        from threadpoolctl import threadpool_info
        threads = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
                      default=1)
        device = f"{llvm.get_host_cpu_name()} x{os.cpu_count()} cores, {threads} BLAS threads"
    return f"{device}, {np.dtype(dtype).name}, {backend}"
