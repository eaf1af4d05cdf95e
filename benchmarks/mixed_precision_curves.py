"""The default run (``python -m refgpt.train``: ~5M GPT-2, the stdlib corpus, 200 steps) in
float32, --bf16 and --fp16, and a plain PyTorch loop with CPU bf16 autocast from the same
initial weights and the same batches: the loss curves side by side.

    python benchmarks/mixed_precision_curves.py                       # 200 steps, ~20 min on 2 cores
    python benchmarks/mixed_precision_curves.py --train-iters 20      # a quick look

The PyTorch loop is Hugging Face's GPT2LMHeadModel (SDPA attention) under
torch.autocast("cpu", torch.bfloat16), which keeps fp32 weights, runs the GEMMs in bf16 and
the reductions in fp32: the mixed precision a PyTorch user runs on a CPU. It takes refgpt's
batches (the micro-batches of each step, in order), its loss normalisation (token losses
summed over the global batch, divided by its token count), its AdamW groups and
hyper-parameters, gradient clipping and learning-rate schedule (refgpt.optim.learning_rate).

Writes the curves to --out (a PNG) and prints each run's final loss, its mean over the last
20 steps and its validation loss, relative to float32's.
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def refgpt_run(mcfg, tcfg, dtype: str) -> tuple:
    """(losses, validation loss, initial fp32 weights, seconds, trainer) of the default run."""
    from refgpt.engine import Trainer
    t = Trainer(mcfg, replace(tcfg, dtype=dtype), log=lambda *_: None)
    start = {k: v.astype(np.float32) for k, v in t.model.full_tensors(t.opt.p.copy()).items()}
    t0 = time.perf_counter()
    hist = t.run()
    return [h["loss"] for h in hist], hist[-1]["val_loss"], start, time.perf_counter() - t0, t


def torch_run(mcfg, tcfg, start: dict, trainer) -> tuple[list[float], float, float]:
    """The PyTorch autocast-bf16 loop over the trainer's batches, from the weights start."""
    import torch
    import torch.nn.functional as F
    from refgpt.interop import hf_gpt2
    GPT2Config, GPT2LMHeadModel = hf_gpt2()

    from refgpt.interop import hf_config, hf_state_dict
    from refgpt.optim import learning_rate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**hf_config(mcfg), "attn_implementation": "sdpa"}))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
             hf_state_dict(start, mcfg).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params.values() if p.ndim == 2], "weight_decay": tcfg.weight_decay},
         {"params": [p for p in params.values() if p.ndim != 2], "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    V, batches, norm = mcfg.vocab_size, trainer.batches, trainer.batches.norm

    def loss_of(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=torch.from_numpy(x)).logits
        return F.cross_entropy(logits.float().reshape(-1, V), torch.from_numpy(y).reshape(-1),
                               reduction="sum") / norm

    losses, t0 = [], time.perf_counter()
    for it in range(tcfg.train_iters):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y, _ in batches.step(it * tcfg.global_batch_size, it):
            loss = loss_of(x, y)
            loss.backward()
            total += loss.item()
        for group in opt.param_groups:
            group["lr"] = learning_rate(it, lr=tcfg.lr, min_lr=tcfg.min_lr,
                                        warmup=tcfg.lr_warmup_iters,
                                        decay_iters=tcfg.lr_decay_iters or tcfg.train_iters,
                                        style=tcfg.lr_decay_style, init=tcfg.lr_warmup_init)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
        opt.step()
        losses.append(total)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        val_batches, val_norm = batches.validation()
        val = sum(float(loss_of(x, y)) * norm / val_norm for x, y, _ in val_batches)
    return losses, val, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-iters", type=int, default=200)
    ap.add_argument("--out", default="docs/mixed-precision/loss-curves.png")
    args = ap.parse_args()
    import torch                             # before numba starts its OpenMP pool (refgpt.kernels)
    from refgpt.config import ModelConfig, TrainConfig
    from refgpt.metrics import machine_key

    mcfg, tcfg = ModelConfig(), replace(TrainConfig(), train_iters=args.train_iters)
    runs = {}
    for dtype in ("float32", "bfloat16", "float16"):
        losses, val, start, seconds, trainer = refgpt_run(mcfg, tcfg, dtype)
        runs[f"refgpt {dtype}"] = (losses, val, seconds)
        if dtype == "float32":
            ref_start, ref_trainer = start, trainer
        print(f"refgpt {dtype}: {seconds:.0f} s", flush=True)
    runs["PyTorch bf16 autocast"] = torch_run(mcfg, tcfg, ref_start, ref_trainer)
    print(f"# {machine_key('numba', np.float32)}; torch {torch.__version__}; "
          f"{args.train_iters} steps of the default run")
    base, base_val = runs["refgpt float32"][0], runs["refgpt float32"][1]
    print("| run | final loss | mean of last 20 | vs float32 | validation loss | vs float32 | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (losses, val, seconds) in runs.items():
        tail, ref = np.mean(losses[-20:]), np.mean(base[-20:])
        print(f"| {name} | {losses[-1]:.4f} | {tail:.4f} | {100 * (tail / ref - 1):+.2f}% | "
              f"{val:.4f} | {100 * (val / base_val - 1):+.2f}% | {seconds:.0f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (losses, _, _) in runs.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("default run: refgpt in three precisions, PyTorch bf16 autocast")
    ax.legend()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
