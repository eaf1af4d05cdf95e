"""Layer normalisation over the last (hidden) axis, C features.

Forward, with statistics in two passes (mean first, then the variance of the centred
values, biased: divided by C) and eps inside the square root:

    mu = mean(x)     xc = x - mu     rstd = 1 / sqrt(mean(xc^2) + eps)
    n  = xc * rstd   y = gamma * n + beta

Backward, with dn = gamma * dy:

    dx = rstd * (dn - mean(dn) - n * mean(dn * n))
    dgamma += sum_N dy * n      dbeta += sum_N dy
"""

from __future__ import annotations

import numpy as np

from .layer import Layer, ParamRef


class LayerNorm(Layer):
    g, gg = ParamRef("weight"), ParamRef("weight", grad=True)
    b, gb = ParamRef("bias"), ParamRef("bias", grad=True)

    def __init__(self, params, prefix: str, eps: float = 1e-5):
        super().__init__()
        self.params = params
        self.param_names = {"weight": f"{prefix}.weight", "bias": f"{prefix}.bias"}
        self.eps = eps

    def forward(self, x: np.ndarray) -> np.ndarray:
        mu = x.mean(axis=-1, keepdims=True)                         # [..., 1]
        xc = x - mu                                                 # [..., C]
        rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)
        n = xc * rstd                                               # [..., C]
        self.save(n, rstd)
        return n * self.g + self.b

    def backward(self, dy: np.ndarray) -> np.ndarray:
        n, rstd = self.saved()
        C = n.shape[-1]
        self.gg += (dy * n).reshape(-1, C).sum(axis=0)
        self.gb += dy.reshape(-1, C).sum(axis=0)
        dn = dy * self.g                                            # [..., C]
        return rstd * (dn - dn.mean(axis=-1, keepdims=True)
                       - n * (dn * n).mean(axis=-1, keepdims=True))
