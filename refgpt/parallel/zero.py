"""ZeRO (Rajbhandari et al. 2020) over the data-parallel communicator, on the flat buffers.

The rank's local parameters (its TP shard, its pipeline stage) are one flat buffer of Psi
elements, padded with zeros to P, a multiple of the data-parallel size d; data-parallel rank
s owns the shard [s P/d, (s+1) P/d) and keeps AdamW's moments for it only. Gradients and
parameters move in *units*, contiguous runs of whole parameters: the embeddings (wte, wpe),
one transformer block each, the final LayerNorm (the padding rides with the last unit). A
unit's elements are split among the ranks at the shard boundaries, so collectives on a unit
are the uneven MPI_Reduce_scatter / MPI_Allgatherv, and a unit that lies inside one shard
moves only to or from its owner.

Stage 1 (optimizer state partitioned). Full parameters and gradients on every rank. During
the last micro-batch's backward each unit is reduce-scattered as soon as its gradients are
final: rank s receives the batch gradient of its part of the unit. Clipping and AdamW then
touch the own shard only, and an all-gather gives every rank the new parameters.

Stage 2 (+ gradients partitioned). The persistent gradient is the own shard. In *every*
micro-batch's backward a unit's gradients go to a temporary unit buffer, allocated when
backward first writes them, reduce-scattered when the unit is done and added into the shard;
the buffer is freed (this is why stage 2 communicates after each micro-batch). At most
IN_FLIGHT reductions run at once: each holds its unit buffer, and MPI's non-blocking
collectives allocate temporaries of their own, so an unbounded number would add up to a
full gradient again.

Stage 3 (+ parameters partitioned). The persistent parameters are the own shard too. The model
reads a unit's parameters only inside ``params.hold(unit, phase)`` (refgpt.nn.gpt): the first
hold all-gathers the unit into a temporary buffer and starts gathering the unit that comes
next in that phase's order (prefetch: it overlaps the current unit's compute); the last
release frees it. Each micro-batch gathers every unit once for forward and once for backward.
The embeddings unit is held for the whole pass, since the tied head reads wte at the far end.

Per rank and step, for m micro-batches, with p, g and k bytes per element of parameters,
gradients and optimizer state (float32: p = g = 4, k = 8 for AdamW's two moments; a 16-bit
run, refgpt.optim.mixed: p = 2, g = 4, or 2 with --grad-reduce-in-bf16, k = 12 with the fp32
master weights; the ZeRO paper's 2 + 2 + K):

    stage   persistent bytes              bytes sent and received over DP
    0       (p + g + k) P                 2 g P (d-1)/d               (all-reduce)
    1       (p + g) P + k P/d             (g + p) P (d-1)/d           (reduce-scatter, all-gather)
    2       p P + (g + k) P/d             (m g + p) P (d-1)/d
    3       (p + g + k) P/d               (m g + 2 m p) P (d-1)/d

Traffic is counted per collective as the part of the buffer this rank does not own (what a
reduce-scatter must send away, or an all-gather bring in), so the sums are exact. Temporary
unit buffers are not persistent state; their high-water mark is reported as working_peak.

With expert parallelism (refgpt.parallel.expert) a rank holds the dense parameters, which
all d data-parallel ranks share, and its own experts, which only the d / e ranks of its
expert-data-parallel group share. The buffer is then laid out in two *regions*, the dense
parameters first (padded to a multiple of d) and the experts after them (padded to a
multiple of d / e), and each region is partitioned as above over its own group: a dense
unit is reduce-scattered and gathered over the d ranks, an expert unit over the d / e (as
Megatron's distributed optimizer does). Every formula above holds per region, with its P and
its d. A rank's shard is its two own parts one after the other; stages 1 and 2 hold that
shard as a copy for the optimizer (the two parts are not adjacent in the buffer), written
back before the all-gather: p S more bytes, and g S more for stage 1's gradient shard.

Under the cupy backend the buffers live on the GPU and every collective goes through the
host: what a rank sends is copied over once the GPU's queued work is done, and what it
receives is copied back when the request completes (MPI is not assumed to read GPU memory).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import array_module, to_device, to_host
from ..nn.params import Params, unit_key, zero_fill
from ..optim.clip import sum_squares
from .data import IN_FLIGHT       # gradient collectives left running while backward goes on
from .expert import expert_of
from .sync import GradSync
from .wire import moved, sum_op


@dataclass(eq=False)
class Region:
    """A run [lo, hi) of the flat buffer partitioned over comm: its rank s owns
    [lo + s S, lo + (s + 1) S), S = (hi - lo) / d, which is at `at` in this rank's shard."""

    lo: int
    hi: int
    comm: object
    at: int

    def __post_init__(self):
        self.d, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.S = (self.hi - self.lo) // self.d
        self.own = (self.lo + self.rank * self.S, self.lo + (self.rank + 1) * self.S)


