"""Layered gradient accumulation on one process (refgpt.nn.gpt: GPT.forward_layered and
backward_layered): the same losses and, to 1e-12, the same parameters as ordinary
accumulation, with dropout, full and selective recomputation and experts; every micro-batch's
activations held at once; refused with pipelining. Parallel layouts and ZeRO's traffic:
mpi_tests/test_layered.py."""

from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.parallel.build import check_layout

MODEL = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                    vocab_size=45, vocab_multiple=16, dropout=0.1)
TRAIN = TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=3, lr=1e-2,
                    dtype="float64", synthetic_data=True, eval_iters=1, eval_interval=2)


@pytest.mark.parametrize("parallel, model", [
    ({}, {}), (dict(recompute_granularity="full"), {}),
    (dict(recompute_granularity="selective"), {}), ({}, dict(num_experts=4)),
])
def test_layered_equals_ordinary_accumulation(parallel, model):
    mcfg = replace(MODEL, **model)
    runs = []
    for layered in (False, True):
        t = Trainer(mcfg, TRAIN, ParallelConfig(layered_gradient_accumulation=layered,
                                                **parallel), log=lambda *_: None)
        runs.append((t.run(), t.model.params.data.copy(), t.memory()["activations"]))
    (ha, pa, aa), (hb, pb, ab) = runs
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert np.abs(pa - pb).max() <= 1e-12 * np.abs(pa).max()
    assert ab > aa                                       # the 4 micro-batches' blocks at once


def test_pipelining_is_refused():
    with pytest.raises(ConfigError, match="--layered-gradient-accumulation runs every"):
        check_layout(MODEL, replace(TRAIN, micro_batch_size=1),
                     ParallelConfig(layered_gradient_accumulation=True,
                                    pipeline_model_parallel_size=3), 1, 1, 3)
