"""1-bit Adam (refgpt.optim.onebit) on one worker against DeepSpeed's update rule written out
element by element for a scripted sequence of gradients (warm-up: Adam without bias
correction, the decay in the update; afterwards the variance frozen); the trainer hands it the
decayed ranges and no compression; the settings it refuses. The compressed all-reduce and
data parallelism: mpi_tests/test_onebit.py."""

import math

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.optim import OnebitAdam


def deepspeed_rule(w, grads, decayed, warmup, lr, b1, b2, eps, wd):
    """DeepSpeed's OnebitAdam.step on one worker (no compression: its all-reduce is the
    identity), one element at a time."""
    w = list(w)
    m, v = [0.0] * len(w), [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        for j in range(len(w)):
            m[j] = b1 * m[j] + (1 - b1) * g[j]
            if t <= warmup:                                    # then v is frozen
                v[j] = b2 * v[j] + (1 - b2) * g[j] ** 2
            update = m[j] / (math.sqrt(v[j]) + eps)
            if decayed[j]:
                update += wd * w[j]
            w[j] -= lr * update
    return w, m, v


def test_one_worker_equals_deepspeeds_rule_on_scripted_gradients():
    rng = np.random.default_rng(0)
    n, warmup = 9, 3
    decayed = [j < 4 or j == 7 for j in range(n)]
    w0 = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(7)]
    p, g = w0.copy(), np.zeros(n)
    opt = OnebitAdam(p, g, [(0, 4), (7, 8)], warmup, betas=(0.9, 0.95), eps=1e-8,
                     weight_decay=0.1)
    for step in grads:
        assert opt.compressing == (opt.t >= warmup)
        g[...] = step
        opt.step(1e-2)
    want, m, v = deepspeed_rule(w0, grads, decayed, warmup, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    for got, ref in ((p, want), (opt.m, m), (opt.v, v)):
        assert np.abs(got - np.array(ref)).max() <= 1e-15 * np.abs(ref).max() * 10


def test_the_trainer_gives_one_worker_no_compression():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64)
    tcfg = TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=4, lr=1e-2,
                       optimizer="onebit-adam", onebit_warmup_iters=2, synthetic_data=True,
                       eval_iters=0, dtype="float64")
    t = Trainer(cfg, tcfg, log=lambda *_: None)
    p = t.model.params
    assert isinstance(t.opt, OnebitAdam) and t.opt.allreduce is None and t.opt.workers == 1
    assert t.opt.decay == sorted(p.slices[n] for n, spec in p.specs.items() if spec.decay)
    t.train_step()
    t.train_step()
    v = t.opt.v.copy()
    t.train_step()
    t.train_step()
    assert np.array_equal(t.opt.v, v) and t.opt.t == 4      # frozen after the warm-up
    assert t.memory()["optimizer"] == t.opt.m.nbytes + t.opt.v.nbytes


@pytest.mark.parametrize("train, parallel, match", [
    (dict(optimizer="onebit-adam", onebit_warmup_iters=0), {}, "--onebit-warmup-iters must"),
    (dict(optimizer="onebit-adam", dtype="bfloat16"), {}, "--optimizer onebit-adam compresses"),
    (dict(optimizer="onebit-adam"), dict(zero_stage=1), "--optimizer onebit-adam compresses"),
    (dict(optimizer="onebit-adam", backend="cupy"), {}, "--optimizer onebit-adam compresses"),
])
def test_what_onebit_adam_refuses(train, parallel, match):
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                      vocab_size=50)
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=2, synthetic_data=True, **train)
    with pytest.raises(ConfigError, match=match):
        Trainer(cfg, tcfg, ParallelConfig(**parallel), log=lambda *_: None)
