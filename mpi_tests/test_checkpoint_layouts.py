"""Distributed checkpoints at 4 ranks: saved in one layout, resumed in another, the run goes
on exactly as the single process's (float64, 1e-12); each rank writes only its own shard
file; a corrupt, truncated or missing shard and a wrong shape in the manifest are the same
one error on every rank."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from refgpt.cli import CheckpointError
from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn.gpt import param_specs
from refgpt.parallel.grid import Grid

QUIET = dict(log=lambda *_: None)

LAYOUTS = {   # name: (tp, pp, ParallelConfig fields); 4 ranks each
    "dp2 x tp2": (2, 1, {}),
    "pp2 x dp2": (1, 2, {}),
    "zero3 dp4": (1, 1, dict(zero_stage=3)),
    "2-D tp 2x2": (4, 1, dict(tensor_parallel_mode="2d")),
    "tp2 sp x pp2": (2, 2, dict(sequence_parallel=True)),
    "zero1 shared dp4": (1, 1, dict(zero_stage=1, dp_shared_memory=True)),
    "zero2 dp2 x tp2": (2, 1, dict(zero_stage=2)),
    "pp4": (1, 4, {}),
}

MOVES = [("dp2 x tp2", "pp2 x dp2"), ("zero3 dp4", "2-D tp 2x2"),
         ("tp2 sp x pp2", "zero1 shared dp4"), ("2-D tp 2x2", "zero2 dp2 x tp2"),
         ("zero2 dp2 x tp2", "pp4"), ("pp4", "zero3 dp4")]


def model_cfg():
    return ModelConfig(num_layers=4, hidden_size=16, num_attention_heads=4, seq_length=8,
                       vocab_size=45, vocab_multiple=16)


def train_cfg(**kw):
    return TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=3, lr=1e-2,
                       min_lr=1e-3, lr_warmup_iters=1, dtype="float64", clip_grad=0.5,
                       weight_decay=0.1, synthetic_data=True, eval_iters=0, log_interval=100,
                       **kw)


def trainer(comm, layout, tcfg):
    tp, pp, fields = LAYOUTS[layout]
    pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          **fields)
    return Trainer(model_cfg(), tcfg, pcfg, Grid(comm, tp, pp), **QUIET)


def agree(comm, ok):
    return all(comm.allgather(bool(ok)))


def close(a, b):
    return np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1e-300)


def world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def straight():
    """The single process's run to iteration 3 (on every rank)."""
    t = Trainer(model_cfg(), train_cfg(), **QUIET)
    t.run()
    return t


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("saved_in, loaded_in", MOVES)
def test_a_checkpoint_resumes_in_another_layout(straight, saved_in, loaded_in):
    comm = world()
    if comm.size != 4:
        pytest.skip("the layouts are of 4 ranks")
    root = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    trainer(comm, saved_in, train_cfg(exit_interval=2, save=f"{root}/ck")).run()
    files = sorted((Path(root) / "ck" / "iter_0000002").glob("shard_*"))
    resumed = trainer(comm, loaded_in, train_cfg(load=f"{root}/ck"))
    resumed.run()
    ref = dict(straight.model.params.items())
    mine = resumed.model.full_tensors(resumed.model.params.full_data())
    ok = (all(close(v, ref[n]) for n, v in mine.items())
          and np.isclose(resumed.history[-1]["loss"], straight.history[-1]["loss"],
                         rtol=1e-12, atol=0) and files)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(root)
    assert agree(comm, ok)


@pytest.fixture(scope="module")
def zero1_checkpoint():
    """A ZeRO-1 checkpoint of 4 ranks (four shard files), made once; a copy per test."""
    comm = world()
    root = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    if comm.size == 4:
        tcfg = train_cfg(exit_interval=2, save=f"{root}/ck")
        Trainer(model_cfg(), tcfg, ParallelConfig(zero_stage=1), Grid(comm), **QUIET).run()
    return root


def damaged(comm, root, harm):
    """A copy of the checkpoint with harm(iteration folder) done to it, by rank 0."""
    copy = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    if comm.rank == 0:
        shutil.copytree(Path(root) / "ck", Path(copy) / "ck")
        harm(Path(copy) / "ck" / "iter_0000002")
    comm.Barrier()
    return f"{copy}/ck"


def flip(folder):
    shard = folder / "shard_00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))


def truncate(folder):
    shard = folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])


def remove(folder):
    (folder / "shard_00002.safetensors").unlink()


def reshape(folder):
    state = json.loads((folder / "state.json").read_text())
    for piece in state["pieces"]:
        if piece["name"] == "h.1.mlp.c_fc.weight":
            piece["shape"] = [16, 48]
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("harm, message", [
    (flip, "shard_00003.safetensors does not match the size and SHA-256"),
    (truncate, "shard_00001.safetensors does not match the size and SHA-256"),
    (remove, "shard_00002.safetensors is missing"),
    (reshape, r"h.1.mlp.c_fc.weight has shape \(16, 48\), the model \(16, 64\)")])
def test_a_damaged_shard_is_one_error_on_every_rank(zero1_checkpoint, harm, message):
    comm = world()
    if comm.size != 4:
        pytest.skip("the checkpoint is of 4 ranks")
    path = damaged(comm, zero1_checkpoint, harm)
    for layout in ("dp2 x tp2", "zero3 dp4"):
        with pytest.raises(CheckpointError, match=message) as err:
            trainer(comm, layout, train_cfg(load=path))
        assert agree(comm, len(set(comm.allgather(str(err.value)))) == 1)
    comm.Barrier()


@pytest.mark.mpi(min_size=4)
def test_each_rank_writes_only_its_own_shard(zero1_checkpoint):
    """ZeRO-1 at 4: four files, whose pieces partition every tensor; no rank's file holds
    a whole tensor unless its shard does."""
    comm = world()
    if comm.size != 4:
        pytest.skip("the checkpoint is of 4 ranks")
    state = json.loads((Path(zero1_checkpoint) / "ck" / "iter_0000002" / "state.json").read_text())
    files = sorted(state["files"])
    sizes = {}
    for piece in state["pieces"]:
        sizes[piece["name"]] = sizes.get(piece["name"], 0) + piece["stop"] - piece["start"]
    whole = {p.name: int(np.prod(p.shape)) for p in param_specs(model_cfg())}
    assert files == [f"shard_{r:05d}.safetensors" for r in range(4)]
    assert sizes == whole

