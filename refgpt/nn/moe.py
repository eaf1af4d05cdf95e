"""Mixture of experts: the MLP of a block replaced by E expert MLPs and a router that sends
each token to k of them (Switch Transformer for k = 1, GShard for k = 2; Megatron's flags).

For the N = B T tokens x [N, C] of a micro-batch:

    z = x W_r                       [N, E]  router logits (no bias), in fp32 in a 16-bit run
    P = softmax(z)                  [N, E]  fp32; lse = log sum exp z per token
    top_n = the k largest P_n,e     ties to the lower expert index
    gates   k = 1:  g = P_n,a                         (Switch: the router learns from the loss)
            k > 1:  g_j = P_j / S, S = the sum of the top k P  (GShard's for k = 2; Megatron's
                    default, a softmax over the top-k logits, is the same numbers; for k = 1
                    that would make every gate 1 and leave the router only the aux loss)
    capacity  c = ceil(factor N k / E) per expert; an expert offered more keeps c of its
              tokens: the first c in token order (--moe-token-drop-policy position) or the c
              with the largest gates (probs, ties to the earlier token). A dropped token-expert
              pair contributes nothing: the token passes through the block's residual.
    y_n = sum over the kept (n, e), in expert order, of g_n,e MLP_e(x_n)
          MLP_e(x) = gelu(x W_fc,e + b_fc,e) W_proj,e + b_proj,e      (the dense block's MLP)

Load balancing (Switch, with Megatron's normalisation for k > 1) and the router z-loss
(ST-MoE), per micro-batch and layer:

    f_e   = (assignments to e before any drop) / (N k)          P̄_e = mean over n of P_n,e
    aux   = alpha E sum_e f_e P̄_e          d aux / dP_n,e = alpha E f_e / N     (f is counted)
    zloss = beta mean_n lse_n^2            d zloss / dz_n,e = beta 2 lse_n P_n,e / N

Both join the objective as the LM loss does, weighted s = N / norm (norm: the tokens of the
global batch, so they are averaged over micro-batches and data-parallel ranks); their
gradients start in this layer's backward (as Megatron's MoEAuxLossAutoScaler), and their
values are logged, not added to the reported loss.

Backward, from dy [N, C]:

    dh_e = g_n,e dy_n for e's kept tokens -> MLP_e's backward -> dx_n += its input gradient
    dg_n,e = dy_n . MLP_e(x_n)
    k = 1:  dP_n,a = dg_a
    k > 1:  dP_j = (dg_j - sum_i dg_i g_i) / S     (for k = 2: P_b (dg_a - dg_b) / S^2)
    dP += s alpha E f / N;   dz = P (dP - rowsum(dP P)) + s beta 2 lse P / N
    dx += dz W_r^T;          dW_r += x^T dz

The experts' layers come from the layout's sublayers (column-parallel c_fc, row-parallel
c_proj), so tensor parallelism splits each expert as it splits the dense MLP; every expert's
parameters are named by their index (h.{i}.mlp.experts.{e}.c_fc.weight, ...), so their
initial values do not depend on the layout. The routing (N x E numbers: softmax, top-k,
capacity) runs on the host in NumPy under every backend; the experts' rows are gathered and
combined where the activations live. Under expert parallelism (the sublayers' ``ep``,
refgpt.parallel.expert) a rank holds only its own experts: the rows of every expert travel
to their rank and back between routing and combining, in forward and in backward, and
everything else here is as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import to_device, to_host
from .cast import narrow, wide
from .layer import Layer, ParamRef, primitives
from .linear import add_matmul, matmul

DROP_POLICIES = ("probs", "position")


def is_moe_layer(cfg, i: int) -> bool:
    """Whether block i has experts: every --moe-layer-freq-th block from block 0 (Megatron)."""
    return cfg.num_experts > 0 and i % cfg.moe_layer_freq == 0


def expert_capacity(tokens: int, cfg) -> int | None:
    """Tokens an expert takes per micro-batch: ceil(factor N k / E); None: no limit."""
    f = cfg.moe_expert_capacity_factor
    return None if f <= 0 else math.ceil(f * tokens * cfg.moe_router_topk / cfg.num_experts)


@dataclass
class Routing:
    """Where a micro-batch's tokens go: top [N, k] experts, gate [N, k], kept [N, k]; P and
    lse of the router's softmax; counts [E] of assignments before drops."""
    top: np.ndarray
    gate: np.ndarray
    kept: np.ndarray
    p: np.ndarray
    lse: np.ndarray
    counts: np.ndarray

    def tokens_of(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices in order, their slot in top) of expert e's kept assignments."""
        return np.nonzero((self.top == e) & self.kept)


