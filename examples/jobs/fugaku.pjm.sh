#!/bin/bash
# Data-parallel training on Fugaku (PJM): a template to adapt (group, resource group, volume).
# One A64FX node has 48 compute cores in 4 CMGs of 12; here one rank per CMG, bound to its 12
# cores and its memory with 12 threads (fugaku_binding.sh says how and why), so 4 ranks per
# node and 64 ranks on 16 nodes.
#   pjsub examples/jobs/fugaku.pjm.sh
#PJM -L "node=16"
#PJM -L "rscgrp=small"
#PJM -L "elapse=02:00:00"
#PJM --mpi "max-proc-per-node=4"
#PJM --mpi "rank-map-bychip"
#PJM -L "freq=2200"                         # 2.2 GHz (the default is 2.0)
#PJM -g YOUR_GROUP
#PJM -x PJM_LLIO_GFSCACHE=/vol0004          # the volume that holds the data and code
#PJM -s
set -euo pipefail
source "${PJM_O_WORKDIR:-.}/examples/jobs/fugaku_binding.sh"  # one rank per CMG
DATA=${DATA:-$HOME/refgpt-data/stdlib}
[ -f "$DATA/meta.json" ] || python -m refgpt.prepare --output "$DATA"
# -of-proc writes each rank's output to its own file. To place ranks on nodes explicitly, give
# Fujitsu MPI a rank map with --vcoordfile (format: see its manual).
mpiexec -of-proc runs/fugaku/out -n 64 python -m refgpt.train --data-path "$DATA" \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 \
    --micro-batch-size 1 --global-batch-size 256 --train-iters 1000 \
    --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 50 --threads-per-rank 12 \
    --save runs/fugaku --save-interval 200 --log-jsonl runs/fugaku/log.jsonl --no-progress
