"""Plan a run: which layouts of a model fit on N nodes of R ranks, with each rank's memory, and how
fast each would be.

    python -m refgpt.plan --nodes 1 --ranks-per-node 16 --num-layers 12 --hidden-size 768 \
        --num-attention-heads 12 --seq-length 1024 --vocab-size 50257 \
        --global-batch-size 16 --micro-batch-size 1 [--allreduce-bandwidth 5] [--json]

The layouts: every tensor-parallel size t (1-D, and 2-D where t is a square and the run does not
ask for sequence parallelism: tpT-2d) and pipeline size p that divide the world and the model,
each pipeline with 1F1B, the interleaved schedule at every number of model chunks v a rank can
hold (shown as ppPxV) and zero-bubble (ppP-zb), the data-parallel size d = world / (t p) the
rest, context-parallel sizes c dividing d up to --context-parallel-size (which the planner reads
as the largest to consider; 1 by default) by ring and by all-to-all (cpC, cpC-a2a), for a model
with experts every expert-parallel size e dividing d and the experts (epE), ZeRO
stage 0-3 (and ZeRO-1 through shared memory where each data-parallel group lies inside one
node), and activation recomputation off, selective or full, as refgpt.train's check_layout
accepts them (those it refuses are listed with its reason); and where the run names no type
(--bf16, --fp16, --dtype), float32 and bfloat16, each where the machine has its rate (the name
ends fp32 or bf16; a type without a rate is left out with a note). Each one's memory per rank,
in the categories of the training log's ``memory_bytes``, on the rank that holds the most (the
first pipeline stage keeps the most micro-batches in flight; under the interleaved schedule
the rank's own order of its chunks' forwards and backwards decides):

    params, grads, optimizer   P elements on the rank: its stage's parameters, its tensor-
                               parallel shard of each (its own E / e experts), padded to a
                               multiple of d under ZeRO; ZeRO's table (refgpt.parallel.zero)
                               splits each over d
    activations                refgpt's formula of what the layers keep for backward at the
                               peak (refgpt.nn.activations), which the registry equals
    working                    ZeRO's temporary buffers at their peak (the registry's
                               working_peak): refgpt.parallel.zero.formula_working, for the
                               data-parallel ranks that stand for all (distinct_shards)

These are the registry's own numbers (tests/test_plan.py and mpi_tests/test_plan.py run the
layouts and compare), not estimates, but for one case: what a rank's experts keep under
expert parallelism or a capacity depends on how many tokens the routing sends them, so there
the activations are balanced routing's, and the record adds ``activations_worst_bytes``, the
most any routing could make the rank keep. With a machine file that has ``process_mib`` (what
a rank held beyond them when calibrated: interpreter, libraries, MPI's buffers) the record adds
it as ``process``. The time per step is the scaling study's cost model (refgpt.study.plan.
predict): the busiest pipeline stage's FLOPs at the rates a training step reaches (the GEMM
rate on the layout's own products where the machine has a shape model, refgpt.study.
gemm_shapes; the LM head at its own measured share of it, the blocks at what makes forward and
backward of the whole model run at the machine's calibrated step efficiency), the pipeline's
bubble from the schedule simulator, the optimizer's elements at the machine's optimizer rate,
and, given --allreduce-bandwidth (GB/s a rank moves in an all-reduce) or a machine's network,
the data-, tensor-, context- and expert-parallel traffic by the counters' formulas at the
all-reduce rate of the group's size (a group spanning nodes at most its share of the node's
network injection), the pipeline's sends at the point-to-point rate, and, where the machine
gives a latency, every message a step sends at its link's, not overlapped; full
recomputation adds a third of the recomputed blocks' FLOPs (one more forward), selective's
extra attention-core FLOPs are not counted. Layouts are printed fastest first, each with the
command that runs it. docs/plan.md sets these predictions beside measured runs.

Machines (--machine): a small TOML file, or the name of one in refgpt/machines (a64fx-fugaku,
from published figures, each cited in the file): cores and memory per node, the GEMM rate per
node by type and, where calibrated, a GEMM's time by its shape ([gemm_shape.TYPE] tflops, gbs,
overhead_us), the step efficiency and the head's by type ([step_efficiency],
[head_efficiency]), the optimizer rate by type ([optimizer_melem_s]), process_mib, the
all-reduce rate a rank moves ([network] allreduce_gbs, and by group size
[network.allreduce_gbs_by_ranks]), the point-to-point rate ([network] p2p_gbs), a message's
latency inside a node and between nodes ([network] and [network.internode] latency_us), the
MPI's all-reduce algorithm ([network] allreduce_algorithm: ring or recursive), what a node
injects into the network ([network.internode] gbs_per_node), and how its cores group
(core_groups, core_group_spanning_efficiency: the GEMM rate's share a rank reaches whose
cores span groups). With one, the rates are its own
and a layout whose ranks on a node need more than the node's memory is refused with the
figure. ``--calibrate FILE`` (under mpiexec, one rank per core as in training) measures this
machine with the model given by the other flags and writes its file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from math import isqrt
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .cli import exit_on_user_error, plain
from .config import ConfigError
from .engine.report import activation_formulas, peak_rss
from .metrics import head_flops
from .nn.gpt import param_specs
from .nn.params import unit_key
from .parallel.build import check_layout
from .parallel.expert import expert_of
from .parallel.pipeline import stage_of
from .parallel.tensor import check_divisible, shard, shard_kind
from .parallel.zero import formula_working
from .precision import compute_dtype, dtype_of, is_half
from .study.gemm_shapes import GemmShape, model_gemms, time_gemms
from .study.plan import MPI_ALGORITHMS, Config, Layout, predict
from .train import build_parser, configs_from

PLAN_FLAGS = ("nodes", "ranks_per_node", "allreduce_bandwidth", "json", "top", "machine",
              "calibrate")
MACHINES = Path(__file__).parent / "machines"
RECOMPUTE = ("", "selective", "full")
PRECISIONS = ("float32", "bfloat16")     # planned when the run names no type
TYPE_FLAGS = {"float32": ("fp32", []), "bfloat16": ("bf16", ["--bf16"]),
              "float16": ("fp16", ["--fp16"]), "float64": ("fp64", ["--dtype", "float64"])}


def rank_units(mcfg, tp: int, pp: int, pp_rank: int, v: int = 1,
               two_d: bool = False, ep: int = 1, part: str = "all") -> list[tuple[str, int]]:
    """(unit, elements) of the parameters a rank holds, in its flat buffer's order (ZeRO's
    units: refgpt.nn.params.unit_key): its pipeline stages' (chunks c p + r, c < v, under the
    interleaved schedule), its tensor-parallel shard of each (1-D: refgpt.parallel.tensor's;
    2-D: a tp-th of every parameter, refgpt.parallel.tensor2d; every TP rank's shard is the
    same size: check_layout asks divisibility), and under expert parallelism of ep its own
    E / ep experts (every rank as many); part "experts": those alone, "dense": the rest (ZeRO
    with expert parallelism lays the two out as regions of their own, refgpt.parallel.zero)."""
    stages = ([stage_of(c * pp + pp_rank, pp, v, mcfg.num_layers) for c in range(v)]
              if pp > 1 else [None])
    units: dict[str, int] = {}
    mine = range(mcfg.num_experts // ep)                   # EP rank 0's experts
    for s in (s for stage in stages for s in param_specs(mcfg, stage)):
        expert = expert_of(s.name)
        if expert is not None and (expert not in mine or part == "dense") \
                or expert is None and part == "experts":
            continue
        n = (s.size // tp if two_d else
             shard(np.empty(s.shape, bool), shard_kind(s.name), 0, tp).size if tp > 1
             else s.size)
        units[unit_key(s.name)] = units.get(unit_key(s.name), 0) + n
    return list(units.items())


def rank_elements(mcfg, tp: int, pp: int, pp_rank: int, v: int = 1) -> int:
    """The parameters a rank holds under 1-D tensor parallelism (rank_units)."""
    return sum(n for _, n in rank_units(mcfg, tp, pp, pp_rank, v))


def padded(elements: int, pcfg, dp: int) -> int:
    """The rank's flat buffer: its elements, padded to a multiple of d under ZeRO."""
    return -(-elements // dp) * dp if pcfg.zero_stage else elements


def shard_classes(units: list[tuple[str, int]], n: int) -> list:
    """For each of the n ranks a region's units are partitioned over (elements padded to a
    multiple of n), what decides its ZeRO buffers: a rank whose shard holds a unit's first
    element is a class of its own; a rank whose shard lies inside one unit holds what every
    such rank of that unit holds."""
    total = sum(e for _, e in units)
    S = -(-total // n)
    starts = np.cumsum([0] + [e for _, e in units])[:-1]
    lo = np.arange(n) * S
    last = np.searchsorted(starts, lo + S - 1, "right") - 1      # the unit of its last element
    return [("edge", r) if starts[u] >= lo[r] else ("inside", int(u))
            for r, u in enumerate(last)]


def distinct_shards(units: list[tuple[str, int]], pcfg, dp: int,
                    experts: list[tuple[str, int]] | None = None) -> list[int]:
    """Data-parallel ranks that stand for all of them in memory: under ZeRO a rank's temporary
    buffers depend on where its shard falls among the units (shard_classes); under expert
    parallelism of e on where its expert-data-parallel rank's (dp rank // e) falls among
    the experts' units too: the first rank of each pair of classes."""
    if not pcfg.zero_stage:
        return [0]
    ep = pcfg.expert_model_parallel_size
    dense = shard_classes(units, dp)
    own = shard_classes(experts, dp // ep) if experts else [None] * (dp // ep)
    first: dict = {}
    for r in range(dp):
        first.setdefault((dense[r], own[r // ep]), r)
    return sorted(first.values())


def rank_memory(mcfg, tcfg, pcfg, tp: int, pp: int, dp: int, pp_rank: int = 0,
                dp_rank: int = 0, units: list[tuple[str, int]] | None = None,
                routing: str = "balanced", experts: list[tuple[str, int]] | None = None) -> dict:
    """The registry's categories for one rank of the layout (module docstring), in bytes
    (units: rank_units of its stage, where the caller has them, under ZeRO with expert
    parallelism its dense units, and experts its experts'; routing: where experts'
    activations depend on it, "balanced" or "worst", refgpt.engine.report.routed).

    ZeRO with expert parallelism of e partitions the dense units over the d data-parallel
    ranks and the experts' over the d / e of the rank's expert-data-parallel group, each
    region padded to its group (refgpt.parallel.zero); the shard S is the rank's two parts,
    which stages 1-2 keep besides as the optimizer's copy, p S bytes (and g S for stage 1's
    gradient shard)."""
    dtype = np.dtype(dtype_of(tcfg.dtype))
    state = np.dtype(compute_dtype(dtype)).itemsize
    p = dtype.itemsize
    g = 2 if pcfg.grad_reduce_in_bf16 else state
    k = 2 * state + (state if is_half(dtype) else 0)           # moments, and fp32 masters
    stage, ep = pcfg.zero_stage, pcfg.expert_model_parallel_size
    split = bool(stage and ep > 1)                 # the experts a region of their own
    v, two_d = pcfg.num_virtual_stages, pcfg.tensor_parallel_mode == "2d"
    units = units or rank_units(mcfg, tp, pp, pp_rank, v, two_d, ep,
                                "dense" if split else "all")
    if split and experts is None:
        experts = rank_units(mcfg, tp, pp, pp_rank, v, two_d, ep, "experts")
    experts = experts if split and experts else []

    def region(u: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
        """Units of a region partitioned over n ranks, its padding in the last one."""
        pad = padded(sum(e for _, e in u), pcfg, n) - sum(e for _, e in u)
        return [*u[:-1], (u[-1][0], u[-1][1] + pad)] if u else u
    units, experts = region(units, dp), region(experts, dp // ep)
    P = sum(n for _, n in units + experts)                       # the flat buffer
    S = sum(n for _, n in units) // dp + sum(n for _, n in experts) // (dp // ep)
    copy = bool(experts)                 # stages 1-2 keep the split shard as a copy
    cp = pcfg.context_parallel_size
    grid = SimpleNamespace(tp_size=tp, pp_size=pp, pp_rank=pp_rank, data_size=dp // cp,
                           cp_size=cp)
    mem = {"params": p * (S if stage == 3 else P + S * copy),
           "grads": g * (S if stage >= 2 else P + S * copy),
           "optimizer": k * (S if stage >= 1 else P),
           "activations": activation_formulas(mcfg, tcfg, pcfg, grid,
                                              routing)["activations_formula"],
           "working": 0}
    if pcfg.dp_shared_memory:         # one parameter copy a node, each rank counted its part
        mem["params"] = p * P // dp
    elif stage:
        mem["working"] = formula_working(units, stage, dp, dp_rank, p, g, pp_rank == pp - 1,
                                         pp > 1, (experts, dp // ep, dp_rank // ep))
    mem["total"] = sum(mem.values())
    return mem


def schedules(mcfg, pp: int) -> list[tuple[str, int]]:
    """(schedule, model chunks a rank holds) of a pipeline of pp: 1F1B; the interleaved
    schedule at every v > 1 that divides a rank's blocks; zero-bubble (zb-h1)."""
    if pp == 1:
        return [("1f1b", 1)]
    per = mcfg.num_layers // pp
    return ([("1f1b", 1)] + [("interleaved", v) for v in range(2, per + 1) if per % v == 0]
            + [("zb-h1", 1)])


def contexts(dp: int, most: int) -> list[tuple[int, str]]:
    """(context-parallel size, its attention's communication) for a data-parallel size dp:
    none, and every c from 2 to `most` (the run's --context-parallel-size) dividing dp, by
    ring (p2p) and by all-to-all (a2a)."""
    return [(1, "p2p")] + [(c, kind) for c in range(2, min(most, dp) + 1) if dp % c == 0
                           for kind in ("p2p", "a2a")]


def experts(mcfg, dp: int) -> list[int]:
    """Expert-parallel sizes of a data-parallel size dp: none, and every e > 1 dividing dp and
    the number of experts (refgpt.parallel.expert), for a model with experts."""
    return [1] + [e for e in range(2, dp + 1) if dp % e == 0 and mcfg.num_experts % e == 0
                  ] if mcfg.num_experts else [1]


def layouts(world: int, mcfg, tcfg, pcfg, ranks_per_node: int = 1):
    """(name, pcfg, tp, pp, dp, reason or "") of every layout the module docstring lists; ZeRO-1
    through the node's shared memory (refgpt.parallel.shared) where every data-parallel group
    lies inside one node (t d divides the ranks of a node, as ranks are laid out TP first)."""
    two_d = not pcfg.sequence_parallel           # 2-D refuses the run's sequence parallelism
    for tp, mode in ((t, mode) for t in range(1, world + 1) if world % t == 0
                     for mode in ("1d", "2d")
                     if mode == "1d" or two_d and t > 1 and isqrt(t) ** 2 == t):
        for pp, schedule, v in ((q, k, v) for q in range(1, world // tp + 1)
                                if world // tp % q == 0 for k, v in schedules(mcfg, q)):
            dp = world // (tp * pp)
            shared = dp > 1 and ranks_per_node % (tp * dp) == 0
            for zero, shm, cp, kind, ep, recompute in (
                    (z, shm, cp, kind, ep, recompute)
                    for z, shm in [(0, False), *((z, False) for z in range(1, 4) if dp > 1),
                                   *([(1, True)] if shared else [])]
                    for cp, kind in contexts(dp, pcfg.context_parallel_size)
                    for ep in experts(mcfg, dp) if ep == 1 or not shm
                    for recompute in RECOMPUTE):
                cfg = replace(pcfg, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, zero_stage=zero,
                              dp_shared_memory=shm, recompute_granularity=recompute,
                              tensor_parallel_mode=mode, num_virtual_stages=v,
                              pipeline_schedule=schedule, context_parallel_size=cp,
                              cp_comm_type=kind, expert_model_parallel_size=ep,
                              sequence_parallel=pcfg.sequence_parallel and tp > 1
                              and mode == "1d")
                name = (f"tp{tp}" + ("-2d" if mode == "2d" else "") + f" pp{pp}"
                        + (f"x{v}" if v > 1 else "")
                        + ("-zb" if schedule == "zb-h1" else "") + f" dp{dp}"
                        + (f" cp{cp}" + ("-a2a" if kind == "a2a" else "") if cp > 1 else "")
                        + (f" ep{ep}" if ep > 1 else "")
                        + (f" zero-{zero}" if zero else "") + ("-shm" if shm else "")
                        + (f" recompute-{recompute}" if recompute else ""))
                try:
                    check_layout(mcfg, tcfg, cfg, tp, dp, pp)
                except ConfigError as e:
                    yield name, cfg, tp, pp, dp, str(e)
                    continue
                yield name, cfg, tp, pp, dp, ""


def layout_flags(pcfg) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(pcfg.tensor_model_parallel_size),
             "--pipeline-model-parallel-size", str(pcfg.pipeline_model_parallel_size)]
    if pcfg.tensor_parallel_mode == "2d":
        flags += ["--tensor-parallel-mode", "2d"]
    if pcfg.pipeline_model_parallel_size > 1 and pcfg.pipeline_schedule != "1f1b":
        flags += ["--pipeline-schedule", pcfg.pipeline_schedule]
    if pcfg.num_virtual_stages > 1:
        flags += ["--num-virtual-stages", str(pcfg.num_virtual_stages)]
    if pcfg.context_parallel_size > 1:
        flags += ["--context-parallel-size", str(pcfg.context_parallel_size),
                  "--cp-comm-type", pcfg.cp_comm_type]
    if pcfg.expert_model_parallel_size > 1:
        flags += ["--expert-model-parallel-size", str(pcfg.expert_model_parallel_size)]
    if pcfg.zero_stage:
        flags += ["--zero-stage", str(pcfg.zero_stage)]
    if pcfg.dp_shared_memory:
        flags += ["--dp-shared-memory"]
    if pcfg.recompute_granularity:
        flags += ["--recompute-granularity", pcfg.recompute_granularity]
    return flags


def read_machine(name: str) -> dict:
    """A machine description (module docstring): a TOML file, or the name of one shipped in
    refgpt/machines (a64fx-fugaku). Its errors are one ConfigError line."""
    from .train import tomllib
    path = Path(name)
    if not path.exists() and (MACHINES / f"{name}.toml").exists():
        path = MACHINES / f"{name}.toml"
    try:
        m = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--machine {name}: {e}") from None
    for key, kind in (("name", str), ("cores_per_node", int), ("memory_gib_per_node", (int, float)),
                      ("gemm_tflops_per_node", dict)):
        if not isinstance(m.get(key), kind):
            raise ConfigError(f"--machine {name}: '{key}' is missing or not a "
                              f"{getattr(kind, '__name__', 'number')}")
    for key, kind in (("process_mib", (int, float)), ("step_efficiency", dict),
                      ("head_efficiency", dict), ("optimizer_melem_s", dict),
                      ("network", dict), ("gemm_shape", dict)):
        if key in m and not isinstance(m[key], kind):
            raise ConfigError(f"--machine {name}: '{key}' is not a "
                              f"{'table' if kind is dict else 'number'}")
    return m


@dataclass(frozen=True)
class Rates:
    """What the time model (refgpt.study.plan.predict) divides by, per rank."""
    gemm: float                                   # FLOP/s of a large GEMM
    link: Callable[..., float] | None = None      # bytes/s in an all-reduce: group_link
    efficiency: float = 1.0                       # forward + backward's share of gemm
    optimizer: float | None = None                # elements/s the optimizer updates
    head: float | None = None                     # the head's share of gemm (None: efficiency)
    p2p: float | None = None                      # bytes/s a rank sends to another
    shape: GemmShape | None = None                # a GEMM's time by its shape (else gemm)
    latency: Callable[..., float] | None = None   # seconds a message takes: group_latency
    algorithm: str = "ring"                       # the MPI's all-reduce (study.plan.steps)

    def gemm_at(self, mcfg, tcfg, pcfg) -> float:
        """A rank's GEMM rate on the layout's products (GemmShape.rate of model_gemms), or
        the one rate where the machine has no shape model."""
        if self.shape is None:
            return self.gemm
        t, two_d = pcfg.tensor_model_parallel_size, pcfg.tensor_parallel_mode == "2d"
        q = isqrt(t) if two_d else 1
        return self.shape.rate(model_gemms(mcfg, tcfg.micro_batch_size, 1 if two_d else t,
                                           pcfg.context_parallel_size, q))


def group_link(network: dict, bandwidth: float = 0.0,
               ranks_per_node: int = 1) -> Callable[..., float] | None:
    """Bytes a second a rank moves in an all-reduce of n ranks whose members are `stride` ranks
    apart (refgpt.parallel.grid's order: TP groups stride 1, DP and CP groups stride t, the
    pipeline's stages t d): --allreduce-bandwidth where given; else, inside a node, the
    machine's rate for groups of n ([network.allreduce_gbs_by_ranks], every group of the node
    summing at once), or of the next larger group measured (larger groups are slower), or its
    allreduce_gbs; and a group that spans nodes also at most its share of what a node injects
    into the network ([network.internode] gbs_per_node): of a node's R ranks, the R / g groups
    with g members there each send one rank's ring traffic out, so a rank moves at most
    gbs_per_node g / R. None where there is no figure."""
    if bandwidth:
        return lambda n, stride=1, inside=None: bandwidth * 1e9
    by_ranks = {int(k): float(v) for k, v in network.get("allreduce_gbs_by_ranks", {}).items()}
    flat = float(network.get("allreduce_gbs", 0))
    injection = float(network.get("internode", {}).get("gbs_per_node", 0))
    if not by_ranks and not flat:
        return None

    def rate(n: int, stride: int = 1, inside: float | None = None) -> float:
        """inside: the rate inside a node, where the caller has its own (point-to-point)."""
        group = min((k for k in by_ranks if k >= n), default=None)
        inside = inside or 1e9 * (by_ranks[group] if group else flat or by_ranks[max(by_ranks)])
        here = min(n, max(1, ranks_per_node // stride))        # members on one node
        if injection and here < n:
            return min(inside, 1e9 * injection * here / ranks_per_node)
        return inside
    return rate


def group_latency(network: dict, ranks_per_node: int = 1) -> Callable[..., float] | None:
    """Seconds a message takes in a group of n ranks whose members are `stride` ranks apart
    (group_link's placement): [network.internode] latency_us where the group spans nodes,
    else [network] latency_us (the one given stands for both); None where neither is."""
    inside = network.get("latency_us")
    between = network.get("internode", {}).get("latency_us", inside)
    inside = between if inside is None else inside
    if inside is None:
        return None
    for value in (inside, between):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"latency_us must be a number >= 0, got {value!r}")

    def latency(n: int, stride: int = 1) -> float:
        spans = min(n, max(1, ranks_per_node // stride)) < n
        return (between if spans else inside) / 1e6
    return latency


def machine_rates(machine: dict, tcfg, ranks_per_node: int, bandwidth: float) -> Rates:
    """The time model's rates from a machine description: its GEMM rate for the run's type
    (per node, shared by the node's ranks), its step efficiency for that type where it has one
    ([step_efficiency]: the share of the GEMM rate forward and backward's model FLOPs reach,
    with everything that is not a GEMM; 1 where not calibrated, which makes the compute term a
    lower bound), its optimizer rate ([optimizer_melem_s]) and its all-reduce rates
    (group_link); --allreduce-bandwidth, where given, wins. A node whose cores form
    core_groups groups with memory of their own (an A64FX's four CMGs) reaches its GEMM rate
    when each rank lies inside one group, which ranks_per_node a multiple of core_groups
    allows; otherwise a rank's threads reach across groups, and the rate is
    core_group_spanning_efficiency of it."""
    name = machine["name"]
    rate = machine["gemm_tflops_per_node"].get(tcfg.dtype)
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise ConfigError(f"--machine {name}: no GEMM rate for {tcfg.dtype} "
                          f"(it has {sorted(machine['gemm_tflops_per_node'])})")
    groups = machine.get("core_groups", 1)
    spanning = machine.get("core_group_spanning_efficiency", 1.0)
    if not isinstance(groups, int) or groups < 1 or machine["cores_per_node"] % groups:
        raise ConfigError(f"--machine {name}: core_groups must be a whole number >= 1 that "
                          f"divides cores_per_node, got {groups!r}")
    if not isinstance(spanning, (int, float)) or not 0 < spanning <= 1:
        raise ConfigError(f"--machine {name}: core_group_spanning_efficiency must be in "
                          f"(0, 1], got {spanning!r}")
    if ranks_per_node % groups:
        rate *= spanning
    efficiency = machine.get("step_efficiency", {}).get(tcfg.dtype, 1.0)
    head = machine.get("head_efficiency", {}).get(tcfg.dtype, efficiency)
    for table, value in (("step_efficiency", efficiency), ("head_efficiency", head)):
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"--machine {name}: {table}.{tcfg.dtype} must be "
                              f"in (0, 1], got {value!r}")
    optimizer = machine.get("optimizer_melem_s", {}).get(tcfg.dtype)
    if optimizer is not None and (not isinstance(optimizer, (int, float)) or optimizer <= 0):
        raise ConfigError(f"--machine {name}: optimizer_melem_s.{tcfg.dtype} must be > 0, "
                          f"got {optimizer!r}")
    network = machine.get("network", {})
    try:
        link = group_link(network, bandwidth, ranks_per_node)
        p2p = float(network.get("p2p_gbs", 0)) * 1e9
        if link and min(link(n, s) for n in (1, 2, 1 << 20) for s in (1, 1 << 20)) <= 0 \
                or p2p < 0:
            raise ValueError("rates must be > 0")
        latency = group_latency(network, ranks_per_node)
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--machine {name}: [network]: {e}") from None
    algorithm = network.get("allreduce_algorithm", "ring")
    if algorithm not in MPI_ALGORITHMS:
        raise ConfigError(f"--machine {name}: [network] allreduce_algorithm must be one of "
                          f"{', '.join(MPI_ALGORITHMS)}, got {algorithm!r}")
    shape = machine.get("gemm_shape", {}).get(tcfg.dtype)
    if shape is not None:
        try:
            shape = GemmShape(float(shape["tflops"]) * 1e12, float(shape["gbs"]) * 1e9,
                              float(shape["overhead_us"]) * 1e-6,
                              np.dtype(dtype_of(tcfg.dtype)).itemsize)
            if min(shape.flops, shape.bandwidth) <= 0 or shape.overhead < 0:
                raise ValueError("rates must be > 0")
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"--machine {name}: [gemm_shape.{tcfg.dtype}] needs tflops, gbs "
                              f"and overhead_us: {e}") from None
    return Rates(rate * 1e12 / ranks_per_node, link, efficiency,
                 optimizer * 1e6 if optimizer else None, head,
                 None if bandwidth or not p2p else p2p, shape, latency, algorithm)


def plan(argv: list[str], world: int, rates: Rates | dict[str, Rates], mcfg, tcfg, pcfg,
         node_bytes: float | None = None, ranks_per_node: int = 1,
         process_bytes: int = 0) -> list[dict]:
    """One record per layout: the layout, its command, memory and predicted time (module
    docstring), or the reason it cannot run (node_bytes: the memory of a node, which the
    ranks_per_node ranks on it share; process_bytes: what a rank holds besides the registry's
    categories, the machine's measured process_mib); fastest first, the refused at the end.
    rates: the time model's, or {type: its rates} to plan each of those types (precision
    enumerated: each layout's name ends with its type, fp32 or bf16, its command sets it)."""
    by_type = rates if isinstance(rates, dict) else {tcfg.dtype: rates}
    records = []
    for dtype, type_rates in by_type.items():
        precision = TYPE_FLAGS[dtype] if isinstance(rates, dict) else ("", [])
        records += _plan_type(argv, world, type_rates, mcfg, replace(tcfg, dtype=dtype), pcfg,
                              node_bytes, ranks_per_node, process_bytes, precision)
    return sorted(records, key=lambda r: ("refused" in r,
                                          r.get("step_time_s", {}).get("total", 0)))


def _plan_type(argv, world, rates, mcfg, tcfg, pcfg, node_bytes, ranks_per_node,
               process_bytes, precision):
    """plan's records of one type; precision: (the name's suffix, the command's flags)."""
    out, units = [], {}        # (tp, pp, pp rank, v, 2-D, ep, part) -> rank_units
    tag, type_flags = precision
    for name, cfg, tp, pp, dp, reason in layouts(world, mcfg, tcfg, pcfg, ranks_per_node):
        name += f" {tag}" if tag else ""
        record = {"layout": name, "ranks": world,
                  "command": [*argv, *type_flags, *layout_flags(cfg)]}
        if reason:
            out.append({**record, "refused": reason})
            continue
        v, two_d = cfg.num_virtual_stages, cfg.tensor_parallel_mode == "2d"
        ep = cfg.expert_model_parallel_size

        def of(r: int, part: str) -> list[tuple[str, int]]:
            """rank_units of pipeline rank r, computed once for every layout that shares them."""
            if (tp, pp, r, v, two_d, ep, part) not in units:
                units[tp, pp, r, v, two_d, ep, part] = rank_units(mcfg, tp, pp, r, v, two_d,
                                                                  ep, part)
            return units[tp, pp, r, v, two_d, ep, part]
        split = bool(cfg.zero_stage and ep > 1)      # ZeRO's second region: the experts
        stages = [(of(r, "dense" if split else "all"), of(r, "experts") if split else None)
                  for r in range(pp)]
        per_rank = [rank_memory(mcfg, tcfg, cfg, tp, pp, dp, r, s, dense, experts=own)
                    for r, (dense, own) in enumerate(stages)
                    for s in distinct_shards(dense, cfg, dp, own)]
        record["memory_bytes"] = dict(max(per_rank, key=lambda m: m["total"]))
        if mcfg.num_experts and (ep > 1 or mcfg.moe_expert_capacity_factor > 0):
            # The experts' activations as balanced routing keeps them; the most any routing
            # could make a rank keep beside it.
            record["activations_worst_bytes"] = max(
                rank_memory(mcfg, tcfg, cfg, tp, pp, dp, r, 0, dense, "worst", own)[
                    "activations"] for r, (dense, own) in enumerate(stages))
        if process_bytes:
            record["memory_bytes"]["process"] = process_bytes
            record["memory_bytes"]["total"] += process_bytes
        need = record["memory_bytes"]["total"] * ranks_per_node
        if node_bytes and need > node_bytes:
            out.append({**record, "refused": f"needs {need / 2**30:,.1f} GiB a node "
                                             f"({ranks_per_node} ranks), the node has "
                                             f"{node_bytes / 2**30:,.1f}"})
            continue
        micro = tcfg.micro_batches(dp // cfg.context_parallel_size)
        expert_elements = (max(sum(n for _, n in of(r, "experts")) for r in range(pp))
                           if ep > 1 else 0)
        elements = max(padded(sum(n for _, n in of(r, "all")), cfg, dp) for r in range(pp))
        time = predict(Config(world, Layout(name, tp, pp, cfg.zero_stage), dp, micro),
                       mcfg, tcfg, cfg, rates.gemm_at(mcfg, tcfg, cfg), rates.link, elements,
                       rates.efficiency,
                       rates.optimizer, rates.head, rates.p2p, expert_elements, rates.latency,
                       rates.algorithm, ranks_per_node)
        gemm = time.pop("gemm_s")
        time = {k: v for k, v in time.items() if k != "allreduce_share"}
        blocks = mcfg.num_layers // (pp * cfg.num_virtual_stages)   # full recomputation: one
        if cfg.recompute_granularity == "full":         # (a third of their FLOPs) of the
            more = 1 + cfg.recomputed_blocks(blocks, 0) / blocks / 3     # blocks, in every
            time["compute_s"] *= more                   # stage: the bubble waits on the others'
            time["bubble_s"] *= more
            gemm *= more
        time["total"] = sum(v for v in time.values() if v is not None)
        record["step_time_s"] = time
        record["compute_split_s"] = {"gemm_s": gemm, "other_s": time["compute_s"] - gemm}
        out.append(record)
    return out


def measured_gemm_rate(tcfg) -> float:
    """This machine's GEMM rate for the run's type, as the trainer measures and caches it."""
    from . import metrics
    from .data.corpus import cache_dir
    dtype = dtype_of(tcfg.dtype)
    return metrics.GemmRate.measure(dtype, metrics.machine_key(tcfg.backend, dtype),
                                    cache_dir() / "gemm-rates.json").rate


def show(records: list[dict], top: int, mib=2.0 ** -20) -> None:
    fits = [r for r in records if "refused" not in r]
    for r in fits[:top]:
        m, t = r["memory_bytes"], r["step_time_s"]
        comm = ("" if t["allreduce_s"] is None else
                f", all-reduce {t['allreduce_s']:.3g} s"
                + ("" if t["tensor_s"] is None else f", tensor {t['tensor_s']:.3g} s")
                + (f", context {t['context_s']:.3g} s" if t.get("context_s") else "")
                + (f", pipeline {t['pipeline_s']:.3g} s" if t.get("pipeline_s") else "")
                + (f", experts {t['experts_s']:.3g} s" if t.get("experts_s") else "")
                + (f", latency {t['latency_s']:.3g} s" if t.get("latency_s") else ""))
        comm += "" if t["optimizer_s"] is None else f", optimizer {t['optimizer_s']:.3g} s"
        split = r["compute_split_s"]
        print(f"{r['layout']:<38} {t['total']:.3g} s/step (compute {t['compute_s']:.3g} s: "
              f"GEMMs {split['gemm_s']:.3g} s, other {split['other_s']:.3g} s; "
              f"bubble {t['bubble_s']:.3g} s{comm}) | {m['total'] * mib:,.1f} MiB/rank "
              f"(params {m['params'] * mib:,.1f}, grads {m['grads'] * mib:,.1f}, optimizer "
              f"{m['optimizer'] * mib:,.1f}, activations {m['activations'] * mib:,.1f}"
              + (f" with balanced routing, up to {r['activations_worst_bytes'] * mib:,.1f}"
                 if "activations_worst_bytes" in r else "")
              + (f", process {m['process'] * mib:,.0f}" if "process" in m else "") + ")")
        print(f"    mpiexec -n {r['ranks']} python -m refgpt.train {' '.join(r['command'])}")
    refused = [r for r in records if "refused" in r]
    if refused:
        print(f"not runnable ({len(refused)}):")
        for r in refused:
            print(f"  {r['layout']}: {r['refused']}")


def training_flags(argv: list[str]) -> list[str]:
    """argv without the planner's own flags (and their values), and without
    --context-parallel-size, which the planner reads as the largest context-parallel size to
    consider and each layout sets: what refgpt.train takes besides the layout."""
    own = {f"--{k.replace('_', '-')}" for k in PLAN_FLAGS} | {"--context-parallel-size"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in own:
            skip = a != "--json"                       # the others take a value
        elif a.split("=", 1)[0] not in own:
            out.append(a)
    return out


def build_plan_parser() -> argparse.ArgumentParser:
    ap = build_parser("refgpt.plan", plain(__doc__))
    g = ap.add_argument_group("plan")
    g.add_argument("--nodes", type=int, default=1, help="nodes [default: 1]")
    g.add_argument("--ranks-per-node", type=int, default=1, help="MPI ranks per node [default: 1]")
    g.add_argument("--allreduce-bandwidth", type=float, default=0.0,
                   help="GB/s a rank moves in an all-reduce (0: communication not predicted)")
    g.add_argument("--json", action="store_true", default=False,
                   help="print the records as JSON, one object per layout")
    g.add_argument("--top", type=int, default=10, help="layouts printed [default: 10]")
    g.add_argument("--machine", default="",
                   help="a machine description (TOML; a64fx-fugaku is shipped): its GEMM rate, "
                        "all-reduce bandwidth and memory per node [default: this machine's "
                        "measured GEMM rate, no memory limit]")
    g.add_argument("--calibrate", default="",
                   help="measure this machine (under mpiexec: its all-reduce too) and write "
                        "its description to this TOML file; plan nothing")
    return ap


CALIBRATED = ("float64", "float32", "bfloat16")


def data_parallel_step(mcfg, tcfg, pcfg, world) -> tuple[float, float, int]:
    """(seconds a step, seconds its optimizer, peak resident bytes beyond the registry) of this
    model's plain data-parallel training step on every rank of `world` with the run's
    settings (pcfg: buckets, overlap), as refgpt.train runs it: two micro-batches of
    synthetic data a rank, the median of three steps after a first (which compiles and
    warms), each started by a barrier, each the slowest rank's; memory, the most any rank
    held beyond its parameters, gradients, optimizer state, activations and ZeRO buffers
    (interpreter, libraries, MPI's buffers)."""
    from mpi4py import MPI

    from .engine import Trainer
    from .parallel.grid import Grid
    tcfg = replace(tcfg, synthetic_data=True, eval_iters=0, train_iters=4, load="", save="",
                   global_batch_size=2 * tcfg.micro_batch_size * world.size)
    trainer = Trainer(mcfg, tcfg, pcfg, Grid(world), log=lambda *_: None)
    steps, updates = [], []
    for step in range(4):
        world.Barrier()
        start = time.perf_counter()
        trainer.train_step()
        spent = time.perf_counter() - start
        update = trainer.timers.take()["optimizer"]
        if step:
            steps.append(world.allreduce(spent, op=MPI.MAX))
            updates.append(world.allreduce(update, op=MPI.MAX))
    mem = trainer.memory()
    held = mem["peak_rss"] - sum(mem[k] for k in ("params", "grads", "optimizer", "activations",
                                                  "working_peak"))
    trainer.grid.free()
    return float(np.median(steps)), float(np.median(updates)), world.allreduce(held, op=MPI.MAX)


def head_step(mcfg, tcfg, world) -> float:
    """Seconds the LM head's forward and backward of one micro-batch take (the final
    LayerNorm, the logits' GEMM against the tied token table and the loss over the vocabulary;
    the model's last stage with no blocks), on every rank at once: the head's own share of
    the GEMM rate is head_flops / (that time x the rate)."""
    from .backend import Backend, synchronize, to_device
    from .nn.gpt import GPT, Stage
    from .study.measure import timed
    dtype = dtype_of(tcfg.dtype)
    rng = np.random.default_rng(0)
    B, T, C = tcfg.micro_batch_size, mcfg.seq_length, mcfg.hidden_size
    with Backend(tcfg.backend, tf32=tcfg.tf32):
        head = GPT(mcfg, dtype, stage=Stage(range(0), first=False, last=True))
        x = to_device(rng.standard_normal((B, T, C)).astype(dtype))
        y = to_device(rng.integers(0, mcfg.vocab_size, (B, T)))

        def step():
            head.forward(x, y)
            head.backward()
            synchronize()
        return timed(world, step)


def exchange_seconds(world, nbytes: int, repeats: int = 8) -> float:
    """Seconds a rank takes to send nbytes to another while it receives as much
    (MPI_Sendrecv between ranks 2i and 2i+1, every pair at once, as a pipeline's stages
    exchange activations and gradients): the slowest pair's, the median of three runs of
    `repeats` exchanges. Large messages give the point-to-point rate, 8 bytes the latency."""
    from .study.measure import timed
    buf, got = np.ones(max(nbytes // 4, 1), np.float32), np.empty(max(nbytes // 4, 1), np.float32)
    peer = world.rank ^ 1

    def exchange():
        for _ in range(repeats):
            if peer < world.size:
                world.Sendrecv(buf, dest=peer, recvbuf=got, source=peer)
    return timed(world, exchange) / repeats


def step_efficiency(time_at: Callable[[float], float], seconds: float) -> float:
    """The step efficiency e at which a layout's predicted step, time_at(e), takes `seconds`.
    The prediction is affine in 1/e (the blocks' compute and the bubble scale with it, the
    head at the GEMM rate, the collectives and the optimizer do not), so two predictions give
    e exactly; 1 where even e = 1 predicts more than `seconds` (a step all overhead)."""
    fastest = time_at(1.0)
    if seconds <= fastest:
        return 1.0
    return 1.0 / (1.0 + (seconds - fastest) / (time_at(0.5) - fastest))


def tensor_sizes_ok(mcfg, t: int) -> bool:
    """Whether 1-D tensor parallelism of t splits this model (refgpt.parallel.tensor's check)."""
    try:
        check_divisible(mcfg, t, False)
    except ConfigError:
        return False
    return True


def calibrate(path: str, mcfg, tcfg, pcfg) -> None:
    """Write this machine's description: its cores and memory, the GEMM rate the trainer
    measures in each type refgpt trains in (float64, float32, bfloat16 where ml_dtypes is
    installed), (under mpiexec with more than one rank) the all-reduce rate of each group
    size, the point-to-point rate and latency of pairs (exchange_seconds), the LM head's own
    share of the GEMM rate (head_step), a GEMM's time by its shape fitted to the model's
    products at every tensor-parallel size (refgpt.study.gemm_shapes), and from the model
    given trained data-parallel on every rank (data_parallel_step): the step efficiency that
    makes the planner predict that step's measured time (everything a step does besides
    GEMMs and communication, and what the overlapped all-reduce costs the cores, is in it),
    the optimizer's rate and the memory a rank holds beyond the registry."""
    from mpi4py import MPI

    from .parallel.threads import node_memory, ranks_on_node, set_threads
    from .study.measure import cpu_name, group_rates
    world = MPI.COMM_WORLD
    set_threads(world, pcfg.threads_per_rank)           # as refgpt.train runs its ranks
    per_node = ranks_on_node(world)
    memory = node_memory()
    links = (group_rates(world, rank_elements(mcfg, 1, 1, 0), pcfg.ddp_bucket_size,
                         tcfg.dtype, pcfg.overlap_grad_reduce) if world.size > 1 else {})
    link = group_link({"allreduce_gbs_by_ranks": {n: r / 1e9 for n, r in links.items()}})
    act = tcfg.micro_batch_size * mcfg.seq_length * mcfg.hidden_size * 4
    sends = act / exchange_seconds(world, act) if world.size > 1 else 0.0
    latency = exchange_seconds(world, 8, 1000) if world.size > 1 else 0.0
    waits = group_latency({"latency_us": latency * 1e6}, per_node) if latency else None
    rates, efficiency, heads, optimizer, process = {}, {}, {}, {}, None
    shapes, misfit = {}, {}
    sizes = [t for t in range(1, world.size + 1) if world.size % t == 0 and tensor_sizes_ok(
        mcfg, t)]
    products = sorted({(m, n, k) for t in sizes
                       for m, n, k, _ in model_gemms(mcfg, tcfg.micro_batch_size, t)})
    # The run's settings (buckets, overlap, threads) on the plain data-parallel layout.
    dp_cfg = replace(pcfg, context_parallel_size=1)
    plain = layout_flags(dp_cfg)                            # the data-parallel layout's flags
    for dtype in sorted(CALIBRATED, key=lambda t: t != tcfg.dtype):
        run = replace(tcfg, dtype=dtype, global_batch_size=2 * tcfg.micro_batch_size * world.size)
        need = rank_memory(mcfg, run, dp_cfg, 1, 1, world.size)["total"]
        # Every rank holds the whole model, beside what the types measured before left
        # resident (freed arrays need not go back to the system).
        if (need + peak_rss() + 2**30) * per_node > 0.85 * memory:
            if world.rank == 0:
                print(f"{dtype}: not calibrated, {per_node} whole models do not fit in memory")
            continue
        # The run's type first: the peak resident set only grows, so the memory beyond the
        # registry is its trainer's. bfloat16 without ml_dtypes is not calibrated.
        try:
            world.Barrier()
            rate = world.allreduce(measured_gemm_rate(run), op=MPI.MIN)
            seconds, update, held = data_parallel_step(mcfg, run, dp_cfg, world)
        except ImportError:
            continue
        rates[dtype], process = rate, held if process is None else process
        optimizer[dtype] = rank_elements(mcfg, 1, 1, 0) / update
        heads[dtype] = min(1.0, head_flops(mcfg, run.micro_batch_size)
                           / (head_step(mcfg, run, world) * rate))
        timed_products = time_gemms(world, products, dtype_of(dtype))
        shapes[dtype] = GemmShape.fit(timed_products, np.dtype(dtype_of(dtype)).itemsize, rate)
        misfit[dtype] = float(np.median([abs(shapes[dtype].seconds(m, n, k) / t - 1)
                                         for m, n, k, t in timed_products]))

        def dp_step(e: float, run=run, rate=rate, update=optimizer[dtype],
                    head=heads[dtype], shape=shapes[dtype]) -> float:
            """The plan's time of the step just measured, at step efficiency e."""
            records = plan([], world.size, Rates(rate, link, e, update, head, shape=shape,
                                                 latency=waits),
                           mcfg, run, dp_cfg, ranks_per_node=per_node)
            return next(r for r in records if r["command"] == plain)["step_time_s"]["total"]
        efficiency[dtype] = step_efficiency(dp_step, seconds)
    if not rates:
        raise ConfigError(f"--calibrate: {per_node} copies of this model fit this node's memory "
                          f"in no type ({', '.join(CALIBRATED)}): calibrate a smaller model")
    if world.Get_rank():
        return
    shape = (f"{mcfg.num_layers} layers, hidden {mcfg.hidden_size}, sequence "
             f"{mcfg.seq_length}, {tcfg.micro_batch_size} x 2 sequences a rank, data-parallel "
             f"on {world.size} ranks")
    lines = [f'name = "{cpu_name()}"',
             f"cores_per_node = {os.cpu_count()}",
             f"memory_gib_per_node = "
             f"{memory / 2**30:.1f}",
             f"process_mib = {process / 2**20:.0f}     # a rank's peak resident memory beyond "
             "the registry (interpreter, libraries, buffers)",
             "", "[gemm_tflops_per_node]     # the GEMM rate of one rank, times the ranks "
             f"measured ({per_node} on a node)"]
    lines += [f"{dtype} = {rate * per_node / 1e12:.4f}" for dtype, rate in rates.items()]
    lines += ["", "[step_efficiency]     # the share of that rate that makes the planner's "
              f"step time equal the measured: {shape}"]
    lines += [f"{dtype} = {e:.3f}" for dtype, e in efficiency.items()]
    lines += ["", "[head_efficiency]     # the LM head's share of that rate, its forward and "
              "backward of one micro-batch alone on every rank (refgpt.plan.head_step)"]
    lines += [f"{dtype} = {e:.3f}" for dtype, e in heads.items()]
    for dtype, shape in shapes.items():
        lines += ["", f"[gemm_shape.{dtype}]     # a rank's GEMM of [m, k] x [k, n] takes 2mnk / "
                  "F + w (mk + kn + mn) / B + t0 (refgpt.study.gemm_shapes), fitted to "
                  f"{len(products)} products of this model at tensor-parallel sizes "
                  f"{', '.join(map(str, sizes))}, every rank at once (median error "
                  f"{misfit[dtype]:.0%})",
                  f"tflops = {shape.flops / 1e12:.4f}", f"gbs = {shape.bandwidth / 1e9:.2f}",
                  f"overhead_us = {shape.overhead * 1e6:.2f}"]
    lines += ["", "[optimizer_melem_s]     # millions of elements a rank's optimizer updates a "
              "second (the slowest rank's)"]
    lines += [f"{dtype} = {r / 1e6:.1f}" for dtype, r in optimizer.items()]
    if links:
        lines += ["", "[network]", f"allreduce_gbs = {links[world.size] / 1e9:.3f}     # a rank "
                  f"of {world.size}", f"p2p_gbs = {sends / 1e9:.3f}     # a rank to another, "
                  f"all pairs at once, messages of {act:,} bytes (a micro-batch's activations)",
                  f"latency_us = {latency * 1e6:.2f}     # a message of 8 bytes, the same pairs",
                  "", "[network.allreduce_gbs_by_ranks]     # GB/s a rank "
                  f"moves in groups of n ranks, all at once, {tcfg.dtype} gradients in buckets "
                  f"of {pcfg.ddp_bucket_size:,} elements, "
                  + ("non-blocking" if pcfg.overlap_grad_reduce else "blocking")]
        lines += [f"{n} = {r / 1e9:.3f}" for n, r in links.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    values = vars(build_plan_parser().parse_args(argv))
    own = {k: values.pop(k) for k in PLAN_FLAGS}
    for name in ("nodes", "ranks_per_node", "top"):
        if own[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {own[name]}")
    if own["allreduce_bandwidth"] < 0:
        raise ConfigError("--allreduce-bandwidth must be >= 0")
    given = {k for k in values}
    layout_set = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "zero_stage",
                  "recompute_granularity", "cp_comm_type", "pipeline_schedule",
                  "num_virtual_stages", "tensor_parallel_mode", "dp_shared_memory"} & given
    if layout_set:
        raise ConfigError("the planner chooses " + ", ".join(
            f"--{k.replace('_', '-')}" for k in sorted(layout_set)) + " itself")
    mcfg, tcfg, pcfg, keys, _ = configs_from(values)      # keys: the flags and --config's
    if pcfg.context_parallel_size < 1:          # the largest CP size the planner considers
        raise ConfigError(f"--context-parallel-size must be >= 1, got "
                          f"{pcfg.context_parallel_size}")
    if own["calibrate"]:
        folder = Path(own["calibrate"]).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"--calibrate {own['calibrate']}: cannot write in {folder}")
        calibrate(own["calibrate"], mcfg, tcfg, pcfg)
        return 0
    world = own["nodes"] * own["ranks_per_node"]
    flags = training_flags(argv)
    node_bytes, process, machine = None, 0, None
    if own["machine"]:
        machine = read_machine(own["machine"])
        node_bytes = machine["memory_gib_per_node"] * 2**30
        process = int(machine.get("process_mib", 0) * 2**20)
    # Precision is the run's where it names one, else a dimension of the plan: every type of
    # PRECISIONS with a rate (in the machine, or measurable here).
    named = "dtype" in keys                       # --bf16 and --fp16 set it too
    rates, unplanned = {}, []
    for dtype in [tcfg.dtype] if named else PRECISIONS:
        run = replace(tcfg, dtype=dtype)
        try:
            rates[dtype] = (machine_rates(machine, run, own["ranks_per_node"],
                                          own["allreduce_bandwidth"]) if machine else
                            Rates(measured_gemm_rate(run),
                                  group_link({}, own["allreduce_bandwidth"])))
        except (ConfigError, ImportError) as e:
            if named:
                raise
            unplanned.append(f"{dtype} not planned: {e}")
    if not rates:
        raise ConfigError("; ".join(unplanned))
    if len(rates) == 1:                  # one type: its flags (where not the run's own)
        (dtype, rates), = rates.items()
        flags += TYPE_FLAGS[dtype][1] if dtype != tcfg.dtype else []
        tcfg = replace(tcfg, dtype=dtype)
    records = plan(flags, world, rates, mcfg, tcfg, pcfg, node_bytes, own["ranks_per_node"],
                   process)
    if own["json"]:
        print(json.dumps(records, indent=1))
        for line in unplanned:
            print(line, file=sys.stderr)
    else:
        print(f"{world} ranks ({own['nodes']} node(s) x {own['ranks_per_node']}), "
              f"{len([r for r in records if 'refused' not in r])} layouts run"
              + ("" if any(r.link for r in ([rates] if isinstance(rates, Rates)
                                            else rates.values()))
                 else "; communication not predicted "
                 "(give --allreduce-bandwidth GB/s or a --machine with a network)"))
        for line in unplanned:
            print(line)
        show(records, own["top"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
