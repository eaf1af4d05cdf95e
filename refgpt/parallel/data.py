"""Data parallelism: each of d ranks computes the gradient of its share of the global batch;
the shares are summed so every rank holds the gradient of the whole batch.

Because each micro-batch's loss is divided by the token count of the *global* batch (see
refgpt.nn.loss), the sum over ranks (and over the m micro-batches a rank accumulates) is
exactly the single-process gradient:

    g = sum_{r < d} sum_{j < m} grad L_{r,j},    L_{r,j} = (token losses of micro-batch j of rank r) / (G T)

The sum (GradAllReduce) runs over the flat gradient buffer in *buckets*: contiguous runs of whole parameters,
filled in the order backward finishes them (last block first). During the last micro-batch's
backward, a bucket's non-blocking all-reduce (MPI_Iallreduce, in place) starts as soon as all
of its parameters are final, so communication overlaps the rest of backward; the optimizer
waits for all of them. Earlier micro-batches only accumulate locally (no communication).
The token table is final only after the embedding's backward (it also feeds the tied head),
so its bucket goes last. ``bucket_elems = 0`` puts everything in one bucket, reduced after
backward: the same numbers, no overlap. At most IN_FLIGHT all-reduces run at once (MPI's
non-blocking collectives allocate temporaries per request; all buckets in flight would cost
another gradient's worth of memory). Under the cupy backend the gradients live on a GPU and
MPI is not assumed to read GPU memory: a bucket is copied to the host once the GPU's queued
work is done, reduced there, and copied back when its all-reduce completes.

Overlap pays only where the network progresses on its own. Most MPIs advance a non-blocking
collective only inside MPI calls, and on a CPU node the "network" is other cores copying
memory, so with every core computing there is little to overlap with. ``overlap=False``
(``--no-overlap-grad-reduce``) reduces the buckets after backward with blocking MPI_Allreduce,
which uses the MPI's tuned algorithms; docs/scaling/ measures both. ``thread=True``
(``--dp-comm-thread``) is the third way: a helper thread (ReduceThread) runs the blocking sums,
MPI's or a written-out algorithm's, bucket by bucket as backward finishes them, so they
progress while the main thread computes (MPI_THREAD_MULTIPLE; the thread has its own
duplicates of the communicators); finish() waits for the last.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from ..backend import synchronize, to_device, to_host
from .sync import GradSync, squares
from .wire import moved, sum_op

IN_FLIGHT = 2      # gradient collectives left running while backward goes on (also ZeRO's)


class GradAllReduce(GradSync):
    """The all-reduce of the gradient buffer in buckets, over the data-parallel group (the
    gradient-sync interface of refgpt.parallel.sync)."""

    def __init__(self, params, dp_comm, bucket_elems: int, overlap: bool = True, groups=None,
                 allreduce=None, thread: bool = False):
        """Backward finishes the parameters in the reverse of the flat buffer's order (last
        block first; refgpt.nn.gpt), so buckets are runs of whole parameters from the end.
        overlap False: no all-reduce during backward; finish() reduces the buckets one after
        another with blocking MPI_Allreduce (MPI's tuned algorithms, no progress needed).
        groups(name): the communicator a parameter's gradient is summed over, where it is not
        dp_comm (expert parallelism: an expert's over its expert-data-parallel group); a
        bucket holds parameters of one group only. allreduce(comm, buffer): a hand-written
        algorithm (refgpt.parallel.collectives) for the blocking sums after backward, in
        place of MPI_Allreduce (with overlap False). thread: the sums, by allreduce (which
        must then be given: Allreduce("mpi") for MPI's), run on a helper thread as the buckets
        become ready (overlap is then not used)."""
        self.params, self.grad, self.comm, self.overlap = params, params.grad, dp_comm, overlap
        self.allreduce = allreduce
        group = groups or (lambda n: dp_comm)
        names = sorted(params.slices, key=lambda n: params.slices[n][0], reverse=True)
        self.buckets: list[tuple[int, int, set]] = []        # (lo, hi, parameter names)
        self.groups: list = []                               # each bucket's communicator
        current, count = [], 0
        for i, n in enumerate(names):
            lo, hi = params.slices[n]
            current.append(n)
            count += hi - lo
            last = i == len(names) - 1
            if (bucket_elems and count >= bucket_elems) or last or group(names[i + 1]) != group(n):
                self.buckets.append((params.slices[current[-1]][0],
                                     params.slices[current[0]][1], set(current)))
                self.groups.append(group(n))
                current, count = [], 0
        self.pending: list = []
        self.waiting: list[set] = []
        self.comm_bytes = 0.0        # a ring all-reduce of n elements sends 2 n (d-1)/d of them
        self.worker = ReduceThread(self.groups, allreduce) if thread else None

    def start(self) -> None:
        """Arm the buckets before the last micro-batch's backward."""
        self.waiting = [set(b[2]) for b in self.buckets]
        self.pending = []
        self.blocked_s = 0.0         # seconds ready() waits for an older bucket this step

    def ready(self, names) -> None:
        """Backward calls this with parameters whose gradients are final. Each call also lets
        MPI move the collectives in flight along (most MPIs progress a non-blocking collective
        only inside MPI calls); a wait forced by the IN_FLIGHT bound counts in blocked_s."""
        from mpi4py import MPI
        if self.pending:
            MPI.Request.Testall([p[0] for p in self.pending])
        for (lo, hi, _), left, comm in zip(self.buckets, self.waiting, self.groups):
            if left:
                left.difference_update(names)
                if not left and self.worker is not None:
                    buf, host = self._host(lo, hi, comm)
                    self.worker.submit(comm, buf)
                    self.pending.append((MPI.REQUEST_NULL, lo, hi, host))
                elif not left and self.overlap:
                    buf, host = self._host(lo, hi, comm)
                    req = comm.Iallreduce(MPI.IN_PLACE, moved(buf), op=sum_op(buf.dtype))
                    self.pending.append((req, lo, hi, host))
                    if len(self.pending) > IN_FLIGHT:
                        t0 = time.perf_counter()
                        self._land(self.pending.pop(0))
                        self.blocked_s += time.perf_counter() - t0

    def finish(self) -> None:
        """Block until every bucket is reduced (before clipping and the optimizer)."""
        from mpi4py import MPI
        if any(self.waiting):
            raise RuntimeError("some gradient buckets were never ready: backward skipped a parameter")
        if self.worker is not None:
            self.worker.wait()
        elif not self.overlap:
            for (lo, hi, _), comm in zip(self.buckets, self.groups):
                buf, host = self._host(lo, hi, comm)
                if self.allreduce is not None:
                    self.allreduce(comm, buf)
                else:
                    comm.Allreduce(MPI.IN_PLACE, moved(buf), op=sum_op(buf.dtype))
                self.pending.append((MPI.REQUEST_NULL, lo, hi, host))
        MPI.Request.Waitall([p[0] for p in self.pending])
        for p in self.pending:
            self._land(p)
        self.pending = []

    def free(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.allreduce is not None:
            self.allreduce.free()
        if self.worker is not None:
            self.worker.free()

    def grad_squares(self, counted) -> float:
        """Every rank of a bucket's group holds the whole sum: the group's rank 0 counts it."""
        if all(c is self.comm for c in self.groups):
            return squares(self.params, counted) if self.comm.Get_rank() == 0 else 0.0
        mine = {n for (_, _, names), c in zip(self.buckets, self.groups) if c.Get_rank() == 0
                for n in names}
        return squares(self.params, lambda n: n in mine and counted(n))

    def _host(self, lo: int, hi: int, comm):
        """The bucket as MPI will read it (a GPU bucket: a host copy, also returned second);
        counts its traffic."""
        d = comm.Get_size()
        self.comm_bytes += 2 * (hi - lo) * (d - 1) / d * self.grad.itemsize
        buf, host = self.grad[lo:hi], None
        if not isinstance(buf, np.ndarray):
            synchronize()
            buf = host = to_host(buf)
        return buf, host

    def _land(self, pending) -> None:
        req, lo, hi, host = pending
        req.Wait()
        if host is not None:
            self.grad[lo:hi] = to_device(host)


class ReduceThread:
    """A helper thread that sums the buffers handed to it, in the order given, with
    allreduce(comm, buffer) (refgpt.parallel.collectives.Allreduce) on its own duplicate of each communicator
    (so that its collectives never interleave with the main thread's). Needs an MPI
    initialised with MPI_THREAD_MULTIPLE; mpi4py releases the GIL inside MPI calls, and the
    model's kernels release it too, so the sums progress while backward computes."""

    def __init__(self, comms, allreduce):
        from mpi4py import MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            from ..config import ConfigError
            raise ConfigError("--dp-comm-thread needs an MPI library initialised with "
                              "MPI_THREAD_MULTIPLE (this one gave a lower level)")
        self.dups = {}
        for c in comms:                                 # one duplicate per distinct group
            if id(c) not in self.dups:
                self.dups[id(c)] = c.Dup()
        self.allreduce = allreduce
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="refgpt-dp-reduce", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            comm, buf = item
            try:
                self.allreduce(comm, buf)
            except BaseException as e:            # kept for wait() to raise in the main thread
                self.error = e
            finally:
                self.queue.task_done()

    def submit(self, comm, buf) -> None:
        self.queue.put((self.dups[id(comm)], buf))

    def wait(self) -> None:
        """Until every sum handed over is done."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def free(self) -> None:
        """Give back the duplicates (collective; after stop)."""
        for comm in self.dups.values():
            comm.Free()

