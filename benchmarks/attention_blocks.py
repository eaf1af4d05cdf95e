"""Sweep the block size of attention's causal products (the tile parameter of
refgpt.kernels.numba_attention) on this machine, against NumPy's batched matmul.

    python benchmarks/attention_blocks.py                              # ~5M's shapes: B8 H4 T128
    python benchmarks/attention_blocks.py --batch 4 --heads 12 --seq 256 --threads 1   # 124M's, a rank

Times the six products of one attention layer's forward and backward (S = q k^T, O = P v;
dP = dO v^T, dv = P^T dO, dq = dS k, dk = dS^T q) for each block size and for NumPy's
matmul, best of --repeats taken round robin with the order rotated each round (so that a
shared machine's drifting load, and whatever the previous variant leaves in the caches and
BLAS's threads, falls on every variant alike), and prints which block is fastest. The presets
(``numba_attention.PRESETS``) came from this sweep at T = 128, 256 and 1024; on a CPU without
one, run it and set REFGPT_ATTENTION_BLOCK to the block it reports.
"""

import argparse
import os
import sys
from pathlib import Path

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import round_robin  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import numba
    from threadpoolctl import threadpool_limits

    from refgpt.kernels import select_thread_pool
    select_thread_pool()
    from refgpt.kernels import numba_attention as na
    from refgpt.nn import attention
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3, H, D)).astype(np.float32)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)                     # strided, as attention has them
    do = rng.standard_normal((B, H, T, D)).astype(np.float32)
    p = np.tril(rng.random((B, H, T, T), np.float32))

    def layer(nt, nn, tn):
        nt(q, k, 0.125), nn(p, v)                              # forward
        nt(do, v), tn(p, do), nn(p, k, 0.125), tn(p, q, 0.125)  # backward

    refs = [getattr(attention, f"causal_matmul_{s}").reference for s in ("nt", "nn", "tn")]
    fast = [getattr(na, f"causal_matmul_{s}") for s in ("nt", "nn", "tn")]
    flops = 6 * 2 * B * H * T * T * D                          # the full products
    print(f"{os.cpu_count()} cores, threads {args.threads}; B {B} H {H} T {T} D {D}, float32; "
          f"preset {na.PRESET}: block {na.block_for(T)} at this T")
    variants = ({"numpy matmul": (None, refs), f"{na.PRESET} preset": (None, fast)}
                | {f"block {b}": (b, fast) for b in args.blocks})

    def run(block, fns):
        na.BLOCK = block                           # None: the preset's block for T
        layer(*fns)
    with threadpool_limits(args.threads):
        best = round_robin({name: lambda v=v: run(*v) for name, v in variants.items()},
                           args.repeats)
    for name, t in best.items():
        print(f"{name:>14} {1e3 * t:8.2f} ms  {flops / t / 1e9:6.1f} GFLOP/s (full-product FLOPs)  "
              f"{best['numpy matmul'] / t:5.2f}x numpy")
    fastest = min(args.blocks, key=lambda b: best[f"block {b}"])
    print(f"fastest: block {fastest} (REFGPT_ATTENTION_BLOCK={fastest})")


if __name__ == "__main__":
    main()
