"""--distributed-timeout-minutes (Megatron's flag): a rank that stops responding ends the job.

Every rank writes its position as each phase starts (the iteration, the phase, the time) into
its slot of a small array in its node's shared memory (MPI-3: ``MPI_Win_allocate_shared`` over
the ranks of the node). A thread of each rank looks every few seconds. When its own rank has
been in one phase for longer than the timeout (waiting in a collective for a rank that never
comes, say), it reads the other slots and names the ranks that have not arrived where it is
(behind it); the lowest-numbered of the ranks waiting there prints one line and aborts the job
(``MPI_Abort``), the others abort a moment later if it has not. A rank that others are ahead
of never acts: it is the one they wait for, slow or stopped. The slots are plain loads and
stores, so a rank that is stopped (SIGSTOP, a hung node) cannot keep the others from seeing
it. Ranks of other nodes are not in the array: if every rank of a node waits, the line says
the rank to look for is on another node.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from ..timers import NAMES

PHASES = ("start", *NAMES, "evaluation", "checkpoint")   # a step's phases in their order


class Watchdog:
    """Started by the trainer on several ranks with a timeout > 0; note(iteration, phase) as
    each phase starts; close() at the end of training."""

    def __init__(self, comm, minutes: float):
        from mpi4py import MPI
        self.comm, self.minutes, self.timeout = comm, minutes, 60.0 * minutes
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        n, self.me = self.node.Get_size(), self.node.Get_rank()
        self.win = MPI.Win.Allocate_shared(n * 4 * 8 if self.me == 0 else 0, 8, comm=self.node)
        buf, _ = self.win.Shared_query(0)
        self.slots = np.ndarray((n, 4), dtype=np.float64, buffer=buf)  # iteration, phase, t, rank
        self.slots[self.me] = (0, 0, time.time(), comm.Get_rank())
        self.node.Barrier()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
        self.thread.start()

    def note(self, iteration: int, phase: str) -> None:
        index = PHASES.index(phase) if phase in PHASES else 0
        self.slots[self.me, :3] = (iteration, index, time.time())

    def close(self, collective: bool = True) -> None:
        """Stop the thread; with collective (every rank of the node closes), free the window."""
        self.done.set()
        self.thread.join()
        if collective:
            self.node.Barrier()
            self.win.Free()
            self.node.Free()

    def _watch(self) -> None:
        period = min(5.0, self.timeout / 4)
        patience = 4                          # a rank that does not print waits this many
        while not self.done.wait(period):     # periods more for the one that does
            slots = self.slots.copy()
            iteration, phase, since, rank = slots[self.me]
            now = time.time()
            if now - since < self.timeout:
                continue
            here = (iteration, phase)
            if any((i, p) > here for i, p, _, _ in slots):
                continue                      # others are ahead: they judge, not this rank
            waiting = [int(r) for i, p, _, r in slots if (i, p) == here]
            if int(rank) != min(waiting):
                patience -= 1
                if patience < 0:
                    self.comm.Abort(3)
                continue
            behind = sorted(int(r) for i, p, _, r in slots if (i, p) < here)
            where = (f"rank{'s' * (len(behind) > 1)} {', '.join(map(str, behind))} did not "
                     f"arrive" if behind else "every rank of this node is here: the rank that "
                     "did not arrive is on another node")
            line = (f"error: no progress for {self.minutes:g} min in phase "
                    f"'{PHASES[int(phase)]}' of iteration {int(iteration) + 1}: {where} "
                    f"(--distributed-timeout-minutes)\n")
            os.write(2, line.encode())        # the process's stderr, whatever sys.stderr is
            time.sleep(1.0)                   # for mpiexec to pass the line on before the abort
            self.comm.Abort(3)
