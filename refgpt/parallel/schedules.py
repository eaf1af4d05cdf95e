"""Pipeline schedules as pure functions: each rank's list of instructions, no MPI.

p stages (ranks), m micro-batches, v model chunks per rank (interleaved; otherwise v = 1).
Global stage g = c p + r is chunk c of rank r, so a micro-batch visits the ranks v times.
Compute ops: F (forward), B (backward for the input gradient), W (backward for the weight
gradient), BW (B and W together). Orders (Narayanan et al. 2021, sec. 2.2; Qi et al. 2024,
"Zero Bubble Pipeline Parallelism", sec. 2):

    gpipe       F_0 .. F_{m-1}, then BW_0 .. BW_{m-1}                 bubble (p-1)/m, stash m
    1f1b        w_r = min(p-r-1, m) warm-up F, then m - w_r times [F, BW], then w_r BW
                                                                       bubble (p-1)/m, stash p-r
    interleaved virtual step k in [0, mv): chunk c_F(k) = (k mod pv) div p, micro-batch
                (k div pv) p + (k mod p); backward chunk v-1-c_F(k); warm-up
                w_r = min(2(p-r-1) + (v-1)p, mv) (all of them if m = p), then [F(k+w_r), BW(k)],
                then the remaining BW                      bubble (p-1)/(vm), stash w_r + 1 chunks
    zb-h1       w_r = min(p-r-1, m) F; min(r, m-w_r) x [F, B]; [F, B, W] while forwards remain;
                [B, W] while backwards remain; the outstanding W
                                                 bubble (p-1)(T_F+T_B-T_W), stash p-r (+ r W)

``simulate`` runs the lists with unit costs (F = B = W = 1, BW = 2, each divided by v for a
chunk) in order on each rank, each op waiting for its inputs from the neighbouring stage,
and reports makespan, each rank's idle time and its peak stash (micro-batches whose
activations are held, from F to B or BW; and, for zero-bubble, how many W are pending while
that stash peaks: the paper's (p-r) M_B + r M_W).
With a synchronous optimizer step the idle time per rank is 3(p-1), 3(p-1), 3(p-1)/v and
p-1 respectively.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SCHEDULES
COST = {"F": 1.0, "B": 1.0, "W": 1.0, "BW": 2.0}


@dataclass(frozen=True)
class Op:
    kind: str          # F, B, W, BW; or SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD; or STEP
    mb: int = -1       # micro-batch
    chunk: int = 0     # model chunk on this rank (interleaved), else 0
    peer: int = -1     # the other rank of a send or receive
    tag: int = -1


def check(p: int, m: int, v: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; one of {SCHEDULES}")
    if p < 1 or m < 1 or v < 1:
        raise ValueError("stages, micro-batches and chunks must be >= 1")
    if schedule == "interleaved" and m % p:
        raise ValueError(f"the interleaved schedule needs the micro-batches ({m}) to be a "
                         f"multiple of the pipeline size ({p})")
    if schedule != "interleaved" and v != 1:
        raise ValueError("--num-virtual-stages > 1 needs the interleaved schedule")


def compute_ops(p: int, m: int, v: int = 1, schedule: str = "1f1b") -> list[list[Op]]:
    """Each rank's compute ops, in execution order."""
    check(p, m, v, schedule)
    return [_rank_ops(r, p, m, v, schedule) for r in range(p)]


