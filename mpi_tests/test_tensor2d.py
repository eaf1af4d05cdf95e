"""2-D (SUMMA) tensor parallelism equals the single process in float64: losses, gradient norms,
validation losses and every gathered parameter after several steps, with and without dropout,
alone (q = 2: 4 ranks), with data parallelism (8 ranks) and with ZeRO-1; checkpoints move
between a 2-D layout and one process."""

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from roundtrip import checkpoint_roundtrip

QUIET = dict(log=lambda *_: None)


def model_cfg(dropout=0.0):
    return ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=4, seq_length=8,
                       vocab_size=45, vocab_multiple=16, dropout=dropout)


def train_cfg(dp, **kw):
    return TrainConfig(micro_batch_size=2, global_batch_size=4 * dp, train_iters=3, lr=1e-2,
                       min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       weight_decay=0.1, synthetic_data=True, eval_iters=1, eval_interval=2,
                       log_interval=100, **kw)


def layout(comm):
    if comm.size % 4:
        pytest.skip("needs a multiple of 4 ranks")
    return ParallelConfig(tensor_model_parallel_size=4, tensor_parallel_mode="2d"), comm.size // 4


def agree(comm, ok):
    return all(comm.allgather(bool(ok)))


def close(a, b):
    return np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1e-300)


def same_run(par, ser):
    """Train both; equal losses, norms, validation losses and every gathered parameter."""
    hist, ref = par.run(), ser.run()
    full = par.model.full_tensors(par.model.params.data)
    return (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
            and np.allclose([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref], rtol=1e-12)
            and np.allclose([h["val_loss"] for h in hist if "val_loss" in h],
                            [h["val_loss"] for h in ref if "val_loss" in h], rtol=1e-12)
            and all(close(v, ser.model.params[n]) for n, v in full.items()))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_2d_equals_single_process(dropout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg, dp = layout(comm)
    par = Trainer(model_cfg(dropout), train_cfg(dp), pcfg, Grid(comm, 4, 1), **QUIET)
    ser = Trainer(model_cfg(dropout), train_cfg(dp), **QUIET)
    ok = same_run(par, ser)
    assert agree(comm, ok), dropout


@pytest.mark.mpi(min_size=4)
def test_every_parameter_element_lives_on_one_tp_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg, dp = layout(comm)
    t = Trainer(model_cfg(), train_cfg(dp), pcfg, Grid(comm, 4, 1), **QUIET)
    total = t.grid.tp_comm.allreduce(t.model.params.numel)
    assert agree(comm, total == Trainer(model_cfg(), train_cfg(dp), **QUIET).model.params.numel)


@pytest.mark.mpi(min_size=4)
def test_2d_checkpoints_load_in_any_layout():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg, dp = layout(comm)
    straight, serial, resumed = checkpoint_roundtrip(
        comm, model_cfg, train_cfg(dp),
        lambda tcfg: Trainer(model_cfg(), tcfg, pcfg, Grid(comm, 4, 1), **QUIET))
    ref = dict(straight.model.params.items())
    full = resumed.model.full_tensors(resumed.model.params.data)
    ok = (all(close(v, ref[n]) for n, v in serial.model.params.items())
          and all(close(v, ref[n]) for n, v in full.items()))
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
def test_2d_needs_a_square_tp_size_and_divisible_shapes():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg = ParallelConfig(tensor_model_parallel_size=2, tensor_parallel_mode="2d")
    with pytest.raises(ConfigError, match="square tensor-parallel size"):
        Trainer(model_cfg(), train_cfg(comm.size // 2), pcfg, Grid(comm, 2, 1), **QUIET)


@pytest.mark.mpi(min_size=4)
def test_2d_with_zero_1():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg, dp = layout(comm)
    pcfg.zero_stage = 1
    par = Trainer(model_cfg(), train_cfg(dp), pcfg, Grid(comm, 4, 1), **QUIET)
    ser = Trainer(model_cfg(), train_cfg(dp), **QUIET)
    hist, ref = par.run(), ser.run()
    full = par.model.full_tensors(par.model.params.data)
    ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
          and all(close(v, ser.model.params[n]) for n, v in full.items()))
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_2d_with_pipeline_parallelism(schedule):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.size % 8:
        pytest.skip("needs a multiple of 8 ranks")
    dp = comm.size // 8
    pcfg = ParallelConfig(tensor_model_parallel_size=4, tensor_parallel_mode="2d",
                          pipeline_model_parallel_size=2, pipeline_schedule=schedule)
    tcfg = train_cfg(dp)
    par = Trainer(model_cfg(0.1), tcfg, pcfg, Grid(comm, 4, 2), **QUIET)
    ser = Trainer(model_cfg(0.1), tcfg, **QUIET)
    ok = same_run(par, ser)
    assert agree(comm, ok), schedule
