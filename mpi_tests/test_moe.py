"""Mixture of experts in parallel layouts equals the single process in float64 (losses,
gradient norms, validation losses, every parameter): data parallel with gradient
accumulation, ZeRO 1-3, tensor parallel (each expert split as the dense MLP), pipeline
parallel and tensor x pipeline; top-1 and top-2; a capacity that drops tokens and none; and
the logged MoE statistics are the single process's."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, same_run, train_cfg


def moe_cfg(k, factor):
    return ModelConfig(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16, num_experts=4, moe_layer_freq=2,
                       moe_router_topk=k, moe_expert_capacity_factor=factor,
                       moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)


def layouts(world):
    yield "dp", dict()
    for stage in (1, 2, 3):
        yield f"dp zero-{stage}", dict(zero_stage=stage)
    if world % 2 == 0:
        yield "tp2", dict(tensor_model_parallel_size=2)
        yield "pp2 1f1b", dict(pipeline_model_parallel_size=2)
        yield "pp2 zb-h1", dict(pipeline_model_parallel_size=2, pipeline_schedule="zb-h1")
    if world % 4 == 0:
        yield "tp2 pp2 zero-1", dict(tensor_model_parallel_size=2,
                                     pipeline_model_parallel_size=2, zero_stage=1)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("k, factor", [(1, 0.0), (2, 0.0), (1, 1.0), (2, 0.75)])
def test_experts_in_every_layout_equal_the_single_process(k, factor):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options in layouts(comm.size):
        pcfg = ParallelConfig(**options)
        tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
        dp = comm.size // (tp * pp)
        tcfg = train_cfg(dp, 2)
        par = Trainer(moe_cfg(k, factor), tcfg, pcfg, Grid(comm, tp, pp), **QUIET)
        ser = Trainer(moe_cfg(k, factor), tcfg, **QUIET)
        hist, ref = par.run(), ser.run()
        ok = same_run(par, ser, hist, ref)
        for h, r in zip(hist, ref):              # the logged statistics, layer by layer
            for a, b in zip(h["moe"], r["moe"]):
                ok = ok and a["layer"] == b["layer"] and a["load_min"] == b["load_min"] \
                    and a["load_max"] == b["load_max"] and a["dropped"] == b["dropped"] \
                    and np.isclose(a["aux_loss"], b["aux_loss"], rtol=1e-12) \
                    and np.isclose(a["z_loss"], b["z_loss"], rtol=1e-12)
            ok = ok and len(h["moe"]) == len(r["moe"]) == 2
        if factor:
            ok = ok and all(m["dropped"] > 0 for r in ref for m in r["moe"])
        par.close()
        if not agree(comm, ok):
            failures.append(name)
    assert not failures, failures
