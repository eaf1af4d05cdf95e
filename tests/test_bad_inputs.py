"""Every bad input to refgpt.train is one `error:` line and exit status 2, before any work,
and nothing is written: a table of cases, each run in-process in a fresh folder (and a few of
them under mpiexec, where every rank must agree)."""

import os
import shutil
import subprocess
import sys

import pytest

from refgpt import train

TINY = ["--synthetic-data", "--num-layers", "1", "--hidden-size", "16",
        "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0",
        "--train-iters", "2", "--no-progress"]

FLAGS = [  # (extra flags, what the line says)
    *[([f"{flag}={value}"], "must be a finite number")
      for flag in ("--lr", "--min-lr", "--lr-warmup-init", "--weight-decay", "--clip-grad",
                   "--adam-beta1", "--adam-beta2", "--adam-eps", "--loss-scale",
                   "--initial-loss-scale", "--min-loss-scale")
      for value in ("nan", "inf")],
    (["--dropout", "nan"], "--dropout must be in [0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "not divisible by --num-attention-heads"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "not divisible by --micro-batch-size"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--train-iters", "-1"], "--train-iters must be >= 0"),
    (["--save-interval", "-1"], "--save-interval must be >= 0"),
    (["--save-retention", "-2"], "--save-retention must be >= 0"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--backend", "tpu"], "--backend must be one of"),
    (["--bf16", "--fp16"], "give one of --bf16, --fp16 and --dtype"),
    (["--tf32"], "--tf32"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--dp-shared-memory"], "--dp-shared-memory is a way to run ZeRO-1"),
    (["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3"),
    (["--pipeline-schedule", "fifo"], "--pipeline-schedule must be one of"),
    (["--tensor-parallel-mode", "3d"], "--tensor-parallel-mode must be one of"),
    (["--num-virtual-stages", "0"], "--num-virtual-stages must be >= 1"),
    (["--timing-log-level", "3"], "--timing-log-level must be 0, 1 or 2"),
    (["--recompute-granularity", "partial"], "--recompute-granularity must be full or selective"),
    (["--recompute-method", "all"], "--recompute-method must be uniform or block"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "0"],
     "--recompute-num-layers must be >= 1"),
    (["--recompute-num-layers-per-stage", "1,x"], "--recompute-num-layers-per-stage must be"),
    (["--recompute-num-layers-per-stage", "1"], "goes with --recompute-granularity full"),
    (["--tensor-model-parallel-size", "2"], "not divisible by --tp 2"),
    (["--pipeline-model-parallel-size", "3"], "not divisible by --tp 1 x --pp 3"),
    (["--lr-decay-style", "zigzag"], "--lr-decay-style must be one of"),
    (["--gelu", "relu"], "gelu"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk must be between 1"),
    (["--num-experts", "4", "--moe-token-drop-policy", "random"],
     "--moe-token-drop-policy must be probs or position"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "-1"],
     "--moe-expert-capacity-factor must be >= 0"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2"],
     "--expert-model-parallel-size 2 does not divide the data-parallel size 1"),
    (["--num-experts", "4", "--ep", "0"], "--expert-model-parallel-size must be >= 1"),
    (["--context-parallel-size", "2"],
     "--context-parallel-size 2 does not divide the ranks left for data parallelism (1"),
    (["--cp", "0"], "--context-parallel-size must be >= 1"),
    (["--cp-comm-type", "ring"], "--cp-comm-type must be one of p2p, a2a"),
    (["--optimizer", "sgd"], "--optimizer must be one of adam, onebit-adam, lamb"),
    (["--dp-comm-thread", "--zero-stage", "1"], "--dp-comm-thread runs the data-parallel"),
    (["--optimizer", "onebit-adam", "--onebit-warmup-iters", "0"],
     "--onebit-warmup-iters must be >= 1"),
    (["--optimizer", "onebit-adam", "--zero-stage", "1"], "--optimizer onebit-adam compresses"),
    (["--optimizer", "lamb", "--num-experts", "2"], "--optimizer lamb sums its per-tensor norms"),
    (["--dp-allreduce-algorithm", "butterfly"],
     "--dp-allreduce-algorithm must be one of mpi, ring, tree, hierarchical"),
    (["--dp-allreduce-algorithm", "tree", "--zero-stage", "1"],
     "ZeRO reduce-scatters them with MPI's collectives"),
    (["--ddp-bucket-size", "-1"], "--ddp-bucket-size and --threads-per-rank must be >= 0"),
    (["--load", "nowhere"], "no checkpoint at nowhere"),
    (["--data-path", "nowhere"], "give either --data-path or --synthetic-data, not both"),
    (["--config", "nowhere.toml"], "config file not found"),
    (["--hidden-size", "4000000"], "this model needs an estimated"),
]

FILES = [  # (files to make first, extra flags, what the line says)
    ({"afile": ""}, ["--save", "afile"], "exists and is not a folder"),
    ({"afile": ""}, ["--save", "afile/ckpt"], "is not a folder"),
    ({"c.toml": "num-layers = ["}, ["--config", "c.toml"], "c.toml"),
    ({"c.toml": "num_layerz = 2\n"}, ["--config", "c.toml"], "unknown settings: ['num_layerz']"),
    ({"c.toml": 'hidden-size = "thirty-two"\n'}, ["--config", "c.toml"],
     "hidden-size must be an integer, got 'thirty-two'"),
    ({"c.toml": "num-layers = 2.0\n"}, ["--config", "c.toml"], "num-layers must be an integer"),
    ({"c.toml": "num-layers = true\n"}, ["--config", "c.toml"], "num-layers must be an integer"),
    ({"c.toml": 'lr = "1e-3"\n'}, ["--config", "c.toml"], "lr must be a number, got '1e-3'"),
    ({"c.toml": 'synthetic-data = "no"\n'}, ["--config", "c.toml"],
     "synthetic-data must be true or false"),
    ({"c.toml": "lr = nan\n"}, ["--config", "c.toml"], "--lr must be a finite number"),
    ({"c.toml": 'backend = 3\n'}, ["--config", "c.toml"], "backend must be a string"),
    ({"latest": "../x\n"}, ["--load", "."], "not an iteration folder"),
    ({"afile": ""}, ["--zero-stage", "1", "--offload-optimizer", "afile"],
     "--offload-optimizer afile: exists and is not a folder"),
]


def one_line_error(capsys, argv, match, folder):
    before = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert sorted(os.listdir(folder)) == before                     # nothing written


@pytest.mark.parametrize("flags, match", FLAGS, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_bad_flags(flags, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, [*TINY, *flags, "--save", "ckpt"] if "--save" not in flags
                   else [*TINY, *flags], match, tmp_path)


@pytest.mark.parametrize("files, flags, match", FILES)
def test_bad_files(files, flags, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    one_line_error(capsys, [*TINY, *flags], match, tmp_path)


def test_missing_optional_dependencies_are_named(capsys, tmp_path, monkeypatch):
    """--backend cupy without CuPy, validate --against hf without torch: one line each."""
    import importlib.util

    from refgpt import validate
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("cupy", "torch") else real(name, *a))
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, [*TINY, "--backend", "cupy"], "--backend cupy needs CuPy", tmp_path)
    with pytest.raises(SystemExit) as exc:
        validate.main(["--against", "hf", "--num-layers", "1", "--hidden-size", "16",
                       "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--against hf needs torch" in err, err


def test_prepare_refuses_a_file_as_output_and_a_binary_input(capsys, tmp_path, monkeypatch):
    from refgpt import prepare
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "blob.txt").write_bytes(b"ELF\0\1\2")
    (tmp_path / "text.txt").write_text("some text\n")
    for argv, match in ((["--output", "afile", "text.txt"], "--output afile: exists and is not"),
                        (["--output", "out", "blob.txt"], "blob.txt: a binary file")):
        with pytest.raises(SystemExit) as exc:
            prepare.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and match in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile", "blob.txt", "text.txt"]


@pytest.mark.parametrize("flags, match", [
    (["--lr=nan"], "must be a finite number"),
    (["--save", "afile"], "exists and is not a folder"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], "not divisible"),
    (["--hidden-size", "4000000"], "this model needs an estimated"),
    (["--context-parallel-size", "2", "--seq-length", "6"],
     "--seq-length 6 is not divisible by 2 x --context-parallel-size = 4"),
    (["--context-parallel-size", "2", "--cp-comm-type", "a2a", "--num-attention-heads", "1"],
     "--cp-comm-type a2a splits each rank's 1 attention heads over --context-parallel-size 2"),
])
def test_bad_inputs_under_mpiexec(flags, match, tmp_path):
    if shutil.which("mpiexec") is None:
        pytest.fail("mpiexec not found: install the project's dev extra (the mpich wheel)")
    (tmp_path / "afile").write_text("")
    r = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "refgpt.train", *TINY,
                        *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("error: ") == 1 and match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_token_ids_beyond_the_vocabulary_are_found_at_load(capsys, tmp_path, monkeypatch):
    import numpy as np

    from refgpt.data.prepared import prepare
    src = tmp_path / "src.py"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    prepare([str(src)], tmp_path / "data", vocab_size=300, val_fraction=0.1,
            log=lambda *_: None)
    tokens = np.memmap(tmp_path / "data" / "train.bin", dtype=np.uint16, mode="r+")
    tokens[-5] = 60000                                      # past the end of the vocabulary
    tokens.flush()
    del tokens
    monkeypatch.chdir(tmp_path)
    argv = [a for a in TINY if a not in ("--synthetic-data", "--vocab-size", "50")]
    one_line_error(capsys, [*argv, "--data-path", "data"], "token id 60000 is outside", tmp_path)


def test_a_full_disk_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    import errno

    import refgpt.engine.checkpoints as ck
    from refgpt.checkpoint import iterations, load_checkpoint
    calls, write = [], ck.write_file

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:                                  # the second save's shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)
    monkeypatch.setattr(ck, "write_file", fills_up)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train.main([*TINY, "--train-iters", "3", "--save", "ckpt", "--save-interval", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "saving iteration 2 to ckpt failed (No space left on device)" in err, err
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_0000001", "latest"]
    assert [p.name for p in iterations(tmp_path / "ckpt")] == ["iter_0000001"]
    assert load_checkpoint(tmp_path / "ckpt").state["iteration"] == 1


def edited(path, change):
    import json
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


STATE_EDITS = [  # (change to state.json, what the line says)
    (lambda s: s.pop("consumed_samples"), "'consumed_samples' is missing"),
    (lambda s: s.update(iteration="12"), "'iteration' must be int, found '12'"),
    (lambda s: s.update(model=[]), "'model' must be dict"),
    (lambda s: s["model"].update(hidden_size="thirty-two"), "hidden-size must be an integer"),
    (lambda s: s["train"].update(lr="fast"), "lr must be a number"),
    (lambda s: s["pieces"][0].update(start=None), "pieces: 'start' must be int"),
    (lambda s: s["pieces"][0].update(extra=1), "unexpected keys ['extra']"),
    (lambda s: s["pieces"][0].update(file="../../etc/passwd"), "is not one of its files"),
    (lambda s: s["files"].update({"x": {"bytes": "1"}}), "files: x: 'bytes' must be int"),
]


@pytest.mark.parametrize("change, match", STATE_EDITS)
def test_a_damaged_state_json_is_one_error(change, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main([*TINY, "--save", "ck"]) == 0
    capsys.readouterr()
    edited(tmp_path / "ck" / "iter_0000002" / "state.json", change)
    one_line_error(capsys, [*TINY, "--load", "ck"], match, tmp_path)


META_EDITS = [
    (lambda m: m.pop("vocab_size"), "'vocab_size' is missing"),
    (lambda m: m.update(dtype="int7"), "'dtype' 'int7' is not a NumPy type"),
    (lambda m: m.update(splits=[1]), "'splits' must be dict"),
    (lambda m: m["splits"]["train"].update(tokens="many"), "'tokens' must be int"),
]


@pytest.mark.parametrize("change, match", META_EDITS)
def test_a_damaged_meta_json_is_one_error(change, match, capsys, tmp_path, monkeypatch):
    from refgpt.data.prepared import prepare
    src = tmp_path / "src.py"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    prepare([str(src)], tmp_path / "data", vocab_size=300, val_fraction=0.1, log=lambda *_: None)
    edited(tmp_path / "data" / "meta.json", change)
    monkeypatch.chdir(tmp_path)
    argv = [a for a in TINY if a not in ("--synthetic-data", "--vocab-size", "50")]
    one_line_error(capsys, [*argv, "--data-path", "data"], match, tmp_path)


@pytest.mark.parametrize("argv, match", [
    (["--num-layer", "3"], "unrecognized arguments: --num-layer 3 (did you mean --num-layers?)"),
    (["--num-layers", "x"], "argument --num-layers: invalid int value: 'x'"),
    (["--synthetic-dat"], "(did you mean --synthetic-data?)"),
])
def test_a_usage_error_is_one_line(argv, match, capsys, tmp_path, monkeypatch):
    """argparse's errors too: one line (not the sixty of the usage), status 2, flags not
    abbreviated (a typo is refused, not taken for the flag it begins)."""
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, argv, match, tmp_path)
