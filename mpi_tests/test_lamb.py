"""LAMB's per-tensor trust ratios need whole-tensor norms: data and pipeline parallelism keep
tensors whole; ZeRO 1-3 (each rank a part of the flat buffer) and tensor parallelism (each
rank a shard; replicated tensors counted once) sum the ranks' partial squares. Every layout
trains equal to one process in float64 (1e-12); in bfloat16 (fp32 master weights) DP 2 with
ZeRO-1 against one bfloat16 process within 2^-8 of the loss (the 16-bit roundings' bound,
tests/test_cupy.py)."""

from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, model_cfg, same_run, train_cfg


def layouts(world):
    yield "dp", {}
    yield "pp2", dict(pipeline_model_parallel_size=2)
    for stage in (1, 2, 3):
        yield f"zero-{stage}", dict(zero_stage=stage)
    yield "tp2", dict(tensor_model_parallel_size=2)
    if world % 4 == 0:
        yield "tp2 sp zero-1", dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                    zero_stage=1)
        yield "tp2 zero-3", dict(tensor_model_parallel_size=2, zero_stage=3)


@pytest.mark.mpi(min_size=2)
def test_lamb_in_parallel_equals_one_process():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options in layouts(comm.size):
        pcfg = ParallelConfig(**options)
        tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
        if comm.size % (tp * pp):
            continue
        tcfg = replace(train_cfg(comm.size // (tp * pp), 2), optimizer="lamb")
        par = Trainer(model_cfg(), tcfg, pcfg, Grid(comm, tp, pp), **QUIET)
        ser = Trainer(model_cfg(), tcfg, **QUIET)
        ok = same_run(par, ser, par.run(), ser.run())
        par.close()
        if not agree(comm, ok):
            failures.append(name)
    assert not failures, failures


@pytest.mark.mpi(min_size=2)
def test_lamb_in_bfloat16_with_zero_matches_one_process():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = replace(train_cfg(comm.size, 2), optimizer="lamb", dtype="bfloat16")
    par = Trainer(model_cfg(), tcfg, ParallelConfig(zero_stage=1), Grid(comm), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    got, ref = par.run(), ser.run()
    par.close()
    ok = np.allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=2.0 ** -8, atol=0)
    assert agree(comm, ok)
