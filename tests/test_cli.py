"""The command-line entry points: smoke runs, and one clear line for every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from refgpt import generate, prepare, train

TINY = ["--synthetic-data", "--num-layers", "1", "--hidden-size", "16",
        "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
        "--no-progress"]


def cli(*args, launcher=()):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([*launcher, sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = cli("-m", "refgpt.train", *TINY, "--train-iters", "4", "--save", str(out / "ckpt"),
            "--log-jsonl", str(out / "log.jsonl"), "--log-interval", "2")
    assert r.returncode == 0, r.stderr
    assert "iteration        4/       4" in r.stdout and "lm loss" in r.stdout
    return out


def test_train_writes_jsonl_and_checkpoint(checkpoint):
    rows = [json.loads(line) for line in (checkpoint / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    for key in ("iter", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tflops",
                "model_tflops", "mfu"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    assert "val_loss" in rows[-1]
    assert (checkpoint / "ckpt" / "latest").read_text().strip() == "iter_0000004"
    assert not any(p.name.startswith(".") for p in (checkpoint / "ckpt").iterdir())


def test_generate_from_checkpoint(checkpoint):
    r = cli("-m", "refgpt.generate", "--load", str(checkpoint / "ckpt"), "--prompt-ids", "1,2",
            "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.strip().split(",")]
    assert ids[:2] == [1, 2] and len(ids) == 7 and all(0 <= t < 50 for t in ids)


def test_help_documents_flags():
    r = cli("-m", "refgpt.train", "--help")
    assert r.returncode == 0
    for flag in ("--num-layers", "--global-batch-size", "--lr-decay-style", "--clip-grad",
                 "--log-jsonl", "--config", "--synthetic-data", "--save-interval"):
        assert flag in r.stdout


def test_mpiexec_runs_and_bad_layouts_exit_2_with_one_message():
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install the mpich extra"
    ok = cli("-m", "refgpt.train", *TINY, "--train-iters", "1", launcher=(mpiexec, "-n", "1"))
    assert ok.returncode == 0, ok.stderr
    ok = cli("-m", "refgpt.train", *TINY, "--train-iters", "1", launcher=(mpiexec, "-n", "2"))
    assert ok.returncode == 0 and "tp 1 x dp 2 x pp 1" in ok.stdout, ok.stderr
    ok = cli("-m", "refgpt.train", *TINY, "--train-iters", "1", "--zero-stage", "1",
             "--dp-shared-memory", launcher=(mpiexec, "-n", "2"))
    assert ok.returncode == 0 and "ZeRO-1 (node-shared parameters)" in ok.stdout, ok.stderr
    for extra, message in ((["--global-batch-size", "6"], "not divisible by --micro-batch-size 2 x "
                                                          "data-parallel size 2"),
                           (["--pp", "3"], "world size 2 is not divisible by --tp 1 x --pp 3"),
                           (["--pp", "2"], "--num-layers 1 is not divisible by the pipeline size 2"),
                           (["--tp", "2", "--num-attention-heads", "1"],
                            "--num-attention-heads 1 is not divisible by the tensor-parallel size 2"),
                           (["--load", "/nonexistent"], "no checkpoint at /nonexistent")):
        bad = cli("-m", "refgpt.train", *TINY, *extra, launcher=(mpiexec, "-n", "2"))
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.count("error: ") == 1 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def one_line_error(capsys, main, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("argv, match", [
    (["--hidden-size", "30", "--num-attention-heads", "4"], "not divisible by --num-attention-heads"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], "not divisible by --micro-batch-size"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--bf16", "--fp16"], "give one of --bf16, --fp16 and --dtype"),
    (["--grad-reduce-in-bf16"], "reduces the gradients of --bf16 training"),
    (["--tf32"], "--tf32 runs the float32 GEMMs of a GPU"),
    (["--tf32", "--backend", "cupy", "--bf16"], "needs --backend cupy and float32"),
    (["--loss-scale", "128"], "--loss-scale scales 16-bit training"),
    (["--fp16", "--hysteresis", "0"], "--hysteresis must be >= 1"),
    (["--lr-decay-style", "step"], "--lr-decay-style must be one of"),
    (["--tp", "2"], "the world size 1 is not divisible by --tp 2 x --pp 1"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--dp-shared-memory"], "--dp-shared-memory is a way to run ZeRO-1"),
    (["--seq-length", "16", "--max-position-embeddings", "8"], "smaller than --seq-length"),
])
def test_bad_settings(capsys, argv, match):
    one_line_error(capsys, train.main, TINY + argv, match)


def test_missing_inputs(capsys, tmp_path):
    one_line_error(capsys, train.main, ["--data-path", str(tmp_path / "nope")], "no prepared data")
    one_line_error(capsys, train.main, [*TINY, "--load", str(tmp_path / "nope")], "no checkpoint at")
    one_line_error(capsys, generate.main, ["--load", str(tmp_path), "--prompt-ids", "1"],
                   "no checkpoint at")
    one_line_error(capsys, prepare.main, ["-o", str(tmp_path / "o"), str(tmp_path / "missing.txt")],
                   "input not found")
    one_line_error(capsys, train.main, ["--config", str(tmp_path / "none.toml")], "config file not found")


def test_corrupt_files(capsys, tmp_path, checkpoint):
    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", bad)
    (bad / "iter_0000004" / "shard_00000.safetensors").write_bytes(b"garbage")
    one_line_error(capsys, train.main, [*TINY, "--load", str(bad)], "corrupt checkpoint")
    (bad / "latest").write_text("iter_0000099\n")
    one_line_error(capsys, generate.main, ["--load", str(bad), "--prompt-ids", "1"], "missing or incomplete")
    toml = tmp_path / "c.toml"
    toml.write_text("num-layers = [")
    one_line_error(capsys, train.main, ["--config", str(toml)], "c.toml")
    toml.write_text("num_layerz = 2\n")
    one_line_error(capsys, train.main, ["--config", str(toml)], "unknown settings: ['num_layerz']")


def test_config_file_with_flag_override(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('num-layers = 3\nhidden_size = 24\nnum-attention-heads = 3\nlr = 0.5\n'
                    'synthetic-data = true\n')
    mcfg, tcfg, _, given, _ = train.parse_config(["--config", str(toml), "--lr", "0.25"])
    assert (mcfg.num_layers, mcfg.hidden_size, mcfg.num_attention_heads) == (3, 24, 3)
    assert tcfg.lr == 0.25 and tcfg.synthetic_data and "lr" in given


def test_default_corpus_is_prepared_on_first_use_and_cached(monkeypatch, tmp_path, capsys):
    """`python -m refgpt.train` with no data flag: the stdlib corpus (here cut to 30 files)."""
    from refgpt.data import corpus, prepared
    files = corpus.default_corpus_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    monkeypatch.setattr(prepared, "default_corpus_files", lambda: files[:30])
    monkeypatch.setenv("REFGPT_CACHE", str(tmp_path))
    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "16", "--vocab-size", "512", "--train-iters", "2", "--eval-iters", "1",
            "--no-progress"]
    assert train.main(argv) == 0
    assert "preparing the default corpus" in capsys.readouterr().out
    assert train.main(argv) == 0
    assert "preparing" not in capsys.readouterr().out        # cached the second time
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gemm-rates.json", "stdlib-py%d%d-v512" % sys.version_info[:2]]   # and MFU's calibration


def test_validate_and_convert_bad_inputs(capsys, tmp_path):
    from refgpt import convert, validate
    one_line_error(capsys, validate.main, ["--dump", str(tmp_path / "d.st")], "--dump needs --load")
    one_line_error(capsys, validate.main, ["--compare", str(tmp_path / "none.st")], "dump not found")
    (tmp_path / "junk.st").write_bytes(b"junk")
    one_line_error(capsys, validate.main, ["--compare", str(tmp_path / "junk.st")], "corrupt dump")
    one_line_error(capsys, validate.main, ["--against", "hf", "--dropout", "0.1"], "--dropout 0")
    one_line_error(capsys, convert.main, ["--from", "hf", str(tmp_path), str(tmp_path / "c")],
                   "needs config.json and model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    one_line_error(capsys, convert.main, ["--from", "hf", str(tmp_path), str(tmp_path / "c")],
                   "not a GPT-2 config")
