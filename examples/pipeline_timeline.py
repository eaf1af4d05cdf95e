"""Measure pipeline schedules: per-rank busy and idle time, the bubble against its formula,
peak activation memory against the stash formula, and a timeline of one step.

    mpiexec -n 4 python examples/pipeline_timeline.py --micro-batches 8 --op-cost 0.02 --out docs/pipeline

Each rank runs a small model's stages (so compute is short) and every op also sleeps a fixed
time per unit of cost (F = B = W = op-cost, BW = 2 op-cost, divided by v for a chunk): the
step then has known, equal op costs, and the measured idle fraction can be held against
(p-1)/m (GPipe, 1F1B), (p-1)/(vm) (interleaved) and (p-1)/(3m) (ZB-H1). Writes, per schedule,
a Chrome-trace JSON (open it in https://ui.perfetto.dev) and a PNG of the step, and prints the
table that docs/pipeline.md shows.
"""

import argparse
import json
import os

import numpy as np
from mpi4py import MPI

from refgpt.config import ModelConfig
from refgpt.parallel.grid import Grid
from refgpt.parallel.pipeline import PipelineExecutor, PipelineModel
from refgpt.parallel.schedules import simulate

COLOURS = {"F": "#4c72b0", "B": "#dd8452", "BW": "#c44e52", "W": "#55a868"}


def measure(grid, schedule, v, m, op_cost, cfg):
    model = PipelineModel(cfg, np.float32, 0, grid, v)
    B, T = 1, cfg.seq_length
    ex = PipelineExecutor(model, schedule, m, (B, T, cfg.hidden_size), np.float32)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T)),
                None) for _ in range(m)]
    ex.run(batches, float(m * B * T))                           # warm-up
    model.params.zero_grad()
    grid.world.Barrier()
    trace = []
    t0 = MPI.Wtime()
    ex.run(batches, float(m * B * T), trace=trace, op_cost=op_cost)
    grid.world.Barrier()
    step = MPI.Wtime() - t0
    busy = sum(end - start for _, _, _, start, end, _ in trace)
    peak = max(b for *_, b in trace)
    return trace, step, busy, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--op-cost", type=float, default=0.02, help="seconds per unit of op cost")
    ap.add_argument("--out", default="pipeline-timeline")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    p, m = world.size, args.micro_batches
    grid = Grid(world, 1, p)
    cfg = ModelConfig(num_layers=2 * p, hidden_size=32, num_attention_heads=2, seq_length=16,
                      vocab_size=64)
    rows = []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        trace, step, busy, peak = measure(grid, schedule, v, m, args.op_cost, cfg)
        idle = step - busy
        sim = simulate(p, m, v, schedule)
        formula = {"gpipe": (p - 1) / m, "1f1b": (p - 1) / m, "interleaved": (p - 1) / (v * m),
                   "zb-h1": (p - 1) / (3 * m)}[schedule]
        everything = world.gather((trace, idle, busy, peak), root=0)
        if world.rank == 0:
            t_start = min(e[3] for tr, *_ in everything for e in tr)
            events = [{"name": f"{k}{mb}" + (f".{c}" if v > 1 else ""), "cat": k, "ph": "X",
                       "ts": 1e6 * (s - t_start), "dur": 1e6 * (e - s), "pid": 0, "tid": r}
                      for r, (tr, *_) in enumerate(everything) for k, mb, c, s, e, _ in tr]
            os.makedirs(args.out, exist_ok=True)
            with open(f"{args.out}/{schedule}.trace.json", "w") as f:
                json.dump({"traceEvents": events}, f)
            plot(everything, t_start, f"{args.out}/{schedule}.png", schedule, p, m, v)
            bubbles = [i / b for _, i, b, _ in everything]           # idle / busy per rank
            peaks = [pk for *_, pk in everything]
            rows.append((schedule, v, np.mean(bubbles), formula, max(bubbles), sim.peak_stash,
                         peaks))
    if world.rank == 0:
        print(f"p = {p}, m = {m}, op cost {1e3 * args.op_cost:.0f} ms per unit")
        print(f"{'schedule':<12} {'v':>2} {'bubble: idle / busy, mean':>26} {'formula':>8} "
              f"{'max':>6}  peak stash: formula (micro-batches) | measured (KiB per rank)")
        for schedule, v, bubble, formula, worst, stash, peaks in rows:
            print(f"{schedule:<12} {v:>2} {bubble:>26.3f} {formula:>8.3f} {worst:>6.3f}  "
                  f"{stash} | {[round(b / 1024) for b in peaks]}")


def plot(everything, t_start, path, schedule, p, m, v):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * p))
    for r, (trace, *_) in enumerate(everything):
        for kind, mb, chunk, s, e, _ in trace:
            ax.broken_barh([(1e3 * (s - t_start), 1e3 * (e - s))], (r - 0.4, 0.8),
                           facecolors=COLOURS[kind], edgecolor="white", linewidth=0.5,
                           alpha=1.0 if chunk == 0 else 0.6)
            ax.text(1e3 * (s + e - 2 * t_start) / 2, r, str(mb), ha="center", va="center",
                    fontsize=6, color="white")
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{schedule}: p = {p}, m = {m}" + (f", v = {v}" if v > 1 else "")
                 + "  (F blue, B orange, W green, B+W red)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
