"""Test-only fault injection, to prove that a failure on one rank ends the whole job.

With REFGPT_FAULT="rank=R,phase=P" in the environment, rank R raises InjectedFault when it
reaches phase P (with ",action=hang": stops there for good, as a stopped or hung rank does,
to prove the watchdog of refgpt.engine.watchdog), one of: init (end of set-up), forward, backward, grads-all-reduce (the
gradient reduction), optimizer, checkpoint (saving). The step's phases are its timers'
(refgpt.timers calls the hook as each starts); init and checkpoint are called where those
begin. Without the variable nothing happens.
"""

from __future__ import annotations

import os
import time

PHASES = ("init", "forward", "backward", "grads-all-reduce", "optimizer", "checkpoint")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> tuple[int, str, str]:
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        rank, phase, action = int(fields["rank"]), fields["phase"], fields.get("action", "raise")
    except (ValueError, KeyError):
        raise ValueError(f'REFGPT_FAULT must look like "rank=1,phase=backward", got {spec!r}') from None
    if phase not in PHASES:
        raise ValueError(f"REFGPT_FAULT phase must be one of {PHASES}, got {phase!r}")
    if action not in ("raise", "hang"):
        raise ValueError(f"REFGPT_FAULT action must be raise or hang, got {action!r}")
    return rank, phase, action


class Faults:
    """Called with each phase's name as it begins; raises at the one REFGPT_FAULT names."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("REFGPT_FAULT") if spec is None else spec
        self.rank, self.spec = rank, spec
        self.target = parse(spec) if spec else None

    def __call__(self, phase: str) -> None:
        if self.target is None or self.target[:2] != (self.rank, phase):
            return
        if self.target[2] == "hang":
            while True:
                time.sleep(3600)
        raise InjectedFault(f"injected fault at phase {phase!r} (REFGPT_FAULT={self.spec})")