@dataclass(eq=False)
class Unit:
    """Parameters [lo, hi) of the flat buffer, in one region, that move together; counts[s]
    of them are owned by the region's rank s, starting at displs[s]."""

    key: str
    region: Region
    lo: int
    hi: int
    names: list[str]
    counts: list[int]
    displs: list[int]
    data: np.ndarray | None = None       # stage 3: gathered parameters while held
    views: dict = field(default_factory=dict)
    grad: np.ndarray | None = None       # stages 2-3: this micro-batch's gradients
    gviews: dict = field(default_factory=dict)
    refs: int = 0
    gathering: tuple | None = None       # a prefetch's pending request and host buffers

    @property
    def size(self) -> int:
        return self.hi - self.lo


class UnitViews:
    """name -> the array of a parameter (or its gradient) in its unit's temporary buffer."""

    def __init__(self, params: ZeroParams, grad: bool):
        self.p, self.grad = params, grad

    def __getitem__(self, name: str) -> np.ndarray:
        unit = self.p.unit_of[name]
        if self.grad:
            if unit.grad is None:                        # first write of this backward
                unit.grad = self.p.alloc(unit.size, zero=True, dtype=self.p.grad_dtype)
                unit.gviews = self.p.views_of(unit, unit.grad)
            return unit.gviews[name]
        if unit.data is None:
            raise RuntimeError(f"{name}: a ZeRO-3 parameter read outside params.hold({unit.key!r})")
        return unit.views[name]


