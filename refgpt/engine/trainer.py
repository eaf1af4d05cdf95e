"""The training loop of one rank: set-up, steps, evaluation, checkpoints and logs.

Set-up resolves the model's shape (from a checkpoint being resumed, or the data's
vocabulary), validates the whole configuration once (refgpt.parallel.build.check_layout),
then prepares the data, builds the rank's model and gradient sync (refgpt.parallel.build)
under the run's backend (refgpt.backend), makes AdamW over what the rank updates and restores
a checkpoint. ``run`` then trains: a step (refgpt.engine.step), evaluation and saving at
their intervals, a log line (refgpt.engine.report).
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path


from .. import metrics
from ..backend import Backend, synchronize
from ..checkpoint import clean_stale, open_checkpoint, read_training_state, unwritable
from ..data.corpus import cache_dir
from ..cli import CheckpointError
from ..config import ConfigError, ModelConfig, ParallelConfig
from ..precision import compute_dtype, dtype_of, is_half
from ..optim import (AdamW, Lamb, MasterAdamW, MasterLamb, OnebitAdam, learning_rate,
                     make_scaler)
from ..parallel.build import build, check_layout, lamb_norms
from ..parallel.compressed import CompressedAllreduce
from ..parallel.grid import Grid
from ..parallel.sync import OnebitGrads
from ..parallel.threads import node_memory, ranks_on_node
from ..parallel.zero import offload_moments
from ..timers import Timers
from . import checkpoints, report
from .batches import Batches, data_folder, fit_vocabulary
from .faults import Faults
from .signals import ExitSignals
from .watchdog import Watchdog
from .step import Step
from .warmup import KernelWarmup


def on_backend(method):
    """Run the method under the trainer's backend (refgpt.backend: a context)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.backend:
            return method(self, *args, **kwargs)
    return call


