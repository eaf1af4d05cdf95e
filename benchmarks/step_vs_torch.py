"""Time one training step (forward, backward, AdamW) of refgpt and of the same GPT-2 in
PyTorch (Hugging Face GPT2LMHeadModel, eager mode, SDPA attention), side by side in one run,
with the same dtype, batch and thread count.

    python benchmarks/step_vs_torch.py                    # both configs, all cores, both backends
    python benchmarks/step_vs_torch.py --config 5m --threads 1 --steps 5 --backend numba

The steps are timed round robin (one step of each per round, the order rotated each round;
see round_robin), so that a shared machine's drifting load falls on both alike. Prints the
best ms per step for each refgpt backend and for PyTorch, the throughput ratio
refgpt / PyTorch (> 1: refgpt is faster) and each one's model-FLOPs utilisation against this
machine's sgemm rate measured in the same run. Then, per config, the step's GEMM floor: every
matrix product of a numba step (the linear layers' and the tied head's forward and two
backward products, and attention's causal products, through the numba kernels the model
calls), each timed on its own shape, summed. No step that does these products this way can be
faster, so PyTorch's step time over the floor bounds
the ratio any refgpt step can reach here, with all other work free.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

CONFIGS = {  # name: (layers, hidden, heads, vocab, seq, batch)
    "5m": (4, 256, 4, 8192, 128, 8),
    "124m": (12, 768, 12, 50257, 256, 4),
}


def refgpt_step(cfg_tuple, threads=None, backend="numpy", dtype="float32", **model_options):
    """(one training step: forward, backward, AdamW; the config; the model) of refgpt's GPT
    in dtype under a backend. A 16-bit model gets the optimizer --bf16/--fp16 train with (fp32
    master weights); model_options go to GPT (recompute=..., say)."""
    from refgpt.backend import Backend
    from refgpt.config import ModelConfig
    from refgpt.nn import GPT
    from refgpt.optim import AdamW, MasterAdamW
    from refgpt.precision import dtype_of, is_half
    L, h, a, V, s, b = cfg_tuple
    cfg = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=a, seq_length=s,
                      vocab_size=V)
    backend, dtype = Backend(backend), dtype_of(dtype)
    model = GPT(cfg, dtype, seed=0, **model_options)
    p = model.params
    opt = (MasterAdamW if is_half(dtype) else AdamW)(p.data, p.grad, p.decay_ranges(),
                                                      weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (b, s))
    y = rng.integers(0, V, (b, s))

    def step():
        with backend:
            p.zero_grad()
            model.forward(x, y, float(b * s))
            model.backward()
            opt.step(1e-4)
    return step, cfg, model


def torch_step(cfg_tuple, threads, autocast: bool = False):
    """PyTorch's step: eager, in float32, or under CPU bf16 autocast (fp32 weights)."""
    import torch
    from refgpt.interop import hf_gpt2
    GPT2Config, GPT2LMHeadModel = hf_gpt2()
    torch.set_num_threads(threads)
    L, h, a, V, s, b = cfg_tuple
    conf = GPT2Config(n_layer=L, n_embd=h, n_head=a, vocab_size=V, n_positions=s,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(conf).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (b, s), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
    return step


def gemm_floor(cfg_tuple, repeats=3):
    """Seconds of one numba training step's matrix products, each timed alone (best of
    repeats), summed: the layers' products once per layer, the head's once."""
    from refgpt.kernels.numba_attention import causal_matmul_nn, causal_matmul_nt, causal_matmul_tn
    from refgpt.kernels.numba_gemm import add_matmul, matmul
    L, C, H, V, T, B = cfg_tuple
    N, D, f = B * T, C // H, np.float32
    Vp = -(-V // 128) * 128
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(f)   # noqa: E731

    def linear(n_in, n_out, w_t=False):
        """forward x W, backward dy W^T and x^T dy (W stored [in, out]; the head's as wte
        [out, in], w_t)."""
        x, dy, w = r(N, n_in), r(N, n_out), (r(n_out, n_in) if w_t else r(n_in, n_out))
        wf, gw = (w.T if w_t else w), np.zeros_like(w)
        grad = (lambda: add_matmul(gw, dy.T, x)) if w_t else (lambda: add_matmul(gw, x.T, dy))
        return (timed(lambda: matmul(x, wf), repeats) + timed(lambda: matmul(dy, wf.T), repeats)
                + timed(grad, repeats))
    per_layer = sum(linear(i, o) for i, o in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)))
    q = r(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)[0]
    k, v, do = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
    p = np.tril(r(B, H, T, T))
    k_nt, k_nn, k_tn = causal_matmul_nt, causal_matmul_nn, causal_matmul_tn
    per_layer += 2 * (timed(lambda: k_nt(q, k, 0.125), repeats)
                      + timed(lambda: k_nn(p, v), repeats) + timed(lambda: k_tn(p, do), repeats))
    return L * per_layer + linear(C, Vp, w_t=True)


def round_robin(fns: dict, rounds: int, sync=lambda: None) -> dict:
    """Best seconds of each of fns {name: call}, over rounds in which each is called once, in
    an order rotated each round, after a first round that warms up: a shared machine's
    drifting load, and whatever one call leaves in the caches and thread pools, then falls on
    every call alike. sync() waits for a GPU's queued work."""
    names, best = list(fns), dict.fromkeys(fns, float("inf"))
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def timed(step, n, sync=lambda: None):
    """Best of n calls of step after a warm-up; sync() waits for a GPU's queued work."""
    step()                                                     # warm-up
    sync()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps each, taken round robin (best is reported)")
    ap.add_argument("--backend", nargs="+", default=["numpy", "numba"], choices=["numpy", "numba"])
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits
    from refgpt import metrics
    names = list(CONFIGS) if args.config == "all" else [args.config]
    # PyTorch before Numba starts its OpenMP pool (refgpt.kernels): in the other order,
    # PyTorch's step in this process ran several times slower (benchmarks/README.md)
    import torch  # noqa: F401
    import numba

    from refgpt.kernels import select_thread_pool
    select_thread_pool()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(args.threads):
        sgemm = metrics.measure_gemm_rate(np.float32, 2048)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"threads {args.threads}, measured sgemm {sgemm / 1e9:.1f} GFLOP/s")
        print(f"{'config':>7} {'backend':>7} {'refgpt ms':>10} {'torch ms':>10} {'ratio':>6} "
              f"{'refgpt MFU':>10} {'torch MFU':>9}")
        for name in names:
            steps = {"torch": torch_step(CONFIGS[name], args.threads)}
            for backend in args.backend:
                steps[backend], cfg, _ = refgpt_step(CONFIGS[name], args.threads, backend)
            best = round_robin(steps, args.steps)
            t = best["torch"]
            for backend in args.backend:
                r = best[backend]
                flops = metrics.model_flops(cfg, CONFIGS[name][5])
                print(f"{name:>7} {backend:>7} {1e3 * r:10.1f} {1e3 * t:10.1f} {t / r:6.2f} "
                      f"{100 * flops / r / sgemm:9.1f}% {100 * flops / t / sgemm:8.1f}%", flush=True)
            floor = gemm_floor(CONFIGS[name])
            print(f"{name:>7} GEMM floor {1e3 * floor:.1f} ms: no refgpt step through this BLAS "
                  f"beats {t / floor:.2f}x PyTorch here", flush=True)


if __name__ == "__main__":
    main()
