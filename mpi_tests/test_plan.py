"""The planner's memory (refgpt.plan.rank_memory) equals the registry on every rank of every
layout it lists for this world (TP 1-D and 2-D, PP with 1F1B, interleaved and zero-bubble,
ZeRO 0-3, recomputation), after one training step in float32: the persistent categories and
ZeRO's temporary buffers' high-water mark, with ZeRO-1 through shared memory as the ranks share
one node."""

from dataclasses import replace

import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from refgpt.plan import layouts, rank_memory
from test_zero import QUIET, agree

CATEGORIES = ("params", "grads", "optimizer", "activations")


def registry_mismatches(comm, listed) -> tuple[list[str], list[str]]:
    """(checked, failed): each runnable layout of `listed` (refgpt.plan.layouts' tuples) run
    for one step of a small model, every rank's registry against rank_memory."""
    mcfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45, vocab_multiple=16, dropout=0.1)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=8 * comm.size, train_iters=1,
                       synthetic_data=True, eval_iters=0)       # 2-D's q = 2 divides B = 2
    failures, checked = [], []
    for name, pcfg, tp, pp, dp, reason in listed(mcfg, tcfg):
        if reason:
            continue
        t = Trainer(mcfg, tcfg, pcfg, Grid(comm, tp, pp, cp=pcfg.context_parallel_size),
                    **QUIET)
        t.train_step()
        measured = t.memory()
        want = rank_memory(mcfg, tcfg, pcfg, tp, pp, dp, t.grid.pp_rank, t.grid.dp_rank)
        ok = (all(measured[k] == want[k] for k in CATEGORIES)
              and measured["working_peak"] == want["working"])
        t.close()
        checked.append(name)
        if not agree(comm, ok):
            failures.append(name)
    return checked, failures


@pytest.mark.mpi(min_size=2)
def test_every_layout_of_the_plan_has_the_registrys_memory():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    checked, failures = registry_mismatches(comm, lambda mcfg, tcfg: layouts(
        comm.size, mcfg, tcfg, ParallelConfig(), comm.size))
    assert len(checked) >= (12 if comm.size == 4 else 6) and not failures, failures
    assert any("zero-1-shm" in name for name in checked)
    assert any("pp2x2" in name for name in checked)            # the interleaved schedule
    assert any("pp2-zb" in name for name in checked)           # zero-bubble
    assert comm.size < 4 or any("tp4-2d" in name for name in checked)     # SUMMA


