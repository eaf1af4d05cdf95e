"""--exit-signal-handler: SIGTERM (or SIGINT) during training finishes the step, saves and
exits 0 on every rank with one line and no traceback; the run resumed from that checkpoint
continues as the run that was never stopped (float64, losses equal)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

TINY = ["--synthetic-data", "--num-layers", "1", "--hidden-size", "16",
        "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0",
        "--no-progress", "--dtype", "float64", "--log-interval", "1", "--timing-log-level", "0"]


def losses(log):
    return {r["iter"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


@pytest.mark.parametrize("sig, ranks", [(signal.SIGTERM, 1), (signal.SIGINT, 1),
                                        (signal.SIGTERM, 2)])
def test_a_signal_saves_and_the_resumed_run_continues_exactly(tmp_path, sig, ranks):
    if ranks > 1 and shutil.which("mpiexec") is None:
        pytest.fail("mpiexec not found: install the project's dev extra (the mpich wheel)")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    launcher = ["mpiexec", "-n", str(ranks)] if ranks > 1 else []
    train = [*launcher, sys.executable, "-m", "refgpt.train", *TINY]
    straight = tmp_path / "straight.jsonl"
    subprocess.run([*train, "--train-iters", "30", "--log-jsonl", str(straight)], env=env,
                   check=True, capture_output=True, timeout=300)
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    run = subprocess.Popen([*train, "--train-iters", "100000", "--save", str(ckpt),
                            "--exit-signal-handler", "--log-jsonl", str(log)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:                                  # training has started
        if "iteration        3/" in line:
            break
    run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    stopped = int((ckpt / "latest").read_text().strip()[len("iter_"):])
    assert f"exiting at iteration {stopped} on {sig.name}, checkpoint saved" in out
    assert 3 <= stopped < 30
    resumed = tmp_path / "resumed.jsonl"
    subprocess.run([*train, "--train-iters", "30", "--load", str(ckpt), "--log-jsonl",
                    str(resumed)], env=env, check=True, capture_output=True, timeout=300)
    want, got = losses(straight), {**losses(log), **losses(resumed)}
    assert [got[i] for i in range(1, 31)] == [want[i] for i in range(1, 31)]

