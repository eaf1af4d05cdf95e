"""``python -m refgpt.validate``: refgpt checked against an independent implementation.

    python -m refgpt.validate --against hf [model flags] [--dtype float64] [--steps 3]
    python -m refgpt.validate --dump run.safetensors --load CKPT [--data-path DATA]
    python -m refgpt.validate --compare theirs.safetensors [reference.safetensors]

--against hf builds a randomly initialised Hugging Face GPT2LMHeadModel of the same shape
(PyTorch, eager attention, dropout off, TF32 off; biases and LayerNorm parameters perturbed so
that no path hides behind zeros), copies its weights into refgpt, runs the same batch in both,
and compares the logits, the loss, every parameter gradient, then the parameters after
--steps AdamW steps (torch.optim.AdamW with the same hyper-parameters, LR schedule, clipping and
decay groups; a new batch each step).

In float64 every tensor agrees to 1e-10 (measured on GPT-2 124M's shape: gradients to
1.4e-14, parameters after 3 steps to 1.1e-12), tight enough that an optimizer slip (decay on
the wrong tensors, a missing bias correction) fails. In float32 the parameters agree to 1e-4
after small steps (the default schedule: lr 1e-3 with 20 warm-up iterations, so the first
steps use lr <= 1.5e-4) but not after large ones: AdamW normalises every element's step to
about lr, so the float32 rounding of a small gradient element (a relative error of up to
~1e-2; the key bias's gradient is even pure rounding noise, zero in exact arithmetic) becomes
a difference of up to ~1e-2 lr in that parameter, in any two implementations alike. float64
is the tight check of the optimizer; float32 checks that the float32 path is sane.

--dump writes the inputs, every activation, the loss, every gradient and the weights of one
batch under the names documented in :mod:`refgpt.dump`. --compare checks a dump (refgpt's or
another framework's) against a second dump, or, with one file, against refgpt recomputing the
same batch from the dump's own weights and inputs.

Each prints a table (name, shape, max abs err, max rel err, pass/fail), the first divergence,
and ends with ``max_rel_err=<x> PASS`` or ``FAIL``; the exit status is 0 only on PASS. The
relative error of a tensor is max|a - b| / max|b|; the tolerance is 1e-10 in float64 and 1e-4
in float32 (--rtol changes it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys

import numpy as np
from safetensors import safe_open

from .checkpoint import load_checkpoint, write_tensors
from .cli import exit_on_user_error, parser
from .config import ConfigError, ModelConfig, TrainConfig
from .dump import compare, format_table, make_dump
from .interop import refgpt_state_dict
from .nn import GPT
from .optim import AdamW, clip_grad_, grad_norm, learning_rate
from .train import MODEL_FLAGS, TRAIN_FLAGS, add_flags

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
OPT_FLAGS = {k: TRAIN_FLAGS[k] for k in ("lr", "min-lr", "lr-warmup-iters", "lr-warmup-init",
                                         "lr-decay-style",
                                         "weight-decay", "clip-grad", "adam-beta1", "adam-beta2",
                                         "adam-eps")}


def batches(cfg: ModelConfig, size: int, seed: int):
    """Seeded random token batches (inputs, targets) of [size, seq_length]."""
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(0, cfg.vocab_size, (size, cfg.seq_length + 1))
        yield tokens[:, :-1], tokens[:, 1:]


def against_hf(cfg: ModelConfig, opt: TrainConfig, steps: int, size: int, seed: int) -> list:
    import torch
    import torch.nn.functional as F
    from .interop import hf_config, hf_gpt2
    GPT2Config, GPT2LMHeadModel = hf_gpt2()
    if cfg.dropout:
        raise ConfigError("validation runs with --dropout 0 (dropout masks differ between frameworks)")
    dtype = np.dtype(opt.dtype)
    tdtype = {"float64": torch.float64, "float32": torch.float32}[opt.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    conf = GPT2Config(**{**hf_config(cfg), "attn_implementation": "eager"})
    hf = GPT2LMHeadModel(conf).to(tdtype).train()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    named = {n[len("transformer."):]: p for n, p in hf.named_parameters()}

    model = GPT(cfg, dtype)
    model.params.load_state_dict(refgpt_state_dict(
        {n: p.detach().numpy() for n, p in named.items()}, cfg))
    p = model.params
    mine = AdamW(p.data, p.grad, p.decay_ranges(), betas=(opt.adam_beta1, opt.adam_beta2),
                 eps=opt.adam_eps, weight_decay=opt.weight_decay)
    theirs = torch.optim.AdamW(
        [{"params": [t for t in named.values() if t.ndim == 2], "weight_decay": opt.weight_decay},
         {"params": [t for t in named.values() if t.ndim != 2], "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps, foreach=False)

    V = cfg.vocab_size
    data = batches(cfg, size, seed)
    rows = []
    for k in range(max(steps, 1)):
        x, y = next(data)
        record = {}
        p.zero_grad()
        loss = model.forward(x, y, float(x.size), record=record)
        model.backward()
        theirs.zero_grad()
        logits = hf(input_ids=torch.from_numpy(x)).logits
        tloss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1))
        tloss.backward()
        if k == 0:
            ours = {"logits": record["logits"], "loss": np.array(loss)}
            ref = {"logits": logits.detach().numpy(), "loss": tloss.detach().numpy()}
            for n, t in named.items():
                ours[f"grad.{n}"] = p.grads[n][:V] if n == "wte.weight" else p.grads[n]
                ref[f"grad.{n}"] = t.grad.numpy()
            rows += compare(ours, ref, TOLERANCE[opt.dtype])
        else:
            rows += compare({f"step{k}.loss": np.array(loss)},
                            {f"step{k}.loss": tloss.detach().numpy()}, TOLERANCE[opt.dtype])
        if steps == 0:
            break
        lr = learning_rate(k, lr=opt.lr, min_lr=opt.min_lr, warmup=opt.lr_warmup_iters,
                           decay_iters=steps, style=opt.lr_decay_style, init=opt.lr_warmup_init)
        clip_grad_(p.grad, opt.clip_grad, grad_norm(p.grad))
        mine.step(lr)
        if opt.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(hf.parameters(), opt.clip_grad)
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
    if steps:
        ours = {f"param.{n}": (p[n][:V] if n == "wte.weight" else p[n]) for n in named}
        ref = {f"param.{n}": t.detach().numpy() for n, t in named.items()}
        rows += compare(ours, ref, TOLERANCE[opt.dtype])
    return rows


def read_dump(path) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"dump not found: {path}") from None
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"corrupt dump {path}: {e}") from None
    return tensors, meta


def config_of_dump(t: dict, meta: dict) -> ModelConfig:
    """The model shape behind a dump: from its shapes, plus gelu/eps from its metadata."""
    try:
        V, C = t["param.wte.weight"].shape
        B, H, T, _ = t["h.0.attn.probs"].shape
        L = 1 + max(int(m.group(1)) for n in t if (m := re.match(r"param\.h\.(\d+)\.", n)))
        extra = json.loads(meta.get("refgpt_model", "{}"))
        return ModelConfig(num_layers=L, hidden_size=C, num_attention_heads=H, seq_length=T,
                           max_position_embeddings=t["param.wpe.weight"].shape[0], vocab_size=V,
                           gelu=extra.get("gelu", "tanh"),
                           layernorm_eps=extra.get("layernorm_eps", 1e-5))
    except (KeyError, ValueError) as e:
        raise ValueError(f"the dump lacks what refgpt needs to recompute it ({e}); "
                         f"see refgpt.dump for the names") from None


def recompute(t: dict, meta: dict) -> dict:
    """refgpt's own dump of the batch in ``t``, made with the weights in ``t``."""
    cfg = config_of_dump(t, meta)
    model = GPT(cfg, t["param.wte.weight"].dtype)
    params = {n[len("param."):]: v for n, v in t.items() if n.startswith("param.")}
    model.params.load_state_dict(refgpt_state_dict(params, cfg))
    return make_dump(model, t["input_ids"], t["targets"])


