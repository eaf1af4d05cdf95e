"""refgpt reads the world size from the launcher's environment (so single-process runs need
no MPI); under a real mpiexec it must agree with MPI itself."""

import pytest

from refgpt.parallel.launch import launched_world_size


@pytest.mark.mpi
def test_environment_matches_mpi():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    assert comm.allgather(launched_world_size()) == [comm.size] * comm.size
