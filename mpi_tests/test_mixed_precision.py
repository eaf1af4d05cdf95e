"""Mixed precision in every layout: each one in bfloat16 and in float16 against the single
process in the same precision, the overflow skip agreed by all ranks, and the bytes of
--grad-reduce-in-bf16.

What 16 bits can promise. In float64 two layouts differ by the order of their floating-point
sums, about 1e-15 relative, and the tests hold them to 1e-12. A 16-bit run computes every op
in fp32 and rounds its output once to 16 bits (refgpt.precision); a layout sums the same
fp32 terms in another order (tensor parallelism's partial products, SUMMA's panels, the
data-parallel ranks' gradients), so its fp32 results differ from one process's by a few fp32
ulps (2^-24 relative). That changes a 16-bit output only where the fp32 value lies that close
to a rounding boundary, and there by one 16-bit ulp (EPS: 2^-8 relative for bfloat16, 2^-11
for float16), in roughly one element in EPS / 2^-24 = 2^16 (bfloat16) or 2^13 (float16). So:

  step 1      the same 16-bit weights see the same tokens: the loss is the fp32 sum of
              token losses of identical or one-ulp-apart logits, equal to EPS / 64;
  steps 1-4   from step 2 the fp32 master weights differ by AdamW's steps on the slightly
              different gradients, and the runs drift apart as two 16-bit runs do: losses
              (and the validation loss) within EPS / 4, gradient norms within EPS;
  gradients   where no layout splits a micro-batch (data parallelism, ZeRO, shared memory),
              each micro-batch's gradient is computed bit for bit as in one process and the
              fp32 buffers differ only in the order of the micro-batches' sum: step 1's
              gradients agree elementwise to 2^-20 of their largest.

A layout that rounds where one process does not (a partial sum rounded to 16 bits before
the reduction, say) moves every element, not one in 2^13: measured before tensor
parallelism kept its partial input gradients in fp32, step 1's gradient norm differed by
1.1e-4 in bfloat16 against 3e-10 after, and the losses by 1.2e-4 by step 6.
"""

from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from refgpt.parallel.zero import formula_traffic

EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
QUIET = dict(log=lambda *_: None)


def model_cfg():
    return ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=64, vocab_multiple=16)


def train_cfg(dtype, iters=4):
    return TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=iters, lr=1e-2,
                       min_lr=1e-3, lr_warmup_iters=1, dtype=dtype, initial_loss_scale=2.0 ** 10,
                       synthetic_data=True, eval_iters=1, eval_interval=iters, log_interval=100,
                       backend="numpy")


def layouts(world):
    """(name, parallel config, splits a micro-batch) for the layouts this world size has."""
    yield "dp", ParallelConfig(), False
    for stage in (1, 2, 3):
        yield f"zero-{stage}", ParallelConfig(zero_stage=stage), False
    yield "zero-1 shared", ParallelConfig(zero_stage=1, dp_shared_memory=True), False
    if world % 2 == 0:
        yield "tp2", ParallelConfig(tensor_model_parallel_size=2), True
        yield "tp2 sp", ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), True
        for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
            yield f"pp2 {schedule}", ParallelConfig(pipeline_model_parallel_size=2,
                                                    pipeline_schedule=schedule,
                                                    num_virtual_stages=v), False
    if world % 4 == 0:
        yield "2-D tp4", ParallelConfig(tensor_model_parallel_size=4, tensor_parallel_mode="2d"), True
        yield "tp2 pp2 sp", ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                           pipeline_model_parallel_size=2), True


def trained(tcfg, pcfg=None, grid=None):
    t = Trainer(model_cfg(), tcfg, pcfg or ParallelConfig(), grid, **QUIET)
    hist = t.run()
    return t, hist


