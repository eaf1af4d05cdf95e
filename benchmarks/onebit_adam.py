"""1-bit Adam against Adam on the default run (``python -m refgpt.train``: ~5M GPT-2, the
stdlib corpus), data-parallel over every rank of the job, in float32:

    mpirun -n 16 python benchmarks/onebit_adam.py --train-iters 300 --warmup 60 100 \
        --out docs/collectives/onebit.json
    python benchmarks/onebit_adam.py --plot docs/collectives/onebit.json docs/collectives/onebit.png

Runs from the same initial weights and batches: ``--optimizer adam`` (AdamW, the default),
``onebit-adam`` with --warmup steps of uncompressed Adam (each value given), and
``onebit-adam`` never compressing (its warm-up as long as the run: DeepSpeed's update rule,
which has no bias correction and couples the weight decay, alone). For each: the loss per
step, the mean of the last 20 steps and the validation loss against Adam's, and the bytes a
rank sends per step
(the data-parallel traffic: the gradient all-reduce, or after the warm-up the momentum's
1-bit all-reduce), before and after the warm-up. The global batch is the default's (16) unless
--global-batch-size says otherwise; each rank takes global / ranks sequences a step.
"""

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path


def run(comm, optimizer: str, warmup: int, args) -> dict:
    from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
    from refgpt.engine import Trainer
    from refgpt.parallel.grid import Grid
    d = comm.Get_size()
    base = TrainConfig()
    G = args.global_batch_size or base.global_batch_size
    tcfg = replace(base, train_iters=args.train_iters, optimizer=optimizer,
                   onebit_warmup_iters=warmup, global_batch_size=G,
                   micro_batch_size=min(base.micro_batch_size, G // d),
                   eval_interval=args.train_iters, log_interval=10**9)
    t = Trainer(ModelConfig(), tcfg, ParallelConfig(), Grid(comm), log=lambda *_: None)
    hist = t.run()
    t.close()
    sent = [h["dp_comm_bytes"] for h in hist]
    plain = len(sent) if optimizer == "adam" else min(warmup, len(sent))   # all-reduced steps
    return dict(optimizer=optimizer, warmup=warmup, losses=[h["loss"] for h in hist],
                val_loss=hist[-1]["val_loss"],
                step_s=statistics.median(h["step_time_s"] for h in hist),
                bytes_warmup=statistics.median(sent[:plain]),
                bytes_after=statistics.median(sent[plain:]) if plain < len(sent) else None)


def measure(args) -> None:
    from mpi4py import MPI

    from refgpt.parallel.threads import set_threads
    from refgpt.study.measure import cpu_name
    comm = MPI.COMM_WORLD
    set_threads(comm, args.threads)
    runs = [run(comm, "adam", 0, args)]
    runs += [run(comm, "onebit-adam", w, args) for w in args.warmup]
    if args.uncompressed:
        runs.append(run(comm, "onebit-adam", args.train_iters, args))
    if comm.Get_rank():
        return
    adam = runs[0]
    tail = lambda r: statistics.fmean(r["losses"][-20:])             # noqa: E731
    print(f"# {cpu_name()}, {comm.Get_size()} ranks x {args.threads} threads, the default "
          f"model, {args.train_iters} steps, float32")
    print("| optimizer | warm-up | final loss | mean of last 20 | vs Adam | validation | "
          "vs Adam | bytes / step / rank in warm-up | after | s / step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        after = "" if r["bytes_after"] is None else f"{r['bytes_after']:,.0f}"
        print(f"| {r['optimizer']} | {r['warmup'] if r['optimizer'] != 'adam' else ''} | "
              f"{r['losses'][-1]:.4f} | {tail(r):.4f} | {100 * (tail(r) / tail(adam) - 1):+.2f}% | "
              f"{r['val_loss']:.4f} | {100 * (r['val_loss'] / adam['val_loss'] - 1):+.2f}% | "
              f"{r['bytes_warmup']:,.0f} | {after} | {r['step_s']:.3f} |")
    for r in runs[1:1 + len(args.warmup)]:
        print(f"# 1-bit Adam after a warm-up of {r['warmup']}: "
              f"{r['bytes_warmup'] / r['bytes_after']:.1f}x fewer bytes per step than the "
              f"all-reduce")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(cpu=cpu_name(), ranks=comm.Get_size(),
                                                  threads=args.threads, runs=runs), indent=1))


def plot(source: str, target: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(source).read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in data["runs"]:
        label = ("Adam (AdamW)" if r["optimizer"] == "adam" else
                 f"1-bit Adam, warm-up {r['warmup']}" if r["warmup"] < len(r["losses"]) else
                 "1-bit Adam's rule, never compressed")
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title(f"default run, {data['ranks']} data-parallel ranks, {data['cpu']}", fontsize=9)
    ax.legend()
    fig.savefig(target, dpi=120, bbox_inches="tight")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, nargs="+", default=[60],
                    help="1-bit Adam's --onebit-warmup-iters (a run for each; below the run's)")
    ap.add_argument("--uncompressed", action=argparse.BooleanOptionalAction, default=True,
                    help="also the run that never compresses [default: on]")
    ap.add_argument("--global-batch-size", type=int, default=0, help="0: the default run's")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/numba threads per rank")
    ap.add_argument("--out", help="write the runs as JSON here")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot an --out file")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
    else:
        measure(args)


if __name__ == "__main__":
    main()
