"""Activation memory: what the layers hold for backward, counted as it is held, and what
refgpt's layers are known to save, as a formula.

The count (``held_bytes``) walks every layer's stash (refgpt.nn.layer: one saved context per
forward awaiting its backward) and adds up the memory the saved arrays cover: the union of
their byte extents, so an array two layers save (the probabilities P, kept as P and as
dropout(P) when there is no dropout) and the views of one buffer (q, k, v of the qkv
projection) count once, and a view counts only the bytes it spans. ``ActivationMeter`` keeps
the peak of that count over the points where it can peak: after each micro-batch's forward
(and each pipeline op), and inside a recomputed chunk's (or attention core's) backward, where
its activations exist again for a moment.

The formula (``refgpt_bytes``), per transformer layer and micro-batch of b sequences of s
tokens, hidden size h, a heads, tensor-parallel size t, e bytes per stored element and c per
compute element (e = c for float32/float64; e = 2, c = 4 in 16 bits), with dropout:

    LayerNorm x 2        n (the normalised input, bsh e) and 1/sigma (bs c) each
    c_attn, c_fc input   the LayerNorms' outputs, bsh e each
    q, k, v              3bsh e / t           (c_attn's output, viewed as heads)
    P, dropout(P)        2 a s^2 b e / t      (one P without attention dropout)
    attention mask       a s^2 b c / t        (dropout's scaled mask, in the compute type)
    c_proj input         bsh e / t            (the heads merged)
    gelu input, c_proj   4bsh e / t each      (c_fc's output with its bias; the gelu)
    residual masks       2 bsh c              (after each branch's dropout)

so, in one process, 16 bsh e + 2 bs c + a s^2 b e without dropout and 16 bsh e + 2 bs c +
2 bsh c + a s^2 b (2e + c) with it: sbh(40 + 8as/h) + 8sb bytes in 16 bits. Korthikanti et
al. count sbh(34 + 5as/h) for Megatron's layer: the same arrays, but one-byte dropout masks
where refgpt keeps each mask scaled, in the compute type (backward is one multiply);
docs/memory.md compares the two term by term.

With sequence parallelism the LayerNorms, dropouts and residuals hold s/t tokens and the
column-parallel inputs are the all-gathered sequence. Full recomputation keeps a chunk's
input (bsh e per chunk of blocks) and, during the chunk's backward, its blocks' activations
once more. Selective recomputation keeps q, k, v and drops P, dropout(P) and the attention
mask, which exist again for one block inside its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _extent(a) -> tuple[int, int] | None:
    """[start, end) of the bytes an array spans, from its address, shape and strides (NumPy
    and CuPy arrays); None for an empty array."""
    if a.size == 0:
        return None
    ptr = a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr
    lo = hi = ptr
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return lo, hi + a.itemsize


def arrays_in(saved):
    """The floating-point arrays in nested tuples, lists and deques of saved contexts (token
    ids, and the dropout key's sample ids, are inputs, not activations)."""
    if hasattr(saved, "__array_interface__") or hasattr(saved, "__cuda_array_interface__"):
        if saved.dtype.kind in "fV":
            yield saved
    elif isinstance(saved, (tuple, list)) or hasattr(saved, "popleft"):
        for item in saved:
            yield from arrays_in(item)


def covered_bytes(arrays) -> int:
    """Bytes of the union of the arrays' extents."""
    spans = sorted(e for e in map(_extent, arrays) if e is not None)
    total, end = 0, None
    for lo, hi in spans:
        if end is None or lo >= end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def held_bytes(layers, extra=()) -> int:
    """Bytes the layers' stashes (and the arrays in extra) hold, each byte once."""
    return covered_bytes(arrays_in([[layer.stash for layer in layers], extra]))


class ActivationMeter:
    """The peak of held_bytes(layers) over the samples taken since the last reset, and
    (layer_peak) of what the layers of one block (first_block: the rank's first) keep between
    passes. more(): arrays held outside the stashes (zero-bubble's deferred weight-gradient
    inputs)."""

    def __init__(self, layers, first_block=(), more=lambda: ()):
        self.layers, self.first_block, self.more = layers, first_block, more
        self.peak = self.layer_peak = 0

    def reset(self) -> None:
        self.peak = self.layer_peak = 0

    def sample(self, extra=()) -> None:
        """Count now; extra: arrays a backward holds in its own variables (a recomputed
        chunk's input, the attention core's recomputed probabilities)."""
        self.peak = max(self.peak, held_bytes(self.layers, [extra, list(self.more())]))
        if not extra:
            self.layer_peak = max(self.layer_peak, held_bytes(self.first_block))


@dataclass(frozen=True)
class Sizes:
    """One micro-batch's dimensions as a rank holds them: b sequences of s tokens (the rank's
    share of each under context parallelism), hidden h, a heads, padded vocabulary V; e bytes
    per stored and c per compute element; tensor-parallel size t, with sequence parallelism
    (sp) or not; dropout on or off; context-parallel size cp, its attention by ring (p2p) or
    all-to-all (a2a); summa: 2-D tensor parallelism, whose rank holds b / q sequences of h / q
    (the sizes given so, t = 1) and whose LayerNorms keep their tokens' mean as well."""

    b: int
    s: int
    h: int
    a: int
    V: int
    e: int
    c: int
    t: int = 1
    sp: bool = False
    dropout: bool = False
    cp: int = 1
    a2a: bool = False
    summa: bool = False
    routed: tuple[int, int, int] = (0, 0, 0)    # MoE: (k, pairs kept, rows run here) a layer

    @property
    def s_local(self) -> int:
        """Tokens per sequence where the layout splits them (LayerNorms, dropouts, the
        residual stream under sequence parallelism)."""
        return self.s // self.t if self.sp else self.s


def core_bytes(z: Sizes) -> int:
    """What the attention core keeps: P (with dropout also dropout(P) and its mask) of the
    rank's heads; under context parallelism by ring (refgpt.parallel.context), the output in
    the compute type (a copy beside the stored one in 16 bits) and its log-sum-exp, the mask
    drawn again in backward; by all-to-all, the whole sequence's q, k, v of 1/cp of the heads
    and their P."""
    b, s, h, a, e, c, t, drop = z.b, z.s, z.h, z.a, z.e, z.c, z.t, int(z.dropout)
    if z.cp > 1 and not z.a2a:
        return b * s * h // t * (c if e != c else 0) + a // t * b * s * c
    if z.cp > 1:
        whole = s * z.cp
        return 3 * b * s * h // t * e + a // (t * z.cp) * b * whole * whole * (
            (1 + drop) * e + drop * c)
    return a // t * b * s * s * ((1 + drop) * e + drop * c)


