"""Test-only fault injection, to prove that a failure on one rank ends the whole job.

With REFGPT_FAULT="rank=R,phase=P" in the environment, rank R raises InjectedFault when it
reaches phase P, one of: init (end of set-up), forward, backward, allreduce (gradient
reduction), optimizer, checkpoint (saving). Without the variable nothing happens.
"""

from __future__ import annotations

import os

PHASES = ("init", "forward", "backward", "allreduce", "optimizer", "checkpoint")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> tuple[int, str]:
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        rank, phase = int(fields["rank"]), fields["phase"]
    except (ValueError, KeyError):
        raise ValueError(f'REFGPT_FAULT must look like "rank=1,phase=backward", got {spec!r}') from None
    if phase not in PHASES:
        raise ValueError(f"REFGPT_FAULT phase must be one of {PHASES}, got {phase!r}")
    return rank, phase


def inject(phase: str, rank: int) -> None:
    spec = os.environ.get("REFGPT_FAULT")
    if spec and parse(spec) == (rank, phase):
        raise InjectedFault(f"injected fault at phase {phase!r} (REFGPT_FAULT={spec})")
