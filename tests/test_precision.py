"""Mixed precision (refgpt.precision): each op's 16-bit numerics as its docstring states
them, the loss scaler against Megatron's rules, the master weights, the memory formulas, and
16-bit training runs (skips, resumes, logs).

An op on 16-bit inputs must equal the same op on those values widened to fp32, with its
result rounded once to 16 bits (or left in fp32 where the docstring says so): bit for bit,
since the arithmetic is the same fp32 arithmetic.
"""

import json
from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.nn.attention import attention_backward, attention_forward, causal_matmul_nt, \
    causal_softmax
from refgpt.nn.block import residual
from refgpt.nn.embedding import scatter_add_rows
from refgpt.nn.gelu import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward
from refgpt.nn.layernorm import layernorm_backward, layernorm_forward
from refgpt.nn.linear import add_matmul, column_sum, matmul
from refgpt.nn.loss import cross_entropy
from refgpt.precision import dtype_of, narrow
from refgpt.optim import DynamicScaler, make_scaler
from refgpt.parallel.zero import formula_bytes, formula_traffic

HALVES = ["bfloat16", "float16"]
QUIET = dict(log=lambda *_: None)


def half_pair(dtype, *shape, seed=0, scale=1.0):
    """(x16, x32): random 16-bit values and the same values in fp32."""
    x16 = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype_of(dtype))
    return x16, x16.astype(np.float32)


def same(a, b) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", HALVES)
def test_gemms_sum_in_fp32_and_round_once(dtype):
    t = dtype_of(dtype)
    a, a32 = half_pair(dtype, 7, 33, seed=1)
    b, b32 = half_pair(dtype, 33, 5, seed=2)
    bias, bias32 = half_pair(dtype, 5, seed=3)
    assert same(matmul(a, b, bias), narrow(matmul(a32, b32, bias32), t))
    assert same(matmul(a, b, rounded=False), matmul(a32, b32))
    c, c32 = np.ones((33, 5), np.float32), np.ones((33, 5), np.float32)
    add_matmul(c, a.T, narrow(a32[:, :5], t))              # into the fp32 gradient
    add_matmul(c32, a32.T, a32[:, :5])
    assert same(c, c32)
    assert same(column_sum(a), column_sum(a32))


@pytest.mark.parametrize("dtype", HALVES)
def test_elementwise_ops_round_once(dtype):
    t = dtype_of(dtype)
    x, x32 = half_pair(dtype, 4, 6, 8, seed=4)
    y, y32 = half_pair(dtype, 4, 6, 8, seed=5)
    g, g32 = half_pair(dtype, 8, seed=6)
    b, b32 = half_pair(dtype, 8, seed=7)
    assert same(residual(x, y), narrow(residual(x32, y32), t))
    for kind in ("tanh", "erf"):
        assert same(gelu_forward(x, kind), narrow(gelu_forward(x32, kind), t))
        assert same(gelu_backward(x, y, kind), narrow(gelu_backward(x32, y32, kind), t))
        f, f32 = x.copy(), x32.copy()
        out = bias_gelu_forward(f, b, kind)
        bias_gelu_forward(f32, b32, kind)
        assert same(f, narrow(f32, t))                     # the pre-activation, rounded
        assert same(out, narrow(gelu_forward(narrow(f32, t).astype(np.float32), kind), t))
        dx, db = bias_gelu_backward(x, y, kind)
        dx32, db32 = bias_gelu_backward(x32, y32, kind)
        assert same(dx, narrow(dx32, t)) and same(db, db32)
    yl, n, rstd = layernorm_forward(x, g, b, 1e-5)
    yl32, n32, rstd32 = layernorm_forward(x32, g32, b32, 1e-5)
    assert same(yl, narrow(yl32, t)) and same(n, narrow(n32, t)) and same(rstd, rstd32)
    dx, dg, db = layernorm_backward(y, n, rstd, g)
    dx32, dg32, db32 = layernorm_backward(y32, n.astype(np.float32), rstd, g32)
    assert same(dx, narrow(dx32, t)) and same(dg, dg32) and same(db, db32)
    table, table32 = np.zeros((5, 8), np.float32), np.zeros((5, 8), np.float32)
    idx = np.array([0, 3, 3, 1])
    scatter_add_rows(table, idx, x[0, :4])
    scatter_add_rows(table32, idx, x32[0, :4])
    assert same(table, table32)


@pytest.mark.parametrize("dtype", HALVES)
def test_loss_in_fp32_and_its_gradient_rounded_once(dtype):
    t = dtype_of(dtype)
    z, z32 = half_pair(dtype, 6, 16, seed=8, scale=3.0)
    y = np.array([0, 5, 9, 2, 11, 3])
    total = cross_entropy(z, 12, y, 6.0, True)
    total32 = cross_entropy(z32, 12, y, 6.0, True)
    assert total == total32 and same(z, narrow(z32, t))