def block_terms(z: Sizes, moe: bool = False) -> dict[str, int]:
    """Bytes one block keeps for its backward, by what keeps them (module docstring). A block
    with experts (moe; refgpt.nn.moe) keeps, for its N = b s tokens (the whole sequence under
    sequence parallelism), its input x (as the dense MLP's c_fc), the gates [N, k] in the
    compute type, the K kept token-expert pairs' outputs combined back to this rank, and for
    the R rows its own experts ran: their gathered inputs and the MLP's gelu input and output
    (4h / t each); z.routed = (k, K, R). Without expert parallelism or a capacity, K = R = N k
    whatever the routing."""
    b, s, h, e, c, t, sl = z.b, z.s, z.h, z.e, z.c, z.t, z.s_local
    drop = int(z.dropout)
    ln = b * sl * h * e + b * sl * c + z.summa * b * sl * e     # n, 1/sigma (, the mean)
    k, kept, rows = z.routed
    mlp = ({"c_fc input": b * s * h * e, "gates": b * s * k * c,
            "expert outputs": kept * h * e, "expert inputs": rows * h * e,
            "gelu input": 4 * rows * h // t * e, "mlp c_proj input": 4 * rows * h // t * e}
           if moe else
           {"c_fc input": b * s * h * e, "gelu input": 4 * b * s * h // t * e,
            "mlp c_proj input": 4 * b * s * h // t * e})
    return {"ln_1": ln, "c_attn input": b * s * h * e,
            "qkv": 3 * b * s * h // t * e,
            "core": core_bytes(z),                              # P (+ dropout(P), mask)
            "c_proj input": b * s * h // t * e, "attention dropout mask": drop * b * sl * h * c,
            "ln_2": ln, **mlp, "mlp dropout mask": drop * b * sl * h * c}


ATTENTION_PART = ("ln_1", "c_attn input", "qkv", "core", "c_proj input")


def chunk_bytes(z: Sizes, blocks: int, first: bool, last: bool, recomputed: int = 0,
                selective: bool = False, chunk: int = 1,
                zero_bubble: bool = False, moe: tuple[bool, ...] = ()) -> tuple[int, int, int]:
    """For one micro-batch through a model chunk of `blocks` blocks (the first `recomputed` of
    them fully recomputed in chunks of `chunk`, or every one's attention core with
    selective; moe: which of them have experts): (what it holds after its forward: embedding
    + blocks + final; its peak inside its backward, a chunk's activations recomputed: all of
    its blocks' with its input under full, one block's attention part under selective,
    where that passes the first; what its first block holds between passes). Under
    zero-bubble (zero_bubble) a recomputing moment also holds the deferred weight gradients
    of the blocks whose backward has run: those after it, and under selective its own MLP's
    (the MLP's backward runs before attention's, whose core is recomputed first thing)."""
    moe = tuple(moe) or (False,) * blocks
    terms = [block_terms(z, m) for m in moe]
    full = [sum(one.values()) for one in terms]
    attention = sum(terms[0][k] for k in ATTENTION_PART)          # the same in every block
    kept = [f - one["core"] if selective else f for f, one in zip(full, terms)]
    x = z.b * z.s_local * z.h * z.e                              # a chunk's input
    embed = z.b * z.s_local * z.h * z.c if first and z.dropout else 0      # its dropout mask
    final = (z.b * z.s_local * (z.h * z.e + z.c + z.summa * z.e)      # ln_f
             + z.b * z.s * z.h * z.e + z.b * z.s * z.V // z.t * z.e) if last else 0
    held = [(x if i % chunk == 0 else 0) if i < recomputed else kept[i] for i in range(blocks)]
    one = embed + sum(held) + final
    # zero-bubble: a block's deferred gradients, and its MLP's part of them
    parts = [deferred_parts(z, m) if zero_bubble else (0, 0) for m in moe]
    later, mlp = [sum(one) for one in parts], [one[1] for one in parts]
    moments = [one]
    for lo in range(0, recomputed, chunk):                      # a chunk rerun: n blocks' full
        n = min(chunk, recomputed - lo)
        moments.append(embed + sum(held[:lo]) + x + sum(full[lo:lo + n])
                       + sum(later[lo + n:]))
    for i in range(recomputed, blocks) if selective else ():    # an attention core rerun
        moments.append(embed + sum(held[:i]) + attention + sum(later[i + 1:]) + mlp[i])
    return one, max(moments), held[0] if held else 0


def refgpt_bytes(z: Sizes, blocks: int, first: bool, last: bool, recomputed: int = 0,
                 selective: bool = False, in_flight: int = 1, chunk: int = 1,
                 moe: tuple[bool, ...] = ()) -> dict[str, int]:
    """What ActivationMeter measures on a rank holding a model chunk of `blocks` blocks
    (chunk_bytes), with in_flight micro-batches held at once (gradient accumulation: 1; 1F1B
    on pipeline rank r of p: min(p - r, micro-batches)). "total" is the peak of

        after a forward       in_flight x (embedding + blocks + final) held
        a chunk's backward    in_flight - 1 micro-batches held, and of the oldest: the blocks
                              before the chunk, and the chunk's activations recomputed (full:
                              all of its blocks' with its input; selective: one block's
                              attention part)

    and "layer" what the rank's first block keeps between passes, at the most micro-batches
    in flight (ActivationMeter.layer_peak)."""
    one, backward, layer = chunk_bytes(z, blocks, first, last, recomputed, selective, chunk,
                                       moe=moe)
    return {"total": (in_flight - 1) * one + backward, "layer": in_flight * layer}


def deferred_parts(z: Sizes, moe: bool = False) -> tuple[int, int]:
    """What the zero-bubble schedule's deferred weight gradients of one micro-batch through
    one block hold from its B to its W, (attention's, the MLP's): each linear layer's input
    and output gradient (refgpt.nn.linear), in the stored type: c_attn's input (bsh) and qkv
    gradient (3bsh/t), the attention projection's input (bsh/t) and output gradient (bsh):
    bsh (2 + 4/t); c_fc's input (bsh) and output gradient (4bsh/t), the MLP projection's input
    (4bsh/t) and output gradient (bsh): bsh (2 + 8/t); in a block with experts (moe), the
    experts' two layers hold theirs for the R rows they ran, R h (2 + 8/t)."""
    bsh = z.b * z.s * z.h
    rows = z.routed[2] * z.h if moe else bsh
    return (2 * bsh + 4 * bsh // z.t) * z.e, (2 * rows + 8 * rows // z.t) * z.e


def deferred_bytes(z: Sizes, blocks: int, moe: tuple[bool, ...] = ()) -> int:
    """deferred_parts of a chunk of `blocks` blocks (moe: which have experts): bsh (4 + 12/t)
    a block without experts."""
    return sum(sum(deferred_parts(z, m)) for m in tuple(moe) or (False,) * blocks)


def schedule_bytes(chunks: list[tuple[int, int, int]], ops, deferred=()) -> dict[str, int]:
    """The same for a rank holding several model chunks (chunk_bytes of each, in the rank's
    order) that runs a pipeline schedule's compute ops (refgpt.parallel.schedules: F adds a
    micro-batch's chunk, BW drops it; zero-bubble's B drops it but keeps deferred[chunk]
    bytes until its W): the peak, over the points where ActivationMeter samples, of what the
    chunks in flight hold (after each op; inside a backward, the others and the backward's
    own peak), and the first chunk's first block at the most of its micro-batches in
    flight."""
    count = [0] * len(chunks)
    held = peak = most = 0
    for op in ops:
        one, backward, _ = chunks[op.chunk]
        if op.kind == "F":
            count[op.chunk] += 1
            held += one
        elif op.kind == "W":
            held -= deferred[op.chunk]
        else:
            peak = max(peak, held - one + backward)
            count[op.chunk] -= 1
            held += (deferred[op.chunk] if op.kind == "B" else 0) - one
        peak, most = max(peak, held), max(most, count[0])
    return {"total": peak, "layer": most * chunks[0][2]}


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                      recompute: str = "") -> int:
    """Korthikanti et al.'s activation bytes per transformer layer in 16 bits (Megatron's
    layer, one-byte dropout masks): sbh(34 + 5as/h) with no parallelism, sbh(10 + 24/t +
    5as/(ht)) with tensor parallelism, sbh(34/t + 5as/(ht)) with sequence parallelism as
    well; selective recomputation drops the 5as/h term, full recomputation keeps 2sbh (the
    layer's input)."""
    if recompute == "full":
        return 2 * s * b * h // (t if sp else 1)
    core = 0 if recompute == "selective" else 5 * a * s / (h * t)
    rest = 34 / t if sp else 10 + 24 / t if t > 1 else 34
    return round(s * b * h * (rest + core))
