"""What Numba sees and emits on this aarch64 CPU: run by examples/a64fx/emulate.sh under
qemu-aarch64 -cpu a64fx (any aarch64 machine will do).

Prints what LLVM reads off the machine, the target Numba compiles for (NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES where set), the SVE vector length the kernel gives this process
(prctl(PR_SVE_GET_VL)), and the SVE instructions in the machine code of two of refgpt's
kernels, the numba backend's AdamW step and its bias + GELU forward, in float32 and float64.
SVE code names the scalable registers z0-z31 and predicates p0-p15; NEON code only v0-v31.
"""

from __future__ import annotations

import ctypes
import platform
import re
from collections import Counter

import llvmlite.binding as llvm
import numba
import numpy as np

PR_SVE_GET_VL = 51                       # linux/prctl.h; the length in bytes in the low 16 bits
# Vector registers by kind: SVE's scalable z0-z31 (with predicates p0-p15), NEON's 128-bit
# v0-v31, and x86's 128/256/512-bit xmm/ymm/zmm, for comparison on the host.
REGISTERS = {"SVE z": r"\bz\d+\.[bhsdq]\b", "NEON v": r"\bv\d+\.\d*[bhsd]\b",
             "xmm": r"%xmm\d+", "ymm": r"%ymm\d+", "zmm": r"%zmm\d+"}


def sve_vector_bits() -> int:
    """The SVE vector length of this process in bits (0: no SVE)."""
    vl = ctypes.CDLL(None, use_errno=True).prctl(PR_SVE_GET_VL, 0, 0, 0, 0)
    return 8 * (vl & 0xFFFF) if vl > 0 else 0


def vector_instructions(asm: str) -> Counter:
    """{register kind: instructions with an operand of that kind}."""
    lines = [ln for ln in asm.splitlines() if ln.startswith("\t") and not ln.startswith("\t.")]
    return Counter({kind: n for kind, pattern in REGISTERS.items()
                    if (n := sum(bool(re.search(pattern, ln)) for ln in lines))})


def machine_code(kernel) -> dict:
    """{signature: assembly} of a kernel's compiled signatures, compiled afresh: Numba shows
    none for code it loaded from its cache. The parallel loop's body is in it (Numba links
    it into the kernel's library)."""
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**options)(kernel.py_func)
    for sig in kernel.signatures:
        fresh.compile(sig)
    return {sig: fresh.inspect_asm(sig) for sig in kernel.signatures}


def main() -> None:
    from refgpt.kernels import numba_attention, numba_cpu
    print(f"machine: {platform.machine()}, SVE vector length {sve_vector_bits()} bits")
    on = sorted(k for k, v in llvm.get_host_cpu_features().items() if v)
    print(f"LLVM {'.'.join(map(str, llvm.llvm_version_info))} reads this CPU as "
          f"{llvm.get_host_cpu_name()!r}, features: {', '.join(on) or 'none'}")
    name, features = numba_attention.numba_target()
    print(f"Numba compiles for {name!r}, features: "
          f"{', '.join(f for f, v in sorted(features.items()) if v) or 'none'}; "
          f"attention preset {numba_attention.PRESET!r}")
    for dtype in (np.float32, np.float64):
        x, g, m, v = (np.full(4096, 0.5, dtype) for _ in range(4))
        numba_cpu.adamw_update(x, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.05)
        numba_cpu.bias_gelu_forward(np.ones((64, 64), dtype), np.zeros(64, dtype), "tanh")
    for kernel in (numba_cpu._adamw, numba_cpu._bias_gelu_fwd):
        for sig, asm in machine_code(kernel).items():
            found = vector_instructions(asm)
            print(f"{kernel.__name__}, {sig[0]}: instructions on vector registers: "
                  f"{', '.join(f'{k} {c}' for k, c in found.items()) or 'none'}")
            sve = [ln.strip() for ln in asm.splitlines()
                   if re.search(REGISTERS["SVE z"], ln) and re.match(r"\t(ld1|st1|f)", ln)]
            for line in sve[:3]:
                print(f"    {line}")

if __name__ == "__main__":
    main()
