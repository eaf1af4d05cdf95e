"""Write a refgpt-compatible dump (names in refgpt.dump) from a Hugging Face GPT-2 model.

    python -m refgpt.convert --to hf runs/mine hf_mine             # or any GPT-2 folder
    python examples/hf_dump.py hf_mine theirs.safetensors           # batch 2 x n_positions, float64
    python -m refgpt.validate --compare theirs.safetensors         # vs refgpt on the same weights

The tokens are drawn as ``refgpt.validate --dump`` draws them (seed, batch, and the model's
positions as the length), so a refgpt dump of the same checkpoint with the same --seed and
--micro-batch-size holds the same batch and the two compare tensor by tensor.

The same recipe works for any framework: run one batch, capture each named activation
(here with forward hooks), compute the mean token cross-entropy, backpropagate, and save
activations, gradients and weights (weights in GPT-2's [in, out] Conv1D layout).
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from refgpt.checkpoint import write_tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="a Hugging Face GPT-2 folder (config.json, model.safetensors)")
    ap.add_argument("out", help="the dump to write (.safetensors)")
    ap.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    ap.add_argument("--seq", type=int, default=0, help="tokens per sequence (default: n_positions)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tokens (default 0)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                    help="(default float64)")
    args = ap.parse_args()

    model = GPT2LMHeadModel.from_pretrained(args.hf_dir, attn_implementation="eager")
    model = model.to(getattr(torch, args.dtype)).eval()        # eval: dropout off
    conf = model.config
    T = args.seq or conf.n_positions
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, conf.vocab_size, (args.batch, T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    acts = {}

    def keep(name, pre=False):
        def hook(module, inputs, output=None):
            value = inputs[0] if pre else (output[0] if isinstance(output, tuple) else output)
            acts[name] = value.detach().numpy().copy()
        return hook

    tr = model.transformer
    tr.drop.register_forward_hook(keep("embed"))
    for i, block in enumerate(tr.h):
        p = f"h.{i}"
        block.ln_1.register_forward_hook(keep(f"{p}.ln_1"))
        block.attn.c_attn.register_forward_hook(keep(f"{p}.attn.qkv"))
        block.attn.c_proj.register_forward_hook(keep(f"{p}.attn.out"))
        block.ln_2.register_forward_pre_hook(keep(f"{p}.resid_attn", pre=True))
        block.ln_2.register_forward_hook(keep(f"{p}.ln_2"))
        block.mlp.c_fc.register_forward_hook(keep(f"{p}.mlp.fc"))
        block.mlp.act.register_forward_hook(keep(f"{p}.mlp.gelu"))
        block.mlp.c_proj.register_forward_hook(keep(f"{p}.mlp.out"))
        block.register_forward_hook(keep(f"{p}.resid_mlp"))
    tr.ln_f.register_forward_hook(keep("ln_f"))

    out = model(input_ids=torch.from_numpy(x), output_attentions=True)
    loss = F.cross_entropy(out.logits.reshape(-1, conf.vocab_size), torch.from_numpy(y).reshape(-1))
    loss.backward()

    dump = {"input_ids": x.astype(np.int64), "targets": y.astype(np.int64),
            "logits": out.logits.detach().numpy(), "loss": loss.detach().numpy()}
    dump.update(acts)
    for i, probs in enumerate(out.attentions):
        dump[f"h.{i}.attn.probs"] = probs.detach().numpy()
    for name, param in model.named_parameters():          # lm_head is tied to wte: listed once
        short = name.removeprefix("transformer.")
        dump[f"param.{short}"] = param.detach().numpy()
        dump[f"grad.{short}"] = param.grad.numpy()
    gelu = "erf" if conf.activation_function == "gelu" else "tanh"
    meta = {"refgpt_model": json.dumps({"gelu": gelu, "layernorm_eps": conf.layer_norm_epsilon}),
            "source": f"transformers GPT2LMHeadModel from {args.hf_dir}"}
    path = write_tensors(dump, args.out, metadata=meta)
    print(f"wrote {path}: {len(dump)} tensors, {path.stat().st_size / 2**20:.1f} MiB "
          f"({args.batch} sequences of {T} tokens, {args.dtype})")


if __name__ == "__main__":
    main()
