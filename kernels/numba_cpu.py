"""Numba kernels for CPUs: the ``numba`` backend of refgpt.backend.

Each function here has the name and the contract of a ``@kernel`` reference in refgpt.nn or
refgpt.optim (same arguments, same results up to rounding) and is tested against it in float64
and float32 (tests/test_kernels.py). What they change is the memory traffic, not the math:

* fused element-wise passes. NumPy evaluates ``0.5*x*(1+tanh(c*(x+k*x**3)))`` as about eight
  passes over the array, each reading and writing all of it; a fused kernel reads x once and
  writes y once, with the intermediates in registers. The same holds for LayerNorm (mean,
  variance, normalise and scale per row while the row is in cache), the causal softmax and its
  backward, the cross-entropy with its gradient, and the AdamW update.
* parallelism over rows (or elements) with ``prange``, on numba's thread pool, whose size
  refgpt.parallel.threads sets together with the BLAS threads (the pool is OpenMP's: see
  refgpt.kernels).
* one pool for the whole step: every GEMM runs on numba's threads too, one tile per thread,
  each a single-threaded BLAS call (refgpt.kernels.numba_gemm: matmul, with a layer's bias
  at no extra pass, and add_matmul, which accumulates weight gradients with beta = 1), so no
  call waits for a sleeping thread of another pool to wake.
* attention's batched products skip the causal mask's zeros: they are BLAS calls on blocks
  of queries, in parallel over (batch, head, block) (refgpt.kernels.numba_attention, where
  NumPy's BLAS exposes CBLAS).
* no pass left on one thread: NumPy's own fill, add.at, sums and in-place arithmetic run on
  one core, and between multi-threaded GEMMs each such pass costs as much as several
  kernels (zero_fill, the weight decay inside adamw_update, residual, scatter_add_rows;
  benchmarks/README.md has the figures).

Element-wise math runs in the array's precision: GELU and every exp run in float32 on
float32 arrays, as their NumPy references do (GELU's constants are passed in that precision,
since Python floats would promote it to float64, which has half the SIMD lanes). Reductions
(row sums, means, the fused kernels' column sums) accumulate in float64 and are rounded to
the array's precision before the element-wise math that uses them (LayerNorm's
normalisation, the softmax backward). On float32 arrays row sums may be reassociated (see
"row kernels" below); nothing else is, beyond fused multiply-adds (fastmath "contract").
Every float32 exp is written as arithmetic (refgpt.kernels.numba_exp), so that its loop
vectorises; float64 keeps libm's exp, as NumPy's.

16-bit arrays (bfloat16, float16: refgpt.precision) compute in float32 with their 16-bit
results rounded once. bias+GELU, LayerNorm, the softmax backward and the cross-entropy take
them as 16-bit words and widen and round element by element (refgpt.kernels.numba_half's
value and stored, which for other arrays compile to nothing: one kernel per op); the other
kernels are given widened copies. What stays fp32 (LayerNorm's 1/std, bias and LayerNorm
gradients, dS, the loss) is returned in fp32, as the references do.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .numba_exp import vexp_of
from .numba_half import computed, is_half, narrow, stored, value, widen, words

S2PI = math.sqrt(2.0 / math.pi)
K = 0.044715
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
FLAGS = dict(parallel=True, cache=True, nogil=True)
VECTOR = dict(FLAGS, fastmath={"contract"})     # GELU's loops: fused multiply-adds


# -- GELU ------------------------------------------------------------------------------
def _gelu_constants(dtype):
    """GELU's constants in the array's precision (see the module's docstring): Python floats
    would make the float32 loops compute in float64, with half the SIMD lanes."""
    return tuple(dtype.type(c) for c in (0.5, 1.0, 2.0, 3.0, S2PI, K, INV_SQRT2, INV_SQRT_2PI))


@njit(inline="always")
def _tanh(u, one, two):
    """tanh(u) = 1 - 2 / (1 + exp(2u)): in float32 the exp is arithmetic that vectorises
    (refgpt.kernels.numba_exp; libm's tanh is a call per element, which does not). exp
    overflowing to inf gives 1, underflowing to 0 gives -1, as tanh does."""
    return one - two / (one + vexp_of(two * u))


@njit(inline="always")
def _gelu(x, tanh_form, consts):
    half, one, two, three, s2pi, kappa, inv_sqrt2, inv_sqrt_2pi = consts
    if tanh_form:
        return half * x * (one + _tanh(s2pi * (x + kappa * x * x * x), one, two))
    return half * x * (one + math.erf(x * inv_sqrt2))


@njit(inline="always")
def _gelu_slope(x, tanh_form, consts):
    half, one, two, three, s2pi, kappa, inv_sqrt2, inv_sqrt_2pi = consts
    if tanh_form:
        t = _tanh(s2pi * (x + kappa * x * x * x), one, two)
        return half * (one + t) + half * x * (one - t * t) * s2pi * (one + three * kappa * x * x)
    return half * (one + math.erf(x * inv_sqrt2)) + x * vexp_of(-half * x * x) * inv_sqrt_2pi


@njit(**VECTOR)
def _gelu_fwd(x, y, tanh_form, consts):
    for i in prange(x.size):
        y[i] = _gelu(x[i], tanh_form, consts)


@njit(**VECTOR)
def _gelu_bwd(x, dy, dx, tanh_form, consts):
    for i in prange(x.size):
        dx[i] = dy[i] * _gelu_slope(x[i], tanh_form, consts)


@njit(**VECTOR)
def _bias_gelu_fwd(f, b, y, tanh_form, consts):
    """f + b stored into f (16-bit words: rounded), and GELU of that stored sum into y; b in
    f's compute type (refgpt.kernels.numba_half: value, stored). In 16 bits one pass where
    widening, adding, rounding, widening, GELU and rounding made five."""
    R, C = f.shape
    for r in prange(R):
        for c in range(C):
            h = stored(value(f[r, c]) + b[c], f)
            f[r, c] = h
            y[r, c] = stored(_gelu(value(h), tanh_form, consts), y)


@njit(**VECTOR)
def _bias_gelu_bwd(x, dy, dx, db_parts, tanh_form, consts):
    R, C = x.shape
    chunks = db_parts.shape[0]
    for k in prange(chunks):
        db = db_parts[k]
        for r in range(k * R // chunks, (k + 1) * R // chunks):
            for c in range(C):
                dx[r, c] = dy[r, c] * _gelu_slope(x[r, c], tanh_form, consts)
            for c in range(C):                  # a loop of its own: it vectorises
                db[c] += dx[r, c]


@njit(**VECTOR)
def _bias_gelu_bwd_rounded(x, dy, dx, db_parts, rows, tanh_form, consts):
    """_bias_gelu_bwd for 16-bit words x, dy, dx: db is summed from the fp32 dx before it is
    rounded, so each row's dx is made in its chunk's row of rows first. (One kernel for both
    would give float32 runs that extra pass: 1.5x _bias_gelu_bwd's time on 2 cores.)"""
    R, C = x.shape
    chunks = db_parts.shape[0]
    for k in prange(chunks):
        db = db_parts[k]
        for r in range(k * R // chunks, (k + 1) * R // chunks):
            for c in range(C):
                rows[k, c] = value(dy[r, c]) * _gelu_slope(value(x[r, c]), tanh_form, consts)
            for c in range(C):
                db[c] += rows[k, c]
            for c in range(C):
                dx[r, c] = stored(rows[k, c], dx)


def _grid(a):
    """a as the kernels take it (numba_half.words), 2-D [rows, last axis], C-contiguous."""
    return words(np.ascontiguousarray(a).reshape(-1, a.shape[-1]))


def _computing(a):
    """a in its compute type: a 16-bit array widened to fp32, others as they are."""
    return np.ascontiguousarray(widen(a) if is_half(a) else a)


def _compute_dtype(a):
    return np.dtype(np.float32) if is_half(a) else a.dtype


def gelu_forward(x, kind):
    if is_half(x):
        return narrow(gelu_forward(widen(x), kind), x.dtype)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _gelu_fwd(x.reshape(-1), y.reshape(-1), kind == "tanh", _gelu_constants(x.dtype))
    return y


def gelu_backward(x, dy, kind):
    if is_half(dy):
        return narrow(gelu_backward(widen(x), widen(dy), kind), dy.dtype)
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    dx = np.empty_like(dy)
    _gelu_bwd(x.reshape(-1), dy.reshape(-1), dx.reshape(-1), kind == "tanh",
              _gelu_constants(dx.dtype))
    return dx


def bias_gelu_forward(f, b, kind):
    if not f.flags.c_contiguous:
        raise ValueError("bias_gelu_forward adds the bias in place to a C-contiguous array")
    y = np.empty_like(f)
    _bias_gelu_fwd(_grid(f), _computing(b), _grid(y), kind == "tanh",
                   _gelu_constants(_compute_dtype(f)))
    return y


def bias_gelu_backward(x, dy, kind):
    if is_half(dy) and x.dtype != dy.dtype:     # dx rounded, db in fp32
        dx, db = bias_gelu_backward(widen(x), widen(dy), kind)
        return narrow(dx, dy.dtype), db
    C, kind_of = x.shape[-1], _compute_dtype(dy)
    dx = np.empty(dy.shape, dy.dtype)
    x2 = _grid(x)
    db = _column_parts(x2)
    if is_half(dy):
        rows = np.empty((db.shape[0], C), kind_of)
        _bias_gelu_bwd_rounded(x2, _grid(dy), _grid(dx), db, rows, kind == "tanh",
                               _gelu_constants(kind_of))
    else:
        _bias_gelu_bwd(x2, _grid(dy), _grid(dx), db, kind == "tanh", _gelu_constants(kind_of))
    return dx, db.sum(axis=0).astype(kind_of)


def _column_parts(a2, dtype=np.float64):
    """Zeroed partial column sums of a2 [R, C], one row per parallel chunk of rows."""
    return np.zeros((min(numba.get_num_threads(), a2.shape[0]) or 1, a2.shape[1]), dtype)


@njit(**FLAGS)
def _column_sum(a, parts):
    R, C = a.shape
    chunks = parts.shape[0]
    for k in prange(chunks):
        for r in range(k * R // chunks, (k + 1) * R // chunks):
            for c in range(C):
                parts[k, c] += a[r, c]


def column_sum(a):
    """A bias's gradient: partial sums of chunks of rows on numba's threads, then their sum
    (NumPy's a.sum(axis=0) runs on one core). In the array's precision, as NumPy's sum over
    rows (float64 partials cost time and give NumPy's result no better); fp32 for 16 bits."""
    if is_half(a):
        return column_sum(widen(a))
    if a.ndim != 2 or a.strides[1] != a.itemsize:
        return a.sum(axis=0)
    parts = _column_parts(a, a.dtype)
    _column_sum(a, parts)
    return parts.sum(axis=0)


# -- row kernels (LayerNorm, softmax, cross-entropy) -------------------------------------
# Their sums along a row accumulate in float64. On float32 arrays they may be reassociated
# (fastmath "reassoc"): LLVM then keeps a few vector-wide partial sums and the loop
# vectorises, where a strict left-to-right sum waits on each add; the last bits then depend
# on the instruction set's vector width. On float64 arrays, the precision runs are validated
# in, the sums stay left to right, the same on every machine. (Reassociated float64 sums also
# moved a 3-D layout's parameters, after three AdamW steps, further from the single process:
# 2.7e-12 of the largest against 6.1e-13, past the 1e-12 that mpi_tests/test_pipeline.py
# allows.) The exp they call is compiled on its own, without these flags: reassociation
# would undo its rounding trick (refgpt.kernels.numba_exp; a test checks it).
# Rows are indexed in place, a[r, j], rather than passed as views a[r]: a view per row costs
# as much as the row's arithmetic.
def _rows(fn):
    """fn compiled twice: reassociating sums for float32 arrays (and 16-bit words, which
    compute in float32), strict ones otherwise. The two share numba's cache file, told apart
    by their signatures."""
    fast = njit(**FLAGS, fastmath={"contract", "reassoc"})(fn)
    strict = njit(**FLAGS)(fn)

    def run(*args):
        return (fast if args[0].dtype in FAST else strict)(*args)
    return run


FAST = (np.float32, np.uint16, np.int16)        # float32, and 16-bit words computed in it


@_rows
def _ln_fwd(x, g, b, eps, y, n, rstd):
    """x read, y and n stored through numba_half's value and stored (16-bit words widened as
    read, rounded as written: no widened copies); g, b, rstd in the compute type."""
    R, C = x.shape
    for r in prange(R):
        mu = 0.0
        for c in range(C):
            mu += value(x[r, c])
        mu /= C
        var = 0.0
        for c in range(C):
            d = value(x[r, c]) - mu
            var += d * d
        rs = 1.0 / math.sqrt(var / C + eps)
        rstd[r] = rs
        muf, rsf = computed(mu, x), computed(rs, x)             # the row's math in x's precision
        for c in range(C):
            nc = (value(x[r, c]) - muf) * rsf
            n[r, c] = stored(nc, n)
            y[r, c] = stored(nc * g[c] + b[c], y)


@_rows
def _ln_bwd(dy, n, rstd, g, dx, dg_parts, db_parts):
    R, C = dy.shape
    chunks = dg_parts.shape[0]
    for k in prange(chunks):
        for r in range(k * R // chunks, (k + 1) * R // chunks):
            mdn, mdnn = 0.0, 0.0                           # means of dn = dy g and of dn n
            for c in range(C):
                dn = value(dy[r, c]) * g[c]
                mdn += dn
                mdnn += dn * value(n[r, c])
            mdnf, mdnnf = computed(mdn / C, dy), computed(mdnn / C, dy)
            for c in range(C):
                d, nc = value(dy[r, c]), value(n[r, c])
                dx[r, c] = stored(rstd[r] * (d * g[c] - mdnf - nc * mdnnf), dx)
                dg_parts[k, c] += d * nc
                db_parts[k, c] += d


def layernorm_forward(x, g, b, eps):
    if is_half(x) and not g.dtype == b.dtype == x.dtype:
        y, n, rstd = layernorm_forward(widen(x), widen(g), widen(b), eps)
        return narrow(y, x.dtype), narrow(n, x.dtype), rstd
    shape = x.shape                     # 16 bits: y and n rounded, rstd in fp32
    y, n = np.empty(shape, x.dtype), np.empty(shape, x.dtype)
    rstd = np.empty(x.size // shape[-1], _compute_dtype(x))
    _ln_fwd(_grid(x), _computing(g), _computing(b), eps, _grid(y), _grid(n), rstd)
    return y, n, rstd.reshape(*shape[:-1], 1)


def layernorm_backward(dy, n, rstd, g):
    if is_half(dy) and not (n.dtype == g.dtype == dy.dtype and rstd.dtype == np.float32):
        dx, dg, db = layernorm_backward(widen(dy), widen(n), rstd, widen(g))
        return narrow(dx, dy.dtype), dg, db
    kind = _compute_dtype(dy)                       # 16 bits: dx rounded, dg and db in fp32
    dy2 = _grid(dy)
    dg, db = _column_parts(dy2), _column_parts(dy2)
    dx = np.empty(dy.shape, dy.dtype)
    _ln_bwd(dy2, _grid(n), np.ascontiguousarray(rstd).reshape(-1), _computing(g), _grid(dx),
            dg, db)
    return dx, dg.sum(axis=0).astype(kind), db.sum(axis=0).astype(kind)


# -- softmax rows (attention's and the cross-entropy's) -------------------------------------
@njit(inline="always")
def _row_max(x, r, n):
    mx = x[r, 0]
    for j in range(1, n):
        mx = max(mx, x[r, j])
    return mx


@njit(inline="always")
def _softmax_row(x, out, r, n):
    """out[r, :n] = softmax(x[r, :n]) (out may be x); returns (max, sum of exp(x - max)).
    Four loops, three of which vectorise: the max, exp in x's own precision (vexp_of), the
    sum, the scaling."""
    mx = _row_max(x, r, n)
    for j in range(n):
        out[r, j] = vexp_of(x[r, j] - mx)
    total = 0.0
    for j in range(n):
        total += out[r, j]
    inv = out.dtype.type(1.0 / total)
    for j in range(n):
        out[r, j] *= inv
    return mx, total


@_rows
def _causal_softmax(s, T, p0):
    R, Tk = s.shape
    for r in prange(R):
        last = min(p0 + r % T, Tk - 1)                 # keys 0..last are visible
        _softmax_row(s, s, r, last + 1)
        for j in range(last + 1, Tk):
            s[r, j] = 0.0


@_rows
def _softmax_bwd(p, dp, ds):
    """p read through numba_half's value (16-bit words widened as read); dp, ds in its
    compute type."""
    R, C = p.shape
    for r in prange(R):
        dot = 0.0
        for c in range(C):
            dot += dp[r, c] * value(p[r, c])
        dotf = computed(dot, p)
        for c in range(C):
            ds[r, c] = value(p[r, c]) * (dp[r, c] - dotf)


def causal_softmax(s, p0):
    T, Tk = s.shape[-2:]
    if not s.flags.c_contiguous:
        raise ValueError("causal_softmax works in place on a C-contiguous array")
    _causal_softmax(s.reshape(-1, Tk), T, p0)
    return s


def softmax_backward(p, dp):
    if is_half(dp) or is_half(p) and dp.dtype != np.float32:   # dS in fp32
        return softmax_backward(*(widen(a) if is_half(a) else a for a in (p, dp)))
    C = p.shape[-1]                     # (16-bit p: its words, widened as they are read)
    dp2 = np.ascontiguousarray(dp).reshape(-1, C)
    ds = np.empty_like(dp2)
    _softmax_bwd(_grid(p), dp2, ds)
    return ds.reshape(dp.shape)


# -- cross-entropy ----------------------------------------------------------------------
@njit(inline="always")
def _cross_entropy_row(z, r, V, yr, scale, grad):
    """Row r's loss; with grad, dz = (softmax - onehot) * scale written over the row
    (refgpt.nn.loss): the softmax in place, then a pass that scales it by 1 / norm (two
    roundings, as the reference's e / s and / norm), the padding zeroed. Without grad the
    row is only read: its max and its sum of exponentials."""
    zy = z[r, yr]                                          # read before the row is overwritten
    if grad:
        mx, total = _softmax_row(z, z, r, V)
        for j in range(V):
            z[r, j] *= scale
        z[r, yr] -= scale
        for j in range(V, z.shape[1]):
            z[r, j] = 0.0
    else:
        mx = _row_max(z, r, V)
        total = 0.0
        for j in range(V):
            total += vexp_of(z[r, j] - mx)
    return mx + math.log(total) - zy


@_rows
def _cross_entropy(z, V, y, scale, grad, losses):
    """Per row, in place (_cross_entropy_row)."""
    for r in prange(z.shape[0]):
        losses[r] = _cross_entropy_row(z, r, V, y[r], scale, grad)


@njit(**FLAGS, fastmath={"contract", "reassoc"})
def _cross_entropy_words(z, V, y, scale, grad, losses, rows):
    """_cross_entropy of 16-bit logits (z: their words, numba_half.words), row by row in
    fp32: each row widened into its thread's row of rows, computed there as a float32 row
    is, and with grad rounded back into z. No fp32 copy of the logits (the largest array of
    a step) is made."""
    for r in prange(z.shape[0]):
        t = numba.get_thread_id()
        for j in range(z.shape[1]):
            rows[t, j] = value(z[r, j])
        losses[r] = _cross_entropy_row(rows, t, V, y[r], scale, grad)
        if grad:
            for j in range(z.shape[1]):
                z[r, j] = stored(rows[t, j], z)


def cross_entropy(z, V, y, norm, grad):
    if z.strides[1] != z.itemsize:
        raise ValueError("cross_entropy needs rows of contiguous logits")
    losses = np.empty(z.shape[0])                                # float64
    y = np.ascontiguousarray(y)
    if is_half(z):                  # the loss in fp32, the gradient rounded into z
        rows = np.empty((numba.config.NUMBA_NUM_THREADS, z.shape[1]), np.float32)
        _cross_entropy_words(words(z), V, y, np.float32(1.0 / norm), bool(grad), losses, rows)
    else:
        _cross_entropy(z, V, y, z.dtype.type(1.0 / norm), bool(grad), losses)
    return float(losses.sum())


# -- AdamW ------------------------------------------------------------------------------
@njit(**FLAGS)
def _adamw(p, g, m, v, lr, b1, b2, eps, bc1, bc2, keep):
    one = p.dtype.type(1.0)
    step, rbc2 = lr / bc1, one / math.sqrt(bc2)
    for i in prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * keep - step * (mi / (math.sqrt(vi) * rbc2 + eps))


def adamw_update(p, g, m, v, lr, b1, b2, eps, bc1, bc2, keep=1.0):
    """The scalars in the parameters' precision, as NumPy's reference computes (float64
    scalars would make the float32 update compute in float64). The weight decay is the same
    pass: as a NumPy pass of its own it ran on one core."""
    f = p.dtype.type
    _adamw(p, g, m, v, f(lr), f(b1), f(b2), f(eps), f(bc1), f(bc2), f(keep))


# -- the gradient norm's sum of squares ----------------------------------------------------
@njit(**FLAGS)
def _chunk_squares(flat, chunk, out):
    """out[c] = sum of flat[j]^2 over chunk c, in float64, four interleaved partial sums (so
    the loop is not one long chain of dependent adds); the same bits on any thread count."""
    n = flat.size
    for c in prange(out.size):
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        s = np.zeros(4)
        for j in range(lo, hi - (hi - lo) % 4, 4):
            for k in range(4):
                v = np.float64(flat[j + k])
                s[k] += v * v
        for j in range(hi - (hi - lo) % 4, hi):
            v = np.float64(flat[j])
            s[0] += v * v
        out[c] = (s[0] + s[1]) + (s[2] + s[3])


def sum_squares(a):
    """The reference converts each chunk to float64 and takes its dot product on one core.
    Here chunks of 2^16 elements (many, so the threads share them evenly) are summed on
    numba's threads, and their sums added in order: float64 sums of squares in another order,
    equal to the reference's to rounding."""
    flat = a.reshape(-1)
    if flat.dtype not in (np.float32, np.float64):
        return NotImplemented
    sums = np.empty(-(-flat.size // (1 << 16)))
    _chunk_squares(flat, 1 << 16, sums)
    total = 0.0
    for s in sums:
        total += float(s)
    return total


# -- the embedding's scatter-add ----------------------------------------------------------
@njit(**FLAGS)
def _scatter_add_rows(table, idx, rows):
    """Threads take blocks of columns, so no two write the same element; within a column
    the rows are added in index order, as np.add.at adds them."""
    C = rows.shape[1]
    for blk in prange((C + 63) // 64):
        for i in range(idx.size):
            t = idx[i]
            for c in range(blk * 64, min(C, blk * 64 + 64)):
                table[t, c] += rows[i, c]


def scatter_add_rows(table, idx, rows):
    """NumPy's add.at is a generic, unbuffered loop, on one core. 16-bit rows: widened; a
    16-bit table (--grad-reduce-in-bf16) gets its sums in fp32, rounded once into it (the
    reference rounds after each add: the two agree within an ulp per repeated id)."""
    if is_half(table):
        wide = widen(table)
        scatter_add_rows(wide, idx, rows)
        narrow(wide, table.dtype, out=table)
        return
    if is_half(rows):
        rows = widen(rows)
    if table.ndim != 2 or rows.ndim != 2 or table.dtype != rows.dtype:
        np.add.at(table, idx, rows)
        return
    _scatter_add_rows(table, np.ascontiguousarray(idx, dtype=np.int64), rows)


# -- the residual connections' sums ------------------------------------------------------
@njit(**FLAGS)
def _add(a, b, out):
    for i in prange(a.size):
        out[i] = a[i] + b[i]


def residual(x, branch):
    """x + branch on numba's threads (NumPy's add runs on one core); 16 bits: rounded once."""
    if is_half(x) and x.dtype == branch.dtype:
        return narrow(residual(widen(x), widen(branch)), x.dtype)
    if (x.shape != branch.shape or x.dtype != branch.dtype or not x.flags.c_contiguous
            or not branch.flags.c_contiguous):
        return x + branch
    out = np.empty_like(x)
    _add(x.reshape(-1), branch.reshape(-1), out.reshape(-1))
    return out


# -- zeroing ----------------------------------------------------------------------------
@njit(**FLAGS)
def _zero(a):
    for i in prange(a.size):
        a[i] = 0


def zero_fill(a):
    if is_half(a):                              # zero is zero in every type: as 16-bit words
        a = a.view(np.uint16)
    if a.flags.c_contiguous:
        _zero(a.reshape(-1))
    else:
        a[...] = 0


# -- the data-parallel gradient sum through shared memory ---------------------------------
@njit(**FLAGS)
def _sum_rows(rows, lo, hi, out, block):
    for k in prange((hi - lo + block - 1) // block):
        a = lo + k * block
        b = min(a + block, hi)
        acc = rows[0, a:b].copy()
        for r in range(1, rows.shape[0]):
            acc += rows[r, a:b]
        out[a - lo:b - lo] = acc


def sum_rows(rows, lo, hi, out):
    """The node's gradient rows summed in rank order (as the reference, so the same bits),
    blocks of columns on numba's threads, so a rank with several threads reads its shard of
    the other rows that many times as fast. On whole rows: slices of them vectorise, where
    element loops indexing rows[r, a + j] did not."""
    if not (rows.flags.c_contiguous and out.flags.c_contiguous):
        return NotImplemented
    _sum_rows(rows, lo, hi, out, 1 << 14)


def compiled_for(dtype) -> bool:
    """Whether this process holds these kernels' machine code for arrays of dtype (compiled
    here, or loaded from numba's cache): the residual's sum, which every step calls, stands
    for them."""
    kind = numba.from_dtype(np.dtype(dtype))
    return any(sig[0].dtype == kind for sig in _add.signatures)
