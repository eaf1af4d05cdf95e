"""``python -m refgpt.generate --load DIR --prompt "..."``: sample from a trained model.

Each new token runs the model on that token only, reusing the keys and values of earlier
positions from a KV cache. Sampling: logits / temperature, optionally only the top-k kept,
then a draw from the softmax with a seeded generator; --temperature 0 is greedy (argmax).
Generation stops at the position table's end or at <|endoftext|>.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .checkpoint import load_checkpoint
from .cli import exit_on_user_error, parser
from .config import ModelConfig
from .data.tokenizer import EOT, load_tokenizer
from .nn import GPT


def pick(logits: np.ndarray, temperature: float, top_k: int, rng) -> int:
    """Next token id from the logits [V] of the last position."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        cutoff = np.partition(z, -top_k)[-top_k]
        z = np.where(z < cutoff, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(len(z), p=p / p.sum()))


def generate(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, stop_id: int | None = None,
             use_cache: bool = True) -> list[int]:
    """The prompt's continuation (new ids only). use_cache=False reruns the full sequence
    every token, the specification the cached path is tested against."""
    if not prompt:
        raise ValueError("the prompt is empty")
    limit = model.cfg.n_positions
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's position table "
                         f"holds {limit}")
    rng = np.random.default_rng(seed)
    cache = model.new_cache() if use_cache else None
    ids, out = list(prompt), []
    feed = ids
    for _ in range(min(max_new_tokens, limit - len(prompt))):
        logits = model.logits(np.array([feed]), cache)[0, -1]   # [V]
        nxt = pick(logits, temperature, top_k, rng)
        if nxt == stop_id:
            break
        out.append(nxt)
        ids.append(nxt)
        feed = [nxt] if use_cache else ids
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = parser("refgpt.generate", __doc__)
    ap.add_argument("--load", required=True, help="checkpoint folder (written by --save)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text to continue (needs the checkpoint's tokenizer)")
    group.add_argument("--prompt-ids", help="comma-separated token ids to continue")
    ap.add_argument("--max-new-tokens", type=int, default=100,
                    help="tokens to add at most; generation also stops at <|endoftext|> and at "
                         "the end of the position table [default: 100]")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy [default: 0.8]")
    ap.add_argument("--top-k", type=int, default=40,
                    help="sample among the k likeliest tokens (0: all) [default: 40]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling [default: 0]")
    return ap


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--temperature", args.temperature), ("--max-new-tokens", args.max_new_tokens),
                        ("--top-k", args.top_k)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    ckpt = load_checkpoint(args.load, with_optimizer=False)
    cfg = ModelConfig.from_dict(ckpt.state["model"])
    model = GPT(cfg, ckpt.params["wte.weight"].dtype)    # fp32 for a 16-bit run's (its master)
    model.params.load_state_dict(ckpt.params)
    tok = load_tokenizer(ckpt.tokenizer) if ckpt.tokenizer else None
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"{ckpt.path} has no tokenizer (trained on synthetic data?); "
                             f"use --prompt-ids")
        prompt = tok.encode(args.prompt).ids
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError("--prompt-ids must be comma-separated integers") from None
        if any(not 0 <= t < cfg.vocab_size for t in prompt):
            raise ValueError(f"--prompt-ids must lie in [0, {cfg.vocab_size})")
    stop = tok.token_to_id(EOT) if tok else None
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, stop)
    if tok is None:
        print(",".join(map(str, prompt + new)))
    elif args.prompt is not None:
        print(args.prompt + tok.decode(new))
    else:
        print(tok.decode(prompt + new))
    room = cfg.n_positions - len(prompt)
    if len(new) < args.max_new_tokens and len(new) == room:
        print(f"(stopped after {len(new)} new tokens: the model's position table holds "
              f"{cfg.n_positions})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
