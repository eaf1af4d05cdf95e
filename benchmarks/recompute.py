"""What activation recomputation costs and saves: one training step of GPT-2 124M (numba
backend) with no recomputation, selective (the attention core) and full, timed round robin
(benchmarks/step_vs_torch.py), beside the bytes the layers hold for backward at the end of the
forward (the activations a micro-batch keeps: refgpt.nn.activations.held_bytes).

    python benchmarks/recompute.py                  # 124M, batch 4 x 256, this machine's cores
    python benchmarks/recompute.py --config 5m --steps 5

Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models") measured
+39% (full) and +7% (selective) per layer of a 22B model on GPUs; refgpt's figures are on
CPUs, where the attention core is a smaller part of the step.
"""

import argparse
import sys
from pathlib import Path

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import CONFIGS, refgpt_step, round_robin  # noqa: E402

MODES = {"none": dict(), "selective": dict(recompute_attention=True),
         "full": dict(recompute=10 ** 6)}


def step_of(cfg_tuple, mode: str):
    """(one training step, the bytes held for backward after a forward) in a mode of MODES."""
    from refgpt.backend import Backend
    from refgpt.nn.activations import held_bytes
    step, _, model = refgpt_step(cfg_tuple, backend="numba", **MODES[mode])
    L, h, a, V, s, b = cfg_tuple
    x = np.random.default_rng(0).integers(0, V, (b, s))
    with Backend("numba"):
        model.forward(x, x, float(b * s))
        held = held_bytes(model.layers)            # each byte once, however many views of it
        model.backward()
    return step, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="124m")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (best is reported)")
    args = ap.parse_args()
    from refgpt.metrics import machine_key
    cfg_tuple = CONFIGS[args.config]
    steps, held = {}, {}
    for mode in MODES:
        steps[mode], held[mode] = step_of(cfg_tuple, mode)
    best = round_robin(steps, args.steps)
    L, h, a, V, s, b = cfg_tuple
    print(f"# {machine_key('numba', np.float32)}; {args.config}: batch {b} x {s}, float32")
    print("| recomputation | ms per step | vs none | held for backward MiB |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        print(f"| {mode} | {1e3 * best[mode]:.0f} | {100 * (best[mode] / best['none'] - 1):+.1f}% "
              f"| {held[mode] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
