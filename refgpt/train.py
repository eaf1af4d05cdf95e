"""``python -m refgpt.train``: train a GPT with Megatron-LM style flags.

With no argument it trains the default ~5M-parameter model on the default corpus (the Python
standard library's source, tokenised on first use and cached). ``--help`` lists every flag;
``--config FILE.toml`` takes the same keys (dashes or underscores), and flags override it.

One iteration = one optimizer step over --global-batch-size sequences, processed as
global / micro micro-batches whose losses are each normalised by the global token count, so
the accumulated gradient is that of the whole batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import metrics
from .checkpoint import load_checkpoint, named_to_flat, save_checkpoint
from .cli import CheckpointError, exit_on_user_error
from .config import ConfigError, ModelConfig, TrainConfig
from .data.tokens import SyntheticDataset, TokenDataset, batch, read_meta
from .nn import GPT
from .optim import AdamW, clip_grad_, grad_norm, learning_rate
from .parallel.launch import launched_rank, launched_world_size

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# flag -> (config object, field, type, help). Flag names follow Megatron-LM.
MODEL_FLAGS = {
    "num-layers": ("num_layers", int, "transformer blocks L"),
    "hidden-size": ("hidden_size", int, "hidden size h"),
    "num-attention-heads": ("num_attention_heads", int, "attention heads a (must divide h)"),
    "seq-length": ("seq_length", int, "tokens per sequence s"),
    "max-position-embeddings": ("max_position_embeddings", int,
                                "rows of the position table (default: --seq-length)"),
    "vocab-size": ("vocab_size", int, "vocabulary size (default: the tokenizer's; 8192 for the "
                                      "default corpus and synthetic data)"),
    "make-vocab-size-divisible-by": ("vocab_multiple", int,
                                     "pad the embedding table to a multiple of this (default 64)"),
    "dropout": ("dropout", float, "dropout probability for embeddings, attention, residuals"),
    "gelu": ("gelu", str, "GELU form: tanh (GPT-2) or erf"),
}
TRAIN_FLAGS = {
    "micro-batch-size": ("micro_batch_size", int, "sequences per micro-batch"),
    "global-batch-size": ("global_batch_size", int, "sequences per optimizer step"),
    "train-iters": ("train_iters", int, "optimizer steps to train for"),
    "exit-interval": ("exit_interval", int, "stop (after saving) when iteration %% N == 0"),
    "lr": ("lr", float, "peak learning rate"),
    "min-lr": ("min_lr", float, "learning rate at the end of decay"),
    "lr-warmup-iters": ("lr_warmup_iters", int, "linear warm-up steps"),
    "lr-decay-style": ("lr_decay_style", str, "cosine, linear or constant"),
    "lr-decay-iters": ("lr_decay_iters", int, "steps of decay (default: --train-iters)"),
    "weight-decay": ("weight_decay", float, "AdamW decoupled decay on 2-D weights"),
    "clip-grad": ("clip_grad", float, "global gradient-norm clip (0: off)"),
    "adam-beta1": ("adam_beta1", float, "AdamW beta1"),
    "adam-beta2": ("adam_beta2", float, "AdamW beta2"),
    "adam-eps": ("adam_eps", float, "AdamW epsilon (added outside the square root)"),
    "seed": ("seed", int, "seed of initialisation, data order and dropout"),
    "dtype": ("dtype", str, "float32 or float64 (the reference precision)"),
    "data-path": ("data_path", str, "folder written by python -m refgpt.prepare "
                                    "(default: the Python stdlib corpus, prepared on first use)"),
    "eval-interval": ("eval_interval", int, "evaluate every N iterations (0: only at the end)"),
    "eval-iters": ("eval_iters", int, "global batches per evaluation (0: no evaluation)"),
    "save": ("save", str, "checkpoint folder to write"),
    "load": ("load", str, "checkpoint folder to resume from (model shape is taken from it)"),
    "save-interval": ("save_interval", int, "save every N iterations (0: only at the end)"),
    "log-interval": ("log_interval", int, "print a log line every N iterations"),
    "log-jsonl": ("log_jsonl", str, "append one JSON object per iteration to this file"),
}


def add_flags(ap: argparse.ArgumentParser, title: str, table: dict, defaults) -> None:
    """One argument group with a flag per table entry; values land on the config's field names."""
    group = ap.add_argument_group(title)
    for flag, (field, typ, text) in table.items():
        group.add_argument(f"--{flag}", type=typ, dest=field,
                           help=f"{text} [default: {getattr(defaults, field)!r}]")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m refgpt.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help="TOML file with the same keys as these flags")
    add_flags(ap, "model", MODEL_FLAGS, ModelConfig())
    add_flags(ap, "training", TRAIN_FLAGS, TrainConfig())
    ap.add_argument("--synthetic-data", action="store_true", dest="synthetic_data",
                    help="seeded random tokens instead of a corpus (tests, benchmarks)")
    ap.add_argument("--tp", "--tensor-model-parallel-size", type=int, dest="tp",
                    help="tensor-parallel size (not available yet)")
    ap.add_argument("--pp", "--pipeline-model-parallel-size", type=int, dest="pp",
                    help="pipeline-parallel size (not available yet)")
    ap.add_argument("--no-progress", action="store_false", dest="progress",
                    help="no progress bar (log lines only)")
    return ap


