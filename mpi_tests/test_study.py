"""The scaling study launched under mpiexec: configurations of 1, 2 (and 4) ranks run one
after another on sub-communicators of this job; every row is complete and every layout's
per-iteration losses equal the single process's in float64."""

import csv
import tempfile

import pytest
from mpi4py import MPI

from refgpt.study.report import COLUMNS
from refgpt.study.scaling import main

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "64", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--dtype", "float64", "--warmup-iters", "1", "--iters", "2"]


@pytest.mark.mpi(min_size=2)
def test_study_inside_one_job():
    world = MPI.COMM_WORLD
    ranks = [r for r in (1, 2, 4) if r <= world.size]
    folder = world.bcast(tempfile.mkdtemp() if world.rank == 0 else None)
    status = main([*TINY, "--ranks", *map(str, ranks), "--layouts", "dp", "tp2", "pp2",
                   "dp-shm", "--out", folder])
    rows = world.bcast(list(csv.DictReader(open(f"{folder}/scaling.csv")))
                       if world.rank == 0 else None)
    assert status == 0
    expected = [(1, "dp")] + [(r, lay) for r in ranks[1:] for lay in ("dp", "tp2", "pp2", "dp-shm")]
    assert [(int(r["ranks"]), r["layout"]) for r in rows] == expected
    assert all(tuple(r) == COLUMNS and all(v != "" for v in r.values()) for r in rows)
    assert all(r["losses_match"] == "yes" for r in rows)
    assert max(float(r["max_loss_rel_diff"]) for r in rows) < 1e-12
    dp = {int(r["ranks"]): r for r in rows if r["layout"] == "dp"}
    assert [int(dp[r]["accumulation"]) for r in ranks] == [8 // r for r in ranks]


@pytest.mark.mpi(min_size=2)
def test_dry_run_measures_the_all_reduce_rate_and_predicts(capsys):
    world = MPI.COMM_WORLD
    folder = world.bcast(tempfile.mkdtemp() if world.rank == 0 else None)
    status = main([*TINY, "--ranks", "1", str(world.size), "--layouts", "dp", "tp2",
                   "--out", folder, "--dry-run"])
    out = capsys.readouterr().out
    ok = status == 0
    if world.rank == 0:
        share = [line.split()[-3] for line in out.splitlines()
                 if line.split()[:2] == [str(world.size), "dp"]]
        ok = ok and "GB/s moved per rank" in out and share and share[0].endswith("%") \
            and float(share[0][:-1]) > 0
    assert all(world.allgather(bool(ok))), out
