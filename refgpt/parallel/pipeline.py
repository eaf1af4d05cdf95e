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

import contextlib
import time
from collections import deque

import numpy as np

from ..backend import to_device, to_host
from ..config import ConfigError
from ..nn.activations import ActivationMeter, held_bytes
from ..nn.gpt import GPT, Stage, param_specs
from ..nn.linear import Linear
from ..nn.params import Params
from ..nn.recompute import watch_recomputation
from ..nn.sublayers import Sublayers
from .schedules import COST, check, forward_only_ops, instructions
from .wire import moved, sum_op


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
    """This rank's chunks of the model (refgpt.nn.GPT over a range of blocks each) over one
    flat parameter buffer, in the layout the sublayers give (tensor-parallel chunks hold
    shards); the model interface of refgpt.nn.GPT, with the chunks run by PipelineExecutor."""

    def __init__(self, cfg, dtype, seed: int, grid, v: int, parts=None, make_params=Params,
                 recompute=lambda blocks: 0, recompute_chunk: int = 1,
                 recompute_attention: bool = False):
        """recompute(blocks): how many of a chunk's blocks recompute, in chunks of
        recompute_chunk blocks (refgpt.nn.recompute);
        recompute_attention: every block recomputes its attention core (selective)."""
        p, r = grid.pp_size, grid.pp_rank
        self.cfg, self.grid, self.v = cfg, grid, v
        self.stages = [stage_of(c * p + r, p, v, cfg.num_layers) for c in range(v)]
        self.parts = parts = parts or Sublayers(cfg, seed)
        specs = [s for st in self.stages for s in param_specs(cfg, st) if parts.holds(s.name)]
        self.params = make_params(parts.local_specs(specs), dtype)
        self.params.initialise(seed, parts.shard)
        self.chunks = [GPT(cfg, dtype, seed, st, self.params, parts,
                           recompute=recompute(len(st.blocks)), recompute_chunk=recompute_chunk,
                           recompute_attention=recompute_attention) for st in self.stages]
        self.layers = [layer for ch in self.chunks for layer in ch.layers]
        self.moe_layers = [m for ch in self.chunks for m in ch.moe_layers]
        self.linears = [[l for l in ch.layers if isinstance(l, Linear)] for ch in self.chunks]
        self.first, self.last = self.stages[0].first, self.stages[-1].last
        first = self.chunks[0].blocks[0].layers if self.chunks[0].blocks else ()
        self.activations = ActivationMeter(self.layers, first)  # sampled by the chunks when
        for ch in self.chunks:                                  # they recompute, and by the
            watch_recomputation(ch.blocks, self.activations)    # executor after each op

    def set_grad_enabled(self, enabled: bool) -> None:
        for ch in self.chunks:
            ch.set_grad_enabled(enabled)

    def complete_grads(self, names) -> None:
        """The layout's sums, then the two copies of the tied token table summed between the
        first and the last stage, so they stay equal."""
        self.parts.complete_grads(self.params, names)
        emb = self.grid.emb_comm
        if emb is not None and "wte.weight" in names:
            from mpi4py import MPI
            wte = self.params.grads["wte.weight"]
            buf = to_host(wte)                         # wte itself on a CPU: summed in place
            emb.Allreduce(MPI.IN_PLACE, moved(buf), op=sum_op(buf.dtype))
            if buf is not wte:
                wte[...] = to_device(buf)

    def counted(self, name: str) -> bool:
        """As the layout says, with the last stage's wte copy counted on the first only."""
        copy = name == "wte.weight" and self.last and not self.first
        return not copy and self.parts.counted(name)

    def full_tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """This rank's tensors of a params-shaped buffer, TP parts gathered (collective)."""
        return self.parts.full_tensors(self.params, flat)

    def shard(self, name: str, value: np.ndarray) -> np.ndarray:
        return self.parts.shard(name, value)

    def shard_index(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        spec = self.params.specs[name]
        return self.parts.shard_index(name, spec.full_shape or spec.shape)



class PipelineExecutor:
    """Runs one rank's instructions; schedule "forward" is evaluation (forwards only)."""

    def __init__(self, model: PipelineModel, schedule: str, micro_batches: int, act_shape, dtype):
        g, p, v = model.grid, model.grid.pp_size, model.v
        self.model, self.comm = model, g.pp_comm
        ops = forward_only_ops(p, micro_batches, v) if schedule == "forward" else None
        self.program = instructions(p, micro_batches, v, schedule, ops)[g.pp_rank]
        self.act_shape, self.dtype = act_shape, dtype

    def run(self, batches, norm: float, timers=None, trace: list | None = None,
            op_cost: float = 0.0) -> float:
        """Run one step's instructions over the micro-batches [(x, y, key), ...]; returns the
        sum of the micro-batch losses on the rank holding the last stage, 0 elsewhere.

        timers: refgpt.timers.Timers, which times each compute op, from when its input is at
        hand, as "forward" (F) or "backward" (B, BW and W), with no barrier. trace: a list that
        receives (kind, micro-batch, chunk, start s, end s, bytes held for backward after the
        op, zero-bubble W inputs included) for every compute op. op_cost: seconds added to each
        op per unit of cost (F = B = W = 1, BW = 2, divided by v), to measure a schedule's
        bubble with known, equal op costs."""
        from mpi4py import MPI
        comm = self.comm
        recvs = {}
        for op in self.program:                       # every receive of the step, posted now
            if op.kind.startswith("RECV"):
                buf = np.empty(self.act_shape, self.dtype)
                recvs[(op.kind, op.mb, op.chunk)] = (comm.Irecv(moved(buf), source=op.peer,
                                                                tag=op.tag), buf)
        self.outputs, sends, loss = {}, [], 0.0
        self.w_queue = [deque() for _ in self.model.chunks]
        meter = self.model.activations                # held for backward: peak of the step
        meter.more = self._queued
        phase = timers or (lambda name, barrier: contextlib.nullcontext())

        def received(kind, op):
            req, buf = recvs.pop((kind, op.mb, op.chunk))
            req.Wait()
            return to_device(buf)                     # a GPU array under the cupy backend

        for op in self.program:
            chunk = self.model.chunks[op.chunk]
            if op.kind in COST:
                inp = None                            # the op's input from a neighbour, if any
                if op.kind == "F" and chunk.embed is None:
                    inp = received("RECV_ACT", op)
                elif op.kind in ("B", "BW") and chunk.head is None:
                    inp = received("RECV_GRAD", op)
                with phase("forward" if op.kind == "F" else "backward", barrier=False):
                    t0 = time.perf_counter()
                    loss += self._compute(op, chunk, inp, batches, norm)
                    if op_cost:
                        time.sleep(op_cost * COST[op.kind] / self.model.v)
                meter.sample()
                if trace is not None:
                    trace.append((op.kind, op.mb, op.chunk, t0, time.perf_counter(),
                                  held_bytes(self.model.layers, self._queued())))
            elif op.kind in ("SEND_ACT", "SEND_GRAD"):
                kind = "act" if op.kind == "SEND_ACT" else "grad"
                buf = np.ascontiguousarray(to_host(self.outputs.pop((kind, op.mb, op.chunk))),
                                           self.dtype)
                sends.append((comm.Isend(moved(buf), dest=op.peer, tag=op.tag), buf))
            elif op.kind == "STEP":
                MPI.Request.Waitall([req for req, _ in sends])
        return loss

    def _queued(self) -> list:
        """The inputs of zero-bubble's deferred weight-gradient GEMMs (held until W)."""
        return [(x, dy) for q in self.w_queue for store in q for _, x, dy in store]

    def _compute(self, op, chunk, inp, batches, norm: float) -> float:
        """One compute op; returns its loss (a last stage's forward), else 0. What it sends on
        waits in self.outputs; zero-bubble's B queues its weight gradients for the W op."""
        linears = self.model.linears[op.chunk]
        if op.kind == "F":
            x, y, key = batches[op.mb]
            out = chunk.forward(x if inp is None else inp, y, norm, key)
            if chunk.head is not None:
                return out
            self.outputs[("act", op.mb, op.chunk)] = out
        elif op.kind in ("B", "BW"):
            if op.kind == "B":                        # weight gradients deferred to W
                store = []
                for lin in linears:
                    lin.defer = store
                self.w_queue[op.chunk].append(store)
            din = chunk.backward(inp)
            for lin in linears:
                lin.defer = None
            if din is not None:
                self.outputs[("grad", op.mb, op.chunk)] = din
        else:                                         # W
            for lin, x2, dy2 in self.w_queue[op.chunk].popleft():
                lin.weight_grad(x2, dy2)
        return 0.0