@pytest.mark.parametrize("dtype", HALVES)
def test_attention_keeps_probabilities_in_16_bits_and_sums_in_fp32(dtype):
    t = dtype_of(dtype)
    q, q32 = half_pair(dtype, 2, 2, 5, 4, seed=9)
    k, k32 = half_pair(dtype, 2, 2, 5, 4, seed=10)
    v, v32 = half_pair(dtype, 2, 2, 5, 4, seed=11)
    o, (p, _) = attention_forward(q, k, v, 0)
    p_ref = narrow(causal_softmax(causal_matmul_nt(q32, k32, 0.5), 0), t)  # 1/sqrt(D) = 0.5
    assert same(p, p_ref) and same(o, narrow(p_ref.astype(np.float32) @ v32, t))
    do, do32 = half_pair(dtype, 2, 2, 5, 4, seed=12)
    grads = [np.empty_like(q) for _ in range(3)]
    attention_backward(q, k, v, (p, p), do, *grads)
    grads32 = [np.empty_like(q32) for _ in range(3)]
    p32 = p.astype(np.float32)
    attention_backward(q32, k32, v32, (p32, p32), do32, *grads32)
    for g16, g32 in zip(grads, grads32):
        assert same(g16, narrow(g32, t))


def test_dynamic_scaler_follows_megatron_trace():
    """A scripted run of overflows against the scales Megatron's DynamicGradScaler gives,
    worked out by hand: window 3, hysteresis 2, floor 2."""
    s = DynamicScaler(initial=64.0, min_scale=2.0, window=3, hysteresis=2)
    script = [True, True, True, False, False, False, True, False, True, True, True, True, True,
              True, False, False, False]
    expected = [64, 32, 16, 16, 16, 32, 32, 32, 16, 8, 4, 2, 2, 2, 2, 2, 4]
    # step 1: first overflow uses up hysteresis (2 -> 1); step 2 halves (-> 0), step 3 halves
    # again (still <= 0); three clean steps double and refill hysteresis; one overflow (2 -> 1)
    # is forgiven, but a clean step does not refill the tracker, so the next overflow halves,
    # and every one after it, down to the floor, where it stays; three clean steps double.
    scales = []
    for overflow in script:
        s.update(overflow)
        scales.append(s.scale)
    assert scales == expected
    restored = DynamicScaler(initial=1.0, min_scale=1.0, window=3, hysteresis=2)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()


def test_scaler_choice_follows_megatron():
    assert make_scaler(TrainConfig(dtype="float32")).scale == 1.0
    assert make_scaler(TrainConfig(dtype="bfloat16")).scale == 1.0
    assert isinstance(make_scaler(TrainConfig(dtype="float16")), DynamicScaler)
    const = make_scaler(TrainConfig(dtype="float16", loss_scale=128.0))
    const.update(True)
    assert const.scale == 128.0


def test_memory_formulas_per_parameter():
    """The ZeRO paper's (2 + 2 + K) Psi with K = 12, and Megatron's 18 bytes with fp32
    gradients; ZeRO's stages divide what they partition by d."""
    P, d = 1024, 4
    assert formula_bytes(0, P, d, 2, 4, 12) == 18 * P
    assert formula_bytes(0, P, d, 2, 2, 12) == 16 * P
    assert formula_bytes(1, P, d, 2, 2, 12) == 4 * P + 12 * P // d
    assert formula_bytes(2, P, d, 2, 2, 12) == 2 * P + 14 * P // d
    assert formula_bytes(3, P, d, 2, 2, 12) == 16 * P // d
    assert formula_traffic(0, P, d, 3, 2, 4) == 2 * 4 * P * (d - 1) / d
    assert formula_traffic(0, P, d, 3, 2, 2) == 2 * 2 * P * (d - 1) / d


def tiny(**train):
    mcfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16,
                       vocab_size=64, vocab_multiple=16)
    tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=6, lr=1e-2,
                       min_lr=1e-3, lr_warmup_iters=1, synthetic_data=True, eval_iters=0,
                       log_interval=100, backend="numpy")
    return mcfg, replace(tcfg, **train)


