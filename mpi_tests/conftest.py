"""Under mpiexec every rank runs the whole session. A test that fails on one rank would
leave the others waiting in the next collective, so a failure on a multi-rank run prints
the rank and report, then ends the whole job through COMM_WORLD.Abort."""

import pytest

from refgpt.parallel.launch import abort_job


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("mpi") is not None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.size > 1:
            abort_job(comm, f"\nrank {comm.rank}: {item.nodeid} failed\n{report.longreprtext}")


@pytest.fixture(autouse=True)
def grids_given_back(monkeypatch):
    """Every Grid a test makes frees its communicators when the test ends: an MPI process
    has a few thousand (MPICH: 2048), and the suite builds hundreds of grids. Every rank
    makes the same grids in the same order, so the frees pair up."""
    from refgpt.parallel import grid
    made = []
    init = grid.Grid.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(grid.Grid, "__init__", recording)
    yield
    for g in made:
        g.free()


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread_per_rank():
    """Several ranks share this machine's cores: one BLAS and one Numba thread each, as
    refgpt.train does."""
    import numba
    from threadpoolctl import threadpool_limits

    from refgpt.kernels import select_thread_pool
    select_thread_pool()
    numba.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
