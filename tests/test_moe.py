"""Mixture of experts (refgpt.nn.moe): the routing's rules, float64 central differences of
the layer (router, dispatch, combine, the aux and z losses, tokens dropped at capacity) and
of a whole model with experts, and training with experts."""

import numpy as np
import pytest

from refgpt.config import ConfigError, ModelConfig
from refgpt.nn import GPT, Params
from refgpt.nn.gpt import param_specs
from refgpt.nn.moe import MoE, route
from refgpt.nn.sublayers import Sublayers

from test_gradcheck import check_spread, numeric_grad


def moe_cfg(**kw):
    base = dict(num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=6,
                vocab_size=37, vocab_multiple=16, num_experts=4, moe_aux_loss_coeff=0.3,
                moe_z_loss_coeff=0.2)
    return ModelConfig(**{**base, **kw})


def test_top_1_gate_is_p_and_top_2_gates_are_renormalised():
    z = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]]))
    r = route(z, 1, None, "probs")
    assert r.top[:, 0].tolist() == [3, 0]
    np.testing.assert_allclose(r.gate[:, 0], [0.4, 0.5])
    r = route(z, 2, None, "probs")
    assert r.top.tolist() == [[3, 2], [0, 3]]
    np.testing.assert_allclose(r.gate, [[4 / 7, 3 / 7], [5 / 8, 3 / 8]])
    np.testing.assert_allclose(r.lse, np.log(np.exp(z).sum(-1)), atol=1e-15)
    assert r.counts.tolist() == [1, 0, 1, 2] and r.kept.all()


def test_ties_go_to_the_lower_expert_and_the_earlier_token():
    z = np.zeros((5, 3))                                    # every P equal
    r = route(z, 2, 2, "probs")                             # capacity 2
    assert r.top.tolist() == [[0, 1]] * 5
    assert r.kept.tolist() == [[True, True]] * 2 + [[False, False]] * 3
    assert r.counts.tolist() == [5, 5, 0]                   # counted before the drops


