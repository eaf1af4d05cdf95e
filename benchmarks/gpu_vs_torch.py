"""One GPU: a training step (forward, backward, AdamW) of refgpt's cupy backend against
PyTorch eager on the same GPU, same model, batch and dtype, side by side in one run.

    python benchmarks/gpu_vs_torch.py                        # GPT-2 124M, batch 8 x 1024, float32
    python benchmarks/gpu_vs_torch.py --batch 4 --seq 512

PyTorch runs Hugging Face's GPT2LMHeadModel with SDPA attention; TF32 is off for both (plain
float32 GEMMs: CuPy's default, and torch.backends.cuda.matmul.allow_tf32 = False). Prints
tokens/s for each (best of --steps after a warm-up).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    import cupy as cp
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from refgpt import backend
    from refgpt.config import ModelConfig
    from refgpt.nn import GPT
    from refgpt.optim import AdamW
    L, h, V, s, b = args.layers, args.hidden, args.vocab, args.seq, args.batch
    torch.backends.cuda.matmul.allow_tf32 = False
    backend.set_backend("cupy")
    cfg = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=h // 64, seq_length=s,
                      vocab_size=V)
    model = GPT(cfg, np.float32, seed=0)
    p = model.params
    opt = AdamW(p.data, p.grad, p.decay_ranges(), weight_decay=0.1)
    rng = np.random.default_rng(0)
    x, y = cp.asarray(rng.integers(0, V, (b, s))), cp.asarray(rng.integers(0, V, (b, s)))

    def ours():
        p.zero_grad()
        model.forward(x, y, float(b * s))
        model.backward()
        opt.step(1e-4)
    t_ours = timed(ours, args.steps, backend.synchronize)
    del model, p, opt
    cp.get_default_memory_pool().free_all_blocks()

    conf = GPT2Config(n_layer=L, n_embd=h, n_head=h // 64, vocab_size=V, n_positions=s,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      attn_implementation="sdpa")
    tm = GPT2LMHeadModel(conf).cuda().float()
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.1)
    tx = torch.randint(0, V, (b, s), device="cuda")

    def theirs():
        topt.zero_grad(set_to_none=True)
        tm(input_ids=tx, labels=tx).loss.backward()
        topt.step()
    t_theirs = timed(theirs, args.steps, torch.cuda.synchronize)
    name = torch.cuda.get_device_name()
    print(f"{name}, L{L} h{h} V{V}, batch {b} x {s}, float32: "
          f"refgpt cupy {b * s / t_ours:.0f} tokens/s ({1e3 * t_ours:.0f} ms/step); PyTorch eager "
          f"{b * s / t_theirs:.0f} tokens/s ({1e3 * t_theirs:.0f} ms/step); ratio "
          f"{t_theirs / t_ours:.2f}")


if __name__ == "__main__":
    main()
