"""Latency and bandwidth of the hand-written all-reduces (refgpt.parallel.collectives) against
MPI_Allreduce, from 1 KiB to 256 MiB at several rank counts, with the alpha-beta model fitted:

    mpirun --allow-run-as-root --bind-to core -n 16 python benchmarks/collectives.py \
        --ranks 2 4 8 16 --out collectives.json
    python benchmarks/collectives.py --plot collectives.json docs/collectives.png

For each rank count p (the first p ranks of the job), algorithm and size n (float32) it
times --reps all-reduces after one warm-up (the median, the slowest rank's) and fits, over
the sizes, T = alpha A(p) + beta B(p) n by least squares on relative error, with each
algorithm's own step counts (module docstring of refgpt.parallel.collectives):

    ring          A = 2 (p - 1)             B = 2 (p - 1) / p
    tree          A = 2 (log2 p + k)        B = 1 + 1/k          (k = 4 chunks)
    mpi, hierarchical: A = 1, B = 1 (an effective latency and inverse bandwidth)

and prints the model's prediction beside every measurement.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

SIZES = [2 ** k for k in range(10, 29, 2)]            # 1 KiB .. 256 MiB
ALGORITHMS = ("mpi", "ring", "tree", "hierarchical")


def steps(algorithm: str, p: int) -> tuple[float, float]:
    """(A, B): latency terms and bytes-per-byte of the algorithm on p ranks."""
    if algorithm == "ring":
        return 2 * (p - 1), 2 * (p - 1) / p
    if algorithm == "tree":
        return 2 * (math.log2(p) + 4), 1 + 1 / 4
    return 1.0, 1.0


def fit(algorithm: str, p: int, rows: list[dict]) -> tuple[float, float]:
    """alpha (s), beta (s/byte) minimising the relative error of the model over rows."""
    A, B = steps(algorithm, p)
    t = np.array([r["seconds"] for r in rows])
    n = np.array([r["bytes"] for r in rows], float)
    design = np.stack([np.full_like(n, A), B * n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def measure(args) -> None:
    from mpi4py import MPI

    from refgpt.parallel.collectives import Allreduce
    world = MPI.COMM_WORLD
    rows = []
    for p in args.ranks:
        if p > world.size:
            continue
        comm = world.Split(0 if world.rank < p else MPI.UNDEFINED, world.rank)
        if comm == MPI.COMM_NULL:
            world.Barrier()
            continue
        for algorithm in ALGORITHMS:
            run = Allreduce(algorithm)
            for size in SIZES:
                x = np.ones(size // 4, np.float32)
                times = []
                for i in range(args.reps + 1):
                    comm.Barrier()
                    t0 = MPI.Wtime()
                    run(comm, x)
                    times.append(comm.allreduce(MPI.Wtime() - t0, MPI.MAX))
                rows.append(dict(p=p, algorithm=algorithm, bytes=size,
                                 seconds=statistics.median(times[1:])))
            run.free()
        comm.Free()
        world.Barrier()
    if world.rank == 0:
        report(rows, args)


def report(rows: list[dict], args) -> None:
    from refgpt.study.measure import cpu_name
    fits = {}
    for p in sorted({r["p"] for r in rows}):
        for algorithm in ALGORITHMS:
            mine = [r for r in rows if r["p"] == p and r["algorithm"] == algorithm]
            alpha, beta = fit(algorithm, p, mine)
            fits[f"{p} {algorithm}"] = dict(alpha=alpha, beta=beta)
            A, B = steps(algorithm, p)
            print(f"p {p:2d} {algorithm:12s} alpha {1e6 * alpha:8.2f} us  1/beta "
                  f"{1e-9 / beta if beta > 0 else float('inf'):7.2f} GB/s")
            for r in mine:
                r["model"] = alpha * A + beta * B * r["bytes"]
                print(f"     {r['bytes']:>10d} B  {1e3 * r['seconds']:10.3f} ms  model "
                      f"{1e3 * r['model']:10.3f} ms  bus {r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(cpu=cpu_name(), rows=rows, fits=fits),
                                             indent=1))


def plot(source: str, target: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(source).read_text())
    ps = sorted({r["p"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(ps), figsize=(4 * len(ps), 3.6), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), ps):
        for algorithm in ALGORITHMS:
            mine = [r for r in data["rows"] if r["p"] == p and r["algorithm"] == algorithm]
            line, = ax.plot([r["bytes"] for r in mine], [r["seconds"] for r in mine], "o",
                            label=algorithm)
            ax.plot([r["bytes"] for r in mine], [r["model"] for r in mine], "-",
                    color=line.get_color(), linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{p} ranks", fontsize=9)
        ax.set_xlabel("bytes")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("seconds (dots: measured, lines: fitted model)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"all-reduce on {data['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-bytes", type=int, default=SIZES[-1])
    ap.add_argument("--out")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"))
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    SIZES[:] = [s for s in SIZES if s <= args.max_bytes]
    measure(args)


if __name__ == "__main__":
    main()
