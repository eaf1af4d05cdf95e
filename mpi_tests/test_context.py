"""Context parallelism equals the single process in float64 (losses, gradient norms,
validation losses, every parameter): CP 2 and 4, p2p (ring) and a2a (Ulysses), with and
without dropout, with DP, with TP 2 + SP, with PP 2, with ZeRO 3, with full and selective
recomputation (which change no bit); under the numba backend (the fused ring blocks); in bf16
within a derived tolerance; and the
communication counters equal the formulas of refgpt.parallel.context."""

from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.context import formula_volume
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, same_run, train_cfg


def cp_cfg(dropout=0.0, heads=4, T=16):
    return ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=heads, seq_length=T,
                       vocab_size=45, vocab_multiple=16, dropout=dropout)


def layouts(world):
    """(name, options) of every CP layout this world size has."""
    for kind in ("p2p", "a2a"):
        cp = dict(cp_comm_type=kind)
        yield f"cp2 {kind}", dict(context_parallel_size=2, **cp)
        if world % 4 == 0:
            yield f"cp4 {kind}", dict(context_parallel_size=4, **cp)
            yield f"cp2 {kind} dp2 zero-3", dict(context_parallel_size=2, zero_stage=3, **cp)
            yield f"cp2 {kind} tp2 sp", dict(context_parallel_size=2, tensor_model_parallel_size=2,
                                            sequence_parallel=True, **cp)
            yield f"cp2 {kind} pp2", dict(context_parallel_size=2,
                                         pipeline_model_parallel_size=2, **cp)


def trainer(comm, cfg, options, **train):
    pcfg = ParallelConfig(**options)
    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    cp = pcfg.context_parallel_size
    data = comm.size // (tp * pp * cp)
    tcfg = replace(train_cfg(data, 2), **train)
    return Trainer(cfg, tcfg, pcfg, Grid(comm, tp, pp, 1, cp), **QUIET), tcfg


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_context_parallel_equals_the_single_process(dropout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options in layouts(comm.size):
        par, tcfg = trainer(comm, cp_cfg(dropout), options)
        ser = Trainer(cp_cfg(dropout), tcfg, **QUIET)
        hist, ref = par.run(), ser.run()
        ok = same_run(par, ser, hist, ref)
        par.close()
        if not agree(comm, ok):
            failures.append(name)
    assert not failures, failures


@pytest.mark.mpi(min_size=2)
def test_the_numba_ring_blocks_train_as_the_single_process():
    """Under the numba backend the ring's blocks are the fused kernels of
    refgpt.kernels.numba_flash (no dropout: the reference runs with a mask); CP 2 p2p equals
    the single NumPy process in float64."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    options = dict(context_parallel_size=2, cp_comm_type="p2p")
    par, tcfg = trainer(comm, cp_cfg(), options, backend="numba")
    ser = Trainer(cp_cfg(), replace(tcfg, backend="numpy"), **QUIET)
    ok = same_run(par, ser, par.run(), ser.run())
    par.close()
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["p2p", "a2a"])
def test_recomputation_under_context_parallelism_changes_no_bit(kind):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    options = dict(context_parallel_size=2, cp_comm_type=kind)
    plain, _ = trainer(comm, cp_cfg(0.1), options)
    base = plain.run()
    ok = True
    for granularity in ("full", "selective"):
        t, _ = trainer(comm, cp_cfg(0.1), dict(options, recompute_granularity=granularity))
        hist = t.run()
        ok = ok and [h["loss"] for h in hist] == [h["loss"] for h in base] \
            and np.array_equal(t.model.params.data, plain.model.params.data)
        t.close()
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["p2p", "a2a"])
def test_communication_counters_equal_the_formulas(kind):
    """Per layer, elements sent over the CP group in a run of S steps of m micro-batches, with
    b = B H D n elements in one chunk's keys (n = T / 2C, H the rank's heads): p2p forward
    S m (C-1) 2 (2b), backward S m (2C-1) 2 (2b); a2a forward and backward S m (C-1)/C 4 (2b)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    C = 4 if comm.size % 4 == 0 else 2
    t, tcfg = trainer(comm, cp_cfg(), dict(context_parallel_size=C, cp_comm_type=kind),
                      eval_iters=0)
    t.run()
    cfg, S = t.mcfg, tcfg.train_iters
    m = tcfg.micro_batches(comm.size // C)
    heads = cfg.num_attention_heads
    per = formula_volume(tcfg.micro_batch_size, cfg.seq_length, heads, cfg.hidden_size // heads,
                         C, kind)
    want = {way: S * m * n for way, n in per.items()}
    got = dict(t.model.parts.cp.volume)
    expect = {(f"h.{i}.attn", p): n for i in range(cfg.num_layers) for p, n in want.items()}
    t.close()
    assert agree(comm, got == expect), (got, expect)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["p2p", "a2a"])
def test_context_parallel_in_bf16_stays_within_16_bit_precision(kind):
    """One process keeps the attention probabilities in bf16 (refgpt.nn.attention) while the
    ring keeps each block's in fp32 and Ulysses' all-to-all only moves bf16 values; every
    product sums in fp32 either way. So step 1's loss may differ by the rounding of P, a
    relative 2^-9 per probability that averages out over the T keys and B T tokens: within
    EPS / 4 (EPS = 2^-8, test_mixed_precision). Later steps drift as two bf16 runs do: the
    losses within EPS / 4, gradient norms within EPS (the bounds test_mixed_precision derives
    for layouts that reorder fp32 sums)."""
    from mpi4py import MPI
    from test_mixed_precision import EPS, rel
    from test_mixed_precision import train_cfg as mixed_cfg
    comm = MPI.COMM_WORLD
    cfg = cp_cfg(heads=4, T=32)
    eps = EPS["bfloat16"]
    tcfg = replace(mixed_cfg("bfloat16"), global_batch_size=2 * comm.size)
    ref = Trainer(cfg, tcfg, **QUIET).run()
    pcfg = ParallelConfig(context_parallel_size=2, cp_comm_type=kind)
    t = Trainer(cfg, tcfg, pcfg, Grid(comm, 1, 1, 1, 2), **QUIET)
    hist = t.run()
    t.close()
    first = rel(hist[0]["loss"], ref[0]["loss"])
    loss = rel([h["loss"] for h in hist], [h["loss"] for h in ref])
    norms = rel([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref])
    assert agree(comm, first <= eps / 4 and loss <= eps / 4 and norms <= eps), \
        (first, loss, norms)
