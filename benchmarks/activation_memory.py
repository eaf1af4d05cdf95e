"""Activation memory, three ways, side by side: refgpt's registry (what the layers held for
backward at its peak, counted: refgpt.nn.activations), refgpt's formula for it, Korthikanti
et al.'s formula (Megatron's layer, 16-bit, one-byte masks) and the process's peak RSS, for
one training step of python -m refgpt.train per layout and recomputation setting, on rank 0
(the first pipeline stage, which holds the most).

    python benchmarks/activation_memory.py                      # GPT-2 124M, bf16, b 1 x 1024
    python benchmarks/activation_memory.py --model 350m         # 24 layers, hidden 1024
    python benchmarks/activation_memory.py --layouts 1 tp2-sp   # some layouts only
    python benchmarks/activation_memory.py --launcher "mpirun --allow-run-as-root --oversubscribe"

Peak RSS also holds the parameters, gradients and optimizer state (the "static" column: the
registry's buffers), the arrays a step makes and frees (gradients flowing back, GEMM outputs
before rounding), NumPy's and numba's own memory, and what the allocator keeps.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"124m": (12, 768, 12), "350m": (24, 1024, 16)}   # layers, hidden, heads
LAYOUTS = {  # name: (ranks, refgpt.train flags)
    "1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}
RECOMPUTE = {"none": [], "selective": ["--recompute-granularity", "selective"],
             "full": ["--recompute-granularity", "full"]}


def one_step(args, ranks: int, flags: list[str]) -> dict:
    """memory_bytes of the first step's record (rank 0's)."""
    L, h, a = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        launcher = [*shlex.split(args.launcher), "-n", str(ranks)] if ranks > 1 else []
        cmd = [*launcher, sys.executable, "-m", "refgpt.train", "--synthetic-data",
               "--num-layers", str(L), "--hidden-size", str(h), "--num-attention-heads", str(a),
               "--seq-length", str(args.seq), "--vocab-size", "50257",
               "--micro-batch-size", str(args.micro), "--global-batch-size",
               str(2 * args.micro), "--train-iters", "1", "--eval-iters", "0", "--dropout",
               "0.1", "--backend", "numba", "--no-progress", "--log-jsonl", str(log),
               *(["--bf16"] if args.dtype == "bfloat16" else []), *flags]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(log.read_text().splitlines()[-1])["memory_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    ap.add_argument("--launcher", default="mpiexec")
    args = ap.parse_args()
    mib = 2.0 ** -20
    print(f"# {args.model}, {args.dtype}, micro-batch {args.micro} x {args.seq}, dropout 0.1, "
          f"2 micro-batches per step; MiB on rank 0")
    print("| layout | recomputation | registry | refgpt formula | Korthikanti et al. | "
          "static | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for layout in args.layouts:
        ranks, flags = LAYOUTS[layout]
        for name, more in RECOMPUTE.items():
            m = one_step(args, ranks, flags + more)
            static = m["params"] + m["grads"] + m["optimizer"]
            formula = f"{m['activations_formula'] * mib:.1f}" if m["activations_formula"] else "-"
            print(f"| {layout} | {name} | {m['activations'] * mib:.1f} | {formula} | "
                  f"{m['activations_korthikanti'] * mib:.1f} | {static * mib:.0f} | "
                  f"{m['peak_rss'] * mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
