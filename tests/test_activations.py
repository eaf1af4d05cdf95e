"""The activation registry (refgpt.nn.activations): what the layers hold for backward,
counted, equals refgpt's formula for it exactly, in every precision, with and without dropout
and recomputation, on both CPU backends; and the counting itself (views, shared arrays)."""

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn.activations import (Sizes, chunk_bytes, covered_bytes, korthikanti_bytes,
                                   refgpt_bytes, schedule_bytes)
from refgpt.parallel.schedules import compute_ops

RECOMPUTE = {  # name: (ParallelConfig options, refgpt_bytes options) for 3 blocks
    "none": ({}, {}),
    "selective": (dict(recompute_granularity="selective"), dict(selective=True)),
    "full": (dict(recompute_granularity="full"), dict(recomputed=3)),
    "full, first 2": (dict(recompute_granularity="full", recompute_method="block",
                           recompute_num_layers=2), dict(recomputed=2)),
    "full, chunks of 2": (dict(recompute_granularity="full", recompute_num_layers=2),
                          dict(recomputed=3, chunk=2)),
}


@pytest.mark.parametrize("dtype, e, c", [("float64", 8, 8), ("float32", 4, 4),
                                         ("bfloat16", 2, 4), ("float16", 2, 4)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_registry_equals_the_formula(dtype, e, c, dropout, recompute, backend):
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=dropout)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=1, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=0, backend=backend)
    options, formula = RECOMPUTE[recompute]
    t = Trainer(cfg, tcfg, ParallelConfig(**options), log=lambda *_: None)
    record = t.run()[-1]
    want = refgpt_bytes(Sizes(2, 16, 32, 4, 64, e, c, dropout=dropout > 0), 3, True, True,
                        **formula)
    mem = record["memory_bytes"]
    assert mem["activations"] == mem["activations_formula"] == want["total"]   # the banner's
    assert mem["activations_layer"] == mem["activations_layer_formula"] == want["layer"]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("recompute", ["none", "selective", "full, first 2"])
def test_registry_equals_the_formula_with_experts(dtype, topk, recompute):
    """Blocks 0 and 2 of 3 with 4 experts (--moe-layer-freq 2): each keeps its input, the gates,
    the N k kept pairs' outputs and its experts' inputs and MLP activations for those N k
    rows, whatever the routing (no capacity, one process)."""
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, vocab_multiple=16, dropout=0.1, num_experts=4,
                      moe_router_topk=topk, moe_layer_freq=2)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=1, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=0)
    options, formula = RECOMPUTE[recompute]
    t = Trainer(cfg, tcfg, ParallelConfig(**options), log=lambda *_: None)
    mem = t.run()[-1]["memory_bytes"]
    e, c = (8, 8) if dtype == "float64" else (2, 4)
    z = Sizes(2, 16, 32, 4, 64, e, c, dropout=True, routed=(topk, 32 * topk, 32 * topk))
    want = refgpt_bytes(z, 3, True, True, moe=(True, False, True), **formula)
    assert mem["activations"] == mem["activations_formula"] == want["total"]
    assert mem["activations_layer"] == mem["activations_layer_formula"] == want["layer"]
    dense = refgpt_bytes(Sizes(2, 16, 32, 4, 64, e, c, dropout=True), 3, True, True, **formula)
    assert want["total"] > dense["total"]                     # the experts' rows, the gates


def test_views_and_shared_arrays_count_once():
    buf = np.zeros((3, 4, 5), np.float32)
    q, k, v = buf                                             # three views: 240 bytes
    assert covered_bytes([q, k, v, buf, buf]) == buf.nbytes
    # a strided view spans its first to its last element: [3, 2] is element 3 * 5 + 2 * 2
    assert covered_bytes([buf[0, :, ::2]]) == (3 * 5 + 2 * 2 + 1) * 4
    assert covered_bytes([buf[:, 0], np.ones(2)]) == (2 * 20 + 5) * 4 + 16


def test_the_formula_by_hand():
    """One block of GPT-2 124M's shape in bf16, no dropout, b = 1, s = 1024: 16 bsh e for
    the [b, s, h]-sized arrays, 2 bs c for the LayerNorms' 1/sigma, a s^2 b e for P."""
    z = Sizes(b=1, s=1024, h=768, a=12, V=50304, e=2, c=4)
    one = refgpt_bytes(z, 12, False, False)
    assert one["layer"] == 16 * 1024 * 768 * 2 + 2 * 1024 * 4 + 12 * 1024 ** 2 * 2
    assert refgpt_bytes(z, 12, False, False, recomputed=12)["layer"] == 1024 * 768 * 2
    assert korthikanti_bytes(1024, 1, 768, 12) == 1024 * 768 * (34 + 5 * 12 * 1024 / 768)
    assert korthikanti_bytes(1024, 1, 768, 12, recompute="full") == 2 * 1024 * 768


@pytest.mark.parametrize("options, message", [
    (dict(recompute_num_layers_per_stage="2,x"), "comma-separated list of counts"),
    (dict(recompute_num_layers_per_stage="2,-1", recompute_granularity="full",
          recompute_method="block"), "comma-separated list of counts"),
    (dict(recompute_num_layers_per_stage="2,1"), "goes with --recompute-granularity full"),
    (dict(recompute_num_layers_per_stage="2,1", recompute_granularity="full"),
     "goes with --recompute-granularity full --recompute-method block"),
])
def test_per_stage_counts_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**options).validate()


def test_per_stage_counts_must_match_the_pipeline():
    from refgpt.parallel.build import check_layout
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64)
    pcfg = ParallelConfig(recompute_granularity="full", recompute_method="block",
                          recompute_num_layers_per_stage="1,1,0", pipeline_model_parallel_size=2)
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=4)
    with pytest.raises(ConfigError, match="gives 3 counts for 2 pipeline stages"):
        check_layout(cfg, tcfg, pcfg, 1, 1, 2)
    assert [pcfg.recomputed_blocks(2, r) for r in range(3)] == [1, 1, 0]


@pytest.mark.parametrize("recompute", ["", "full", "selective"])
def test_the_schedule_replay_of_1f1b_equals_the_in_flight_formula(recompute):
    """schedule_bytes over a 1F1B rank's compute ops is refgpt_bytes with min(p - r, m)
    micro-batches in flight, on every rank (the interleaved schedule's formula reduces to the
    plain pipeline's)."""
    z = Sizes(2, 16, 32, 4, 64, 4, 4, 1, False, True)
    p, m, blocks = 4, 6, 3
    recomputed, selective = (blocks if recompute == "full" else 0), recompute == "selective"
    for r, ops in enumerate(compute_ops(p, m)):
        first, last = r == 0, r == p - 1
        got = schedule_bytes([chunk_bytes(z, blocks, first, last, recomputed, selective)], ops)
        assert got == refgpt_bytes(z, blocks, first, last, recomputed, selective,
                                   min(p - r, m))
