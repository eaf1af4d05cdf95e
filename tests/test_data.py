"""Tokenizer training, token files, deterministic sampling, and learning real text."""

import json

import numpy as np
import pytest

from refgpt.data.tokenizer import load_tokenizer
from refgpt.data.tokens import SyntheticDataset, TokenDataset, batch
from refgpt.data.prepared import prepare
from refgpt.engine import Trainer
from refgpt.config import ModelConfig, TrainConfig

TEXT = ("def add(a, b):\n    return a + b\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}.py").write_text(TEXT * (i % 3 + 1) + f"# file {i}\n")
    out = root / "prepared"
    prepare([str(src)], out, vocab_size=300, val_fraction=0.1, log=lambda *_: None)
    return out


def test_prepare_writes_tokens_and_tokenizer(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300 and meta["documents"] == 20
    tok = load_tokenizer(data_dir / "tokenizer.json")
    assert tok.decode(tok.encode(TEXT).ids) == TEXT
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    assert len(train) == meta["splits"]["train"]["tokens"] and len(val) > 0
    assert (train == meta["eot_id"]).sum() >= 17            # documents are separated


def test_sampling_is_deterministic_and_covers_every_window(data_dir):
    a = TokenDataset(data_dir, "train", 8, seed=1)
    b = TokenDataset(data_dir, "train", 8, seed=1)
    n = a.num_windows
    assert all(np.array_equal(a.sample(g), b.sample(g)) for g in range(0, 3 * n, 7))
    firsts = {tuple(a.sample(g)) for g in range(n)}          # one epoch: each window once
    assert len(firsts) == len({tuple(a.window(w)) for w in range(n)})
    c = TokenDataset(data_dir, "train", 8, seed=2)
    assert any(not np.array_equal(a.sample(g), c.sample(g)) for g in range(5))
    x, y = batch(a, [3, 4])
    assert x.shape == (2, 8) and np.array_equal(x[:, 1:], y[:, :-1])


def test_synthetic_train_and_val_differ():
    tr, va = SyntheticDataset(50, 8, 0, "train"), SyntheticDataset(50, 8, 0, "val")
    assert not np.array_equal(tr.sample(0), va.sample(0))
    assert np.array_equal(tr.sample(3), SyntheticDataset(50, 8, 0, "train").sample(3))


def test_corrupt_token_file_is_reported(data_dir, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    with open(broken / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="corrupt token file"):
        TokenDataset(broken, "train", 8, 0)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TokenDataset(broken, "train", 8, 0)


def test_too_short_for_sequence_length(data_dir):
    with pytest.raises(ValueError, match="fewer than --seq-length"):
        TokenDataset(data_dir, "val", 10_000, 0)


def test_learns_real_text(data_dir):
    mcfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16,
                       vocab_size=8)                          # raised to the data's vocabulary
    tcfg = TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=40, lr=1e-2,
                       lr_warmup_iters=5, dtype="float32", data_path=str(data_dir), eval_iters=1,
                       eval_interval=40)
    with pytest.raises(Exception, match="smaller than the data's vocabulary"):
        Trainer(mcfg, tcfg, given={"vocab_size"}, log=lambda *_: None)
    t = Trainer(mcfg, tcfg, log=lambda *_: None)
    hist = t.run()
    assert t.mcfg.vocab_size > 256
    assert hist[-1]["val_loss"] < 0.5 * hist[0]["loss"]
