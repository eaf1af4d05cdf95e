"""The study's report: one CSV row per configuration, a markdown table and three plots.

Derived columns, against the *baseline*: the measured configuration with the fewest ranks
(the first layout given, on a tie):

    speed-up     S = t_base / t                 efficiency   E = S R_base / R
    tokens/s     = G s / t                      TFLOP/s per rank = F / t / R, with F by
                                                Megatron's formula and by model FLOPs
    % of GEMM peak = model FLOP/s per rank / (one core's GEMM rate x threads per rank), the
                   core's rate being the best that any of the study's jobs measured
    other        = t - (forward + backward + exposed all-reduce + optimizer + bubble):
                   batch generation and waiting for the slowest rank

Loss check: every layout computes the same step (refgpt's promise), so each configuration's
per-iteration losses must equal the baseline's to rounding; a larger relative difference than
the tolerance is flagged (column losses_match = NO, a warning, exit status 1).
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("ranks", "layout", "dp", "tp", "pp", "micro_batch", "accumulation", "global_batch",
           "seq_length", "threads_per_rank", "iter_s", "forward_s", "backward_s", "allreduce_s",
           "optimizer_s", "bubble_s", "other_s", "tokens_per_s", "tflops_per_rank_megatron",
           "tflops_per_rank_model", "tflops_total_model", "pct_gemm_peak",
           "gemm_gflops_per_core", "gemm_loaded_gflops_per_core", "speedup", "efficiency",
           "dp_comm_mib", "peak_rss_mib", "max_loss_rel_diff", "losses_match")
PHASES = (("forward_s", "forward"), ("backward_s", "backward"),
          ("allreduce_s", "grads-all-reduce"), ("optimizer_s", "optimizer"),
          ("bubble_s", "pipeline-bubble"))
COLOURS = {"forward_s": "#4c72b0", "backward_s": "#55a868", "allreduce_s": "#c44e52",
           "optimizer_s": "#8172b2", "bubble_s": "#ccb974", "other_s": "#999999"}


def baseline(results: list[dict], layouts: list[str]) -> dict:
    return min(results, key=lambda r: (r["ranks"], layouts.index(r["layout"])
                                       if r["layout"] in layouts else len(layouts)))


def loss_rel_diff(losses: list[float], reference: list[float]) -> float:
    n = min(len(losses), len(reference))
    return max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses[:n], reference[:n]))


def derive(results: list[dict], layouts: list[str], rtol: float) -> list[dict]:
    """CSV rows (COLUMNS) from the measured results, in rank then layout order."""
    base = baseline(results, layouts)
    core = max(r["gemm_per_core"] for r in results)
    rows = []
    order = {name: i for i, name in enumerate(layouts)}
    for r in sorted(results, key=lambda r: (r["ranks"], order.get(r["layout"], len(order)))):
        t, R = r["iter_s"], r["ranks"]
        row = {k: r[k] for k in COLUMNS if k in r}
        for column, timer in PHASES:
            row[column] = r["phases_s"][timer]
        row["other_s"] = t - sum(row[c] for c, _ in PHASES)
        peak = core * r["threads_per_rank"]
        diff = loss_rel_diff(r["losses"], base["losses"])
        row.update(
            tokens_per_s=r["global_batch"] * r["seq_length"] / t,
            tflops_per_rank_megatron=r["megatron_flops"] / t / R / 1e12,
            tflops_per_rank_model=r["model_flops"] / t / R / 1e12,
            tflops_total_model=r["model_flops"] / t / 1e12,
            pct_gemm_peak=100 * r["model_flops"] / t / R / peak,
            gemm_gflops_per_core=core / 1e9,
            gemm_loaded_gflops_per_core=r["gemm_loaded_per_core"] / 1e9,
            speedup=base["iter_s"] / t,
            efficiency=base["iter_s"] / t * base["ranks"] / R,
            dp_comm_mib=r["dp_comm_bytes"] / 2**20,
            peak_rss_mib=r["peak_rss"] / 2**20,
            max_loss_rel_diff=diff,
            losses_match="yes" if diff <= rtol else "NO")
        rows.append(row)
    return rows


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: fmt(row[k]) for k in COLUMNS})


TABLE = (("ranks", "{ranks}"), ("layout", "{layout}"), ("dp x tp x pp", "{dp} x {tp} x {pp}"),
         ("micro-batches per rank", "{accumulation}"), ("s / iteration", "{iter_s:.4g}"),
         ("forward", "{forward_s:.4g}"), ("backward", "{backward_s:.4g}"),
         ("exposed all-reduce", "{allreduce_s:.4g}"), ("optimizer", "{optimizer_s:.4g}"),
         ("bubble", "{bubble_s:.4g}"), ("other", "{other_s:.4g}"),
         ("tokens/s", "{tokens_per_s:.0f}"),
         ("TFLOP/s per rank, Megatron / model", "{tflops_per_rank_megatron:.4f} / "
                                                "{tflops_per_rank_model:.4f}"),
         ("% of core GEMM peak", "{pct_gemm_peak:.1f}"), ("speed-up", "{speedup:.2f}"),
         ("efficiency", "{efficiency:.0%}"), ("losses equal", "{losses_match}"))


def table(rows: list[dict]) -> str:
    """The markdown table of the main columns (times in seconds per iteration)."""
    left = ("layout", "dp x tp x pp")
    lines = ["| " + " | ".join(head for head, _ in TABLE) + " |",
             "|" + "|".join(" --- " if head in left else " ---: " for head, _ in TABLE) + "|"]
    lines += ["| " + " | ".join(form.format(**row) for _, form in TABLE) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path, title: str) -> list[str]:
    """speedup.png, efficiency.png and breakdown.png in folder; returns their names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    base = rows[0]
    title = title.replace("; ", "\n", 1)
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    ranks = sorted({r["ranks"] for r in rows})

    def per_layout(ax, column, scale=1.0):
        for lay in layouts:
            mine = [r for r in rows if r["layout"] == lay]
            ax.plot([r["ranks"] for r in mine], [scale * r[column] for r in mine], "o-", label=lay)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("ranks")
        ax.set_title(title, fontsize=9)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ranks, [r / base["ranks"] for r in ranks], "k--", label="ideal")
    per_layout(ax, "speedup")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel(f"speed-up over {base['ranks']} rank(s), {base['layout']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axhline(100, color="k", ls="--", lw=1)
    per_layout(ax, "efficiency", 100)
    ax.set_ylim(0, max(110, 105 * max(r["efficiency"] for r in rows)))
    ax.set_ylabel("parallel efficiency (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "efficiency.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(rows) + 2), 4))
    cost = base["iter_s"] * base["ranks"]
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for column, colour in COLOURS.items():
        heights = [max(r[column], 0.0) * r["ranks"] / cost for r in rows]
        ax.bar(x, heights, bottom=bottom, color=colour, label=column[:-2].replace("allreduce",
               "exposed all-reduce"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(1, color="k", ls="--", lw=1)
    ax.set_xticks(list(x), [f"{r['ranks']}\n{r['layout']}" for r in rows], fontsize=8)
    ax.set_ylabel("time x ranks, relative to the baseline\n(1 = perfect scaling)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(folder / "breakdown.png", dpi=120)
    plt.close(fig)
    return ["speedup.png", "efficiency.png", "breakdown.png"]


def write_markdown(rows: list[dict], path: Path, title: str, about: list[str], rtol: float,
                   images: list[str]) -> None:
    bad = [r for r in rows if r["losses_match"] != "yes"]
    worst = max(r["max_loss_rel_diff"] for r in rows)
    check = (f"Losses: every configuration's per-iteration losses equal the baseline's to "
             f"{worst:.1e} relative (tolerance {rtol:g})." if not bad else
             f"**Losses differ** from the baseline beyond {rtol:g} in: "
             + ", ".join(f"{r['ranks']} ranks {r['layout']} ({r['max_loss_rel_diff']:.1e})" for r in bad))
    text = [f"# Strong scaling: {title}", "", *[f"- {line}" for line in about], "",
            table(rows), "", check, "", "Times are seconds per iteration: the slowest rank's "
            "iteration, and each phase averaged over ranks; the CSV beside this file has every "
            "column.", "", *[f"![{name[:-4]}]({name})" for name in images], ""]
    path.write_text("\n".join(text))
