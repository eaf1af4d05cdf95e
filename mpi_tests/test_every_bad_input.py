"""The bad-input table of tests/test_bad_inputs.py under MPI: every case, at this world size,
exits with status 2 on every rank, rank 0 prints exactly one `error:` line (the others
nothing) and nothing is written. refgpt.train's main runs in this job, case after case (its
set-up errors are agreed on by every rank, so none of them aborts the job)."""

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_bad_inputs import FILES, FLAGS, TINY  # noqa: E402

from refgpt import train  # noqa: E402

# the size of the world decides these: at 2 or 4 ranks --tp 2 is a layout, not an error
LAYOUT = ("--tensor-model-parallel-size", "--expert-model-parallel-size",
          "--context-parallel-size")
CASES = ([({}, flags, match) for flags, match in FLAGS if not set(flags) & set(LAYOUT)]
         + [(files, flags, match) for files, flags, match in FILES])


def run_case(comm, files, flags, match):
    """(rank 0's stderr, exit status, folder unchanged) of one case, run in a fresh folder."""
    folder = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    if comm.rank == 0:
        for name, text in files.items():
            (Path(folder) / name).write_text(text)
    comm.Barrier()
    before, here = sorted(os.listdir(folder)), os.getcwd()
    batch = ["--global-batch-size", str(2 * comm.size)]       # TINY's, fitted to the world
    argv = [*TINY, *batch, *flags] + ([] if "--save" in flags else ["--save", "ckpt"])
    streams, err, status = (sys.stdout, sys.stderr), io.StringIO(), None
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)
    except SystemExit as e:
        status = e.code
    finally:
        sys.stdout, sys.stderr = streams
        os.chdir(here)
    comm.Barrier()
    return err.getvalue(), status, sorted(os.listdir(folder)) == before


@pytest.mark.mpi(min_size=2)
def test_every_bad_input_is_one_line_and_status_2_on_every_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures = []
    for files, flags, match in CASES:
        text, status, unchanged = run_case(comm, files, flags, match)
        one_line = (text.startswith("error: ") and text.count("\n") == 1 and match in text
                    if comm.rank == 0 else text == "")
        if not (status == 2 and one_line and unchanged):
            failures.append((flags, status, text[:200], unchanged))
    everyone = comm.allgather(failures)
    assert not any(everyone), everyone
    assert len(CASES) >= 60
