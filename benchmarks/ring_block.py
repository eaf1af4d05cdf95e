"""Context parallelism's ring block (attention_block_forward and _backward, refgpt.nn.attention)
on this CPU: the NumPy reference, the numba backend's fused kernels
(refgpt.kernels.numba_flash) and PyTorch's CPU flash-attention kernel, which returns the
log-sum-exp too and is the block kernel of PyTorch's own context parallelism
(aten._scaled_dot_product_flash_attention_for_cpu and its _backward), side by side in one
process on the same threads:

    python benchmarks/ring_block.py                          # GPT-2 124M's heads, n 512
    python benchmarks/ring_block.py --chunk 256 1024 --threads 1 2

One "ring step" is what a rank computes when its keys come back around: a diagonal
(causal) block and a full block, forward and backward (B --batch, H --heads, n --chunk
queries and keys, D --head-dim, float32). Best of --repeats, taken round robin (the order
rotated each round, benchmarks/step_vs_torch.py). PyTorch's backward is given the block's
own output and lse (what its kernel takes); the ring gives its final ones, the same work.
"""

import argparse
import os
import sys
from pathlib import Path

import torch  # noqa: F401  (before numba starts its pool: refgpt.kernels)

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from refgpt.study.measure import cpu_name  # noqa: E402
from step_vs_torch import round_robin  # noqa: E402


def step(fwd, bwd, q, k, v, do):
    """A causal and a full block, forward then backward, into fresh accumulators."""
    def run():
        for causal in (True, False):
            o, lse = fwd(q, k, v, causal)
            delta = (do * o).sum(axis=-1)
            grads = [np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)]
            bwd(q, k, v, do, lse, delta, causal, None, *grads)
    return run


def torch_step(q, k, v, do):
    aten = torch.ops.aten
    tq, tk, tv, tdo = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v, do))

    def run():
        for causal in (True, False):
            o, lse = aten._scaled_dot_product_flash_attention_for_cpu(tq, tk, tv, 0.0, causal)
            aten._scaled_dot_product_flash_attention_for_cpu_backward(tdo, tq, tk, tv, o, lse,
                                                                      0.0, causal)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--chunk", type=int, nargs="+", default=[512])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count()])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import numba
    from threadpoolctl import threadpool_limits

    from refgpt.kernels import numba_flash, select_thread_pool
    select_thread_pool()
    from refgpt.nn import attention

    ref = (attention.attention_block_forward.reference,
           attention.attention_block_backward.reference)
    fused = (numba_flash.attention_block_forward, numba_flash.attention_block_backward)
    print(f"{cpu_name()}, {os.cpu_count()} cores; B {args.batch} H {args.heads} "
          f"D {args.head_dim}, float32; ms per ring step (a causal and a full block, "
          f"forward + backward)")
    print(f"{'threads':>7} {'n':>5} {'numpy':>8} {'numba':>8} {'torch':>8} "
          f"{'numba/numpy':>11} {'numba/torch':>11}")
    rng = np.random.default_rng(0)
    for threads in args.threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(threads)
        for n in args.chunk:
            B, H, D = args.batch, args.heads, args.head_dim
            qkv = rng.standard_normal((B, n, 3, H, D)).astype(np.float32)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)           # strided, as attention has them
            do = rng.standard_normal((B, H, n, D)).astype(np.float32)
            with threadpool_limits(threads):
                best = round_robin({"numpy": step(*ref, q, k, v, do),
                                    "numba": step(*fused, q, k, v, do),
                                    "torch": torch_step(q, k, v, do)}, args.repeats)
            ms = {name: 1e3 * t for name, t in best.items()}
            print(f"{threads:>7} {n:>5} {ms['numpy']:8.1f} {ms['numba']:8.1f} "
                  f"{ms['torch']:8.1f} {ms['numpy'] / ms['numba']:10.2f}x "
                  f"{ms['torch'] / ms['numba']:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
