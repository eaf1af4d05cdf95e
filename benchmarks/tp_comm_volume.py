"""Measure the tensor-parallel communication volume per transformer layer and compare it with
Megatron-LM's 8 N h (t-1)/t (N = tokens per micro-batch, h hidden, t TP size), with and without
sequence parallelism. Run under MPI with the TP size as the world size:

    mpiexec -n 2 python benchmarks/tp_comm_volume.py
    mpiexec -n 4 python benchmarks/tp_comm_volume.py --hidden-size 512 --seq-length 256

Prints, per collective kind, the elements each rank moves in one forward + backward of a
micro-batch (ring-algorithm counting: all-reduce 2(t-1)/t n, all-gather and reduce-scatter
(t-1)/t n), for block 0, then the embedding/head/loss sites.
"""

import argparse
from collections import defaultdict

import numpy as np
from mpi4py import MPI

from refgpt.config import ModelConfig
from refgpt.nn import GPT
from refgpt.parallel.tensor import TensorParallel
from refgpt.parallel.tensor_comm import TPComm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-attention-heads", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    t = comm.size
    cfg = ModelConfig(num_layers=2, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                      vocab_size=args.vocab_size)
    B, T, h = args.micro_batch_size, cfg.seq_length, cfg.hidden_size
    N = B * T
    formula = 8 * N * h * (t - 1) / t
    rows = []
    for sp in (False, True):
        tp = TPComm(comm)
        model = GPT(cfg, np.float32, 0, parts=TensorParallel(cfg, 0, tp, sp))
        x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
        model.forward(x, x, float(N))
        model.backward()
        kinds = defaultdict(float)
        for (site, op), v in tp.volume.items():
            if site.startswith("h.0."):
                kinds[op] += v
        other = {site: v for (site, _), v in tp.volume.items() if not site.startswith("h.")}
        rows.append((sp, dict(kinds), tp.layer_volume("h.0."), other))
    if comm.rank == 0:
        print(f"t = {t}, N = {B} x {T} = {N} tokens, h = {h}: 8 N h (t-1)/t = {formula:,.0f} elements")
        print(f"{'mode':<8} {'block 0, by collective (elements per rank)':<60} {'total':>12} {'/ formula':>9}")
        for sp, kinds, total, other in rows:
            by = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(kinds.items()))
            print(f"{'1-D+SP' if sp else '1-D':<8} {by:<60} {total:>12,.0f} {total / formula:>9.3f}")
        for sp, _, _, other in rows:
            print(f"{'1-D+SP' if sp else '1-D'} outside the blocks: " +
                  ", ".join(f"{site} {v:,.0f}" for site, v in sorted(other.items())))


if __name__ == "__main__":
    main()
