"""The planner on paper against Fugaku's published figures, with the shipped A64FX description
(refgpt/machines/a64fx-fugaku.toml) and refgpt.plan's memory and time model:

- seed 004's table: GPT 1.3B (24 layers, hidden 2048, 16 heads, sequence 1024), global batch
  1024, one rank per CPU, DP x TP 4 on 4 to 4096 CPUs, TFLOP/s per CPU (model FLOPs);
- DeepSpeedFugaku's 30B rows: 48 layers, hidden 6912, 72 heads, sequence 2048, micro-batch 1,
  full activation recomputation (rioyokotalab/DeepSpeedFugaku, experiments/scripts/30b/
  inner.sh), TP 4 x PP 48 x DP 1-32 on 192-6144 nodes, TFLOP/s per node counting the
  recomputed forward (Megatron's hardware-FLOPs formula). Two figures are not in the scripts
  or the notes: the vocabulary (taken as 96,867, the llm-jp tokenizer v2.1 its vocabulary
  file names) and the global batch, taken as 512, fixed over the rows: with the head's stage
  doing twice the others' work (one block a stage, the head with the last, as refgpt and
  DeepSpeedFugaku's `type:transformer` partition place it), a PP 48 pipeline's fill and
  drain then make the rate fall with DP as the published rows do; a batch growing with DP
  would not (docs/plan.md).

    python benchmarks/plan_fugaku.py --out docs/plan/fugaku.png

For each row it prints the published layout, its predicted step time split (compute,
all-reduce, tensor-parallel traffic, bubble, the messages' latency) and total beside the step
time the published rate implies, the predicted rate beside the published one, and the layout
the planner itself ranks first with its predicted rate. Nothing is measured; the 30B rows
take about six minutes on one core (the planner enumerates every layout of up to
6144 ranks).
"""

import argparse
from pathlib import Path

PUBLISHED_1_3B = {1: 0.99, 4: 0.86, 64: 0.84, 256: 0.79, 1024: 0.59, 2048: 0.49, 4096: 0.41}
PUBLISHED_30B = {192: 1.16, 768: 1.045, 1536: 0.92, 3072: 0.725, 6144: 0.505}   # per node


def rows(machine, mcfg, tcfg, pcfg, published: dict, deck, hardware_flops: float) -> list:
    """Print one table row a node count: deck(n), the published layout's name on n nodes,
    predicted against published, and the planner's first choice; return (n, predicted,
    choice's predicted) for the plot."""
    from refgpt.plan import machine_rates, plan
    rates = machine_rates(machine, tcfg, 1, 0.0)
    print("| nodes | layout | compute s | all-reduce s | tensor s | bubble s | latency s | "
          "predicted s | "
          "published s | predicted TFLOP/s a node | published | planner's first choice | its "
          "TFLOP/s a node |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | "
          "---: |")
    out = []
    for n in sorted(published):
        records = plan([], n, rates, mcfg, tcfg, pcfg, machine["memory_gib_per_node"] * 2**30,
                       1)
        runnable = [r for r in records if "refused" not in r]
        mine = next((r for r in records if r["layout"] == deck(n)), None)
        if mine is None or "refused" in mine:
            print(f"| {n} | {deck(n)} | {mine and mine.get('refused') or 'not a layout'} "
                  f"| | | | | | | | {published[n]} | | |")
            continue
        t = mine["step_time_s"]
        rate = hardware_flops / t["total"] / n / 1e12
        best = runnable[0]
        best_rate = hardware_flops / best["step_time_s"]["total"] / n / 1e12
        out.append((n, rate, best_rate))
        print(f"| {n} | {mine['layout']} | {t['compute_s']:.1f} | {t['allreduce_s']:.2f} | "
              f"{t['tensor_s']:.2f} | {t['bubble_s']:.1f} | {t['latency_s']:.2f} | "
              f"{t['total']:.1f} | "
              f"{hardware_flops / (published[n] * 1e12 * n):.1f} | {rate:.2f} | "
              f"{published[n]:.2f} | "
              f"{best['layout']} | {best_rate:.2f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="a PNG of predicted against published")
    args = ap.parse_args()
    from refgpt.config import ModelConfig, ParallelConfig, TrainConfig
    from refgpt.metrics import head_flops, model_flops
    from refgpt.plan import read_machine

    machine = read_machine("a64fx-fugaku")
    mcfg = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                       seq_length=1024, vocab_size=50257)
    tcfg = TrainConfig(global_batch_size=1024, micro_batch_size=1)
    print(f"# {machine['name']}: GPT 1.3B, sequence 1024, global batch 1024, one rank per CPU")
    small = rows(machine, mcfg, tcfg, ParallelConfig(), PUBLISHED_1_3B,
                 lambda n: f"tp{min(4, n)} pp1 dp{n // min(4, n)}",
                 model_flops(mcfg, tcfg.global_batch_size))
    big = ModelConfig(num_layers=48, hidden_size=6912, num_attention_heads=72,
                      seq_length=2048, vocab_size=96867)
    batch = TrainConfig(global_batch_size=512, micro_batch_size=1)
    flops = model_flops(big, batch.global_batch_size)
    hardware = flops + (flops - head_flops(big, batch.global_batch_size)) / 3
    print(f"\n# {machine['name']}: GPT 30B, sequence 2048, global batch 512, full "
          "recomputation, one rank per node")
    large = rows(machine, big, batch, ParallelConfig(recompute_granularity="full"),
                 PUBLISHED_30B, lambda n: f"tp4 pp48 dp{n // 192} recompute-full", hardware)
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, published, points, title, deck in (
                (axes[0], PUBLISHED_1_3B, small, "GPT 1.3B (seed 004)", "DP x TP 4"),
                (axes[1], PUBLISHED_30B, large, "GPT 30B (DeepSpeedFugaku)", "TP 4 x PP 48")):
            ax.plot(list(published), list(published.values()), "o-", label="published")
            ax.plot([r[0] for r in points], [r[1] for r in points], "s--",
                    label=f"predicted, {deck}")
            ax.plot([r[0] for r in points], [r[2] for r in points], "^:",
                    label="predicted, planner's choice")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="A64FX nodes", ylabel="TFLOP/s per node", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("refgpt.plan on paper against Fugaku's published figures", fontsize=10)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
