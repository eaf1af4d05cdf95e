"""Layered gradient accumulation (--layered-gradient-accumulation: every micro-batch through
one unit before the next) equals ordinary accumulation in float64 to 1e-12 in every layout it
supports (data parallelism, ZeRO 1-3, TP 2 + SP, experts over EP 2, context parallelism, with
dropout and recomputation): losses, norms, validation and every parameter. ZeRO's traffic
counters equal the formula with one micro-batch's reduction a step (stages 2 and 3 reduce,
and stage 3 gathers, each unit once instead of m times; the final LayerNorm's unit, whose
forward and backward run together, gathered once instead of twice), and the registry holds
every micro-batch's activations."""

import pytest

from refgpt.config import ModelConfig, ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from refgpt.parallel.zero import formula_traffic
from test_zero import QUIET, agree, close, full_params, train_cfg

M = 4                                                   # micro-batches per data-parallel rank


def cfg(**kw):
    return ModelConfig(**{**dict(num_layers=4, hidden_size=16, num_attention_heads=4,
                                 seq_length=8, vocab_size=45, vocab_multiple=16, dropout=0.1),
                          **kw})


def layouts(world):
    yield "dp", {}, {}
    for stage in (1, 2, 3):
        yield f"zero-{stage}", dict(zero_stage=stage), {}
    yield "dp recompute full", dict(recompute_granularity="full"), {}
    if world % 2 == 0:
        yield "tp2 sp", dict(tensor_model_parallel_size=2, sequence_parallel=True), {}
        yield "ep2", dict(expert_model_parallel_size=2), dict(num_experts=4)
        yield "cp2 p2p", dict(context_parallel_size=2), {}


def same(a, b, ha, hb) -> bool:
    """Losses, norms, validation losses and every full parameter equal to 1e-12."""
    ok = all(abs(x[k] - y[k]) <= 1e-12 * abs(y[k]) for x, y in zip(ha, hb)
             for k in ("loss", "grad_norm", "val_loss") if k in y)
    mine, theirs = full_params(a), full_params(b)
    return ok and len(ha) == len(hb) and all(close(v, theirs[n]) for n, v in mine.items())


def trainer(comm, options, model, layered):
    pcfg = ParallelConfig(layered_gradient_accumulation=layered, **options)
    tp, cp = pcfg.tensor_model_parallel_size, pcfg.context_parallel_size
    data = comm.size // (tp * cp)
    tcfg = train_cfg(data, M)
    grid = Grid(comm, tp, 1, pcfg.expert_model_parallel_size, cp)
    return Trainer(cfg(**model), tcfg, pcfg, grid, **QUIET)


@pytest.mark.mpi(min_size=2)
def test_layered_accumulation_equals_ordinary_accumulation():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options, model in layouts(comm.size):
        ordinary, layered = trainer(comm, options, model, False), trainer(comm, options, model,
                                                                           True)
        ok = same(layered, ordinary, layered.run(), ordinary.run())
        layered.close()
        ordinary.close()
        if not agree(comm, ok):
            failures.append(name)
    assert not failures, failures


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_traffic_falls_from_m_fold_to_one_fold(stage):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d, ok = comm.size, True
    records = {}
    for layered in (False, True):
        t = trainer(comm, dict(zero_stage=stage), {}, layered)
        hist = t.run()
        p = t.model.params
        want = formula_traffic(stage, p.padded, d, 1 if layered else M, 8)
        if stage == 3 and layered:          # ln_f runs forward and backward in one hold: its
            for u in p.by_key["ln_f"]:      # unit is gathered once a step, not twice
                a, b = p.own_part(u.lo, u.hi)
                want -= (u.size - (b - a)) * 8
        ok = ok and all(abs(h["dp_comm_bytes"] - want) <= 1e-9 * want for h in hist)
        records[layered] = hist[-1]["memory_bytes"]["activations"]
        t.close()
    ok = ok and records[True] > 2 * records[False]          # every micro-batch's activations
    assert agree(comm, ok)
