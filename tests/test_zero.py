"""ZeRO on one process (data-parallel size 1, MPI's COMM_SELF): every stage runs its own code
path (units, reduce-scatters and gathers of one rank) and must equal the plain run; stage 3
refuses a parameter read outside its unit's hold. The multi-rank proofs are in
mpi_tests/test_zero.py."""

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn import GPT
from refgpt.nn.linear import Linear
from refgpt.parallel.zero import ZeroParams, formula_bytes, formula_traffic


def cfg():
    return ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=45, vocab_multiple=16)


def run(stage, offload="", shared=False, **train):
    tcfg = TrainConfig(micro_batch_size=1, global_batch_size=3, train_iters=3, lr=1e-2,
                       dtype="float64", clip_grad=0.5, weight_decay=0.1, synthetic_data=True,
                       eval_iters=1, eval_interval=2, log_interval=100, **train)
    t = Trainer(cfg(), tcfg, ParallelConfig(zero_stage=stage, offload_optimizer=offload,
                                            dp_shared_memory=shared), log=lambda *_: None)
    return t, t.run()


@pytest.mark.parametrize("stage, shared", [(1, False), (2, False), (3, False), (1, True)])
def test_every_stage_on_one_rank_equals_the_plain_run(stage, shared, tmp_path):
    (plain, ref), (zero, hist) = run(0), run(stage, str(tmp_path), shared)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in hist], [h[key] for h in ref], rtol=1e-12)
    n = plain.model.params.numel
    np.testing.assert_allclose(zero.model.params.full_data()[:n], plain.model.params.data[:n],
                               rtol=0, atol=1e-13)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank00000.exp_avg.npy",
                                                          "rank00000.exp_avg_sq.npy"]
    assert hist[-1]["dp_comm_bytes"] == 0.0            # d = 1: nothing leaves the rank


def test_shared_memory_is_a_way_to_run_zero_1():
    with pytest.raises(ConfigError, match="add --zero-stage 1"):
        ParallelConfig(dp_shared_memory=True).validate()
    with pytest.raises(ConfigError, match="drop it"):
        run(1, shared=True, backend="cupy")


def test_stage_3_reads_parameters_only_inside_a_hold():
    from mpi4py import MPI
    model = GPT(cfg(), np.float64, make_params=lambda s, d: ZeroParams(s, d, 3, MPI.COMM_SELF))
    p = model.params
    with pytest.raises(RuntimeError, match=r"outside params.hold\('h.1'\)"):
        p["h.1.mlp.c_fc.weight"]
    with p.hold("h.1", "forward"):
        assert p["h.1.mlp.c_fc.weight"].shape == (16, 64)
        with p.hold("h.1", "forward"):                  # holds nest
            pass
        assert p["h.1.mlp.c_fc.weight"] is not None
    assert p.by_key["ln_f"][0].data is not None            # the next unit was prefetched
    p.drop_prefetched()
    assert p.working == 0 and p.working_peak > 0        # all temporaries freed


def test_a_layer_parameter_is_updated_in_place_not_rebound():
    model = GPT(cfg(), np.float64)
    layer = next(l for l in model.layers if isinstance(l, Linear))
    layer.gw += 1.0                                     # in place: fine
    assert np.all(model.params.grads[layer.param_names["weight"]] == 1.0)
    with pytest.raises(AttributeError, match="in place"):
        layer.w = np.zeros_like(layer.w)


def test_formulas_of_the_paper():
    P, d, b = 1200, 4, 4                                 # float32: the paper's K = 8
    assert [formula_bytes(s, P, d, b) for s in range(4)] == [16 * P, 8 * P + 8 * P // d,
                                                              4 * P + 12 * P // d, 16 * P // d]
    assert formula_bytes(1, P, d, b, shared=True) == 4 * P + 12 * P // d
    m = 5
    assert [formula_traffic(s, P, d, m, 1) for s in range(4)] == [
        2 * P * 3 / 4, 2 * P * 3 / 4, (m + 1) * P * 3 / 4, 3 * m * P * 3 / 4]
