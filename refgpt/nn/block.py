"""A pre-LayerNorm transformer block (GPT-2):

    a = x + drop(attn(ln_1(x)))
    y = a + drop(c_proj(gelu(c_fc(ln_2(a)))))          c_fc: C -> 4C, c_proj: 4C -> C

c_fc's bias is added by the GELU layer (refgpt.nn.gelu.BiasGELU), in the same pass.

Backward runs the same lines in reverse; each residual adds the branch's input gradient
to the gradient flowing straight through (both directions call ``residual``, a kernel: NumPy
adds on one core).
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .attention import CausalSelfAttention, KVCache
from .dropout import Dropout
from .gelu import BiasGELU
from .layernorm import LayerNorm
from .linear import Linear


@kernel
def residual(x: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """x + branch: a residual connection, or the sum of its two paths' gradients."""
    return x + branch


class Block:
    def __init__(self, params, i: int, cfg, seed: int):
        p = f"h.{i}"
        self.index = i
        self.ln_1 = LayerNorm(params, f"{p}.ln_1", cfg.layernorm_eps)
        self.attn = CausalSelfAttention(params, f"{p}.attn", cfg.num_attention_heads,
                                        cfg.dropout, seed)
        self.attn_resid_drop = Dropout(cfg.dropout, f"{p}.attn.resid_drop", seed)
        self.ln_2 = LayerNorm(params, f"{p}.ln_2", cfg.layernorm_eps)
        self.c_fc = Linear(params, f"{p}.mlp.c_fc", bias=False)
        self.act = BiasGELU(params, f"{p}.mlp.c_fc.bias", cfg.gelu)
        self.c_proj = Linear(params, f"{p}.mlp.c_proj")
        self.mlp_resid_drop = Dropout(cfg.dropout, f"{p}.mlp.resid_drop", seed)
        self.layers = [self.ln_1, self.attn, *self.attn.layers, self.attn_resid_drop,
                       self.ln_2, self.c_fc, self.act, self.c_proj, self.mlp_resid_drop]

    def forward(self, x: np.ndarray, key=None, cache: KVCache | None = None,
                record: dict | None = None) -> np.ndarray:
        """record: a dict that receives the block's intermediates under the dump names."""
        n1 = self.ln_1.forward(x)
        h = self.attn.forward(n1, key, cache, self.index, record)
        a = residual(x, self.attn_resid_drop.forward(h, key))             # [B, T, C]
        n2 = self.ln_2.forward(a)
        f = self.c_fc.forward(n2)                                          # [B, T, 4C]
        g = self.act.forward(f)                                            # f += bias
        m = self.c_proj.forward(g)                                         # [B, T, C]
        y = residual(a, self.mlp_resid_drop.forward(m, key))              # [B, T, C]
        if record is not None:
            p = f"h.{self.index}"
            record.update({f"{p}.ln_1": n1, f"{p}.attn.out": h, f"{p}.resid_attn": a,
                           f"{p}.ln_2": n2, f"{p}.mlp.fc": f, f"{p}.mlp.gelu": g,
                           f"{p}.mlp.out": m, f"{p}.resid_mlp": y})
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dm = self.mlp_resid_drop.backward(dy)
        da = residual(dy, self.ln_2.backward(self.c_fc.backward(self.act.backward(
            self.c_proj.backward(dm)))))
        dh = self.attn_resid_drop.backward(da)
        return residual(da, self.ln_1.backward(self.attn.backward(dh)))
