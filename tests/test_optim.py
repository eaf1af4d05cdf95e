"""AdamW, clipping and the LR schedule against PyTorch, in float64."""

import math

import numpy as np
import pytest
import torch

from refgpt.optim import AdamW, clip_grad_, grad_norm, learning_rate


def test_adamw_matches_torch_with_decay_groups():
    rng = np.random.default_rng(0)
    n = 50
    p0 = rng.standard_normal(n)
    decayed = [(0, 30)]                                      # first 30: "2-D weights"
    p = p0.copy()
    g = np.zeros(n)
    opt = AdamW(p, g, decayed, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tw = torch.tensor(p0[:30].copy(), requires_grad=True)
    tb = torch.tensor(p0[30:].copy(), requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1},
                              {"params": [tb], "weight_decay": 0.0}],
                             lr=1.0, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(6):
        lr = 1e-2 * (step + 1)
        grad = rng.standard_normal(n)
        g[...] = grad
        opt.step(lr)
        for group in topt.param_groups:
            group["lr"] = lr
        tw.grad = torch.tensor(grad[:30].copy())
        tb.grad = torch.tensor(grad[30:].copy())
        topt.step()
        ref = np.concatenate([tw.detach().numpy(), tb.detach().numpy()])
        np.testing.assert_allclose(p, ref, rtol=1e-14, atol=1e-15)


def test_adamw_on_a_slice_or_in_chunks_equals_whole_buffer():
    rng = np.random.default_rng(1)
    p, g = rng.standard_normal(40), rng.standard_normal(40)
    whole = AdamW(p.copy(), g, [(5, 30)], weight_decay=0.1)
    halves = [AdamW(p[i:i + 20].copy(), g[i:i + 20], [(5 - i, 30 - i)], weight_decay=0.1)
              for i in (0, 20)]
    chunked = AdamW(p.copy(), g, [(5, 30)], weight_decay=0.1, chunk=7)
    for _ in range(3):
        whole.step(1e-2)
        chunked.step(1e-2)
        for h in halves:
            h.step(1e-2)
    np.testing.assert_array_equal(whole.p, np.concatenate([h.p for h in halves]))
    np.testing.assert_array_equal(whole.p, chunked.p)
    np.testing.assert_array_equal(whole.v, chunked.v)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_matches_torch(max_norm):
    rng = np.random.default_rng(2)
    g = rng.standard_normal(100)
    t = torch.tensor(g.copy(), requires_grad=True)
    t.grad = torch.tensor(g.copy())
    tn = torch.nn.utils.clip_grad_norm_([t], max_norm)
    norm = grad_norm(g)
    clip_grad_(g, max_norm, norm)
    assert abs(norm - float(tn)) < 1e-12
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-15)


def test_lr_schedule_is_megatrons_step_for_step():
    """Megatron-LM's OptimizerParamScheduler: with warm-up 3 and peak 3e-3 the first three
    iterations run at 0, 1e-3 and 2e-3 (the peak at iteration 3); then the decay over
    iterations (W, D], min_lr after D."""
    warm = [learning_rate(i, lr=3e-3, min_lr=0.0, warmup=3, decay_iters=10, style="cosine")
            for i in range(4)]
    assert warm == pytest.approx([0.0, 1e-3, 2e-3, 3e-3], abs=1e-18)
    assert learning_rate(1, lr=3e-3, min_lr=0.0, warmup=3, decay_iters=10, style="cosine",
                         init=3e-4) == pytest.approx(3e-4 + 2.7e-3 / 3)
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, decay_iters=110)
    assert learning_rate(0, style="cosine", **kw) == 0.0
    assert learning_rate(9, style="cosine", **kw) == pytest.approx(0.9)
    assert learning_rate(10, style="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(60, style="cosine", **kw) == pytest.approx(0.55)
    assert learning_rate(60, style="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(35, style="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert learning_rate(35, style="cosine", **kw) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert learning_rate(110, style="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(500, style="cosine", **kw) == 0.1
    assert learning_rate(500, style="constant", **kw) == 1.0
    assert learning_rate(0, lr=1.0, min_lr=0.1, warmup=0, decay_iters=10,
                         style="cosine") == 1.0                   # no warm-up: the peak first
    assert learning_rate(15, lr=1.0, min_lr=0.1, warmup=20, decay_iters=10,
                         style="cosine") == 0.75                  # W >= D: warm-up to the end
