"""Plan a run: which layouts of a model fit on N nodes of R ranks, with each rank's memory, and
how fast each would be.

    python -m refgpt.plan --nodes 1 --ranks-per-node 16 --num-layers 12 --hidden-size 768 \
        --num-attention-heads 12 --seq-length 1024 --vocab-size 50257 \
        --global-batch-size 16 --micro-batch-size 1 [--allreduce-bandwidth 5] [--json]

The layouts: every tensor-parallel size t (1-D) and pipeline size p (1F1B) that divide the
world and the model, the data-parallel size d = world / (t p) the rest, ZeRO stage 0-3, and
activation recomputation off, selective or full, as refgpt.train's check_layout accepts them
(those it refuses are listed with its reason). Each one's memory per rank, in the categories
of the training log's ``memory_bytes``, on the rank that holds the most (the first pipeline
stage keeps the most micro-batches in flight):

    params, grads, optimizer   P elements on the rank: its stage's parameters, its tensor-
                               parallel shard of each, padded to a multiple of d under ZeRO;
                               ZeRO's table (refgpt.parallel.zero) splits each over d
    activations                refgpt's formula of what the layers keep for backward at the
                               peak (refgpt.nn.activations), which the registry equals

These are the registry's own numbers (tests/test_plan.py and mpi_tests/test_plan.py run the
layouts and compare), not estimates; with a machine file that has ``process_mib`` (what a
rank held beyond them when calibrated: interpreter, libraries, transient buffers) the record
adds it as ``process``. What they leave out is named: ZeRO-3's and the buckets' temporary
buffers beyond that, which grow with the model. The time per step is the scaling study's cost
model (refgpt.study.plan.predict): the busiest pipeline stage's FLOPs at the rates a training
step reaches (the LM head at the GEMM rate, the blocks at what makes the whole model run at
the GEMM rate times the machine's calibrated step efficiency), the pipeline's bubble from the
schedule simulator, and, given --allreduce-bandwidth (GB/s a rank moves in an all-reduce) or
a machine's network, the data- and tensor-parallel traffic by the counters' formulas, not
overlapped; full recomputation adds a third of the recomputed blocks' FLOPs (one more
forward), selective's extra attention-core FLOPs are not counted. Layouts are printed fastest first, each with the
command that runs it. docs/plan.md sets these predictions beside 23 measured runs.

Machines (--machine): a small TOML file, or the name of one in refgpt/machines (a64fx-fugaku,
from published figures, each cited in the file): cores and memory per node, the GEMM rate per
node by type, the step efficiency by type ([step_efficiency]), process_mib, and the
all-reduce rate a rank moves ([network] allreduce_gbs). With one, the rates are its own and a
layout whose ranks on a node need more than the node's memory is refused with the figure.
``--calibrate FILE`` (under mpiexec, one rank per core as in training) measures this machine,
with the step efficiency of the model given by the other flags, and writes its file.

Not yet (issue 30): context and expert parallelism, virtual stages and other schedules,
2-D tensor parallelism, shared-memory ZeRO and offload in the enumeration; a GEMM rate by
shape, an alpha-beta all-reduce and the machine's core groups in the time model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .cli import exit_on_user_error, plain
from .config import ConfigError
from .engine.report import activation_formulas
from .nn.gpt import param_specs
from .parallel.build import check_layout
from .parallel.pipeline import stage_of
from .parallel.tensor import shard, shard_kind
from .precision import compute_dtype, dtype_of, is_half
from .study.plan import Config, Layout, predict
from .train import build_parser, configs_from

PLAN_FLAGS = ("nodes", "ranks_per_node", "allreduce_bandwidth", "json", "top", "machine",
              "calibrate")
MACHINES = Path(__file__).parent / "machines"
RECOMPUTE = ("", "selective", "full")


def rank_elements(mcfg, tp: int, pp: int, pp_rank: int) -> int:
    """The parameters a rank holds: its pipeline stage's, its 1-D tensor-parallel shard of
    each (every TP rank's shard is the same size: check_layout asks divisibility)."""
    stage = stage_of(pp_rank, pp, 1, mcfg.num_layers) if pp > 1 else None
    return sum(shard(np.empty(s.shape, bool), shard_kind(s.name), 0, tp).size if tp > 1
               else s.size for s in param_specs(mcfg, stage))


def padded_elements(mcfg, pcfg, tp: int, pp: int, dp: int, pp_rank: int = 0) -> int:
    """The rank's flat buffer: its elements, padded to a multiple of d under ZeRO."""
    P = rank_elements(mcfg, tp, pp, pp_rank)
    return -(-P // dp) * dp if pcfg.zero_stage else P


def rank_memory(mcfg, tcfg, pcfg, tp: int, pp: int, dp: int, pp_rank: int = 0) -> dict:
    """The registry's categories for one rank of the layout (module docstring), in bytes."""
    dtype = np.dtype(dtype_of(tcfg.dtype))
    state = np.dtype(compute_dtype(dtype)).itemsize
    p = dtype.itemsize
    g = 2 if pcfg.grad_reduce_in_bf16 else state
    k = 2 * state + (state if is_half(dtype) else 0)           # moments, and fp32 masters
    stage = pcfg.zero_stage
    P = padded_elements(mcfg, pcfg, tp, pp, dp, pp_rank)
    grid = SimpleNamespace(tp_size=tp, pp_size=pp, pp_rank=pp_rank, data_size=dp, cp_size=1)
    mem = {"params": p * (P // dp if stage == 3 else P),
           "grads": g * (P // dp if stage >= 2 else P),
           "optimizer": k * (P // dp if stage >= 1 else P),
           "activations": activation_formulas(mcfg, tcfg, pcfg, grid)["activations_formula"]}
    mem["total"] = sum(mem.values())
    return mem


def layouts(world: int, mcfg, tcfg, pcfg):
    """(name, pcfg, tp, pp, dp, reason or "") of every layout the module docstring lists."""
    for tp in (t for t in range(1, world + 1) if world % t == 0):
        for pp in (q for q in range(1, world // tp + 1) if world // tp % q == 0):
            dp = world // (tp * pp)
            for zero in range(4):
                if zero and dp == 1:
                    continue
                for recompute in RECOMPUTE:
                    cfg = replace(pcfg, tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, zero_stage=zero,
                                  recompute_granularity=recompute, tensor_parallel_mode="1d",
                                  num_virtual_stages=1, pipeline_schedule="1f1b",
                                  sequence_parallel=pcfg.sequence_parallel and tp > 1)
                    name = (f"tp{tp} pp{pp} dp{dp}" + (f" zero-{zero}" if zero else "")
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
    if pcfg.zero_stage:
        flags += ["--zero-stage", str(pcfg.zero_stage)]
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
    return m


def machine_rates(machine: dict, tcfg, ranks_per_node: int, bandwidth: float):
    """(GEMM FLOP/s per rank, all-reduce bytes/s per rank or None, step efficiency) from a
    machine description: its GEMM rate for the run's type, and its step efficiency for that
    type where it has one ([step_efficiency]: the share of the GEMM rate a whole step's model
    FLOPs reach, with everything that is not a GEMM; 1 where not calibrated, which makes the
    compute term a lower bound); --allreduce-bandwidth, where given, wins."""
    rate = machine["gemm_tflops_per_node"].get(tcfg.dtype)
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise ConfigError(f"--machine {machine['name']}: no GEMM rate for {tcfg.dtype} "
                          f"(it has {sorted(machine['gemm_tflops_per_node'])})")
    efficiency = machine.get("step_efficiency", {}).get(tcfg.dtype, 1.0)
    if not isinstance(efficiency, (int, float)) or not 0 < efficiency <= 1:
        raise ConfigError(f"--machine {machine['name']}: step_efficiency.{tcfg.dtype} must be "
                          f"in (0, 1], got {efficiency!r}")
    link = bandwidth or machine.get("network", {}).get("allreduce_gbs", 0)
    return rate * 1e12 / ranks_per_node, link or 0.0, efficiency


def plan(argv: list[str], world: int, bandwidth: float, gemm_rate: float, mcfg, tcfg,
         pcfg, node_bytes: float | None = None, ranks_per_node: int = 1,
         process_bytes: int = 0, efficiency: float = 1.0) -> list[dict]:
    """One record per layout: the layout, its command, memory and predicted time (module
    docstring), or the reason it cannot run (node_bytes: the memory of a node, which the
    ranks_per_node ranks on it share; process_bytes: what a rank holds besides the registry's
    categories, the machine's measured process_mib); fastest first, the refused at the end."""
    link = bandwidth * 1e9 if bandwidth else None
    out = []
    for name, cfg, tp, pp, dp, reason in layouts(world, mcfg, tcfg, pcfg):
        record = {"layout": name, "ranks": world,
                  "command": [*argv, *layout_flags(cfg)]}
        if reason:
            out.append({**record, "refused": reason})
            continue
        per_rank = [rank_memory(mcfg, tcfg, cfg, tp, pp, dp, r) for r in range(pp)]
        record["memory_bytes"] = dict(max(per_rank, key=lambda m: m["total"]))
        if process_bytes:
            record["memory_bytes"]["process"] = process_bytes
            record["memory_bytes"]["total"] += process_bytes
        need = record["memory_bytes"]["total"] * ranks_per_node
        if node_bytes and need > node_bytes:
            out.append({**record, "refused": f"needs {need / 2**30:,.1f} GiB a node "
                                             f"({ranks_per_node} ranks), the node has "
                                             f"{node_bytes / 2**30:,.1f}"})
            continue
        micro = tcfg.micro_batches(dp)
        elements = max(padded_elements(mcfg, cfg, tp, pp, dp, r) for r in range(pp))
        time = predict(Config(world, Layout(name, tp, pp, cfg.zero_stage), dp, micro),
                       mcfg, tcfg, cfg, gemm_rate, link, elements, efficiency)
        time = {k: v for k, v in time.items() if k != "allreduce_share"}
        blocks = mcfg.num_layers // pp                  # full recomputation: one more forward
        if cfg.recompute_granularity == "full":         # (a third of their FLOPs) of the
            time["compute_s"] *= 1 + cfg.recomputed_blocks(blocks, 0) / blocks / 3   # blocks
        time["total"] = sum(v for v in time.values() if v is not None)
        record["step_time_s"] = time
        out.append(record)
    return sorted(out, key=lambda r: ("refused" in r, r.get("step_time_s", {}).get("total", 0)))


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
                + ("" if t["tensor_s"] is None else f", tensor {t['tensor_s']:.3g} s"))
        print(f"{r['layout']:<38} {t['total']:.3g} s/step (compute {t['compute_s']:.3g} s, "
              f"bubble {t['bubble_s']:.3g} s{comm}) | {m['total'] * mib:,.1f} MiB/rank "
              f"(params {m['params'] * mib:,.1f}, grads {m['grads'] * mib:,.1f}, optimizer "
              f"{m['optimizer'] * mib:,.1f}, activations {m['activations'] * mib:,.1f}"
              + (f", process {m['process'] * mib:,.0f}" if "process" in m else "") + ")")
        print(f"    mpiexec -n {r['ranks']} python -m refgpt.train {' '.join(r['command'])}")
    refused = [r for r in records if "refused" in r]
    if refused:
        print(f"not runnable ({len(refused)}):")
        for r in refused:
            print(f"  {r['layout']}: {r['refused']}")


def training_flags(argv: list[str]) -> list[str]:
    """argv without the planner's own flags (and their values): what refgpt.train takes."""
    own = {f"--{k.replace('_', '-')}" for k in PLAN_FLAGS}
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


def step_rate(mcfg, tcfg) -> tuple[float, list[int]]:
    """(model FLOP/s of a training step of this model on this rank alone: two micro-batches of
    synthetic data, best of two steps after one, [its peak resident bytes beyond the
    registry])."""
    import time

    from .config import ParallelConfig
    from .engine import Trainer
    from .metrics import model_flops
    tcfg = replace(tcfg, synthetic_data=True, global_batch_size=2 * tcfg.micro_batch_size,
                   eval_iters=0, train_iters=3, load="", save="")
    trainer = Trainer(mcfg, tcfg, ParallelConfig(), log=lambda *_: None)
    best = float("inf")
    for step in range(3):
        start = time.perf_counter()
        trainer.train_step()
        best = min(best, time.perf_counter() - start) if step else best
    mem = trainer.memory()
    held = mem["peak_rss"] - sum(mem[k] for k in ("params", "grads", "optimizer", "activations"))
    return model_flops(mcfg, tcfg.global_batch_size) / best, [held]


def calibrate(path: str, mcfg, tcfg) -> None:
    """Write this machine's description: its cores and memory, the GEMM rate the trainer
    measures in each type refgpt trains in (float64, float32, bfloat16 where ml_dtypes is
    installed), the step efficiency of the model given (its training step's model FLOP rate
    over that GEMM rate, every rank running its own step at once: the node's memory bandwidth
    shared as in training), the memory a rank holds beyond the registry, and (under mpiexec
    with more than one rank) the all-reduce rate a rank moves."""
    from mpi4py import MPI
    from .study.measure import cpu_name, link_rate
    world = MPI.COMM_WORLD
    rates = {}
    efficiency, process = {}, []
    for dtype in CALIBRATED:
        try:
            rate = measured_gemm_rate(replace(tcfg, dtype=dtype))
            step, held = step_rate(mcfg, replace(tcfg, dtype=dtype))
        except ImportError:                              # bfloat16 without ml_dtypes
            rate = step = 0.0
            held = []
        rates[dtype] = world.allreduce(rate, op=MPI.MIN)
        if rates[dtype]:
            efficiency[dtype] = world.allreduce(min(step / rate, 1.0), op=MPI.SUM) / world.size
        process += held
    process = world.allreduce(max(process), op=MPI.MAX)
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    per_node = node.Get_size()
    node.Free()
    link = link_rate(world, 1 << 22, tcfg.dtype) / 1e9 if world.Get_size() > 1 else 0.0
    if world.Get_rank():
        return
    lines = [f'name = "{cpu_name()}"',
             f"cores_per_node = {os.cpu_count()}",
             f"memory_gib_per_node = "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f}",
             f"process_mib = {process / 2**20:.0f}     # a rank's peak resident memory beyond "
             "the registry (interpreter, libraries, buffers)",
             "", "[gemm_tflops_per_node]     # the GEMM rate of one rank, times the ranks "
             f"measured ({per_node} on a node)"]
    lines += [f"{dtype} = {rate * per_node / 1e12:.4f}" for dtype, rate in rates.items() if rate]
    lines += ["", "[step_efficiency]     # the share of that rate a training step's model FLOPs "
              f"reach: {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, sequence "
              f"{mcfg.seq_length}, {tcfg.micro_batch_size} x 2 sequences, every rank at once"]
    lines += [f"{dtype} = {e:.3f}" for dtype, e in efficiency.items()]
    if link:
        lines += ["", "[network]", f"allreduce_gbs = {link:.3f}     # a rank, "
                  f"{world.Get_size()} ranks, 16 MiB of {tcfg.dtype} gradients"]
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
                  "recompute_granularity"} & given
    if layout_set:
        raise ConfigError("the planner chooses " + ", ".join(
            f"--{k.replace('_', '-')}" for k in sorted(layout_set)) + " itself")
    mcfg, tcfg, pcfg, _, _ = configs_from(values)
    if own["calibrate"]:
        calibrate(own["calibrate"], mcfg, tcfg)
        return 0
    world = own["nodes"] * own["ranks_per_node"]
    flags = training_flags(argv)
    gemm, link, node_bytes, process, efficiency = None, own["allreduce_bandwidth"], None, 0, 1.0
    if own["machine"]:
        machine = read_machine(own["machine"])
        gemm, link, efficiency = machine_rates(machine, tcfg, own["ranks_per_node"], link)
        node_bytes = machine["memory_gib_per_node"] * 2**30
        process = int(machine.get("process_mib", 0) * 2**20)
    records = plan(flags, world, link, gemm or measured_gemm_rate(tcfg), mcfg, tcfg, pcfg,
                   node_bytes, own["ranks_per_node"], process, efficiency)
    if own["json"]:
        print(json.dumps(records, indent=1))
    else:
        print(f"{world} ranks ({own['nodes']} node(s) x {own['ranks_per_node']}), "
              f"{len([r for r in records if 'refused' not in r])} layouts run"
              + ("" if link else "; communication not predicted "
                 "(give --allreduce-bandwidth GB/s or a --machine with a network)"))
        show(records, own["top"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
