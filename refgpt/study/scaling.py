"""``python -m refgpt.study.scaling``: a strong-scaling study at a fixed global batch.

The Fugaku GPT work fixed the global batch and set the gradient-accumulation steps to
global batch / data-parallel ranks, then reported per iteration the forward, backward and
all-reduce times, the TFLOP/s per CPU and the efficiency as nodes grew. This command does that
for any list of rank counts and layouts (refgpt.study.plan), with every training flag of
``python -m refgpt.train`` for the model and batch (the study sets the iterations, synthetic
data unless --data-path, one BLAS thread per rank unless --threads-per-rank):

    # one job per rank count, started with the launcher:
    python -m refgpt.study.scaling --ranks 1 2 4 8 16 --layouts dp tp2 pp2 \\
        --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 256 \\
        --micro-batch-size 1 --global-batch-size 16 --launcher "mpiexec" --out runs/scaling
    # or inside one allocation (Slurm, PJM): configurations run on the first R ranks in turn
    mpiexec -n 16 python -m refgpt.study.scaling --ranks 1 2 4 8 16 ...
    # the plan and the predicted all-reduce share, from measured GEMM and all-reduce rates
    python -m refgpt.study.scaling --ranks 1 2 4 8 16 ... --dry-run

Each configuration runs --warmup-iters + --iters steps; the measured ones give the row. In
--out: results.jsonl (raw measurements; a rerun with the same settings reuses the
configurations already there, so an interrupted study continues; --fresh measures again),
scaling.csv, scaling.md and speedup.png, efficiency.png, breakdown.png (refgpt.study.report
defines the columns). The study checks that every configuration's losses equal the
baseline's and exits with status 1 if any does not.
"""

from __future__ import annotations

from ..parallel.threads import quiet_openblas

quiet_openblas()                        # before anything imports NumPy (and loads OpenBLAS)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ..cli import USER_ERRORS  # noqa: E402
from ..config import ConfigError  # noqa: E402
from ..metrics import model_params  # noqa: E402
from ..parallel.launch import abort_job, launched_world_size  # noqa: E402
from ..parallel.threads import set_threads  # noqa: E402
from ..train import build_parser, configs_from  # noqa: E402
from . import report  # noqa: E402
from ..parallel.launch import on_rank0  # noqa: E402
from .measure import core_gemm_rate, group_rates, machine, run_config  # noqa: E402
from .plan import make_plan, parse_layout, predict  # noqa: E402

STUDY_FLAGS = ("ranks", "layouts", "warmup_iters", "iters", "out", "launcher", "dry_run",
               "allreduce_bandwidth", "loss_rtol", "fresh", "only_ranks", "no_report",
               "report_only")
SET_BY_STUDY = ("train_iters", "exit_interval", "eval_iters", "eval_interval", "save", "load",
                "save_interval", "log_jsonl", "tensor_model_parallel_size",
                "pipeline_model_parallel_size")


def build_study_parser():
    ap = build_parser("refgpt.study.scaling", __doc__)
    g = ap.add_argument_group("study")
    g.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4],
                   help="rank counts to measure [default: 1 2 4]")
    g.add_argument("--layouts", nargs="+", default=["dp"],
                   help="dp, tpT, ppP or tpTppP; -zK for ZeRO stage K (dp-z1), -shm for ZeRO-1 "
                        "through shared memory (dp-shm); dp = ranks / (tp x pp) [default: dp]")
    g.add_argument("--warmup-iters", type=int, default=1, help="unmeasured steps first [default: 1]")
    g.add_argument("--iters", type=int, default=3, help="measured steps [default: 3]")
    g.add_argument("--out", default="runs/scaling", help="folder of the results and report "
                                                         "[default: runs/scaling]")
    g.add_argument("--launcher", default="mpiexec",
                   help='command that starts N processes with "-n N" appended, used when the '
                        'study runs outside MPI [default: mpiexec]')
    g.add_argument("--dry-run", action="store_true", default=False,
                   help="print the configurations and the predicted time split; measure nothing")
    g.add_argument("--allreduce-bandwidth", type=float, default=0.0,
                   help="GB/s a rank moves in an all-reduce, for --dry-run (0: measure it)")
    g.add_argument("--loss-rtol", type=float, default=0.0,
                   help="relative loss difference flagged as a mismatch "
                        "[default: 1e-9 in float64, 1e-4 in float32]")
    g.add_argument("--fresh", action="store_true", default=False,
                   help="measure every configuration again instead of reusing results.jsonl")
    g.add_argument("--report-only", action="store_true", default=False,
                   help="measure nothing: draw the report from the configurations in "
                        "results.jsonl measured with these settings")
    g.add_argument("--only-ranks", type=int, default=0, help=argparse.SUPPRESS)  # launched jobs
    g.add_argument("--no-report", action="store_true", default=False,
                   help="measure only; the same command without it draws the report later "
                        "(from results.jsonl, e.g. on a machine with matplotlib)")
    return ap