class ZeroParams(Params, GradSync):
    """refgpt.nn.params.Params with ZeRO storage: the same names, views and flat layout for
    the model, with optimizer shards (stage >= 1), gradient shards (>= 2) and parameter
    shards (3) over the data-parallel communicator comm; and the gradient-sync interface
    (refgpt.parallel.sync) that fills and uses them."""

    def __init__(self, specs, dtype, stage: int, comm, grad_dtype=None, expert_comm=None):
        """comm: the data-parallel group; expert_comm: under expert parallelism, the
        expert-data-parallel group, over which the experts' region is partitioned (module
        docstring)."""
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        self.stage, self.comm, self.expert_comm = stage, comm, expert_comm
        self.d, self.dp_rank = comm.Get_size(), comm.Get_rank()
        super().__init__(specs, dtype, pad_to=self.d, allocate=stage < 3, grad_dtype=grad_dtype)
        self.regions, at = [], 0
        for (lo, hi), group in zip(self.layout, (comm, expert_comm)):
            self.regions.append(Region(lo, hi, group, at))
            at += self.regions[-1].S
        self.own_runs = [r.own for r in self.regions]
        self.split = len(self.regions) > 1       # the own parts are not adjacent
        self.units = self._units()
        self.unit_of = {n: u for u in self.units for n in u.names}
        self.by_key: dict[str, list[Unit]] = {}
        forward = []                             # the model's order (a block's two units together)
        for name in self.specs:
            unit = self.unit_of[name]
            if unit not in forward:
                forward.append(unit)
                self.by_key.setdefault(unit.key, []).append(unit)
        self.order = {"forward": forward,
                      "backward": [u for u in forward if u.key == "embed"]
                      + [u for u in reversed(forward) if u.key != "embed"]}
        xp = array_module()
        if stage == 3 or self.split:
            self.shard_data = xp.zeros(at, self.dtype)
        if stage == 3:
            self._views = UnitViews(self, grad=False)
        if stage >= 2 or self.split:
            self.shard_grad = xp.zeros(at, self.grad_dtype)
        if stage >= 2:
            self.grad = None
            self.grads = UnitViews(self, grad=True)
        self.comm_bytes = 0                  # sent/received over DP for gradients and params
        self.reduces_every_micro_batch = stage >= 2
        self.working, self.working_peak = 0, 0
        self.reducing: list = []
        self.waiting: dict[int, set] = {}     # unit index -> names not yet ready

    def _regions(self, specs, pad_to: int) -> list[tuple[list, int]]:
        """The dense parameters, and after them the experts if their group is another."""
        experts = [s for s in specs if expert_of(s.name) is not None]
        if self.expert_comm is None or not experts:
            return [(specs, pad_to)]
        return [([s for s in specs if expert_of(s.name) is None], pad_to),
                (experts, self.expert_comm.Get_size())]

    def _units(self) -> list[Unit]:
        units = []
        for r in self.regions:
            groups: list[list[str]] = []
            for name in sorted((n for n, (lo, _) in self.slices.items() if r.lo <= lo < r.hi),
                               key=lambda n: self.slices[n][0]):          # flat order
                if groups and unit_key(groups[-1][-1]) == unit_key(name):
                    groups[-1].append(name)
                else:
                    groups.append([name])
            for i, names in enumerate(groups):
                lo = self.slices[names[0]][0]
                hi = r.hi if i == len(groups) - 1 else self.slices[names[-1]][1]  # + padding
                counts = [max(0, min(hi, r.lo + (s + 1) * r.S) - max(lo, r.lo + s * r.S))
                          for s in range(r.d)]
                units.append(Unit(unit_key(names[0]), r, lo, hi, names, counts,
                                  list(np.cumsum([0] + counts[:-1]))))
        return units

    # -- storage -----------------------------------------------------------------------
    def alloc(self, n: int, zero: bool = False, host: bool = False, dtype=None) -> np.ndarray:
        """A temporary buffer of n elements (of the parameters' type, or dtype) on the device
        (host=True: in host memory, for MPI to receive into)."""
        dtype = np.dtype(dtype or self.dtype)
        self.working += n * dtype.itemsize
        self.working_peak = max(self.working_peak, self.working)
        xp = np if host else array_module()
        return xp.zeros(n, dtype) if zero else xp.empty(n, dtype)

    def release(self, a: np.ndarray) -> None:
        """A temporary buffer is no longer used (its bytes leave the working count)."""
        self.working -= a.nbytes

    def views_of(self, unit: Unit, buf: np.ndarray) -> dict:
        return {n: buf[self.slices[n][0] - unit.lo:self.slices[n][1] - unit.lo]
                .reshape(self.specs[n].shape) for n in unit.names}

    def writes_own(self, dp_rank: int) -> bool:
        return True                             # the shards partition the buffers

    def own_part(self, lo: int, hi: int) -> tuple[int, int]:
        """The part of [lo, hi) (within one region) in this rank's shard, as offsets into the
        shard (may be empty)."""
        for a, b, at in self.in_shard(lo, hi):
            return at, at + b - a
        return 0, 0

    def param_shard(self) -> np.ndarray:
        if self.stage == 3 or self.split:
            return self.shard_data
        return self.data[self.own_runs[0][0]:self.own_runs[0][1]]

    def param_bytes(self) -> int:
        """Bytes of parameters this rank holds."""
        if self.stage == 3:
            return self.shard_data.nbytes
        return self.data.nbytes + (self.shard_data.nbytes if self.split else 0)

    def grad_shard(self) -> np.ndarray:
        if self.stage >= 2 or self.split:
            return self.shard_grad
        return self.grad[self.own_runs[0][0]:self.own_runs[0][1]]

    def grad_bytes(self) -> int:
        """Bytes of gradients this rank holds (stages 2-3: its shard)."""
        if self.stage >= 2:
            return self.shard_grad.nbytes
        return self.grad.nbytes + (self.shard_grad.nbytes if self.split else 0)

    def formula(self, p: int, g: int, k: int, shared: bool = False) -> int:
        """Persistent bytes by the table of the module docstring, region by region, with the
        optimizer's copies of the own parts when they are split (p, g, k as there)."""
        total = sum(formula_bytes(self.stage, r.hi - r.lo, r.d, p, g, k, shared)
                    for r in self.regions)
        if self.split and self.stage < 3:
            total += (p + (g if self.stage == 1 else 0)) * self.shard_size
        return total

    def _write(self, name: str, value: np.ndarray) -> None:
        if self.stage < 3:
            super()._write(name, value)
        if self.stage == 3 or self.split:
            a, b, piece = self.own_piece(name, value)
            self.shard_data[a:b] = to_device(piece)

    def own_piece(self, name: str, value: np.ndarray) -> tuple[int, int, np.ndarray]:
        """(a, b, piece): the part of a full parameter value that lies in this rank's shard,
        and where it goes there ([a, b) as offsets into the shard)."""
        lo, hi = self.slices[name]
        for a, b, at in self.in_shard(lo, hi):
            return at, at + b - a, np.ravel(to_host(value))[a - lo:b - lo]
        return 0, 0, np.ravel(to_host(value))[:0]

    def zero_grad(self) -> None:
        zero_fill(self.shard_grad if self.stage >= 2 else self.grad)

    # -- stage 3: parameters gathered while held -----------------------------------------
    def hold(self, key: str, phase: str):
        units = self.by_key.get(key) if self.stage == 3 else None
        return self._held_all(units, phase) if units else contextlib.nullcontext()

    @contextlib.contextmanager
    def _held_all(self, units: list[Unit], phase: str):
        with contextlib.ExitStack() as stack:
            for unit in units:                  # under EP a block's dense part, then its experts
                stack.enter_context(self._held(unit, phase))
            yield

    @contextlib.contextmanager
    def _held(self, unit: Unit, phase: str):
        if unit.refs == 0:
            if unit.data is None:
                self._gather(unit)
            self._gathered(unit)
            order = self.order[phase]
            nxt = order.index(unit) + 1
            if nxt < len(order) and order[nxt].data is None:
                self._gather(order[nxt])                 # prefetch: completes in its own hold
        unit.refs += 1
        try:
            yield
        finally:
            unit.refs -= 1
            if unit.refs == 0:
                self.release(unit.data)
                unit.data, unit.views = None, {}

    def drop_prefetched(self) -> None:
        """Free units gathered ahead but never held (none in a full pass; before the optimizer
        changes the shards, a stale copy must not survive)."""
        for unit in self.units:
            if unit.refs == 0 and unit.data is not None:
                self._gathered(unit)
                self.release(unit.data)
                unit.data, unit.views, unit.gathering = None, {}, None

    def _gather(self, unit: Unit) -> None:
        a, b = self.own_part(unit.lo, unit.hi)
        unit.data = self.alloc(unit.size)
        unit.views = self.views_of(unit, unit.data)
        send = to_host(self.shard_data[a:b])                  # the views themselves on a CPU
        recv = unit.data if isinstance(unit.data, np.ndarray) else self.alloc(unit.size, host=True)
        unit.gathering = (unit.region.comm.Iallgatherv(moved(send), [
            moved(recv), (unit.counts, unit.displs)]), send, recv)
        self.comm_bytes += (unit.size - (b - a)) * self.dtype.itemsize

    def _gathered(self, unit: Unit) -> None:
        """Complete the unit's pending gather, if any (and copy it to the device)."""
        if unit.gathering is not None:
            req, _, recv = unit.gathering
            req.Wait()
            if recv is not unit.data:
                unit.data[...] = to_device(recv)
                self.release(recv)
            unit.gathering = None

    def after_step(self) -> None:
        """Stages 1-2, after the optimizer step: every rank gets every updated shard (stage 3
        keeps only its shard)."""
        if self.stage == 3:
            return
        from mpi4py import MPI
        for r in self.regions:
            region = self.data[r.lo:r.hi]
            if self.split:                                   # the optimizer's copy, written back
                region[r.own[0] - r.lo:r.own[1] - r.lo] = self.shard_data[r.at:r.at + r.S]
            buf = to_host(region)                            # the region itself on a CPU
            r.comm.Allgather(MPI.IN_PLACE, moved(buf))
            if buf is not region:
                region[...] = to_device(buf)
            self.comm_bytes += (r.hi - r.lo - r.S) * self.dtype.itemsize

    # -- gradients: reduce-scatter unit by unit ------------------------------------------
    def start(self) -> None:
        """Arm the units before a backward whose gradients are to be reduced."""
        self.waiting = {i: set(u.names) for i, u in enumerate(self.units)}
        self.blocked_s = 0.0         # seconds ready() waits for older units (IN_FLIGHT)

    def ready(self, names) -> None:
        """Backward calls this with parameters whose gradients (of this backward) are final;
        a unit whose parameters are all final starts its reduce-scatter."""
        for i, unit in enumerate(self.units):
            left = self.waiting.get(i)
            if not left:
                continue
            left.difference_update(names)
            if left:
                continue
            send = to_host(self.grad[unit.lo:unit.hi] if self.stage == 1 else unit.grad)
            piece = self.alloc(unit.counts[unit.region.rank], host=True, dtype=self.grad_dtype)
            req = unit.region.comm.Ireduce_scatter(moved(send), moved(piece), unit.counts,
                                                   op=sum_op(self.grad_dtype))
            self.reducing.append((unit, piece, req, send))
            self.comm_bytes += (unit.size - len(piece)) * self.grad_dtype.itemsize
            t0 = time.perf_counter()
            self._complete(self.reducing[:-IN_FLIGHT])  # bound what waits on the network
            self.blocked_s += time.perf_counter() - t0

    def finish(self) -> None:
        """Finish the reduce-scatters: stage 1 stores the summed own part into the full
        gradient; stages 2-3 add it into the gradient shard and free the unit buffers. Stage 3
        then drops any unit gathered ahead and never held, so that no stale copy outlives the
        optimizer's update of the shards."""
        if any(self.waiting.values()):
            raise RuntimeError("some ZeRO gradient units were never ready: backward skipped a "
                               "parameter")
        self._complete(self.reducing)
        self.waiting = {}
        if self.stage == 3:
            self.drop_prefetched()

    def _complete(self, done: list) -> None:
        from mpi4py import MPI
        MPI.Request.Waitall([req for _, _, req, _ in done])
        for unit, piece, _, _ in done:
            a, b = self.own_part(unit.lo, unit.hi)
            if self.stage == 1:
                self.grad_shard()[a:b] = to_device(piece)
            else:
                self.shard_grad[a:b] += to_device(piece)
                self.release(unit.grad)
                unit.grad, unit.gviews = None, {}
            self.release(piece)
        self.reducing = self.reducing[len(done):]

    def grad_squares(self, counted) -> float:
        """Sum of squares of the own gradient shard over the parameters counted(name) here."""
        g, sq = self.grad_shard(), 0.0
        for name, (lo, hi) in self.slices.items():
            a, b = self.own_part(lo, hi)
            if b > a and counted(name):
                sq += sum_squares(g[a:b])
        return sq

    # -- whole buffers (checkpoints) ------------------------------------------------------
    def gather_shards(self, shard: np.ndarray) -> np.ndarray:
        """The full flat buffer from every rank's shard of it (a temporary of P elements)."""
        full = np.empty(self.padded, shard.dtype)
        for r in self.regions:
            r.comm.Allgather(moved(np.ascontiguousarray(to_host(shard[r.at:r.at + r.S]))),
                             moved(full[r.lo:r.hi]))
        return full

    def full_data(self) -> np.ndarray:
        return self.gather_shards(self.shard_data) if self.stage == 3 else self.data


