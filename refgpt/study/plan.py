"""The configurations of a scaling study, and a cost model that predicts their time.

A *layout* fixes the model-parallel sizes and lets the rank count set the data-parallel size:
``dp`` (t = p = 1), ``tp2``, ``pp4``, ``tp2pp2``; a suffix ``-zK`` sets ZeRO stage K for that
layout (``dp-z1``), otherwise --zero-stage applies; ``-shm`` runs ZeRO-1 through the node's
shared memory (``dp-shm``: --zero-stage 1 --dp-shared-memory). On R ranks the data-parallel
size is d = R / (t p), and each data-parallel rank processes m = G / (d B) micro-batches of B
sequences, accumulating their gradients. The global batch G, and so the optimisation and
every loss, is the same at every R: this is strong scaling.

The dry run predicts, per iteration, from two rates measured on the machine:
g, a rank's GEMM rate, and b, the bytes a rank moves per second inside an all-reduce (b(n):
of n ranks, where a calibration measured it by group size; every group of a layout sums at
once, as in training):

    compute      C = max_s (F_s - H_s) / (R/p g e_b) + H_s / (R/p g e_h)
                                                    F_s: the model FLOPs of the step on pipeline
                                                    stage s (refgpt.metrics.stage_flops), H_s the
                                                    LM head's among them (the last stage's): its
                                                    GEMMs and the loss over the vocabulary at
                                                    e_h, the head's own measured share of g
                                                    (else e); the blocks at the e_b that makes
                                                    the whole model run at the machine's step
                                                    efficiency e (forward and backward at g e,
                                                    the slowest rank's); e = 1 without a
                                                    calibration: C a lower bound
    all-reduce   A = 2 (d-1)/d P_r w / b(d)         ring all-reduce of a rank's gradient, P_r =
                                                    P / (t p) parameters of w bytes; ZeRO moves
                                                    zero.formula_traffic instead; not overlapped;
                                                    shared memory: the (d-1)/d P_r w bytes a
                                                    rank reads, at the same rate (an upper bound:
                                                    they are loads, not messages)
    tensor       T = m (l/p) 4 [2 (t-1)/t] B s h w / b(t) 1-D: two all-reduces of B s h in forward,
                                                    two in backward, per layer (same volume
                                                    with sequence parallelism); s / c tokens
                                                    under context parallelism of c; 2-D (q x q):
                                                    tensor2d.formula_layer_volume at b(q)
    context      X = m (l/p) V_c w / b(c)           context parallelism: each layer's ring or
                                                    all-to-all volume V_c, forward and backward
                                                    (refgpt.parallel.context.formula_volume),
                                                    at the all-reduce rate of c ranks
    optimizer    O = P_o / r_o                      the elements a rank updates (P_r, or its
                                                    ZeRO shard P_r / d) at r_o elements a
                                                    second, a rank's AdamW with every rank of
                                                    the node at once (memory-bound); counted
                                                    where a calibration gives r_o (without
                                                    it, in e)
    bubble       U = C_o (idle / busy)              idle / busy from the schedule's unit-cost
                                                    simulation, C_o the other stages' mean
                                                    compute (= C when balanced): filling and
                                                    draining wait on them
    pipeline     S = M_a / b_p + V h g / (t b(2))  the busiest stage's sends (refgpt.study.plan.
                                                    pipeline_bytes: activations on and gradients
                                                    back, each micro-batch and chunk) at the
                                                    point-to-point rate b_p (else b(2)), and
                                                    the tied token table's gradient summed by
                                                    the first and last stages
    experts      E = G_e / b(d/e) + M_e / b(e)      expert parallelism of e: the experts'
                                                    gradients G_e summed over d / e ranks (A
                                                    then counts the rest), and each block with
                                                    experts' all-to-all, 4 (e-1)/e N k h w a
                                                    micro-batch at balanced routing

    latency      L = sum_k n_k alpha_k             each message on the busiest rank's path at
                                                    the latency of its link (refgpt.study.plan.
                                                    message_counts: the collectives a step runs,
                                                    times the messages of each by algorithm,
                                                    steps()), where the machine gives one; the
                                                    rates above were measured with large
                                                    messages, so L is what small ones add

and the all-reduce share A / (C + A + T + X + U + S + E + L + O): the part of a step that
overlap and a faster network could win back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from ..config import ConfigError
from ..parallel.build import check_layout
from ..metrics import head_flops, model_params, stage_flops
from ..nn.moe import is_moe_layer
from ..precision import compute_dtype, dtype_of
from ..parallel.context import formula_volume
from ..parallel.schedules import simulate
from ..parallel.tensor2d import formula_layer_volume
from ..parallel.zero import formula_traffic

LAYOUT = re.compile(r"^(dp|(?:tp(\d+))?(?:pp(\d+))?)(?:-z([0-3])|-(shm))?$")


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int
    pp: int
    zero_stage: int | None = None      # None: the run's --zero-stage
    shared: bool = False               # ZeRO-1 through shared memory (refgpt.parallel.shared)


def parse_layout(text: str) -> Layout:
    match = LAYOUT.match(text)
    if not match or not match.group(1):
        raise ConfigError(f"layout {text!r}: expected dp, tpT, ppP or tpTppP, optionally with "
                          f"-zK for ZeRO stage K or -shm for ZeRO-1 through shared memory "
                          f"(e.g. tp2, pp4, tp2pp2, dp-z1, dp-shm)")
    _, tp, pp, zero, shm = match.groups()
    tp, pp = int(tp or 1), int(pp or 1)
    if tp < 1 or pp < 1:
        raise ConfigError(f"layout {text!r}: sizes must be >= 1")
    if shm:
        return Layout(text, tp, pp, 1, shared=True)
    return Layout(text, tp, pp, None if zero is None else int(zero))


@dataclass(frozen=True)
class Config:
    ranks: int
    layout: Layout
    dp: int = 0
    micro_batches: int = 0          # per data-parallel rank: the accumulation steps
    skip: str = ""                  # why this configuration cannot run

    @property
    def key(self) -> str:
        return f"{self.ranks}:{self.layout.name}"

    def describe(self) -> str:
        return (f"{self.ranks} rank(s), {self.layout.name} (dp {self.dp}, tp {self.layout.tp}, "
                f"pp {self.layout.pp}, {self.micro_batches} micro-batch(es) per rank)")


def parallel_config(pcfg, layout: Layout):
    """The run's parallel settings with this layout's sizes (sequence parallelism and the
    tensor-parallel mode only where there is tensor parallelism)."""
    tp = layout.tp > 1
    return replace(pcfg, tensor_model_parallel_size=layout.tp,
                   pipeline_model_parallel_size=layout.pp,
                   sequence_parallel=pcfg.sequence_parallel and tp,
                   tensor_parallel_mode=pcfg.tensor_parallel_mode if tp else "1d",
                   num_virtual_stages=pcfg.num_virtual_stages if layout.pp > 1 else 1,
                   zero_stage=pcfg.zero_stage if layout.zero_stage is None else layout.zero_stage,
                   dp_shared_memory=layout.shared or pcfg.dp_shared_memory)


def make_plan(ranks, layouts, mcfg, tcfg, pcfg) -> list[Config]:
    """Every (rank count, layout) pair, in rank order; the impossible ones carry the reason."""
    out = []
    for R in sorted(set(ranks)):
        for lay in layouts:
            mp = lay.tp * lay.pp
            if R % mp:
                out.append(Config(R, lay, skip=f"{R} ranks are not divisible by tp x pp = {mp}"))
                continue
            d = R // mp
            micro = tcfg.micro_batches(d)
            if lay.zero_stage and d == 1:
                out.append(Config(R, lay, d, micro, skip="ZeRO needs data parallelism > 1"))
                continue
            try:
                check_layout(mcfg, tcfg, parallel_config(pcfg, lay), lay.tp, d, lay.pp)
            except ConfigError as e:
                out.append(Config(R, lay, d, micro, skip=str(e)))
                continue
            out.append(Config(R, lay, d, micro))
    return out


def stage_seconds(mcfg, batch: int, p: int, v: int, rate: float, efficiency: float = 1.0,
                  head_efficiency: float | None = None, flops: list[float] | None = None):
    """Each pipeline rank's compute seconds per step (module docstring), its stage's ranks
    running at `rate` FLOP/s together. The head (the LM head's GEMMs and the loss over the
    vocabulary) runs at rate e_h, its own measured share (head_efficiency; None: e, the
    whole model's); the blocks at the e_b that makes the whole model's time F / (rate e), as
    calibrated:  e_b = (F - H) / (F / e - H / e_h). flops: the stages' stage_flops, where the
    caller has them."""
    stages = flops or stage_flops(mcfg, batch, p, v)
    head = head_flops(mcfg, batch)
    e_h = efficiency if head_efficiency is None else head_efficiency
    total = sum(stages)
    blocks = (total - head) / (total / efficiency - head / e_h)
    return [((f - head) / blocks + head / e_h if s == p - 1 else f / blocks) / rate
            for s, f in enumerate(stages)]


def pipeline_bytes(mcfg, tcfg, pcfg, t: int, m: int, w: int, g: int) -> dict:
    """Bytes the busiest pipeline rank moves a step: a middle stage sends each micro-batch's
    activations on and its gradient back, once per model chunk (v under the interleaved
    schedule), each of the shape its layout gives the activations between blocks (B x T/c x h,
    a t-th of it under sequence parallelism or 2-D); the first and last stages sum the tied
    token table's gradient, V h / t elements, in an all-reduce of two ranks, which moves its
    size."""
    tokens = tcfg.micro_batch_size * mcfg.seq_length // pcfg.context_parallel_size
    shard = t if pcfg.sequence_parallel or pcfg.tensor_parallel_mode == "2d" else 1
    return {"p2p": 2 * m * pcfg.num_virtual_stages * tokens * mcfg.hidden_size // shard * w,
            "embedding": mcfg.padded_vocab * mcfg.hidden_size // t * g}


def moe_blocks(mcfg, p: int) -> float:
    """Blocks with experts a pipeline stage holds, on average over the p stages."""
    return sum(is_moe_layer(mcfg, i) for i in range(mcfg.num_layers)) / p


MPI_ALGORITHMS = ("ring", "recursive")     # how a machine's MPI sums large buffers


def steps(collective: str, n: int, algorithm: str = "ring") -> int:
    """Messages one collective of n ranks puts on a rank's critical path, in the alpha-beta
    model of refgpt.parallel.collectives: an all-reduce by ring 2 (n-1), by recursive halving
    and doubling (Rabenseifner: MPICH's large-message algorithm) 2 ceil(log2 n), by
    refgpt's double binary tree ("tree", 4 chunks) 2 (ceil(log2 n) + 4); a reduce-scatter or
    all-gather half an all-reduce's; a broadcast or reduce (a binomial tree) ceil(log2 n); an
    all-to-all n - 1 (pairwise exchange); a send 1."""
    if n < 2:
        return 0
    log = math.ceil(math.log2(n))
    if collective == "send":
        return 1
    if collective == "alltoall":
        return n - 1
    if collective == "bcast":
        return log
    allreduce = {"ring": 2 * (n - 1), "recursive": 2 * log, "tree": 2 * (log + 4)}[algorithm]
    return allreduce if collective == "allreduce" else allreduce // 2


def message_counts(cfg: Config, mcfg, tcfg, pcfg, elements: int, algorithm: str = "ring",
                   ranks_per_node: int = 1, expert_elements: int = 0) -> list[tuple[int, int, int]]:
    """(messages, group size, stride between members) a step sends on the busiest rank's path,
    by collective (pcfg: the layout's settings; algorithm: the MPI's all-reduce, which the
    run's --dp-allreduce-algorithm replaces for the gradients' sum):

      data      stage 0: one all-reduce a bucket (--ddp-bucket-size elements: about
                P_r / bucket); hierarchical: only the node leaders' all-reduce sends, over
                the nodes the group spans; shared memory: none (loads); ZeRO: a
                reduce-scatter a unit (a block, the embeddings, the final LayerNorm; and a
                block's experts under expert parallelism) once a step (stage 1) or a
                micro-batch (2-3), one all-gather a step (1-2) or two a unit and micro-batch
                (3: forward and backward)
      experts   the experts' gradients over d / e as the data term, and 4 all-to-alls of e
                a block with experts and micro-batch
      tensor    1-D: 4 all-reduces (or their reduce-scatter and all-gather halves under
                sequence parallelism) a layer and micro-batch; 2-D: each of the 4 linear
                layers' SUMMA products, forward and backward, q steps of 2 broadcasts or
                reduces along a row or column of q
      context   ring: (c-1) forward and (2c-1) backward exchanges a layer and micro-batch;
                all-to-all: 4 each way
      pipeline  a middle stage's sends: each micro-batch's activations on and gradient back,
                per model chunk; the tied table's all-reduce between first and last stage"""
    t, p, d, m = cfg.layout.tp, cfg.layout.pp, cfg.dp, cfg.micro_batches
    v, ep, c = pcfg.num_virtual_stages, pcfg.expert_model_parallel_size, pcfg.context_parallel_size
    layers = mcfg.num_layers // p
    moe = int(moe_blocks(mcfg, p))                       # whole units and all-to-alls
    out = []

    def gradients(n: int, stride: int, count: int, units: int) -> None:
        """The data-parallel sum of `count` elements in `units` units over n ranks."""
        if n < 2 or pcfg.dp_shared_memory:
            return
        stage = pcfg.zero_stage
        if stage:
            out.append(((m if stage >= 2 else 1) * units * steps("reduce-scatter", n, algorithm)
                        + (2 * m * units if stage == 3 else 1) * steps("all-gather", n, algorithm),
                        n, stride))
            return
        buckets = -(-count // pcfg.ddp_bucket_size) if pcfg.ddp_bucket_size else 1
        how = pcfg.dp_allreduce_algorithm
        if how == "hierarchical":             # the leaders of the nodes the group spans
            here = min(n, max(1, ranks_per_node // stride))
            n, stride, how = -(-n // here), stride * here, algorithm
        out.append((buckets * steps("allreduce", n, algorithm if how == "mpi" else how),
                    n, stride))
    gradients(d, t, elements - expert_elements, layers + 2)
    if ep > 1:
        gradients(d // ep, t * ep, expert_elements, moe)
        out.append((m * moe * 4 * steps("alltoall", ep), ep, t))
    if t > 1 and pcfg.tensor_parallel_mode == "2d":
        q = math.isqrt(t)
        out.append((m * layers * 4 * 3 * 2 * q * steps("bcast", q), q, 1))
    elif t > 1:
        out.append((m * layers * 4 * steps("allreduce", t, algorithm), t, 1))
    if c > 1:
        exchanges = 3 * c - 2 if pcfg.cp_comm_type == "p2p" else 8 * steps("alltoall", c)
        out.append((m * layers * exchanges, c, t))
    if p > 1:
        out.append((2 * m * v, 2, t * d))
        out.append((steps("allreduce", 2, algorithm), 2, t * d * (p - 1)))
    return out


def predict(cfg: Config, mcfg, tcfg, pcfg, gemm_rate: float, link_rate,
            elements: int | None = None, efficiency: float = 1.0,
            optimizer_rate: float | None = None, head_efficiency: float | None = None,
            p2p_rate: float | None = None, expert_elements: int = 0,
            latency=None, algorithm: str = "ring", ranks_per_node: int = 1) -> dict:
    """The cost model of the module docstring, in seconds per iteration. link_rate: bytes a second
    a rank moves in an all-reduce: one number, or a function (n, stride, inside=None) of the
    group's size, the ranks between its members and, for point-to-point sends, the rate
    inside a node (refgpt.plan.group_link: a group that spans nodes shares the node's
    network injection). Communication is None where it is not predicted: without a link
    rate. elements: a rank's parameters exactly, padded as ZeRO pads them (refgpt.plan),
    instead of the model's count over t p. efficiency: the share of gemm_rate forward and
    backward's model FLOPs reach (a machine's calibration); head_efficiency: the head's own
    (stage_seconds). optimizer_rate: elements a second a rank's optimizer updates (None: the
    optimizer not counted). p2p_rate: bytes a second a rank sends to another (None: the all-
    reduce rate of 2 ranks). expert_elements: under expert parallelism, the rank's experts'
    parameters among `elements`, summed over its expert-data-parallel group of d / e. gemm_s:
    the part of compute_s that is the busiest stage's FLOPs at the bare GEMM rate (the rest:
    memory-bound kernels and overhead, as the efficiencies carry them). latency: seconds a
    message takes, a function (n, stride) of the group as link_rate's (refgpt.plan.
    group_latency; None: not counted); algorithm: the MPI's all-reduce (steps);
    ranks_per_node: where groups span nodes (a hierarchical sum's leaders)."""
    t, p, d, m = cfg.layout.tp, cfg.layout.pp, cfg.dp, cfg.micro_batches
    pcfg = parallel_config(pcfg, cfg.layout)
    w = dtype_of(tcfg.dtype).itemsize                 # parameters and activations; gradients:
    g = 2 if pcfg.grad_reduce_in_bf16 else compute_dtype(dtype_of(tcfg.dtype)).itemsize
    flops = stage_flops(mcfg, tcfg.global_batch_size, p, pcfg.num_virtual_stages)
    stages = stage_seconds(mcfg, tcfg.global_batch_size, p, pcfg.num_virtual_stages,
                           cfg.ranks // p * gemm_rate, efficiency, head_efficiency, flops)
    compute = max(stages)                             # the busiest stage
    busiest = stages.index(compute)                   # its GEMMs at the bare rate:
    gemm = flops[busiest] / (cfg.ranks // p * gemm_rate)
    per_rank = (elements if elements is not None else
                (model_params(mcfg) + mcfg.n_positions * mcfg.hidden_size) / (t * p))
    moved = formula_traffic(pcfg.zero_stage, int(per_rank), d, m, w, g)
    if pcfg.dp_shared_memory:                        # what a rank reads of the other rows
        moved = (d - 1) / d * int(per_rank) * g
    c = pcfg.context_parallel_size
    tokens = tcfg.micro_batch_size * mcfg.seq_length // c * mcfg.hidden_size
    tensor = m * mcfg.num_layers / p * 4 * 2 * (t - 1) / t * tokens * w
    heads = mcfg.num_attention_heads // t
    context = m * mcfg.num_layers / p * w * sum(formula_volume(
        tcfg.micro_batch_size, mcfg.seq_length, heads, mcfg.hidden_size // mcfg.num_attention_heads,
        c, pcfg.cp_comm_type).values()) if c > 1 else 0.0
    bubble = 0.0
    if p > 1:
        v = pcfg.num_virtual_stages
        sim = simulate(p, m, v, pcfg.pipeline_schedule)
        # The simulator's idle share is for equal stages. Filling and draining the pipeline
        # waits on the other stages' micro-batches, so the bubble is that share of their mean.
        others = sorted(stages)[:-1]
        bubble = max(i / b for i, b in zip(sim.idle, sim.busy)) * sum(others) / len(others)
    # Groups by refgpt.parallel.grid's order: TP stride 1, CP and DP stride t, stages t d.
    rate = (link_rate if callable(link_rate) else
            lambda n, stride=1, inside=None: inside or link_rate)
    seconds = ((lambda nbytes, n, stride=1: nbytes / rate(n, stride)) if link_rate else
               (lambda nbytes, n, stride=1: None))
    ep = pcfg.expert_model_parallel_size
    experts = 0.0
    if ep > 1:
        # The experts' gradients are summed over the d / e ranks holding the same experts
        # (e t apart), not over d; every token's k rows go to the experts' ranks and back, in
        # forward and in backward, in each block with experts.
        own = formula_traffic(pcfg.zero_stage, expert_elements, d // ep, m, w, g)
        moved -= formula_traffic(pcfg.zero_stage, expert_elements, d, m, w, g)
        pairs = tcfg.micro_batch_size * mcfg.seq_length * mcfg.moe_router_topk
        sent = m * moe_blocks(mcfg, p) * 4 * (ep - 1) / ep * pairs * mcfg.hidden_size * w
        experts = (seconds(own, d // ep, t * ep) + seconds(sent, ep, t)) if link_rate else None
    allreduce = seconds(moved, d, t)
    if t > 1 and pcfg.tensor_parallel_mode == "2d":  # SUMMA: panels over rows and columns
        q = math.isqrt(t)
        tensor = seconds(m * mcfg.num_layers / p * w * formula_layer_volume(
            tcfg.micro_batch_size * mcfg.seq_length // c, mcfg.hidden_size, q), q)
    else:
        tensor = seconds(tensor, t)
    context = seconds(context, c, t) if c > 1 else 0.0
    pipeline = 0.0
    if p > 1:        # sends between stages, and the tied token table's sum (first and last)
        sent = pipeline_bytes(mcfg, tcfg, pcfg, t, m, w, g)
        pipeline = (None if not link_rate else
                    sent["p2p"] / rate(2, t * d, p2p_rate)
                    + sent["embedding"] / rate(2, t * d * (p - 1)))
    updated = ((int(per_rank) - expert_elements) // d + expert_elements // (d // ep)
               if pcfg.zero_stage else int(per_rank))    # ZeRO: the shard's, two regions
    optimizer = updated / optimizer_rate if optimizer_rate else None
    waits = None if latency is None else sum(
        count * latency(n, stride) for count, n, stride in message_counts(
            cfg, mcfg, tcfg, pcfg, int(per_rank), algorithm, ranks_per_node, expert_elements))
    total = (compute + bubble + (allreduce or 0.0) + (tensor or 0.0) + (context or 0.0)
             + (pipeline or 0.0) + (experts or 0.0) + (waits or 0.0) + (optimizer or 0.0))
    return {"compute_s": compute, "allreduce_s": allreduce, "tensor_s": tensor,
            "context_s": context, "pipeline_s": pipeline, "experts_s": experts,
            "bubble_s": bubble, "latency_s": waits,
            "optimizer_s": optimizer, "gemm_s": gemm,
            "allreduce_share": None if allreduce is None else allreduce / total}