def _rank_ops(r: int, p: int, m: int, v: int, schedule: str) -> list[Op]:
    if schedule == "gpipe":
        return [Op("F", i) for i in range(m)] + [Op("BW", i) for i in range(m)]
    if schedule == "1f1b":
        w = min(p - r - 1, m)
        ops = [Op("F", i) for i in range(w)]
        for i in range(m - w):
            ops += [Op("F", w + i), Op("BW", i)]
        return ops + [Op("BW", i) for i in range(m - w, m)]
    if schedule == "interleaved":
        total = m * v

        def fwd(k):
            return Op("F", (k // (p * v)) * p + k % p, (k % (p * v)) // p)

        def bwd(k):
            return Op("BW", (k // (p * v)) * p + k % p, v - 1 - (k % (p * v)) // p)

        w = total if m == p else min(2 * (p - r - 1) + (v - 1) * p, total)
        ops = [fwd(k) for k in range(w)]
        for k in range(total - w):
            ops += [fwd(k + w), bwd(k)]
        return ops + [bwd(k) for k in range(total - w, total)]
    # zb-h1
    f = b = w = 0
    ops: list[Op] = []

    def add(kind):
        nonlocal f, b, w
        i = {"F": f, "B": b, "W": w}[kind]
        ops.append(Op(kind, i))
        f, b, w = f + (kind == "F"), b + (kind == "B"), w + (kind == "W")

    for _ in range(min(p - r - 1, m)):
        add("F")
    for _ in range(min(r, m - f)):
        add("F"), add("B")
    while f < m:
        add("F"), add("B"), add("W")
    while b < m:
        add("B"), add("W")
    while w < m:
        add("W")
    return ops


def stage(rank: int, chunk: int, p: int) -> int:
    return chunk * p + rank


def tag(direction: str, chunk: int, mb: int, m: int) -> int:
    """Message tag: unique per (direction, chunk, micro-batch), small enough for MPI_TAG_UB."""
    return (2 * chunk + (direction == "grad")) * m + mb


def forward_only_ops(p: int, m: int, v: int = 1) -> list[list[Op]]:
    """Evaluation: each rank's forwards, micro-batch by micro-batch, chunk by chunk."""
    return [[Op("F", mb, c) for mb in range(m) for c in range(v)] for _ in range(p)]


def instructions(p: int, m: int, v: int = 1, schedule: str = "1f1b",
                 ranks: list[list[Op]] | None = None) -> list[list[Op]]:
    """Each rank's full instruction list: compute ops (of the schedule, or the given ones)
    with the receives that feed them put just before and the sends of their results just
    after, then the optimizer step."""
    ranks = ranks or compute_ops(p, m, v, schedule)
    last = p * v - 1
    out = []
    for r, ops in enumerate(ranks):
        seq: list[Op] = []
        for op in ops:
            g = stage(r, op.chunk, p)
            if op.kind == "F" and g > 0:
                src = (g - 1) % p
                seq.append(Op("RECV_ACT", op.mb, op.chunk, src, tag("act", op.chunk, op.mb, m)))
            if op.kind in ("B", "BW") and g < last:
                src = (g + 1) % p
                seq.append(Op("RECV_GRAD", op.mb, op.chunk, src, tag("grad", op.chunk, op.mb, m)))
            seq.append(op)
            if op.kind == "F" and g < last:
                nxt = g + 1
                seq.append(Op("SEND_ACT", op.mb, op.chunk, nxt % p, tag("act", nxt // p, op.mb, m)))
            if op.kind in ("B", "BW") and g > 0:
                prv = g - 1
                seq.append(Op("SEND_GRAD", op.mb, op.chunk, prv % p, tag("grad", prv // p, op.mb, m)))
        out.append(seq + [Op("STEP")])
    return out


@dataclass
class Simulation:
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_stash: list[int]       # micro-batch chunks held between F and B/BW
    w_at_peak: list[int]        # zero-bubble: W still pending while that stash peaks
    start: dict                 # (rank, kind, mb, chunk) -> start time


def simulate(p: int, m: int, v: int = 1, schedule: str = "1f1b", ranks=None) -> Simulation:
    """Run the compute ops (of the schedule, or the given per-rank lists) with unit costs;
    raises RuntimeError on a deadlock."""
    ranks = ranks or compute_ops(p, m, v, schedule)
    last = p * v - 1
    finish: dict[tuple, float] = {}            # (kind, mb, global stage) -> finish time
    start: dict[tuple, float] = {}
    clock, pos = [0.0] * p, [0] * p
    remaining = sum(map(len, ranks))
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(ranks[r]):
                op = ranks[r][pos[r]]
                g = stage(r, op.chunk, p)
                deps = []
                if op.kind == "F" and g > 0:
                    deps.append(("F", op.mb, g - 1))
                if op.kind in ("B", "BW"):
                    deps.append(("F", op.mb, g))
                    if g < last:
                        deps.append(("B", op.mb, g + 1))
                if op.kind == "W":
                    deps.append(("B", op.mb, g))
                if any(d not in finish for d in deps):
                    break
                t0 = max([clock[r]] + [finish[d] for d in deps])
                clock[r] = t0 + COST[op.kind] / v
                start[(r, op.kind, op.mb, op.chunk)] = t0
                finish[(op.kind, op.mb, g)] = clock[r]
                if op.kind == "BW":
                    finish[("B", op.mb, g)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: deadlock with p={p} m={m} v={v}")
    makespan = max(clock)
    busy = [sum(COST[op.kind] / v for op in ops) for ops in ranks]
    peaks, w_peaks = [], []
    for ops in ranks:
        held = w_held = peak = w_peak = 0
        for op in ops:
            held += (op.kind == "F") - (op.kind in ("B", "BW"))
            w_held += (op.kind == "B") - (op.kind == "W")
            if held > peak:
                peak, w_peak = held, w_held
            elif held == peak:
                w_peak = max(w_peak, w_held)
        peaks.append(peak)
        w_peaks.append(w_peak)
    return Simulation(makespan, busy, [makespan - b for b in busy], peaks, w_peaks, start)
