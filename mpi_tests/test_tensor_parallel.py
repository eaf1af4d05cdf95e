"""Megatron tensor parallelism (with and without sequence parallelism, with data parallelism
and dropout) equals the single process in float64: losses, every gathered gradient, the
parameters after several steps; and its communication volume per layer is 8 N h (t-1)/t."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.grid import Grid
from roundtrip import checkpoint_roundtrip
from refgpt.nn import GPT
from refgpt.parallel.tensor import TensorParallel, shard, shard_kind, unshard
from refgpt.parallel.tensor_comm import TPComm


def model_cfg(dropout=0.0):
    # vocabulary 45 padded to 48: the last shard holds padded rows; 4 heads split 2 or 4 ways
    return ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=4, seq_length=8,
                       vocab_size=45, vocab_multiple=16, dropout=dropout)


def train_cfg(global_batch, micro):
    return TrainConfig(micro_batch_size=micro, global_batch_size=global_batch, train_iters=3,
                       lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       synthetic_data=True, eval_iters=1, eval_interval=2, log_interval=100)


def layouts(world):
    for tp in (2, 4):
        if world % tp == 0:
            for sp in (False, True):
                yield tp, sp


def compare(comm, tp, sp, dropout=0.0, accumulate=1):
    dp = comm.size // tp
    tcfg = train_cfg(global_batch=2 * dp * accumulate, micro=2)
    pcfg = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, ddp_bucket_size=500)
    par = Trainer(model_cfg(dropout), tcfg, pcfg, Grid(comm, tp), log=lambda *_: None)
    ser = Trainer(model_cfg(dropout), tcfg, None, None, log=lambda *_: None)
    hist, ref = par.run(), ser.run()
    full = par.model.full_tensors
    grads, params = full(par.model.params.grad), full(par.model.params.data)
    sp_, sg = ser.model.params, ser.model.params.grads

    def close(a, b):
        return np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1e-300)

    ok = (np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref], rtol=1e-12, atol=0)
          and np.allclose([h["grad_norm"] for h in hist], [h["grad_norm"] for h in ref], rtol=1e-12)
          and np.allclose([h["val_loss"] for h in hist if "val_loss" in h],
                          [h["val_loss"] for h in ref if "val_loss" in h], rtol=1e-12)
          and all(close(grads[n], sg[n]) for n in sg) and all(close(params[n], sp_[n]) for n in sp_)
          and np.all(params["wte.weight"][45:] == 0))
    assert all(comm.allgather(bool(ok))), f"tp {tp} sp {sp} dropout {dropout} differs from one process"


@pytest.mark.mpi(min_size=2)
def test_tensor_parallel_equals_single_process():
    from mpi4py import MPI
    for tp, sp in layouts(MPI.COMM_WORLD.size):
        compare(MPI.COMM_WORLD, tp, sp)


@pytest.mark.mpi(min_size=2)
def test_with_dropout_and_accumulation():
    from mpi4py import MPI
    for tp, sp in layouts(MPI.COMM_WORLD.size):
        compare(MPI.COMM_WORLD, tp, sp, dropout=0.1, accumulate=2)


@pytest.mark.mpi(min_size=2)
def test_volume_per_layer_and_sequence_parallel_grads():
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    for tp_size, sp in layouts(world.size):
        grid = Grid(world, tp_size)
        tp = TPComm(grid.tp_comm)
        cfg = model_cfg()
        model = GPT(cfg, np.float64, 3, parts=TensorParallel(cfg, 3, tp, sp))
        rng = np.random.default_rng(grid.dp_rank)
        B, T = 3, cfg.seq_length
        x, y = rng.integers(0, 45, (B, T)), rng.integers(0, 45, (B, T))
        model.forward(x, y, float(B * T))
        model.backward()
        N, h, t = B * T, cfg.hidden_size, tp_size
        volumes = [tp.layer_volume(f"h.{i}.") for i in range(cfg.num_layers)]
        ok = all(abs(v - 8 * N * h * (t - 1) / t) < 1e-9 for v in volumes)
        ln = model.params.grads["h.0.ln_1.weight"].copy()
        differs = not all(np.array_equal(ln, o) for o in grid.tp_comm.allgather(ln))
        model.complete_grads(["h.0.ln_1.weight"])
        ln = model.params.grads["h.0.ln_1.weight"]
        same = all(np.array_equal(ln, o) for o in grid.tp_comm.allgather(ln))
        ok = ok and (differs == sp) and same
        assert all(world.allgather(bool(ok))), (tp_size, sp, volumes, 8 * N * h * (t - 1) / t)


def test_shard_and_unshard_are_inverse():
    rng = np.random.default_rng(0)
    for name, shape in (("h.0.attn.c_attn.weight", (4, 24)), ("h.0.attn.c_attn.bias", (24,)),
                        ("h.0.mlp.c_fc.weight", (4, 16)), ("h.0.mlp.c_proj.weight", (16, 4)),
                        ("wte.weight", (8, 4)), ("h.0.ln_1.weight", (4,))):
        full = rng.standard_normal(shape)
        kind = shard_kind(name)
        for t in (1, 2, 4):
            assert np.array_equal(unshard([shard(full, kind, r, t) for r in range(t)], kind), full)
    qkv = np.arange(12)                 # q = 0..3, k = 4..7, v = 8..11; rank 1 of 2 takes heads 2-3
    assert list(shard(qkv, "qkv", 1, 2)) == [2, 3, 6, 7, 10, 11]


@pytest.mark.mpi(min_size=2)
def test_checkpoints_move_between_tensor_parallel_and_single_process():
    """A TP run saves full tensors that one process resumes from, and the other way round."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp = 2
    pcfg = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True)
    straight, serial, par = checkpoint_roundtrip(
        comm, model_cfg, train_cfg(global_batch=2 * (comm.size // tp), micro=2),
        lambda tcfg: Trainer(model_cfg(), tcfg, pcfg, Grid(comm, tp), log=lambda *_: None))
    full = par.model.full_tensors(par.model.params.data)
    ref = straight.model.params
    ok = (np.abs(serial.model.params.data - ref.data).max() <= 1e-12 * np.abs(ref.data).max()
          and all(np.abs(full[n] - ref[n]).max() <= 1e-12 * np.abs(ref[n]).max() for n in ref))
    assert all(comm.allgather(bool(ok)))
