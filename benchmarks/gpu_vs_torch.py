"""One GPU: a training step (forward, backward, AdamW) of refgpt's cupy backend against
PyTorch eager on the same GPU, same model, batch and dtype, side by side in one run.

    python benchmarks/gpu_vs_torch.py                        # GPT-2 124M, batch 8 x 1024, float32
    python benchmarks/gpu_vs_torch.py --batch 4 --seq 512
    python benchmarks/gpu_vs_torch.py --profile              # also: where each one's step goes
    python benchmarks/gpu_vs_torch.py --attention fused blocked   # refgpt's two attention paths
    python benchmarks/gpu_vs_torch.py --dtype bfloat16       # refgpt --bf16 vs PyTorch autocast

PyTorch runs Hugging Face's GPT2LMHeadModel with SDPA attention; TF32 is off for both (plain
float32 GEMMs: CuPy's default, and torch.backends.cuda.matmul.allow_tf32 = False). Prints
tokens/s for each (best of --steps after a warm-up). With --profile, one more step of each
is timed piece by piece on the GPU: refgpt's kernels, GEMMs by their shapes (CUDA events
around each call, through the backend's instrument hook; "other" is the rest: copies,
reshapes) and PyTorch's CUDA kernels (torch.profiler). --attention picks refgpt's
attention: the fused (flash-style) kernels, the default, or the cuBLAS products on blocks of
rows (refgpt.backend.Backend("cupy", fused_attention=False)); each given path is timed on
the same model, and each line also gives the GPU memory CuPy's pool holds after the steps.

--dtype bfloat16 (or float16) runs refgpt as --bf16 (--fp16) trains: 16-bit weights and
activations, an fp32 gradient buffer, fp32 master weights in the optimizer; and PyTorch as
its users run mixed precision, fp32 weights under torch.autocast("cuda", torch.bfloat16),
with AdamW's fused CUDA kernel. Each side's peak memory is printed beside its speed.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import timed  # noqa: E402


def profile_ours(step, fused: bool):
    """Print the GPU milliseconds of one step per kernel (GEMMs by their shapes, which name
    the layers), through the backend's instrument hook."""
    import cupy as cp

    from refgpt.backend import Backend
    events = defaultdict(list)

    def label(name, args):
        if name in ("matmul", "add_matmul"):                      # c = a @ b: [M, K] x [K, N]
            a, b = args[:2] if name == "matmul" else args[1:3]
            return f"{name} {a.shape[0]}x{a.shape[1]}x{b.shape[1]}"
        return name

    def timed_call(name, fn):
        def call(*args, **kwargs):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            events[label(name, args)].append((start, end))
            return out
        return call
    with Backend("cupy", fused_attention=fused, instrument=timed_call):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        step()
        end.record()
        end.synchronize()
    total = cp.cuda.get_elapsed_time(start, end)
    rows = {k: (len(v), sum(cp.cuda.get_elapsed_time(a, b) for a, b in v)) for k, v in events.items()}
    rows["other"] = (0, total - sum(ms for _, ms in rows.values()))
    print(f"refgpt cupy, one step {total:.1f} ms on the GPU:")
    for k, (n, ms) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:32s} {n:4d} calls {ms:8.2f} ms")


def profile_theirs(step):
    """Print PyTorch's CUDA kernels of one step, by total GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="time one step of each piece by piece")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--attention", nargs="+", choices=("fused", "blocked"), default=["fused"],
                    help="refgpt's attention path(s) to time")
    args = ap.parse_args()
    import cupy as cp
    import torch
    from refgpt.interop import hf_gpt2
    GPT2Config, GPT2LMHeadModel = hf_gpt2()

    from refgpt.backend import Backend, synchronize
    from refgpt.config import ModelConfig
    from refgpt.nn import GPT
    from refgpt.optim import AdamW, MasterAdamW
    from refgpt.precision import dtype_of, is_half
    L, h, V, s, b = args.layers, args.hidden, args.vocab, args.seq, args.batch
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=h // 64, seq_length=s,
                      vocab_size=V)
    dtype = dtype_of(args.dtype)
    with Backend("cupy"):
        model = GPT(cfg, dtype, seed=0)
    p = model.params
    opt = (MasterAdamW if is_half(dtype) else AdamW)(p.data, p.grad, p.decay_ranges(),
                                                      weight_decay=0.1)
    rng = np.random.default_rng(0)
    x, y = cp.asarray(rng.integers(0, V, (b, s))), cp.asarray(rng.integers(0, V, (b, s)))

    def ours():
        p.zero_grad()
        model.forward(x, y, float(b * s))
        model.backward()
        opt.step(1e-4)
    pool = cp.get_default_memory_pool()
    t_ours = {}
    for path in args.attention:
        pool.free_all_blocks()
        with Backend("cupy", fused_attention=path == "fused"):
            t_ours[path] = timed(ours, args.steps, synchronize), pool.total_bytes() / 2**30
        if args.profile:
            profile_ours(ours, path == "fused")
    del model, p, opt
    cp.get_default_memory_pool().free_all_blocks()

    conf = GPT2Config(n_layer=L, n_embd=h, n_head=h // 64, vocab_size=V, n_positions=s,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      attn_implementation="sdpa")
    tm = GPT2LMHeadModel(conf).cuda().float()
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.1, fused=half is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)
    tx = torch.randint(0, V, (b, s), device="cuda")

    def theirs():
        topt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=half or torch.float32, enabled=half is not None):
            loss = tm(input_ids=tx, labels=tx).loss
        scaler.scale(loss).backward()
        scaler.step(topt)
        scaler.update()
    t_theirs = timed(theirs, args.steps, torch.cuda.synchronize)
    if args.profile:
        profile_theirs(theirs)
    name = torch.cuda.get_device_name()
    theirs_name = "eager" if half is None else f"eager, {args.dtype} autocast"
    print(f"{name}, L{L} h{h} V{V}, batch {b} x {s}, {args.dtype}: PyTorch {theirs_name} "
          f"{b * s / t_theirs:.0f} tokens/s ({1e3 * t_theirs:.0f} ms/step, "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved)")
    for path, (t, gib) in t_ours.items():
        print(f"  refgpt cupy, {path} attention: {b * s / t:.0f} tokens/s ({1e3 * t:.0f} ms/step, "
              f"{gib:.1f} GiB in CuPy's pool); "
              f"ratio {t_theirs / t:.2f}")


if __name__ == "__main__":
    main()
