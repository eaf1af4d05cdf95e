"""Activation recomputation changes no bit: training with it (full, and selective: the
attention core) equals training without, parameters and losses bit for bit, in float64,
float32 and both 16-bit types, with dropout and gradient accumulation; a recomputed block
keeps only its input between forward and backward, a selective one q, k, v and the key."""

from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn.recompute import Recomputed

QUIET = dict(log=lambda *_: None)


def run(dtype, backend, **recompute):
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=0.1)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=1, backend=backend)
    t = Trainer(cfg, tcfg, ParallelConfig(**recompute), **QUIET)
    hist = t.run()
    return t, [h["loss"] for h in hist] + [hist[-1]["val_loss"]]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("granularity, method, layers", [("full", "uniform", 1),
                                                         ("full", "uniform", 2),
                                                         ("full", "block", 2),
                                                         ("selective", "uniform", 1)])
def test_recomputation_changes_no_bit(dtype, backend, granularity, method, layers):
    ref, ref_losses = run(dtype, backend)
    t, losses = run(dtype, backend, recompute_granularity=granularity,
                    recompute_method=method, recompute_num_layers=layers)
    recomputed = [isinstance(b, Recomputed) for b in t.model.blocks]
    assert recomputed == {"uniform": [True] * 3, "block": [True, True, False]}[method] \
        if granularity == "full" else recomputed == [False] * 3
    assert all(b.attn.recompute_core == (granularity == "selective") for b in t.model.blocks
               if not isinstance(b, Recomputed))
    assert losses == ref_losses
    assert np.array_equal(t.opt.p, ref.opt.p) and np.array_equal(t.opt.m, ref.opt.m)


def forwarded(granularity: str, **options):
    """A trained model with recomputation after one more forward with dropout on."""
    model = run("float64", "numpy", recompute_granularity=granularity, **options)[0].model
    x = np.random.default_rng(0).integers(0, 64, (2, 16))
    model.forward(x, x, 32.0, key=(7, np.arange(2)))
    return model


@pytest.mark.parametrize("chunk, keeping", [(1, [True, True, True]), (2, [True, False, True])])
def test_a_recomputed_chunk_keeps_only_its_input(chunk, keeping):
    """Chunks of `chunk` blocks (3 blocks: [0, 1], [2] in twos): the first block of each keeps
    the chunk's input, and no block's layers keep anything."""
    model = forwarded("full", recompute_num_layers=chunk)
    assert [b.first for b in model.blocks] == keeping
    for block in model.blocks:
        if block.first:
            assert [a.shape for a in block.checkpoint.stash[0][:1]] == [(2, 16, 32)]
        assert all(not layer.stash for layer in block.block.layers)
    model.backward()
    assert all(not la.stash for b in model.blocks for la in b.layers)


def test_selective_recomputation_keeps_q_k_v_not_the_probabilities():
    model = forwarded("selective")
    for block in model.blocks:
        q, k, v, (p0, key), drop, recomputed = block.attn.stash[0]
        assert recomputed and drop and key[0] == 7 and not block.attn.attn_drop.stash
    model.backward()
    assert all(not b.attn.stash and not b.attn.attn_drop.stash for b in model.blocks)


def test_recompute_settings_are_checked():
    from refgpt.config import ConfigError
    for bad in (dict(recompute_granularity="partial"), dict(recompute_method="all"),
                dict(recompute_granularity="full", recompute_num_layers=0),
                dict(recompute_method="block", recompute_num_layers=-1)):
        with pytest.raises(ConfigError):
            replace(ParallelConfig(), **bad).validate()
