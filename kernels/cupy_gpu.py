"""CuPy kernels for NVIDIA GPUs: the ``cupy`` backend of refgpt.backend.

Under this backend every array of the model is a CuPy array, and most references in
refgpt.nn run unchanged: NumPy hands ``np.tanh(x)``, ``x.mean(...)``, ``a @ b`` or
``np.stack`` on CuPy arrays to CuPy (NEP 13/18 dispatch), and matmul goes to cuBLAS. This file
replaces only what that cannot cover or does badly:

* fused element-wise kernels (``cupy.ElementwiseKernel``, one CUDA thread per element): GELU
  forward and backward, and the AdamW update, which NumPy-style code runs as many passes,
  each a kernel launch reading and writing the whole array;
* fused row kernels (``cupy.RawModule``, one thread block per row, the row's max and sums
  reduced in shared memory, sums in float64): LayerNorm forward and its backward's dx (dgamma
  and dbeta are column sums, left to CuPy's reductions), the causal softmax (in place) and the
  softmax backward;
* the causal scores: the scale applied to the queries, and a row kernel that zeroes the
  masked entries after cuBLAS's product; P^T x computed as (x^T P)^T;
* references that build index arrays with NumPy (the target picks of the cross-entropy) or
  call NumPy-only functions (``np.add.at``: cupy.add.at here);
  these are the references' own lines with the arrays made on the GPU.

Each is tested against its reference (tests/test_cupy.py, skipped where no GPU exists).
"""

from __future__ import annotations

import math

import cupy as cp

_GELU_FWD = cp.ElementwiseKernel(
    "T x, bool tanh_form", "T y",
    """
    double xd = x;
    double g = tanh_form ? tanh(0.7978845608028654 * (xd + 0.044715 * xd * xd * xd))
                         : erf(xd * 0.7071067811865476);
    y = (T)(0.5 * xd * (1.0 + g));
    """, "refgpt_gelu_forward")

_GELU_BWD = cp.ElementwiseKernel(
    "T x, T dy, bool tanh_form", "T dx",
    """
    double xd = x, d;
    if (tanh_form) {
        double t = tanh(0.7978845608028654 * (xd + 0.044715 * xd * xd * xd));
        d = 0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * 0.7978845608028654
            * (1.0 + 3.0 * 0.044715 * xd * xd);
    } else {
        d = 0.5 * (1.0 + erf(xd * 0.7071067811865476))
            + xd * exp(-0.5 * xd * xd) * 0.3989422804014327;
    }
    dx = (T)(dy * d);
    """, "refgpt_gelu_backward")

_ADAMW = cp.ElementwiseKernel(
    "T g, float64 step, float64 b1, float64 b2, float64 eps, float64 rbc2",
    "T p, T m, T v",
    """
    double mi = b1 * m + (1.0 - b1) * g;
    double vi = b2 * v + (1.0 - b2) * ((double)g * g);
    m = (T)mi;
    v = (T)vi;
    p = (T)(p - step * (mi / (sqrt(vi) * rbc2 + eps)));
    """, "refgpt_adamw")


_ROWS = cp.RawModule(code=r"""
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

template <typename T>
__global__ void causal_softmax(T* s, int T_, int Tk, int p0) {
    __shared__ double buf[256];
    T* sr = s + (size_t)blockIdx.x * Tk;
    int last = min(p0 + (int)(blockIdx.x % T_), Tk - 1);       // keys 0..last are visible
    double m = -1.0e308;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmax(m, (double)sr[j]);
    m = block_max<T>(m, buf);
    double total = 0.0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) total += exp((double)sr[j] - m);
    double inv = 1.0 / block_sum<T>(total, buf);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        sr[j] = j <= last ? (T)(exp((double)sr[j] - m) * inv) : (T)0;
}

template <typename T>
__global__ void causal_zero(T* s, int T_, int Tk) {
    T* sr = s + (size_t)blockIdx.x * Tk;
    int last = Tk - T_ + (int)(blockIdx.x % T_);                 // keys 0..last are visible
    for (int j = last + 1 + threadIdx.x; j < Tk; j += blockDim.x) sr[j] = (T)0;
}

template <typename T>
__global__ void softmax_backward(const T* p, const T* dp, T* ds, int C) {
    __shared__ double buf[256];
    size_t row = (size_t)blockIdx.x * C;
    double s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += (double)dp[row + c] * p[row + c];
    double dot = block_sum<T>(s, buf);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        ds[row + c] = (T)(p[row + c] * ((double)dp[row + c] - dot));
}

template <typename T>
__global__ void ln_forward(const T* x, const T* g, const T* b, double eps, T* y, T* n,
                           T* rstd, int C) {
    __shared__ double buf[256];
    const T* xr = x + (size_t)blockIdx.x * C;
    double s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    double mu = block_sum<T>(s, buf) / C;
    s = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { double d = xr[c] - mu; s += d * d; }
    double rs = 1.0 / sqrt(block_sum<T>(s, buf) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double nc = (xr[c] - mu) * rs;
        n[(size_t)blockIdx.x * C + c] = (T)nc;
        y[(size_t)blockIdx.x * C + c] = (T)(nc * g[c] + b[c]);
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = (T)rs;
}

template <typename T>
__global__ void ln_backward_dx(const T* dy, const T* n, const T* rstd, const T* g, T* dx,
                               int C) {
    __shared__ double buf[256];
    size_t row = (size_t)blockIdx.x * C;
    double s1 = 0.0, s2 = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double dn = (double)dy[row + c] * g[c];
        s1 += dn;
        s2 += dn * n[row + c];
    }
    double mdn = block_sum<T>(s1, buf) / C, mdnn = block_sum<T>(s2, buf) / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double dn = (double)dy[row + c] * g[c];
        dx[row + c] = (T)(rstd[blockIdx.x] * (dn - mdn - n[row + c] * mdnn));
    }
}
""", name_expressions=[f"{k}<{t}>" for k in ("ln_forward", "ln_backward_dx", "causal_softmax",
                                             "softmax_backward", "causal_zero") for t in ("float", "double")])
