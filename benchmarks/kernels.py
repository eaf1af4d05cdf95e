"""Each numba kernel against the NumPy reference it replaces, on the shapes of a training step,
side by side in one run (same process, same threads).

    python benchmarks/kernels.py                      # the ~5M model's shapes (L4 h256 V8192 s128 b8)
    python benchmarks/kernels.py --hidden 768 --vocab 50257 --seq 256 --batch 4   # GPT-2 124M's

Prints, per kernel, the best of --repeats calls for each and the speed-up numpy / numba.
"""

import argparse
import os
import sys
from pathlib import Path

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import timed  # noqa: E402


def cases(args, rng):
    B, T, C, V, H = args.batch, args.seq, args.hidden, args.vocab, args.hidden // 64
    f = np.float32
    x4 = rng.standard_normal((B, T, 4 * C)).astype(f)
    x, g, b = (rng.standard_normal(s).astype(f) for s in ((B, T, C), C, C))
    b4 = rng.standard_normal(4 * C).astype(f)
    s = rng.standard_normal((B, H, T, T)).astype(f)
    z, y = rng.standard_normal((B * T, V)).astype(f), rng.integers(0, V, B * T)
    n = 12 * C * C + V * C                                         # ~ one block + the embeddings
    p, gr, m, v = (rng.standard_normal(n).astype(f) for _ in range(4))
    v = np.abs(v)
    from refgpt.nn.layernorm import layernorm_forward
    _, nn, rstd = layernorm_forward.reference(x, g, b, 1e-5)
    from refgpt.nn.attention import causal_softmax
    probs = causal_softmax.reference(s.copy(), 0)
    gw, xs, dys = (rng.standard_normal(shape).astype(f)
                   for shape in ((C, 4 * C), (B * T, C), (B * T, 4 * C)))
    wte, ids = rng.standard_normal((V, C)).astype(f), rng.integers(0, V, B * T)
    qkv = rng.standard_normal((B, T, 3, H, 64)).astype(f)
    q, k, val = qkv.transpose(2, 0, 3, 1, 4)                        # strided, as attention has them
    return {
        "gelu_forward": ((x4, "tanh"), None),
        "gelu_backward": ((x4, x4, "tanh"), None),
        "bias_gelu_forward": ((x4, b4, "tanh"), None),              # adds b4 to x4 each call
        "bias_gelu_backward": ((x4, x4, "tanh"), None),
        "layernorm_forward": ((x, g, b, 1e-5), None),
        "layernorm_backward": ((x, nn, rstd, g), None),
        "causal_softmax": ((s, 0), lambda a: (a[0].copy(), a[1])),
        "softmax_backward": ((probs, s), None),
        "cross_entropy": ((z, V, y, float(B * T), True), None),    # z becomes its gradient
        "adamw_update": ((p, gr, m, v, 1e-4, 0.9, 0.95, 1e-8, 0.1, 0.05), None),
        "matmul": ((xs, gw, b4), None),                             # c_fc's forward, its bias
        "add_matmul": ((gw, xs.T, dys), None),                      # c_fc's weight gradient
        "column_sum": ((dys,), None),                               # a bias's gradient
        "residual": ((x, nn), None),                                # a residual connection
        "scatter_add_rows": ((wte, ids, xs), None),                 # the embedding's backward
        "zero_fill": ((gr,), None),
        "causal_matmul_nt": ((q, k, 0.125), None),
        "causal_matmul_nn": ((probs, val), None),
        "causal_matmul_tn": ((probs, q), None),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import numba
    from threadpoolctl import threadpool_limits

    from refgpt.kernels import select_thread_pool
    select_thread_pool()
    from refgpt import backend
    from refgpt.nn import attention, block, embedding, gelu, layernorm, linear, loss, params
    from refgpt.optim import adamw
    from refgpt.parallel import shared
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    fast = backend.Backend("numba")
    kernels = backend.kernels_in(attention, block, embedding, gelu, layernorm, linear, loss,
                                 params, adamw, shared)
    impls = {name: fast.implementation(k) for name, k in kernels.items() if fast.replaces(k)}
    print(f"{os.cpu_count()} cores, threads {args.threads}; shapes of B {args.batch} T {args.seq} "
          f"C {args.hidden} V {args.vocab}, float32")
    print(f"{'kernel':>24} {'numpy ms':>9} {'numba ms':>9} {'speed-up':>8}")
    with threadpool_limits(args.threads):
        for name, (a, fresh) in cases(args, np.random.default_rng(0)).items():
            prep = fresh or (lambda a: a)
            t_ref = timed(lambda: kernels[name].reference(*prep(a)), args.repeats)
            t_new = timed(lambda: impls[name](*prep(a)), args.repeats)
            print(f"{name:>24} {1e3 * t_ref:9.2f} {1e3 * t_new:9.2f} {t_ref / t_new:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
