"""Context parallelism's pieces on one process (refgpt.parallel.context): which positions a
rank holds and that the causal work is balanced; the ring's blocks, merged by log-sum-exp,
equal attention on the whole sequence, forward and backward, for every rank of C = 1..4
(the ring emulated: rank r meets the keys of every rank in turn), and their gradients
agree with float64 central differences; the layouts it refuses."""

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.nn.attention import (attention_backward, attention_block_backward,
                                 attention_block_forward, attention_forward)
from refgpt.parallel.build import check_layout
from refgpt.parallel.context import merge, positions


@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_positions_cover_the_sequence_and_balance_the_causal_work(C):
    T = 8 * C
    held = [positions(T, C, r) for r in range(C)]
    assert sorted(np.concatenate(held).tolist()) == list(range(T))
    work = [int((p[:, None] + 1).sum()) for p in held]        # keys each query sees
    assert len(set(work)) == 1                                # the same on every rank


def ring(q, k, v, do, C):
    """Outputs and gradients of causal attention computed as C ranks of the ring would."""
    n = q.shape[2] // (2 * C)
    chunk = lambda x, c: x[:, :, c * n:(c + 1) * n]             # noqa: E731
    out, lse = np.zeros_like(q), np.full(q.shape[:3], -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    pairs = [(qc, kc) for r in range(C) for src in range(C)
             for qc in (r, 2 * C - 1 - r) for kc in (src, 2 * C - 1 - src) if kc <= qc]
    for qc, kc in pairs:
        o_b, lse_b = attention_block_forward(chunk(q, qc), chunk(k, kc), chunk(v, kc), kc == qc)
        merge(chunk(out, qc), chunk(lse, qc), o_b, lse_b)
    delta = (do * out).sum(axis=-1)
    for qc, kc in pairs:
        attention_block_backward(chunk(q, qc), chunk(k, kc), chunk(v, kc), chunk(do, qc),
                                 chunk(lse, qc), chunk(delta, qc), kc == qc, None,
                                 chunk(dq, qc), chunk(dk, kc), chunk(dv, kc))
    return out, dq, dk, dv


@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_ring_blocks_equal_attention_on_the_whole_sequence(C):
    rng = np.random.default_rng(C)
    q, k, v, do = (rng.standard_normal((2, 3, 4 * C, 8)) for _ in range(4))
    out, dq, dk, dv = ring(q, k, v, do, C)
    want, saved = attention_forward(q, k, v, 0)
    grads = [np.empty_like(x) for x in (q, k, v)]
    attention_backward(q, k, v, saved, do, *grads)
    for got, ref in zip((out, dq, dk, dv), (want, *grads)):
        assert np.abs(got - ref).max() <= 1e-13 * np.abs(ref).max()


def test_ring_gradients_agree_with_central_differences():
    rng = np.random.default_rng(0)
    C, h = 2, 1e-6
    q, k, v, w = (rng.standard_normal((1, 2, 8, 4)) for _ in range(4))
    loss = lambda q, k, v: float((ring(q, k, v, w, C)[0] * w).sum())   # noqa: E731
    _, dq, dk, dv = ring(q, k, v, w, C)
    for x, g in ((q, dq), (k, dk), (v, dv)):
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            keep = x[i]
            x[i] = keep + h
            up = loss(q, k, v)
            x[i] = keep - h
            num[i] = (up - loss(q, k, v)) / (2 * h)
            x[i] = keep
        assert np.abs(num - g).max() <= 1e-8 * max(1.0, np.abs(g).max())


@pytest.mark.parametrize("model, parallel, tp, match", [
    (dict(seq_length=12), dict(context_parallel_size=4), 1, "--seq-length 12 is not divisible"),
    (dict(seq_length=8), dict(context_parallel_size=2, sequence_parallel=True), 4,
     "2 x --context-parallel-size x --tensor-model-parallel-size = 16"),
    (dict(num_attention_heads=2), dict(context_parallel_size=4, cp_comm_type="a2a"), 1,
     "a2a splits each rank's 2 attention heads"),
    (dict(num_experts=4), dict(context_parallel_size=2), 1, "with --num-experts"),
    (dict(), dict(context_parallel_size=2, tensor_parallel_mode="2d"), 4, "2d is not"),
    (dict(), dict(context_parallel_size=3), 1, "does not divide the ranks left"),
])
def test_layouts_it_refuses(model, parallel, tp, match):
    cfg = ModelConfig(**{**dict(num_layers=2, hidden_size=16, num_attention_heads=4,
                                seq_length=16, vocab_size=45), **model})
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=8, synthetic_data=True)
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg, tcfg, ParallelConfig(tensor_model_parallel_size=tp, **parallel),
                     tp, 8, 1)
