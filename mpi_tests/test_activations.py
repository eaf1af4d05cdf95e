"""The activation registry of each rank equals refgpt's formula (refgpt.nn.activations)
exactly, in tensor-parallel layouts with and without sequence parallelism and on each stage of
a 1F1B pipeline (stage r holds min(p - r, m) micro-batches), with and without recomputation
(per-stage counts included); run with 2 or 4 ranks."""

import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn.activations import Sizes, refgpt_bytes
from refgpt.parallel.grid import Grid

LAYOUTS = {  # name: (tp, pp, ParallelConfig options)
    "tp2": (2, 1, dict(tensor_model_parallel_size=2)),
    "tp2-sp": (2, 1, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "tp2-sp-full": (2, 1, dict(tensor_model_parallel_size=2, sequence_parallel=True,
                               recompute_granularity="full")),
    "tp2-chunks-of-2": (2, 1, dict(tensor_model_parallel_size=2, recompute_granularity="full",
                                   recompute_num_layers=2)),
    "tp2-selective": (2, 1, dict(tensor_model_parallel_size=2,
                                 recompute_granularity="selective")),
    "pp2": (1, 2, dict(pipeline_model_parallel_size=2)),
    "pp2-per-stage": (1, 2, dict(pipeline_model_parallel_size=2, recompute_granularity="full",
                                 recompute_method="block",
                                 recompute_num_layers_per_stage="2,0")),
    "pp2-selective": (1, 2, dict(pipeline_model_parallel_size=2,
                                 recompute_granularity="selective")),
    "pp4-per-stage": (1, 4, dict(pipeline_model_parallel_size=4, recompute_granularity="full",
                                 recompute_method="block",
                                 recompute_num_layers_per_stage="1,1,0,0")),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, dropout", [("float32", 0.1), ("bfloat16", 0.0)])
def test_activation_registry_equals_the_formula(layout, dtype, dropout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp, pp, options = LAYOUTS[layout]
    if comm.size % (tp * pp):
        pytest.skip(f"{layout} needs a multiple of {tp * pp} ranks")
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=dropout)
    dp = comm.size // (tp * pp)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=8 * dp, train_iters=1, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(**options)
    grid = Grid(comm, tp, pp)
    t = Trainer(cfg, tcfg, pcfg, grid, log=lambda *_: None)
    t.run()
    got = t.memory()["activations"]
    e, c = (2, 4) if dtype == "bfloat16" else (4, 4)
    z = Sizes(2, 16, 32, 4, cfg.padded_vocab, e, c, tp, pcfg.sequence_parallel, dropout > 0)
    r, blocks, m = grid.pp_rank, cfg.num_layers // pp, tcfg.micro_batches(dp)
    want = refgpt_bytes(z, blocks, r == 0, r == pp - 1, pcfg.recomputed_blocks(blocks, r),
                        pcfg.recompute_granularity == "selective", min(pp - r, m),
                        pcfg.recompute_chunk())
    mem = t.memory()
    ok = (got == want["total"] == mem["activations_formula"]
          and mem["activations_layer"] == want["layer"] == mem["activations_layer_formula"])
    assert all(comm.allgather(ok)), comm.allgather((grid.pp_rank, grid.tp_rank, mem, want))


def assert_registry_equals_formula(comm, cfg, tcfg, pcfg, grid) -> None:
    """Train one step of the layout; on every rank the registry's activations (peak, and the
    first block's) equal the trainer's formula, which covers the layout (> 0)."""
    t = Trainer(cfg, tcfg, pcfg, grid, log=lambda *_: None)
    t.run()
    mem = t.memory()
    ok = (mem["activations"] == mem["activations_formula"] > 0
          and mem["activations_layer"] == mem["activations_layer_formula"] > 0)
    assert all(comm.allgather(ok)), comm.allgather((grid.pp_rank, grid.tp_rank, mem))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pp, v", [(2, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("recompute", ["", "full", "selective"])
def test_interleaved_registry_equals_the_schedule_replay(pp, v, recompute):
    """Under the interleaved schedule a rank holds v chunks whose micro-batches come and go in
    the schedule's order; the formula replays the rank's compute ops (schedule_bytes)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.size % pp:
        pytest.skip(f"pp {pp} needs a multiple of {pp} ranks")
    cfg = ModelConfig(num_layers=8, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=0.1)
    dp = comm.size // pp
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=8 * dp, train_iters=1, lr=1e-2,
                       dtype="float32", synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp, num_virtual_stages=v,
                          pipeline_schedule="interleaved", recompute_granularity=recompute)
    assert_registry_equals_formula(comm, cfg, tcfg, pcfg, Grid(comm, 1, pp))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("dtype, dropout, recompute", [
    ("float32", 0.1, {}), ("float32", 0.1, dict(recompute_granularity="full")),
    ("float32", 0.1, dict(recompute_granularity="full", recompute_num_layers=2)),
    ("float32", 0.1, dict(recompute_granularity="selective")), ("bfloat16", 0.0, {}),
    ("bfloat16", 0.0, dict(recompute_granularity="selective"))])
def test_zero_bubble_registry_equals_the_schedule_replay(tp, sp, dtype, dropout, recompute):
    """Under zb-h1 a B frees the micro-batch's stash but its deferred weight gradients keep
    each linear layer's input and output gradient until its W (deferred_bytes); a recomputing
    moment holds those of the blocks whose backward has run."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pp = 2
    if comm.size % (tp * pp):
        pytest.skip(f"tp {tp} x pp {pp} needs a multiple of {tp * pp} ranks")
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=dropout)
    dp = comm.size // (tp * pp)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=8 * dp, train_iters=1, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule="zb-h1",
                          tensor_model_parallel_size=tp, sequence_parallel=sp, **recompute)
    assert_registry_equals_formula(comm, cfg, tcfg, pcfg, Grid(comm, tp, pp))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["p2p", "a2a"])
