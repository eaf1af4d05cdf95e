"""1-D (Megatron) against 2-D (SUMMA) tensor parallelism at the same TP size: elements each
rank receives per transformer layer for one micro-batch (forward + backward), messages, and
the time of a forward + backward, next to the formulas

    V_1D = 8 N h (t-1)/t          V_2D ~ (q-1)/q^2 (21 N h + 36 h^2)      (t = q^2)

(N = tokens per micro-batch, h = hidden size; 2-D moves fewer elements when
q > 1.625 + 4.5 h / N). Run with the TP size as the world size:

    mpiexec -n 4 python benchmarks/tp_1d_vs_2d.py
    mpirun -n 16 python benchmarks/tp_1d_vs_2d.py --shapes 1024x256 4096x256 1024x1024

The counters are read for the sites of block 0 ("h.0."), so the embedding, head and loss
are left out; the time of one layer is the difference between a 2-layer and a 1-layer model's
forward + backward.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

from refgpt.config import ModelConfig
from refgpt.nn import GPT
from refgpt.parallel.summa import SummaGrid
from refgpt.parallel.tensor import TensorParallel
from refgpt.parallel.tensor2d import Tensor2D, formula_layer_volume
from refgpt.parallel.tensor_comm import TPComm


def counters(mode, parts):
    """(elements received, SUMMA messages) by block 0's communication."""
    return parts.layer_volume("h.0.") if mode == "2d" else (parts.tp.layer_volume("h.0."), 0)


def run(mode, layers, N, h, comm, B):
    cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=max(h // 64, comm.size),
                      seq_length=N // B, vocab_size=1024)
    if mode == "2d":
        parts = Tensor2D(cfg, 0, SummaGrid(comm))
    else:
        parts = TensorParallel(cfg, 0, TPComm(comm))
    model = GPT(cfg, np.float32, 0, parts=parts)
    x = np.random.default_rng(0).integers(0, 1024, (B, N // B))
    comm.Barrier()
    t0 = time.perf_counter()
    model.forward(x, x, float(N))
    model.backward()
    comm.Barrier()
    return (*counters(mode, parts), time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1024x256", "256x256"],
                    help="N x h: tokens per micro-batch x hidden size")
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    t, q = comm.size, int(round(comm.size ** 0.5))
    if comm.rank == 0:
        print(f"t = {t} (2-D: q = {q}); elements received per rank per layer, forward + backward")
        print(f"{'N x h':>11} {'1-D':>12} {'8Nh(t-1)/t':>12} {'2-D':>12} {'formula':>12} "
              f"{'2-D msgs':>8} {'1-D ms':>8} {'2-D ms':>8}")
    for shape in args.shapes:
        N, h = map(int, shape.split("x"))
        out = {}
        for mode in ("1d", "2d"):
            one, two = (run(mode, L, N, h, comm, args.batch) for L in (1, 2))
            out[mode] = (*one[:2], two[2] - one[2])              # block 0's counts, one layer's time
        if comm.rank == 0:
            f1 = 8 * N * h * (t - 1) / t
            f2 = formula_layer_volume(N, h, q)
            print(f"{shape:>11} {out['1d'][0]:12.0f} {f1:12.0f} {out['2d'][0]:12.0f} {f2:12.0f} "
                  f"{out['2d'][1]:8d} {1e3 * out['1d'][2]:8.1f} {1e3 * out['2d'][2]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
