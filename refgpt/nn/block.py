"""A pre-LayerNorm transformer block (GPT-2):

    a = x + drop(attn(ln_1(x)))
    y = a + drop(c_proj(gelu(c_fc(ln_2(a)))))          c_fc: C -> 4C, c_proj: 4C -> C

or, in a block with experts (refgpt.nn.moe), y = a + drop(moe(ln_2(a))).

c_fc's bias is added by the activation (refgpt.nn.gelu.BiasGELU), in the same pass.

Backward runs the same lines in reverse; each residual adds the branch's input gradient
to the gradient flowing straight through (both directions call ``residual``, a kernel: NumPy
adds on one core).

This is the only block: every layer in it comes from the layout's sublayers
(refgpt.nn.sublayers), so under tensor parallelism c_attn and c_fc are column-parallel and
carry the communication that enters the tensor-parallel region, the two c_proj are
row-parallel and carry the one that leaves it, and the LayerNorms and dropouts see the
activations as that layout holds them (whole, split over tokens, or split over a 2-D grid).
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .attention import CausalSelfAttention, KVCache
from .layer import primitives
from .moe import MoE, is_moe_layer
from .cast import narrow, wide


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def residual(x: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """x + branch: a residual connection, or the sum of its two paths' gradients (16 bits: the
    sum in fp32, rounded once)."""
    return narrow(wide(x) + wide(branch), x.dtype)


class Block:
    def __init__(self, parts, params, i: int, recompute_attention: bool = False, cfg=None):
        """parts: the layout's sublayers (refgpt.nn.sublayers.Sublayers or a parallel one);
        recompute_attention: selective recomputation of the attention core; cfg: the model's
        configuration, which says whether the block has experts."""
        p = f"h.{i}"
        self.index, self.unit = i, p                   # unit: what ZeRO-3 gathers (params.hold)
        self.ln_1 = parts.layernorm(params, f"{p}.ln_1")
        self.attn = CausalSelfAttention(parts, params, f"{p}.attn", recompute_attention)
        self.attn_resid_drop = parts.dropout(f"{p}.attn.resid_drop")
        self.ln_2 = parts.layernorm(params, f"{p}.ln_2")
        self.moe = MoE(parts, params, f"{p}.mlp", cfg) if cfg and is_moe_layer(cfg, i) else None
        if self.moe is None:
            self.c_fc = parts.column_linear(params, f"{p}.mlp.c_fc", bias=False)
            self.act = parts.bias_gelu(params, f"{p}.mlp.c_fc.bias")
            self.c_proj = parts.row_linear(params, f"{p}.mlp.c_proj")
            mlp = (self.c_fc, self.act, self.c_proj)
        else:
            mlp = (self.moe,)
        self.mlp_resid_drop = parts.dropout(f"{p}.mlp.resid_drop")
        self.layers = primitives(self.ln_1, self.attn, self.attn_resid_drop, self.ln_2, *mlp,
                                 self.mlp_resid_drop)

    def forward(self, x: np.ndarray, key=None, cache: KVCache | None = None,
                record: dict | None = None) -> np.ndarray:
        """x [B, T, C] as the layout holds it; key: dropout's (step, sample ids), None for no
        dropout; record: a dict that receives the block's intermediates under the dump names."""
        n1 = self.ln_1.forward(x)
        h = self.attn.forward(n1, key, cache, self.index, record)
        a = residual(x, self.attn_resid_drop.forward(h, key))             # [B, T, C]
        n2 = self.ln_2.forward(a)
        if self.moe is None:
            f = self.c_fc.forward(n2)                                      # [B, T, 4C]
            g = self.act.forward(f)                                        # f += bias
            m = self.c_proj.forward(g)                                     # [B, T, C]
        else:
            m = self.moe.forward(n2)
        y = residual(a, self.mlp_resid_drop.forward(m, key))              # [B, T, C]
        if record is not None:
            p = self.unit
            record.update({f"{p}.ln_1": n1, f"{p}.attn.out": h, f"{p}.resid_attn": a,
                           f"{p}.ln_2": n2, f"{p}.mlp.out": m, f"{p}.resid_mlp": y})
            if self.moe is None:
                record.update({f"{p}.mlp.fc": f, f"{p}.mlp.gelu": g})
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dm = self.mlp_resid_drop.backward(dy)
        if self.moe is None:
            dn2 = self.c_fc.backward(self.act.backward(self.c_proj.backward(dm)))
        else:
            dn2 = self.moe.backward(dm)
        da = residual(dy, self.ln_2.backward(dn2))
        dh = self.attn_resid_drop.backward(da)
        return residual(da, self.ln_1.backward(self.attn.backward(dh)))