def route(z: np.ndarray, k: int, capacity: int | None, policy: str) -> Routing:
    """The routing of logits z [N, E] (see the module docstring)."""
    m = z.max(axis=-1, keepdims=True)
    p = np.exp(z - m)
    total = p.sum(axis=-1, keepdims=True)
    p /= total
    lse = (m + np.log(total))[:, 0]
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    pk = np.take_along_axis(p, top, axis=-1)
    gate = pk if k == 1 else pk / pk.sum(axis=-1, keepdims=True)
    E = z.shape[-1]
    kept = np.ones(top.shape, bool)
    if capacity is not None:
        for e in range(E):
            rows, slots = np.nonzero(top == e)                  # in token order
            if len(rows) > capacity:
                if policy == "probs":
                    order = np.argsort(-gate[rows, slots], kind="stable")
                    drop = order[capacity:]
                else:
                    drop = np.arange(capacity, len(rows))
                kept[rows[drop], slots[drop]] = False
    return Routing(top, gate, kept, p, lse, np.bincount(top.ravel(), minlength=E))


def router_losses(r: Routing, cfg) -> tuple[float, float]:
    """(aux, zloss) of a micro-batch's routing, with their coefficients."""
    N, k = r.top.shape
    f, pbar = r.counts / (N * k), r.p.mean(axis=0)
    aux = cfg.moe_aux_loss_coeff * cfg.num_experts * float((f * pbar).sum())
    return aux, cfg.moe_z_loss_coeff * float((r.lse ** 2).mean())


