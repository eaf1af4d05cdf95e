"""ZeRO stages 1-3 equal the single process in float64 (losses, gradient norms, validation
losses, every parameter and this rank's gradient shard), alone, with gradient accumulation,
with tensor parallelism and (stage 1) with pipeline parallelism; the memory registry and the
traffic counters equal the ZeRO formulas; optimizer offload equals in-memory; checkpoints move
between ZeRO and single-process runs."""

import tempfile
from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from refgpt.parallel.zero import formula_bytes, formula_traffic
from roundtrip import checkpoint_roundtrip

QUIET = dict(log=lambda *_: None)


def model_cfg():
    # 4 layers (pipeline stages of 2), a vocabulary whose padding makes the units uneven
    return ModelConfig(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16)


def train_cfg(dp, micro_batches, **kw):
    return TrainConfig(micro_batch_size=1, global_batch_size=dp * micro_batches, train_iters=3,
                       lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       weight_decay=0.1, synthetic_data=True, eval_iters=1, eval_interval=2,
                       log_interval=100, **kw)


def agree(comm, ok):
    return all(comm.allgather(bool(ok)))


def close(a, b):
    return np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1e-300)


def full_params(t):
    """Every full parameter of a trainer's model (ZeRO and TP shards gathered, and with
    expert parallelism every rank's experts)."""
    full = t.model.full_tensors(t.model.params.full_data())
    if t.grid.ep_size > 1:
        for theirs in t.grid.ep_comm.allgather(full):
            full.update(theirs)
    return full


