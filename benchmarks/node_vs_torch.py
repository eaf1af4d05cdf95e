"""A whole node: refgpt as data-parallel MPI ranks (by default one per core, one thread each)
against PyTorch eager with one process and a thread per core, on the same model and global batch.

    python benchmarks/node_vs_torch.py --ranks 16 --launcher "mpirun --allow-run-as-root --oversubscribe"
    python benchmarks/node_vs_torch.py --ranks 4 --threads-per-rank 4 --launcher "mpirun --bind-to none"
    python benchmarks/node_vs_torch.py --ranks 2 --config 5m          # a laptop
    python benchmarks/node_vs_torch.py --train-args "--zero-stage 1"  # more refgpt.train flags
    python benchmarks/node_vs_torch.py --train-args "" --train-args "--zero-stage 1" \
        --train-args "--zero-stage 1 --dp-shared-memory"             # side by side, one PyTorch
    python benchmarks/node_vs_torch.py --train-args=--bf16 --torch-autocast      # 16 bits, both

refgpt runs ``python -m refgpt.train`` (synthetic data, float32, --backend numba by default)
for --iters steps and reports the median tokens/s of the steps after the first; PyTorch runs the
same global batch as one batch (its best case) with ``torch.set_num_threads(ranks x
threads per rank)``, in float32 or (--torch-autocast) under CPU bf16 autocast, best of --iters steps after a warm-up. Prints both, the ratio
refgpt / PyTorch, and where refgpt's step goes: forward + backward, the gradient sum and the
optimizer, each the longest over the ranks (so the gradient sum includes waiting for the
slowest rank's backward), medians over the steps. Fewer ranks with more threads each exchange
less gradient per token (one all-reduce per rank and step), at the price of BLAS's and
numba's threading. ``--dp-shared-memory`` (with ``--zero-stage 1``) sums the gradients
through the node's shared memory instead (refgpt.parallel.shared).
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import CONFIGS, torch_step  # noqa: E402


def refgpt_run(args, cfg, extra: str) -> tuple[float, dict]:
    """(median tokens/s, median ms per phase: its longest rank's) over the steps after the
    first, of refgpt.train with the flags in extra."""
    L, h, a, V, s, _ = cfg
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        cmd = [*shlex.split(args.launcher), "-n", str(args.ranks), sys.executable, "-m",
               "refgpt.train", "--synthetic-data", "--num-layers", str(L), "--hidden-size", str(h),
               "--num-attention-heads", str(a), "--vocab-size", str(V), "--seq-length", str(s),
               "--micro-batch-size", str(args.micro), "--global-batch-size", str(args.global_batch),
               "--train-iters", str(args.iters), "--eval-iters", "0", "--no-progress",
               "--log-interval", "1", "--threads-per-rank", str(args.threads_per_rank),
               "--backend", args.backend, "--log-jsonl", str(log), *shlex.split(extra)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in log.read_text().splitlines()][1:]
    phases = {"compute": ("forward", "backward"), "grad sum": ("grads-all-reduce",),
              "optimizer": ("optimizer",)}
    ms = {k: statistics.median(sum(r["timers_ms"][n][1] for n in names) for r in rows)
          for k, names in phases.items()}
    ms["step"] = statistics.median(1e3 * r["step_time_s"] for r in rows)
    return statistics.median(r["tokens_per_s"] for r in rows), ms


def torch_tokens_per_s(args, cfg) -> float:
    L, h, a, V, s, _ = cfg
    step = torch_step((L, h, a, V, s, args.global_batch), args.ranks * args.threads_per_rank,
                      autocast=args.torch_autocast)
    step()
    best = float("inf")
    for _ in range(args.iters - 1):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return args.global_batch * s / best


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="124m")
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--launcher", default="mpiexec")
    ap.add_argument("--torch-autocast", action="store_true",
                    help="PyTorch under CPU bf16 autocast (compare with --train-args --bf16)")
    ap.add_argument("--train-args", action="append",
                    help='more refgpt.train flags, e.g. "--zero-stage 1"; give it again to '
                         'compare several settings against the same PyTorch run')
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    variants = args.train_args or [""]
    ours = {extra: refgpt_run(args, cfg, extra) for extra in variants}
    theirs = torch_tokens_per_s(args, cfg)
    torch_mode = "bf16 autocast" if args.torch_autocast else "float32"
    print(f"{args.config}, global batch {args.global_batch} x {cfg[4]} tokens; "
          f"PyTorch {torch_mode}, 1 process x {args.ranks * args.threads_per_rank} threads {theirs:.0f} tokens/s")
    for extra, (tokens, ms) in ours.items():
        phases = ", ".join(f"{k} {v:.0f}" for k, v in ms.items())
        print(f"refgpt {args.ranks} ranks x {args.threads_per_rank} threads ({args.backend}"
              f"{' ' + extra if extra else ''}): {tokens:.0f} tokens/s, ratio "
              f"{tokens / theirs:.2f}; ms per step (each phase: its longest rank): {phases}")


if __name__ == "__main__":
    main()