class MoE(Layer):
    """The experts and the router of one block, in place of its MLP."""

    w, gw = ParamRef("weight"), ParamRef("weight", grad=True)

    def __init__(self, parts, params, prefix: str, cfg):
        super().__init__()
        self.params, self.param_names = params, {"weight": f"{prefix}.router.weight"}
        self.index = int(prefix.split(".")[1])            # h.{i}.mlp: the block's index
        self.cfg, self.E, self.k = cfg, cfg.num_experts, cfg.moe_router_topk
        self.ep, self.site = parts.ep, prefix          # expert parallelism's group, or None
        here = self.ep.local if self.ep else range(self.E)
        inner, (self.enter, self.leave) = parts.moe_parts()     # SP: the whole sequence
        self.experts = [Expert(inner, params, f"{prefix}.experts.{e}") for e in here]
        self.layers = primitives(*self.experts)
        self.norm = 1.0                  # the loss's norm for the coming forward (GPT.forward)
        self.losses = (0.0, 0.0)         # the last forward's aux and z losses
        self.stats = MoEStats(self.E)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.leave.forward(self._forward(self.enter.forward(x)))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self.enter.backward(self._backward(self.leave.backward(dy)))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        x2 = x.reshape(-1, x.shape[-1])
        N = x2.shape[0]
        z = to_host(wide(matmul(x2, self.w, rounded=False)))     # routing: N x E, on the host
        r = route(z, self.k, expert_capacity(N, self.cfg), self.cfg.moe_token_drop_policy)
        kept = [tuple(map(to_device, r.tokens_of(e))) for e in range(self.E)]
        gate = to_device(r.gate)
        inputs = [x2[rows] for rows, _ in kept]                  # every expert's, in order
        plan = self.ep.plan([len(rows) for rows, _ in kept]) if self.ep else None
        if plan is not None:                                     # to the experts' ranks
            inputs = self.ep.dispatch(plan, inputs, self.site)
        ran = [len(a) > 0 for a in inputs]
        outputs = [ex.forward(a) if go else a for ex, a, go in zip(self.experts, inputs, ran)]
        if plan is not None:                                     # and back
            outputs = self.ep.combine(plan, outputs, self.site)
        y = np.zeros_like(x2, dtype=z.dtype, shape=(N, x2.shape[1]))
        for (rows, slots), h in zip(kept, outputs):
            if len(rows):
                y[rows] += gate[rows, slots, None] * wide(h)
        self.losses = router_losses(r, self.cfg)            # what this forward adds, / s
        if self.keep:
            self.save(x2, r, kept, gate, outputs, plan, ran, N / self.norm)
            self.stats.add(r, self.losses)
        return narrow(y, x.dtype).reshape(x.shape)

    def _backward(self, dy: np.ndarray) -> np.ndarray:
        x2, r, kept, gate, outputs, plan, ran, s = self.saved()
        dy2 = wide(dy.reshape(-1, dy.shape[-1]))
        N, cfg = x2.shape[0], self.cfg
        dgate = np.zeros_like(gate, dtype=dy2.dtype)
        grads = []                                               # each expert's output grad
        for (rows, slots), h in zip(kept, outputs):
            dgate[rows, slots] = (dy2[rows] * wide(h)).sum(axis=-1)
            grads.append(narrow(gate[rows, slots, None] * dy2[rows], dy.dtype))
        dgate = to_host(dgate)
        if plan is not None:
            grads = self.ep.dispatch(plan, grads, self.site)
        dins = [ex.backward(g) if go else g for ex, g, go in zip(self.experts, grads, ran)]
        if plan is not None:
            dins = self.ep.combine(plan, dins, self.site)
        dx = np.zeros_like(dy2)
        for (rows, _), d in zip(kept, dins):
            if len(rows):
                dx[rows] += wide(d)
        dp = np.zeros_like(r.p, dtype=dgate.dtype)
        n = np.arange(N)
        if self.k == 1:
            dp[n, r.top[:, 0]] = dgate[:, 0]
        else:                                              # g_j = P_j / S, S = sum of top P
            total = np.take_along_axis(r.p, r.top, axis=-1).sum(axis=-1)
            through = (dgate * r.gate).sum(axis=-1)
            for j in range(self.k):
                dp[n, r.top[:, j]] = (dgate[:, j] - through) / total
        dp += s * cfg.moe_aux_loss_coeff * self.E * r.counts / (N * self.k) / N
        dz = r.p * (dp - (dp * r.p).sum(axis=-1, keepdims=True))
        dz += (s * cfg.moe_z_loss_coeff * 2.0 / N) * r.lse[:, None] * r.p
        dz = to_device(narrow(dz, x2.dtype))
        dx += wide(matmul(dz, self.w.T))
        add_matmul(self.gw, x2.T, dz)
        return narrow(dx, dy.dtype).reshape(dy.shape)


class Expert:
    """One expert: the dense block's MLP, gelu(x W_fc + b_fc) W_proj + b_proj, from the
    layout's sublayers."""

    def __init__(self, parts, params, prefix: str):
        self.c_fc = parts.column_linear(params, f"{prefix}.c_fc", bias=False)
        self.act = parts.bias_gelu(params, f"{prefix}.c_fc.bias")
        self.c_proj = parts.row_linear(params, f"{prefix}.c_proj")
        self.layers = primitives(self.c_fc, self.act, self.c_proj)

    def forward(self, x):
        return self.c_proj.forward(self.act.forward(self.c_fc.forward(x)))

    def backward(self, dy):
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(dy)))


class MoEStats:
    """What one layer logs, summed over the micro-batches since the last reset: the aux and
    z losses (their unweighted values), assignments dropped and made, and the per-expert
    token counts (before drops)."""

    def __init__(self, E: int):
        self.E = E
        self.reset()

    def reset(self) -> None:
        self.aux = self.z = 0.0
        self.micro_batches = self.dropped = self.assigned = 0
        self.load = np.zeros(self.E, np.int64)

    def add(self, r: Routing, losses: tuple[float, float]) -> None:
        self.aux += losses[0]
        self.z += losses[1]
        self.micro_batches += 1
        self.dropped += int((~r.kept).sum())
        self.assigned += r.kept.size
        self.load += r.counts

    def vector(self) -> np.ndarray:
        """[aux, z, micro-batches, dropped, assigned, load_0..load_E-1] (summable over ranks)."""
        return np.concatenate([[self.aux, self.z, self.micro_batches, self.dropped,
                                self.assigned], self.load]).astype(np.float64)
