"""The three SUMMA products and the 2-D linear layer equal NumPy on the full matrices, in
float64, on a q x q grid made of the whole world (q = 1, 2, 3: run at 1, 4 and 9 ranks; other
world sizes skip), with non-square blocks; and the traffic counter matches (q-1) blocks per
operand."""

import numpy as np
import pytest

from refgpt.nn.params import Params, ParamSpec
from refgpt.parallel.summa import SummaGrid, matmul_ab, matmul_abt, matmul_atb
from refgpt.parallel.tensor2d import Linear2D


def block(full, grid):
    """Rank (i, j)'s block of a full 2-D matrix (rows split by i, columns by j)."""
    rows, cols = full.shape[0] // grid.q, full.shape[1] // grid.q
    return full[grid.i * rows:(grid.i + 1) * rows, grid.j * cols:(grid.j + 1) * cols]


def grid_or_skip():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if round(comm.size ** 0.5) ** 2 != comm.size:
        pytest.skip("needs a square number of ranks")
    return comm, SummaGrid(comm)


def full(rng, *shape):
    return rng.standard_normal(shape)


@pytest.mark.mpi(min_size=1)
def test_the_three_products_equal_numpy():
    comm, g = grid_or_skip()
    q = g.q
    rng = np.random.default_rng(0)                       # same matrices on every rank
    M, K, N = 4 * q, 3 * q, 5 * q
    a, b = full(rng, M, K), full(rng, K, N)
    ok = np.allclose(matmul_ab(g, block(a, g), block(b, g)), block(a @ b, g), rtol=1e-12, atol=1e-12)
    expect = (q - 1) * (block(a, g).size + block(b, g).size)
    ok = ok and g.received == expect
    c, d = full(rng, K, N), full(rng, M, N)              # A B^T with A = d [M, N], B = c [K, N]
    ok = ok and np.allclose(matmul_abt(g, block(d, g), block(c, g)), block(d @ c.T, g),
                            rtol=1e-12, atol=1e-12)
    e = full(rng, M, K)                                  # A^T B with A = e [M, K], B = d [M, N]
    ok = ok and np.allclose(matmul_atb(g, block(e, g), block(d, g)), block(e.T @ d, g),
                            rtol=1e-12, atol=1e-12)
    assert all(comm.allgather(bool(ok)))


@pytest.mark.mpi(min_size=1)
def test_linear_2d_forward_and_backward_equal_dense():
    comm, g = grid_or_skip()
    q = g.q
    rng = np.random.default_rng(1)
    n, d_in, d_out = 6 * q, 2 * q, 3 * q
    x, w, dy = full(rng, n, d_in), full(rng, d_in, d_out), full(rng, n, d_out)
    params = Params([ParamSpec("fc.weight", block(w, g).shape)], np.float64)
    params["fc.weight"][...] = block(w, g)
    layer, gw = Linear2D(params, "fc", g), params.grads["fc.weight"]
    y = layer.forward(np.ascontiguousarray(block(x, g)))
    dx = layer.backward(np.ascontiguousarray(block(dy, g)))
    ok = (np.allclose(y, block(x @ w, g), rtol=1e-12, atol=1e-12)
          and np.allclose(dx, block(dy @ w.T, g), rtol=1e-12, atol=1e-12)
          and np.allclose(gw, block(x.T @ dy, g), rtol=1e-12, atol=1e-12))
    assert all(comm.allgather(bool(ok)))


@pytest.mark.mpi(min_size=2)
def test_a_non_square_tp_size_is_refused():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if round(comm.size ** 0.5) ** 2 == comm.size:
        pytest.skip("needs a non-square number of ranks")
    with pytest.raises(ValueError, match="square TP size"):
        SummaGrid(comm)


@pytest.mark.mpi(min_size=4)
def test_the_layer_volume_formula_is_the_counters_but_the_row_sums():
    """A layer's elements received, forward and backward (block 0's counters), exceed
    tensor2d.formula_layer_volume only by the LayerNorms' row sums and the biases' gathers
    it leaves out: within 3% at N = h = 128."""
    from mpi4py import MPI

    from refgpt.config import ModelConfig
    from refgpt.nn import GPT
    from refgpt.parallel.summa import SummaGrid
    from refgpt.parallel.tensor2d import Tensor2D, formula_layer_volume
    comm = MPI.COMM_WORLD
    if comm.size != 4:
        pytest.skip("the 2 x 2 grid of 4 ranks")
    B, T, h = 2, 64, 128
    cfg = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=4, seq_length=T,
                      vocab_size=256)
    parts = Tensor2D(cfg, 0, SummaGrid(comm))
    model = GPT(cfg, np.float32, 0, parts=parts)
    x = np.random.default_rng(0).integers(0, 256, (B, T))
    model.forward(x, x, float(B * T))
    model.backward()
    counted, _ = parts.layer_volume("h.0.")
    want = formula_layer_volume(B * T, h, 2)
    assert want <= counted <= 1.03 * want, (counted, want)