def agree(comm, ok) -> bool:
    return all(comm.allgather(bool(ok)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a / b - 1).max())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_layout_equals_one_process_to_16_bit_precision(dtype):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    eps, tcfg = EPS[dtype], train_cfg(dtype)
    _, ref = trained(tcfg)
    failures = []
    for name, pcfg, _ in layouts(comm.size):
        t, hist = trained(tcfg, pcfg, Grid(comm, pcfg.tensor_model_parallel_size,
                                           pcfg.pipeline_model_parallel_size))
        t.close()
        loss, val = rel([h["loss"] for h in hist], [h["loss"] for h in ref]), \
            rel(hist[-1]["val_loss"], ref[-1]["val_loss"])
        first = rel(hist[0]["loss"], ref[0]["loss"])
        norms = rel([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref])
        if not (first <= eps / 64 and loss <= eps / 4 and val <= eps / 4 and norms <= eps):
            failures.append((name, first, loss, val, norms))
    assert agree(comm, not failures), failures


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_data_parallel_gradients_are_the_same_fp32_sums(dtype):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = replace(train_cfg(dtype, iters=1), eval_iters=0, clip_grad=0.0)
    ref, _ = trained(tcfg)
    expect = ref.opt.g.copy()
    failures = []
    for name, pcfg, splits in layouts(comm.size):
        if splits or pcfg.pipeline_model_parallel_size > 1:
            continue
        t, _ = trained(tcfg, pcfg, Grid(comm))
        got = t.model.params.gather_shards(t.opt.g)
        t.close()
        if np.abs(got - expect).max() > 2.0 ** -20 * np.abs(expect).max():
            failures.append((name, float(np.abs(got - expect).max())))
    assert agree(comm, not failures), failures


@pytest.mark.mpi(min_size=2)
def test_an_overflow_on_one_rank_skips_the_step_everywhere():
    """An inf in one pipeline stage's gradients only: every rank skips step 1 and halves the
    scale (hysteresis 1), no parameter moves, and the ranks go on in step."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = replace(train_cfg("float16", iters=3), hysteresis=1, eval_iters=0)
    pcfg = ParallelConfig(pipeline_model_parallel_size=2)
    t = Trainer(model_cfg(), tcfg, pcfg, Grid(comm, 1, 2), **QUIET)
    before = t.opt.p.copy()
    complete = t.model.complete_grads

    p = t.model.params
    counted = next(n for n in p.specs if t.model.counted(n))      # (not the tied wte copy)

    def poisoned(names):                             # step 1, the last stage only: one inf
        complete(names)
        if t.iteration == 0 and comm.rank == comm.size - 1:
            p.grad[p.slices[counted][0]] = np.inf
    t.model.complete_grads = poisoned
    first = t.train_step()
    skipped_first = first["skipped"] == 1 and np.array_equal(t.opt.p, before)
    scale_after = first["loss_scale"]
    hist = t.run()
    mine = [(h["skipped"], h["loss_scale"]) for h in hist]
    ok = (skipped_first and scale_after == 2.0 ** 9 and all(s == 0 for s, _ in mine)
          and comm.allgather(mine) == [mine] * comm.size)
    assert agree(comm, ok), (skipped_first, scale_after, mine)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradient_reduction_moves_half_the_bytes(stage):
    """--grad-reduce-in-bf16: the gradients' collectives move 2 bytes an element, as the
    formulas say (the parameters' all-gathers move 2 bytes either way), and the run stays
    within bfloat16's precision of the fp32-gradient one."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d, m = comm.size, 2
    tcfg = replace(train_cfg("bfloat16", iters=2), global_batch_size=2 * m * comm.size,
                   eval_iters=0)
    runs = {}
    for grads in (False, True):
        t, hist = trained(tcfg, ParallelConfig(zero_stage=stage, grad_reduce_in_bf16=grads),
                          Grid(comm))
        p = t.model.params
        runs[grads] = (hist, formula_traffic(stage, p.padded, d, m, 2, 2 if grads else 4))
        t.close()
    ok = all(h["dp_comm_bytes"] == pytest.approx(expect, rel=1e-12)
             for hist, expect in runs.values() for h in hist)
    ok = ok and rel([h["loss"] for h in runs[True][0]], [h["loss"] for h in runs[False][0]]) <= EPS["bfloat16"]
    assert agree(comm, ok), {k: ([h["dp_comm_bytes"] for h in v[0]], v[1]) for k, v in runs.items()}