def test_capacity_keeps_the_first_tokens_or_the_largest_gates():
    p = np.array([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    by_position = route(np.log(p), 1, 2, "position")
    assert by_position.kept[:, 0].tolist() == [True, True, False, True]
    by_probs = route(np.log(p), 1, 2, "probs")
    assert by_probs.kept[:, 0].tolist() == [False, True, True, True]


def layer_and_input(cfg, tokens=10, seed=0):
    specs = [s for s in param_specs(cfg) if s.name.startswith("h.0.mlp")]
    params = Params(specs, np.float64)
    params.initialise(3)
    for name in params:                         # non-trivial values everywhere, router spread
        params[name][...] += 0.5 * np.random.default_rng(len(name)).standard_normal(
            params[name].shape)
    layer = MoE(Sublayers(cfg, 0), params, "h.0.mlp", cfg)
    x = np.random.default_rng(seed).standard_normal((2, tokens // 2, cfg.hidden_size))
    return layer, params, x


@pytest.mark.parametrize("k, factor, policy", [(1, 0.0, "probs"), (2, 0.0, "probs"),
                                               (3, 0.0, "probs"), (1, 0.5, "position"),
                                               (2, 0.6, "probs"), (2, 0.6, "position")])
def test_moe_layer_gradients_equal_central_differences(k, factor, policy):
    """J = sum(w * y) + s (aux + zloss), s = N / norm; every parameter's gradient and dx."""
    cfg = moe_cfg(moe_router_topk=k, moe_expert_capacity_factor=factor,
                  moe_token_drop_policy=policy)
    layer, params, x = layer_and_input(cfg)
    layer.norm = 7.0
    s = x.shape[0] * x.shape[1] / layer.norm
    w = np.random.default_rng(1).standard_normal(x.shape)

    def objective():
        layer.keep = False
        y = layer.forward(x)
        layer.keep = True
        return float((w * y).sum()) + s * sum(layer.losses)

    layer.forward(x)
    r = layer.stash[0][1]
    if factor:
        assert not r.kept.all()                               # some tokens are dropped
    gaps = np.diff(np.sort(r.p, axis=-1), axis=-1)
    assert gaps.min() > 1e-5                                  # no near-tie: routing is smooth
    params.zero_grad()
    dx = layer.backward(w)
    num = numeric_grad(objective, x)
    assert np.abs(dx - num).max() <= 1e-6 * max(1.0, np.abs(num).max())
    for name in params:
        num = numeric_grad(objective, params[name])
        got = params.grads[name]
        assert np.abs(got - num).max() <= 1e-6 * max(1.0, np.abs(num).max()), name


def test_whole_model_with_experts_equals_central_differences(rng):
    """The model's loss plus every MoE layer's weighted aux and z losses (--moe-layer-freq 2:
    block 0 has experts, block 1 the dense MLP)."""
    cfg = moe_cfg(num_layers=3, moe_layer_freq=2, moe_router_topk=2,
                  moe_expert_capacity_factor=1.0)
    model = GPT(cfg, np.float64, seed=5)
    assert len(model.moe_layers) == 2 and model.blocks[1].moe is None
    p = model.params
    p.data[...] += 0.05 * rng.standard_normal(p.numel)
    p["wte.weight"][cfg.vocab_size:] = 0.0
    for name in p:
        if name.endswith("router.weight"):
            p[name][...] = rng.standard_normal(p[name].shape)
    idx = rng.integers(0, cfg.vocab_size, (2, 6))
    tgt = rng.integers(0, cfg.vocab_size, (2, 6))
    norm = 12.0

    def objective():
        model.set_grad_enabled(False)
        v = model.forward(idx, tgt, norm)
        model.set_grad_enabled(True)
        return v + sum(12 / norm * sum(m.losses) for m in model.moe_layers)

    model.forward(idx, tgt, norm)
    p.zero_grad()
    model.backward()
    check_spread(p, p.grad.copy(), objective, 5)


@pytest.mark.parametrize("bad, message", [
    (dict(num_experts=-1), "--num-experts must be >= 0"),
    (dict(moe_router_topk=5), "--moe-router-topk must be between 1 and --num-experts 4"),
    (dict(moe_layer_freq=0), "--moe-layer-freq must be >= 1"),
    (dict(moe_token_drop_policy="random"), "--moe-token-drop-policy must be probs or position"),
    (dict(moe_aux_loss_coeff=-1.0), "--moe-aux-loss-coeff must be >= 0")])
def test_bad_moe_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        moe_cfg(**bad).validate()


def train(cfg, dtype="float64", **parallel):
    from refgpt.config import ParallelConfig, TrainConfig
    from refgpt.engine import Trainer
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                       dtype=dtype, synthetic_data=True, eval_iters=1, backend="numpy")
    t = Trainer(cfg, tcfg, ParallelConfig(**parallel), log=lambda *_: None)
    hist = t.run()
    return hist, t.opt.p.copy()


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputing_blocks_with_experts_changes_no_bit(granularity):
    """The rerun forward routes the same tokens to the same experts, and its statistics are
    counted once (the first forward saves and counts nothing)."""
    cfg = moe_cfg(moe_expert_capacity_factor=1.0, seq_length=8)
    hist, p = train(cfg)
    again, q = train(cfg, recompute_granularity=granularity)
    assert [h["loss"] for h in again] == [h["loss"] for h in hist]
    assert [h["moe"] for h in again] == [h["moe"] for h in hist]
    np.testing.assert_array_equal(p, q)


def test_bf16_training_with_experts_follows_float32():
    """The router's softmax and the gates in fp32, the experts in bf16: the losses within
    2^-8 of a float32 run's over three steps."""
    cfg = moe_cfg(moe_expert_capacity_factor=1.25, seq_length=8)
    ref, _ = train(cfg, "float32")
    got, _ = train(cfg, "bfloat16")
    np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=2 ** -8)
    assert all(0 < m["aux_loss"] < 1 for h in got for m in h["moe"])


def test_experts_with_a_2d_tensor_layout_are_refused():
    from refgpt.config import ParallelConfig, TrainConfig
    from refgpt.parallel.build import check_layout
    pcfg = ParallelConfig(tensor_model_parallel_size=4, tensor_parallel_mode="2d")
    with pytest.raises(ConfigError, match="--num-experts with --tensor-parallel-mode 2d"):
        check_layout(moe_cfg(seq_length=8), TrainConfig(micro_batch_size=2,
                                                        global_batch_size=2), pcfg, 4, 1, 1)


def test_flops_count_the_active_parameters():
    """model_params (the model-FLOPs formula's N) counts a token's k experts and the router,
    which is the model's parameter count less the E - k experts a token skips in each MoE
    layer (and, as for a dense model, less wpe and the vocabulary's padding rows)."""
    from refgpt.metrics import megatron_flops, model_params, moe_extra_macs
    cfg = moe_cfg(num_layers=3, moe_layer_freq=2, moe_router_topk=2)
    model = GPT(cfg, np.float64)
    C = cfg.hidden_size
    total = model.params.numel
    skipped = 2 * (cfg.num_experts - 2) * (8 * C * C + 5 * C)
    padding = (cfg.padded_vocab - cfg.vocab_size) * C
    assert model_params(cfg) == total - skipped - padding - cfg.n_positions * C
    dense = moe_cfg(num_layers=3, num_experts=0)
    assert moe_extra_macs(dense) == 0
    extra = megatron_flops(4, 6, 3, C, 48, moe_extra_macs(cfg)) - megatron_flops(4, 6, 3, C, 48)
    assert extra == 8 * 4 * 6 * 2 * (8 * C * C + C * cfg.num_experts)


def test_a_checkpoint_with_experts_is_not_exported_as_gpt2(tmp_path, capsys):
    """Hugging Face's GPT-2 has no experts: one error line, status 2, nothing written; the
    consolidated form holds every expert."""
    from refgpt import convert, train
    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1", "--synthetic-data", "--num-experts", "2", "--eval-iters", "0",
            "--save", str(tmp_path / "ckpt")]
    train.main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert.main(["--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "has no Hugging Face GPT-2 equivalent" in err and not (tmp_path / "hf").exists()
    convert.main(["--to", "consolidated", str(tmp_path / "ckpt"), str(tmp_path / "whole")])
    from safetensors.numpy import load_file
    whole = load_file(next((tmp_path / "whole").glob("iter_*/model.safetensors")))
    assert {"h.0.mlp.experts.1.c_proj.weight", "h.0.mlp.router.weight"} <= set(whole)


def test_the_activation_formula_is_claimed_for_experts_where_routing_does_not_decide():
    """Without a capacity (and expert parallelism) the experts keep every token's k rows
    whatever the routing, and the record's formula equals the registry; with a capacity the
    kept rows depend on the routing, and the record says 0 (not modelled), while the
    registry counts what the experts kept."""
    hist, _ = train(moe_cfg(seq_length=8))
    mem = hist[-1]["memory_bytes"]
    assert mem["activations_formula"] == mem["activations"] > 0
    hist, _ = train(moe_cfg(seq_length=8, moe_expert_capacity_factor=1.0))
    mem = hist[-1]["memory_bytes"]
    assert mem["activations_formula"] == 0 and mem["activations_korthikanti"] > 0
    assert mem["activations"] > 0
