"""One optimizer step on one rank, and one evaluation pass.

    batches     this rank's micro-batches of the step (refgpt.engine.batches)
    forward, backward
                micro-batch by micro-batch, gradients accumulating in the model's buffer;
                or with --layered-gradient-accumulation unit by unit, each unit running all
                the micro-batches (refgpt.nn.gpt: GPT.forward_layered) so that its gradient is
                reduced once per step;
                or, with pipeline parallelism, by the schedule's executor
                (refgpt.parallel.pipeline), forwards and backwards interleaved over the stages
    grads-all-reduce
                as backward finishes each unit's gradients, the model completes them over its
                own groups (sequence parallelism's replicated parameters, the pipeline's tied
                token table) and the gradient sync (refgpt.parallel.sync) starts their sum
                over the data-parallel group: during the last micro-batch's backward (every
                micro-batch's for ZeRO 2-3), after the schedule's flush with pipelining
    optimizer   the global gradient norm (each element counted once over the world), clipping
                (unless the sync only estimates the norm: 1-bit Adam past its warm-up),
                AdamW on what this rank updates (all of it, or its ZeRO shard), then the sync
                makes the updated parameters readable everywhere; a step whose norm is not
                finite is skipped on every rank alike

Loss scaling (16-bit runs, refgpt.optim.scaler): the micro-batches' losses are normalised by
norm / S instead of norm, so backward yields S times the gradients; the reported loss is
divided by S again and the gradients are multiplied by clip / S in one pass (S a power of two:
both exact). The norm of the scaled gradients, over the world, decides the overflow for every
rank at once.

Each phase is a timer (refgpt.timers), and where a phase begins is where a test injects a
fault (refgpt.engine.faults).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from ..precision import is_half
from ..optim import ConstantScaler, clip_coefficient
from ..parallel.pipeline import PipelineExecutor


class Step:
    def __init__(self, model, sync, opt, grid, timers, pipeline: PipelineExecutor | None = None,
                 clip: float = 0.0, scaler=None, layered: bool = False):
        """layered: layered gradient accumulation (--layered-gradient-accumulation)."""
        self.model, self.sync, self.opt, self.grid = model, sync, opt, grid
        self.timers, self.pipeline, self.clip = timers, pipeline, clip
        self.layered = layered
        self.scaler = scaler or ConstantScaler()

    def run(self, batches: list[tuple], norm: float, lr: float) -> tuple[float, float, bool]:
        """(loss of the global batch, gradient norm, whether the step was skipped). In 16-bit
        runs an overflow is what loss scaling expects (the step is skipped and reported as
        such), so NumPy's warnings about it are not printed."""
        quiet = is_half(self.model.params.dtype)
        with np.errstate(over="ignore", invalid="ignore") if quiet else contextlib.nullcontext():
            return self._run(batches, norm, lr)

    def _run(self, batches, norm: float, lr: float) -> tuple[float, float, bool]:
        scale = self.scaler.scale
        self.model.params.zero_grad()
        self.model.activations.reset()              # its peak: this step's (the registry's)
        if self.layered:
            loss = self._layered(batches, norm / scale)
        elif self.pipeline is None:
            loss = self._accumulate(batches, norm / scale)
        else:
            loss = self._pipelined(batches, norm / scale)
        with self.timers("grads-all-reduce"):
            loss = self._sum(loss, self.grid.dp_comm) / scale
        with self.timers("optimizer"):
            squares = self._sum(self.sync.grad_squares(self.model.counted), self.grid.world)
            gnorm = math.sqrt(squares) / scale
            skipped = not math.isfinite(gnorm)
            self.scaler.update(skipped)
            if not skipped:
                clip = self.clip if self.sync.exact_norm else 0.0       # (an estimate)
                coef = clip_coefficient(clip, gnorm) / scale
                if coef != 1.0:
                    self.opt.g *= coef
                self.opt.step(lr)
                self.sync.after_step()
        return loss, gnorm, skipped

    def _accumulate(self, batches, norm: float) -> float:
        """Micro-batch after micro-batch; the gradients of those that reduce are summed as
        backward finishes them."""
        timers, sync, loss = self.timers, self.sync, 0.0
        for j, (x, y, key) in enumerate(batches):
            with timers("forward"):
                loss += self.model.forward(x, y, norm, key)
            self.model.activations.sample()
            reduce = j == len(batches) - 1 or sync.reduces_every_micro_batch
            if reduce:
                sync.start()
            with timers("backward"):
                self.model.backward(on_ready=self._ready if reduce else None)
            if reduce:
                self._finish_reduction()
        return loss

    def _finish_reduction(self) -> None:
        """Wait for the gradient sums; what backward waited for the network inside it counts
        as the reduction's time, not backward's."""
        timers, sync = self.timers, self.sync
        timers.add("backward", -sync.blocked_s)
        timers.add("grads-all-reduce", sync.blocked_s)
        with timers("grads-all-reduce"):
            sync.finish()

    def _layered(self, batches, norm: float) -> float:
        """Layered gradient accumulation (GPT.forward_layered): every micro-batch through one
        unit before the next; each unit's gradient summed over the data-parallel group once
        per step, as backward finishes it for the last micro-batch. The head's forward runs
        in the backward pass (and is timed there)."""
        timers, sync = self.timers, self.sync
        with timers("forward"):
            hidden = self.model.forward_layered(batches, norm)
        self.model.activations.sample()
        sync.start()
        with timers("backward"):
            loss = self.model.backward_layered(hidden, batches, norm, on_ready=self._ready)
        self._finish_reduction()
        return loss

    def _ready(self, names) -> None:
        self.model.complete_grads(names)
        self.sync.ready(names)

    def _pipelined(self, batches, norm: float) -> float:
        """The schedule, then every gradient completed and summed (after the flush)."""
        timers = self.timers
        t0, busy = time.perf_counter(), timers.elapsed["forward"] + timers.elapsed["backward"]
        loss = self.pipeline.run(batches, norm, timers)
        busy = timers.elapsed["forward"] + timers.elapsed["backward"] - busy
        timers.add("pipeline-bubble", time.perf_counter() - t0 - busy)
        with timers("grads-all-reduce"):
            names = list(self.model.params)
            self.model.complete_grads(names)
            self.sync.start()
            self.sync.ready(names)
            self.sync.finish()
        return self._sum(loss, self.grid.pp_comm)          # held by the last stage

    def evaluate(self, batches: list[tuple], norm: float) -> float:
        """The summed loss of the validation micro-batches over the data-parallel group."""
        model, total = self.model, 0.0
        model.set_grad_enabled(False)
        try:
            if self.pipeline is None:
                for x, y, _ in batches:
                    total += model.forward(x, y, norm)
            else:
                p = self.pipeline
                runner = PipelineExecutor(model, "forward", len(batches), p.act_shape, p.dtype)
                total = self._sum(runner.run(batches, norm), self.grid.pp_comm)
        finally:
            model.set_grad_enabled(True)
        return self._sum(total, self.grid.dp_comm)

    @staticmethod
    def _sum(value: float, comm) -> float:
        """value summed over comm, as a buffer all-reduce: mpi4py lets other threads run
        while it waits (the watchdog, refgpt.engine.watchdog), which its pickling
        allreduce does not."""
        if comm is None:
            return value
        from mpi4py import MPI
        buf = np.array([value], dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, buf)
        return float(buf[0])
