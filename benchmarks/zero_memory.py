"""Per-rank memory and data-parallel traffic of ZeRO stages 0-3, measured next to the formulas.

Trains a GPT (default ~98M parameters: 12 layers, hidden 768, vocabulary 16384, float32) for
a few steps at each data-parallel size and ZeRO stage, one ``python -m refgpt.train`` job per
cell, and reads the last JSONL record of rank 0: the memory registry (parameters, gradients,
AdamW moments), the formula for the same buffers, the peak of ZeRO's temporary unit buffers,
the process's peak RSS, the bytes moved over the data-parallel group in one step, and the
step time. Prints a Markdown table (and writes it as JSON with --json).

    python benchmarks/zero_memory.py                        # DP 1 2 4 8, stages 0-3
    python benchmarks/zero_memory.py --dp 1 2 --layers 2    # a quick look
    python benchmarks/zero_memory.py --launcher "mpirun --allow-run-as-root --oversubscribe"

Peak RSS includes what every process has besides the registry: the interpreter and libraries,
activations of one micro-batch, the one-off float64 draw of the largest parameter at
initialisation, and the optimizer's chunked temporaries.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2 ** 20


def run_cell(args, d: int, stage: int, folder: Path) -> dict:
    log = folder / f"d{d}_s{stage}.jsonl"
    cmd = [*shlex.split(args.launcher), "-n", str(d), sys.executable, "-m", "refgpt.train",
           "--synthetic-data", "--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
           "--num-attention-heads", str(args.hidden // 64), "--seq-length", str(args.seq),
           "--vocab-size", str(args.vocab), "--micro-batch-size", "1",
           "--global-batch-size", str(d * args.micro_batches), "--train-iters", str(args.iters),
           "--eval-iters", "0", "--zero-stage", str(stage), "--log-jsonl", str(log),
           "--no-progress", "--threads-per-rank", "1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rec = json.loads(log.read_text().splitlines()[-1])
    mem = rec["memory_bytes"]
    return {"dp": d, "stage": stage, "params_mib": mem["params"] / MIB,
            "grads_mib": mem["grads"] / MIB, "optimizer_mib": mem["optimizer"] / MIB,
            "registry_mib": (mem["params"] + mem["grads"] + mem["optimizer"]) / MIB,
            "formula_mib": mem["formula"] / MIB, "working_peak_mib": mem["working_peak"] / MIB,
            "peak_rss_mib": mem["peak_rss"] / MIB, "dp_traffic_mib": rec["dp_comm_bytes"] / MIB,
            "step_s": rec["step_time_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batches", type=int, default=2, help="per rank and step")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--launcher", default=os.environ.get("MPIEXEC", "mpiexec"))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dp:
            for stage in args.stages:
                rows.append(run_cell(args, d, stage, Path(tmp)))
                print(f"done: dp {d} stage {stage}", file=sys.stderr, flush=True)
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, seq {args.seq}, "
          f"float32; {args.micro_batches} micro-batches of 1 sequence per rank and step\n")
    print("| DP | ZeRO | params | grads | optimizer | registry | formula | temporaries peak "
          "| peak RSS | DP traffic / step | step time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dp']} | {r['stage']} | {r['params_mib']:.1f} | {r['grads_mib']:.1f} | "
              f"{r['optimizer_mib']:.1f} | {r['registry_mib']:.1f} | {r['formula_mib']:.1f} | "
              f"{r['working_peak_mib']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['dp_traffic_mib']:.1f} | {r['step_s']:.2f} s |")
    print("\nsizes in MiB per rank (rank 0)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