def non_default(cfg) -> dict:
    """The settings that differ from the defaults (so the signature of a study survives new
    settings whose default keeps the old behaviour)."""
    default = type(cfg)()
    return {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}


class Study:
    """The parsed study: configs of the model and batch, the plan, the results folder."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        values = vars(build_study_parser().parse_args(argv))
        own = {k: values.pop(k) for k in STUDY_FLAGS}
        controlled = sorted(set(values) & set(SET_BY_STUDY))
        if controlled:
            raise ConfigError("the study sets " + ", ".join(f"--{k.replace('_', '-')}" for k in controlled)
                              + " itself: use --ranks, --layouts, --warmup-iters, --iters")
        values.setdefault("threads_per_rank", 1)
        if "data_path" not in values:
            values.setdefault("synthetic_data", True)
        values.update(eval_iters=0, timing_log_level=max(1, values.get("timing_log_level", 1)))
        mcfg, tcfg, pcfg, given, _ = configs_from(values)
        if pcfg.threads_per_rank < 1:
            raise ConfigError("the study needs --threads-per-rank >= 1 so that every "
                              "configuration runs the same threads per rank")
        for name in ("warmup_iters", "iters"):
            if own[name] < (0 if name == "warmup_iters" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= "
                                  f"{0 if name == 'warmup_iters' else 1}")
        if own["fresh"] and (own["report_only"] or own["dry_run"]):
            raise ConfigError("--fresh measures again: it does not combine with --report-only "
                              "or --dry-run")
        if min(own["ranks"]) < 1:
            raise ConfigError("--ranks must be >= 1")
        self.__dict__.update(own)
        self.layouts = [parse_layout(text) for text in own["layouts"]]
        if len({lay.name for lay in self.layouts}) < len(self.layouts):
            raise ConfigError("--layouts names a layout twice")
        self.base = (mcfg, tcfg, pcfg, given)
        self.rtol = own["loss_rtol"] or (1e-9 if tcfg.dtype == "float64" else 1e-4)
        self.plan = make_plan(own["ranks"], self.layouts, mcfg, tcfg, pcfg)
        self.runnable = [c for c in self.plan if not c.skip]
        if not self.runnable:
            raise ConfigError("no configuration can run:\n" + "\n".join(
                f"  {c.ranks} ranks {c.layout.name}: {c.skip}" for c in self.plan))
        self.folder = Path(own["out"])
        self.results_path = self.folder / "results.jsonl"
        settings = {"model": non_default(mcfg), "train": non_default(tcfg),
                    "parallel": non_default(pcfg), "warmup": own["warmup_iters"],
                    "iters": own["iters"]}
        self.signature = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.title = (f"{mcfg.num_layers} layers, hidden {mcfg.hidden_size}, "
                      f"{mcfg.num_attention_heads} heads, seq {mcfg.seq_length}, vocab "
                      f"{mcfg.vocab_size}; global batch {tcfg.global_batch_size} x micro "
                      f"{tcfg.micro_batch_size}; {tcfg.dtype}, {tcfg.backend}")

    # -- results on disk -----------------------------------------------------------------
    def done(self) -> dict[str, dict]:
        """Results of this study's settings already in results.jsonl, by configuration."""
        if not self.results_path.is_file():
            return {}
        rows = [json.loads(line) for line in self.results_path.read_text().splitlines() if line]
        return {r["key"]: r for r in rows if r.get("signature") == self.signature}

    def forget(self) -> None:
        """--fresh: drop this study's earlier results, keep other studies' rows."""
        if self.results_path.is_file():
            keep = [line for line in self.results_path.read_text().splitlines()
                    if line and json.loads(line).get("signature") != self.signature]
            self.results_path.write_text("".join(line + "\n" for line in keep))

    def record(self, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.results_path, "a") as f:
            f.write(json.dumps({"signature": self.signature, **result}) + "\n")

    def say_reused(self, done: dict, say) -> None:
        reused = [c for c in self.runnable if c.key in done]
        if reused:
            say(f"reusing {len(reused)} configuration(s) measured earlier with the same settings "
                f"({self.results_path}; --fresh measures them again)")

    def todo(self, done: dict, ranks: int = 0) -> list:
        return [c for c in self.runnable if c.key not in done and (not ranks or c.ranks == ranks)]

    # -- the plan --------------------------------------------------------------------------
    def print_plan(self, gemm: float, link: float | None, done: dict) -> None:
        mcfg, tcfg, pcfg, _ = self.base
        print(f"study: {self.title}")
        print(f"measured: GEMM {gemm / 1e9:.1f} GFLOP/s per core x {pcfg.threads_per_rank} "
              f"thread(s) per rank; all-reduce "
              + (f"{link / 1e9:.2f} GB/s moved per rank" if link else "rate not measured"))
        print(f"{'ranks':>5} {'layout':<8} {'dp x tp x pp':<13} {'micro':>5} {'compute s':>10} "
              f"{'all-red. s':>10} {'tensor s':>9} {'bubble s':>9} {'all-reduce share':>17}  status")
        for c in self.plan:
            if c.skip:
                print(f"{c.ranks:>5} {c.layout.name:<8} {'':<13} {'':>5} {'':>10} {'':>10} "
                      f"{'':>9} {'':>9} {'':>17}  skipped: {c.skip}")
                continue
            p = predict(c, mcfg, tcfg, pcfg, gemm * pcfg.threads_per_rank, link)
            show = lambda v, f="{:.4g}": "-" if v is None else f.format(v)  # noqa: E731
            status = "measured (reused)" if c.key in done else "to measure"
            print(f"{c.ranks:>5} {c.layout.name:<8} {f'{c.dp} x {c.layout.tp} x {c.layout.pp}':<13} "
                  f"{c.micro_batches:>5} {show(p['compute_s']):>10} {show(p['allreduce_s']):>10} "
                  f"{show(p['tensor_s']):>9} {show(p['bubble_s']):>9} "
                  f"{show(p['allreduce_share'], '{:.1%}'):>17}  {status}")
        print("compute assumes every FLOP at the GEMM rate (a lower bound); communication is "
              "not overlapped (an upper bound): refgpt/study/plan.py")

    def grad_elements(self) -> int:
        """Gradient elements of the largest model-parallel rank in the plan (rate probe size)."""
        mcfg = self.base[0]
        full = model_params(mcfg) + mcfg.n_positions * mcfg.hidden_size
        return min(full // min(c.layout.tp * c.layout.pp for c in self.runnable), 1 << 24)

    # -- the report ------------------------------------------------------------------------
    def write_report(self) -> int:
        results = list(self.done().values())
        if not results:
            print("no results to report")
            return 1
        layouts = [lay.name for lay in self.layouts]
        rows = report.derive(results, layouts, self.rtol)
        self.folder.mkdir(parents=True, exist_ok=True)
        report.write_csv(rows, self.folder / "scaling.csv")
        images = report.plot(rows, self.folder, self.title)
        about = results[0]["machine"]
        lines = [f"machine: {about['cpu']}, {about['cores_per_node']} cores per node; "
                 f"{about['mpi']}; Python {about['python']}, NumPy {about['numpy']}",
                 *[f"command: `{cmd}`" for cmd in dict.fromkeys(r["command"] for r in results)],
                 f"measured {time.strftime('%Y-%m-%d', time.localtime(results[0]['time']))}; "
                 f"{results[0]['warmup']} warm-up + {results[0]['iters']} measured iterations "
                 f"per configuration, {results[0]['threads_per_rank']} thread(s) per rank; "
                 f"baseline: {rows[0]['ranks']} rank(s), {rows[0]['layout']}"]
        report.write_markdown(rows, self.folder / "scaling.md", self.title, lines, self.rtol, images)
        print(report.table(rows))
        bad = [r for r in rows if r["losses_match"] != "yes"]
        for r in bad:
            print(f"warning: {r['ranks']} ranks {r['layout']}: losses differ from the baseline "
                  f"by {r['max_loss_rel_diff']:.2e} relative (> {self.rtol:g}): this layout does "
                  f"not compute the same step", file=sys.stderr)
        print(f"wrote {self.folder}/scaling.csv, scaling.md, " + ", ".join(images))
        return 1 if bad else 0


def measure_all(study: Study, world, configs, say) -> None:
    """Run configs on this MPI job (world None: one process); rank 0 records each result."""
    gemm = on_rank0(world, core_gemm_rate, study.base[1].dtype)
    about = machine(world)
    for k, c in enumerate(configs):
        say(f"[{k + 1}/{len(configs)}] {c.describe()}")
        result = run_config(world, c, study.base, study.warmup_iters, study.iters, say)
        if result is not None:
            argv = study.argv[:study.argv.index("--only-ranks")] if study.only_ranks else study.argv
            command = shlex.join(["python", "-m", "refgpt.study.scaling", *argv])
            if world is not None and not study.only_ranks:
                command += f" (in an MPI job of {world.Get_size()} processes)"
            result.update(gemm_per_core=gemm, machine=about, time=time.time(), command=command)
            study.record(result)
            say(f"    {result['iter_s']:.3f} s per iteration, "
                f"{result['global_batch'] * result['seq_length'] / result['iter_s']:.0f} tokens/s")


def under_mpi(study: Study) -> int:
    """Launched by mpiexec: measure (or plan) every configuration that fits this job."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if study.report_only:
        return on_rank0(world, study.write_report)
    rank, size = world.Get_rank(), world.Get_size()
    say = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    needed = study.only_ranks or max(c.ranks for c in study.runnable)
    if needed > size:
        raise ConfigError(f"--ranks {needed} needs {needed} processes; this job has {size}")
    set_threads(world, study.base[2].threads_per_rank)
    if study.fresh:
        on_rank0(world, study.forget)
    done = on_rank0(world, study.done)
    study.say_reused(done, say)
    if study.dry_run:
        gemm = on_rank0(world, core_gemm_rate, study.base[1].dtype)
        pcfg = study.base[2]
        link = study.allreduce_bandwidth * 1e9 or group_rates(
            world, study.grad_elements(), pcfg.ddp_bucket_size, study.base[1].dtype,
            pcfg.overlap_grad_reduce, sizes=[world.size])[world.size]
        if rank == 0:
            study.print_plan(gemm, link, done)
        return 0
    try:
        measure_all(study, world, study.todo(done, study.only_ranks), say)
    except BaseException as e:                     # noqa: BLE001 - other ranks may be waiting
        import traceback
        abort_job(world, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    return 0 if study.no_report else on_rank0(world, study.write_report)


def with_launcher(study: Study) -> int:
    """One process: measure one rank in-process, start a job per larger rank count."""
    set_threads(None, study.base[2].threads_per_rank)
    if study.fresh:
        study.forget()
    if study.report_only:
        return study.write_report()
    done = study.done()
    say = lambda text: print(text, flush=True)  # noqa: E731
    study.say_reused(done, say)
    child = [a for a in study.argv if a != "--fresh"]
    launcher = shlex.split(study.launcher)
    if study.dry_run:
        biggest = max(c.ranks for c in study.runnable)
        if biggest == 1 or study.allreduce_bandwidth:
            study.print_plan(core_gemm_rate(study.base[1].dtype),
                             study.allreduce_bandwidth * 1e9 or None, done)
            return 0
        return run_job(launcher, biggest, child)
    for ranks in sorted({c.ranks for c in study.todo(done)}):
        if ranks == 1:
            measure_all(study, None, study.todo(done, 1), say)
            continue
        say(f"starting {ranks} ranks: {' '.join(launcher)} -n {ranks} ...")
        if run_job(launcher, ranks, [*child, "--only-ranks", str(ranks), "--no-report"]):
            raise ConfigError(f"the {ranks}-rank job failed (its output is above); results so far "
                              f"are in {study.results_path}; run the same command to continue")
    return study.write_report()


def run_job(launcher: list[str], ranks: int, argv: list[str]) -> int:
    cmd = [*launcher, "-n", str(ranks), sys.executable, "-m", "refgpt.study.scaling", *argv]
    try:
        return subprocess.run(cmd).returncode
    except FileNotFoundError:
        raise ConfigError(f"launcher not found: {launcher[0]!r} (set --launcher)") from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launched = launched_world_size() > 1
    rank = 0
    if launched:
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    streams = sys.stdout, sys.stderr
    try:
        if rank != 0:                                # --help and usage errors: print once
            sys.stdout = sys.stderr = open(os.devnull, "w")
        study = Study(argv)
        return under_mpi(study) if launched else with_launcher(study)
    except USER_ERRORS as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
