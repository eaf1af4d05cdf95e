"""The planner against measured runs: on one node, run GPT-2 124M and a ~350M GPT in many
layouts (DP, TP, PP, ZeRO, recomputation, precision), and set each run's step time and peak
resident memory beside what refgpt.plan predicts for the same layout from the node's
calibrated description.

    # on the node (mpirun or mpiexec; the launcher gets "-n R" appended):
    python benchmarks/plan_validate.py measure --ranks 16 --out runs/plan-validate \
        --launcher "mpirun --allow-run-as-root --bind-to core" [--only NAME ...]
    # anywhere, from what measure wrote:
    python benchmarks/plan_validate.py report --out runs/plan-validate [--plot docs/plan/x.png]

measure first calibrates the node with each model (python -m refgpt.plan --calibrate and the
model's flags, all R ranks: the GEMM rate in each type, the step efficiency and optimizer rate
of that model, the all-reduce rate of each group size, into machine-MODEL.toml), then runs
each configuration
for a few steps (synthetic data) with its log in NAME.jsonl; a configuration already measured
is skipped, so several calls can share the work. report reads them: measured step time, the
median of the steps after the first; measured memory, rank 0's peak resident set (rank 0
holds the first pipeline stage, the one the planner reports); predicted, refgpt.plan.plan's
record for the layout with the machine's rates. It prints a table with the errors and their
medians, and draws predicted against measured.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

GPT2_124M = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12"]
GPT_350M = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16"]
COMMON = ["--seq-length", "128", "--vocab-size", "50257", "--micro-batch-size", "1",
          "--global-batch-size", "32", "--synthetic-data", "--eval-iters", "0", "--no-progress",
          "--log-interval", "1"]
LAYOUTS = {         # a configuration's name after its model's: layout and precision flags
    "dp": [],
    "dp-zero1": ["--zero-stage", "1"],
    "dp-zero2": ["--zero-stage", "2"],
    "dp-zero3": ["--zero-stage", "3"],
    "dp-full": ["--recompute-granularity", "full"],
    "dp-selective": ["--recompute-granularity", "selective"],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp4": ["--tensor-model-parallel-size", "4"],
    "tp2-zero1": ["--tensor-model-parallel-size", "2", "--zero-stage", "1"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp4": ["--pipeline-model-parallel-size", "4"],
    "tp2-pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "pp2-full": ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full"],
    "dp-bf16": ["--bf16"],
    "tp2-bf16": ["--bf16", "--tensor-model-parallel-size", "2"],
    "dp-zero1-bf16": ["--bf16", "--zero-stage", "1"],
}
LARGER = ("dp", "dp-zero1", "dp-zero3", "tp2", "tp4", "pp2", "pp4", "tp2-pp2", "dp-full",
          "dp-bf16")                                  # the layouts the 350M model runs in
MODELS = {"124m": GPT2_124M, "350m": GPT_350M}
CONFIGS = {**{f"124m-{k}": (GPT2_124M, v) for k, v in LAYOUTS.items()},
           **{f"350m-{k}": (GPT_350M, LAYOUTS[k]) for k in LARGER}}


def measure(args) -> None:
    out = Path(args.out[0])
    out.mkdir(parents=True, exist_ok=True)
    launch = [*shlex.split(args.launcher), "-n", str(args.ranks)]
    names = args.only or list(CONFIGS)
    for model in sorted({key(name)[0] for name in names}):
        machine = out / f"machine-{model}.toml"
        if not machine.exists():
            print(f"calibrating with {model}: {' '.join(launch)} python -m refgpt.plan "
                  f"--calibrate", flush=True)
            start = time.perf_counter()
            subprocess.run([*launch, sys.executable, "-m", "refgpt.plan", "--calibrate",
                            str(machine), *MODELS[model], *COMMON], check=True)
            print(f"calibrated in {time.perf_counter() - start:.0f} s", flush=True)
    for name in names:
        log = out / f"{name}.jsonl"
        if log.exists():
            print(f"{name}: measured already ({log})")
            continue
        model, layout = CONFIGS[name]
        cmd = [*launch, sys.executable, "-m", "refgpt.train", *model, *COMMON, *layout,
               "--train-iters", str(args.iters), "--log-jsonl", str(log) + ".part"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - start
        if done.returncode:
            print(f"{name}: FAILED in {took:.0f} s\n{done.stderr[-2000:]}", flush=True)
            continue
        Path(str(log) + ".part").rename(log)
        print(f"{name}: {took:.0f} s", flush=True)


def steps(log: Path) -> list[dict]:
    """A configuration's logged steps."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def measured(rows: list[dict]) -> tuple[float, int]:
    """(median step time after the first step, rank 0's peak resident bytes)."""
    return (statistics.median(r["step_time_s"] for r in rows[1:]),
            max(r["memory_bytes"]["peak_rss"] for r in rows))


