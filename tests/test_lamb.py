"""LAMB (refgpt.optim.lamb) against its formula written out element by element for a
scripted sequence of gradients (with a zero tensor, whose trust ratio is 1); the trainer
hands it every tensor; the settings it refuses. mpi_tests/test_lamb.py: data and pipeline
parallelism with LAMB equal one process."""

import math
from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.optim import Lamb


def reference(w, grads, decayed, lr, b1, b2, eps, wd):
    """LAMB on a list of tensors (lists of floats), one element at a time."""
    w = [list(t) for t in w]
    m = [[0.0] * len(t) for t in w]
    v = [[0.0] * len(t) for t in w]
    for t, g in enumerate(grads, start=1):
        for i, tensor in enumerate(w):
            u = []
            for j in range(len(tensor)):
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[i][j]
                v[i][j] = b2 * v[i][j] + (1 - b2) * g[i][j] ** 2
                step = (m[i][j] / (1 - b1 ** t)) / (math.sqrt(v[i][j]) / math.sqrt(1 - b2 ** t)
                                                   + eps)
                u.append(step + (wd * tensor[j] if decayed[i] else 0.0))
            wn = math.sqrt(sum(x * x for x in tensor))
            un = math.sqrt(sum(x * x for x in u))
            ratio = wn / un if wn > 0 and un > 0 else 1.0
            w[i] = [x - lr * ratio * d for x, d in zip(tensor, u)]
    return w


def test_lamb_equals_its_formula_on_scripted_gradients():
    rng = np.random.default_rng(0)
    sizes, decayed = (6, 4, 3), (True, False, True)
    w0 = [list(rng.standard_normal(n)) for n in sizes]
    w0[1] = [0.0] * 4                                        # a zero tensor: ratio 1
    grads = [[list(rng.standard_normal(n)) for n in sizes] for _ in range(4)]
    bounds = np.cumsum((0,) + sizes)
    tensors = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    p = np.concatenate([np.array(t) for t in w0])
    g = np.zeros_like(p)
    opt = Lamb(p, g, [r for r, d in zip(tensors, decayed) if d], tensors=[[t] for t in tensors],
               betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in grads:
        g[...] = np.concatenate([np.array(t) for t in step])
        opt.step(1e-2)
    want = np.concatenate([np.array(t) for t in reference(w0, grads, decayed, 1e-2, 0.9, 0.95,
                                                         1e-8, 0.1)])
    assert np.abs(p - want).max() <= 1e-15 * np.abs(want).max() * 10


def lamb_trainer(dtype: str) -> Trainer:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64)
    tcfg = TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=2, lr=1e-2,
                       optimizer="lamb", synthetic_data=True, eval_iters=0, dtype=dtype)
    return Trainer(cfg, tcfg, log=lambda *_: None)


def test_the_trainer_gives_lamb_every_tensor_and_the_decayed_ones():
    t = lamb_trainer("float64")
    p = t.model.params
    assert isinstance(t.opt, Lamb) and t.opt.norms is None     # whole tensors: no sums
    assert t.opt.tensors == [[r] for r in sorted(p.slices.values())]
    assert t.opt.decay == sorted(p.slices[n] for n, spec in p.specs.items() if spec.decay)
    before = p.data.copy()
    t.run()
    assert all(np.any(p.data[a:b] != before[a:b]) for (a, b), in t.opt.tensors)


def test_lamb_in_16_bits_steps_fp32_master_weights():
    from refgpt.optim import MasterLamb
    t = lamb_trainer("bfloat16")
    assert isinstance(t.opt, MasterLamb) and t.opt.p.dtype == np.float32
    before = t.opt.p.copy()
    t.run()
    assert np.any(t.opt.p != before)
    assert np.array_equal(t.model.params.data, t.opt.p.astype(t.model.params.dtype))


@pytest.mark.parametrize("train, match", [
    (dict(optimizer="sgd"), "--optimizer must be one of adam, onebit-adam, lamb"),
    (dict(optimizer="lamb", num_experts=2), "--optimizer lamb sums its per-tensor norms"),
])
def test_what_lamb_refuses(train, match):
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                      vocab_size=50)
    model = {k: train.pop(k) for k in list(train) if k == "num_experts"}
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=2, synthetic_data=True, **train)
    with pytest.raises(ConfigError, match=match):
        Trainer(replace(cfg, **model), tcfg, log=lambda *_: None)
