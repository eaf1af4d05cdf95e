"""The training engine: model, optimizer, data and the loop, on one rank of a process grid.

One iteration is one optimizer step over the global batch of G sequences (samples
[kG, (k+1)G) of the run). Data-parallel rank r of d takes the contiguous share
[kG + rG/d, kG + (r+1)G/d) and processes it as m = G/(d B) micro-batches of B sequences;
every micro-batch's loss is divided by the global token count G*T, the gradients of the
micro-batches accumulate locally, and the last micro-batch's backward all-reduces them over
the data-parallel group in buckets (refgpt.parallel.data). Every rank then holds the
gradient of the whole batch and takes the same AdamW step, so the parameters stay identical
across data-parallel ranks, and equal the single-process run's up to rounding. With ZeRO
(refgpt.parallel.zero) the sum is a reduce-scatter instead and each rank updates its shard;
with --dp-shared-memory (refgpt.parallel.shared) the ranks of a node share one copy of the
parameters and sum the gradients by reading each other's buffers.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import time
from pathlib import Path

import numpy as np

from . import metrics
from .backend import set_backend, synchronize, to_device, to_host, use_gpu
from .checkpoint import flat_to_named, load_checkpoint, named_to_flat, save_checkpoint
from .cli import CheckpointError
from .config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from .data.tokens import SyntheticDataset, TokenDataset, batch, read_meta
from .nn import GPT
from .nn.params import Params
from .optim import AdamW, clip_grad_, grad_norm, learning_rate
from .parallel.data import GradReducer
from .parallel.faults import inject
from .parallel.grid import Grid
from .parallel.pipeline import PipelineExecutor, PipelineModel, check_pipeline
from .parallel.shared import SharedParams
from .parallel.tensor import ParallelGPT, check_divisible
from .parallel.summa import SummaGrid
from .parallel.tensor2d import ParallelGPT2D, check_2d
from .parallel.tensor_comm import TPComm
from .parallel.zero import ZeroParams, formula_bytes, memory_bytes, offload_moments
from .timers import Timers

ZERO_WITH_PP = ("--zero-stage {stage} with pipeline parallelism is refused: the pipeline keeps "
                "m micro-batches in flight, so stage 2 would reduce-scatter every micro-batch's "
                "gradients inside the schedule (m times the traffic of stage 1) and stage 3 would "
                "also gather every stage's parameters 2-3 times per micro-batch, coupling the "
                "stages through data-parallel collectives and swelling the bubble. Use "
                "--zero-stage 1 with --pipeline-model-parallel-size > 1.")


def check_layout(mcfg: ModelConfig, tcfg: TrainConfig, pcfg: ParallelConfig, tp: int, dp: int,
                 pp: int) -> None:
    """Raise the ConfigError a run with this model, batch and tp x dp x pp layout would meet,
    before any communicator or array exists (the scaling study plans with it)."""
    pcfg.validate()
    tcfg.validate(dp)
    mcfg.validate()
    stage = pcfg.zero_stage
    if tcfg.backend == "cupy" and pcfg.offload_optimizer:
        raise ConfigError("--offload-optimizer keeps AdamW's moments in host memory-mapped "
                          "files, which the GPU's AdamW kernel cannot update: drop it with "
                          "--backend cupy")
    if tcfg.backend == "cupy" and pcfg.dp_shared_memory:
        raise ConfigError("--dp-shared-memory shares host memory between processes; with "
                          "--backend cupy the parameters and gradients live on the GPUs: "
                          "drop it")
    if stage >= 2 and pp > 1:
        raise ConfigError(ZERO_WITH_PP.format(stage=stage))
    if tp > 1 and pcfg.tensor_parallel_mode == "2d":
        check_2d(mcfg, tp, tcfg.micro_batch_size)
    elif tp > 1:
        check_divisible(mcfg, tp, pcfg.sequence_parallel)
    if pp > 1:
        micro = tcfg.global_batch_size // (dp * tcfg.micro_batch_size)
        check_pipeline(mcfg, pp, pcfg.num_virtual_stages, micro, pcfg.pipeline_schedule)


class Trainer:
    """Owns the model, optimizer and data of one rank; ``run()`` trains and returns the log
    (the same on every rank: losses and norms are reduced over the data-parallel group)."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, pcfg: ParallelConfig | None = None,
                 grid: Grid | None = None, given: set = frozenset(), log=print,
                 progress: bool = False):
        self.pcfg = pcfg or ParallelConfig()
        self.grid = grid or Grid()
        g = self.grid
        self.log = log if g.rank == 0 else (lambda *_: None)
        self.progress = progress and g.rank == 0
        self.pcfg.validate()
        tcfg.validate(g.dp_size)
        ckpt = load_checkpoint(tcfg.load) if tcfg.load else None
        if ckpt is not None:
            mcfg = ModelConfig.from_dict(ckpt.state["model"])
            self.log(f"resuming from {ckpt.path} (iteration {ckpt.state['iteration']}); "
                     f"model shape taken from the checkpoint")
        self.tokenizer = None
        self.train_data, self.val_data = self._datasets(mcfg, tcfg, given, ckpt)
        self.mcfg, self.tcfg = mcfg, tcfg
        self.dtype = np.dtype(tcfg.dtype)
        check_layout(mcfg, tcfg, self.pcfg, g.tp_size, g.dp_size, g.pp_size)
        set_backend(tcfg.backend)
        if tcfg.backend == "cupy":
            use_gpu(g.rank)
        self.pipe = None
        stage = self.pcfg.zero_stage
        make_params = Params
        if self.pcfg.dp_shared_memory:
            make_params = functools.partial(SharedParams, comm=self._dp_comm())
        elif stage:
            make_params = functools.partial(ZeroParams, stage=stage, comm=self._dp_comm())
        if g.pp_size > 1:
            pc = self.pcfg
            micro = tcfg.global_batch_size // (g.dp_size * tcfg.micro_batch_size)
            tp = TPComm(g.tp_comm) if g.tp_size > 1 and pc.tensor_parallel_mode == "1d" else None
            summa = None
            if g.tp_size > 1 and tp is None:                     # 2-D chunks
                q = math.isqrt(g.tp_size)
                summa = SummaGrid(g.tp_comm)
            self.model = PipelineModel(mcfg, self.dtype, tcfg.seed, g, pc.num_virtual_stages,
                                       tp, pc.sequence_parallel, make_params, summa,
                                       tcfg.micro_batch_size)
            tokens = mcfg.seq_length // (g.tp_size if pc.sequence_parallel else 1)
            self.act_shape = (tcfg.micro_batch_size, tokens, mcfg.hidden_size)
            if summa is not None:                                # [B/q, T, C/q] per rank
                self.act_shape = (tcfg.micro_batch_size // q, tokens, mcfg.hidden_size // q)
            self.pipe = PipelineExecutor(self.model, pc.pipeline_schedule, micro, self.act_shape,
                                         self.dtype)
            ready = self.model.ready_order()          # DP reduces after the pipeline flush
        elif g.tp_size > 1 and self.pcfg.tensor_parallel_mode == "2d":
            self.model = ParallelGPT2D(mcfg, self.dtype, tcfg.seed, g.tp_comm,
                                       tcfg.micro_batch_size, make_params)
            ready = self.model.ready_groups()
        elif g.tp_size > 1:
            self.model = ParallelGPT(mcfg, self.dtype, tcfg.seed, TPComm(g.tp_comm),
                                     self.pcfg.sequence_parallel, make_params=make_params)
            ready = self.model.ready_groups()
        else:
            self.model = GPT(mcfg, self.dtype, tcfg.seed, make_params=make_params)
            ready = self.model.ready_groups()
        p = self.model.params
        self.zero = p if stage else None
        self.opt = self._optimizer(p)
        self.reducer = (GradReducer(p, g.dp_comm, ready, self.pcfg.ddp_bucket_size,
                                    self.pcfg.overlap_grad_reduce)
                        if g.dp_size > 1 and not stage else None)
        self.timers = Timers(self.pcfg.timing_log_level, g.world)
        self.iteration, self.consumed = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        self.gemm_rate = metrics.measure_gemm_rate(self.dtype)
        self.history: list[dict] = []
        inject("init", g.rank)

    def _dp_comm(self):
        """The data-parallel communicator; a single process gets MPI's COMM_SELF (ZeRO at
        d = 1 then runs its code path with trivial collectives)."""
        if self.grid.dp_comm is not None:
            return self.grid.dp_comm
        from mpi4py import MPI
        return MPI.COMM_SELF

    def _optimizer(self, p) -> AdamW:
        """AdamW over the whole buffer, or with ZeRO over this rank's shard of it."""
        t, z = self.tcfg, self.zero
        if z is None:
            params, grads, (lo, hi) = p.data, p.grad, (0, p.padded)
        else:
            params, grads, (lo, hi) = z.param_shard(), z.grad_shard(), z.own
        decay = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in p.decay_ranges() if a < hi and b > lo]
        folder = self.pcfg.offload_optimizer
        moments = offload_moments(folder, self.grid.rank, len(params), p.dtype) if folder else None
        return AdamW(params, grads, decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                     weight_decay=t.weight_decay, moments=moments)

    def _datasets(self, mcfg, tcfg, given, ckpt):
        if tcfg.synthetic_data:
            return (SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "train"),
                    SyntheticDataset(mcfg.vocab_size, mcfg.seq_length, tcfg.seed, "val"))
        if tcfg.data_path:
            folder = Path(tcfg.data_path)
        else:
            folder = self._default_data(mcfg.vocab_size)
        meta = read_meta(folder)
        if ckpt is None and "vocab_size" not in given:
            mcfg.vocab_size = meta["vocab_size"]
        if mcfg.vocab_size < meta["vocab_size"]:
            raise ConfigError(f"--vocab-size {mcfg.vocab_size} is smaller than the data's "
                              f"vocabulary ({meta['vocab_size']}, {folder})")
        tok = folder / "tokenizer.json"
        self.tokenizer = tok if tok.is_file() else None
        return (TokenDataset(folder, "train", mcfg.seq_length, tcfg.seed),
                TokenDataset(folder, "val", mcfg.seq_length, tcfg.seed))

    def _default_data(self, vocab_size: int) -> Path:
        """The default corpus: rank 0 prepares it (once, cached) while the others wait."""
        from .prepare import default_data
        world = self.grid.world
        if world is None:
            return default_data(vocab_size, log=self.log)
        folder = default_data(vocab_size, log=self.log) if world.Get_rank() == 0 else None
        return Path(world.bcast(str(folder) if folder else None, root=0))

    def _local(self, tensors: dict, prefix: str = "") -> dict:
        """This rank's part of full tensors named prefix + parameter name."""
        if not isinstance(self.model, (ParallelGPT, ParallelGPT2D, PipelineModel)):
            return tensors
        return {k: self.model.shard(k[len(prefix):], v) for k, v in tensors.items()
                if k.startswith(prefix) and k[len(prefix):] in self.model.params.specs}

    def _restore(self, ckpt) -> None:
        p = self.model.params
        try:
            p.load_state_dict(self._local(ckpt.params))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        lo, hi = self.zero.own if self.zero else (0, p.padded)
        for prefix, state in (("exp_avg.", self.opt.m), ("exp_avg_sq.", self.opt.v)):
            full = np.zeros(p.padded, p.dtype)
            named_to_flat(self._local(ckpt.optimizer, prefix), prefix, p, full)
            state[...] = to_device(full[lo:hi])
        self.opt.t = ckpt.state["optimizer_step"]
        self.iteration = ckpt.state["iteration"]
        self.consumed = ckpt.state["consumed_samples"]

    def close(self) -> None:
        """Free what the run holds in memory shared between ranks (--dp-shared-memory's
        windows); collective: every rank calls it. The trainer cannot train afterwards (one
        job that runs several trainers in turn, as the scaling study does, calls it)."""
        params = self.model.params
        self.model = self.opt = self.zero = self.reducer = self.pipe = None
        params.free()

    # -- one optimizer step ------------------------------------------------------------
    def lr_at(self, iteration: int) -> float:
        t = self.tcfg
        return learning_rate(iteration, lr=t.lr, min_lr=t.min_lr, warmup=t.lr_warmup_iters,
                             decay_iters=t.lr_decay_iters or t.train_iters, style=t.lr_decay_style)

    def grads_ready(self, names) -> None:
        """During the last micro-batch's backward (ZeRO 2-3: every backward): these
        parameters' gradients are complete on this rank; finish them over TP (sequence
        parallelism), then start their DP sum (all-reduce, or ZeRO's reduce-scatter)."""
        if isinstance(self.model, ParallelGPT):
            self.model.reduce_replicated_grads(names)
        if self.reducer:
            self.reducer.ready(names)
        if self.zero:
            self.zero.reduce_grads(names)

    def dp_sum(self, value: float) -> float:
        comm = self.grid.dp_comm
        return value if comm is None else comm.allreduce(value)

    def train_step(self) -> dict:
        t, g, model, timers = self.tcfg, self.grid, self.model, self.timers
        t0 = time.perf_counter()
        G, B, T = t.global_batch_size, t.micro_batch_size, self.mcfg.seq_length
        share = G // g.dp_size                             # sequences of this rank
        first = self.consumed + g.dp_rank * share
        norm = float(G * T)                                # global token count of the step
        model.params.zero_grad()
        self.traffic_at_start = self.dp_traffic()
        loss = 0.0
        if self.pipe is not None:
            return self._finish_step(self._pipeline_step(first, share, norm), t0)
        zero = self.zero
        every = zero is not None and zero.stage >= 2     # reduce-scatter every micro-batch
        for start in range(first, first + share, B):
            ids = np.arange(start, start + B)
            with timers("batch-generator"):
                x, y = map(to_device, batch(self.train_data, ids))
            inject("forward", g.rank)
            with timers("forward"):
                loss += model.forward(x, y, norm, key=(self.iteration, ids))
            last = start + B == first + share
            reduce = last or every
            if reduce and self.reducer:
                self.reducer.start()
            if reduce and zero:
                zero.start_reduce()
            inject("backward", g.rank)
            with timers("backward"):
                model.backward(self.grads_ready if reduce else None)
            if reduce:                # waits for the network inside backward: the reduction's
                blocked = ((self.reducer.blocked_s if self.reducer else 0.0)
                           + (zero.blocked_s if zero else 0.0))
                timers.add("backward", -blocked)
                timers.add("grads-all-reduce", blocked)
            if every and not last:
                with timers("grads-all-reduce"):       # the reduce-scatters of ZeRO 2-3
                    zero.wait_grads()
        inject("allreduce", g.rank)
        with timers("grads-all-reduce"):
            if self.reducer:
                self.reducer.wait()
            if zero:
                zero.wait_grads()
            loss = self.dp_sum(loss)
        return self._finish_step(loss, t0)

    def _pipeline_step(self, first: int, share: int, norm: float) -> float:
        """Forward and backward of this rank's share through the pipeline schedule, then the
        tied embedding's and the data-parallel gradient sums; returns the step's loss."""
        t, g, model, B = self.tcfg, self.grid, self.model, self.tcfg.micro_batch_size
        batches = []
        with self.timers("batch-generator"):
            for start in range(first, first + share, B):
                ids = np.arange(start, start + B)
                batches.append((*map(to_device, batch(self.train_data, ids)),
                                (self.iteration, ids)))
        inject("forward", g.rank)
        inject("backward", g.rank)
        t0 = time.perf_counter()
        loss = self.pipe.run(batches, norm)           # forward and backward interleave here:
        busy = self.pipe.busy                         # the executor times its compute ops
        self.timers.add("forward", busy["F"])
        self.timers.add("backward", busy["B"] + busy["W"])
        self.timers.add("pipeline-bubble", time.perf_counter() - t0 - sum(busy.values()))
        inject("allreduce", g.rank)
        with self.timers("grads-all-reduce"):
            model.reduce_replicated_grads()           # sequence parallelism's partial sums
            if g.emb_comm is not None:                # the two copies of the tied token table
                wte = model.params.grads["wte.weight"]
                wte[...] = to_device(g.emb_comm.allreduce(to_host(wte)))
            if self.reducer:
                self.reducer.start()
                self.reducer.ready(list(model.params))
                self.reducer.wait()
            if self.zero:
                self.zero.start_reduce()
                self.zero.reduce_grads(list(model.params))
                self.zero.wait_grads()
            loss = self.dp_sum(g.pp_comm.allreduce(loss))
        return loss

    def dp_traffic(self) -> float:
        """Bytes this rank has sent or received over the data-parallel group for gradients and
        parameters (refgpt.parallel.zero says how they are counted)."""
        return ((self.reducer.comm_bytes if self.reducer else 0)
                + (self.zero.comm_bytes if self.zero else 0))

    def memory_report(self) -> dict:
        """The memory registry, the ZeRO formula for the same buffers and the peak RSS."""
        p, stage = self.model.params, self.pcfg.zero_stage
        mem = memory_bytes(p, self.opt)
        mem["formula"] = formula_bytes(stage, p.padded, p.d if stage else 1, p.dtype.itemsize,
                                       shared=self.pcfg.dp_shared_memory)
        mem["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return mem

    def global_grad_norm(self) -> float:
        model = self.model
        if self.zero is not None:                 # each element counted once over the world
            sq = self.zero.grad_squares(model.norm_counted)
            return math.sqrt(sq if self.grid.world is None else self.grid.world.allreduce(sq))
        if isinstance(model, (ParallelGPT, ParallelGPT2D)):
            return model.grad_norm()
        if isinstance(model, PipelineModel):
            return math.sqrt(self.grid.mp_comm.allreduce(model.grad_squares()))
        return grad_norm(model.params.grad)

    def _finish_step(self, loss: float, t0: float) -> dict:
        t, g, model, timers = self.tcfg, self.grid, self.model, self.timers
        G, T = t.global_batch_size, self.mcfg.seq_length
        lr = self.lr_at(self.iteration)
        inject("optimizer", g.rank)
        with timers("optimizer"):
            gnorm = self.global_grad_norm()
            skipped = not math.isfinite(gnorm)
            if self.zero is not None and self.zero.stage == 3:
                self.zero.drop_prefetched()
            if not skipped:
                clip_grad_(self.opt.g, t.clip_grad, gnorm)
                self.opt.step(lr)
                if self.zero is not None and self.zero.stage < 3:
                    self.zero.gather_params()
        self.iteration += 1
        self.consumed += G
        synchronize()
        dt = time.perf_counter() - t0
        mflops = metrics.model_flops(self.mcfg, G)
        return {"iter": self.iteration, "consumed_samples": self.consumed, "loss": loss, "lr": lr,
                "grad_norm": gnorm, "skipped": int(skipped), "step_time_s": dt,
                "tokens_per_s": G * T / dt,
                "tflops": metrics.megatron_flops(G, T, self.mcfg.num_layers, self.mcfg.hidden_size,
                                                 self.mcfg.padded_vocab) / dt / 1e12,
                "model_tflops": mflops / dt / 1e12,
                "mfu": mflops / dt / (self.gemm_rate * g.world_size),
                "dp_comm_bytes": self.dp_traffic() - self.traffic_at_start,
                "memory_bytes": self.memory_report()}

    def evaluate(self) -> float:
        """Mean loss over eval_iters global batches of the validation split, in order; the
        batches are shared out over the data-parallel ranks like training batches."""
        t, g, model = self.tcfg, self.grid, self.model
        total_seqs, B, T = t.eval_iters * t.global_batch_size, t.micro_batch_size, self.mcfg.seq_length
        share = total_seqs // g.dp_size
        model.set_grad_enabled(False)
        total = 0.0
        starts = range(g.dp_rank * share, (g.dp_rank + 1) * share, B)
        try:
            if self.pipe is not None:
                batches = [(*map(to_device, batch(self.val_data, np.arange(s, s + B),
                                                  sequential=True)), None) for s in starts]
                runner = PipelineExecutor(model, "forward", len(batches), self.act_shape, self.dtype)
                total = g.pp_comm.allreduce(runner.run(batches, float(total_seqs * T)))
            else:
                for start in starts:
                    x, y = map(to_device,
                               batch(self.val_data, np.arange(start, start + B), sequential=True))
                    total += model.forward(x, y, float(total_seqs * T))
        finally:
            model.set_grad_enabled(True)
        return self.dp_sum(total)

    def save(self) -> Path | None:
        """Rank 0 writes the full (unsharded) state; tensor-parallel shards are gathered first."""
        inject("checkpoint", self.grid.rank)
        p, opt, z = self.model.params, self.opt, self.zero
        flat = (p.data, opt.m, opt.v) if z is None else (          # ZeRO shards gathered
            z.full_data(), z.gather_shards(opt.m), z.gather_shards(opt.v))
        flat = tuple(map(to_host, flat))                          # GPU arrays to the host
        if isinstance(self.model, (ParallelGPT, ParallelGPT2D, PipelineModel)):  # TP shards gathered
            params, m, v = (self.model.full_tensors(f) for f in flat)
        else:
            params, m, v = (flat_to_named(f, p) for f in flat)
        if self.pipe is not None:                           # every stage's tensors to rank 0
            parts = self.grid.pp_comm.gather((params, m, v), root=0)
            if parts is not None:
                params, m, v = ({k: val for part in reversed(parts) for k, val in part[i].items()}
                                for i in range(3))
        if self.grid.rank != 0:
            return None
        state = {"consumed_samples": self.consumed, "dtype": self.tcfg.dtype,
                 "seed": self.tcfg.seed, "model": self.mcfg.to_dict(), "train": self.tcfg.to_dict()}
        path = save_checkpoint(self.tcfg.save, self.iteration, params,
                               {"exp_avg": m, "exp_avg_sq": v}, opt.t, state, self.tokenizer)
        self.log(f"saved checkpoint {path}")
        return path

    # -- the loop ----------------------------------------------------------------------
    def log_line(self, r: dict) -> str:
        return (f" iteration {r['iter']:8d}/{self.tcfg.train_iters:8d} |"
                f" consumed samples: {r['consumed_samples']:10d} |"
                f" elapsed time per iteration (ms): {1e3 * r['step_time_s']:.1f} |"
                f" learning rate: {r['lr']:.3E} | global batch size: {self.tcfg.global_batch_size:5d} |"
                f" lm loss: {r['loss']:.6E} | grad norm: {r['grad_norm']:.3f} |"
                f" skipped iterations: {r['skipped']} | tokens/s: {r['tokens_per_s']:.0f} |"
                f" TFLOP/s: {r['tflops']:.3f} | MFU: {100 * r['mfu']:.1f}%")

    @staticmethod
    def timers_line(timers_ms: dict) -> str:
        return " time per iteration (ms), min/max over ranks | " + " | ".join(
            f"{name}: {lo:.1f}/{hi:.1f}" for name, (lo, hi) in timers_ms.items())

    def banner(self) -> str:
        m, t, g = self.mcfg, self.tcfg, self.grid
        return (f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
                f"heads, seq {m.seq_length}, vocab {m.vocab_size} (padded {m.padded_vocab}), "
                f"{self.model.params.numel:,} parameters, {t.dtype}\n"
                f"layout: {g.describe()}; global batch {t.global_batch_size} = data-parallel "
                f"{g.dp_size} x {t.global_batch_size // (g.dp_size * t.micro_batch_size)} "
                f"micro-batches x {t.micro_batch_size} sequences; gradient buckets: "
                f"{len(self.reducer.buckets) if self.reducer else 0}; measured GEMM rate "
                f"{self.gemm_rate / 1e9:.1f} GFLOP/s per rank\n" + self.memory_line())

    def memory_line(self) -> str:
        mem, mb = self.memory_report(), 1 / 2**20
        stage = self.pcfg.zero_stage
        held = mem["params"] + mem["grads"] + mem["optimizer"] + mem["optimizer_offloaded"]
        return (f"memory per rank (MiB): parameters {mem['params'] * mb:.1f}, gradients "
                f"{mem['grads'] * mb:.1f}, optimizer {mem['optimizer'] * mb:.1f}"
                + (f" (+ {mem['optimizer_offloaded'] * mb:.1f} on disk)" if mem["optimizer_offloaded"] else "")
                + f"; total {held * mb:.1f}, ZeRO-{stage}"
                + (" (node-shared parameters)" if self.pcfg.dp_shared_memory else "")
                + f" formula {mem['formula'] * mb:.1f}")

    def run(self) -> list[dict]:
        t, rank0 = self.tcfg, self.grid.rank == 0
        self.log(self.banner())
        jsonl = open(t.log_jsonl, "a" if t.load else "w") if (t.log_jsonl and rank0) else None
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=t.train_iters, initial=self.iteration, unit="it", disable=None,
                       dynamic_ncols=True)
            self.log = bar.write
        last_log = self.iteration
        try:
            while self.iteration < t.train_iters:
                r = self.train_step()
                last = self.iteration == t.train_iters
                stop = bool(t.exit_interval) and self.iteration % t.exit_interval == 0
                if t.eval_iters and ((t.eval_interval and self.iteration % t.eval_interval == 0)
                                     or last):
                    r["val_loss"] = self.evaluate()
                logging = self.iteration % t.log_interval == 0 or last or stop
                if logging and self.timers.level:
                    n = self.iteration - last_log
                    r["timers_ms"] = {k: [1e3 * lo / n, 1e3 * hi / n]
                                      for k, (lo, hi) in self.timers.summary(self.grid.world).items()}
                    last_log = self.iteration
                self.history.append(r)
                if jsonl:
                    jsonl.write(json.dumps(r) + "\n")
                    jsonl.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}")
                if logging:
                    self.log(self.log_line(r))
                    if "timers_ms" in r:
                        self.log(self.timers_line(r["timers_ms"]))
                if "val_loss" in r:
                    self.log(f" validation loss at iteration {r['iter']}: {r['val_loss']:.6E} | "
                             f"perplexity: {math.exp(min(r['val_loss'], 50)):.3f}")
                if t.save and ((t.save_interval and self.iteration % t.save_interval == 0)
                               or last or stop):
                    self.save()
                if stop:
                    self.log(f"exiting at iteration {self.iteration} (--exit-interval)")
                    break
        finally:
            if bar is not None:
                bar.close()
            if jsonl:
                jsonl.close()
        return self.history
