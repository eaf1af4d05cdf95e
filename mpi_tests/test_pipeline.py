"""Pipeline parallelism equals the single process in float64 for every schedule: losses,
validation losses, each stage's gradients and its parameters after several steps; with data
parallelism and dropout; and checkpoints move between pipelined and single-process runs."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from roundtrip import checkpoint_roundtrip

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


def model_cfg(dropout=0.0):
    # 8 layers: every schedule at p = 2 and 4, interleaved with v = 2 chunks per rank
    return ModelConfig(num_layers=8, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16, dropout=dropout)


def train_cfg(dp, micro_batches):
    return TrainConfig(micro_batch_size=1, global_batch_size=dp * micro_batches, train_iters=3,
                       lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       synthetic_data=True, eval_iters=1, eval_interval=2, log_interval=100)


def layouts(world):
    for pp in (2, 4):
        if world % pp == 0:
            for schedule, v in SCHEDULES:
                yield pp, schedule, v


_SERIAL = {}


def serial_run(dropout, tcfg):
    """The single-process run (history, parameters) for this dropout and training config, run
    once per session: it does not depend on the schedule, so every layout compares with it."""
    key = (dropout, repr(tcfg))
    if key not in _SERIAL:
        ser = Trainer(model_cfg(dropout), tcfg, log=lambda *_: None)
        _SERIAL[key] = ser.run(), ser.model.params
    return _SERIAL[key]


def agree(comm, ok):
    return all(comm.allgather(bool(ok)))


def close(a, b, tol=1e-12):
    return np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-300)


# Parameters after AdamW steps in the 3-D layout. AdamW's step per element is m / sqrt(v), so
# an element whose gradient is far below its tensor's largest carries the gradient's rounding
# (here 1e-13 of the largest) into its step, relatively larger. How far depends on the CPU's
# float64 GEMM kernels: TP 2 x PP 2 x DP 2, gpipe, three steps: 6.1e-13 of the largest
# parameter on an AVX2 machine, 1.7e-12 on an AVX-512 one (h.0.mlp.c_proj.weight, where the
# gradient is 6% of its tensor's largest), with losses within 1.2e-16 and gradients within
# 3.7e-13 on both.
ADAMW_TOL = 1e-11


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_schedule_equals_single_process(dropout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    for pp, schedule, v in layouts(comm.size):
        dp = comm.size // pp
        tcfg = train_cfg(dp, micro_batches=2 * pp)
        pcfg = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule=schedule,
                              num_virtual_stages=v)
        par = Trainer(model_cfg(dropout), tcfg, pcfg, Grid(comm, 1, pp), log=lambda *_: None)
        hist, (ref, s) = par.run(), serial_run(dropout, tcfg)
        p = par.model.params
        ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
              and np.allclose([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref], rtol=1e-12)
              and np.allclose([h["val_loss"] for h in hist if "val_loss" in h],
                              [h["val_loss"] for h in ref if "val_loss" in h], rtol=1e-12)
              and all(close(p.grads[n], s.grads[n]) and close(p[n], s[n]) for n in p))
        assert agree(comm, ok), (pp, schedule, v, dropout)


@pytest.mark.mpi(min_size=2)
def test_timers_split_the_schedule_into_forward_backward_and_bubble():
    """The executor's compute ops are forward and backward; the rest of the schedule (waiting
    for the neighbour stages) is the bubble, so the three add up to the schedule's time."""
    import time
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pp = 2
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule="1f1b")
    t = Trainer(model_cfg(), train_cfg(comm.size // pp, 4), pcfg, Grid(comm, 1, pp),
                log=lambda *_: None)
    t.train_step()
    t.timers.take()
    t0 = time.perf_counter()
    t.train_step()
    step = time.perf_counter() - t0
    took = t.timers.take()
    parts = took["forward"] + took["backward"] + took["pipeline-bubble"]
    ok = (took["forward"] > 0 and took["backward"] > 0 and took["pipeline-bubble"] > 0
          and parts <= step)
    assert agree(comm, ok), took


@pytest.mark.mpi(min_size=2)
def test_tied_embedding_copies_stay_equal_and_layers_are_split():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pp = 2
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp)
    t = Trainer(model_cfg(), train_cfg(comm.size // pp, 4), pcfg, Grid(comm, 1, pp),
                log=lambda *_: None)
    t.run()
    g = t.grid
    blocks = sorted({int(n.split(".")[1]) for n in t.model.params if n.startswith("h.")})
    assert agree(comm, blocks == ([0, 1, 2, 3] if g.pp_rank == 0 else [4, 5, 6, 7]))
    wte = t.model.params["wte.weight"]
    copies = g.pp_comm.allgather(wte)
    assert agree(comm, np.array_equal(copies[0], copies[-1]))


@pytest.mark.mpi(min_size=2)
def test_checkpoints_move_between_pipeline_and_single_process():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pp = 2
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule="zb-h1")
    straight, serial, par = checkpoint_roundtrip(
        comm, model_cfg, train_cfg(comm.size // pp, 4),
        lambda tcfg: Trainer(model_cfg(), tcfg, pcfg, Grid(comm, 1, pp), log=lambda *_: None))
    ref = straight.model.params
    ok = (close(serial.model.params.data, ref.data)
          and all(close(par.model.params[n], ref[n]) for n in par.model.params))
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("sp", [False, True])
def test_pipeline_with_tensor_parallelism(sp):
    """TP 2 x PP 2 on 4 ranks; on 8 ranks also DP 2: the 3-D layout."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp, pp = 2, 2
    dp = comm.size // (tp * pp)
    for schedule, v in SCHEDULES:
        tcfg = train_cfg(dp, micro_batches=4)
        pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp, pipeline_schedule=schedule,
                              num_virtual_stages=v)
        par = Trainer(model_cfg(0.1), tcfg, pcfg, Grid(comm, tp, pp), log=lambda *_: None)
        hist, (ref, s) = par.run(), serial_run(0.1, tcfg)
        grads = par.model.full_tensors(par.model.params.grad)
        params = par.model.full_tensors(par.model.params.data)
        ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
              and np.allclose([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref], rtol=1e-12)
              and all(close(grads[n], s.grads[n]) and close(params[n], s[n], ADAMW_TOL)
                      for n in grads))
        assert agree(comm, ok), (schedule, v, sp)


@pytest.mark.mpi(min_size=2)
def test_trace_records_every_compute_op_and_the_stash():
    from mpi4py import MPI
    from refgpt.parallel.pipeline import PipelineExecutor, PipelineModel
    from refgpt.parallel.schedules import compute_ops
    comm = MPI.COMM_WORLD
    p, m = comm.size, 2 * comm.size
    cfg = ModelConfig(num_layers=p, hidden_size=16, num_attention_heads=2, seq_length=8,
                      vocab_size=45, vocab_multiple=16)
    grid = Grid(comm, 1, p)
    model = PipelineModel(cfg, np.float64, 0, grid, 1)
    ex = PipelineExecutor(model, "1f1b", m, (1, 8, 16), np.float64)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 45, (1, 8)), rng.integers(0, 45, (1, 8)), None) for _ in range(m)]
    trace = []
    ex.run(batches, float(m * 8), trace=trace)
    ops = compute_ops(p, m, 1, "1f1b")[grid.pp_rank]
    held = [b for *_, b in trace]
    ok = ([(k, mb, c) for k, mb, c, *_ in trace] == [(o.kind, o.mb, o.chunk) for o in ops]
          and all(s <= e for _, _, _, s, e, _ in trace) and held[-1] == 0
          and max(held) == held[min(p - grid.pp_rank, m) - 1])   # peak after the warm-up F's
    assert agree(comm, ok)
