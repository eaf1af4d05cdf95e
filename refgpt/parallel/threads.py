"""Threads per rank. Several ranks on one node each running a BLAS with one thread per core
oversubscribe the cores (and threaded small GEMMs then collapse), so when ranks share a node
each gets one BLAS thread unless --threads-per-rank says otherwise. Numba's thread pool (the
numba backend's kernels) gets the same count."""

from __future__ import annotations


def set_threads(world_comm, requested: int):
    """Apply the BLAS/OpenMP thread limit (for the rest of the process); returns a log line."""
    from threadpoolctl import threadpool_info, threadpool_limits
    local = 1
    if world_comm is not None:
        from mpi4py import MPI
        node = world_comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.Get_size()
        node.Free()
    threads = requested or (1 if local > 1 else None)
    if threads:
        threadpool_limits(limits=threads)
        import numba
        import refgpt.kernels  # noqa: F401  (chooses numba's thread pool first)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    libs = ", ".join(sorted({f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()}))
    import numba
    return (f"threads: {local} rank(s) on this node; per rank: {libs or 'no BLAS found'}, "
            f"numba {numba.get_num_threads()}")
