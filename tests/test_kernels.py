"""The numba backend's kernels against their NumPy references (refgpt.backend), in float64
and float32, on awkward shapes (odd sizes, a KV-cache offset, padded vocabulary); and the
whole model trained with the numba backend equals the numpy backend."""

import math
import platform

import numpy as np
import pytest

from refgpt import backend
from refgpt.config import ModelConfig, TrainConfig
from refgpt.engine import Trainer
from refgpt.kernels import numba_attention, numba_cpu, numba_flash, numba_gemm, numba_half
from refgpt.nn import attention, cast
from refgpt.nn.attention import (attention_block_backward, attention_block_forward,
                                 causal_matmul_nn, causal_matmul_nt, causal_matmul_tn,
                                 causal_softmax, softmax_backward)
from refgpt.nn.block import residual
from refgpt.nn.gelu import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward
from refgpt.nn.embedding import scatter_add_rows
from refgpt.nn.layernorm import layernorm_backward, layernorm_forward
from refgpt.nn.linear import add_matmul, column_sum, matmul
from refgpt.nn.loss import cross_entropy
from refgpt.optim.adamw import adamw_update
from refgpt.optim.clip import sum_squares
from refgpt.optim.mixed import round_into
from refgpt.precision import dtype_of

# float32: the kernels round differently from NumPy (fused multiply-adds, their own exp and
# tanh, row statistics summed in float64), so values that cancel (GELU's slope near its
# minimum) differ by a few float32 ulps of O(1)
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=2e-5, atol=1e-5)}
DTYPES = [np.float64, np.float32]


def close(got, want, dtype):
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert np.asarray(g).dtype == np.asarray(w).dtype or np.isscalar(w)
        np.testing.assert_allclose(g, w, **TOL[dtype])


def rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def test_float32_exp_is_within_1_ulp_of_the_exact_exp_and_saturates():
    from numba import njit

    from refgpt.kernels.numba_exp import vexp_of

    def apply(x, out):
        for i in range(x.size):
            out[i] = vexp_of(x[i])                       # float32 in, float32 arithmetic
    x = np.concatenate([np.linspace(-86.6, 88.72, 400001), np.random.default_rng(0).uniform(-5, 5, 10001),
                        [0.0, -0.0, 1e-30, -1e-30, np.log(2), 88.7]]).astype(np.float32)
    exact = np.exp(x.astype(np.float64)).astype(np.float32)
    # the row kernels call it from loops that may be reassociated: it must keep its own flags
    for flags in (False, {"contract", "reassoc"}):
        out = np.empty_like(x)
        njit(fastmath=flags)(apply)(x, out)
        assert out.dtype == np.float32
        np.testing.assert_array_max_ulp(out, exact, maxulp=1)
    edges = np.array([-np.inf, -1000.0, -86.7, 88.73, 1000.0, np.inf, np.nan], np.float32)
    out = np.empty_like(edges)
    njit(apply)(edges, out)
    assert out[:-1].tolist() == [0.0, 0.0, 0.0, np.inf, np.inf, np.inf] and np.isnan(out[-1])
    x64 = np.linspace(-700.0, 700.0, 10001)                  # float64: libm's exp, as Python's
    out = np.empty_like(x64)
    njit(apply)(x64, out)
    assert out.tolist() == [math.exp(v) for v in x64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tanh", "erf"])
def test_gelu(dtype, kind):
    rng = np.random.default_rng(0)
    x, dy = rand(rng, (3, 7, 33), dtype, 3.0), rand(rng, (3, 7, 33), dtype)
    close(numba_cpu.gelu_forward(x, kind), gelu_forward.reference(x, kind), dtype)
    close(numba_cpu.gelu_backward(x, dy, kind), gelu_backward.reference(x, dy, kind), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tanh", "erf"])
def test_bias_gelu(dtype, kind):
    rng = np.random.default_rng(0)
    f, b, dy = rand(rng, (3, 7, 33), dtype, 3.0), rand(rng, 33, dtype), rand(rng, (3, 7, 33), dtype)
    mine, ref = f.copy(), f.copy()
    close(numba_cpu.bias_gelu_forward(mine, b, kind), bias_gelu_forward.reference(ref, b, kind),
          dtype)
    close(mine, ref, dtype)                                  # both now hold f + b
    close(numba_cpu.bias_gelu_backward(ref, dy, kind),
          bias_gelu_backward.reference(ref, dy, kind), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(dtype):
    rng = np.random.default_rng(1)
    x, g, b = rand(rng, (5, 9, 40), dtype, 2.0) + 1.0, rand(rng, 40, dtype), rand(rng, 40, dtype)
    got, want = numba_cpu.layernorm_forward(x, g, b, 1e-5), layernorm_forward.reference(x, g, b, 1e-5)
    close(got, want, dtype)
    dy = rand(rng, x.shape, dtype)
    _, n, rstd = want
    close(numba_cpu.layernorm_backward(dy, n, rstd, g), layernorm_backward.reference(dy, n, rstd, g), dtype)


def test_float64_row_sums_run_left_to_right():
    """float64 is the precision runs are validated in: the row kernels must not reassociate its
    sums (they do on float32; see refgpt.kernels.numba_cpu), so LayerNorm's rstd equals the
    left-to-right computation bit for bit. Values over 12 orders of magnitude make any other
    order round differently."""
    rng = np.random.default_rng(3)
    C = 203
    x = rng.standard_normal((6, C)) * 10.0 ** rng.integers(-6, 7, (6, C))
    _, _, rstd = numba_cpu.layernorm_forward(x, np.ones(C), np.zeros(C), 1e-5)
    for r in range(len(x)):
        mu = 0.0
        for v in x[r].tolist():
            mu += v
        mu /= C
        var = 0.0
        for v in x[r].tolist():
            var += (v - mu) * (v - mu)
        assert rstd[r, 0] == 1.0 / math.sqrt(var / C + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p0", [0, 3])
def test_causal_softmax_and_its_backward(dtype, p0):
    rng = np.random.default_rng(2)
    s = rand(rng, (2, 3, 6, 6 + p0), dtype, 4.0)
    p = numba_cpu.causal_softmax(s.copy(), p0)
    close(p, causal_softmax.reference(s.copy(), p0), dtype)
    dp = rand(rng, p.shape, dtype)
    close(numba_cpu.softmax_backward(p, dp), softmax_backward.reference(p, dp), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, Tk, block", [(7, 7, 64), (130, 130, 64), (130, 130, 16),
                                          (5, 9, 2), (1, 10, 4), (300, 300, None)])
def test_causal_products(dtype, T, Tk, block, monkeypatch):
    """Blocks that end mid-sequence, a partial last block, a KV-cache offset (Tk > T), one
    query, the preset's block (None: T // 8 = 37 here); q read from a strided view as attention
    passes it."""
    monkeypatch.setattr(numba_attention, "BLOCK", block)
    rng = np.random.default_rng(5)
    B, H, D = 2, 3, 8
    q = rand(rng, (B, T, 3, H, D), dtype).transpose(2, 0, 3, 1, 4)[0]    # [B, H, T, D], strided
    k, v = rand(rng, (B, H, Tk, D), dtype), rand(rng, (B, H, Tk, D), dtype)
    s = numba_attention.causal_matmul_nt(q, k, 0.3)
    close(s, causal_matmul_nt.reference(q, k, 0.3), dtype)
    p = causal_softmax.reference(s, Tk - T)                          # zero past the boundary
    close(numba_attention.causal_matmul_nn(p, v), causal_matmul_nn.reference(p, v), dtype)
    close(numba_attention.causal_matmul_nn(p, v, 0.5), causal_matmul_nn.reference(p, v, 0.5), dtype)
    close(numba_attention.causal_matmul_tn(p, q, 0.5), causal_matmul_tn.reference(p, q, 0.5), dtype)
    for name, args in (("nn", (p, v)), ("tn", (p, v[:, :, Tk - T:]))):   # into given views:
        fn = getattr(numba_attention, f"causal_matmul_{name}")
        want = getattr(attention, f"causal_matmul_{name}").reference(*args, 0.5)
        grads = np.zeros((B, T if name == "nn" else Tk, 3, H, D), dtype)   # c_attn's layout
        for out in (grads.transpose(2, 0, 3, 1, 4)[1],                      # rows contiguous
                    np.zeros((B, H, D, want.shape[2]), dtype).swapaxes(-1, -2)):   # or not
            assert fn(*args, 0.5, out=out) is out
            close(out, want, dtype)
        assert not grads[:, :, 0].any() and not grads[:, :, 2].any()       # only its slot
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        numba_attention.causal_matmul_nn(p[0], v[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n, block", [(7, 64), (37, 16), (64, None)])
def test_ring_blocks(dtype, causal, n, block, monkeypatch):
    """The fused ring blocks (numba_flash) against their references: one tile and several,
    a partial last tile; q, k, v strided views of a c_attn output, lse and delta views of the
    ring's [B, H, 2n] rows, and gradients added into views of its accumulators (what they
    held kept)."""
    monkeypatch.setattr(numba_attention, "BLOCK", block)
    rng = np.random.default_rng(n)
    B, H, D = 2, 3, 8
    q, k, v = rand(rng, (B, n, 3, H, D), dtype).transpose(2, 0, 3, 1, 4)
    got = numba_flash.attention_block_forward(q, k, v, causal)
    want = attention_block_forward.reference(q, k, v, causal)
    close(got, want, dtype)
    do = rand(rng, (B, H, n, D), dtype)
    rows = rand(rng, (2, B, H, 2 * n), dtype)                     # lse and delta, as the ring
    rows[0, ..., :n], rows[1, ..., :n] = want[1], (do * want[0]).sum(-1)   # holds them
    lse, delta = rows[0, ..., :n], rows[1, ..., :n]
    acc = rand(rng, (3, B, H, 2 * n, D), dtype)
    ref = acc.copy()
    numba_flash.attention_block_backward(q, k, v, do, lse, delta, causal, None,
                                         *acc[:, :, :, n:])
    attention_block_backward.reference(q, k, v, do, lse, delta, causal, None, *ref[:, :, :, n:])
    close(acc, ref, dtype)
    assert numba_flash.attention_block_forward(q, k, v, causal, np.ones((B, H, n, n))) \
        is NotImplemented                                         # dropout: the reference's


def test_attention_block_presets_and_their_setting(monkeypatch):
    """REFGPT_ATTENTION_BLOCK's values, and each preset's block: T / 8, not below its
    smallest."""
    assert numba_attention.host_preset() in numba_attention.PRESETS
    assert numba_attention.tiling(None) == (numba_attention.host_preset(), None)
    assert numba_attention.tiling("a64fx") == ("a64fx", None)
    assert numba_attention.tiling("48")[1] == 48
    for bad in ("0", "-8", "sve", ""):
        with pytest.raises(ValueError, match="REFGPT_ATTENTION_BLOCK"):
            numba_attention.tiling(bad)
    monkeypatch.setattr(numba_attention, "BLOCK", None)
    for preset, blocks in (("avx2", {128: 16, 256: 32, 1024: 128, 1: 16}),
                           ("avx512", {128: 32, 256: 32, 1024: 128})):
        monkeypatch.setattr(numba_attention, "PRESET", preset)
        assert {T: numba_attention.block_for(T) for T in blocks} == blocks
    monkeypatch.setattr(numba_attention, "BLOCK", 48)
    assert numba_attention.block_for(1024) == 48


def test_causal_products_leave_blas_threads_as_they_were():
    from threadpoolctl import threadpool_info, threadpool_limits
    x = np.ones((1, 1, 4, 2))
    with threadpool_limits(3):
        before = [i["num_threads"] for i in threadpool_info()]
        numba_attention.causal_matmul_nt(x, x)
        assert [i["num_threads"] for i in threadpool_info()] == before


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, grad):
    rng = np.random.default_rng(3)
    V, Vp = 45, 64
    logits = rand(rng, (17, Vp), dtype, 3.0)
    y = rng.integers(0, V, 17)
    mine, ref = logits.copy(), logits.copy()
    loss = numba_cpu.cross_entropy(mine, V, y, 17.0, grad)
    np.testing.assert_allclose(loss, cross_entropy.reference(ref, V, y, 17.0, grad), **TOL[dtype])
    close(mine, ref, dtype)                              # the gradient, written over the logits
    if not grad:
        np.testing.assert_array_equal(mine, logits)     # only read
    else:
        assert np.all(mine[:, V:] == 0) and np.allclose(mine.sum(axis=1), 0, atol=1e-6)


@pytest.mark.parametrize("keep", [1.0, 1 - 3e-3 * 0.1])      # without, with weight decay
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_update(dtype, keep):
    rng = np.random.default_rng(4)
    p, g, m = rand(rng, 1001, dtype), rand(rng, 1001, dtype), rand(rng, 1001, dtype)
    v = np.abs(rand(rng, 1001, dtype))
    args = (3e-3, 0.9, 0.95, 1e-8, 0.19, 0.0975, keep)
    mine = [a.copy() for a in (p, g, m, v)]
    ref = [a.copy() for a in (p, g, m, v)]
    numba_cpu.adamw_update(*mine, *args)
    adamw_update.reference(*ref, *args)
    for a, b in zip(mine, ref):
        close(a, b, dtype)


def gemm_cases(rng, dtype):
    x, dy, big = rand(rng, (37, 13), dtype), rand(rng, (37, 29), dtype), rand(rng, (40, 50), dtype)
    return [(x.T, dy),                          # a weight's gradient: BLAS transposes a
            (dy.T, x),                          # the tied head's
            (dy, big[3:40, :29].T),             # b transposed
            (x[:, :5].T, big[:37, 7:36]),       # views whose rows are longer than the matrix
            (big[:13, 2:39], big[3:40, 10:20]),
            (x[::2].T, dy[::2]),                # every other row
            (x[:, ::2].T, dy)]                  # no unit stride: the reference's path


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_and_add_matmul(dtype):
    rng = np.random.default_rng(7)
    cases = gemm_cases(rng, dtype)
    op = numba_attention.blas_operand
    blas = [op(a) is not None and op(b) is not None for a, b in cases]
    assert blas == [True] * 6 + [False]
    for a, b in cases:
        bias = rand(rng, b.shape[1], dtype)
        close(numba_gemm.matmul(a, b), matmul.reference(a, b), dtype)
        close(numba_gemm.matmul(a, b, bias), matmul.reference(a, b, bias), dtype)
        for out in (rand(rng, (a.shape[0], b.shape[1]), dtype),
                    rand(rng, (a.shape[0], b.shape[1] + 3), dtype)[:, 1:-2]):   # c a view too
            want = out.copy()
            add_matmul.reference(want, a, b)
            numba_gemm.add_matmul(out, a, b)
            close(out, want, dtype)
    x = cases[0][0]
    with pytest.raises(ValueError, match="mismatch"):               # NumPy's error, not BLAS's
        numba_gemm.matmul(x, x)
    with pytest.raises(ValueError):
        numba_gemm.add_matmul(np.zeros((13, 13), dtype), x, x.T[:, :5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_sum(dtype):
    rng = np.random.default_rng(10)
    a = rand(rng, (301, 37), dtype)
    for x in (a, a[::3], a[:, 5:9], a[:, ::2]):             # views; no unit stride: NumPy's
        got = numba_cpu.column_sum(x)
        close(got, column_sum.reference(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual(dtype):
    rng = np.random.default_rng(11)
    x, h = rand(rng, (3, 17, 24), dtype), rand(rng, (3, 17, 24), dtype)
    np.testing.assert_array_equal(numba_cpu.residual(x, h), residual.reference(x, h))
    np.testing.assert_array_equal(numba_cpu.residual(x, h[:, :1]), x + h[:, :1])   # broadcast
    np.testing.assert_array_equal(numba_cpu.residual(x[:, ::2], h[:, ::2]), x[:, ::2] + h[:, ::2])


@pytest.mark.parametrize("grid", [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (5, 1)])
def test_gemm_tiles_cover_the_product(grid):
    """Every tile grid, whatever the thread count here: each element written once, right."""
    rng = np.random.default_rng(9)
    for a, b in gemm_cases(rng, np.float64)[:6]:
        c = np.full((a.shape[0], b.shape[1]), np.nan)
        bias = rng.standard_normal(c.shape[1])
        ta, tb = a.strides[0] == a.itemsize, b.strides[0] == b.itemsize
        numba_gemm._tiled(numba_attention.GEMM[c.dtype], ta, tb, a.T if ta else a,
                          b.T if tb else b, 0.0, c, *grid, bias, np.empty((0, 0), np.uint16))
        close(c, a @ b + bias, np.float64)


def test_idle_threads_sleep_only_where_threads_outnumber_cores():
    from refgpt.parallel.threads import oversubscribed
    assert not oversubscribed(1, 2, node_cores=2, my_cores=2)        # the default on 2 cores
    assert oversubscribed(2, 2, node_cores=2, my_cores=2)            # 2 ranks x 2 threads
    assert oversubscribed(4, 1, node_cores=16, my_cores=1)           # bound to one core
    assert not oversubscribed(4, 4, node_cores=16, my_cores=16)      # 4 x 4, --bind-to none
    assert not oversubscribed(16, 1, node_cores=16, my_cores=16)


def test_ranks_bound_to_a_share_of_the_node_get_its_cores():
    from refgpt.parallel.threads import default_threads
    assert default_threads(1, node_cores=48, my_cores=48) is None    # alone: the libraries'
    assert default_threads(4, node_cores=48, my_cores=12) == 12      # one A64FX CMG a rank
    assert default_threads(2, node_cores=64, my_cores=32) == 32      # one socket a rank
    assert default_threads(4, node_cores=48, my_cores=48) == 1       # not bound
    assert default_threads(16, node_cores=16, my_cores=1) == 1       # bound to a core
    assert default_threads(4, node_cores=16, my_cores=8) == 1        # shares that overlap


def test_placement_reads_the_kernels_numa_lists(tmp_path):
    from refgpt.parallel.threads import _parse_ranges, _ranges, numa_nodes
    for cmg, cores in enumerate(("12-23", "24-35", "36-47", "48-59")):   # an A64FX's CMGs
        (tmp_path / f"node{4 + cmg}").mkdir()
        (tmp_path / f"node{4 + cmg}" / "cpulist").write_text(cores + "\n")
    (tmp_path / "possible").write_text("4-7\n")
    nodes = numa_nodes(str(tmp_path))
    assert sorted(nodes) == [4, 5, 6, 7] and nodes[5] == set(range(24, 36))
    assert _parse_ranges("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert _ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11" and _ranges([5]) == "5"


def test_presets_follow_the_cpu_numba_compiles_for(monkeypatch):
    """NUMBA_CPU_NAME/NUMBA_CPU_FEATURES name the target where LLVM cannot see it (an emulated
    A64FX reads as a generic aarch64): the attention preset follows them."""
    import numba
    monkeypatch.setattr(numba.config, "CPU_NAME", "a64fx")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sve,+neon,-sve2")
    assert numba_attention.numba_target() == ("a64fx", {"sve": True, "neon": True,
                                                        "sve2": False})
    assert numba_attention.host_preset() == "a64fx"
    monkeypatch.setattr(numba.config, "CPU_NAME", "skylake-avx512")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f")
    assert numba_attention.host_preset() == "avx512"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "-avx512f")
    assert numba_attention.host_preset() == "avx2"


def test_tile_grid_is_near_square_and_uses_every_thread():
    assert numba_gemm.tile_grid(1024, 768, 1) == (1, 1)
    assert numba_gemm.tile_grid(1024, 768, 2) == (2, 1)
    assert numba_gemm.tile_grid(768, 3072, 2) == (1, 2)
    assert numba_gemm.tile_grid(1024, 768, 16) == (4, 4)
    assert numba_gemm.tile_grid(1024, 50304, 16) == (1, 16)
    assert numba_gemm.tile_grid(3, 1000, 16) == (1, 16)
    assert numba_gemm.tile_grid(1, 1, 4) == (1, 1)          # fewer tiles than threads


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_rows(dtype):
    rng = np.random.default_rng(8)
    idx = rng.integers(0, 11, 300)                             # ids repeat
    for C in (5, 64, 150):                                     # one, exactly one, several blocks
        table, rows = rand(rng, (11, C), dtype), rand(rng, (300, C), dtype)
        want = table.copy()
        scatter_add_rows.reference(want, idx, rows)
        numba_cpu.scatter_add_rows(table, idx, rows)
        np.testing.assert_array_equal(table, want)             # the same order of additions


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_fill(dtype):
    rng = np.random.default_rng(6)
    a, b = rand(rng, 100003, dtype), rand(rng, (30, 40), dtype)
    numba_cpu.zero_fill(a)
    numba_cpu.zero_fill(b[:, ::3])                        # a strided view: only its elements
    assert not a.any() and not b[:, ::3].any()
    assert np.all(b[:, 1::3] != 0) and np.all(b[:, 2::3] != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_rows(dtype):
    from refgpt.parallel.shared import CHUNK, sum_rows
    rng = np.random.default_rng(7)
    rows = rand(rng, (5, 3 * CHUNK + 123), dtype)
    lo, hi = 17, rows.shape[1] - 5                        # a rank's shard of the columns
    want = (((rows[0] + rows[1]) + rows[2]) + rows[3]) + rows[4]     # in rank order
    want = want[lo:hi]
    for impl in (sum_rows.reference, numba_cpu.sum_rows):
        got = rows.copy()
        impl(got, lo, hi, got[2, lo:hi])                 # into one of the rows, in place
        np.testing.assert_array_equal(got[2, lo:hi], want)
        np.testing.assert_array_equal(np.delete(got, 2, axis=0), np.delete(rows, 2, axis=0))
    out = np.zeros(2 * (hi - lo), dtype)
    assert numba_cpu.sum_rows(rows, lo, hi, out[::2]) is NotImplemented   # a strided output:
    with backend.Backend("numba"):                                        # the reference's way
        sum_rows(rows, lo, hi, out[::2])
    np.testing.assert_array_equal(out[::2], want)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [0, 3, (1 << 16) + 5, 5 << 16])
def test_sum_squares(dtype, n):
    """float64 sums of squares in another order: the same bits on any number of threads, and
    equal to the reference's to rounding. Both add n non-negative terms (a float32's square
    is exact in float64), each sum within (n - 1) u of the exact one (u = 2^-53), so they
    differ by at most 2 n u relative."""
    import numba
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    want = sum_squares.reference(x)
    got = numba_cpu.sum_squares(x)
    assert abs(got - want) <= 2 * n * 2.0 ** -53 * want
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert numba_cpu.sum_squares(x) == got
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_round_into(name):
    x = np.random.default_rng(1).standard_normal(10_001).astype(np.float32) * 1e3
    want, got = np.empty(x.size, dtype_of(name)), np.empty(x.size, dtype_of(name))
    round_into.reference(want, x)
    numba_half.round_into(got, x)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_wide_and_narrow(name):
    """The casts of refgpt.nn.cast on numba's threads: NumPy's bits, on contiguous arrays and
    on views (a transpose, a strided slice, a softmax's [B, H, T, T]); arrays already in the
    type pass through as they are, as in the reference."""
    t = dtype_of(name)
    x32 = np.random.default_rng(2).standard_normal((2, 3, 40, 40)).astype(np.float32) * 1e3
    for y in (x32, x32[0, 0].T, x32[:, :, ::3], x32.reshape(-1)[5:77]):
        got, want = numba_half.narrow(y, t), cast.narrow.reference(y, t)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
        np.testing.assert_array_equal(numba_half.wide(got), cast.wide.reference(got))
    h = x32.astype(t)
    assert numba_half.narrow(h, t) is h and numba_half.narrow(x32, np.float32) is NotImplemented
    assert numba_half.wide(x32) is NotImplemented and cast.wide.reference(x32) is x32


def test_every_numba_kernel_has_a_reference_and_is_tested(kernels):
    """The decorators' table: each kernel the numba backend replaces exists in the module
    named, and they are the kernels this file tests."""
    numba = backend.Backend("numba")
    replaced = sorted(n for n, k in kernels.items() if numba.replaces(k))
    for name in replaced:
        assert callable(numba.implementation(kernels[name]))
    assert replaced == sorted(
        ["gelu_forward", "gelu_backward", "bias_gelu_forward", "bias_gelu_backward",
         "layernorm_forward", "layernorm_backward",
         "causal_softmax", "softmax_backward", "cross_entropy", "adamw_update", "zero_fill",
         "scatter_add_rows", "column_sum", "residual", "sum_rows", "sum_squares", "round_into",
         "wide", "narrow",
         "matmul", "add_matmul", "causal_matmul_nt", "causal_matmul_nn",
         "causal_matmul_tn", "attention_block_forward", "attention_block_backward"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_with_numba_equals_numpy(dtype):
    def run(name):
        tcfg = TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-2,
                           dtype=dtype, synthetic_data=True, eval_iters=1, backend=name)
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          vocab_size=45, vocab_multiple=16, dropout=0.1, gelu="tanh")
        t = Trainer(cfg, tcfg, log=lambda *_: None)
        return t.run(), t.model.params.data.copy()
    (ref, p_ref), (got, p_got) = run("numpy"), run("numba")
    tol = 1e-11 if dtype == "float64" else 2e-4
    np.testing.assert_allclose([h["loss"] for h in got], [h["loss"] for h in ref], rtol=tol)
    np.testing.assert_allclose([h["val_loss"] for h in got if "val_loss" in h],
                               [h["val_loss"] for h in ref if "val_loss" in h], rtol=tol)
    np.testing.assert_allclose(p_got, p_ref, rtol=tol, atol=tol * np.abs(p_ref).max())


def sixteen_bit_gemms():
    """Every 16-bit GEMM this machine has, whether or not this CPU takes it by default
    (refgpt.kernels.blas16): MKL's where the mkl wheel is installed (x86 Linux: the dev extra)."""
    from refgpt.kernels import blas16
    found = {}
    for choice in ("mkl", "openblas"):
        source, gemms = blas16.find(choice)
        if gemms and source not in {s for s, _ in found.values()}:
            found.update({f"{choice}-{name}": (source, fn) for name, fn in gemms.items()})
    return found


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is x86's only")
@pytest.mark.parametrize("which", sorted(sixteen_bit_gemms()) or ["none found"])
def test_16_bit_blas_gemm_equals_the_fp32_gemm_of_the_same_values(which, monkeypatch):
    """The BLAS's 16-bit GEMM, tiled on numba's threads, against the reference (the same
    16-bit values widened, fp32 GEMM): equal to fp32 summation order, K 2^-24 relative of the
    products' magnitudes; then rounded once to 16 bits, equal to one ulp."""
    assert which != "none found", "the dev extra installs mkl on x86 Linux: no 16-bit GEMM found"
    name = which.split("-", 1)[1]
    _, gemm = sixteen_bit_gemms()[which]
    monkeypatch.setattr(numba_gemm, "gemm_for", lambda dtype: gemm if dtype.name == name else None)
    t, rng = dtype_of(name), np.random.default_rng(3)
    a, b = rand(rng, (70, 48), t), rand(rng, (48, 33), t)
    bias, c0 = rand(rng, (33,), t), rand(rng, (48, 33), np.float32)
    for x, y in ((a, b), (b.T, a.T), (a[:, :33].T.copy().T, b[:33].T.T)):     # transposed views
        want = matmul.reference(x, y, rounded=False)
        got = numba_gemm.matmul(x, y, rounded=False)
        assert got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 48 * 2.0 ** -24 * np.abs(x.astype(np.float32))
                      @ np.abs(y.astype(np.float32)) + 1e-30)
    got = numba_gemm.matmul(a, b, bias)
    want = matmul.reference(a, b, bias)
    ulp = np.abs(want.astype(np.float32)) * 2.0 ** (-7 if name == "bfloat16" else -10)
    assert got.dtype == t and np.all(np.abs(got.astype(np.float32) - want.astype(np.float32)) <= ulp)
    wide = numba_gemm.matmul(a, b, bias, rounded=False)      # each tile rounded by its thread:
    assert np.array_equal(got.view(np.uint16), wide.astype(t).view(np.uint16))  # NumPy's cast
    c, c_ref = c0.copy(), c0.copy()
    numba_gemm.add_matmul(c, a[:, :48].T, a[:, :33])
    add_matmul.reference(c_ref, a[:, :48].T, a[:, :33])
    assert np.all(np.abs(c - c_ref) <= 70 * 2.0 ** -24 * (np.abs(c0) + np.abs(
        a[:, :48].T.astype(np.float32)) @ np.abs(a[:, :33].astype(np.float32))))


def test_16_bit_arrays_reach_only_the_kernels_that_take_them():
    """Under the numba backend 16-bit arrays reach the kernels that take them (refgpt.backend):
    the residual add rounds as its reference, and a GEMM gives the reference's result whether
    this machine's 16-bit GEMM or the fallback runs it."""
    from refgpt.precision import dtype_of
    t, rng = dtype_of("bfloat16"), np.random.default_rng(4)
    x, y = rand(rng, (4, 8), t), rand(rng, (4, 8), t)
    with backend.Backend("numba"):
        assert np.array_equal(residual(x, y), residual.reference(x, y))
        a = matmul(x, y.T)
    assert a.dtype == t and np.allclose(a.astype(np.float32),
                                        matmul.reference(x, y.T).astype(np.float32), rtol=2 ** -7)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_16_bit_conversions_round_as_ml_dtypes(name, conversion_values):
    t = dtype_of(name)
    x = conversion_values
    with np.errstate(over="ignore"):                    # float16: 3.4e38 becomes inf
        got, want = numba_half.narrow(x, t), x.astype(t)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(numba_half.widen(want), want.astype(np.float32), equal_nan=True)
    for view in (want.T, want.reshape(7, 1, 587)[:, :, ::3].transpose(2, 0, 1)):  # strided
        assert np.array_equal(numba_half.widen(view), view.astype(np.float32), equal_nan=True)
    into = np.zeros((587, 14), t)[:, ::2]                                   # a strided out
    with np.errstate(over="ignore"):
        assert numba_half.narrow(x.T, t, out=into) is into
    assert np.array_equal(into.view(np.uint16), want.T.view(np.uint16))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_16_bit_conversions_of_every_pattern(name):
    """Every 16-bit pattern widens as ml_dtypes/NumPy widen it; a million random float32 bit
    patterns (every exponent: subnormals, ties, overflow) round as they round them."""
    t = dtype_of(name)
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(t)
    got, want = numba_half.widen(every), every.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    bits = np.random.default_rng(9).integers(0, 2 ** 32, 2 ** 20, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(t)
    got = numba_half.narrow(x, t)
    nan = np.isnan(x)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.all(np.isnan(got[nan].astype(np.float32)))


def sixteen_bit_cases(t, rng):
    """(kernel, arguments) of every kernel the numba backend runs on 16-bit arrays."""
    x, dy = rand(rng, (3, 5, 64), t), rand(rng, (3, 5, 64), t)
    g, b = rand(rng, (64,), t), rand(rng, (64,), t)
    n = layernorm_forward.reference(x, g, b, 1e-5)
    q, k = rand(rng, (2, 3, 9, 8), t), rand(rng, (2, 3, 9, 8), t)
    p = causal_softmax(causal_matmul_nt.reference(q, k, 0.3), 0).astype(t)
    return [(gelu_forward, (x, "tanh")), (gelu_backward, (x, dy, "erf")),
            (bias_gelu_forward, (x, g, "tanh")), (bias_gelu_backward, (x, dy, "tanh")), (column_sum, (x.reshape(-1, 64),)),
            (layernorm_forward, (x, g, b, 1e-5)), (layernorm_backward, (dy, n[1], n[2], g)),
            (residual, (x, dy)), (causal_matmul_nt, (q, k, 0.3)),
            (causal_matmul_nn, (p, k, 0.5)), (causal_matmul_tn, (p, q, 0.5)),
            (softmax_backward, (p, causal_matmul_nt.reference(q, k)))]


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_numba_kernels_on_16_bit_arrays_round_as_the_references(name):
    """Each numba kernel on 16-bit arrays against its reference: the same result types; fp32
    results to float32's tolerance, 16-bit ones within one 16-bit ulp (the fp32 values they
    round differ in their last bits)."""
    from refgpt.precision import dtype_of
    t = dtype_of(name)
    ulp = 2.0 ** (-7 if name == "bfloat16" else -10)
    for kern, args in sixteen_bit_cases(t, np.random.default_rng(6)):
        with backend.Backend("numba"):
            got = kern(*[a.copy() if isinstance(a, np.ndarray) else a for a in args])
        want = kern.reference(*[a.copy() if isinstance(a, np.ndarray) else a for a in args])
        for g_, w in zip(got if isinstance(got, tuple) else (got,),
                         want if isinstance(want, tuple) else (want,)):
            assert g_.dtype == w.dtype, (kern.__name__, g_.dtype, w.dtype)
            g32, w32 = g_.astype(np.float32), w.astype(np.float32)
            tol = (ulp * np.abs(w32) + ulp * 1e-3 * np.abs(w32).max() if g_.dtype == t else
                   1e-5 * np.abs(w32) + 1e-6 * np.abs(w32).max())
            assert np.all(np.abs(g32 - w32) <= tol), kern.__name__
    z = rand(np.random.default_rng(7), (6, 16), t, 3.0)
    y = np.array([0, 5, 9, 2, 11, 3])
    z_ref = z.copy()
    with backend.Backend("numba"):
        total = cross_entropy(z, 12, y, 6.0, True)
    assert abs(total - cross_entropy.reference(z_ref, 12, y, 6.0, True)) <= 1e-5 * abs(total)
    assert np.all(np.abs(z.astype(np.float32) - z_ref.astype(np.float32))
                  <= ulp * np.abs(z_ref.astype(np.float32)) + 1e-7)
    z32 = z_ref.astype(np.float32)          # row by row in fp32: as the float32 kernel on a
    loss32 = numba_cpu.cross_entropy(z32, 12, y, 6.0, True)   # widened copy, rounded once
    z16 = z_ref.copy()
    assert numba_cpu.cross_entropy(z16, 12, y, 6.0, True) == loss32
    assert np.array_equal(z16.view(np.uint16), z32.astype(t).view(np.uint16))
    rng = np.random.default_rng(8)        # the embedding's gradient: an fp32 or a 16-bit table
    rows, idx = rand(rng, (10, 64), t), np.array([3, 0, 7, 1, 9, 2, 8, 4, 6, 5])
    for table in (rand(rng, (10, 64), t), rand(rng, (10, 64), np.float32)):
        got, want = table.copy(), table.copy()
        with backend.Backend("numba"):
            scatter_add_rows(got, idx, rows)
        scatter_add_rows.reference(want, idx, rows)
        assert got.dtype == table.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["tanh", "erf"])
def test_16_bit_bias_gelu_is_the_fp32_route_in_one_pass(name, kind):
    """The one-pass 16-bit bias+GELU kernels equal, bit for bit, widening, the float32
    kernels and rounding (what they replace): f + b rounded into f, GELU of it rounded; dx
    rounded, db summed in fp32 from the unrounded dx."""
    from refgpt.kernels.numba_half import narrow, widen
    t, rng = dtype_of(name), np.random.default_rng(5)
    f, b = rand(rng, (37, 96), t, 2.0), rand(rng, (96,), t)
    f32 = widen(f)
    f32 += widen(b)
    x = narrow(f32, t)
    y = narrow(numba_cpu.gelu_forward(widen(x), kind), t)
    got = numba_cpu.bias_gelu_forward(f, b, kind)
    assert np.array_equal(f.view(np.uint16), x.view(np.uint16))
    assert np.array_equal(got.view(np.uint16), y.view(np.uint16))
    dy = rand(rng, (37, 96), t)
    dx32, db32 = numba_cpu.bias_gelu_backward(widen(x), widen(dy), kind)
    dx, db = numba_cpu.bias_gelu_backward(x, dy, kind)
    assert np.array_equal(dx.view(np.uint16), narrow(dx32, t).view(np.uint16))
    assert np.array_equal(db, db32) and db.dtype == np.float32


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is x86's only")
@pytest.mark.parametrize("which", sorted(sixteen_bit_gemms()) or ["none found"])
def test_16_bit_attention_products_on_the_16_bit_gemm(which, monkeypatch):
    """Attention's causal products on the BLAS's 16-bit GEMM, block by block, against the
    references (the 16-bit values widened, fp32 products): equal to fp32 summation order;
    the masked scores exactly zero."""
    assert which != "none found", "the dev extra installs mkl on x86 Linux: no 16-bit GEMM found"
    from refgpt.nn.attention import causal_matmul_nn, causal_matmul_nt, causal_matmul_tn
    name = which.split("-", 1)[1]
    _, gemm = sixteen_bit_gemms()[which]
    monkeypatch.setattr(numba_attention, "gemm_for",
                        lambda dtype: gemm if dtype.name == name else None)
    t, rng = dtype_of(name), np.random.default_rng(12)
    q, k = rand(rng, (2, 3, 40, 16), t), rand(rng, (2, 3, 40, 16), t)
    p = (rand(rng, (2, 3, 40, 40), np.float32) * np.tril(np.ones((40, 40), np.float32))).astype(t)
    bound = 40 * 2.0 ** -24 * 16                 # (p as a causal softmax leaves it: 0 above)
    s = numba_attention.causal_matmul_nt(q, k, 0.25)
    want = causal_matmul_nt.reference(q, k, 0.25)
    assert s.dtype == np.float32 and np.all(np.abs(s - want) <= bound * (np.abs(want).max() + 1))
    assert np.all(s[..., np.triu_indices(40, 1)[0], np.triu_indices(40, 1)[1]] == 0)
    for kern, ref, x in ((numba_attention.causal_matmul_nn, causal_matmul_nn, k),
                         (numba_attention.causal_matmul_tn, causal_matmul_tn, q)):
        got, want = kern(p, x, 0.5), ref.reference(p, x, 0.5)
        ulp = 2.0 ** (-7 if name == "bfloat16" else -10)
        g32, w32 = got.astype(np.float32), want.astype(np.float32)
        assert got.dtype == t and np.all(np.abs(g32 - w32) <= ulp * np.abs(w32) + bound)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_16_bit_row_kernels_are_the_fp32_route_without_copies(name):
    """LayerNorm's and the softmax backward's 16-bit kernels, which widen as they read and
    round as they write, equal the float32 kernels on widened copies with the results
    rounded, bit for bit."""
    from refgpt.kernels.numba_half import narrow, widen
    t, rng = dtype_of(name), np.random.default_rng(6)
    x, g, b = rand(rng, (2, 37, 96), t, 2.0), rand(rng, (96,), t), rand(rng, (96,), t)
    y32, n32, rstd32 = numba_cpu.layernorm_forward(widen(x), widen(g), widen(b), 1e-5)
    y, n, rstd = numba_cpu.layernorm_forward(x, g, b, 1e-5)
    assert np.array_equal(y.view(np.uint16), narrow(y32, t).view(np.uint16))
    assert np.array_equal(n.view(np.uint16), narrow(n32, t).view(np.uint16))
    assert np.array_equal(rstd, rstd32) and rstd.dtype == np.float32
    dy = rand(rng, (2, 37, 96), t)
    dx32, dg32, db32 = numba_cpu.layernorm_backward(widen(dy), widen(n), rstd, widen(g))
    dx, dg, db = numba_cpu.layernorm_backward(dy, n, rstd, g)
    assert np.array_equal(dx.view(np.uint16), narrow(dx32, t).view(np.uint16))
    assert np.array_equal(dg, dg32) and np.array_equal(db, db32)
    p, dp = rand(rng, (2, 3, 40, 40), t), rand(rng, (2, 3, 40, 40), np.float32)
    ds = numba_cpu.softmax_backward(p, dp)
    assert ds.dtype == np.float32 and np.array_equal(ds, numba_cpu.softmax_backward(widen(p), dp))
