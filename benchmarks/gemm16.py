"""The 16-bit GEMMs a --bf16 / --fp16 step runs on a CPU, side by side in one run: each 16-bit
GEMM this machine's BLAS has (refgpt.kernels.blas16, whether or not this CPU takes it by
default), the numba backend's fallback (16-bit values widened on numba's threads, then its
fp32 GEMM: what runs where REFGPT_BLAS16=none or no 16-bit GEMM is found) and the fp32 GEMM of the float32 step, all under the numba backend, at GPT-2
124M's shapes.

    python benchmarks/gemm16.py                 # bfloat16 and float16, this machine's threads
    python benchmarks/gemm16.py --tokens 4096   # M = tokens of a micro-batch

Each 16-bit figure includes the rounding of C to 16 bits (what the layer returns); best of
--rounds, taken round robin (benchmarks/step_vs_torch.py).
"""

import argparse
import sys
from pathlib import Path

from refgpt.parallel.threads import quiet_openblas

quiet_openblas()                        # before NumPy loads OpenBLAS: refgpt.parallel.threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_vs_torch import round_robin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="M: tokens per micro-batch")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from refgpt.backend import Backend
    from refgpt.kernels import blas16, numba_gemm
    from refgpt.metrics import machine_key
    from refgpt.precision import dtype_of

    gemms = {}
    for choice in ("mkl", "openblas"):
        source, found = blas16.find(choice)
        for name, fn in found.items():
            gemms.setdefault(name, {})[source] = fn
    C, M = 768, args.tokens
    shapes = [(M, C, 3 * C), (M, C, 4 * C), (M, 4 * C, C), (M, C, C)]
    with Backend("numba"):
        print(f"# {machine_key('numba', np.float32)}; taken by default: {blas16.SOURCE}")
    print("| dtype | M x K x N | " + " | ".join(["BLAS 16-bit GEMM (source)", "fallback",
                                                 "fp32 GEMM"]) + " |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for name in ("bfloat16", "float16"):
        t = dtype_of(name)
        for M_, K, N in shapes:
            a = rng.standard_normal((M_, K)).astype(t)
            b = rng.standard_normal((K, N)).astype(t)
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            def fallback():
                numba_gemm.gemm_for = lambda dtype: None        # as if no 16-bit GEMM
                return numba_gemm.matmul(a, b)
            fns = {"fallback": fallback, "fp32": lambda: numba_gemm.matmul(a32, b32)}
            for source, fn in gemms.get(name, {}).items():
                def call(fn=fn):
                    numba_gemm.gemm_for = lambda dtype: fn
                    return numba_gemm.matmul(a, b)
                fns[source] = call
            with Backend("numba"):
                best = round_robin(fns, args.rounds)
            rate = {k: 2 * M_ * K * N / s / 1e9 for k, s in best.items()}
            native = ", ".join(f"{rate[s]:.0f} ({s})" for s in gemms.get(name, {})) or "none"
            print(f"| {name} | {M_} x {K} x {N} | {native} | {rate['fallback']:.0f} | "
                  f"{rate['fp32']:.0f} |")
    print("GFLOP/s")


if __name__ == "__main__":
    main()