@pytest.mark.mpi(min_size=2)
def test_the_context_parallel_layouts_have_the_registrys_memory():
    """The layouts with context parallelism (--context-parallel-size 2: up to 2), ring and
    all-to-all, with ZeRO 0, 1 and 3, every pipeline schedule and TP, without recomputation
    (its activations under CP are checked in test_activations)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    checked, failures = registry_mismatches(comm, lambda mcfg, tcfg: (
        one for one in layouts(comm.size, mcfg, tcfg, ParallelConfig(context_parallel_size=2),
                               comm.size)
        if " cp2" in one[0] and "recompute" not in one[0] and "zero-2" not in one[0]))
    assert len(checked) >= (16 if comm.size == 4 else 2) and not failures, failures
    assert any("a2a" in name for name in checked)


@pytest.mark.mpi(min_size=2)
def test_calibration_writes_a_machine_the_planner_reads(tmp_path_factory):
    from mpi4py import MPI

    from refgpt.plan import main, read_machine
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path_factory.mktemp("m") / "here.toml") if comm.rank == 0 else None)
    tiny = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
            "--seq-length", "32", "--micro-batch-size", "2", "--vocab-size", "64"]
    assert main(["--calibrate", path, "--dtype", "float64", *tiny]) == 0
    comm.Barrier()
    m = read_machine(path)
    ok = (min(m["gemm_tflops_per_node"][t] for t in ("float64", "float32")) > 0
          and all(0 < m[table][t] <= 1 for t in ("float64", "float32")
                  for table in ("step_efficiency", "head_efficiency"))
          and m["network"]["p2p_gbs"] > 0 and m["network"]["latency_us"] > 0
          and all(m["gemm_shape"][t]["tflops"] > 0 for t in ("float64", "float32"))
          and min(m["optimizer_melem_s"][t] for t in ("float64", "float32")) > 0
          and m["process_mib"] > 0 and m["network"]["allreduce_gbs"] > 0
          and sorted(map(int, m["network"]["allreduce_gbs_by_ranks"])) == [
              n for n in range(2, comm.size + 1) if comm.size % n == 0]
          and m["memory_gib_per_node"] > 0)
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
def test_the_planned_data_parallel_bytes_equal_the_counters():
    """At an all-reduce rate of one byte a second the plan's all-reduce seconds are its bytes:
    the data-parallel layouts' (ZeRO 0-3) equal what a step's counters count."""
    from mpi4py import MPI

    from refgpt.plan import Rates, plan
    comm = MPI.COMM_WORLD
    mcfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45, vocab_multiple=16)
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=2 * comm.size, train_iters=1,
                       synthetic_data=True, eval_iters=0)
    records = {r["layout"]: r for r in plan([], comm.size, Rates(1e9, lambda n, *_: 1.0), mcfg,
                                            tcfg, ParallelConfig()) if "refused" not in r}
    ok, checked = True, 0
    for zero in range(4):
        name = f"tp1 pp1 dp{comm.size}" + (f" zero-{zero}" if zero else "")
        t = Trainer(mcfg, tcfg, ParallelConfig(zero_stage=zero), Grid(comm), **QUIET)
        moved = t.train_step()["dp_comm_bytes"]
        t.close()
        ok = ok and abs(records[name]["step_time_s"]["allreduce_s"] - moved) <= 1e-9 * moved
        checked += 1
    assert checked == 4 and agree(comm, ok)


@pytest.mark.mpi(min_size=2)
def test_expert_parallel_layouts_memory_and_the_routing_bound():
    """Every layout listed for a model with experts (top-2 of 4 in every other block), ZeRO
    0-3 among them: without expert parallelism every category equals the registry; with it
    (a rank holds E / e experts; ZeRO partitions them over the d / e ranks that hold the
    same) the parameters, gradients, optimizer state and ZeRO's temporary buffers do, and
    the activations, which depend on how many tokens the routing sent this rank's experts,
    lie between none of them and the planner's worst-routing bound, which is above its
    balanced figure."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    mcfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=45, vocab_multiple=16, num_experts=4, moe_router_topk=2,
                       moe_layer_freq=2)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4 * comm.size, train_iters=1,
                       synthetic_data=True, eval_iters=0)
    checked, ok = [], True
    for name, pcfg, tp, pp, dp, reason in layouts(comm.size, mcfg, tcfg, ParallelConfig(),
                                                  comm.size):
        if reason or "recompute" in name or "x" in name.split()[1]:
            continue
        t = Trainer(mcfg, tcfg, pcfg, Grid(comm, tp, pp, ep=pcfg.expert_model_parallel_size),
                    **QUIET)
        t.train_step()
        got = t.memory()
        args = (mcfg, tcfg, pcfg, tp, pp, dp, t.grid.pp_rank, t.grid.dp_rank)
        balanced, worst = rank_memory(*args), rank_memory(*args, routing="worst")
        t.close()
        exact = ("params", "grads", "optimizer") + (("activations",) if " ep" not in name
                                                    else ())
        fine = all(got[k] == balanced[k] for k in exact) \
            and got["working_peak"] == balanced["working"]
        if " ep" in name:
            dense = rank_memory(replace(mcfg, num_experts=0), tcfg, replace(
                pcfg, expert_model_parallel_size=1), tp, pp, dp, t.grid.pp_rank)
            fine &= (dense["activations"] < got["activations"] <= worst["activations"]
                     and balanced["activations"] < worst["activations"])
        ok &= agree(comm, fine)
        checked.append(name)
    assert ok and any(" ep" in n for n in checked), checked
    assert any(" ep" in n and "zero-3" in n for n in checked), checked
