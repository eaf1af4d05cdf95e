#!/bin/bash
# Strong-scaling study on Fugaku (PJM), as in the Fugaku GPT work: a fixed global batch, the
# gradient-accumulation steps = global batch / data-parallel ranks. One rank per CMG (12 cores,
# 12 threads, its own memory: fugaku_binding.sh), 4 ranks per node; the configurations run in
# turn inside this allocation.
#   pjsub examples/jobs/scaling_fugaku.pjm.sh
#PJM -L "node=16"
#PJM -L "rscgrp=small"
#PJM -L "elapse=04:00:00"
#PJM --mpi "max-proc-per-node=4"
#PJM --mpi "rank-map-bychip"
#PJM -L "freq=2200"                         # 2.2 GHz (the default is 2.0)
#PJM -g YOUR_GROUP
#PJM -x PJM_LLIO_GFSCACHE=/vol0004          # the volume that holds the code
#PJM -s
set -euo pipefail
source "${PJM_O_WORKDIR:-.}/examples/jobs/fugaku_binding.sh"  # one rank per CMG
STUDY=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --vocab-size 50257
       --seq-length 1024 --micro-batch-size 1 --global-batch-size 256
       --ranks 4 8 16 32 64 --layouts dp tp2 --threads-per-rank 12 --out runs/scaling-fugaku)
mpiexec -n 64 python -m refgpt.study.scaling "${STUDY[@]}" --dry-run
mpiexec -of-proc runs/scaling-fugaku/out -n 64 python -m refgpt.study.scaling "${STUDY[@]}" --no-report
# on a login node: python -m refgpt.study.scaling "${STUDY[@]}" --report-only