class Trainer:
    """Owns the model, optimizer and data of one rank; ``run()`` trains and returns the log
    (the same on every rank: losses and norms are reduced over the data-parallel group)."""

    def __init__(self, mcfg: ModelConfig, tcfg, pcfg: ParallelConfig | None = None,
                 grid: Grid | None = None, given: set = frozenset(), log=print,
                 progress: bool = False):
        """given: the settings the user gave (a data folder's vocabulary yields to
        --vocab-size). Raises ConfigError (or CheckpointError, FileNotFoundError) before any
        work if the configuration cannot run."""
        self.pcfg, self.grid = pcfg or ParallelConfig(), grid or Grid()
        g = self.grid
        self.log = log if g.rank == 0 else (lambda *_: None)
        self.progress = progress and g.rank == 0
        if tcfg.load:                               # the model's shape is the checkpoint's
            mcfg = ModelConfig.from_dict(read_training_state(tcfg.load)[1]["model"])
        fit_vocabulary(mcfg, tcfg, given, bool(tcfg.load))
        check_layout(mcfg, tcfg, self.pcfg, g.tp_size, g.dp_size, g.pp_size)
        if tcfg.backend == "cupy" and importlib.util.find_spec("cupy") is None:
            raise ConfigError("--backend cupy needs CuPy, which is not installed: pip install "
                              "cupy-cuda12x (or the wheel for your CUDA version)")
        if tcfg.save:                               # every rank writes its part: each judges,
            problem = unwritable(tcfg.save)         # and all agree before any collective
            if g.world is not None:
                problem = next((q for q in g.world.allgather(problem) if q), None)
            if problem:
                raise CheckpointError(problem)
        self.mcfg, self.tcfg = mcfg, tcfg
        self.activation_formulas = report.activation_formulas(mcfg, tcfg, self.pcfg, g)
        self._check_fits()
        ckpt = open_checkpoint(tcfg.load) if tcfg.load else None
        if ckpt is not None:
            self.log(f"resuming from {ckpt.folder} (iteration {ckpt.state['iteration']}); "
                     f"model shape taken from the checkpoint")
        warmup = KernelWarmup(tcfg.backend, tcfg.dtype, g.world)     # while the data is prepared
        self.batches = Batches(mcfg, tcfg, g, data_folder(tcfg, mcfg, g.world, self.log))
        self.faults = Faults(g.rank)
        self.watchdog = None                         # started by run(), on several ranks
        self.timers = Timers(self.pcfg.timing_log_level, g.world, on_enter=self.entering)
        self.backend = Backend(tcfg.backend, tf32=tcfg.tf32)
        self.backend.use_gpu(g.rank)
        self.iteration, self.consumed, self.history = 0, 0, []
        self.pending_save = None                     # a background checkpoint (--async-save)
        self._set_up(ckpt)
        warmup.wait(self.log)
        self.gemm = self._gemm_rate()
        self.faults("init")

    def _check_fits(self) -> None:
        """Refuse, before allocating, a model whose estimated memory on this node (each rank's
        estimate times the ranks here) exceeds the node's physical memory: NumPy would fail
        at the first array too big, after start-up, with a traceback. (A GPU's memory is
        CuPy's to report.)"""
        g, t = self.grid, self.tcfg
        if t.backend == "cupy":
            return
        need = report.estimated_bytes(self.mcfg, t, self.pcfg, g,
                                      self.activation_formulas["activations_korthikanti"])
        here = ranks_on_node(g.world)
        have = node_memory()
        if need * here > have:
            raise ConfigError(f"this model needs an estimated {need / 2**30:,.1f} GiB per rank "
                              f"({here} rank(s) on this node: {need * here / 2**30:,.1f} GiB) "
                              f"and this node has {have / 2**30:,.1f} GiB: shrink the model or "
                              f"spread it (--zero-stage, --tensor-model-parallel-size, "
                              f"--pipeline-model-parallel-size, more nodes)")

    @on_backend
    def _set_up(self, ckpt) -> None:
        built = build(self.mcfg, self.tcfg, self.pcfg, self.grid)
        self.model, self.sync = built.model, built.sync
        self.opt = self._optimizer(self.model.params)
        if isinstance(self.opt, OnebitAdam):          # its warm-up's sum, then none
            self.sync = OnebitGrads(self.sync, self.model.params, self.opt)
        self.scaler = make_scaler(self.tcfg)
        self.step = Step(self.model, self.sync, self.opt, self.grid, self.timers,
                         built.pipeline, self.tcfg.clip_grad, self.scaler,
                         self.pcfg.layered_gradient_accumulation)
        if ckpt is not None:
            checkpoints.restore(ckpt, self.model, self.opt, self.mcfg, self.grid)
            self.scaler.load_state_dict(ckpt.state.get("loss_scaler", self.scaler.state_dict()))
            self.iteration = ckpt.state["iteration"]
            self.consumed = ckpt.state["consumed_samples"]

    @on_backend
    def _gemm_rate(self) -> metrics.GemmRate:
        """The GEMM rate MFU is against (refgpt.metrics): measured, and the best kept."""
        dtype = dtype_of(self.tcfg.dtype)
        return metrics.GemmRate.measure(dtype, metrics.machine_key(self.tcfg.backend, dtype),
                                        cache_dir() / "gemm-rates.json")

    @property
    def gemm_rate(self) -> float:
        return self.gemm.rate

    def _optimizer(self, p) -> AdamW:
        """AdamW over what this rank updates: the whole buffer, or with ZeRO its shard; in a
        16-bit run, on fp32 master weights of it (refgpt.optim.mixed)."""
        t = self.tcfg
        n = p.shard_size
        decay = [(at, at + b - a) for lo, hi in p.decay_ranges()
                 for a, b, at in p.in_shard(lo, hi)]
        folder, state = self.pcfg.offload_optimizer, compute_dtype(p.dtype)
        moments = (offload_moments(folder, self.grid.rank, n, state) if folder else None)
        if folder:
            self.log(f"AdamW's moments are memory-mapped files in {folder} (rank*.exp_avg.npy, "
                     f"rank*.exp_avg_sq.npy; {2 * n * state.itemsize / 2**20:.1f} MiB "
                     f"for rank 0); they stay after the run: checkpoints hold the moments, so "
                     f"delete the folder when done")
        settings = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                        weight_decay=t.weight_decay, moments=moments)
        if t.optimizer == "lamb":
            names = sorted(p.slices, key=p.slices.get)
            pieces = [[(at, at + b - a) for a, b, at in p.in_shard(*p.slices[n])] for n in names]
            norms = lamb_norms(self.grid, names, self.model.parts.counted,
                               bool(self.pcfg.zero_stage))
            kind = MasterLamb if is_half(p.dtype) else Lamb
            return kind(p.param_shard(), p.grad_shard(), decay, tensors=pieces, norms=norms,
                        **settings)
        if t.optimizer == "onebit-adam":            # whole replicas (check_layout)
            d = self.grid.dp_size
            compress = (CompressedAllreduce(self.grid.dp_comm, list(p.slices.values()),
                                            p.dtype) if d > 1 else None)
            return OnebitAdam(p.param_shard(), p.grad_shard(), decay, t.onebit_warmup_iters, d,
                              compress, **settings)
        kind = MasterAdamW if is_half(p.dtype) else AdamW
        return kind(p.param_shard(), p.grad_shard(), decay, **settings)

    def close(self) -> None:
        """Free what the run holds in memory shared between ranks (--dp-shared-memory's
        windows); collective: every rank calls it. The trainer cannot train afterwards (one
        job that runs several trainers in turn, as the scaling study does, calls it)."""
        params, sync = self.model.params, self.sync
        self.model = self.opt = self.sync = self.step = None
        if sync is not params:                  # (ZeRO's storage is its own sync)
            sync.free()
        params.free()

    # -- one optimizer step ------------------------------------------------------------------
    def lr_at(self, iteration: int) -> float:
        t = self.tcfg
        return learning_rate(iteration, lr=t.lr, min_lr=t.min_lr, warmup=t.lr_warmup_iters,
                             decay_iters=t.lr_decay_iters or t.train_iters, style=t.lr_decay_style,
                             init=t.lr_warmup_init)

    @on_backend
    def train_step(self) -> dict:
        t0, traffic = time.perf_counter(), self.sync.comm_bytes
        with self.timers("batch-generator"):
            batches = self.batches.step(self.consumed, self.iteration)
        lr = self.lr_at(self.iteration)
        loss, gnorm, skipped = self.step.run(batches, self.batches.norm, lr)
        self.iteration += 1
        self.consumed += self.tcfg.global_batch_size
        synchronize()
        seconds = time.perf_counter() - t0
        self.gemm.observe(metrics.model_flops(self.mcfg, self.tcfg.global_batch_size)
                          / seconds / self.grid.world_size)
        record = report.step_record(self.mcfg, self.tcfg, self.iteration, self.consumed, loss,
                                    lr, gnorm, skipped, seconds, self.gemm_rate,
                                    self.grid.world_size, self.sync.comm_bytes - traffic,
                                    self.memory(), self.scaler.scale)
        if self.mcfg.num_experts:
            record["moe"] = report.moe_record(self.mcfg, self.model.moe_layers, self.grid)
        return record

    def entering(self, phase: str) -> None:
        """Each phase as it starts: the fault injection's hook and the watchdog's position."""
        self.faults(phase)
        if self.watchdog is not None:
            self.watchdog.note(self.iteration, phase)

    @on_backend
    def evaluate(self) -> float:
        """Mean loss over eval_iters global batches of the validation split, in order; the
        batches are shared out over the data-parallel ranks like training batches."""
        self.entering("evaluation")
        return self.step.evaluate(*self.batches.validation())

    def memory(self) -> dict:
        return {**report.memory(self.model.params, self.opt, self.pcfg, self.model.activations),
                **self.activation_formulas}

    @on_backend
    def save(self, background: bool = False) -> Path | None:
        """Every rank writes what it owns (refgpt.engine.checkpoints); background: the files
        are written by a thread and the checkpoint finished later (``poll_save``). A save
        still under way is finished first."""
        self.finish_save()
        self.entering("checkpoint")
        t = self.tcfg
        state = {"consumed_samples": self.consumed, "dtype": t.dtype, "seed": t.seed,
                 "model": self.mcfg.to_dict(), "train": t.to_dict(),
                 "loss_scaler": self.scaler.state_dict()}
        pending = checkpoints.start_save(t.save, self.iteration, self.model, self.opt, self.grid,
                                         state, self.batches.tokenizer, t.save_retention,
                                         background)
        if background:
            self.pending_save = pending
            self.log(f"saving iteration {self.iteration} in the background")
            return None
        return self._finished(pending)

    def poll_save(self) -> None:
        """Finish a background save whose files are all written (collective; a step's end)."""
        if self.pending_save is not None and checkpoints.all_written(self.pending_save, self.grid):
            self.finish_save()

    def finish_save(self) -> None:
        """Wait for a background save and finish it (collective)."""
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            self._finished(pending)

    def _finished(self, pending) -> Path | None:
        path = pending.finish(self.grid)
        if path is not None:
            self.log(f"saved checkpoint {path}")
        return path

    # -- the loop ------------------------------------------------------------------------------
    @on_backend
    def run(self) -> list[dict]:
        t, rank0 = self.tcfg, self.grid.rank == 0
        if rank0 and t.save:
            for stale in clean_stale(t.save):
                self.log(f"removed {stale}, left by an interrupted save")
        self.log(report.banner(self.mcfg, t, self.pcfg, self.grid, self.model.params.numel,
                               len(self.sync.buckets), self.gemm_rate,
                               self.memory()))
        records = report.RunLog(t, self.iteration, self.log if rank0 else None, self.progress)
        self.log = records.say
        last_log = self.iteration
        minutes = self.pcfg.distributed_timeout_minutes
        if self.grid.world is not None and self.grid.world_size > 1 and minutes > 0:
            self.watchdog = Watchdog(self.grid.world, minutes)
        finished = False
        with ExitSignals(t.exit_signal_handler) as signals:
            try:
                while self.iteration < t.train_iters:
                    r = self.train_step()
                    last = self.iteration == t.train_iters
                    signalled = signals.agreed(self.grid.world)
                    stop = (signalled is not None
                            or bool(t.exit_interval) and self.iteration % t.exit_interval == 0)
                    if t.eval_iters and ((t.eval_interval and self.iteration % t.eval_interval == 0)
                                         or last):
                        r["val_loss"] = self.evaluate()
                    logging = self.iteration % t.log_interval == 0 or last or stop
                    if logging and self.timers.level:
                        n = self.iteration - last_log
                        r["timers_ms"] = {k: [1e3 * lo / n, 1e3 * hi / n]
                                          for k, (lo, hi) in self.timers.summary(self.grid.world).items()}
                    if logging:
                        last_log = self.iteration
                    self.history.append(r)
                    records.add(r, logging)
                    self.poll_save()
                    if t.save and (last or stop):
                        self.save()
                    elif t.save and t.save_interval and self.iteration % t.save_interval == 0:
                        self.save(background=t.async_save)
                    if stop:
                        why = f"on {signalled}" if signalled else "(--exit-interval)"
                        self.log(f"exiting at iteration {self.iteration} {why}"
                                 + (", checkpoint saved" if t.save else ""))
                        break
                finished = True
            finally:
                records.close()
                if rank0:
                    self.gemm.save()
                if self.watchdog is not None:        # collective only when every rank is here
                    self.watchdog.close(collective=finished)
                    self.watchdog = None
        return self.history
