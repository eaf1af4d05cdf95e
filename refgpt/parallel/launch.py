"""How many processes were launched, read from the launcher's environment without MPI.

Single-process runs must not need a working MPI, so the world size is first read from the
variables that launchers set (MPICH/Hydra, Intel MPI and Slurm's PMI: PMI_SIZE; Open MPI and
Fujitsu MPI: OMPI_COMM_WORLD_SIZE; MVAPICH2: MV2_COMM_WORLD_SIZE), and mpi4py is imported only
when there is more than one process.
"""

from __future__ import annotations

import os

SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """Number of processes the launcher started (1 when run without a launcher)."""
    for name in SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1
