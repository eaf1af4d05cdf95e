"""The GEMM shape model (refgpt.study.gemm_shapes): the model's products add up to its GEMM
FLOPs in every layout, the fit recovers a known machine, and the planner divides each
layout's FLOPs by the rate of its own products."""

import json

import pytest

from refgpt.config import ModelConfig
from refgpt.plan import main
from refgpt.study.gemm_shapes import GemmShape, model_gemms

MODEL = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32,
                    vocab_size=100, vocab_multiple=16)


def flops(gemms):
    return sum(2 * m * n * k * c for m, n, k, c in gemms)


@pytest.mark.parametrize("tp, cp, q", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1),
                                       (1, 1, 2)])
def test_the_products_are_the_models_gemm_flops_split_over_the_ranks(tp, cp, q):
    """Forward and backward of a micro-batch of b sequences: 6 b s (12 h^2 L + h V) for the
    linear layers and the head, 12 b s^2 h L for the attention core; a rank of TP t, CP c or
    2-D q x q makes a t-th, a c-th or a q^2-th of them."""
    b, s, h, L, V = 2, 32, 64, 3, MODEL.padded_vocab
    whole = 6 * b * s * (12 * h * h * L + h * V) + 12 * b * s * s * h * L
    assert flops(model_gemms(MODEL, b)) == whole
    assert flops(model_gemms(MODEL, b, tp, cp, q)) * tp * cp * q * q == whole


def test_the_fit_recovers_a_machine_and_rates_a_mix():
    truth = GemmShape(2e11, 4e10, 3e-6, 4)
    shapes = [(m, n, k) for m in (16, 128, 1024) for n in (64, 768, 3072) for k in (64, 768)]
    samples = [(m, n, k, truth.seconds(m, n, k)) for m, n, k in shapes]
    for fitted in (GemmShape.fit(samples, 4), GemmShape.fit(samples, 4, truth.flops)):
        for got, want in zip((fitted.flops, fitted.bandwidth, fitted.overhead),
                             (truth.flops, truth.bandwidth, truth.overhead)):
            assert got == pytest.approx(want, rel=1e-6)
    calls = GemmShape.fit([(4, 4, 4, 1e-5), (8, 8, 8, 1e-5)], 4, 1e11)   # all call cost
    assert calls.bandwidth == float("inf") and calls.overhead == pytest.approx(1e-5, rel=0.01)
    with pytest.raises(ValueError):
        GemmShape.fit([(4, 4, 4, 1e-5), (8, 8, 8, 1e-5)], 4)
    mix = [(128, 768, 768, 3), (128, 64, 128, 48)]
    assert truth.rate(mix) == pytest.approx(flops(mix) / sum(
        truth.seconds(m, n, k) * c for m, n, k, c in mix))
    assert truth.rate([(4096, 4096, 4096, 1)]) > truth.rate([(16, 64, 64, 1)])


def test_the_plan_takes_each_layouts_rate_from_its_products(tmp_path, capsys):
    """With [gemm_shape] a layout's compute is its FLOPs at the rate of its own products
    (narrower shards, slower), where the flat rate gives every layout the same."""
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--vocab-size", "100", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--nodes", "1", "--ranks-per-node", "4", "--json",
            "--dtype", "float32"]
    head = ('name = "m"\ncores_per_node = 4\nmemory_gib_per_node = 1\n'
            "[gemm_tflops_per_node]\nfloat32 = 0.4\n")
    records = {}
    for name, extra in (("flat", ""), ("shape", "[gemm_shape.float32]\ntflops = 0.1\n"
                                                "gbs = 5.0\noverhead_us = 20\n")):
        path = tmp_path / f"{name}.toml"
        path.write_text(head + extra)
        assert main([*argv, "--machine", str(path)]) == 0
        records[name] = {r["layout"]: r["step_time_s"]["compute_s"]
                         for r in json.loads(capsys.readouterr().out) if "refused" not in r}
    shape = GemmShape(1e11, 5e9, 20e-6, 4)
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                      vocab_size=100)
    for layout, t in (("tp1 pp1 dp4", 1), ("tp2 pp1 dp2", 2), ("tp4 pp1 dp1", 4)):
        rate = shape.rate(model_gemms(cfg, 1, t))
        assert records["shape"][layout] == pytest.approx(records["flat"][layout] * 1e11 / rate)
    assert records["shape"]["tp4 pp1 dp1"] > records["shape"]["tp1 pp1 dp4"]
    assert records["flat"]["tp4 pp1 dp1"] == pytest.approx(records["flat"]["tp1 pp1 dp4"])
    bad = tmp_path / "bad.toml"
    bad.write_text(head + "[gemm_shape.float32]\ntflops = 0.1\n")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--machine", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "gemm_shape.float32" in err
