"""Threads per rank. Several ranks on one node each running a BLAS with one thread per core
oversubscribe the cores (and threaded small GEMMs then collapse), so when ranks share a node
each gets one BLAS thread unless --threads-per-rank says otherwise. Numba's thread pool (the
numba backend's kernels) gets the same count.

Numba's pool is OpenMP's (refgpt.kernels.select_thread_pool), whose idle threads spin before
they sleep. When the threads asked for outnumber the cores (ranks x threads per rank over the
node's cores, or threads over the cores this rank may run on), spinning threads take the
cores from working ones, so the pool is then told to sleep at once (OMP_WAIT_POLICY=PASSIVE,
unless it is set); benchmarks/README.md measures both.

OpenBLAS's idle threads spin too, by default for about 0.1 s after each GEMM, while the numba
backend's kernels run between GEMMs on the same cores. ``quiet_openblas`` shortens that to
2^16 cycles (OPENBLAS_THREAD_TIMEOUT, unless it is set). OpenBLAS reads the variable when it
loads, so the training entry points call it before anything imports NumPy.
"""

from __future__ import annotations

import os


def quiet_openblas() -> None:
    """OpenBLAS's idle threads spin about 20 us instead of 0.1 s (call before importing NumPy)."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")


def ranks_on_node(world_comm) -> int:
    """How many ranks of the world share this rank's node (its memory); collective."""
    if world_comm is None:
        return 1
    from mpi4py import MPI
    node = world_comm.Split_type(MPI.COMM_TYPE_SHARED)
    size = node.Get_size()
    node.Free()
    return size


def set_threads(world_comm, requested: int):
    """Apply the BLAS/OpenMP thread limit (for the rest of the process); returns a log line."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from ..kernels import select_thread_pool
    local = ranks_on_node(world_comm)
    threads = requested or (1 if local > 1 else None)
    if threads and oversubscribed(threads, local, os.cpu_count() or 1, _cores_here()):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")        # before numba's pool starts
    select_thread_pool()
    import numba
    if threads:
        threadpool_limits(limits=threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    libs = ", ".join(sorted({f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()}))
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    return (f"threads: {local} rank(s) on this node; per rank: {libs or 'no BLAS found'}, "
            f"numba {numba.get_num_threads()}{', idle OpenMP threads sleep' if passive else ''}")


def oversubscribed(threads: int, local_ranks: int, node_cores: int, my_cores: int) -> bool:
    """Whether threads per rank, with local_ranks ranks on the node, ask for more cores than
    there are: on the node, or among those this rank may run on (its binding)."""
    return threads * local_ranks > node_cores or threads > my_cores


def _cores_here() -> int:
    """The cores this process may run on (its affinity mask, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