def same_run(par, ser, hist, ref):
    """Equal step by step and at the end: losses, norms, validation, parameters; and this
    rank's reduced gradient shard equals the same slice of the single process's gradient."""
    ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
          and np.allclose([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref], rtol=1e-12)
          and np.allclose([h["val_loss"] for h in hist if "val_loss" in h],
                          [h["val_loss"] for h in ref if "val_loss" in h], rtol=1e-12))
    mine, theirs = full_params(par), dict(ser.model.params.items())
    ok = ok and all(close(v, theirs[n]) for n, v in mine.items())
    z = par.model.params
    if par.pcfg.zero_stage and par.grid.tp_size == par.grid.pp_size == par.grid.ep_size == 1:
        # the same flat layout as one process's
        (lo, hi), = z.own_runs
        hi_real = min(hi, z.numel)
        if hi_real > lo:
            ok = ok and close(z.grad_shard()[:hi_real - lo], ser.model.params.grad[lo:hi_real])
    return ok


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_zero_equals_single_process(stage, micro_batches):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d = comm.size
    tcfg = train_cfg(d, micro_batches)
    par = Trainer(model_cfg(), tcfg, ParallelConfig(zero_stage=stage), Grid(comm), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    hist, ref = par.run(), ser.run()
    assert agree(comm, same_run(par, ser, hist, ref)), (stage, micro_batches)
    p = par.model.params
    assert agree(comm, p.padded % d == 0 and p.param_shard().size == p.padded // d)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_memory_registry_and_traffic_equal_the_formulas(stage):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d, m = comm.size, 3
    t = Trainer(model_cfg(), replace(train_cfg(d, m), eval_iters=0),
                ParallelConfig(zero_stage=stage), Grid(comm), **QUIET)
    hist = t.run()
    p, b = t.model.params, 8
    mem = hist[-1]["memory_bytes"]
    held = mem["params"] + mem["grads"] + mem["optimizer"]
    expect_traffic = formula_traffic(stage, p.padded, d, m, b)
    ok = (held == formula_bytes(stage, p.padded, d, b) == mem["formula"]
          and all(abs(h["dp_comm_bytes"] - expect_traffic) <= 1e-9 * expect_traffic for h in hist))
    if stage == 3:                    # temporaries: at most a few units, never the whole model
        ok = ok and 0 < mem["working_peak"] < 2 * b * p.padded
    assert agree(comm, ok), (stage, held, mem, hist[-1]["dp_comm_bytes"], expect_traffic)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("sp", [False, True])
def test_zero_with_tensor_parallelism(stage, sp):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp = 2
    tcfg = train_cfg(comm.size // tp, 2)
    pcfg = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, zero_stage=stage)
    par = Trainer(model_cfg(), tcfg, pcfg, Grid(comm, tp, 1), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    hist, ref = par.run(), ser.run()
    assert agree(comm, same_run(par, ser, hist, ref)), (stage, sp)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_zero_1_with_pipeline_parallelism(schedule):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pp = 2
    tcfg = train_cfg(comm.size // pp, 4)
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule=schedule,
                          zero_stage=1)
    par = Trainer(model_cfg(), tcfg, pcfg, Grid(comm, 1, pp), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    hist, ref = par.run(), ser.run()
    mine = par.model.full_tensors(par.model.params.data)
    theirs = dict(ser.model.params.items())
    ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
          and all(close(v, theirs[n]) for n, v in mine.items()))
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_with_pipeline_are_refused_with_the_reason(stage):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg = ParallelConfig(pipeline_model_parallel_size=2, zero_stage=stage)
    with pytest.raises(ConfigError, match="m times the traffic of stage 1"):
        Trainer(model_cfg(), train_cfg(comm.size // 2, 2), pcfg, Grid(comm, 1, 2), **QUIET)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 3])
def test_offload_equals_in_memory(stage):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    folder = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    tcfg = train_cfg(comm.size, 2)
    runs = [Trainer(model_cfg(), tcfg, ParallelConfig(zero_stage=stage, offload_optimizer=f),
                    Grid(comm), **QUIET) for f in ("", folder)]
    hists = [t.run() for t in runs]
    mem, off = runs[1].opt.m, runs[1].model.params.param_shard()
    ok = (isinstance(mem, np.memmap) and hists[1][-1]["memory_bytes"]["optimizer"] == 0
          and np.array_equal(runs[0].model.params.param_shard(), off)
          and np.array_equal(runs[0].opt.v, runs[1].opt.v)
          and [h["loss"] for h in hists[0]] == [h["loss"] for h in hists[1]])
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage, shared", [(1, False), (3, False), (1, True)])
def test_zero_checkpoints_load_in_any_layout(stage, shared):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pcfg = ParallelConfig(zero_stage=stage, dp_shared_memory=shared)
    straight, serial, resumed = checkpoint_roundtrip(
        comm, model_cfg, train_cfg(comm.size, 2),
        lambda tcfg: Trainer(model_cfg(), tcfg, pcfg, Grid(comm), **QUIET))
    ref = dict(straight.model.params.items())
    ok = (all(close(v, ref[n]) for n, v in serial.model.params.items())
          and all(close(v, ref[n]) for n, v in full_params(resumed).items())
          and np.isclose(resumed.history[-1]["loss"], straight.history[-1]["loss"], rtol=1e-12))
    assert agree(comm, ok)


def shared_trainer(tcfg, grid, **pcfg):
    return Trainer(model_cfg(), tcfg, ParallelConfig(zero_stage=1, dp_shared_memory=True, **pcfg),
                   grid, **QUIET)


def as_nodes(monkeypatch, per_node):
    """Make the trainer's shared-memory ZeRO treat groups of per_node ranks as nodes."""
    import refgpt.parallel.build
    from refgpt.parallel.shared import SharedParams

    def node_comm_of(dp_comm):
        return dp_comm.Split(dp_comm.Get_rank() // per_node, dp_comm.Get_rank())

    monkeypatch.setattr(refgpt.parallel.build, "SharedParams",
                        lambda specs, dtype, comm, grad_dtype=None: SharedParams(
                            specs, dtype, comm, node_comm=node_comm_of(comm),
                            grad_dtype=grad_dtype))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("nodes", [1, 2])
def test_shared_memory_equals_single_process(monkeypatch, micro_batches, nodes):
    """nodes 2: the ranks act as two nodes (halves; at 2 ranks, nodes of one rank each), so
    the shards are also all-reduced across them."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d = comm.size
    node = d // nodes if d % nodes == 0 else 1
    if node < d:
        as_nodes(monkeypatch, node)
    tcfg = train_cfg(d, micro_batches)
    par = shared_trainer(tcfg, Grid(comm))
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    hist, ref = par.run(), ser.run()
    p = par.model.params
    ok = same_run(par, ser, hist, ref) and p.padded % node == 0
    S, c = p.padded // node, d // node            # reads P - S elements, all-reduces S over c
    expect = ((p.padded - S) + 2 * S * (c - 1) / c) * 8
    ok = ok and all(abs(h["dp_comm_bytes"] - expect) <= 1e-9 * expect for h in hist)
    mem = hist[-1]["memory_bytes"]
    held = mem["params"] + mem["grads"] + mem["optimizer"]
    ok = ok and held == formula_bytes(1, p.padded, node, 8, shared=True) == mem["formula"]
    par.close()                                  # the windows go back to MPI, collectively
    ser.close()                                  # nothing shared: a no-op
    ok = ok and p.windows == [] and par.model is None
    assert agree(comm, ok), (micro_batches, nodes)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_shared_memory_with_tensor_and_pipeline_parallelism(layout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp, pp = (2, 1) if layout == "tp" else (1, 2)
    tcfg = train_cfg(comm.size // (tp * pp), 4)
    par = shared_trainer(tcfg, Grid(comm, tp, pp), tensor_model_parallel_size=tp,
                         pipeline_model_parallel_size=pp, sequence_parallel=tp > 1)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    hist, ref = par.run(), ser.run()
    assert agree(comm, same_run(par, ser, hist, ref)), layout
