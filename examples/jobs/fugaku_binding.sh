# Sourced by the Fugaku job scripts: one refgpt rank per CMG, bound to its cores and memory.
#
# An A64FX node has 48 compute cores in 4 CMGs (core memory groups) of 12, each CMG with its
# own L2 and 8 GiB of HBM2. Linux numbers the compute cores 12-59 and the CMGs as NUMA nodes
# 4-7: CMG0 cores 12-23 (node 4), CMG1 24-35 (5), CMG2 36-47 (6), CMG3 48-59 (7) [1]. A rank
# whose threads or memory straddle CMGs reads the other CMG's HBM2 through the ring bus at a
# fraction of its own bandwidth, so refgpt runs 4 ranks a node (#PJM --mpi
# "max-proc-per-node=4"), each with 12 threads:
#
#   OMPI_MCA_plm_ple_numanode_assign_policy=simplex   each rank gets a NUMA node (CMG) of its
#       own; no two ranks share one [2]. (The default, share_cyclic, lets ranks share.)
#   OMPI_MCA_plm_ple_memory_allocation_policy=bind_local   memory only from the rank's own
#       CMG; the default, localalloc, takes another CMG's when the own is full [1].
#   OMP_NUM_THREADS=12, OMP_PLACES=cores, OMP_PROC_BIND=close   12 OpenMP threads (numba's
#       pool and the BLAS) on the rank's 12 cores, one each [3].
#   #PJM --mpi "rank-map-bychip" (in the job script)   ranks fill a node before the next, so
#       ranks 0-3 share a node and a tensor-parallel group of 4 (refgpt's TP groups are
#       consecutive ranks, refgpt/parallel/grid.py) talks through memory [2].
#
# Bound this way, refgpt gives each rank one thread per core of its CMG even without
# --threads-per-rank (refgpt.parallel.threads.default_threads), and its start log names rank
# 0's cores and NUMA node ("rank 0 on cores 12-23 (NUMA node 4)"): check it in the first job.
#
# [1] Fugaku User's Guide, "5.11 CPU core and memory binding" (the CMG/core/NUMA node table,
#     numactl and plm_ple_memory_allocation_policy), https://www.r-ccs.riken.jp/fugaku/docs/
#     user-guide/sys-use/user-guide-use-1.49/build/en/JobExecution/CPUcoreMemoryBinding.html
# [2] Fujitsu Technical Computing Suite, "Job Operation Software End-user's Guide" and "MPI
#     User's Guide" (--mpi rank-map-*, MCA parameters plm_ple_*), on the Fugaku portal; the
#     same settings with 4 ranks x 12 threads in EigenExa's published Fugaku benchmark jobs.
# [3] OpenMP 5.2, "OMP_PLACES" and "OMP_PROC_BIND" environment variables.
export OMPI_MCA_plm_ple_numanode_assign_policy=simplex
export OMPI_MCA_plm_ple_memory_allocation_policy=bind_local
export OMP_NUM_THREADS=12 OMP_PLACES=cores OMP_PROC_BIND=close
export PLE_MPI_STD_EMPTYFILE=off                  # no empty per-rank output files