def fastest_rank(rows: list[dict], timer: str) -> float:
    """The median over the steps after the first of a timer's fastest rank, in seconds: for a
    collective, the rank that arrived last and so waited least, whose time is the sum's own."""
    return statistics.median(r["timers_ms"][timer][0] for r in rows[1:]) / 1e3


def predicted(name: str, ranks: int, machine: dict) -> dict:
    """refgpt.plan's record for this configuration's layout, on this machine."""
    from refgpt.config import ConfigError
    from refgpt.plan import layout_flags, machine_rates, plan
    from refgpt.train import parse_config
    model, layout = CONFIGS[name]
    argv = [*model, *COMMON, *[a for a in layout if a == "--bf16"]]
    mcfg, tcfg, pcfg, _, _ = parse_config(argv)
    want = layout_flags(parse_config([*argv, *layout])[2])
    process = int(machine.get("process_mib", 0) * 2**20)
    records = plan(argv, ranks, machine_rates(machine, tcfg, ranks, 0.0), mcfg, tcfg, pcfg,
                   process_bytes=process)
    found = next((r for r in records if r["command"][len(argv):] == want), None)
    if found is None:
        raise ConfigError(f"not a layout the planner lists on {ranks} ranks")
    return found


def fitted(machines: dict, names: list[str], out: Path, ranks: int) -> tuple[dict, float]:
    """({(model, type): step efficiency}, process MiB), taken from these measured
    configurations instead of the machine's calibration (which measures one model): the
    efficiency that makes the prediction of each equal its measured time, and the memory the
    first one's rank 0 held beyond the registry."""
    from refgpt.plan import step_efficiency
    efficiency, process = {}, None
    for name in names:
        t, rss = measured(steps(out / f"{name}.jsonl"))
        plain = {**machines[key(name)[0]], "process_mib": 0}
        efficiency[key(name)] = step_efficiency(
            lambda e: predicted(name, ranks, {**plain, "step_efficiency": {key(name)[1]: e}})[
                "step_time_s"]["total"], t)
        r = predicted(name, ranks, plain)
        if process is None:
            process = (rss - r["memory_bytes"]["total"]) / 2**20
    return efficiency, process


def key(name: str) -> tuple[str, str]:
    """(model, type) of a configuration."""
    return name.split("-")[0], "bfloat16" if "--bf16" in CONFIGS[name][1] else "float32"


def with_fit(machine: dict, fit: tuple[dict, float], name: str) -> dict:
    """The machine with the fitted efficiency for this configuration's model and type (or,
    for a model not fitted, its type's first) and the fitted process memory."""
    efficiency, process = fit
    model, dtype = key(name)
    chosen = efficiency.get((model, dtype)) or next(e for (_, t), e in efficiency.items()
                                                    if t == dtype)
    return {**machine, "process_mib": process, "step_efficiency": {dtype: chosen}}


