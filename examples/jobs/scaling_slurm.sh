#!/bin/bash
# Strong-scaling study on a Slurm cluster: every configuration runs inside this one allocation,
# on the first R ranks (the others sleep), one rank per core, ranks bound to cores.
#   sbatch examples/jobs/scaling_slurm.sh
# then draw the report where matplotlib is (a login node): the same study flags + --report-only.
#SBATCH --job-name=refgpt-scaling
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=48
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
set -euo pipefail
# mpi4py must be built against the cluster's MPI (README, "Using the cluster's MPI").
export OMP_NUM_THREADS=1
STUDY=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --vocab-size 50257
       --seq-length 1024 --micro-batch-size 1 --global-batch-size 192
       --ranks 48 96 192 --layouts dp tp2 pp2 --threads-per-rank 1 --out runs/scaling)
# the plan and the predicted all-reduce share first (seconds), then the measurements
srun --cpu-bind=cores python -m refgpt.study.scaling "${STUDY[@]}" --dry-run
srun --cpu-bind=cores python -m refgpt.study.scaling "${STUDY[@]}" --no-report
# python -m refgpt.study.scaling "${STUDY[@]}" --report-only     # runs/scaling/scaling.md, *.png