@pytest.mark.parametrize("layout", [dict(), dict(tensor_model_parallel_size=2),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                    dict(pipeline_model_parallel_size=2)])
@pytest.mark.parametrize("dtype, dropout, recompute", [
    ("float32", 0.1, ""), ("float32", 0.1, "full"), ("float32", 0.1, "selective"),
    ("bfloat16", 0.0, "")])
def test_context_parallel_registry_equals_the_formula(kind, layout, dtype, dropout, recompute):
    """Under context parallelism each rank keeps its T / C tokens of every layer, and its
    attention core what the ring or the all-to-all keeps (refgpt.nn.activations.core_bytes)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp = layout.get("tensor_model_parallel_size", 1)
    pp = layout.get("pipeline_model_parallel_size", 1)
    if comm.size % (2 * tp * pp):
        pytest.skip(f"cp 2 x tp {tp} x pp {pp} needs a multiple of {2 * tp * pp} ranks")
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=dropout)
    dp = comm.size // (tp * pp)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4 * dp, train_iters=1, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(context_parallel_size=2, cp_comm_type=kind,
                          recompute_granularity=recompute, **layout)
    assert_registry_equals_formula(comm, cfg, tcfg, pcfg, Grid(comm, tp, pp, cp=2))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("dtype, dropout", [("float32", 0.1), ("bfloat16", 0.0)])
@pytest.mark.parametrize("recompute", ["", "full", "selective"])
def test_summa_registry_equals_the_formula(dtype, dropout, recompute):
    """Under 2-D tensor parallelism (q x q) a rank keeps every array as [B/q, T, C/q], its
    heads and vocabulary a q-th, and each LayerNorm its tokens' mean besides 1/sigma."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.size % 4:
        pytest.skip("a 2 x 2 grid needs a multiple of 4 ranks")
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=dropout)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=2 * comm.size // 4, train_iters=1,
                       lr=1e-2, dtype=dtype, synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(tensor_model_parallel_size=4, tensor_parallel_mode="2d",
                          recompute_granularity=recompute)
    assert_registry_equals_formula(comm, cfg, tcfg, pcfg, Grid(comm, 4, 1))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", [
    dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, sequence_parallel=True),
    dict(pipeline_model_parallel_size=2),
    dict(pipeline_model_parallel_size=2, num_virtual_stages=2, pipeline_schedule="interleaved"),
    dict(pipeline_model_parallel_size=2, pipeline_schedule="zb-h1")])
@pytest.mark.parametrize("recompute", ["", "full", "selective"])
def test_experts_registry_equals_the_formula(layout, recompute):
    """Blocks with experts (every other one, top-2 of 4, no capacity, no expert parallelism)
    keep the N k token-expert pairs of their N tokens whatever the routing, in every layout
    (under sequence parallelism the whole sequence's, as the layer gathers it)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp = layout.get("tensor_model_parallel_size", 1)
    pp = layout.get("pipeline_model_parallel_size", 1)
    if comm.size % (tp * pp):
        pytest.skip(f"tp {tp} x pp {pp} needs a multiple of {tp * pp} ranks")
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=0.1, num_experts=4,
                      moe_router_topk=2, moe_layer_freq=2)
    dp = comm.size // (tp * pp)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=8 * dp, train_iters=1, lr=1e-2,
                       dtype="float32", synthetic_data=True, eval_iters=0)
    pcfg = ParallelConfig(recompute_granularity=recompute, **layout)
    assert_registry_equals_formula(comm, cfg, tcfg, pcfg, Grid(comm, tp, pp))