def instance_rows(out: Path, args, rows: list, terms: list, skipped: list) -> str:
    """Predict every configuration measured in one node instance's folder from that folder's
    own calibration (instances of a node differ by up to 20%, so a calibration stands only for
    the runs made beside it); append the rows and return what they were predicted from."""
    from refgpt.config import ConfigError
    from refgpt.plan import read_machine
    files = {model: out / f"machine-{model}.toml" for model in MODELS}
    files = {model: f if f.exists() else out / "machine.toml" for model, f in files.items()}
    files = {model: f for model, f in files.items() if f.exists()}
    machines = {model: read_machine(str(f)) for model, f in files.items()}
    source = ", ".join(sorted({str(f) for f in files.values()}))
    fit_on = [n for n in args.fit_on or () if (out / f"{n}.jsonl").exists()]
    fit = fitted(machines, fit_on, out, args.ranks) if fit_on else None
    if fit:
        source += ("; step efficiency and process memory fitted on " + ", ".join(
            f"{name} ({fit[0][key(name)]:.3f})" for name in fit_on) + f", {fit[1]:.0f} MiB")
    for name in CONFIGS:
        log = out / f"{name}.jsonl"
        if not log.exists() or name in fit_on or key(name)[0] not in machines:
            continue
        logged = steps(log)
        t, rss = measured(logged)
        own = machines[key(name)[0]]
        try:
            record = predicted(name, args.ranks, with_fit(own, fit, name) if fit else own)
        except ConfigError as e:       # a type the calibration could not measure, or a layout
                                       # the planner does not list (ZeRO without DP)
            skipped.append(f"{name}: {e}")
            continue
        pt, pm = record["step_time_s"]["total"], record["memory_bytes"]["total"]
        rows.append((name, t, pt, rss, pm, record["layout"]))
        split = record["step_time_s"]
        terms.append(f"| {name} | {split['allreduce_s']:.2f} | "
                     f"{fastest_rank(logged, 'grads-all-reduce'):.2f} | "
                     + ("" if split["optimizer_s"] is None else f"{split['optimizer_s']:.2f}")
                     + f" | {fastest_rank(logged, 'optimizer'):.2f} |")
    return f"{machines[next(iter(machines))]['name']}: {source}" if machines else ""


def report(args) -> None:
    rows, terms, skipped, sources = [], [], [], []
    for out in map(Path, args.out):
        sources.append(instance_rows(out, args, rows, terms, skipped))
    print(f"# {args.ranks} ranks; predicted by refgpt.plan from "
          + "; ".join(filter(None, sources)))
    print("| configuration | layout | measured s/step | predicted s/step | error | "
          "measured peak RSS MiB | predicted MiB | error |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t, pt, rss, pm, layout in rows:
        print(f"| {name} | {layout} | {t:.3f} | {pt:.3f} | {pt / t - 1:+.0%} | "
              f"{rss / 2**20:,.0f} | {pm / 2**20:,.0f} | {pm / rss - 1:+.0%} |")
    for line in skipped:
        print(f"not predicted: {line}")
    if not rows:
        print("nothing measured yet")
        return
    time_err = statistics.median(abs(pt / t - 1) for _, t, pt, _, _, _ in rows)
    mem_err = statistics.median(abs(pm / m - 1) for _, _, _, m, pm, _ in rows)
    print(f"\n{len(rows)} configurations: median absolute error, time {time_err:.0%}, "
          f"memory {mem_err:.0%}")
    print("\nTwo terms apart, seconds a step: predicted, and the run's timer on its fastest "
          "rank\n\n| configuration | all-reduce | grads-all-reduce timer | optimizer | "
          "optimizer timer |\n| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(terms))
    if args.plot:
        plot(rows, args.plot, f"{args.ranks} ranks of one node")


def plot(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (i, j, unit, scale) in zip(axes, ((1, 2, "step time (s)", 1),
                                              (3, 4, "rank 0 memory (GiB)", 2**-30))):
        xs = [r[i] * scale for r in rows]
        ys = [r[j] * scale for r in rows]
        ax.scatter(xs, ys, c=["C0" if r[0].startswith("124m") else "C1" for r in rows])
        top = max(xs + ys) * 1.1
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set(xlabel=f"measured {unit}", ylabel=f"predicted {unit}", xlim=(0, top),
               ylim=(0, top))
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r[0], (x, y), fontsize=6)
    fig.suptitle(f"refgpt.plan against measured runs: {title} (blue 124M, orange 350M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("measure", "report"))
    ap.add_argument("--out", nargs="+", default=["runs/plan-validate"],
                    help="measure: the folder; report: one or more, each one node instance's "
                         "runs with its own calibration")
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--launcher", default="mpiexec")
    ap.add_argument("--iters", type=int, default=3, help="steps a configuration runs")
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--plot", help="a PNG of predicted against measured (report)")
    ap.add_argument("--fit-on", nargs="+", choices=sorted(CONFIGS),
                    help="report: take the step efficiency (one configuration per type) and "
                         "the process memory from these measured configurations, and leave "
                         "them out of the errors")
    args = ap.parse_args()
    if args.what == "measure" and len(args.out) > 1:
        ap.error("measure writes one folder")
    measure(args) if args.what == "measure" else report(args)


if __name__ == "__main__":
    main()
