"""One GPU: one attention layer's core (softmax(q k^T / sqrt(D), causal) v, forward and
backward) three ways on the same inputs, side by side in one run:

    fused     refgpt's flash-style kernels (refgpt.kernels.cupy_flash)
    blocked   refgpt's other cupy path: cuBLAS products on blocks of rows, softmax row kernels
    PyTorch   torch.nn.functional.scaled_dot_product_attention(is_causal=True)

    python benchmarks/gpu_attention.py                      # GPT-2 124M's: B8 H12 T1024 D64
    python benchmarks/gpu_attention.py --seq 4096 --batch 2
    python benchmarks/gpu_attention.py --sweep              # also other tile shapes (float32)
    python benchmarks/gpu_attention.py --dtype bfloat16     # the tensor-core kernels vs SDPA

q, k, v are views of one [B, T, 3, H, D] projection, as in the model. Times are GPU
milliseconds (CUDA events), best of --repeats; TFLOP/s counts the causal half of the
products (forward 2 B H T^2 D, backward twice that). TF32 is off for PyTorch. In 16 bits
(--dtype bfloat16 or float16) the fused path is refgpt.kernels.cupy_flash16 and PyTorch's
SDPA runs its own flash kernel on the same type. Also prints
the memory each path allocates beyond its inputs (forward and backward, CuPy's pool and
PyTorch's peak).
"""

import argparse
import functools

import numpy as np


def gpu_ms(fn, repeats, event, elapsed):
    """Best GPU milliseconds of fn over repeats calls, after one that compiles and warms up."""
    best = float("inf")
    for _ in range(repeats + 1):
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, elapsed(start, end))
    return best


def refgpt_paths(B, H, T, D, repeats, dtype=np.float32, tiles=None, paths=("fused", "blocked")):
    """{path: (forward ms, forward + backward ms, MB allocated)}: the fused kernels (with
    these tiles, default cupy_flash.TILES) and the blocked cuBLAS path (the references, under
    Backend("cupy", fused_attention=False))."""
    import cupy as cp

    from refgpt.backend import Backend
    from refgpt.kernels import cupy_flash
    from refgpt.nn import attention
    from refgpt.kernels.cupy_half import narrow
    rng = cp.random.default_rng(0)
    qkv = narrow(rng.standard_normal((B, T, 3, H, D), dtype=np.float32), dtype)
    dout = narrow(rng.standard_normal((B, T, H, D), dtype=np.float32), dtype)
    dqkv = cp.empty_like(qkv)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
    do = dout.transpose(0, 2, 1, 3)
    kernels = {"fused": (functools.partial(cupy_flash.attention_forward, tiles=tiles),
                         cupy_flash.attention_backward),
               "blocked": (attention.attention_forward, attention.attention_backward)}
    event, elapsed = cp.cuda.Event, cp.cuda.get_elapsed_time
    pool = cp.get_default_memory_pool()
    out = {}
    with Backend("cupy", fused_attention=False):
        for name in paths:
            forward, backward = kernels[name]

            def step():
                o, saved = forward(q, k, v, 0)
                backward(q, k, v, saved, do, dq, dk, dv)
            f_ms = gpu_ms(lambda: forward(q, k, v, 0), repeats, event, elapsed)
            fb_ms = gpu_ms(step, repeats, event, elapsed)
            pool.free_all_blocks()
            before = pool.total_bytes()
            step()
            cp.cuda.Device().synchronize()
            out[name] = (f_ms, fb_ms, (pool.total_bytes() - before) / 2**20)
    return out


def torch_path(B, H, T, D, repeats, dtype="float32"):
    import torch
    import torch.nn.functional as F
    torch.backends.cuda.matmul.allow_tf32 = False
    t = getattr(torch, dtype)
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=t, requires_grad=True)
    dout = torch.randn(B, H, T, D, device="cuda", dtype=t).transpose(1, 2).contiguous() \
        .transpose(1, 2)

    def forward():
        q, k, v = qkv.unbind(2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True)

    def step():
        qkv.grad = None
        forward().backward(dout)
    event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    elapsed = lambda a, b: a.elapsed_time(b)             # noqa: E731
    with torch.no_grad():
        f_ms = gpu_ms(forward, repeats, event, elapsed)
    fb_ms = gpu_ms(step, repeats, event, elapsed)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return f_ms, fb_ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="time other tile shapes of the fused path")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = ap.parse_args()
    import torch  # noqa: F401  (before CuPy, so both share one CUDA context cleanly)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    flop = 2 * B * H * T * T * D                        # the causal half of the forward
    from refgpt.precision import dtype_of
    rows = dict(refgpt_paths(B, H, T, D, args.repeats, dtype_of(args.dtype)))
    rows["PyTorch SDPA"] = torch_path(B, H, T, D, args.repeats, args.dtype)
    print(f"{torch.cuda.get_device_name()}, B{B} H{H} T{T} D{D}, {args.dtype} "
          f"(GPU ms, best of {args.repeats}):")
    print(f"  {'path':14s} {'forward':>9s} {'fwd+bwd':>9s} {'TFLOP/s':>8s} {'MB':>8s}")
    for name, (f, fb, mb) in rows.items():
        print(f"  {name:14s} {f:9.3f} {fb:9.3f} {3 * flop / fb / 1e9:8.1f} {mb:8.0f}")
    t = rows["PyTorch SDPA"]
    for name in ("fused", "blocked"):
        print(f"  PyTorch / {name}: forward {t[0] / rows[name][0]:.2f}, "
              f"forward + backward {t[1] / rows[name][1]:.2f}")
    if args.sweep:
        sweep(B, H, T, D, args.repeats)


def sweep(B, H, T, D, repeats):
    """Forward and backward tile shapes (BQ, BK, TY) of the fused path, float32."""
    from refgpt.kernels import cupy_flash
    default = cupy_flash.TILES[4]
    for which, shapes in (("forward", [(64, 64, 8), (64, 64, 4), (128, 64, 16), (128, 64, 8),
                                       (64, 32, 8), (32, 64, 8), (64, 128, 8)]),
                          ("backward", [(64, 64, 16), (64, 64, 8), (32, 64, 8), (32, 64, 16),
                                        (64, 32, 8), (32, 32, 8), (128, 64, 16), (64, 128, 16)])):
        for shape in shapes:
            tiles = {**default, which: shape}
            if cupy_flash.shared_bytes(which, 4, D, tiles) > 227 * 1024:
                continue
            try:
                res = refgpt_paths(B, H, T, D, repeats, tiles=tiles, paths=("fused",))["fused"]
            except Exception as e:                       # a shape the GPU cannot launch
                print(f"  {which} {shape}: {type(e).__name__}: {e}")
                continue
            print(f"  {which} tiles {shape}: forward {res[0]:.3f} ms, fwd+bwd {res[1]:.3f} ms")


if __name__ == "__main__":
    main()
