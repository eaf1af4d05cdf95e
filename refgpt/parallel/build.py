"""One rank's model, built from the configuration: what the engine trains, whatever the layout.

The model is written once (refgpt.nn: one Block, one GPT); a layout only decides how it is
split, as torchtitan's model-then-parallelize does. ``build`` makes, for this rank of the grid:

    sublayers   the layers the GPT is made of: one process's (refgpt.nn.sublayers), Megatron's
                1-D tensor-parallel ones (refgpt.parallel.tensor) or SUMMA's 2-D ones
                (refgpt.parallel.tensor2d)
    storage     the flat parameter buffers: plain, ZeRO's shards (refgpt.parallel.zero), or
                one copy per node in shared memory (refgpt.parallel.shared)
    model       a GPT, or with pipeline parallelism this rank's chunks of it
                (refgpt.parallel.pipeline) and the executor of its schedule
    sync        the gradient synchronisation over the data-parallel group
                (refgpt.parallel.sync: nothing, an all-reduce, ZeRO's reduce-scatter)

``check_layout`` says, before any of it is made, why a configuration cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np


from ..config import ConfigError
from ..nn.gpt import GPT
from ..nn.params import Params
from ..precision import dtype_of
from ..nn.sublayers import Sublayers
from .collectives import Allreduce
from .context import ContextComm, check_context
from .data import GradAllReduce
from .expert import ExpertComm, expert_of
from .grid import check_expert_size
from .pipeline import PipelineExecutor, PipelineModel, check_pipeline
from .shared import SharedParams
from .summa import SummaGrid
from .sync import GradSync, LocalGrads
from .tensor import TensorParallel, check_divisible
from .tensor2d import Tensor2D, check_2d
from .tensor_comm import TPComm
from .zero import ZeroParams

ZERO_WITH_PP = ("--zero-stage {stage} with pipeline parallelism is refused: the pipeline keeps "
                "m micro-batches in flight, so stage 2 would reduce-scatter every micro-batch's "
                "gradients inside the schedule (m times the traffic of stage 1) and stage 3 would "
                "also gather every stage's parameters 2-3 times per micro-batch, coupling the "
                "stages through data-parallel collectives and swelling the bubble. Use "
                "--zero-stage 1 with --pipeline-model-parallel-size > 1.")


def check_layout(mcfg, tcfg, pcfg, tp: int, dp: int, pp: int) -> None:
    """Raise the ConfigError a run with this model, batch and tp x dp x pp layout would meet,
    before any communicator or array exists (the entry points and the scaling study's planner
    call it; the world size's fit is refgpt.parallel.grid.check_sizes). dp: the ranks left
    for data parallelism, world / (tp pp), of which context parallelism takes groups of c."""
    pcfg.validate()
    check_context(mcfg, pcfg, tp, dp)
    data = dp // pcfg.context_parallel_size              # the data replicas
    tcfg.validate(data)
    mcfg.validate()
    stage = pcfg.zero_stage
    try:
        dtype_of(tcfg.dtype)
    except ModuleNotFoundError as e:
        raise ConfigError(str(e)) from None
    if pcfg.grad_reduce_in_bf16 and tcfg.dtype != "bfloat16":
        raise ConfigError(f"--grad-reduce-in-bf16 reduces the gradients of --bf16 training in "
                          f"bfloat16; this run is {tcfg.dtype}")
    if tcfg.backend == "cupy" and pcfg.offload_optimizer:
        raise ConfigError("--offload-optimizer keeps AdamW's moments in host memory-mapped "
                          "files, which the GPU's AdamW kernel cannot update: drop it with "
                          "--backend cupy")
    if tcfg.backend == "cupy" and pcfg.dp_shared_memory:
        raise ConfigError("--dp-shared-memory shares host memory between processes; with "
                          "--backend cupy the parameters and gradients live on the GPUs: "
                          "drop it")
    if pcfg.layered_gradient_accumulation and pp > 1:
        raise ConfigError("--layered-gradient-accumulation runs every micro-batch through one "
                          "layer before the next; with --pipeline-model-parallel-size > 1 the "
                          "schedule orders the micro-batches: drop one of them")
    if stage >= 2 and pp > 1:
        raise ConfigError(ZERO_WITH_PP.format(stage=stage))
    if tcfg.optimizer == "lamb" and (pcfg.offload_optimizer or pcfg.dp_shared_memory
                                     or mcfg.num_experts
                                     or tp > 1 and pcfg.tensor_parallel_mode == "2d"):
        raise ConfigError("--optimizer lamb sums its per-tensor norms over tensor and data "
                          "parallelism: not yet with --offload-optimizer, --dp-shared-memory, "
                          "--num-experts or --tensor-parallel-mode 2d")
    if tcfg.optimizer == "onebit-adam" and (tp > 1 or stage or pcfg.offload_optimizer
                                            or pcfg.dp_shared_memory or mcfg.num_experts
                                            or pcfg.context_parallel_size > 1
                                            or tcfg.dtype in ("bfloat16", "float16")
                                            or tcfg.backend == "cupy"):
        raise ConfigError("--optimizer onebit-adam compresses the momentum of whole replicas "
                          "over data parallelism (with or without pipelining): not yet with "
                          "--tensor-model-parallel-size > 1, --zero-stage, "
                          "--offload-optimizer, --dp-shared-memory, --num-experts, "
                          "--context-parallel-size > 1, --bf16/--fp16 or --backend cupy")
    if mcfg.num_experts and tp > 1 and pcfg.tensor_parallel_mode == "2d":
        raise ConfigError("--num-experts with --tensor-parallel-mode 2d is not supported yet "
                          "(1-D --tensor-model-parallel-size, with or without "
                          "--sequence-parallel, is)")
    check_experts(mcfg, pcfg, dp)
    if tp > 1 and pcfg.tensor_parallel_mode == "2d":
        check_2d(mcfg, tp, tcfg.micro_batch_size)
    elif tp > 1:
        check_divisible(mcfg, tp, pcfg.sequence_parallel)
    if pp > 1:
        check_pipeline(mcfg, pp, pcfg.num_virtual_stages, tcfg.micro_batches(data),
                       pcfg.pipeline_schedule)
    per_stage = pcfg.recompute_per_stage()
    if per_stage and len(per_stage) != pp:
        raise ConfigError(f"--recompute-num-layers-per-stage gives {len(per_stage)} counts for "
                          f"{pp} pipeline stage{'s' * (pp > 1)}")


def check_experts(mcfg, pcfg, dp: int) -> None:
    ep = pcfg.expert_model_parallel_size
    if ep == 1:
        return
    check_expert_size(ep, dp)
    if not mcfg.num_experts:
        raise ConfigError("--expert-model-parallel-size splits experts: give --num-experts")
    if mcfg.num_experts % ep:
        raise ConfigError(f"--num-experts {mcfg.num_experts} is not divisible by "
                          f"--expert-model-parallel-size {ep}")
    if pcfg.dp_shared_memory:
        raise ConfigError("--dp-shared-memory with --expert-model-parallel-size > 1 is not "
                          "supported: the ranks of a node hold different experts")


@dataclass
class Built:
    model: GPT | PipelineModel
    sync: GradSync
    pipeline: PipelineExecutor | None         # the schedule's executor, with pipelining


def sublayers(mcfg, seed: int, grid, pcfg) -> Sublayers:
    """The layout's sublayers on this rank."""
    if grid.tp_size == 1:
        parts = Sublayers(mcfg, seed)
    elif pcfg.tensor_parallel_mode == "2d":
        parts = Tensor2D(mcfg, seed, SummaGrid(grid.tp_comm))
    else:
        parts = TensorParallel(mcfg, seed, TPComm(grid.tp_comm), pcfg.sequence_parallel)
    if grid.ep_size > 1:
        parts.ep = ExpertComm(grid.ep_comm, mcfg.num_experts)
    if grid.cp_size > 1:
        parts.cp = ContextComm(grid.cp_comm, mcfg.seq_length, pcfg.cp_comm_type)
    return parts


def storage(pcfg, grid):
    """make_params(specs, dtype): the flat buffers, plain or partitioned over the data-parallel
    group (a single process's ZeRO runs over MPI's COMM_SELF, with trivial collectives). The
    gradients are fp32 in 16-bit runs (refgpt.precision) but with --grad-reduce-in-bf16."""
    grad_dtype = dtype_of("bfloat16") if pcfg.grad_reduce_in_bf16 else None
    if not pcfg.zero_stage:
        return partial(Params, grad_dtype=grad_dtype)
    dp_comm = grid.dp_comm
    if dp_comm is None:
        from mpi4py import MPI
        dp_comm = MPI.COMM_SELF
    if pcfg.dp_shared_memory:
        return partial(SharedParams, comm=dp_comm, grad_dtype=grad_dtype)
    experts = grid.edp_comm if grid.ep_size > 1 else None   # the experts' own group
    return partial(ZeroParams, stage=pcfg.zero_stage, comm=dp_comm, grad_dtype=grad_dtype,
                   expert_comm=experts)


def lamb_norms(grid, names: list[str], counted, sharded: bool):
    """LAMB's per-tensor sums of squares (refgpt.optim.lamb), [T, 2] for the tensors names,
    summed over the ranks that share them: the data-parallel group where ZeRO shards the
    buffer (sharded), the tensor-parallel group, on which counted(name) keeps a replicated
    tensor to one rank. None where every tensor is whole on its rank."""
    from mpi4py import MPI
    dp = sharded and grid.dp_size > 1
    if not dp and grid.tp_size == 1:
        return None
    once = np.array([[1.0] if counted(n) else [0.0] for n in names])

    def norms(squares: np.ndarray) -> np.ndarray:
        squares = squares * once
        for comm in (grid.dp_comm if dp else None, grid.tp_comm if grid.tp_size > 1 else None):
            if comm is not None:
                comm.Allreduce(MPI.IN_PLACE, squares)
        return squares
    return norms


def build(mcfg, tcfg, pcfg, grid) -> Built:
    """This rank's model, its gradient synchronisation and (pipelining) its schedule, under
    the current backend (refgpt.backend: the arrays are made on its device)."""
    dtype, seed = dtype_of(tcfg.dtype), tcfg.seed
    parts = sublayers(mcfg, seed, grid, pcfg)
    make_params = storage(pcfg, grid)
    pipeline = None
    if grid.pp_size > 1:
        model = PipelineModel(mcfg, dtype, seed, grid, pcfg.num_virtual_stages, parts,
                              make_params, lambda n: pcfg.recomputed_blocks(n, grid.pp_rank),
                              pcfg.recompute_chunk(), pcfg.recompute_granularity == "selective")
        pipeline = PipelineExecutor(model, pcfg.pipeline_schedule,
                                    tcfg.micro_batches(grid.data_size),
                                    parts.activation_shape(tcfg.micro_batch_size), dtype)
    else:
        model = GPT(mcfg, dtype, seed, parts=parts, make_params=make_params,
                    recompute=pcfg.recomputed_blocks(mcfg.num_layers),
                    recompute_chunk=pcfg.recompute_chunk(),
                    recompute_attention=pcfg.recompute_granularity == "selective")
    params = model.params
    if pcfg.zero_stage:                               # ZeRO's storage is its own sync
        sync = params
    elif grid.dp_size > 1:
        groups = (lambda n: grid.edp_comm if expert_of(n) is not None else grid.dp_comm) \
            if grid.ep_size > 1 else None
        hand = pcfg.dp_allreduce_algorithm != "mpi"      # progresses only inside its calls
        sync = GradAllReduce(params, grid.dp_comm, pcfg.ddp_bucket_size,
                             pcfg.overlap_grad_reduce and not hand, groups,
                             Allreduce(pcfg.dp_allreduce_algorithm)
                             if hand or pcfg.dp_comm_thread else None, pcfg.dp_comm_thread)
    else:
        sync = LocalGrads(params)
    return Built(model, sync, pipeline)
