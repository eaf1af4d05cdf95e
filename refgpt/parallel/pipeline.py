"""Pipeline parallelism: the model's blocks split over p ranks (v chunks each with the
interleaved schedule), run by the instruction lists of refgpt.parallel.schedules.

Global stage g = c p + r (chunk c of pipeline rank r) holds blocks [g L/(pv), (g+1) L/(pv));
stage 0 also holds the embeddings, stage pv-1 the final LayerNorm, the head and the loss.
The token table is tied: the first and the last stage each hold a copy (initialised alike
from the same named stream) and the gradients of the two copies are summed after every step
(an all-reduce between those two ranks), so they stay equal.

The executor posts every receive of the step before it starts (the schedule knows them all),
sends each activation or gradient as soon as it exists (Isend), and waits for a receive just
before the op that consumes it, so a rank waits only for real data dependencies; messages are
matched by tag = (direction, chunk, micro-batch), and all sends are completed before the
optimizer step. Zero-bubble (ZB-H1) backward runs B with the linear layers' weight-gradient
GEMMs deferred into a per-chunk queue, and W runs the oldest entry.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..backend import to_device, to_host
from ..config import ConfigError
from ..nn.gpt import GPT, Stage, param_specs
from ..nn.linear import Linear
from ..nn.params import Params
from ..optim.clip import sum_squares
from .schedules import COST, check, forward_only_ops, instructions
from .tensor2d import Linear2D, ParallelGPT2D, block2d, full_tensors_2d, local_specs_2d
from .tensor import (ParallelGPT, counted_once, full_tensors, grad_squares, local_specs, rank_shard,
                     reduce_replicated_grads)


def stage_of(g: int, p: int, v: int, num_layers: int) -> Stage:
    per = num_layers // (p * v)
    return Stage(range(g * per, (g + 1) * per), g == 0, g == p * v - 1)


def check_pipeline(cfg, p: int, v: int, micro_batches: int, schedule: str) -> None:
    if cfg.num_layers % (p * v):
        raise ConfigError(f"--num-layers {cfg.num_layers} is not divisible by the pipeline size "
                          f"{p} x virtual stages {v}")
    try:
        check(p, micro_batches, v, schedule)        # the schedule's own conditions
    except ValueError as e:
        raise ConfigError(f"{e} (micro-batches per rank: --global-batch-size / "
                          f"(--micro-batch-size x data-parallel size))") from None


class PipelineModel:
    """This rank's chunks of the model over one flat parameter buffer; with tp (a TPComm)
    the chunks are tensor-parallel (refgpt.parallel.tensor) and the buffer holds shards."""

    def __init__(self, cfg, dtype, seed: int, grid, v: int, tp=None, sequence_parallel=False,
                 make_params=Params, summa=None, micro_batch: int = 1):
        """summa: a SummaGrid for 2-D tensor-parallel chunks (refgpt.parallel.tensor2d)."""
        p, r = grid.pp_size, grid.pp_rank
        self.cfg, self.grid, self.v, self.tp, self.sp = cfg, grid, v, tp, sequence_parallel
        self.summa = summa
        self.stages = [stage_of(c * p + r, p, v, cfg.num_layers) for c in range(v)]
        specs = [s for st in self.stages for s in param_specs(cfg, st)]
        if summa is not None:
            self.params = make_params(local_specs_2d(specs, summa), dtype)
            self.params.initialise(seed, self.shard)
            self.chunks = [ParallelGPT2D(cfg, dtype, seed, grid.tp_comm, micro_batch, stage=st,
                                         params=self.params, grid=summa) for st in self.stages]
        elif tp is None:
            self.params = make_params(specs, dtype)
            self.params.initialise(seed)
            self.chunks = [GPT(cfg, dtype, seed, st, self.params) for st in self.stages]
        else:
            self.params = make_params(local_specs(specs, tp), dtype)
            self.params.initialise(seed, self.shard)
            self.chunks = [ParallelGPT(cfg, dtype, seed, tp, sequence_parallel, st, self.params)
                           for st in self.stages]
        self.layers = [layer for ch in self.chunks for layer in ch.layers]
        self.linears = [[l for l in ch.layers if isinstance(l, (Linear, Linear2D))]
                        for ch in self.chunks]
        self.first, self.last = self.stages[0].first, self.stages[-1].last

    def set_grad_enabled(self, enabled: bool) -> None:
        for ch in self.chunks:
            ch.set_grad_enabled(enabled)

    def ready_order(self) -> list[list[str]]:
        return [list(reversed(list(self.params)))]

    def owned_once(self, name: str) -> bool:
        """Counts in the gradient norm here: the last stage's wte copy is counted on the first."""
        return not (name == "wte.weight" and self.last and not self.first)

    def norm_counted(self, name: str) -> bool:
        return self.owned_once(name) and (self.tp is None or counted_once(name, self.tp))

    def grad_squares(self) -> float:
        """This rank's share of the squared global gradient norm (sum it over the model-
        parallel group): each parameter once over the pipeline, each shard once over TP
        (2-D chunks come with tp None: every element lives on one TP rank)."""
        if self.tp is not None:
            return grad_squares(self.params, self.tp, self.owned_once)
        return sum(sum_squares(g) for n, g in self.params.grads.items() if self.owned_once(n))

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        if self.summa is not None:
            return block2d(name, value, self.summa.i, self.summa.j, self.summa.q)
        return value if self.tp is None else rank_shard(name, value, self.tp)

    def full_tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """This rank's tensors of a params-shaped buffer, TP shards gathered (collective)."""
        if self.summa is not None:
            return full_tensors_2d(self.params, self.grid.tp_comm, self.summa.q, flat)
        if self.tp is None:
            return {n: flat[lo:hi].reshape(self.params.specs[n].shape)
                    for n, (lo, hi) in self.params.slices.items()}
        return full_tensors(self.params, self.tp, flat)

    def stash_bytes(self) -> int:
        """Bytes of the arrays the layers hold for backward."""
        return sum(a.nbytes for layer in self.layers for ctx in layer.stash for a in ctx
                   if isinstance(a, np.ndarray))

    def reduce_replicated_grads(self) -> None:
        if self.tp is not None:
            reduce_replicated_grads(self.params, self.tp, self.sp, list(self.params))