_CTYPE = {cp.dtype(cp.float32): "float", cp.dtype(cp.float64): "double"}


def layernorm_forward(x, g, b, eps):
    shape, C = x.shape, x.shape[-1]
    x2 = cp.ascontiguousarray(x).reshape(-1, C)
    y, n = cp.empty_like(x2), cp.empty_like(x2)
    rstd = cp.empty(x2.shape[0], x.dtype)
    kern = _ROWS.get_function(f"ln_forward<{_CTYPE[x.dtype]}>")
    kern((x2.shape[0],), (256,), (x2, cp.ascontiguousarray(g), cp.ascontiguousarray(b),
                                  cp.float64(eps), y, n, rstd, cp.int32(C)))
    return y.reshape(shape), n.reshape(shape), rstd.reshape(*shape[:-1], 1)


def layernorm_backward(dy, n, rstd, g):
    shape, C = dy.shape, dy.shape[-1]
    dy2, n2 = cp.ascontiguousarray(dy).reshape(-1, C), cp.ascontiguousarray(n).reshape(-1, C)
    dx = cp.empty_like(dy2)
    kern = _ROWS.get_function(f"ln_backward_dx<{_CTYPE[dy.dtype]}>")
    kern((dy2.shape[0],), (256,), (dy2, n2, cp.ascontiguousarray(rstd), cp.ascontiguousarray(g),
                                   dx, cp.int32(C)))
    return dx.reshape(shape), (dy2 * n2).sum(axis=0), dy2.sum(axis=0)


def gelu_forward(x, kind):
    return _GELU_FWD(x, kind == "tanh")


def gelu_backward(x, dy, kind):
    return _GELU_BWD(x, dy, kind == "tanh")


def adamw_update(p, g, m, v, lr, b1, b2, eps, bc1, bc2):
    _ADAMW(g, lr / bc1, b1, b2, eps, 1.0 / math.sqrt(bc2), p, m, v)


def causal_softmax(s, p0):
    T, Tk = s.shape[-2:]
    if not s.flags.c_contiguous:
        raise ValueError("causal_softmax works in place on a C-contiguous array")
    kern = _ROWS.get_function(f"causal_softmax<{_CTYPE[s.dtype]}>")
    kern((s.size // Tk,), (256,), (s, cp.int32(T), cp.int32(Tk), cp.int32(p0)))
    return s


def causal_matmul_nt(a, b, scale=1.0):
    """(scale a) b^T, then a row kernel zeroes what the mask hides (it writes only those)."""
    T, Tk = a.shape[-2], b.shape[-2]
    s = cp.matmul(a * a.dtype.type(scale) if scale != 1.0 else a, b.swapaxes(-1, -2))
    kern = _ROWS.get_function(f"causal_zero<{_CTYPE[s.dtype]}>")
    kern((s.size // Tk,), (256,), (s, cp.int32(T), cp.int32(Tk)))
    return s


def causal_matmul_tn(p, x, scale=1.0):
    """p^T x as (x^T p)^T: cuBLAS ran the batched product with a transposed T x Tk operand
    3x slower than this one (GPT-2 124M, b8 T1024 on an H100)."""
    out = cp.matmul(x.swapaxes(-1, -2), p).swapaxes(-1, -2)
    if scale != 1.0:
        out *= scale
    return out


def softmax_backward(p, dp):
    C = p.shape[-1]
    p2, dp2 = cp.ascontiguousarray(p).reshape(-1, C), cp.ascontiguousarray(dp).reshape(-1, C)
    ds = cp.empty_like(dp2)
    kern = _ROWS.get_function(f"softmax_backward<{_CTYPE[p.dtype]}>")
    kern((p2.shape[0],), (256,), (p2, dp2, ds, cp.int32(C)))
    return ds.reshape(dp.shape)


def cross_entropy_forward(z, y):
    m = z.max(axis=1, keepdims=True)
    e = cp.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    lse = m[:, 0] + cp.log(s[:, 0])
    losses = lse - z[cp.arange(len(y)), y]
    return float(losses.sum()), e / s


def cross_entropy_backward(probs, y, norm, Vp):
    dz = cp.zeros((probs.shape[0], Vp), probs.dtype)
    dz[:, :probs.shape[1]] = probs
    dz[cp.arange(len(y)), y] -= 1.0
    dz /= norm
    return dz


def scatter_add_rows(table, idx, rows):
    cp.add.at(table, idx, rows)


KERNELS = {f.__name__: f for f in (gelu_forward, gelu_backward, adamw_update, causal_softmax,
                                   cross_entropy_forward, cross_entropy_backward,
                                   scatter_add_rows, layernorm_forward, layernorm_backward,
                                   softmax_backward, causal_matmul_nt, causal_matmul_tn)}
