"""No hangs: a failure on one rank, in any phase, ends a 4-rank job with a non-zero status.

These launch their own `mpiexec -n 4` jobs, so they run in the single-process session
(nesting mpiexec inside an MPI job is not portable)."""

import os
import re
import shutil
import signal
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


SAVING = ["-m", "refgpt.train", "--synthetic-data", "--num-layers", "2", "--hidden-size", "32",
          "--num-attention-heads", "2", "--seq-length", "8", "--vocab-size", "50",
          "--micro-batch-size", "1", "--global-batch-size", "2", "--eval-iters", "0",
          "--no-progress", "--log-interval", "1000", "--save-interval", "1"]


def killed_while_saving(args, delay, launch=()):
    """A run saving every iteration, killed (SIGKILL to the launcher and every rank) once it
    has saved for delay seconds."""
    proc = subprocess.Popen([*launch, sys.executable, *SAVING, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    for line in proc.stdout:                   # the first save marks that the loop runs
        if "checkpoint" in line:
            break
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


@pytest.mark.parametrize("how", ["fresh", "re-save", "async", "2 ranks, ZeRO-1"])
def test_kill_9_while_saving_always_leaves_a_loadable_latest(tmp_path, how):
    """Killed at moments spread over several saves (new iterations; iterations that exist,
    the window where the good copy is set aside; background saves), latest always loads and
    a run resumes from it."""
    from refgpt.checkpoint import clean_stale, load_checkpoint, resolve
    ck = str(tmp_path / "ck")
    if how == "re-save":                       # iterations 1-200 exist; the runs redo them
        subprocess.run([sys.executable, *SAVING, "--train-iters", "200", "--save", ck],
                       check=True, capture_output=True, timeout=300)
    for delay in (0.05, 0.23, 0.41, 0.77):
        if how == "re-save":
            args = ["--train-iters", "200", "--load", f"{ck}/iter_0000001", "--save", ck]
        else:
            args = ["--train-iters", "100000", "--save", ck] + (["--async-save"] if how == "async" else [])
        if how.startswith("2 ranks"):
            args += ["--zero-stage", "1"]
        killed_while_saving(args, delay, ("mpiexec", "-n", "2") if how.startswith("2") else ())
        folder = resolve(ck)                   # iter_0000123, or a copy set aside of it
        named = int(re.search(r"iter_(\d{7})", folder.name).group(1))
        assert load_checkpoint(ck).state["iteration"] == named
    clean_stale(ck)
    r = subprocess.run([sys.executable, *SAVING, "--train-iters", "100000", "--load", ck,
                        "--exit-interval", "1", "--save", ck], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "exiting at iteration" in r.stdout, r.stdout + r.stderr
