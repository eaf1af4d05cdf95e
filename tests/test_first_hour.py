"""What a new user meets in their first hour: help that tells the truth, generation from a
checkpoint with a tokenizer, files with the umask's permissions, a resumed run that keeps its
settings and one log history, log lines of interval averages, an MFU that cannot pass 100%,
TensorBoard scalars, dumps that say why they differ."""

import json
import os
import struct
import sys

import numpy as np
import pytest

from refgpt import convert, dump, generate, metrics, prepare, train, validate
from refgpt.study import scaling

SMALL = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
         "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--eval-iters", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run on a prepared folder (so its checkpoints carry a tokenizer): 4 iterations,
    saved at 2 and 4, logged to JSONL and TensorBoard, the files made under umask 022."""
    from refgpt.data.corpus import default_corpus_files
    root = tmp_path_factory.mktemp("first_hour")
    files = [str(f) for f in default_corpus_files()[:6]]
    assert prepare.main(["--output", str(root / "data"), "--vocab-size", "300", *files]) == 0
    old = os.umask(0o022)
    try:
        assert train.main(["--data-path", str(root / "data"), *SMALL, "--train-iters", "4",
                           "--save", str(root / "ckpt"), "--save-interval", "2",
                           "--log-jsonl", str(root / "logs" / "log.jsonl"), "--log-interval", "2",
                           "--tensorboard-dir", str(root / "tb")]) == 0
    finally:
        os.umask(old)
    return root


def test_help_says_each_default_once_in_plain_text(capsys, monkeypatch):
    for module in (train, prepare, generate, validate, convert, scaling):
        build = getattr(module, "build_study_parser", None) or module.build_parser
        ap = build()
        undescribed = [a.dest for a in ap._actions if not a.help and a.dest != "help"]
        assert undescribed == [], (module.__name__, undescribed)
        text = ap.format_help()
        assert "``" not in text and ":mod:" not in text, module.__name__
        for line in text.replace("\n                        ", " ").splitlines():
            assert not ("(default" in line and "[default" in line), line
    assert "dp-shm" in scaling.build_study_parser().format_help()
    assert ".txt" in prepare.build_parser().format_help()
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/refgpt-train"])
    assert train.build_parser().prog == "refgpt-train"             # a console script's own name
    monkeypatch.setattr(sys, "argv", ["/somewhere/refgpt/train.py"])
    assert train.build_parser().prog == "python -m refgpt.train"


def test_generate_with_a_tokenizer_from_ids_and_its_limits(run, capsys):
    ckpt = str(run / "ckpt")
    assert generate.main(["--load", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "3",
                          "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and out.err == ""                        # the ids, decoded as text
    assert generate.main(["--load", ckpt, "--prompt-ids", "5,6", "--max-new-tokens", "50"]) == 0
    assert "stopped after 6 new tokens: the model's position table holds 8" in capsys.readouterr().err
    for flag in ("--max-new-tokens", "--top-k", "--temperature"):
        with pytest.raises(SystemExit) as e:
            generate.main(["--load", ckpt, "--prompt-ids", "1", flag, "-1"])
        assert e.value.code == 2 and f"error: {flag} must be >= 0" in capsys.readouterr().err


def test_checkpoints_and_dumps_honour_the_umask(run, capsys):
    folder = run / "ckpt" / "iter_0000004"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    old = os.umask(0o027)
    try:
        assert validate.main(["--dump", str(run / "d.safetensors"), "--load", str(folder)]) == 0
    finally:
        os.umask(old)
    assert (run / "d.safetensors").stat().st_mode & 0o777 == 0o640
    assert "MiB (2 sequences of 8 tokens" in capsys.readouterr().out    # says what it wrote


def test_a_resumed_run_keeps_its_settings_and_one_log_history(run, capsys):
    log = run / "logs" / "log.jsonl"
    assert [json.loads(line)["iter"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert train.main(["--load", str(run / "ckpt" / "iter_0000002"), "--train-iters", "3",
                       "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "training settings from the checkpoint; changed by flags: --train-iters 4 -> 3" in out
    assert "global batch 4 =" in out                               # not the default 16
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3]                  # 3 is the resumed run's
    assert rows[-1]["consumed_samples"] == 12


def test_the_log_line_averages_its_interval(run):
    """Megatron's convention: the time per iteration (and the rates with it) of the line is the
    mean of the iterations since the last line, not the last iteration's."""
    from refgpt.config import TrainConfig
    from refgpt.engine.report import averaged, log_line
    rows = [json.loads(line) for line in (run / "logs" / "log.jsonl").read_text().splitlines()]
    mean = (rows[0]["step_time_s"] + rows[1]["step_time_s"]) / 2
    avg = averaged(rows[1], mean)
    assert f"elapsed time per iteration (ms): {1e3 * mean:.1f}" in log_line(avg, TrainConfig())
    assert avg["tokens_per_s"] == pytest.approx(4 * 8 / mean)
    assert avg["mfu"] == pytest.approx(rows[1]["mfu"] * rows[1]["step_time_s"] / mean)