class PipelineExecutor:
    """Runs one rank's instructions; schedule "forward" is evaluation (forwards only)."""

    def __init__(self, model: PipelineModel, schedule: str, micro_batches: int, act_shape, dtype):
        g, p, v = model.grid, model.grid.pp_size, model.v
        self.model, self.comm = model, g.pp_comm
        ops = forward_only_ops(p, micro_batches, v) if schedule == "forward" else None
        self.program = instructions(p, micro_batches, v, schedule, ops)[g.pp_rank]
        self.act_shape, self.dtype = act_shape, dtype

    def run(self, batches, norm: float, trace: list | None = None, op_cost: float = 0.0) -> float:
        """Run one step's instructions over the micro-batches [(x, y, key), ...]; returns the
        sum of the micro-batch losses on the rank holding the last stage, 0 elsewhere.

        trace: a list that receives (kind, micro-batch, chunk, start s, end s, bytes held
        for backward after the op, zero-bubble W inputs included) for every compute op. op_cost: seconds added to each
        op per unit of cost (F = B = W = 1, BW = 2, divided by v), to measure a schedule's
        bubble with known, equal op costs."""
        from mpi4py import MPI
        chunks, comm = self.model.chunks, self.comm
        recvs = {}
        for op in self.program:                       # every receive of the step, posted now
            if op.kind.startswith("RECV"):
                buf = np.empty(self.act_shape, self.dtype)
                recvs[(op.kind, op.mb, op.chunk)] = (comm.Irecv(buf, source=op.peer, tag=op.tag), buf)
        outputs, sends, loss = {}, [], 0.0
        w_queue = [deque() for _ in chunks]
        self.busy = {"F": 0.0, "B": 0.0, "W": 0.0}  # seconds in compute ops (BW counts as B)

        def received(kind, op):
            req, buf = recvs.pop((kind, op.mb, op.chunk))
            req.Wait()
            return to_device(buf)                     # a GPU array under the cupy backend

        for op in self.program:
            t0 = time.perf_counter()
            chunk = chunks[op.chunk] if op.kind != "STEP" else None
            if op.kind == "F":
                x, y, key = batches[op.mb]
                inp = x if chunk.embed is not None else received("RECV_ACT", op)
                t0 = time.perf_counter()                    # busy from here: input at hand
                out = chunk.forward_stage(inp, y, norm, key)
                if chunk.head is not None:
                    loss += out
                else:
                    outputs[("act", op.mb, op.chunk)] = out
            elif op.kind in ("B", "BW"):
                dout = None if chunk.head is not None else received("RECV_GRAD", op)
                t0 = time.perf_counter()
                if op.kind == "B":
                    store = []
                    for lin in self.model.linears[op.chunk]:
                        lin.defer = store
                    w_queue[op.chunk].append(store)
                din = chunk.backward_stage(dout)
                for lin in self.model.linears[op.chunk]:
                    lin.defer = None
                if din is not None:
                    outputs[("grad", op.mb, op.chunk)] = din
            elif op.kind == "W":
                for lin, x2, dy2 in w_queue[op.chunk].popleft():
                    lin.weight_grad(x2, dy2)
            elif op.kind in ("SEND_ACT", "SEND_GRAD"):
                kind = "act" if op.kind == "SEND_ACT" else "grad"
                buf = np.ascontiguousarray(to_host(outputs.pop((kind, op.mb, op.chunk))),
                                           self.dtype)
                sends.append((comm.Isend(buf, dest=op.peer, tag=op.tag), buf))
            elif op.kind == "STEP":
                MPI.Request.Waitall([req for req, _ in sends])
            if op.kind in COST:
                if op_cost:
                    time.sleep(op_cost * COST[op.kind] / self.model.v)
                self.busy[op.kind[0]] += time.perf_counter() - t0
                if trace is not None:
                    queued = sum(x.nbytes + dy.nbytes for q in w_queue for store in q
                                 for _, x, dy in store)
                    trace.append((op.kind, op.mb, op.chunk, t0, time.perf_counter(),
                                  self.model.stash_bytes() + queued))
        return loss