def offload_moments(folder, rank: int, n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """AdamW's m and v as zero-filled .npy memmaps in folder (one pair per world rank)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return tuple(np.lib.format.open_memmap(path / f"rank{rank:05d}.{name}.npy", mode="w+",
                                           dtype=dtype, shape=(n,))
                 for name in ("exp_avg", "exp_avg_sq"))


def formula_bytes(stage: int, padded: int, d: int, p: int, g: int | None = None,
                  k: int | None = None, shared: bool = False) -> int:
    """Persistent bytes per rank for parameters + gradients + optimizer state (table above;
    g defaults to p, k to AdamW's 2 p). shared: stage 1 with one parameter copy per node of d
    ranks (refgpt.parallel.shared), of which each rank is counted its d-th part:
    g P + (p + k) P/d."""
    g = p if g is None else g
    k = 2 * p if k is None else k
    full, per_shard = {0: (p + g + k, 0), 1: (p + g, k), 2: (p, g + k), 3: (0, p + g + k)}[stage]
    if shared:
        full, per_shard = g, p + k
    return full * padded + per_shard * padded // d


def formula_traffic(stage: int, padded: int, d: int, micro_batches: int, p: int,
                    g: int | None = None) -> float:
    """Bytes each rank sends or receives over the data-parallel group in one step (p, g:
    bytes per parameter and gradient element; g defaults to p)."""
    g = p if g is None else g
    m = micro_batches
    per_element = {0: 2 * g, 1: g + p, 2: m * g + p, 3: m * g + 2 * m * p}[stage]
    return per_element * padded * (d - 1) / d


def formula_working(units: list[tuple[str, int]], stage: int, d: int, rank: int, p: int,
                    g: int, head: bool, pipelined: bool = False,
                    experts: tuple[list[tuple[str, int]], int, int] | None = None) -> int:
    """The high-water mark of a rank's temporary buffers (``working_peak``) in a step, from
    the protocol above: units = (key, elements) in the flat buffer's order, padding in the
    last; rank: the data-parallel rank, whose reduce-scatter pieces are its own part of each
    unit; head: the stage computes the LM head (whose tied wte gradient is written first);
    experts: under expert parallelism, (units, d_e, rank_e) of the experts' region, which
    follows the dense one and is partitioned over the d_e ranks of the expert-data-parallel
    group (a block's expert unit shares its dense unit's key and comes after it).

    Backward visits the units in the order [embed] + the others reversed (ln_f, the last
    block, ..., the first); stage 3 holds the embeddings unit's parameters for the whole
    pass, each other unit's while its backward runs, and the first hold of a unit gathers
    the one after it in that order ahead (a block with experts: its dense unit, then its
    experts). Stages 2-3 allocate a unit's gradient buffer at its first write (the tied wte:
    at the head). When a unit's gradients are final (after its hold ends) its piece is
    allocated, then the reductions older than the last IN_FLIGHT complete, freeing their
    gradient buffers and pieces. Stage 1 allocates the pieces only. Stage 3's forward pass
    gathers the same way, in the forward order. A pipeline (pipelined; stage 1 only, as
    check_layout refuses ZeRO-2/3 with PP) hands every gradient over after its schedule, and
    ready() starts the units' sums in the flat buffer's order."""
    regions = [(units, d, rank)] + ([experts] if experts and experts[0] else [])
    keys, size, piece = [], [], []                # per unit, in the flat buffer's order
    for region, n, r in regions:
        S = sum(e for _, e in region) // n
        lo = np.cumsum([0] + [e for _, e in region])
        for (k, e), a, b in zip(region, lo[:-1], lo[1:]):
            keys.append(k)
            size.append(e)
            piece.append(int(max(0, min(b, (r + 1) * S) - max(a, r * S))) * g)
    of_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        of_key.setdefault(k, []).append(i)
    forward = [i for k in of_key for i in of_key[k]]       # the model's order
    order = {"forward": forward,
             "backward": of_key.get("embed", []) + [i for i in reversed(forward)
                                                     if keys[i] != "embed"]}
    live = peak = 0

    def alloc(nbytes: int) -> None:
        nonlocal live, peak
        live += nbytes
        peak = max(peak, live)

    reducing: list[int] = []

    def reduce(i: int) -> None:
        """Unit i's reduce-scatter starts; those older than the last IN_FLIGHT complete."""
        nonlocal live
        alloc(piece[i])
        reducing.append(i)
        while len(reducing) > IN_FLIGHT:
            done = reducing.pop(0)
            live -= piece[done] + (size[done] * g if stage >= 2 else 0)

    def ready(key: str) -> None:
        for i in of_key[key]:
            reduce(i)

    if pipelined:
        for i in range(len(keys)):
            reduce(i)
        return peak
    gathered: set[int] = set()

    def hold(key: str, phase: str) -> None:
        """Stage 3 enters the key's units: each gathered if it is not, and the next in the
        phase's order gathered ahead."""
        for i in of_key[key] if stage == 3 else ():
            nxt = order[phase].index(i) + 1
            for j in [i] + order[phase][nxt:nxt + 1]:
                if j not in gathered:
                    gathered.add(j)
                    alloc(size[j] * p)

    def release(key: str) -> None:
        nonlocal live
        for i in of_key[key] if stage == 3 else ():
            gathered.discard(i)
            live -= size[i] * p

    written: set[str] = set()

    def write(key: str) -> None:
        if stage >= 2 and key not in written:
            written.add(key)
            for i in of_key[key]:
                alloc(size[i] * g)

    embedded = "embed" in of_key
    for phase in ("forward", "backward") if stage == 3 else ("backward",):
        if embedded:
            hold("embed", phase)
        if head and embedded and phase == "backward":
            write("embed")
        for key in dict.fromkeys(keys[i] for i in order[phase] if keys[i] != "embed"):
            hold(key, phase)
            if phase == "backward":
                write(key)
            release(key)
            if phase == "backward":
                ready(key)
        if embedded:
            if phase == "backward":
                write("embed")
            release("embed")
            if phase == "backward":
                ready("embed")
    return peak