def write_dump(args) -> None:
    ckpt = load_checkpoint(args.load, with_optimizer=False)
    cfg = ModelConfig.from_dict(ckpt.state["model"])
    cfg.dropout = 0.0
    dtype = getattr(args, "dtype", None) or ckpt.params["wte.weight"].dtype.name   # as stored
    model = GPT(cfg, np.dtype(dtype))
    model.params.load_state_dict(ckpt.params)
    if getattr(args, "data_path", None):
        from .data.tokens import TokenDataset, batch
        x, y = batch(TokenDataset(args.data_path, "val", cfg.seq_length, args.seed),
                     range(args.micro_batch_size), sequential=True)
    else:
        x, y = next(batches(cfg, args.micro_batch_size, args.seed))
    meta = {"refgpt_model": json.dumps(cfg.to_dict()), "checkpoint": str(ckpt.path)}
    dump = make_dump(model, x, y)
    path = write_tensors(dump, args.dump, metadata=meta)
    print(f"wrote {path}: {len(dump)} tensors, {path.stat().st_size / 2**20:.1f} MiB "
          f"({len(x)} sequences of {cfg.seq_length} tokens, {dtype})")


def build_parser() -> argparse.ArgumentParser:
    ap = parser("refgpt.validate", __doc__, argument_default=argparse.SUPPRESS)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--against", choices=["hf"], help="compare with Hugging Face GPT-2 (PyTorch)")
    mode.add_argument("--dump", metavar="FILE", help="write a dump of one batch (needs --load)")
    mode.add_argument("--compare", nargs="+", metavar="FILE",
                      help="compare a dump with a reference dump, or with refgpt's recomputation")
    ap.add_argument("--dtype", choices=list(TOLERANCE), help="float64 (default for --against) or float32")
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps compared by --against (default 3)")
    ap.add_argument("--micro-batch-size", type=int, default=2, dest="micro_batch_size",
                    help="sequences in the batch (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default 0)")
    ap.add_argument("--load", help="checkpoint for --dump")
    ap.add_argument("--data-path", dest="data_path",
                    help="--dump: take the batch from this prepared folder's validation split "
                         "(default: seeded random tokens)")
    ap.add_argument("--rtol", type=float, help="relative tolerance (default 1e-10 float64, 1e-4 float32)")
    add_flags(ap, "model (for --against)", MODEL_FLAGS, ModelConfig())
    add_flags(ap, "optimizer (for --against)", OPT_FLAGS, TrainConfig())
    return ap


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = vars(args)
    # no backend is entered: the readable references are what is validated
    if args.micro_batch_size < 1 or args.steps < 0:
        raise ConfigError("--micro-batch-size must be >= 1 and --steps >= 0")
    if "dump" in given:
        if "load" not in given:
            raise ConfigError("--dump needs --load CKPT")
        write_dump(args)
        return 0
    if "compare" in given:
        if len(args.compare) > 2:
            raise ConfigError("--compare takes one or two files")
        other, meta = read_dump(args.compare[0])
        ref = read_dump(args.compare[1])[0] if len(args.compare) == 2 else recompute(other, meta)
        dtype = "float64" if ref["param.wte.weight"].dtype == np.float64 else "float32"
    else:
        model_fields = {f for f, *_ in MODEL_FLAGS.values()}
        cfg = ModelConfig(**{k: v for k, v in given.items() if k in model_fields})
        cfg.validate()
        opt_fields = {f for f, *_ in OPT_FLAGS.values()}
        dtype = given.get("dtype", "float64")
        opt = TrainConfig(dtype=dtype, **{k: v for k, v in given.items() if k in opt_fields})
        opt.validate()
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--against hf needs {' and '.join(missing)}, not installed: "
                              f"pip install torch transformers (refgpt's dev "
                              f"extra pins the versions it is tested with)")
        other = None
        rows = against_hf(cfg, opt, args.steps, args.micro_batch_size, args.seed)
    rtol = given.get("rtol", TOLERANCE[dtype])
    if other is not None:
        rows = compare(other, ref, rtol)
    else:
        rows = [(n, s, a, r, r <= rtol) for n, s, a, r, _ in rows]          # --rtol applies
    print(format_table(rows, rtol))
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
