"""Mixture of experts in parallel layouts equals the single process in float64 (losses,
gradient norms, validation losses, every parameter): data parallel with gradient
accumulation, ZeRO 1-3, tensor parallel (each expert split as the dense MLP), pipeline
parallel (with and without sequence parallelism) and tensor x pipeline; expert parallelism
(EP 2 and 4, alone, with ZeRO 1-3, with TP 2 +/- SP, with PP 2, with one gradient bucket and
without overlap); top-1 and top-2; a capacity that drops tokens
and none; the logged MoE statistics are the single process's, and the all-to-all volume
equals its formula."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, full_params, same_run, train_cfg


def moe_cfg(k, factor):
    return ModelConfig(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16, num_experts=4, moe_layer_freq=2,
                       moe_router_topk=k, moe_expert_capacity_factor=factor,
                       moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)


def layouts(world, every: bool = True):
    """Every layout this world size has; with every False, one of each kind (DP, EP, TP, PP)."""
    if not every:
        yield "ep2", dict(expert_model_parallel_size=2)
        if world % 2 == 0:
            yield "tp2", dict(tensor_model_parallel_size=2)
            yield "pp2 1f1b", dict(pipeline_model_parallel_size=2)
        if world % 4 == 0:
            yield "ep4", dict(expert_model_parallel_size=4)
        return
    yield "dp", dict()
    yield "ep2", dict(expert_model_parallel_size=2)
    yield "ep2 one bucket, no overlap", dict(expert_model_parallel_size=2, ddp_bucket_size=0,
                                            overlap_grad_reduce=False)
    for stage in (1, 2, 3):
        yield f"ep2 zero-{stage}", dict(expert_model_parallel_size=2, zero_stage=stage)
    for stage in (1, 2, 3):
        yield f"dp zero-{stage}", dict(zero_stage=stage)
    if world % 2 == 0:
        yield "tp2", dict(tensor_model_parallel_size=2)
        yield "tp2 sp", dict(tensor_model_parallel_size=2, sequence_parallel=True)
        yield "pp2 1f1b", dict(pipeline_model_parallel_size=2)
        yield "pp2 zb-h1", dict(pipeline_model_parallel_size=2, pipeline_schedule="zb-h1")
    if world % 4 == 0:
        yield "tp2 pp2 zero-1", dict(tensor_model_parallel_size=2,
                                     pipeline_model_parallel_size=2, zero_stage=1)
        yield "ep4", dict(expert_model_parallel_size=4)
        yield "ep2 tp2", dict(expert_model_parallel_size=2, tensor_model_parallel_size=2)
        yield "ep2 tp2 sp", dict(expert_model_parallel_size=2, tensor_model_parallel_size=2,
                                 sequence_parallel=True)
        yield "ep2 pp2", dict(expert_model_parallel_size=2, pipeline_model_parallel_size=2)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("k, factor", [(1, 0.0), (2, 0.0), (1, 1.0), (2, 0.75)])
def test_experts_in_every_layout_equal_the_single_process(k, factor):
    """Every layout where the capacity drops tokens (the harder routing), one of each kind
    where it does not."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for name, options in layouts(comm.size, every=factor > 0):
        pcfg = ParallelConfig(**options)
        tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
        dp = comm.size // (tp * pp)
        tcfg = train_cfg(dp, 2)
        ep = pcfg.expert_model_parallel_size
        par = Trainer(moe_cfg(k, factor), tcfg, pcfg, Grid(comm, tp, pp, ep), **QUIET)
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
        else:
            ok = ok and all(m["dropped"] == 0 for r in ref for m in r["moe"])
        par.close()
        if not agree(comm, ok):
            failures.append(name)
    assert not failures, failures


