"""What a run reports: each step's record (the log line and --log-jsonl's object), the timers,
the start-up banner and the memory registry.

The record's throughput figures follow refgpt.metrics: TFLOP/s by Megatron's formula and by
model FLOPs, and MFU against the GEMM rate measured at start-up. The memory registry is
computed from the buffers this rank holds, not sampled: parameters, gradients and AdamW's
moments (on disk when offloaded), ZeRO's temporaries' high-water mark, beside the ZeRO
formula for the same buffers (refgpt.parallel.zero.formula_bytes), and the peak RSS.
"""

from __future__ import annotations

import json
import math
import resource
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import metrics
from ..optim import MasterAdamW
from ..nn.activations import (Sizes, chunk_bytes, deferred_bytes, korthikanti_bytes,
                              refgpt_bytes, schedule_bytes)
from ..nn.moe import expert_capacity, is_moe_layer
from ..parallel.pipeline import stage_of
from ..parallel.schedules import compute_ops
from ..parallel.zero import formula_bytes
from ..precision import dtype_of

MIB = 1 / 2**20
HALF = ("bfloat16", "float16")


def memory(params, opt, pcfg, activations=None) -> dict[str, int]:
    """The memory registry of this rank (bytes). The optimizer's state is AdamW's moments and,
    in a 16-bit run, the fp32 master weights (refgpt.optim.mixed), and what else it keeps
    (1-bit Adam's compression errors: extra_bytes); activations: the model's
    ActivationMeter, whose peaks of the last step are what the layers held for backward (all,
    and the rank's first block's)."""
    moments = opt.m.nbytes + opt.v.nbytes
    master = opt.p.nbytes if isinstance(opt, MasterAdamW) else 0
    on_disk = isinstance(opt.m, np.memmap)
    state = 2 * opt.m.itemsize + (opt.p.itemsize if master else 0)      # k, per element
    return {"params": params.param_bytes(), "grads": params.grad_bytes(),
            "optimizer": master + (0 if on_disk else moments) + opt.extra_bytes,
            "optimizer_offloaded": moments if on_disk else 0,
            "working_peak": params.working_peak,
            "activations": activations.peak if activations else 0,
            "activations_layer": activations.layer_peak if activations else 0,
            "formula": (params.formula(params.dtype.itemsize, params.grad_dtype.itemsize, state,
                                       shared=pcfg.dp_shared_memory) if pcfg.zero_stage else
                        formula_bytes(0, params.padded, 1, params.dtype.itemsize,
                                      params.grad_dtype.itemsize, state)),
            "peak_rss": peak_rss()}


def estimated_bytes(mcfg, tcfg, pcfg, grid, activations: int) -> int:
    """A rough figure of this rank's memory before anything is allocated: the parameters,
    gradients and optimizer state by ZeRO's formula for its 1/(tp pp) of the model, and the
    activations given (Korthikanti's formula). For refusing what cannot fit, not for planning."""
    from ..nn.gpt import param_specs
    from ..precision import compute_dtype
    n = sum(s.size for s in param_specs(mcfg)) // (grid.tp_size * grid.pp_size)
    dtype = np.dtype(dtype_of(tcfg.dtype))
    state = np.dtype(compute_dtype(dtype)).itemsize
    grad = dtype.itemsize if pcfg.grad_reduce_in_bf16 else state
    k = (0 if pcfg.offload_optimizer else 2 * state) + (state if dtype.itemsize == 2 else 0)
    return formula_bytes(pcfg.zero_stage, n, grid.dp_size, dtype.itemsize, grad, k,
                         shared=pcfg.dp_shared_memory) + activations


