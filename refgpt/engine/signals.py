"""--exit-signal-handler (Megatron's flag): SIGTERM and SIGINT end a run cleanly.

Slurm (``#SBATCH --signal=TERM@120``) and Fujitsu's PJM send SIGTERM some time before a job's
limit; a user's Ctrl-C is SIGINT. With the flag, the signal only sets a flag: the step in
progress finishes, the ranks agree (a MAX all-reduce of the signal number after each step:
mpiexec forwards the signal to every rank, but not at the same instant, so a rank between
steps must not decide alone), the run saves a checkpoint if --save is given, says so in one
line, and every rank exits with status 0. Without the flag the signals keep their default
effect (Python's KeyboardInterrupt for SIGINT, which refgpt turns into one line).
"""

from __future__ import annotations

import signal

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignals:
    """A context in which SIGTERM and SIGINT are recorded instead of acted on (when enabled)."""

    def __init__(self, enabled: bool):
        self.enabled, self.received, self.saved = enabled, 0, {}

    def __enter__(self):
        if self.enabled:
            for s in SIGNALS:
                self.saved[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.saved = {}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, comm) -> str | None:
        """The name of a signal any rank received (collective over comm), or None."""
        if not self.enabled:
            return None
        got = np.array([self.received], dtype=np.int64)
        if comm is not None:                  # a buffer all-reduce: other threads run meanwhile
            from mpi4py import MPI
            comm.Allreduce(MPI.IN_PLACE, got, op=MPI.MAX)
        return signal.Signals(int(got[0])).name if got[0] else None
