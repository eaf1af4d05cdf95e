"""CuPy kernels for NVIDIA GPUs: the ``cupy`` backend of refgpt.backend.

Under this backend every array of the model is a CuPy array, and most references in
refgpt.nn run unchanged: NumPy hands ``np.tanh(x)``, ``x.mean(...)``, ``a @ b`` or
``np.stack`` on CuPy arrays to CuPy (NEP 13/18 dispatch), and matmul goes to cuBLAS. This file
replaces only what that cannot cover or does badly:

* fused element-wise kernels (``cupy.ElementwiseKernel``, one CUDA thread per element): GELU
  forward and backward (with c_fc's bias added in the forward's pass) and the AdamW update,
  which NumPy-style code runs as many passes, each a kernel launch reading and writing the
  whole array;
* fused row kernels (``cupy.RawModule``, one thread block per row, the row's max and sums
  reduced in shared memory, sums in float64): LayerNorm forward and its backward, the
  causal softmax (in place), the
  softmax backward, and the cross-entropy (the row's max and sum of exponentials in one
  pass, as a running pair per thread, then the gradient written over the logits in a
  second). The softmax rows are held in registers, so each is read once;
* column sums (the gradients of biases, LayerNorm's gain and bias) in float64 over blocks of
  rows, each thread one column (CuPy's own sum over axis 0 is far from the memory's speed);
* attention as one fused pair of kernels that never stores a T x Tk matrix
  (refgpt.kernels.cupy_flash), and, where that path does not apply (attention dropout, the
  probabilities recorded), its causal products as cuBLAS GEMMs on blocks of rows that skip
  what the causal mask hides (refgpt.kernels.cupy_attention);
* the reference that calls a NumPy-only function (``np.add.at``: cupy.add.at here).

16-bit arrays (bfloat16, float16: refgpt.precision): the row kernels are templates over the
stored type and the wide type, reading 16-bit values into fp32 (double for their row sums)
and rounding each 16-bit result once; what stays fp32 (LayerNorm's 1/std, bias and LayerNorm
gradients, dS, the loss) is written in fp32, as the references do. The element-wise kernels
of a 16-bit run (GELU, bias + GELU, the residual add) are refgpt.kernels.cupy_half's.

Each is tested against its reference (tests/test_cupy.py, skipped where no GPU exists).
"""

from __future__ import annotations

import math

import cupy as cp

from .cupy_half import SOURCE, Elementwise, ctype, is_half, narrow, wide_dtype, widen

_GELU = """
template <typename T> __device__ T gelu_value(T x, bool tanh_form) {
    T g = tanh_form ? tanh((T)0.7978845608028654 * (x + (T)0.044715 * x * x * x))
                    : erf(x * (T)0.7071067811865476);
    return (T)0.5 * x * ((T)1 + g);
}
template <typename T> __device__ T gelu_slope(T x, bool tanh_form) {
    if (tanh_form) {
        T t = tanh((T)0.7978845608028654 * (x + (T)0.044715 * x * x * x));
        return (T)0.5 * ((T)1 + t) + (T)0.5 * x * ((T)1 - t * t) * (T)0.7978845608028654
               * ((T)1 + (T)(3.0 * 0.044715) * x * x);
    }
    return (T)0.5 * ((T)1 + erf(x * (T)0.7071067811865476))
           + x * exp((T)-0.5 * x * x) * (T)0.3989422804014327;
}
"""
_GELU_FWD = cp.ElementwiseKernel("T x, bool tanh_form", "T y", "y = gelu_value(x, tanh_form);",
                                 "refgpt_gelu_forward", preamble=_GELU)
_GELU_BWD = cp.ElementwiseKernel("T x, T dy, bool tanh_form", "T dx",
                                 "dx = dy * gelu_slope(x, tanh_form);",
                                 "refgpt_gelu_backward", preamble=_GELU)
_BIAS_GELU_FWD = cp.ElementwiseKernel("T b, bool tanh_form", "T f, T y",
                                      "f = f + b; y = gelu_value(f, tanh_form);",
                                      "refgpt_bias_gelu_forward", preamble=_GELU)