@pytest.mark.mpi(min_size=2)
def test_all_to_all_volume_equals_its_formula(monkeypatch):
    """Per layer, the elements each rank sent to other ranks: for every dispatch, C times the
    rows it routed to other ranks' experts; for every combine, C times the rows other ranks
    sent its experts. And the counts exchange is right: what a rank receives from each source
    for its experts is what that source routed to them."""
    from mpi4py import MPI
    from refgpt.parallel.expert import ExpertComm
    comm = MPI.COMM_WORLD
    calls = []
    for kind in ("dispatch", "combine"):
        def record(self, plan, rows, site, _f=getattr(ExpertComm, kind), _k=kind):
            calls.append((_k, site, plan, self))
            return _f(self, plan, rows, site)
        monkeypatch.setattr(ExpertComm, kind, record)
    pcfg = ParallelConfig(expert_model_parallel_size=2)
    t = Trainer(moe_cfg(2, 1.0), train_cfg(comm.size, 2), pcfg, Grid(comm, 1, 1, 2), **QUIET)
    t.run()
    ep = t.model.parts.ep
    want = {}
    for kind, site, plan, _ in calls:
        remote = [s for s in range(ep.size) if s != ep.rank]
        mine = ep.local
        rows = (sum(n for e, n in enumerate(plan.sent) if e not in mine) if kind == "dispatch"
                else plan.recv[remote].sum())
        want[(site, "all-to-all")] = want.get((site, "all-to-all"), 0) + rows * 16
    sent = [c[2].sent for c in calls if c[0] == "dispatch"]
    theirs = ep.comm.allgather(sent)
    ok = dict(ep.volume) == want and len(want) == 2
    for i, kind_site_plan in enumerate(c for c in calls if c[0] == "dispatch"):
        plan = kind_site_plan[2]
        for s in range(ep.size):
            ok = ok and list(plan.recv[s]) == list(theirs[s][i][ep.local.start:ep.local.stop])
    t.close()
    assert agree(comm, ok), (dict(ep.volume), want)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_shards_dense_state_over_data_parallel_and_experts_over_their_group(stage):
    """Under EP e, ZeRO partitions the dense parameters over all d data-parallel ranks and
    the experts over the d / e that hold them: the optimizer's moments are 2 x 8 bytes for
    Pd / d + Px e / d elements (Pd, Px: the dense and expert parameters, each padded to its
    group), the registry equals the per-region formula (with stages 1-2's contiguous copy of
    the own parts), and the traffic is the ZeRO formula of each region over its group."""
    from mpi4py import MPI
    from dataclasses import replace
    from refgpt.parallel.expert import expert_of
    from refgpt.parallel.zero import formula_bytes, formula_traffic
    comm = MPI.COMM_WORLD
    d, e, m, b = comm.size, 2, 3, 8                     # an even world, as every EP 2 test
    t = Trainer(moe_cfg(2, 1.0), replace(train_cfg(d, m), eval_iters=0),
                ParallelConfig(expert_model_parallel_size=e, zero_stage=stage),
                Grid(comm, 1, 1, e), **QUIET)
    hist = t.run()
    specs = t.model.params.specs.values()
    dense = sum(s.size for s in specs if expert_of(s.name) is None)
    experts = sum(s.size for s in specs if expert_of(s.name) is not None)
    Pd, Px = -(-dense // d) * d, -(-experts // (d // e)) * (d // e)
    own = Pd // d + Px * e // d
    mem = hist[-1]["memory_bytes"]
    copies = {1: 2 * b * own, 2: b * own, 3: 0}[stage]
    want = formula_bytes(stage, Pd, d, b) + formula_bytes(stage, Px, d // e, b) + copies
    held = mem["params"] + mem["grads"] + mem["optimizer"]
    traffic = formula_traffic(stage, Pd, d, m, b) + formula_traffic(stage, Px, d // e, m, b)
    ok = (t.model.params.shard_size == own and mem["optimizer"] == 2 * b * own
          and held == want == mem["formula"]
          and all(abs(h["dp_comm_bytes"] - traffic) <= 1e-9 * traffic for h in hist))
    t.close()
    assert agree(comm, ok), (stage, own, mem, want, hist[-1]["dp_comm_bytes"], traffic)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_checkpoints_move_between_expert_parallel_and_single_process(stage):
    """EP 2 (with ZeRO 1 and 3: the dense region sharded over DP, the experts over expert DP)
    saves one copy of each piece; one process resumes from it and continues as the straight run; the EP layout
    resumes from one process's checkpoint."""
    from mpi4py import MPI
    from roundtrip import checkpoint_roundtrip
    comm = MPI.COMM_WORLD
    pcfg = ParallelConfig(expert_model_parallel_size=2, zero_stage=stage)
    straight, serial, par = checkpoint_roundtrip(
        comm, lambda: moe_cfg(2, 1.0), train_cfg(comm.size, 2),
        lambda tcfg: Trainer(moe_cfg(2, 1.0), tcfg, pcfg, Grid(comm, 1, 1, 2), **QUIET))
    ref = straight.model.params
    ok = (np.abs(serial.model.params.data - ref.data).max() <= 1e-12 * np.abs(ref.data).max()
          and all(np.abs(v - ref[n]).max() <= 1e-12 * np.abs(ref[n]).max()
                  for n, v in full_params(par).items()))
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_expert_parallelism_in_16_bits_equals_one_process_to_16_bit_precision(dtype):
    """As mpi_tests/test_mixed_precision.py's layouts (the tolerances are derived there): the
    router's softmax and gates are fp32 from the same 16-bit activations in every layout; an
    expert's GEMM runs on the rows of several micro-batches at once, whose fp32 sums may
    round one 16-bit ulp the other way. Step 1 sees the same weights, so its loss is within
    EPS / 64. From step 2 the runs drift as two 16-bit runs do, and a routing decision can
    differ too: a token whose two candidate experts' probabilities lie within a rounding of
    each other may go to the other one, which changes that token's share of the gradient
    outright instead of by an ulp; a token's share of the gradient's norm is at most about
    2 / (tokens per step), so the norms are held to EPS + 2 / tokens (the losses, averages
    over every token, stay within EPS / 4; measured in fp16 at 8 ranks: norms 1.3e-3 apart,
    against EPS = 4.9e-4 and a bound of 4.4e-3)."""
    from mpi4py import MPI
    from dataclasses import replace
    from test_mixed_precision import EPS, rel
    from test_mixed_precision import train_cfg as mixed_cfg
    comm = MPI.COMM_WORLD
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, num_experts=4, moe_router_topk=2,
                      moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.01)
    eps = EPS[dtype]
    tcfg = replace(mixed_cfg(dtype), global_batch_size=4 * comm.size)
    ref = Trainer(cfg, tcfg, **QUIET).run()
    failures = []
    for name, options in (("ep2", dict(expert_model_parallel_size=2)),
                          ("ep2 pp2", dict(expert_model_parallel_size=2,
                                           pipeline_model_parallel_size=2))):
        pcfg = ParallelConfig(**options)
        pp = pcfg.pipeline_model_parallel_size
        if (comm.size // pp) % 2:
            continue
        t = Trainer(cfg, tcfg, pcfg, Grid(comm, 1, pp, 2), **QUIET)
        hist = t.run()
        t.close()
        first = rel(hist[0]["loss"], ref[0]["loss"])
        loss = rel([h["loss"] for h in hist], [h["loss"] for h in ref])
        norms = rel([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref])
        flips = 2 / (tcfg.global_batch_size * cfg.seq_length)
        if not (first <= eps / 64 and loss <= eps / 4 and norms <= eps + flips):
            failures.append((name, first, loss, norms))
    assert agree(comm, not failures), failures
