"""Recomputation changes no bit in any layout: each run with --recompute-granularity full
(uniform, in chunks of one and of two blocks, and block with the first block of each
stage) or selective equals the same layout
without it, every rank's parameters and the losses bit for bit, in float64 and bfloat16."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid


def layouts(world):
    for stage in (1, 2, 3):
        yield f"dp zero-{stage}", dict(zero_stage=stage)
    if world % 2 == 0:
        yield "tp2 sp", dict(tensor_model_parallel_size=2, sequence_parallel=True)
        for schedule, v in (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
            yield f"pp2 {schedule}", dict(pipeline_model_parallel_size=2,
                                          pipeline_schedule=schedule, num_virtual_stages=v)
    if world % 4 == 0:
        yield "2-D tp4", dict(tensor_model_parallel_size=4, tensor_parallel_mode="2d")
        yield "tp2 pp2 sp", dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                 pipeline_model_parallel_size=2)


def run(comm, dtype, options):
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=0.1)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4 * comm.size, train_iters=2,
                       lr=1e-2, dtype=dtype, synthetic_data=True, eval_iters=1, backend="numpy")
    pcfg = ParallelConfig(**options)
    t = Trainer(cfg, tcfg, pcfg, Grid(comm, pcfg.tensor_model_parallel_size,
                                      pcfg.pipeline_model_parallel_size), log=lambda *_: None)
    hist = t.run()
    p = t.opt.p.copy()
    t.close()
    return [h["loss"] for h in hist] + [hist[-1]["val_loss"]], p


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_recomputation_changes_no_bit_in_any_layout(dtype):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options in layouts(comm.size):
        losses, p = run(comm, dtype, options)
        for granularity, method, n in (("full", "uniform", 1), ("full", "uniform", 2),
                                       ("full", "block", 1), ("selective", "uniform", 1)):
            got, q = run(comm, dtype, dict(options, recompute_granularity=granularity,
                                           recompute_method=method, recompute_num_layers=n))
            if got != losses or not np.array_equal(p, q):
                failures.append((name, granularity, method))
    assert all(comm.allgather(not failures)), failures
