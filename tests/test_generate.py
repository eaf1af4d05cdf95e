"""KV-cache inference equals rerunning the full forward."""

import numpy as np

from refgpt.generate import generate, pick
from refgpt.nn import GPT


def trained_looking_model(cfg):
    model = GPT(cfg, np.float64, seed=2)
    rng = np.random.default_rng(0)
    model.params.data[...] += 0.2 * rng.standard_normal(model.params.numel)
    model.params["wte.weight"][cfg.vocab_size:] = 0
    return model


def test_cached_logits_equal_full_forward(tiny_cfg, rng):
    model = trained_looking_model(tiny_cfg)
    idx = rng.integers(0, tiny_cfg.vocab_size, (2, 9))
    full = model.logits(idx)
    cache = model.new_cache()
    parts = [model.logits(idx[:, :4], cache)] + [model.logits(idx[:, t:t + 1], cache)
                                                 for t in range(4, 9)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)
    assert all(not layer.stash for layer in model.layers)        # inference saves nothing


def test_greedy_generation_with_and_without_cache(tiny_cfg):
    model = trained_looking_model(tiny_cfg)
    prompt = [3, 1, 4]
    with_cache = generate(model, prompt, 20, temperature=0)
    without = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert with_cache == without
    assert len(with_cache) == tiny_cfg.n_positions - len(prompt)    # stops at the table's end


def test_sampling_is_seeded_and_top_k_respected():
    logits = np.array([0.0, 5.0, 4.0, -1.0, 3.0])
    rng = np.random.default_rng(0)
    draws = {pick(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 2}
    a = [pick(logits, 1.0, 0, np.random.default_rng(5)) for _ in range(3)]
    b = [pick(logits, 1.0, 0, np.random.default_rng(5)) for _ in range(3)]
    assert a == b
    assert pick(logits, 0, 0, rng) == 1
