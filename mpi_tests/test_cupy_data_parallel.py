"""Data parallelism on GPUs (the cupy backend, one GPU per rank, gradients reduced through
the host) equals the single-process numpy run in float64. Skipped where CuPy or a GPU is
missing (the CI machine); run on a GPU node with
``mpirun -n 2 python -m pytest --with-mpi mpi_tests/test_cupy_data_parallel.py``."""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    GPUS = cp.cuda.runtime.getDeviceCount()
except cp.cuda.runtime.CUDARuntimeError:
    GPUS = 0

from refgpt import backend  # noqa: E402
from refgpt.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from refgpt.engine import Trainer  # noqa: E402
from refgpt.parallel.grid import Grid  # noqa: E402


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(GPUS == 0, reason="no NVIDIA GPU")
def test_gpu_data_parallel_equals_single_process_numpy():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    def run(name, grid):
        tcfg = TrainConfig(micro_batch_size=1, global_batch_size=2 * comm.size, train_iters=3,
                           lr=1e-2, dtype="float64", synthetic_data=True, eval_iters=1,
                           clip_grad=0.5, backend=name)
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          vocab_size=45, vocab_multiple=16, dropout=0.1)
        t = Trainer(cfg, tcfg, ParallelConfig(ddp_bucket_size=2000), grid, log=lambda *_: None)
        try:
            return t.run(), backend.to_host(t.model.params.data).copy()
        finally:
            backend.set_backend("numpy")
    (got, p_got), (ref, p_ref) = run("cupy", Grid(comm)), run("numpy", None)
    ok = (np.allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=1e-10, atol=0)
          and np.abs(p_got - p_ref).max() <= 1e-10 * np.abs(p_ref).max())
    assert all(comm.allgather(bool(ok)))
