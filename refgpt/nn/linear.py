"""Affine layer ``y = x W + b``.

W is stored [in, out] (as GPT-2's Conv1D; PyTorch's nn.Linear stores [out, in]) so the
forward reads as the math. For x [N, in] and dy [N, out]:

    y  = x W + b
    dx = dy W^T          dW += x^T dy          db += sum_N dy

Leading dimensions of x are flattened into N. With bias=False the layer is y = x W (a
row-parallel layer adds its bias after the reduction over ranks). When ``defer`` is a list,
backward returns dx at once and appends the weight-gradient work to it instead of doing it
(zero-bubble pipeline schedules run that work later, as their W step).
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .layer import Layer, ParamRef
from .cast import narrow, wide


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def column_sum(a: np.ndarray) -> np.ndarray:
    """a [N, C] summed over its rows: [C] (a bias's gradient; fp32 for a 16-bit a)."""
    return wide(a).sum(axis=0)


@kernel(numba="numba_gemm", cupy="cupy_gemm", half=("numba", "cupy"))
def matmul(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None,
           rounded: bool = True) -> np.ndarray:
    """a @ b for 2-D a and b (the layers' GEMMs), plus bias on every row when given. 16-bit
    operands: the products summed in fp32, the bias added, the result rounded once to a's type;
    rounded=False leaves it in fp32 (a partial sum, which a tensor-parallel reduction completes
    and rounds once, where one process rounds its whole sum)."""
    y = wide(a) @ wide(b)
    if bias is not None:
        y += wide(bias)
    return narrow(y, a.dtype) if rounded else y


@kernel(numba="numba_gemm", cupy="cupy_gemm", half=("numba", "cupy"))
def add_matmul(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c += a @ b, in place (a weight's gradient accumulating x^T dy): with 16-bit a and b, into
    an fp32 c, with no rounding of the product to 16 bits."""
    c += wide(a) @ wide(b)


class Linear(Layer):
    """y = x W (+ b). A layout that computes the products otherwise (SUMMA on a process grid:
    refgpt.parallel.tensor2d) overrides the three products and keeps the rest."""

    w, gw = ParamRef("weight"), ParamRef("weight", grad=True)
    b, gb = ParamRef("bias"), ParamRef("bias", grad=True)

    def __init__(self, params, prefix: str, bias: bool = True):
        super().__init__()
        self.params = params
        self.param_names = {"weight": f"{prefix}.weight", "bias": f"{prefix}.bias" if bias else None}
        self.defer: list | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.save(x)
        y = self.product(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])     # [..., out]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (x,) = self.saved()
        x2 = x.reshape(-1, x.shape[-1])                 # [N, in]
        dy2 = dy.reshape(-1, dy.shape[-1])              # [N, out]
        if self.defer is None:
            self.weight_grad(x2, dy2)
        else:
            self.defer.append((self, x2, dy2))
        return self.input_grad(dy2).reshape(*dy.shape[:-1], -1)

    def product(self, x2: np.ndarray) -> np.ndarray:
        return matmul(x2, self.w, self.b)               # [N, in] @ [in, out] + b

    def input_grad(self, dy2: np.ndarray) -> np.ndarray:
        return matmul(dy2, self.w.T)                    # dx = dy W^T: [N, out] @ [out, in]

    def weight_grad(self, x2: np.ndarray, dy2: np.ndarray) -> None:
        add_matmul(self.gw, x2.T, dy2)                  # gW += x^T dy: [in, out]
        if self.gb is not None:
            self.gb += column_sum(dy2)                  # [out]
