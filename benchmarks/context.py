"""Context parallelism on one node: per-rank memory and tokens/s of GPT-2 124M against the
sequence length, for CP 1, 2, 4, 8 with the ring (p2p) and Ulysses (a2a), in one MPI job:

    mpirun --allow-run-as-root --bind-to core -n 8 python benchmarks/context.py \
        --seq 1024 2048 4096 --threads 2 --out context.json
    python benchmarks/context.py --plot context.json docs/context-parallel.png

Every configuration runs on all the job's ranks (P of them): CP c over groups of c ranks,
P / c data replicas, one sequence per replica and step (global batch P / c), float32, the
numba backend, synthetic tokens, no dropout. For each (T, c, kind) it prints the median
step time of the --iters steps after one warm-up step (or with --iters 0 the one step), tokens/s, the seconds a step waits
for CP's messages (the slowest rank's; what the computation did not hide), and the rank's
memory by the registry: parameters + gradients + optimizer state + the activations held for
backward at their peak (refgpt.nn.activations; the attention's temporaries while it runs
are not in it). A configuration whose attention alone would keep more than --budget GiB per
rank (what CP 1 and a2a keep of the probabilities, B H/c T^2 x 4 bytes a layer) is
reported as not fitting without being run. The longest T under the budget per (c, kind)
ends the table.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

GIB = 2 ** 30


def probabilities_bytes(T: int, c: int, kind: str, layers=12, heads=12) -> int:
    """What the attention keeps of its probabilities per rank (one sequence): the local
    kernels' P for every layer, over H / c heads with a2a; none with the ring."""
    if c > 1 and kind == "p2p":
        return 0
    return layers * (heads // c) * T * T * 4


def run(comm, T: int, c: int, kind: str, args) -> dict:
    from mpi4py import MPI

    from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
    from refgpt.engine import Trainer
    from refgpt.parallel.grid import Grid
    world = comm.Get_size()
    mcfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=T,
                       vocab_size=50257)
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=world // c,
                       train_iters=1 + args.iters, lr=6e-4, eval_iters=0, log_interval=10**9,
                       synthetic_data=True, dtype="float32")
    pcfg = ParallelConfig(context_parallel_size=c, cp_comm_type=kind)
    t = Trainer(mcfg, tcfg, pcfg, Grid(comm, 1, 1, 1, c), log=lambda *_: None)
    cp = t.model.parts.cp
    steps, waits, memory = [], [], None
    for _ in range(tcfg.train_iters):
        before = cp.seconds if cp else 0.0
        comm.Barrier()
        record = t.train_step()
        steps.append(record["step_time_s"])
        waits.append((cp.seconds if cp else 0.0) - before)
        memory = record["memory_bytes"]
    t.close()
    step = statistics.median(steps[1:] or steps)              # --iters 0: the one step
    held = sum(memory[k] for k in ("params", "grads", "optimizer", "activations", "working_peak"))
    return dict(T=T, c=c, kind=kind, step=step, tokens=tcfg.global_batch_size * T / step,
                wait=comm.allreduce(statistics.median(waits[1:] or waits), MPI.MAX),
                activations=comm.allreduce(memory["activations"], MPI.MAX),
                memory=comm.allreduce(held, MPI.MAX), fits=True)


def measure(args) -> None:
    from mpi4py import MPI

    from refgpt.parallel.threads import set_threads
    from refgpt.study.measure import cpu_name
    comm = MPI.COMM_WORLD
    set_threads(comm, args.threads)
    rows = []
    for T in args.seq:
        for c in args.cp:
            for kind in (("p2p",) if c == 1 else args.kinds):
                if comm.Get_size() % c or T % (2 * c) or kind == "a2a" and 12 % c:
                    continue                           # (a2a splits the 12 heads over c)
                if probabilities_bytes(T, c, kind) > args.budget * GIB:
                    rows.append(dict(T=T, c=c, kind=kind, fits=False,
                                     memory=probabilities_bytes(T, c, kind)))
                else:
                    rows.append(run(comm, T, c, kind, args))
                if comm.Get_rank() == 0:
                    show(rows[-1])
    if comm.Get_rank() == 0:
        print(f"# {cpu_name()}, {comm.Get_size()} ranks x {args.threads} threads, GPT-2 124M "
              f"float32, 1 sequence per data replica, budget {args.budget} GiB per rank")
        for c in args.cp:
            for kind in (("p2p",) if c == 1 else [k for k in args.kinds
                                                    if k == "p2p" or 12 % c == 0]):
                ok = [r["T"] for r in rows if r["c"] == c and r["kind"] == kind and r["fits"]
                      and r["memory"] <= args.budget * GIB]
                print(f"# longest T within {args.budget} GiB: {label(c, kind)}: "
                      f"{max(ok) if ok else 'none'} (of {args.seq})")
        if args.out:
            Path(args.out).write_text(json.dumps(dict(cpu=cpu_name(), ranks=comm.Get_size(),
                                                      threads=args.threads,
                                                      budget_gib=args.budget, rows=rows),
                                                 indent=1))


def label(c: int, kind: str) -> str:
    return f"cp {c} " + (kind if c > 1 else "local")


def show(r: dict) -> None:
    if not r["fits"]:
        print(f"T {r['T']:6d} {label(r['c'], r['kind'])}: not run, its probabilities alone "
              f"need {r['memory'] / GIB:.1f} GiB per rank", flush=True)
        return
    print(f"T {r['T']:6d} {label(r['c'], r['kind'])}: step {r['step']:7.2f} s, "
          f"{r['tokens']:7.0f} tokens/s, CP wait {r['wait']:6.2f} s, memory "
          f"{r['memory'] / GIB:5.2f} GiB (activations {r['activations'] / GIB:5.2f})",
          flush=True)


def plot(source: str, target: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(source).read_text())
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["c"], r["kind"]) for r in data["rows"]})
    for c, kind in series:
        rows = [r for r in data["rows"] if (r["c"], r["kind"]) == (c, kind) and "step" in r]
        label = f"CP {c}" + (f" {kind}" if c > 1 else "")
        style = "-" if kind == "p2p" else "--"
        mem.plot([r["T"] for r in rows], [r["memory"] / GIB for r in rows], style, marker="o",
                 label=label)
        speed.plot([r["T"] for r in rows], [r["tokens"] for r in rows], style, marker="o",
                   label=label)
    mem.axhline(data["budget_gib"], color="grey", linewidth=0.8)
    for ax, name in ((mem, "memory per rank (GiB, registry)"), (speed, "tokens/s (all ranks)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=8)
    fig.suptitle(f"GPT-2 124M, {data['ranks']} ranks x {data['threads']} threads, {data['cpu']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--iters", type=int, default=1, help="timed steps after one warm-up step "
                    "(0: time the one step, warm-up included)")
    ap.add_argument("--kinds", nargs="+", choices=("p2p", "a2a"), default=["p2p", "a2a"],
                    help="--cp-comm-type(s) to run where CP > 1")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/numba threads per rank")
    ap.add_argument("--budget", type=float, default=4.0, help="GiB per rank")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a --out file")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    measure(args)


if __name__ == "__main__":
    sys.exit(main())