_ADAMW = cp.ElementwiseKernel(
    "T g, float64 step, float64 b1, float64 b2, float64 eps, float64 rbc2, float64 keep",
    "T p, T m, T v",
    """
    double mi = b1 * m + (1.0 - b1) * g;
    double vi = b2 * v + (1.0 - b2) * ((double)g * g);
    m = (T)mi;
    v = (T)vi;
    p = (T)((T)(p * (T)keep) - step * (mi / (sqrt(vi) * rbc2 + eps)));
    """, "refgpt_adamw")


# (stored type, wide type) of the row kernels' instances: 16-bit arrays keep fp32 results
_TYPES = [("float", "float"), ("double", "double"), ("bf16", "float"), ("f16", "float")]

_ROWS = cp.RawModule(code=SOURCE + r"""
template <typename T>
__device__ double block_sum(double v, double* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];
        __syncthreads();
    }
    double total = buf[0];
    __syncthreads();
    return total;
}

template <typename T>
__device__ double block_max(double v, double* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) buf[threadIdx.x] = fmax(buf[threadIdx.x], buf[threadIdx.x + k]);
        __syncthreads();
    }
    double m = buf[0];
    __syncthreads();
    return m;
}

// A row of up to ROW_ITEMS * blockDim.x entries lives in registers, ROW_ITEMS per thread,
// so the row softmax and its backward read each input once.
#define ROW_ITEMS 8

template <typename T>
__global__ void causal_softmax(T* s, int T_, int Tk, int p0) {
    __shared__ double buf[1024];
    T* sr = s + (size_t)blockIdx.x * Tk;
    int last = min(p0 + (int)(blockIdx.x % T_), Tk - 1);       // keys 0..last are visible
    T v[ROW_ITEMS];
    double m = -1.0e308;
    #pragma unroll
    for (int i = 0; i < ROW_ITEMS; ++i) {
        int j = threadIdx.x + i * blockDim.x;
        v[i] = j <= last ? sr[j] : (T)0;
        if (j <= last) m = fmax(m, (double)v[i]);
    }
    T mx = (T)block_max<T>(m, buf);                    // one of the row's values: exact in T
    double total = 0.0;
    #pragma unroll
    for (int i = 0; i < ROW_ITEMS; ++i) {
        int j = threadIdx.x + i * blockDim.x;
        v[i] = j <= last ? exp(v[i] - mx) : (T)0;
        total += v[i];
    }
    T inv = (T)(1.0 / block_sum<T>(total, buf));
    #pragma unroll
    for (int i = 0; i < ROW_ITEMS; ++i) {
        int j = threadIdx.x + i * blockDim.x;
        if (j < Tk) sr[j] = v[i] * inv;
    }
}

template <typename T, typename W>
__global__ void cross_entropy(T* z, long long ldz, int V, int Vp, const long long* y,
                              double inv_norm, int grad, double* loss) {
    // one block per row; each thread keeps a running (max m, sum of exp(z - m)) over its
    // columns (one exp per element), then the block combines the pairs in shared memory.
    // With grad, the row is overwritten with (softmax - onehot(y)) * inv_norm, 0 on the
    // padding (columns V..Vp-1); the target's logit is read before that.
    __shared__ double bm[256], bs[256];
    __shared__ W zy;
    T* zr = z + (size_t)blockIdx.x * ldz;
    int target = (int)y[blockIdx.x];
    if (threadIdx.x == 0) zy = ld(zr[target]);
    double m = -1.0e308, s = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        double v = ld(zr[j]);
        if (v > m) { s = s * exp(m - v) + 1.0; m = v; } else s += exp((W)(v - m));
    }
    bm[threadIdx.x] = m; bs[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            double m1 = bm[threadIdx.x], m2 = bm[threadIdx.x + k], mx = fmax(m1, m2);
            double s1 = bs[threadIdx.x], s2 = bs[threadIdx.x + k];   // 0: no columns seen
            bs[threadIdx.x] = (s1 > 0.0 ? s1 * exp(m1 - mx) : 0.0) + (s2 > 0.0 ? s2 * exp(m2 - mx) : 0.0);
            bm[threadIdx.x] = mx;
        }
        __syncthreads();
    }
    W mx = (W)bm[0];
    double total = bs[0];
    if (threadIdx.x == 0) loss[blockIdx.x] = (double)mx + log(total) - (double)zy;
    if (!grad) return;
    W inv = (W)(1.0 / total);
    for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
        double p = j < V ? (double)(W)(exp(ld(zr[j]) - mx) * inv) : 0.0;
        zr[j] = st<T>((j == target ? p - 1.0 : p) * inv_norm);
    }
}

template <typename P, typename T>
__global__ void softmax_backward(const P* p, const T* dp, T* ds, int C) {
    __shared__ double buf[1024];
    size_t row = (size_t)blockIdx.x * C;
    double pv[ROW_ITEMS], dv[ROW_ITEMS];
    double s = 0.0;
    #pragma unroll
    for (int i = 0; i < ROW_ITEMS; ++i) {
        int c = threadIdx.x + i * blockDim.x;
        pv[i] = c < C ? (double)ld(p[row + c]) : 0.0;
        dv[i] = pv[i] != 0.0 ? (double)dp[row + c] : 0.0;    // dp is not read where p is 0
        s += pv[i] * dv[i];
    }
    double dot = block_sum<T>(s, buf);
    #pragma unroll
    for (int i = 0; i < ROW_ITEMS; ++i) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < C) ds[row + c] = (T)(pv[i] * (dv[i] - dot));
    }
}

template <typename T>
__global__ void column_sums(const T* a, const T* b, int product, int R, int C, int rows,
                            double* parts) {
    // parts[k, c] = sum of a[r, c] (times b[r, c] if product) over rows k*rows .. (k+1)*rows-1
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (int r = blockIdx.y * rows; r < min(R, (int)(blockIdx.y + 1) * rows); ++r) {
        size_t i = (size_t)r * C + c;
        s += product ? (double)ld(a[i]) * ld(b[i]) : (double)ld(a[i]);
    }
    parts[(size_t)blockIdx.y * C + c] = s;
}

template <typename T, typename W>
__global__ void ln_forward(const T* x, const T* g, const T* b, double eps, T* y, T* n,
                           W* rstd, int C) {
    __shared__ double buf[1024];
    const T* xr = x + (size_t)blockIdx.x * C;
    double s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += ld(xr[c]);
    double mu = block_sum<T>(s, buf) / C;
    s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { double d = ld(xr[c]) - mu; s += d * d; }
    double rs = 1.0 / sqrt(block_sum<T>(s, buf) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double nc = (ld(xr[c]) - mu) * rs;
        n[(size_t)blockIdx.x * C + c] = st<T>(nc);
        y[(size_t)blockIdx.x * C + c] = st<T>(nc * ld(g[c]) + ld(b[c]));
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = st<W>(rs);
}

template <typename T, typename W>
__global__ void ln_backward_dx(const T* dy, const T* n, const W* rstd, const T* g, T* dx,
                               int C) {
    __shared__ double buf[1024];
    size_t row = (size_t)blockIdx.x * C;
    double s1 = 0.0, s2 = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double dn = (double)ld(dy[row + c]) * ld(g[c]);
        s1 += dn;
        s2 += dn * ld(n[row + c]);
    }
    double mdn = block_sum<T>(s1, buf) / C, mdnn = block_sum<T>(s2, buf) / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double dn = (double)ld(dy[row + c]) * ld(g[c]);
        dx[row + c] = st<T>(rstd[blockIdx.x] * (dn - mdn - ld(n[row + c]) * mdnn));
    }
}
""", name_expressions=[f"{k}<{t}>" for k in ("causal_softmax",) for t in ("float", "double")]
    + [f"column_sums<{t}>" for t, _ in _TYPES]
    + [f"{k}<{t}, {w}>" for k in ("ln_forward", "ln_backward_dx", "cross_entropy",
                                  "softmax_backward") for t, w in _TYPES])


