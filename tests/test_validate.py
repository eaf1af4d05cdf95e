"""refgpt against Hugging Face GPT-2 (PyTorch): validation, import/export, dumps."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from refgpt import convert, validate
from refgpt.checkpoint import load_checkpoint
from refgpt.config import ModelConfig
from refgpt.interop import hf_config, hf_gpt2
from refgpt.nn import GPT
from refgpt.optim import AdamW
from refgpt.engine import Trainer
from refgpt.config import TrainConfig

GPT2Config, GPT2LMHeadModel = hf_gpt2()


def run_validate(capsys, argv):
    code = validate.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


SHAPES = {  # odd ones on purpose: vocab not a multiple of 64, 3 heads, short sequence, erf GELU
    "odd": ["--num-layers", "2", "--hidden-size", "24", "--num-attention-heads", "3",
            "--vocab-size", "101", "--seq-length", "7", "--max-position-embeddings", "11"],
    "one-head-erf": ["--num-layers", "3", "--hidden-size", "8", "--num-attention-heads", "1",
                     "--vocab-size", "37", "--seq-length", "5", "--gelu", "erf"],
    "gpt2ish": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                "--vocab-size", "128", "--seq-length", "16"],
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("steps", ["0", "3"])
def test_validate_against_hf(capsys, dtype, shape, steps):
    # float64 with large steps; float32 with the default schedule (see refgpt.validate)
    lr = ["--lr", "1e-2", "--lr-warmup-iters", "1"] if dtype == "float64" else []
    code, out = run_validate(capsys, ["--against", "hf", "--dtype", dtype, "--steps", steps,
                                      *lr, *SHAPES[shape]])
    tolerance = 1e-10 if dtype == "float64" else 1e-4
    assert code == 0 and out[-1].endswith(f"PASS (tolerance {tolerance:g})"), out[-3:]
    names = [line.split()[0] for line in out[1:-1]]
    assert names[0] == "logits" and "loss" in names and "grad.wte.weight" in names
    assert any(n.startswith("param.") for n in names) == (steps != "0")


def test_validation_catches_decaying_every_tensor(capsys, monkeypatch):
    """The classic bug: weight decay on biases and LayerNorm too. It must not hide."""
    class DecayEverything(AdamW):
        def __init__(self, p, g, decay, **kw):
            super().__init__(p, g, [(0, len(p))], **kw)
    monkeypatch.setattr(validate, "AdamW", DecayEverything)
    code, out = run_validate(capsys, ["--against", "hf", "--steps", "2", "--weight-decay", "0.1",
                                      "--lr-warmup-iters", "0", *SHAPES["gpt2ish"]])
    assert code == 1 and out[-1].split()[-3] == "FAIL"
    assert out[-2].startswith("first divergence: step1.loss")     # the loss after one step
    rows = {line.split()[0]: line.split()[-1] for line in out[1:-2]}
    assert rows["param.h.0.ln_1.weight"] == "FAIL" and rows["grad.h.0.ln_1.weight"] == "pass"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    mcfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                       vocab_size=50)
    t = Trainer(mcfg, TrainConfig(micro_batch_size=2, global_batch_size=2, train_iters=3,
                                  synthetic_data=True, dtype="float64", eval_iters=0,
                                  save=str(root / "ckpt")), log=lambda *_: None)
    t.run()
    return root


def test_export_loads_in_transformers_with_same_logits(ckpt):
    assert convert.main(["--to", "hf", str(ckpt / "ckpt"), str(ckpt / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(ckpt / "hf").double().eval()
    c = load_checkpoint(ckpt / "ckpt")
    model = GPT(ModelConfig.from_dict(c.state["model"]), np.float64)
    model.params.load_state_dict(c.params)
    x = np.random.default_rng(0).integers(0, 50, (2, 8))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(model.logits(x), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_import_from_transformers_gives_same_logits(tmp_path):
    cfg = ModelConfig(num_layers=2, hidden_size=12, num_attention_heads=3, seq_length=10,
                      vocab_size=70)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(cfg))).double().eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert.main(["--from", "hf", str(tmp_path / "hf"), str(tmp_path / "ck"),
                         "--dtype", "float64"]) == 0
    c = load_checkpoint(tmp_path / "ck")
    assert c.state["iteration"] == 0 and ModelConfig.from_dict(c.state["model"]) == cfg
    model = GPT(cfg, np.float64)
    model.params.load_state_dict(c.params)
    x = np.random.default_rng(1).integers(0, 70, (3, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(model.logits(x), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_dump_compares_with_itself_and_finds_a_perturbed_layer(ckpt, capsys, tmp_path):
    a = tmp_path / "a.safetensors"
    assert validate.main(["--dump", str(a), "--load", str(ckpt / "ckpt")]) == 0
    dump = load_file(str(a))
    assert {"input_ids", "embed", "h.1.attn.probs", "h.1.mlp.gelu", "ln_f", "logits", "loss",
            "grad.h.0.mlp.c_fc.weight", "param.wte.weight"} <= set(dump)
    assert dump["logits"].shape == (2, 8, 50) and dump["h.0.attn.probs"].shape == (2, 2, 8, 8)
    capsys.readouterr()
    code, out = run_validate(capsys, ["--compare", str(a)])              # vs recomputation
    assert code == 0 and out[-1].startswith("max_rel_err=0.000e+00 PASS")
    dump["param.h.1.mlp.c_fc.weight"][0, 0] += 1e-3                      # perturb one weight
    b = tmp_path / "b.safetensors"
    save_file(dump, str(b))
    code, out = run_validate(capsys, ["--compare", str(b)])
    assert code == 1 and out[-2].startswith("first divergence: h.1.mlp.fc ")


def test_hf_example_dump_matches_refgpt(ckpt, capsys, tmp_path):
    if not (ckpt / "hf").exists():
        convert.main(["--to", "hf", str(ckpt / "ckpt"), str(ckpt / "hf")])
    theirs = tmp_path / "theirs.safetensors"
    r = subprocess.run([sys.executable, "examples/hf_dump.py", str(ckpt / "hf"), str(theirs),
                        "--seq", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {theirs}: 82 tensors" in r.stdout and "MiB" in r.stdout   # says what it wrote
    capsys.readouterr()
    code, out = run_validate(capsys, ["--compare", str(theirs)])
    assert code == 0, out[-3:]
    assert len(out) == 2 + 82 and out[-1].endswith("PASS (tolerance 1e-10)")
