"""How many processes were launched, read from the launcher's environment without MPI.

Single-process runs must not need a working MPI, so the world size is first read from the
variables that launchers set (MPICH/Hydra, Intel MPI and Slurm's PMI: PMI_SIZE; Open MPI and
Fujitsu MPI: OMPI_COMM_WORLD_SIZE; MVAPICH2: MV2_COMM_WORLD_SIZE), and mpi4py is imported only
when there is more than one process.

`abort_job` ends a whole job from one rank without losing that rank's last words;
`quiet_barrier` and `on_rank0` let ranks wait for one another asleep (MPI's own waits poll
a core at 100%, which on a node of few cores takes it from the rank that works).
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


def quiet_barrier(comm, longest_s: float = 0.25) -> None:
    """A barrier whose waiting ranks sleep (MPI_Barrier busy-polls a core in most MPIs), with
    polls further and further apart: ranks waking every few milliseconds were seen to slow a
    measured rank by 40% when processes are not bound to cores."""
    if comm is None:
        return
    req, pause = comm.Ibarrier(), 0.001
    while not req.Test():
        time.sleep(pause)
        pause = min(2 * pause, longest_s)


def on_rank0(world, fn, *args):
    """fn(*args) on world rank 0 while the other ranks sleep; its value, or its exception,
    on every rank (so an error there cannot leave the others waiting)."""
    value = error = None
    if world is None or world.Get_rank() == 0:
        try:
            value = fn(*args)
        except Exception as e:                       # noqa: BLE001 - re-raised on every rank
            error = e
    if world is not None:
        quiet_barrier(world)
        value, error = world.bcast((value, error), root=0)
    if error is not None:
        raise error
    return value