def routed(mcfg, tokens: int, ep: int, routing: str = "") -> tuple[int, int, int]:
    """(k, token-expert pairs of a rank's N tokens kept, rows its experts run) in a layer with
    experts (refgpt.nn.activations.block_terms): N k and N k without a capacity c and without
    expert parallelism, whatever the routing; else balanced, K = R = min(N k, E c); worst,
    K the same and R = min(e N min(k, E/e), E c), a bound."""
    k, E = mcfg.moe_router_topk, mcfg.num_experts
    cap = expert_capacity(tokens, mcfg)
    kept = min(tokens * k, E * cap) if cap else tokens * k
    if routing != "worst":
        return k, kept, kept
    rows = ep * tokens * min(k, E // ep)
    return k, kept, min(rows, E * cap) if cap else rows


def activation_formulas(mcfg, tcfg, pcfg, grid, routing: str = "") -> dict[str, int]:
    """This rank's peak activation bytes by refgpt's formula (refgpt.nn.activations), which the
    measured registry equals, and by Korthikanti et al.'s per-layer formula times the rank's
    layers and micro-batches in flight. Under the interleaved schedule refgpt's replays the
    rank's compute ops (schedule_bytes), and under the zero-bubble schedule with what its
    deferred weight gradients hold (deferred_bytes); under context parallelism it counts the
    rank's T / C tokens and what its attention keeps (core_bytes); under 2-D tensor
    parallelism a rank's b / q sequences of h / q (Sizes.summa); in a block with experts, the
    N k token-expert pairs of its N tokens (block_terms), which is exact without expert
    parallelism and without a capacity. Otherwise what a rank's experts keep depends on how
    many tokens they were sent, and routing chooses: "balanced" (every expert sent as many,
    at most its capacity: the planner's figure) or "worst" (every token of the e ranks of
    the expert-parallel group sent to this rank's experts, min(k, E/e) pairs each, or its
    experts full to capacity: a bound). It is 0 where it does not model the layout: the cupy
    backend (its fused attention keeps other arrays), experts whose routing decides (without
    a routing), and
    layered gradient accumulation (every micro-batch's blocks, not its head: Korthikanti's
    counts m micro-batches in flight). Korthikanti's is taken at the rank's
    T / c tokens (its attention term at T / c x T under context parallelism is not modelled
    either)."""
    t, p, r = grid.tp_size, grid.pp_size, grid.pp_rank
    blocks = mcfg.num_layers // (p * pcfg.num_virtual_stages)
    m = tcfg.micro_batches(grid.data_size)
    in_flight = min(p - r, m) if p > 1 else m if pcfg.layered_gradient_accumulation else 1
    dtype = np.dtype(dtype_of(tcfg.dtype))
    e, c = dtype.itemsize, max(dtype.itemsize, 4)
    selective = pcfg.recompute_granularity == "selective"
    recomputed = pcfg.recomputed_blocks(blocks, r)
    q = math.isqrt(t) if pcfg.tensor_parallel_mode == "2d" else 1   # SUMMA's q x q grid
    sizes = Sizes(tcfg.micro_batch_size // q, mcfg.seq_length // grid.cp_size,
                  mcfg.hidden_size // q, mcfg.num_attention_heads // q, mcfg.padded_vocab // q,
                  e, c, t // (q * q), pcfg.sequence_parallel, mcfg.dropout > 0, grid.cp_size,
                  pcfg.cp_comm_type == "a2a", q > 1)
    if mcfg.num_experts:
        sizes = replace(sizes, routed=routed(mcfg, sizes.b * sizes.s,
                                             pcfg.expert_model_parallel_size, routing))
    routing_decides = (pcfg.expert_model_parallel_size > 1
                       or mcfg.moe_expert_capacity_factor > 0)
    covered = (tcfg.backend != "cupy" and not pcfg.layered_gradient_accumulation
               and (not mcfg.num_experts or routing or not routing_decides))

    def moe(chunk: int) -> tuple[bool, ...]:
        """Which blocks of the rank's chunk (global stage chunk p + r) have experts."""
        return tuple(is_moe_layer(mcfg, i) for i in stage_of(
            chunk * p + r, p, pcfg.num_virtual_stages, mcfg.num_layers).blocks)
    chunk = pcfg.recompute_chunk()                    # a recomputed chunk keeps one input
    v = pcfg.num_virtual_stages
    if p > 1 and (v > 1 or pcfg.pipeline_schedule == "zb-h1"):   # chunk c: stage c p + r
        zero_bubble = pcfg.pipeline_schedule == "zb-h1"
        ours = schedule_bytes([chunk_bytes(sizes, blocks, c * p + r == 0,
                                           c * p + r == p * v - 1, recomputed, selective, chunk,
                                           zero_bubble, moe(c))
                               for c in range(v)],
                              compute_ops(p, m, v, pcfg.pipeline_schedule)[r],
                              [deferred_bytes(sizes, blocks, moe(c)) for c in range(v)])
    else:
        ours = refgpt_bytes(sizes, blocks, r == 0, r == p - 1, recomputed, selective,
                            in_flight, chunk, moe(0))
    per_layer = [0 if i < recomputed and i % chunk else
                 korthikanti_bytes(mcfg.seq_length // grid.cp_size, tcfg.micro_batch_size,
                                   mcfg.hidden_size, mcfg.num_attention_heads, t,
                                   pcfg.sequence_parallel,
                                   "full" if i < recomputed else pcfg.recompute_granularity)
                 for i in range(blocks)] * pcfg.num_virtual_stages
    return {"activations_formula": ours["total"] if covered else 0,
            "activations_layer_formula": ours["layer"] if covered else 0,
            "activations_korthikanti": in_flight * sum(per_layer)}


def peak_rss() -> int:
    """This process's peak resident memory, bytes: Linux's VmHWM, which counts from the
    process's own start (getrusage's ru_maxrss also counts the pages of the parent it was
    forked from, so a run launched from a large process would report that process's size);
    ru_maxrss (KiB) where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_record(mcfg, tcfg, iteration: int, consumed: int, loss: float, lr: float,
                gnorm: float, skipped: bool, seconds: float, gemm_rate: float, world_size: int,
                dp_bytes: float, mem: dict, loss_scale: float = 1.0) -> dict:
    """One step's record: what the log line prints and --log-jsonl writes (loss_scale: the
    scale after this step's update, as Megatron logs it)."""
    G, T = tcfg.global_batch_size, mcfg.seq_length
    mflops = metrics.model_flops(mcfg, G)
    return {"iter": iteration, "consumed_samples": consumed, "loss": loss, "lr": lr,
            "grad_norm": gnorm, "skipped": int(skipped), "loss_scale": loss_scale,
            "step_time_s": seconds,
            "tokens_per_s": G * T / seconds,
            "tflops": metrics.megatron_flops(G, T, mcfg.num_layers, mcfg.hidden_size,
                                             mcfg.padded_vocab, metrics.moe_extra_macs(mcfg))
            / seconds / 1e12,
            "model_tflops": mflops / seconds / 1e12,
            "mfu": mflops / seconds / (gemm_rate * world_size),
            "dp_comm_bytes": dp_bytes, "memory_bytes": mem}


def moe_record(mcfg, layers, grid) -> list[dict]:
    """Each MoE layer's statistics over the step's micro-batches on every data-parallel rank
    (refgpt.nn.moe.MoEStats, summed over the world: the tensor-parallel replicas of a layer
    count once), then reset: the mean aux and z losses per micro-batch, the fraction of
    token-expert assignments dropped, and the fewest and most tokens an expert was offered
    in the global batch. Collective."""
    E = mcfg.num_experts
    v = np.zeros((mcfg.num_layers, 5 + E))
    for m in layers:
        if grid.tp_rank == 0:
            v[m.index] = m.stats.vector()
        m.stats.reset()
    if grid.world is not None:
        v = grid.world.allreduce(v)
    return [{"layer": i, "aux_loss": v[i, 0] / v[i, 2], "z_loss": v[i, 1] / v[i, 2],
             "dropped": v[i, 3] / v[i, 4], "load_min": int(v[i, 5:].min()),
             "load_max": int(v[i, 5:].max())}
            for i in range(mcfg.num_layers) if v[i, 2] > 0]


def open_jsonl(path, iteration: int):
    """--log-jsonl's file, open for appending the records after iteration: a resumed run
    keeps the lines of the iterations before it (none of a later, lost stretch of the run),
    so one file holds one history. Parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if iteration and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iter"] <= iteration:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue                          # a line cut off by a crash
    path.write_text("".join(kept))
    return open(path, "a")


class RunLog:
    """Where a run's records go, on world rank 0 (other ranks' go nowhere):

        the log line    every --log-interval iterations, with the averages of the iterations
                        since the last line for the time per iteration, tokens/s, TFLOP/s and
                        MFU (Megatron's convention), the last iteration's loss, learning rate
                        and gradient norm; then the timers' line, averaged the same way
        --log-jsonl     every record as measured (per iteration)
        --tensorboard-dir  every record's scalars, under Megatron's names where it has them
                        (lm-loss, learning-rate, grad-norm, iteration-time, ...; TensorBoard
                        takes no spaces), through tensorboardX
        a tqdm bar      on a terminal, unless --no-progress
    """

    def __init__(self, tcfg, iteration: int, say, progress: bool):
        """say: print, on world rank 0; None elsewhere. iteration: where the run starts."""
        self.tcfg, self.print = tcfg, say
        self.seconds, self.steps = 0.0, 0
        self.jsonl = self.board = self.bar = None
        if say is None:
            return
        if tcfg.log_jsonl:
            self.jsonl = open_jsonl(tcfg.log_jsonl, iteration)
        if tcfg.tensorboard_dir:
            from tensorboardX import SummaryWriter
            # a file per (re)start: its name's time has seconds only; purge_step hides the
            # steps after the checkpoint that the earlier run had logged
            self.board = SummaryWriter(tcfg.tensorboard_dir, purge_step=iteration + 1,
                                       filename_suffix=f".from{iteration}")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=tcfg.train_iters, initial=iteration, unit="it", disable=None,
                            dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.print is not None:
            (self.bar.write if self.bar is not None else self.print)(text)

    def add(self, r: dict, logging: bool) -> None:
        """One iteration's record; logging: print the log line (and the timers') now."""
        self.seconds += r["step_time_s"]
        self.steps += 1
        if self.print is None:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(r) + "\n")
            self.jsonl.flush()
        if self.board is not None:
            for tag, value in scalars(r).items():
                self.board.add_scalar(tag, value, r["iter"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}")
        if logging:
            self.say(log_line(averaged(r, self.seconds / self.steps), self.tcfg))
            if "timers_ms" in r:
                self.say(timers_line(r["timers_ms"]))
            self.seconds, self.steps = 0.0, 0
        if "val_loss" in r:
            self.say(validation_line(r))

    def close(self) -> None:
        for out in (self.bar, self.jsonl, self.board):
            if out is not None:
                out.close()


def averaged(r: dict, seconds: float) -> dict:
    """The record with the rates of an iteration of `seconds` (an interval's average)."""
    scale = r["step_time_s"] / seconds
    return {**r, "step_time_s": seconds,
            **{k: r[k] * scale for k in ("tokens_per_s", "tflops", "model_tflops", "mfu")}}


def scalars(r: dict) -> dict[str, float]:
    """A record's TensorBoard scalars."""
    out = {"lm-loss": r["loss"], "learning-rate": r["lr"], "grad-norm": r["grad_norm"],
           "skipped-iterations": r["skipped"], "loss-scale": r["loss_scale"],
           "iteration-time": r["step_time_s"],
           "tokens-per-second": r["tokens_per_s"], "tflops": r["tflops"], "mfu": r["mfu"],
           "dp-comm-bytes": r["dp_comm_bytes"]}
    out.update({f"memory/{k}-mib": v * MIB for k, v in r["memory_bytes"].items()})
    if "val_loss" in r:
        out["lm-loss-validation"] = r["val_loss"]
        out["lm-loss-validation-ppl"] = math.exp(min(r["val_loss"], 50))
    for name, (_, hi) in r.get("timers_ms", {}).items():
        out[f"{name}-time"] = hi                        # ms, the slowest rank's
    return out


def log_line(r: dict, tcfg) -> str:
    return (f" iteration {r['iter']:8d}/{tcfg.train_iters:8d} |"
            f" consumed samples: {r['consumed_samples']:10d} |"
            f" elapsed time per iteration (ms): {1e3 * r['step_time_s']:.1f} |"
            f" learning rate: {r['lr']:.3E} | global batch size: {tcfg.global_batch_size:5d} |"
            f" lm loss: {r['loss']:.6E} |"
            + (f" loss scale: {r['loss_scale']:.1f} |" if tcfg.dtype in HALF else "")
            + f" grad norm: {r['grad_norm']:.3f} |"
            f" skipped iterations: {r['skipped']} | tokens/s: {r['tokens_per_s']:.0f} |"
            f" TFLOP/s: {r['tflops']:.3f} | MFU: {100 * r['mfu']:.1f}%"
            + (moe_line(r["moe"]) if r.get("moe") else ""))


def moe_line(layers: list[dict]) -> str:
    """The MoE layers' figures, averaged over layers (per layer in --log-jsonl's "moe")."""
    n = len(layers)
    return (f" | moe aux loss: {sum(m['aux_loss'] for m in layers) / n:.4E} |"
            f" moe z loss: {sum(m['z_loss'] for m in layers) / n:.4E} |"
            f" tokens dropped: {100 * sum(m['dropped'] for m in layers) / n:.1f}% |"
            f" expert load min/max: {min(m['load_min'] for m in layers)}/"
            f"{max(m['load_max'] for m in layers)}")


def timers_line(timers_ms: dict) -> str:
    return " time per iteration (ms), min/max over ranks | " + " | ".join(
        f"{name}: {lo:.1f}/{hi:.1f}" for name, (lo, hi) in timers_ms.items())


def validation_line(r: dict) -> str:
    return (f" validation loss at iteration {r['iter']}: {r['val_loss']:.6E} | "
            f"perplexity: {math.exp(min(r['val_loss'], 50)):.3f}")


def banner(mcfg, tcfg, pcfg, grid, numel: int, buckets: int, gemm_rate: float,
           mem: dict) -> str:
    m, t = mcfg, tcfg
    return (f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
            f"heads, seq {m.seq_length}, vocab {m.vocab_size} (padded {m.padded_vocab}), "
            f"{numel:,} parameters, {precision(t, pcfg)}\n"
            f"layout: {grid.describe()}; global batch {t.global_batch_size} = data-parallel "
            f"{grid.data_size} x {t.micro_batches(grid.data_size)} micro-batches x "
            f"{t.micro_batch_size} sequences; gradient buckets: {buckets}; measured GEMM rate "
            f"{gemm_rate / 1e9:.1f} GFLOP/s per rank\n" + memory_line(mem, pcfg))


def precision(t, pcfg) -> str:
    """The run's precision in words (refgpt.precision, refgpt.optim.scaler)."""
    if t.dtype not in HALF:
        return t.dtype
    scaling = (f"loss scale {t.loss_scale:g}" if t.loss_scale else
               f"dynamic loss scale from {t.initial_loss_scale:g}" if t.dtype == "float16" else
               "no loss scaling")
    grads = "bfloat16 gradients" if pcfg.grad_reduce_in_bf16 else "fp32 gradients"
    return (f"{t.dtype} mixed precision (fp32 arithmetic, {grads}, fp32 master weights and "
            f"moments; {scaling})")


def memory_line(mem: dict, pcfg) -> str:
    held = mem["params"] + mem["grads"] + mem["optimizer"] + mem["optimizer_offloaded"]
    return (f"memory per rank (MiB): parameters {mem['params'] * MIB:.1f}, gradients "
            f"{mem['grads'] * MIB:.1f}, optimizer {mem['optimizer'] * MIB:.1f}"
            + (f" (+ {mem['optimizer_offloaded'] * MIB:.1f} on disk)"
               if mem["optimizer_offloaded"] else "")
            + f"; total {held * MIB:.1f}, ZeRO-{pcfg.zero_stage}"
            + (" (node-shared parameters)" if pcfg.dp_shared_memory else "")
            + f" formula {mem['formula'] * MIB:.1f}; activations (held for backward at "
            f"their peak, reported per step) by refgpt's formula "
            + (f"{mem['activations_formula'] * MIB:.1f}" if mem["activations_formula"] else
               "(not for this layout)")
            + f", Korthikanti et al.'s (16-bit, 1-byte masks) "
            f"{mem['activations_korthikanti'] * MIB:.1f}")
