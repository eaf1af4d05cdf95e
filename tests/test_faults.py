"""No hangs: a failure on one rank, in any phase, ends a 4-rank job with a non-zero status.

These launch their own `mpiexec -n 4` jobs, so they run in the single-process session
(nesting mpiexec inside an MPI job is not portable)."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from refgpt.engine.faults import PHASES, Faults, parse

JOB = ["-m", "refgpt.train", "--synthetic-data", "--num-layers", "1", "--hidden-size", "16",
       "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
       "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "3",
       "--eval-iters", "0", "--no-progress"]


@pytest.mark.parametrize("phase", PHASES)
def test_fault_on_one_rank_ends_the_job(phase, tmp_path):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install the mpich extra"
    env = dict(os.environ, REFGPT_FAULT=f"rank=2,phase={phase}", PYTHONPATH=os.getcwd())
    t0 = time.monotonic()
    r = subprocess.run([mpiexec, "-n", "4", sys.executable, *JOB, "--save", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end"
    assert r.stderr.count(f"rank 2: InjectedFault: injected fault at phase '{phase}'") == 1, r.stderr
    assert "Traceback" in r.stderr


def test_fault_spec():
    assert parse("rank=3,phase=optimizer") == (3, "optimizer", "raise")
    assert parse("rank=1,phase=backward,action=hang") == (1, "backward", "hang")
    with pytest.raises(ValueError, match="action must be raise or hang"):
        parse("rank=1,phase=backward,action=sulk")
    with pytest.raises(ValueError, match="phase must be one of"):
        parse("rank=0,phase=lunch")
    with pytest.raises(ValueError, match="must look like"):
        parse("garbage")


def test_no_fault_without_the_variable(monkeypatch):
    monkeypatch.delenv("REFGPT_FAULT", raising=False)
    Faults(0)("forward")
    monkeypatch.setenv("REFGPT_FAULT", "rank=1,phase=forward")
    Faults(0)("forward")
    Faults(1)("backward")


@pytest.mark.parametrize("phase, waits_in", [("backward", "grads-all-reduce"),
                                             ("optimizer", "optimizer")])
def test_a_rank_that_stops_responding_ends_the_job_within_the_timeout(phase, waits_in,
                                                                       tmp_path):
    """Rank 2 stops for good at a phase (as a SIGSTOP'd or hung rank does); the others wait
    for it in a collective, and the watchdog (--distributed-timeout-minutes 0.1: 6 s) ends
    the job with one line naming rank 2."""
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install the mpich extra"
    env = dict(os.environ, REFGPT_FAULT=f"rank=2,phase={phase},action=hang",
               PYTHONPATH=os.getcwd())
    t0 = time.monotonic()
    r = subprocess.run([mpiexec, "-n", "4", sys.executable, *JOB,
                        "--distributed-timeout-minutes", "0.1"],
                       env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 40, (elapsed, r.stderr)
    assert r.stderr.count("error: no progress for 0.1 min") == 1, r.stderr
    assert "rank 2 did not arrive (--distributed-timeout-minutes)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
