"""The planner on paper against Fugaku's published table (seed 004): GPT 1.3B (24 layers,
hidden 2048, 16 heads, sequence 1024), global batch 1024, one rank per CPU, DP x TP 4 on 4 to
4096 CPUs, predicted with the shipped A64FX description (refgpt/machines/a64fx-fugaku.toml)
by refgpt.plan's memory and time model, beside the TFLOP/s per CPU the deck reports:

    python benchmarks/plan_fugaku.py --out docs/plan/fugaku.png

For each CPU count it prints the layout DP x TP 4 (the deck's), its predicted step time split
(compute, all-reduce, tensor-parallel traffic), TFLOP/s per CPU (the model's FLOPs of the
step over its time and the CPUs), the published figure, and the layout the planner itself
ranks first with its predicted TFLOP/s per CPU. Runs in a second or two: nothing is measured.
"""

import argparse
from pathlib import Path

PUBLISHED = {1: 0.99, 4: 0.86, 64: 0.84, 256: 0.79, 1024: 0.59, 2048: 0.49, 4096: 0.41}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="a PNG of predicted against published")
    args = ap.parse_args()
    from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
    from refgpt.metrics import model_flops
    from refgpt.plan import machine_rates, plan, read_machine

    mcfg = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                       seq_length=1024, vocab_size=50257)
    tcfg = TrainConfig(global_batch_size=1024, micro_batch_size=1)
    machine = read_machine("a64fx-fugaku")
    flops = model_flops(mcfg, tcfg.global_batch_size)
    print(f"# {machine['name']}: GPT 1.3B, sequence 1024, global batch 1024, one rank per CPU")
    print("| CPUs | layout | compute s | all-reduce s | tensor s | predicted TFLOP/s per CPU | "
          "published | planner's first choice | its TFLOP/s per CPU |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    rows = []
    rates = machine_rates(machine, tcfg, 1, 0.0)
    for cpus in sorted(PUBLISHED):
        records = plan([], cpus, rates, mcfg, tcfg, ParallelConfig(),
                       machine["memory_gib_per_node"] * 2**30, 1)
        runnable = [r for r in records if "refused" not in r]
        tp = min(4, cpus)
        deck = next((r for r in runnable if r["layout"] == f"tp{tp} pp1 dp{cpus // tp}"),
                    None)
        if deck is None:
            print(f"| {cpus} | tp{tp} dp{cpus // tp} | (does not fit or refused) | | | | "
                  f"{PUBLISHED[cpus]} | | |")
            continue
        t = deck["step_time_s"]
        rate = flops / t["total"] / cpus / 1e12
        best = runnable[0]
        best_rate = flops / best["step_time_s"]["total"] / cpus / 1e12
        rows.append((cpus, rate, best_rate))
        print(f"| {cpus} | {deck['layout']} | {t['compute_s']:.1f} | {t['allreduce_s']:.2f} | "
              f"{t['tensor_s']:.2f} | {rate:.2f} | {PUBLISHED[cpus]:.2f} | {best['layout']} | "
              f"{best_rate:.2f} |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(list(PUBLISHED), list(PUBLISHED.values()), "o-", label="published (seed 004)")
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "s--", label="predicted, DP x TP 4")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], "^:",
                label="predicted, planner's choice")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("A64FX CPUs")
        ax.set_ylabel("TFLOP/s per CPU")
        ax.set_title("GPT 1.3B on Fugaku: refgpt.plan on paper", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
