"""Distributed checkpoints' pieces (refgpt.checkpoint_shards): every layout's shard_index
names exactly the elements its shard() keeps, and pieces saved in one cut read back in any
other, element for element, with a gap or a wrong shape refused."""

from types import SimpleNamespace

import numpy as np
import pytest

from refgpt.checkpoint import write_tensors
from refgpt.checkpoint_shards import Piece, SavedCheckpoint, expand, runs
from refgpt.cli import CheckpointError
from refgpt.config import ModelConfig
from refgpt.nn.gpt import param_specs
from refgpt.nn.sublayers import Sublayers, grid_shape
from refgpt.parallel.tensor import TensorParallel
from refgpt.parallel.tensor2d import Tensor2D

CFG = ModelConfig(num_layers=1, hidden_size=36, num_attention_heads=6, seq_length=12,
                  vocab_size=40, vocab_multiple=12)


def layouts():
    """(description, object with shard and shard_index) for every rank of each layout."""
    yield "single", Sublayers(CFG, 0)
    for t in (2, 3):
        for r in range(t):
            tp = TensorParallel.__new__(TensorParallel)
            tp.tp = SimpleNamespace(t=t, rank=r)
            yield f"1-D TP {r} of {t}", tp
    for q in (2, 3):
        for i in range(q):
            for j in range(q):
                t2 = Tensor2D.__new__(Tensor2D)
                t2.grid = SimpleNamespace(q=q, i=i, j=j)
                yield f"2-D TP ({i}, {j}) of {q}x{q}", t2


@pytest.mark.parametrize("what, layout", list(layouts()), ids=lambda x: x if isinstance(x, str) else "")
def test_shard_index_names_what_shard_keeps(what, layout):
    rng = np.random.default_rng(0)
    for spec in param_specs(CFG):
        full = rng.standard_normal(spec.shape)
        rows, cols = layout.shard_index(spec.name, spec.shape)
        kept = layout.shard(spec.name, full)
        picked = full.reshape(grid_shape(spec.shape))[np.ix_(rows, cols)]
        assert np.array_equal(picked.reshape(kept.shape), kept), (what, spec.name)


def test_runs_round_trip():
    for idx in ([], [3], [0, 1, 2, 7, 8, 10], list(range(5))):
        assert expand(runs(np.array(idx, np.int64))).tolist() == idx
    assert runs(np.array([0, 1, 2, 7, 8, 10])) == [[0, 3], [7, 9], [10, 11]]


def saved_in(tmp_path, G, cuts):
    """G [R, C] saved as pieces: cuts is a list of (rows, cols, start, stop), each piece in a
    file of its own, as ranks write them; returns the opened checkpoint."""
    entries, records = [], {}
    for k, (rows, cols, start, stop) in enumerate(cuts):
        values = G[np.ix_(rows, cols)].reshape(-1)[start:stop]
        file = f"shard_{k:05d}.safetensors"
        piece = Piece("w", list(G.shape), runs(rows), runs(cols), start, stop, file)
        entries.append(piece.to_json())
        write_tensors({"w": values, "exp_avg.w": 2 * values, "exp_avg_sq.w": 3 * values},
                      tmp_path / file)
    return SavedCheckpoint(tmp_path, {"pieces": entries, "files": records})


def test_pieces_read_back_in_any_other_cut(tmp_path):
    R, C = 6, 12
    G = np.arange(R * C, dtype=np.float64).reshape(R, C) + 0.5
    rows, cols = np.arange(R), np.arange(C)
    qkv = [cols.reshape(3, 4)[:, :2].reshape(-1), cols.reshape(3, 4)[:, 2:].reshape(-1)]
    # saved: q, k, v column halves (TP 2), each cut by ZeRO into two ranges mid-row
    saved = saved_in(tmp_path, G, [(rows, qkv[0], 0, 17), (rows, qkv[0], 17, 36),
                                   (rows, qkv[1], 0, 5), (rows, qkv[1], 5, 36)])
    rng = np.random.default_rng(1)
    needs = [(rows, cols), (rows[:3], cols), (rows[3:], cols[6:]),
             (np.array([1, 4]), np.array([0, 5, 6, 11])), (rows[2:4], qkv[1])]
    for r, c in needs:
        grid = G[np.ix_(r, c)].reshape(-1)
        for _ in range(4):
            a = int(rng.integers(0, grid.size))
            b = int(rng.integers(a + 1, grid.size + 1))
            need = Piece("w", [R, C], runs(r), runs(c), a, b)
            assert np.array_equal(saved.read(need), grid[a:b])
            assert np.array_equal(saved.read(need, "exp_avg_sq"), 3 * grid[a:b])
    assert np.array_equal(saved.full("w"), G)


def test_a_gap_and_a_wrong_shape_are_refused(tmp_path):
    G = np.ones((4, 4))
    rows, cols = np.arange(4), np.arange(4)
    saved = saved_in(tmp_path, G, [(rows, cols, 0, 7), (rows, cols, 8, 16)])   # element 7 lost
    with pytest.raises(CheckpointError, match="do not cover"):
        saved.full("w")
    assert saved.read(Piece("w", [4, 4], runs(rows), runs(cols), 8, 16)).sum() == 8
    with pytest.raises(CheckpointError, match=r"w has shape \(4, 4\), the model \(4, 5\)"):
        saved.read(Piece.whole("w", [4, 5]))
    with pytest.raises(CheckpointError, match="lacks exp_avg.v"):
        saved.read(Piece.whole("v", [4, 4]), "exp_avg")


def test_consolidated_equals_the_shards_and_resumes_the_same(tmp_path):
    from refgpt import train
    from refgpt.checkpoint import consolidate, load_checkpoint
    from test_checkpoint import TINY
    assert train.main([*TINY, "--train-iters", "2", "--save", str(tmp_path / "ck")]) == 0
    out = consolidate(tmp_path / "ck", tmp_path / "whole")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors",
                                                      "optimizer.safetensors", "state.json"]
    shards, whole = load_checkpoint(tmp_path / "ck"), load_checkpoint(tmp_path / "whole")
    for a, b in ((shards.params, whole.params), (shards.optimizer, whole.optimizer)):
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert whole.state["iteration"] == 2 and whole.state["optimizer_step"] == 2
