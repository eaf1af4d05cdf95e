"""Threads per rank. Several ranks on one node each running a BLAS with one thread per core
oversubscribe the cores (and threaded small GEMMs then collapse), so when ranks share a node
each gets one BLAS thread, unless the launcher bound the rank to a share of the node's cores
(then it gets those: one per core it may run on), or --threads-per-rank says otherwise.
Numba's thread pool (the numba backend's kernels, its GEMM tiles among them) gets the same
count.

The bound share is how NUMA nodes are used: an A64FX has 4 CMGs of 12 cores, each with its
own HBM2, and Fugaku's jobs run 4 ranks a node, each bound to one CMG's cores and memory
(examples/jobs/fugaku.pjm.sh), so each rank runs 12 threads on its own CMG and never reads
another CMG's memory; a dual-socket x86 node does the same with one rank per socket. The start
log names the cores and NUMA nodes rank 0 was given.

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
    node_cores, my_cores = os.cpu_count() or 1, _cores_here()
    threads = requested or default_threads(local, node_cores, my_cores)
    if threads and oversubscribed(threads, local, node_cores, my_cores):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")        # before numba's pool starts
    select_thread_pool()
    import numba
    if threads:
        threadpool_limits(limits=threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    libs = ", ".join(sorted({f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()}))
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    return (f"threads: {local} rank(s) on this node; per rank: {libs or 'no BLAS found'}, "
            f"numba {numba.get_num_threads()}{', idle OpenMP threads sleep' if passive else ''}"
            f"; rank 0 {placement()}")


def default_threads(local_ranks: int, node_cores: int, my_cores: int) -> int | None:
    """Threads per rank without --threads-per-rank: alone on its node, the libraries' default
    (None); sharing the node, the cores the launcher bound the rank to, where it bound it to a
    share of the node that the node's ranks can hold without overlap (a CMG, a socket), else 1."""
    if local_ranks == 1:
        return None
    if my_cores < node_cores and my_cores * local_ranks <= node_cores:
        return my_cores
    return 1


def oversubscribed(threads: int, local_ranks: int, node_cores: int, my_cores: int) -> bool:
    """Whether threads per rank, with local_ranks ranks on the node, ask for more cores than
    there are: on the node, or among those this rank may run on (its binding)."""
    return threads * local_ranks > node_cores or threads > my_cores


def placement() -> str:
    """Where this process may run: "on cores 12-23 (NUMA node 4)", from its affinity mask and
    the kernel's NUMA topology (/sys/devices/system/node), "on any core" where it reports none."""
    if not hasattr(os, "sched_getaffinity"):
        return "on any core"
    mine = os.sched_getaffinity(0)
    nodes = sorted(n for n, cores in numa_nodes().items() if cores & mine)
    where = f" (NUMA node{'s' if len(nodes) > 1 else ''} {_ranges(nodes)})" if nodes else ""
    return f"on cores {_ranges(sorted(mine))}{where}"


def numa_nodes(root: str = "/sys/devices/system/node") -> dict[int, set[int]]:
    """{NUMA node: its cores}, as Linux lists them ({} elsewhere)."""
    nodes = {}
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if name.startswith("node") and name[4:].isdigit():
            with open(os.path.join(root, name, "cpulist")) as f:
                nodes[int(name[4:])] = _parse_ranges(f.read())
    return nodes


def _parse_ranges(text: str) -> set[int]:
    """ "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11} (the kernel's list format)."""
    out = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8"."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v > start else f"{v}")
            start = None
    return ",".join(parts)


def _cores_here() -> int:
    """The cores this process may run on (its affinity mask, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def node_memory() -> int:
    """Bytes of memory this node has (the ranks on it share them)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
