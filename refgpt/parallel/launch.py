"""How many processes were launched, read from the launcher's environment without MPI.

Single-process runs must not need a working MPI, so the world size is first read from the
variables that launchers set (MPICH/Hydra, Intel MPI and Slurm's PMI: PMI_SIZE; Open MPI and
Fujitsu MPI: OMPI_COMM_WORLD_SIZE; MVAPICH2: MV2_COMM_WORLD_SIZE), and mpi4py is imported only
when there is more than one process.

`abort_job` ends a whole job from one rank without losing that rank's last words.
"""

from __future__ import annotations

import os
import sys
import time

SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """Number of processes the launcher started (1 when run without a launcher)."""
    for name in SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


ABORT_GRACE_S = 1.0


def abort_job(comm, message: str) -> None:
    """Print `message` on this rank's stderr, then MPI_Abort the job.

    MPI_Abort kills every process at once, and a launcher may drop output still in its pipes,
    so the message is flushed and the launcher given ABORT_GRACE_S to forward it first."""
    sys.__stderr__.write(message if message.endswith("\n") else message + "\n")
    sys.__stderr__.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(1)
