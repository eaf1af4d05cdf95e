"""Parallel training on GPUs (the cupy backend, ranks sharing or owning GPUs, collectives
through the host) equals the single-process numpy run in float64: data, 1-D tensor (with
and without sequence parallelism), 2-D tensor, pipeline and context parallelism, and ZeRO's three
stages; with attention dropout (the cuBLAS products) and without it (the fused attention
kernels); and in bfloat16 and float16 against the numpy run in the same precision. Skipped
where CuPy or a GPU is missing (the CI machine); run on a GPU node with
``mpirun -n 2 python -m pytest --with-mpi mpi_tests/test_cupy_parallel.py``."""

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


LAYOUTS = {  # name: (tp, pp, ParallelConfig options)
    "dp": (1, 1, dict(ddp_bucket_size=2000)),
    "tp2": (2, 1, dict(tensor_model_parallel_size=2)),
    "tp2-sp": (2, 1, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2-1f1b": (1, 2, dict(pipeline_model_parallel_size=2, pipeline_schedule="1f1b")),
    "tp2-pp2": (2, 2, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "dp-zero1": (1, 1, dict(zero_stage=1)),
    "dp-zero2": (1, 1, dict(zero_stage=2)),
    "dp-zero3": (1, 1, dict(zero_stage=3)),
    "tp2-zero3": (2, 1, dict(tensor_model_parallel_size=2, zero_stage=3)),
    "pp2-zero1": (1, 2, dict(pipeline_model_parallel_size=2, zero_stage=1)),
    "tp4-2d": (4, 1, dict(tensor_model_parallel_size=4, tensor_parallel_mode="2d")),
    "cp2-p2p": (1, 1, dict(context_parallel_size=2, cp_comm_type="p2p")),
    "cp2-a2a": (1, 1, dict(context_parallel_size=2, cp_comm_type="a2a")),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(GPUS == 0, reason="no NVIDIA GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_gpu_parallel_training_equals_single_process_numpy(layout, dropout):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp, pp, options = LAYOUTS[layout]
    if comm.size % (tp * pp):
        pytest.skip(f"{layout} needs a multiple of {tp * pp} ranks")

    def run(name, grid, pcfg):
        micro = 2 if options.get("tensor_parallel_mode") == "2d" else 1   # divisible by q
        tcfg = TrainConfig(micro_batch_size=micro, global_batch_size=2 * comm.size, train_iters=3,
                           lr=1e-2, dtype="float64", synthetic_data=True, eval_iters=1,
                           clip_grad=0.5, backend=name)
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=40,
                          vocab_size=45, vocab_multiple=16, dropout=dropout)
        t = Trainer(cfg, tcfg, pcfg, grid, log=lambda *_: None)
        return t.run(), t
    grid = Grid(comm, tp, pp, 1, options.get("context_parallel_size", 1))
    got, par = run("cupy", grid, ParallelConfig(**options))
    ref, one = run("numpy", None, None)
    p_ref = one.model.params.data
    full = par.model.full_tensors(backend.to_host(par.model.params.full_data()))
    err = max(float(np.abs(full[n] - one.model.params[n]).max()) for n in full)
    ok = (np.allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=1e-10, atol=0)
          and err <= 1e-10 * float(np.abs(p_ref).max()))
    assert all(comm.allgather(bool(ok)))


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(GPUS == 0, reason="no NVIDIA GPU")
@pytest.mark.parametrize("layout", ["dp", "tp2-sp", "pp2-1f1b", "dp-zero3", "tp4-2d"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_parallel_training_in_16_bits_matches_single_process_numpy(layout, dtype):
    """The same runs in 16 bits: each rank's GPU rounds where one NumPy process does, up to the
    fp32 sums' order, so losses agree within 2^-8 (tests/test_cupy.py explains the bound)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tp, pp, options = LAYOUTS[layout]
    if comm.size % (tp * pp):
        pytest.skip(f"{layout} needs a multiple of {tp * pp} ranks")

    def run(name, grid, pcfg):
        micro = 2 if options.get("tensor_parallel_mode") == "2d" else 1
        tcfg = TrainConfig(micro_batch_size=micro, global_batch_size=2 * comm.size, train_iters=3,
                           lr=1e-2, dtype=dtype, synthetic_data=True, eval_iters=1,
                           clip_grad=0.5, backend=name)
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=40,
                          vocab_size=45, vocab_multiple=16)
        return Trainer(cfg, tcfg, pcfg, grid, log=lambda *_: None).run()
    got = run("cupy", Grid(comm, tp, pp), ParallelConfig(**options))
    ref = run("numpy", None, None)
    ok = np.allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=2.0 ** -8, atol=0)
    assert all(comm.allgather(bool(ok)))
