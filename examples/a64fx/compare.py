"""Compare two training logs (--log-jsonl) iteration by iteration: the training loss, the
gradient norm and the validation loss, as the largest difference relative to the host's value.

    python examples/a64fx/compare.py host.jsonl emulated.jsonl [--tolerance 1e-12]

Exits with 1 when a difference passes the tolerance or the logs' iterations differ.
"""

from __future__ import annotations

import argparse
import json
import sys

KEYS = ("loss", "grad_norm", "val_loss")


def read(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {row["iter"]: row for row in map(json.loads, f)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("other")
    parser.add_argument("--tolerance", type=float, default=1e-12)
    args = parser.parse_args(argv)
    a, b = read(args.host), read(args.other)
    if sorted(a) != sorted(b):
        print(f"the logs hold different iterations: {sorted(a)} and {sorted(b)}")
        return 1
    worst = {}
    for it in sorted(a):
        print(f"iter {it:3d}  loss {a[it]['loss']:.15f}  {b[it]['loss']:.15f}"
              + (f"  val {a[it]['val_loss']:.15f}  {b[it]['val_loss']:.15f}"
                 if "val_loss" in a[it] else ""))
        for key in KEYS:
            if key in a[it] or key in b[it]:
                diff = (abs(a[it][key] - b[it][key]) / abs(a[it][key])
                        if key in a[it] and key in b[it] else float("inf"))
                worst[key] = max(worst.get(key, 0.0), diff)
    print("largest relative difference: "
          + ", ".join(f"{key} {diff:.1e}" for key, diff in worst.items()))
    ok = all(diff <= args.tolerance for diff in worst.values())
    print(f"{'equal' if ok else 'NOT equal'} to {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
