"""A whole node: refgpt as data-parallel MPI ranks (by default one per core, one thread each)
against PyTorch eager with one process and a thread per core, on the same model and global batch.

    python benchmarks/node_vs_torch.py --ranks 16 --launcher "mpirun --allow-run-as-root --oversubscribe"
    python benchmarks/node_vs_torch.py --ranks 4 --threads-per-rank 4 --launcher "mpirun --bind-to none"
    python benchmarks/node_vs_torch.py --ranks 2 --config 5m          # a laptop
    python benchmarks/node_vs_torch.py --train-args "--zero-stage 1"  # more refgpt.train flags

refgpt runs ``python -m refgpt.train`` (synthetic data, float32, --backend numba by default)
for --iters steps and reports the median tokens/s of the steps after the first; PyTorch runs the
same global batch as one batch (its best case) with ``torch.set_num_threads(ranks x
threads per rank)``, best of --iters steps after a warm-up. Prints both and the ratio
refgpt / PyTorch. Fewer ranks with more threads each exchange less gradient per token (one
all-reduce per rank and step), at the price of BLAS's and numba's threading.
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


def refgpt_tokens_per_s(args, cfg) -> float:
    L, h, a, V, s, _ = cfg
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        cmd = [*shlex.split(args.launcher), "-n", str(args.ranks), sys.executable, "-m",
               "refgpt.train", "--synthetic-data", "--num-layers", str(L), "--hidden-size", str(h),
               "--num-attention-heads", str(a), "--vocab-size", str(V), "--seq-length", str(s),
               "--micro-batch-size", str(args.micro), "--global-batch-size", str(args.global_batch),
               "--train-iters", str(args.iters), "--eval-iters", "0", "--no-progress",
               "--threads-per-rank", str(args.threads_per_rank), "--backend", args.backend,
               "--log-jsonl", str(log), *shlex.split(args.train_args)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def torch_tokens_per_s(args, cfg) -> float:
    L, h, a, V, s, _ = cfg
    step = torch_step((L, h, a, V, s, args.global_batch), args.ranks * args.threads_per_rank)
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
    ap.add_argument("--train-args", default="",
                    help='more refgpt.train flags, e.g. "--zero-stage 1"')
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    ours = refgpt_tokens_per_s(args, cfg)
    theirs = torch_tokens_per_s(args, cfg)
    print(f"{args.config}, global batch {args.global_batch} x {cfg[4]} tokens, float32: refgpt "
          f"{args.ranks} ranks x {args.threads_per_rank} threads ({args.backend}"
          f"{' ' + args.train_args if args.train_args else ''}) {ours:.0f} "
          f"tokens/s; "
          f"PyTorch 1 process x {args.ranks * args.threads_per_rank} threads {theirs:.0f} "
          f"tokens/s; ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