@pytest.mark.parametrize("grad_bf16", [False, True])
def test_registry_of_a_16_bit_run_equals_the_formula(grad_bf16):
    mcfg, tcfg = tiny(dtype="bfloat16", train_iters=1)
    t = Trainer(mcfg, tcfg, ParallelConfig(grad_reduce_in_bf16=grad_bf16), **QUIET)
    mem = t.run()[-1]["memory_bytes"]
    P = t.model.params.padded
    assert mem["params"] == 2 * P and mem["grads"] == (2 if grad_bf16 else 4) * P
    assert mem["optimizer"] == 12 * P
    assert mem["params"] + mem["grads"] + mem["optimizer"] == mem["formula"]
    assert t.model.params.data.dtype == dtype_of("bfloat16") and t.opt.p.dtype == np.float32


def test_master_weights_keep_updates_smaller_than_a_16_bit_step():
    """A learning rate far below bfloat16's resolution: the model's copy would never move if
    updated in 16 bits; the fp32 master accumulates the steps, and the copy follows it."""
    mcfg, tcfg = tiny(dtype="bfloat16", lr=1e-5, min_lr=1e-5, lr_warmup_iters=0,
                      weight_decay=0.0, train_iters=40)
    t = Trainer(mcfg, tcfg, **QUIET)
    start16, start32 = t.model.params.data.copy(), t.opt.p.copy()
    t.run()
    moved = np.abs(t.opt.p - start32)
    assert moved.max() > 1e-4                             # 40 steps of ~1e-5
    assert np.array_equal(t.model.params.data, narrow(t.opt.p, start16.dtype))
    assert not np.array_equal(t.model.params.data, start16)


def test_fp16_skips_overflowing_steps_and_backs_off(tmp_path):
    """From the default scale 2^32 the first steps overflow in fp16: each is skipped, and the
    logged scale follows the dynamic scaler's rules."""
    mcfg, tcfg = tiny(dtype="float16", train_iters=14, log_jsonl=str(tmp_path / "log.jsonl"))
    hist = Trainer(mcfg, tcfg, **QUIET).run()
    replay = DynamicScaler()
    for r in hist:
        replay.update(bool(r["skipped"]))
        assert r["loss_scale"] == replay.scale
        assert np.isfinite(r["loss"]) and (r["skipped"] or np.isfinite(r["grad_norm"]))
    skipped = [r["skipped"] for r in hist]
    assert skipped[0] == 1 and skipped[-1] == 0 and hist[-1]["loss_scale"] < 2.0 ** 32
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in logged] == [r["loss_scale"] for r in hist]


@pytest.mark.parametrize("dtype", HALVES)
def test_resume_continues_bit_for_bit(tmp_path, dtype):
    """Save at iteration 3 of 6 and resume: the same losses, master weights, 16-bit weights
    and loss-scaler state as the run that went straight through."""
    extra = {"initial_loss_scale": 2.0 ** 12, "loss_scale_window": 2} if dtype == "float16" else {}
    mcfg, tcfg = tiny(dtype=dtype, **extra)
    whole = Trainer(mcfg, tcfg, **QUIET)
    full = whole.run()
    first = Trainer(mcfg, replace(tcfg, save=str(tmp_path), exit_interval=3), **QUIET)
    first.run()
    second = Trainer(mcfg, replace(tcfg, load=str(tmp_path)), **QUIET)
    rest = second.run()
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[3:]]
    assert [r["loss_scale"] for r in rest] == [r["loss_scale"] for r in full[3:]]
    assert np.array_equal(second.opt.p, whole.opt.p)
    assert np.array_equal(second.model.params.data, whole.model.params.data)
    assert second.scaler.state_dict() == whole.scaler.state_dict()


def test_a_16_bit_checkpoint_loads_into_float32(tmp_path):
    """A checkpoint holds the fp32 master weights, so a float32 run starts from exactly them."""
    mcfg, tcfg = tiny(dtype="bfloat16", train_iters=2, save=str(tmp_path))
    t = Trainer(mcfg, tcfg, **QUIET)
    t.run()
    f32 = Trainer(mcfg, replace(tcfg, dtype="float32", save="", load=str(tmp_path)), **QUIET)
    assert np.array_equal(f32.model.params.data, t.opt.p)


def test_16_bit_losses_follow_float32():
    """Sixty steps of the tiny model: the mean loss of the last twenty within 0.5% of
    float32's (single steps drift further apart, by a few 16-bit ulps, as the runs' weights
    diverge; the 200-step run on the real corpus is in docs/mixed-precision.md)."""
    mcfg, tcfg = tiny(train_iters=60)
    ref = np.mean([r["loss"] for r in Trainer(mcfg, tcfg, **QUIET).run()][-20:])
    for dtype in HALVES:
        extra = {"initial_loss_scale": 2.0 ** 12} if dtype == "float16" else {}
        hist = Trainer(mcfg, replace(tcfg, dtype=dtype, **extra), **QUIET).run()
        assert abs(np.mean([r["loss"] for r in hist][-20:]) / ref - 1) < 5e-3, dtype