def parse_config(argv=None) -> tuple[ModelConfig, TrainConfig, set, dict]:
    """(model config, training config, names given explicitly, other options)."""
    given = vars(build_parser().parse_args(argv))
    values = {}
    if "config" in given:
        path = Path(given.pop("config"))
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = {k.replace("-", "_"): v for k, v in tomllib.loads(path.read_text()).items()}
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    values.update(given)
    model_fields = {f for f, *_ in MODEL_FLAGS.values()}
    train_fields = {f for f, *_ in TRAIN_FLAGS.values()} | {"synthetic_data"}
    other_fields = {"tp", "pp", "progress"}
    unknown = set(values) - model_fields - train_fields - other_fields
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    mcfg = ModelConfig(**{k: v for k, v in values.items() if k in model_fields})
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    other = {k: values[k] for k in other_fields if k in values}
    return mcfg, tcfg, set(values), other


class Trainer:
    """Owns the model, optimizer and data of one run; ``run()`` trains and returns the log."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, given: set = frozenset(),
                 log=print, progress: bool = False):
        self.log, self.progress = log, progress
        tcfg.validate()
        ckpt = load_checkpoint(tcfg.load) if tcfg.load else None
        if ckpt is not None:
            mcfg = ModelConfig.from_dict(ckpt.state["model"])
            log(f"resuming from {ckpt.path} (iteration {ckpt.state['iteration']}); "
                f"model shape taken from the checkpoint")
        self.tokenizer = None
        self.train_data, self.val_data = self._datasets(mcfg, tcfg, given, ckpt)
        mcfg.validate()
        self.mcfg, self.tcfg = mcfg, tcfg
        self.dtype = np.dtype(tcfg.dtype)
        self.model = GPT(mcfg, self.dtype, tcfg.seed)
        p = self.model.params
        self.opt = AdamW(p.data, p.grad, p.decay_mask(), betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                         eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay)
        self.iteration, self.consumed = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        self.gemm_rate = metrics.measure_gemm_rate(self.dtype)
        self.history: list[dict] = []

    def _datasets(self, mcfg, tcfg, given, ckpt):
        if tcfg.synthetic_data:
            return (SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "train"),
                    SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "val"))
        if tcfg.data_path:
            folder = Path(tcfg.data_path)
        else:
            from .prepare import default_data
            folder = default_data(mcfg.vocab_size, log=self.log)
        meta = read_meta(folder)
        if ckpt is None and "vocab_size" not in given:
            mcfg.vocab_size = meta["vocab_size"]
        if mcfg.vocab_size < meta["vocab_size"]:
            raise ConfigError(f"--vocab-size {mcfg.vocab_size} is smaller than the data's "
                              f"vocabulary ({meta['vocab_size']}, {folder})")
        tok = folder / "tokenizer.json"
        self.tokenizer = tok if tok.is_file() else None
        return (TokenDataset(folder, "train", mcfg.seq_length, tcfg.seed),
                TokenDataset(folder, "val", mcfg.seq_length, tcfg.seed))

    def _restore(self, ckpt) -> None:
        p = self.model.params
        try:
            p.load_state_dict(ckpt.params)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        named_to_flat(ckpt.optimizer, "exp_avg.", p, self.opt.m)
        named_to_flat(ckpt.optimizer, "exp_avg_sq.", p, self.opt.v)
        self.opt.t = ckpt.state["optimizer_step"]
        self.iteration = ckpt.state["iteration"]
        self.consumed = ckpt.state["consumed_samples"]

    # -- one optimizer step ------------------------------------------------------------
    def lr_at(self, iteration: int) -> float:
        t = self.tcfg
        return learning_rate(iteration, lr=t.lr, min_lr=t.min_lr, warmup=t.lr_warmup_iters,
                             decay_iters=t.lr_decay_iters or t.train_iters, style=t.lr_decay_style)

    def train_step(self) -> dict:
        t, model = self.tcfg, self.model
        t0 = time.perf_counter()
        G, B, T = t.global_batch_size, t.micro_batch_size, self.mcfg.seq_length
        norm = float(G * T)                               # global token count of the step
        model.params.zero_grad()
        loss = 0.0
        for first in range(self.consumed, self.consumed + G, B):
            ids = np.arange(first, first + B)
            x, y = batch(self.train_data, ids)
            loss += model.forward(x, y, norm, key=(self.iteration, ids))
            model.backward()
        lr = self.lr_at(self.iteration)
        gnorm = grad_norm(model.params.grad)
        skipped = not math.isfinite(gnorm)
        if not skipped:
            clip_grad_(model.params.grad, t.clip_grad, gnorm)
            self.opt.step(lr)
        self.iteration += 1
        self.consumed += G
        dt = time.perf_counter() - t0
        mflops = metrics.model_flops(self.mcfg, G)
        return {"iter": self.iteration, "consumed_samples": self.consumed, "loss": loss, "lr": lr,
                "grad_norm": gnorm, "skipped": int(skipped), "step_time_s": dt,
                "tokens_per_s": G * T / dt,
                "tflops": metrics.megatron_flops(G, T, self.mcfg.num_layers, self.mcfg.hidden_size,
                                                 self.mcfg.padded_vocab) / dt / 1e12,
                "model_tflops": mflops / dt / 1e12,
                "mfu": mflops / dt / self.gemm_rate}

    def evaluate(self) -> float:
        t, model = self.tcfg, self.model
        G, B, T = t.global_batch_size, t.micro_batch_size, self.mcfg.seq_length
        model.set_grad_enabled(False)
        total = 0.0
        try:
            for first in range(0, t.eval_iters * G, B):
                x, y = batch(self.val_data, np.arange(first, first + B), sequential=True)
                total += model.forward(x, y, float(t.eval_iters * G * T))
        finally:
            model.set_grad_enabled(True)
        return total

    def save(self) -> Path:
        state = {"consumed_samples": self.consumed, "dtype": self.tcfg.dtype,
                 "seed": self.tcfg.seed, "model": self.mcfg.to_dict(), "train": self.tcfg.to_dict()}
        path = save_checkpoint(self.tcfg.save, self.iteration, self.model.params, self.opt, state,
                               self.tokenizer)
        self.log(f"saved checkpoint {path}")
        return path

    # -- the loop ----------------------------------------------------------------------
    def log_line(self, r: dict) -> str:
        return (f" iteration {r['iter']:8d}/{self.tcfg.train_iters:8d} |"
                f" consumed samples: {r['consumed_samples']:10d} |"
                f" elapsed time per iteration (ms): {1e3 * r['step_time_s']:.1f} |"
                f" learning rate: {r['lr']:.3E} | global batch size: {self.tcfg.global_batch_size:5d} |"
                f" lm loss: {r['loss']:.6E} | grad norm: {r['grad_norm']:.3f} |"
                f" skipped iterations: {r['skipped']} | tokens/s: {r['tokens_per_s']:.0f} |"
                f" TFLOP/s: {r['tflops']:.3f} | MFU: {100 * r['mfu']:.1f}%")

    def run(self) -> list[dict]:
        t = self.tcfg
        self.log(f"model: {self.mcfg.num_layers} layers, hidden {self.mcfg.hidden_size}, "
                 f"{self.mcfg.num_attention_heads} heads, seq {self.mcfg.seq_length}, vocab "
                 f"{self.mcfg.vocab_size} (padded {self.mcfg.padded_vocab}), "
                 f"{self.model.params.numel:,} parameters, {t.dtype}; global batch "
                 f"{t.global_batch_size} = {t.grad_accum_steps} x micro-batch {t.micro_batch_size}; "
                 f"measured GEMM rate {self.gemm_rate / 1e9:.1f} GFLOP/s")
        jsonl = open(t.log_jsonl, "a" if t.load else "w") if t.log_jsonl else None
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=t.train_iters, initial=self.iteration, unit="it", disable=None,
                       dynamic_ncols=True)
            self.log = bar.write
        try:
            while self.iteration < t.train_iters:
                r = self.train_step()
                last = self.iteration == t.train_iters
                stop = bool(t.exit_interval) and self.iteration % t.exit_interval == 0
                if t.eval_iters and ((t.eval_interval and self.iteration % t.eval_interval == 0)
                                     or last):
                    r["val_loss"] = self.evaluate()
                self.history.append(r)
                if jsonl:
                    jsonl.write(json.dumps(r) + "\n")
                    jsonl.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}")
                if self.iteration % t.log_interval == 0 or last or stop:
                    self.log(self.log_line(r))
                if "val_loss" in r:
                    self.log(f" validation loss at iteration {r['iter']}: {r['val_loss']:.6E} | "
                             f"perplexity: {math.exp(min(r['val_loss'], 50)):.3f}")
                if t.save and ((t.save_interval and self.iteration % t.save_interval == 0)
                               or last or stop):
                    self.save()
                if stop:
                    self.log(f"exiting at iteration {self.iteration} (--exit-interval)")
                    break
        finally:
            if bar is not None:
                bar.close()
            if jsonl:
                jsonl.close()
        return self.history


def check_launch(other: dict) -> None:
    """Refuse layouts that are not built yet, on every rank, before any work."""
    world = launched_world_size()
    if world > 1:
        raise ConfigError(f"launched with {world} processes, but multi-process training "
                          f"(data parallelism) is not implemented yet (issue #4); run one process")
    for key, what, issue in (("tp", "tensor", 5), ("pp", "pipeline", 6)):
        if other.get(key, 1) != 1:
            raise ConfigError(f"--{key} {other[key]}: {what} parallelism is not implemented yet "
                              f"(issue #{issue})")


@exit_on_user_error
def main(argv=None) -> int:
    mcfg, tcfg, given, other = parse_config(argv)
    try:
        check_launch(other)
    except ConfigError:
        if launched_rank() != 0:
            sys.exit(2)
        raise
    Trainer(mcfg, tcfg, given, progress=other.get("progress", True)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
