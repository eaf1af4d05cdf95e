"""A --bf16 training step on this CPU against the float32 step, and against PyTorch in the
same run: refgpt's numba backend in float32, in bfloat16 with this machine's 16-bit GEMM
(refgpt.kernels.blas16) and with the fallback (16-bit values widened, fp32 GEMM), PyTorch
eager float32 and PyTorch bf16 autocast (what a PyTorch user runs on a CPU with AVX512-BF16
or AMX), all with the same model, batch and threads, timed round robin
(benchmarks/step_vs_torch.py).

    python benchmarks/mixed_step.py                          # GPT-2 124M, batch 4 x 256
    python benchmarks/mixed_step.py --config 5m --steps 5
    python benchmarks/mixed_step.py --batch 16               # batch 16 x 256
    python benchmarks/mixed_step.py --memory                 # also: a training run of each
                                                             # precision, registry and peak RSS

refgpt's 16-bit step is the one ``--bf16`` trains with: bf16 weights and activations, an fp32
gradient buffer and fp32 master weights in the optimizer (refgpt.optim.mixed). --memory runs
``python -m refgpt.train`` for two iterations in float32, --bf16 and --bf16
--grad-reduce-in-bf16 (synthetic data, same model and batch), each in its own process, and prints the memory registry of its log
(parameters, gradients, optimizer state) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import CONFIGS, refgpt_step, round_robin, torch_step  # noqa: E402


def refgpt_step16(cfg_tuple, gemm16):
    """refgpt's numba step as --bf16 trains, its bf16 GEMMs run by gemm16: a function of
    refgpt.kernels.blas16, or "fallback" (as if the BLAS had none)."""
    from refgpt.kernels import numba_gemm
    from refgpt.precision import dtype_of
    step, _, _ = refgpt_step(cfg_tuple, backend="numba", dtype="bfloat16")
    chosen = ((lambda _: None) if gemm16 == "fallback" else
              (lambda dtype: gemm16 if dtype == dtype_of("bfloat16") else None))

    def with_gemm():
        native, numba_gemm.gemm_for = numba_gemm.gemm_for, chosen
        try:
            step()
        finally:
            numba_gemm.gemm_for = native
    return with_gemm


def memory_runs(cfg_tuple) -> None:
    """Two iterations of python -m refgpt.train per precision: the log's registry, peak RSS."""
    L, h, a, V, s, b = cfg_tuple
    print("| run | parameters MiB | gradients MiB | optimizer MiB | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    for flags in ([], ["--bf16"], ["--bf16", "--grad-reduce-in-bf16"]):
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "log.jsonl"
            subprocess.run([sys.executable, "-m", "refgpt.train", *flags, "--synthetic-data",
                            "--num-layers", str(L), "--hidden-size", str(h),
                            "--num-attention-heads", str(a), "--vocab-size", str(V),
                            "--seq-length", str(s), "--micro-batch-size", str(b),
                            "--global-batch-size", str(b), "--train-iters", "2",
                            "--eval-iters", "0", "--backend", "numba", "--no-progress",
                            "--log-jsonl", str(log)], check=True, stdout=subprocess.DEVNULL)
            mem = json.loads(log.read_text().splitlines()[-1])["memory_bytes"]
        mib = {k: v / 2**20 for k, v in mem.items()}
        print(f"| {' '.join(flags) or 'float32'} | {mib['params']:.0f} | {mib['grads']:.0f} | "
              f"{mib['optimizer']:.0f} | {mib['peak_rss']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="124m")
    ap.add_argument("--batch", type=int, help="micro-batch size (default: the config's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (best is reported)")
    ap.add_argument("--memory", action="store_true", help="also measure each precision's memory")
    args = ap.parse_args()
    import torch  # noqa: F401   before numba's OpenMP pool (benchmarks/step_vs_torch.py)
    import numba

    from refgpt.kernels import blas16, select_thread_pool
    from refgpt.metrics import machine_key
    select_thread_pool()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    cfg_tuple = CONFIGS[args.config][:5] + (args.batch or CONFIGS[args.config][5],)
    steps = {"refgpt float32": refgpt_step(cfg_tuple, backend="numba")[0]}
    for choice in ("mkl", "openblas"):                   # each this machine has, default or not
        source, found = blas16.find(choice)
        if "bfloat16" in found:
            steps[f"refgpt --bf16 ({source.split()[0]} 16-bit GEMM)"] = \
                refgpt_step16(cfg_tuple, found["bfloat16"])
    steps.update({"refgpt --bf16 (fallback GEMM)": refgpt_step16(cfg_tuple, "fallback"),
                  "PyTorch eager float32": torch_step(cfg_tuple, args.threads, False),
                  "PyTorch bf16 autocast": torch_step(cfg_tuple, args.threads, True)})
    best = round_robin(steps, args.steps)
    L, h, a, V, s, b = cfg_tuple
    print(f"# {machine_key('numba', np.float32)}, {args.threads} threads; --bf16 takes "
          f"{blas16.SOURCE} by default; "
          f"{args.config}: batch {b} x {s}; torch {torch.__version__}")
    base = best["refgpt float32"]
    print("| step | ms | tokens/s | speed vs refgpt float32 |")
    print("| --- | --- | --- | --- |")
    for name, t in best.items():
        print(f"| {name} | {1e3 * t:.0f} | {b * s / t:.0f} | {base / t:.2f}x |")
    if args.memory:
        memory_runs(cfg_tuple)


if __name__ == "__main__":
    main()
