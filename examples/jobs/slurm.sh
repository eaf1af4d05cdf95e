#!/bin/bash
# Data-parallel training on a Slurm cluster: one rank per core, one BLAS thread per rank.
#   sbatch examples/jobs/slurm.sh
#SBATCH --job-name=refgpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=48
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
set -euo pipefail
# mpi4py must be built against the cluster's MPI (README, "Using the cluster's MPI").
export OMP_NUM_THREADS=1
DATA=${DATA:-$HOME/refgpt-data/stdlib}
[ -f "$DATA/meta.json" ] || python -m refgpt.prepare --output "$DATA"   # once, on one process
srun python -m refgpt.train --data-path "$DATA" \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 \
    --micro-batch-size 1 --global-batch-size 96 --train-iters 1000 \
    --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 50 --threads-per-rank 1 \
    --save runs/slurm --save-interval 200 --log-jsonl runs/slurm/log.jsonl --no-progress