def _row_threads(n):
    """Threads for a row kernel over rows of n entries: the power of two (64 to 1024, as the
    block reductions need) that holds the row in registers, ROW_ITEMS = 8 per thread."""
    if n > 8 * 1024:
        raise ValueError(f"rows of {n} entries exceed the row kernels' limit of 8192")
    return max(64, 1 << (max(1, -(-n // 8)) - 1).bit_length())


def column_sum(a2, b2=None):
    """a2 [R, C] (times b2 if given) summed over the rows, in float64 partial sums over
    blocks of rows (CuPy's own sum over axis 0 is far from the memory's speed); fp32 for
    16 bits."""
    R, C = a2.shape
    rows = max(1, -(-R // 128))
    chunks = max(1, -(-R // rows))
    parts = cp.zeros((chunks, C), cp.float64)
    kern = _ROWS.get_function(f"column_sums<{ctype(a2.dtype)}>")
    a2 = cp.ascontiguousarray(a2)
    b2 = a2 if b2 is None else cp.ascontiguousarray(b2)
    kern((-(-C // 256), chunks), (256,), (a2, b2, cp.int32(b2 is not a2), cp.int32(R),
                                          cp.int32(C), cp.int32(rows), parts))
    return parts.sum(axis=0).astype(wide_dtype(a2.dtype))


def _types(dtype) -> str:
    """The template arguments of a row kernel for arrays of dtype."""
    return f"{ctype(dtype)}, {ctype(wide_dtype(dtype))}"


def layernorm_forward(x, g, b, eps):
    shape, C = x.shape, x.shape[-1]
    x2 = cp.ascontiguousarray(x).reshape(-1, C)
    y, n = cp.empty_like(x2), cp.empty_like(x2)
    rstd = cp.empty(x2.shape[0], wide_dtype(x.dtype))
    kern = _ROWS.get_function(f"ln_forward<{_types(x.dtype)}>")
    kern((x2.shape[0],), (256,), (x2, cp.ascontiguousarray(g), cp.ascontiguousarray(b),
                                  cp.float64(eps), y, n, rstd, cp.int32(C)))
    return y.reshape(shape), n.reshape(shape), rstd.reshape(*shape[:-1], 1)


def layernorm_backward(dy, n, rstd, g):
    shape, C = dy.shape, dy.shape[-1]
    dy2, n2 = cp.ascontiguousarray(dy).reshape(-1, C), cp.ascontiguousarray(n).reshape(-1, C)
    dx = cp.empty_like(dy2)
    kern = _ROWS.get_function(f"ln_backward_dx<{_types(dy.dtype)}>")
    kern((dy2.shape[0],), (256,), (dy2, n2, cp.ascontiguousarray(rstd), cp.ascontiguousarray(g),
                                   dx, cp.int32(C)))
    return dx.reshape(shape), column_sum(dy2, n2), column_sum(dy2)


_HALF = Elementwise(_GELU)          # the 16-bit element-wise kernels (compiled on first use)


def gelu_forward(x, kind):
    if is_half(x):
        return _HALF.gelu_forward(x, kind == "tanh")
    return _GELU_FWD(x, kind == "tanh")


def gelu_backward(x, dy, kind):
    if is_half(dy):
        return _HALF.gelu_backward(x, dy, kind == "tanh", dy.dtype)
    return _GELU_BWD(x, dy, kind == "tanh")


def bias_gelu_forward(f, b, kind):
    if is_half(f):
        return _HALF.bias_gelu_forward(f, b, kind == "tanh")
    y = cp.empty_like(f)
    _BIAS_GELU_FWD(b, kind == "tanh", f, y)
    return y


def bias_gelu_backward(x, dy, kind):
    if is_half(dy):                 # db summed from the fp32 dx, dx rounded once
        dx = _HALF.gelu_backward(x, dy, kind == "tanh", cp.float32)
        return narrow(dx, dy.dtype), column_sum(dx.reshape(-1, dx.shape[-1]))
    dx = _GELU_BWD(x, dy, kind == "tanh")
    return dx, column_sum(dx.reshape(-1, dx.shape[-1]))


def residual(x, branch):
    """x + branch rounded once, in one pass (16 bits; float32 and float64 decline: NumPy's
    add on CuPy arrays is already one kernel)."""
    if not (is_half(x) and branch.dtype == x.dtype and branch.shape == x.shape):
        return NotImplemented
    return _HALF.residual(x, branch)


def adamw_update(p, g, m, v, lr, b1, b2, eps, bc1, bc2, keep=1.0):
    _ADAMW(g, lr / bc1, b1, b2, eps, 1.0 / math.sqrt(bc2), keep, p, m, v)


def causal_softmax(s, p0):
    T, Tk = s.shape[-2:]
    if not s.flags.c_contiguous:
        raise ValueError("causal_softmax works in place on a C-contiguous array")
    kern = _ROWS.get_function(f"causal_softmax<{ctype(s.dtype)}>")
    kern((s.size // Tk,), (_row_threads(Tk),), (s, cp.int32(T), cp.int32(Tk), cp.int32(p0)))
    return s


def softmax_backward(p, dp):
    if is_half(dp):                 # dS is fp32: from a 16-bit P, with an fp32 dP
        dp = widen(dp)
    C = p.shape[-1]
    p2, dp2 = cp.ascontiguousarray(p).reshape(-1, C), cp.ascontiguousarray(dp).reshape(-1, C)
    ds = cp.empty_like(dp2)
    kern = _ROWS.get_function(f"softmax_backward<{ctype(p.dtype)}, {ctype(dp.dtype)}>")
    kern((p2.shape[0],), (_row_threads(C),), (p2, dp2, ds, cp.int32(C)))
    return ds.reshape(dp.shape)


def cross_entropy(z, V, y, norm, grad):
    N = z.shape[0]
    if z.strides[1] != z.itemsize:
        raise ValueError("cross_entropy needs rows of contiguous logits")
    losses = cp.empty(N, cp.float64)
    kern = _ROWS.get_function(f"cross_entropy<{_types(z.dtype)}>")
    kern((N,), (256,), (z, cp.int64(z.strides[0] // z.itemsize), cp.int32(V),
                        cp.int32(z.shape[1]), cp.ascontiguousarray(y, dtype=cp.int64),
                        cp.float64(1.0 / norm),
                        cp.int32(bool(grad)), losses))
    return float(losses.sum())


# One thread per (run of equal ids, column): it adds the run's rows in their index order,
# as np.add.at does, so the sums are NumPy's bit for bit and the same on every run (cupy.add.at
# is atomicAdd: its order, and so its last bits, change from run to run).
_ADD_RUNS = cp.ElementwiseKernel(
    "raw T rows, raw int64 order, raw int64 ids, raw int64 start, int64 C",
    "raw T table",
    """
    const long long run = i / C, c = i % C;
    const long long t = ids[order[start[run]]];
    T acc = table[t * C + c];
    for (long long j = start[run]; j < start[run + 1]; ++j) acc += rows[order[j] * C + c];
    table[t * C + c] = acc;
    """, "refgpt_add_runs")


def scatter_add_rows(table, idx, rows):
    """table[idx[i]] += rows[i], deterministically (_ADD_RUNS): the rows sorted by id (a stable
    sort keeps equal ids in index order), one thread per run of equal ids and column. 16-bit
    rows are widened; a 16-bit table (--grad-reduce-in-bf16) gets its sums in fp32, rounded
    once into it (as the numba kernel)."""
    if is_half(table):
        wide = widen(table)
        scatter_add_rows(wide, idx, rows)
        narrow(wide, table.dtype, out=table)
        return
    rows = cp.ascontiguousarray(widen(rows) if is_half(rows) else rows, dtype=table.dtype)
    if not table.flags.c_contiguous or rows.ndim != 2 or table.shape[1] != rows.shape[1]:
        raise ValueError("scatter_add_rows needs a C-contiguous table and rows of its width")
    ids = cp.ascontiguousarray(idx, dtype=cp.int64).ravel()
    if ids.size == 0:
        return
    order = cp.argsort(ids, kind="stable")
    ordered = ids[order]
    start = cp.concatenate([cp.zeros(1, cp.int64),
                            cp.flatnonzero(ordered[1:] != ordered[:-1]).astype(cp.int64) + 1,
                            cp.full(1, ids.size, cp.int64)])
    C = table.shape[1]
    _ADD_RUNS(rows, order, ids, start, cp.int64(C), table, size=(start.size - 1) * C)
