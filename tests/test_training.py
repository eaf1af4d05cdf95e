"""Training behaviour: overfitting, accumulation, initialisation, exact resume."""

import numpy as np
import pytest

from refgpt.config import ModelConfig, TrainConfig
from refgpt.nn import GPT
from refgpt.nn.params import ParamSpec, init_value
from refgpt.optim import AdamW
from refgpt.engine import Trainer


def tiny_model(**kw):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                vocab_size=37, vocab_multiple=16)
    base.update(kw)
    return ModelConfig(**base)


def tiny_train(**kw):
    base = dict(micro_batch_size=2, global_batch_size=4, train_iters=10, lr=1e-2, min_lr=1e-3,
                lr_warmup_iters=2, dtype="float64", synthetic_data=True, eval_iters=1,
                eval_interval=5, log_interval=100)
    base.update(kw)
    return TrainConfig(**base)


def test_overfits_one_batch():
    cfg = tiny_model(num_layers=1)
    model = GPT(cfg, np.float64, seed=0)
    p = model.params
    opt = AdamW(p.data, p.grad, p.decay_ranges(), betas=(0.9, 0.99))
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (2, 8))
    y = rng.integers(0, cfg.vocab_size, (2, 8))
    first = model.forward(x, y, 16.0)
    model.backward()
    for _ in range(300):
        p.zero_grad()
        loss = model.forward(x, y, 16.0)
        model.backward()
        opt.step(1e-2)
    assert first > 3.0 and loss < 0.05, (first, loss)


def test_accumulation_equals_one_big_batch():
    """global batch 4 as 4 micro-batches of 1, 2 of 2, or 1 of 4: same numbers (float64)."""
    results = [Trainer(tiny_model(), tiny_train(micro_batch_size=m, train_iters=3),
                       log=lambda *_: None) for m in (1, 2, 4)]
    for t in results:
        t.run()
    ref = results[-1]
    for t in results[:-1]:
        np.testing.assert_allclose(t.model.params.data, ref.model.params.data, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose([h["loss"] for h in t.history], [h["loss"] for h in ref.history],
                                   rtol=1e-12)


def test_initialisation_is_keyed_by_name_not_order_or_dtype():
    spec = ParamSpec("h.3.mlp.c_fc.weight", (4, 5), "normal", 0.02)
    a = init_value(spec, seed=7)
    assert np.array_equal(a, init_value(spec, seed=7))
    assert not np.array_equal(a, init_value(spec, seed=8))
    cfg = tiny_model()
    m64, m32 = GPT(cfg, np.float64, seed=3), GPT(cfg, np.float32, seed=3)
    for name in m64.params:
        np.testing.assert_array_equal(m64.params[name].astype(np.float32), m32.params[name])
        np.testing.assert_array_equal(m64.params[name], init_value(m64.params.specs[name], 3))
    wte = m64.params["wte.weight"]
    assert np.all(wte[cfg.vocab_size:] == 0) and wte.shape[0] == 48
    assert m64.params["h.1.attn.c_proj.weight"].std() < m64.params["h.1.attn.c_attn.weight"].std()


def test_params_are_views_of_flat_buffers():
    p = GPT(tiny_model(), np.float64).params
    p.data[...] = 1.5
    p.grad[...] = 2.5
    assert all(np.all(v == 1.5) for _, v in p.items())
    assert all(np.all(g == 2.5) for g in p.grads.values())


def test_padded_rows_stay_zero_through_training():
    t = Trainer(tiny_model(), tiny_train(weight_decay=0.1), log=lambda *_: None)
    t.run()
    assert np.all(t.model.params["wte.weight"][37:] == 0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_exact(tmp_path, dropout):
    mcfg = tiny_model(dropout=dropout)
    straight = Trainer(mcfg, tiny_train(), log=lambda *_: None)
    straight.run()
    first = Trainer(tiny_model(dropout=dropout), tiny_train(exit_interval=5, save=str(tmp_path)),
                    log=lambda *_: None)
    first.run()
    assert first.iteration == 5
    second = Trainer(tiny_model(), tiny_train(load=str(tmp_path)), log=lambda *_: None)
    assert second.mcfg.dropout == dropout                         # shape from the checkpoint
    second.run()
    np.testing.assert_array_equal(second.model.params.data, straight.model.params.data)
    np.testing.assert_array_equal(second.opt.m, straight.opt.m)
    assert [h["loss"] for h in first.history + second.history] == \
           [h["loss"] for h in straight.history]

