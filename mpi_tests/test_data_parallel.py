"""Data parallelism equals the single process in float64: losses, gradients, parameters.

Every rank also runs the single-process reference itself (no communicator), so the
comparison needs no gathering; the verdicts are then agreed over all ranks.
"""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid


def model_cfg(dropout=0.0):
    return ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16, dropout=dropout)


def train_cfg(global_batch, micro, iters=3):
    return TrainConfig(micro_batch_size=micro, global_batch_size=global_batch, train_iters=iters,
                       lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       synthetic_data=True, eval_iters=1, eval_interval=2, log_interval=100)


def run(tcfg, grid=None, bucket=1_000_000, dropout=0.0, overlap=True):
    t = Trainer(model_cfg(dropout), tcfg,
                ParallelConfig(ddp_bucket_size=bucket, overlap_grad_reduce=overlap), grid,
                log=lambda *_: None)
    return t, t.run()


def agree(comm, ok: bool) -> bool:
    return all(comm.allgather(bool(ok)))


def assert_equal_to_serial(comm, tcfg, bucket=1_000_000, dropout=0.0, overlap=True):
    dp, dp_hist = run(tcfg, Grid(comm), bucket, dropout, overlap)
    serial, serial_hist = run(tcfg, None, bucket, dropout)
    losses = [h["loss"] for h in dp_hist], [h["loss"] for h in serial_hist]
    val = [h["val_loss"] for h in dp_hist if "val_loss" in h], \
          [h["val_loss"] for h in serial_hist if "val_loss" in h]
    p, ps = dp.model.params, serial.model.params
    ok = (np.allclose(*losses, rtol=1e-12, atol=0) and np.allclose(*val, rtol=1e-12, atol=0)
          and np.abs(p.grad - ps.grad).max() <= 1e-12 * np.abs(ps.grad).max()
          and np.abs(p.data - ps.data).max() <= 1e-12 * np.abs(ps.data).max())
    same_everywhere = all(np.array_equal(x, p.data) for x in comm.allgather(p.data))
    assert agree(comm, ok and same_everywhere), "data-parallel run differs from the single process"
    return dp


@pytest.mark.mpi(min_size=2)
def test_data_parallel_equals_single_process():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d = comm.size
    t = assert_equal_to_serial(comm, train_cfg(global_batch=d, micro=1))
    assert len(t.sync.buckets) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", [True, False])
def test_data_parallel_with_accumulation_and_many_buckets(overlap):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    t = assert_equal_to_serial(comm, train_cfg(global_batch=4 * comm.size, micro=2), bucket=300,
                               overlap=overlap)
    assert len(t.sync.buckets) > 5 and t.sync.overlap == overlap


@pytest.mark.mpi(min_size=2)
def test_one_bucket_after_backward_and_dropout():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    assert_equal_to_serial(comm, train_cfg(global_batch=2 * comm.size, micro=1), bucket=0,
                           dropout=0.1)


@pytest.mark.mpi(min_size=2)
def test_timers_report_min_and_max_over_ranks():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = train_cfg(global_batch=comm.size, micro=1, iters=2)
    tcfg.log_interval = 2
    t, hist = run(tcfg, Grid(comm))
    timers = hist[-1]["timers_ms"]
    assert set(timers) == {"batch-generator", "forward", "backward", "pipeline-bubble",
                           "grads-all-reduce", "optimizer"}
    assert timers["pipeline-bubble"] == [0, 0]
    assert all(0 <= lo <= hi for lo, hi in timers.values())
    assert agree(comm, comm.allgather(timers) == [timers] * comm.size)
