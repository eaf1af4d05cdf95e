"""LAMB's per-tensor trust ratios need whole tensors: data and pipeline parallelism keep them
whole, and train equal to one process in float64 (1e-12)."""

from dataclasses import replace

import pytest

from refgpt.config import ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, model_cfg, same_run, train_cfg


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pp", [1, 2])
def test_lamb_in_parallel_equals_one_process(pp):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = replace(train_cfg(comm.size // pp, 2), optimizer="lamb")
    par = Trainer(model_cfg(), tcfg, ParallelConfig(pipeline_model_parallel_size=pp),
                  Grid(comm, 1, pp), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    ok = same_run(par, ser, par.run(), ser.run())
    par.close()
    assert agree(comm, ok)
