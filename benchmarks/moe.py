"""Mixture of experts against the dense model of the same active parameters, and the
all-to-all's share of the step at each expert-parallel size, in one MPI job:

    mpiexec -n 8 python benchmarks/moe.py --ep 1 2 4 8
    mpirun --allow-run-as-root --bind-to core -n 16 python benchmarks/moe.py --ep 1 2 4 8

Both models train on the default corpus (the Python standard library) from the same seed
and batches, one BLAS thread per rank, data parallel over every rank:

    moe     --num-layers L --hidden-size h, every block's MLP 8 experts, top-2, capacity
            factor 1.25, aux loss 0.01; a token's active parameters per block: the attention's
            4h^2, two experts' 16h^2 and the router's 8h
    dense   the same L and heads, hidden h' with 12 h'^2 nearest 20 h^2 (h' ~ 1.29 h): the
            same active parameters per token, one MLP of 4h'

For each (model, EP) it prints tokens/s (the median step after --warmup), the seconds of
the step spent in the MoE all-to-alls (the slowest rank's) and their share, the loss of the
last step, and the parameters a rank holds. EP 1 keeps every expert on every rank (the
experts' gradients are then all-reduced over all ranks, as the dense model's are).
"""

import argparse
import math
import statistics

from mpi4py import MPI

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from refgpt.parallel.threads import set_threads
from refgpt.study.measure import cpu_name


def configs(args):
    h, heads = args.hidden, args.heads
    dense_h = round(h * math.sqrt(20 / 12) / heads) * heads
    base = dict(num_layers=args.layers, num_attention_heads=heads, seq_length=args.seq)
    return (ModelConfig(hidden_size=h, num_experts=8, moe_router_topk=2,
                        moe_expert_capacity_factor=1.25, moe_aux_loss_coeff=0.01, **base),
            ModelConfig(hidden_size=dense_h, **base))


def run(comm, mcfg, ep, args):
    world = comm.Get_size()
    tcfg = TrainConfig(micro_batch_size=args.micro, global_batch_size=args.micro * world,
                       train_iters=args.warmup + args.iters, lr=6e-4, min_lr=6e-5,
                       lr_warmup_iters=2, eval_iters=0, log_interval=10**9, seed=1234)
    pcfg = ParallelConfig(expert_model_parallel_size=ep)
    t = Trainer(mcfg, tcfg, pcfg, Grid(comm, 1, 1, ep), log=lambda *_: None)
    hist, spent = [], []
    ep_comm = t.model.parts.ep
    for _ in range(tcfg.train_iters):
        before = ep_comm.seconds if ep_comm else 0.0
        comm.Barrier()
        hist.append(t.train_step())
        spent.append((ep_comm.seconds if ep_comm else 0.0) - before)
    held = t.model.params.numel
    t.close()
    step = statistics.median(h["step_time_s"] for h in hist[args.warmup:])
    a2a = comm.allreduce(statistics.median(spent[args.warmup:]), MPI.MAX)
    return dict(tokens=tcfg.global_batch_size * mcfg.seq_length / step, step=step, a2a=a2a,
                loss=hist[-1]["loss"], held=held)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4, help="sequences per rank and step")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    set_threads(comm, 1)
    moe, dense = configs(args)
    rows = [("dense", dense, 1, run(comm, dense, 1, args))]
    rows += [("moe 8x top-2", moe, ep, run(comm, moe, ep, args)) for ep in args.ep]
    if comm.Get_rank() == 0:
        print(f"{cpu_name()}, {comm.Get_size()} ranks x 1 "
              f"thread; L{args.layers} seq {args.seq}, {args.micro} sequences per rank, "
              f"{args.iters} steps after {args.warmup}; moe h{moe.hidden_size}, dense "
              f"h{dense.hidden_size}")
        print(f"  {'model':14s} {'EP':>3s} {'tokens/s':>9s} {'step ms':>8s} "
              f"{'all-to-all ms':>14s} {'share':>6s} {'loss':>7s} {'params/rank':>12s}")
        for name, _, ep, r in rows:
            print(f"  {name:14s} {ep:3d} {r['tokens']:9.0f} {1e3 * r['step']:8.1f} "
                  f"{1e3 * r['a2a']:14.1f} {100 * r['a2a'] / r['step']:5.1f}% "
                  f"{r['loss']:7.3f} {r['held']:12,d}")


if __name__ == "__main__":
    main()
