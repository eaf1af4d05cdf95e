"""Checkpoint save and load time, and bytes per rank, of a large model: refgpt's sharded form
(every rank writes its own file) against the gathered form refgpt wrote before (every shard
all-gathered, whole tensors written by rank 0), and the time --async-save hides.

    mpiexec -n 4 python benchmarks/checkpoint_io.py --gathered          # ~1B, ZeRO-3
    mpiexec -n 16 python benchmarks/checkpoint_io.py --steps 2          # + async save vs steps
    mpiexec -n 2 python benchmarks/checkpoint_io.py --layers 2 --hidden 256   # a quick look

The model is GPT-2 shaped (vocabulary 50304, 16 heads), float32, ZeRO stage --zero-stage over
all ranks (3 by default: the state is split, so what a save moves is what a rank owns). No
training step runs before the saves: the tensors are the initial ones (their values do not
change the bytes). Loads read what the saves just wrote, so the page cache may hold it; the
script says whether it could drop the cache first (it needs root).

--steps N: N training steps (batch 1 x 128 tokens per rank) timed alone, then N with an
--async-save writing in the background, and the blocking part of that save (the copy out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from mpi4py import MPI

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()

from refgpt.backend import to_host  # noqa: E402
from refgpt.checkpoint import open_checkpoint, save_checkpoint  # noqa: E402
from refgpt.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from refgpt.engine import Trainer, checkpoints  # noqa: E402
from refgpt.parallel.grid import Grid  # noqa: E402


def timed(comm, fn):
    """Seconds of a collective fn, from a barrier to the slowest rank's end; fn's result."""
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    comm.Barrier()
    return time.perf_counter() - t0, out


def drop_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def gathered_save(t, path):
    """The former save: every shard all-gathered on every rank, whole tensors written by 0."""
    p, opt = t.model.params, t.opt
    flat = (p.gather_shards(opt.p), p.gather_shards(opt.m), p.gather_shards(opt.v))
    params, m, v = (t.model.full_tensors(to_host(f)) for f in flat)
    if t.grid.rank == 0:
        save_checkpoint(path, t.iteration, params, {"exp_avg": m, "exp_avg_sq": v}, opt.t,
                        {"consumed_samples": 0, "dtype": "float32", "seed": 0,
                         "model": t.mcfg.to_dict(), "train": t.tcfg.to_dict()})


def folder_bytes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--folder", default="/tmp/refgpt-ckpt-bench")
    ap.add_argument("--gathered", action="store_true", help="also time the gathered form")
    ap.add_argument("--steps", type=int, default=0, help="also time --async-save against steps")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    root = Path(args.folder)
    if comm.rank == 0 and root.exists():
        shutil.rmtree(root)
    mcfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=16,
                       seq_length=128, vocab_size=50304)
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=comm.size, train_iters=1000,
                       synthetic_data=True, eval_iters=0, backend="numba", log_interval=1000,
                       save=str(root / "sharded"))
    pcfg = ParallelConfig(zero_stage=args.zero_stage, threads_per_rank=1)
    t0 = time.perf_counter()
    t = Trainer(mcfg, tcfg, pcfg, Grid(comm), log=lambda *_: None)
    n = t.model.params.numel                         # the flat buffer: the whole model
    say(f"{comm.size} ranks, ZeRO-{args.zero_stage}, {n / 1e9:.2f}B parameters, float32; "
        f"set-up {time.perf_counter() - t0:.1f} s")
    rows = []
    seconds, _ = timed(comm, lambda: t.save())
    sizes = folder_bytes(root / "sharded" / "iter_0000000")
    rows.append(("sharded save", seconds, max(sizes.values()), sum(sizes.values())))
    if args.gathered:
        seconds, _ = timed(comm, lambda: gathered_save(t, root / "gathered"))
        sizes = folder_bytes(root / "gathered" / "iter_0000000") if comm.rank == 0 else {}
        rows.append(("gathered save (former)", seconds, sum(sizes.values()), sum(sizes.values())))
    for form in ["sharded"] + (["gathered"] if args.gathered else []):
        dropped = comm.allgather(drop_cache() if comm.rank == 0 else None)[0]
        seconds, _ = timed(comm, lambda: checkpoints.restore(
            open_checkpoint(root / form), t.model, t.opt, t.mcfg, t.grid))
        rows.append((f"{form} load ({'cache dropped' if dropped else 'page cache warm'})",
                     seconds, 0, 0))
    say("| what | seconds | largest file (GB) | all files (GB) |\n| --- | ---: | ---: | ---: |")
    for what, s, big, total in rows:
        say(f"| {what} | {s:.2f} | {big / 1e9:.2f} | {total / 1e9:.2f} |" if total else
            f"| {what} | {s:.2f} | | |")
    if args.steps:
        step_s, _ = timed(comm, lambda: [t.train_step() for _ in range(args.steps)])
        t.tcfg.save = str(root / "async")
        blocking, _ = timed(comm, lambda: t.save(background=True))
        busy, _ = timed(comm, lambda: [t.train_step() for _ in range(args.steps)])
        written = comm.allreduce(int(t.pending_save.written()), op=MPI.MIN)
        finish, _ = timed(comm, t.finish_save)
        say(f"{args.steps} steps alone {step_s:.2f} s; with a background save: its blocking "
            f"copy-out {blocking:.2f} s, the steps {busy:.2f} s, files "
            f"{'written by then' if written else 'still being written'}, finishing "
            f"{finish:.2f} s")
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(root)
    t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