def test_mfu_is_against_the_best_rate_and_never_above_one(tmp_path, monkeypatch):
    rate = metrics.GemmRate(2.0, "cpu x, float32", tmp_path / "rates.json")
    rate.observe(5.0)
    assert rate.rate == 5.0
    rate.save()
    assert metrics.GemmRate(1.0, "cpu x, float32", tmp_path / "rates.json").rate == 5.0
    assert metrics.GemmRate(1.0, "cpu y, float32", tmp_path / "rates.json").rate == 1.0
    monkeypatch.setattr(metrics, "measure_gemm_rate", lambda *a, **k: 1.0)   # a busy start-up
    monkeypatch.setenv("REFGPT_CACHE", str(tmp_path))
    from refgpt.config import ModelConfig, TrainConfig
    from refgpt.engine import Trainer
    t = Trainer(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                            vocab_size=50),
                TrainConfig(micro_batch_size=2, global_batch_size=2, train_iters=3,
                            synthetic_data=True, eval_iters=0, backend="numpy"), log=lambda *_: None)
    mfus = [r["mfu"] for r in t.run()]
    assert max(mfus) <= 1.0 and mfus[0] == pytest.approx(1.0)


def events(folder, pattern) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files: {tag: [(step, value), ...]} (TFRecord frames:
    length, its CRC, the event, its CRC)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(folder.glob(pattern)):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_has_megatrons_scalars(run):
    got = events(run / "tb", "events.out.tfevents.*.from0")        # the first run's file
    for tag in ("lm-loss", "learning-rate", "grad-norm", "iteration-time", "tokens-per-second",
                "mfu", "memory/params-mib", "lm-loss-validation", "forward-time"):
        assert tag in got, (tag, sorted(got))
    assert [step for step, _ in got["lm-loss"]] == [1, 2, 3, 4]
    assert [v for _, v in got["learning-rate"]][:2] == pytest.approx([0.0, 1e-3 / 20])


def test_dumps_of_different_batches_say_why():
    a = {"input_ids": np.zeros((2, 8), np.int64), "loss": np.array(1.0)}
    b = {"input_ids": np.zeros((2, 16), np.int64), "loss": np.array(1.0)}
    rows = dump.compare(a, b, 1e-10)
    text = dump.format_table(rows, 1e-10)
    assert "first divergence: input_ids: (2, 8) here, (2, 16) in the reference" in text
    assert "nan" not in text and "inf" not in text and text.endswith("FAIL (tolerance 1e-10)")


def test_offloaded_moments_are_said_to_stay(tmp_path):
    from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
    from refgpt.engine import Trainer
    said = []
    Trainer(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                        vocab_size=50),
            TrainConfig(micro_batch_size=2, global_batch_size=2, synthetic_data=True,
                        backend="numpy"),
            ParallelConfig(zero_stage=1, offload_optimizer=str(tmp_path / "moments")),
            log=said.append)
    assert any("they stay after the run" in line and str(tmp_path / "moments") in line
               for line in said)
