"""Checkpoints that survive: checksums and finite values checked on load, a re-saved
iteration never lost (the good copy is set aside until its successor is in place, and loaded
if a crash falls between), stale temporaries cleaned, retention, and a `latest` that cannot
point outside its folder."""

import json
import shutil

import numpy as np
import pytest

from refgpt import train
from refgpt.checkpoint import (clean_stale, iterations, load_checkpoint, resolve,
                               save_checkpoint)
from refgpt.cli import CheckpointError

TINY = ["--synthetic-data", "--num-layers", "1", "--hidden-size", "16",
        "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0",
        "--no-progress"]


def save(root, iteration, value=1.0, **options):
    params = {"w": np.full((3, 4), value, np.float32)}
    moments = {"exp_avg": {"w": np.zeros((3, 4), np.float32)},
               "exp_avg_sq": {"w": np.ones((3, 4), np.float32)}}
    return save_checkpoint(root, iteration, params, moments, iteration, {"note": value},
                           **options)


def test_a_flipped_byte_is_found(tmp_path):
    folder = save(tmp_path, 5)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x40                                        # inside w's values
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the size and SHA-256"):
        load_checkpoint(tmp_path)
    data[-3] ^= 0x40                                        # restored: the model is good
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert load_checkpoint(tmp_path).params["w"][0, 0] == 1.0
    (folder / "optimizer.safetensors").write_bytes(b"")     # truncated
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match"):
        load_checkpoint(tmp_path)


def test_non_finite_values_are_refused(tmp_path):
    save(tmp_path, 1, value=np.nan)
    with pytest.raises(CheckpointError, match="tensor w holds non-finite values"):
        load_checkpoint(tmp_path)


def test_resaving_an_iteration_keeps_the_good_copy_until_the_new_one_is_in_place(
        tmp_path, monkeypatch):
    save(tmp_path, 5, value=1.0)
    import refgpt.checkpoint as ck

    def crash(*_, **__):
        raise KeyboardInterrupt                             # killed in the middle of the save
    monkeypatch.setattr(ck, "file_record", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 5, value=2.0)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).params["w"][0, 0] == 1.0   # latest still loads
    assert [p.name for p in clean_stale(tmp_path)] and not clean_stale(tmp_path)
    # a crash between moving the old copy aside and renaming the new one into place
    final = tmp_path / "iter_0000005"
    final.rename(tmp_path / ".iter_0000005.replaced999")
    assert resolve(tmp_path).name == ".iter_0000005.replaced999"
    assert load_checkpoint(tmp_path).params["w"][0, 0] == 1.0
    assert clean_stale(tmp_path) == []                      # the only copy is kept
    save(tmp_path, 5, value=3.0)
    assert [p.name for p in clean_stale(tmp_path)] == [".iter_0000005.replaced999"]
    assert load_checkpoint(tmp_path).params["w"][0, 0] == 3.0


def test_retention_keeps_the_newest(tmp_path):
    for i in range(1, 5):
        save(tmp_path, i, retention=2)
    assert [p.name for p in iterations(tmp_path)] == ["iter_0000003", "iter_0000004"]


def test_latest_cannot_leave_its_folder(tmp_path):
    save(tmp_path / "elsewhere", 1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("../elsewhere/iter_0000001\n")
    with pytest.raises(CheckpointError, match="not an iteration folder"):
        resolve(tmp_path / "ckpt")


def test_the_recorded_files_are_in_state_json(tmp_path):
    folder = save(tmp_path, 2)
    files = json.loads((folder / "state.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "optimizer.safetensors"]
    assert files["model.safetensors"]["bytes"] == (folder / "model.safetensors").stat().st_size


def one_line_error(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_training_refuses_a_corrupt_checkpoint_and_resumes_from_a_good_one(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert train.main([*TINY, "--train-iters", "2", "--save", str(ckpt), "--save-interval", "1",
                       "--save-retention", "1"]) == 0
    assert [p.name for p in iterations(ckpt)] == ["iter_0000002"]
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    model = bad / "iter_0000002" / "shard_00000.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    one_line_error(capsys, [*TINY, "--train-iters", "3", "--load", str(bad)],
                   "does not match the size and SHA-256")
    capsys.readouterr()
    assert train.main([*TINY, "--train-iters", "3", "--load", str(ckpt)]) == 0


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--adam-eps", "--weight-decay",
                                  "--clip-grad", "--adam-beta1", "--lr-warmup-init"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_numbers_must_be_finite(capsys, flag, value):
    one_line_error(capsys, [*TINY, "--train-iters", "1", f"{flag}={value}"],
                   "must be a finite number")


def test_async_save_writes_what_a_blocking_save_writes(tmp_path):
    """--async-save: every interval's checkpoint equal, bit for bit, to the blocking save's."""
    for name, extra in (("sync", []), ("async", ["--async-save"])):
        assert train.main([*TINY, "--train-iters", "4", "--save", str(tmp_path / name),
                           "--save-interval", "1", *extra]) == 0
    for it in (1, 2, 3, 4):
        a, b = (load_checkpoint(tmp_path / name / f"iter_{it:07d}") for name in ("sync", "async"))
        for x, y in ((a.params, b.params), (a.optimizer, b.optimizer)):
            assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
        assert a.state["files"] == b.state["files"]
