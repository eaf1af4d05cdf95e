"""Activation and gradient dumps that other frameworks can be compared with, tensor by tensor.

A dump is one safetensors file. Names (B batch, T tokens, C hidden, H heads, V vocabulary,
weights in refgpt's [in, out] layout, which is also Hugging Face GPT-2's Conv1D layout):

    input_ids, targets                [B, T] int64; targets[:, t] is the token after input_ids[:, t]
    embed                             [B, T, C]   wte[ids] + wpe[pos] (after embedding dropout)
    h.{i}.ln_1                        [B, T, C]   block i's first LayerNorm output
    h.{i}.attn.qkv                    [B, T, 3C]  c_attn output, columns [q | k | v]
    h.{i}.attn.probs                  [B, H, T, T] softmax of the masked, scaled scores
    h.{i}.attn.out                    [B, T, C]   c_proj output (the attention branch)
    h.{i}.resid_attn                  [B, T, C]   x + attention branch
    h.{i}.ln_2                        [B, T, C]
    h.{i}.mlp.fc                      [B, T, 4C]  c_fc output (before GELU)
    h.{i}.mlp.gelu                    [B, T, 4C]
    h.{i}.mlp.out                     [B, T, C]   mlp c_proj output
    h.{i}.resid_mlp                   [B, T, C]   the block's output
    ln_f                              [B, T, C]
    logits                            [B, T, V]   real vocabulary only
    loss                              []          mean token cross-entropy
    grad.{param}                      d loss / d param, e.g. grad.h.0.attn.c_attn.weight [C, 3C]
    param.{param}                     the weights the dump was made with (wte unpadded [V, C])

``compare`` walks two dumps in this order (forward, loss, gradients, weights), so the first
failing row is where two implementations start to diverge.
"""

from __future__ import annotations

import re

import numpy as np

BLOCK_ACTIVATIONS = ("ln_1", "attn.qkv", "attn.probs", "attn.out", "resid_attn", "ln_2",
                     "mlp.fc", "mlp.gelu", "mlp.out", "resid_mlp")


def activation_names(num_layers: int) -> list[str]:
    return (["embed"] + [f"h.{i}.{a}" for i in range(num_layers) for a in BLOCK_ACTIVATIONS]
            + ["ln_f", "logits"])


def _layer_key(name: str):
    """Sort key of a parameter name: embeddings, blocks by index, final norm."""
    m = re.match(r"h\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ((0 if name.startswith("w") else 2), 0, name)


def canonical_order(names) -> list[str]:
    names = set(names)
    layers = {int(m.group(1)) for n in names if (m := re.match(r"h\.(\d+)\.", n))}
    order = ["input_ids", "targets"] + activation_names(max(layers, default=-1) + 1) + ["loss"]
    order = [n for n in order if n in names]
    for prefix in ("grad.", "param."):
        order += sorted((n for n in names if n.startswith(prefix)),
                        key=lambda n: _layer_key(n[len(prefix):]))
    return order + sorted(names - set(order))


def make_dump(model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Forward and backward of one batch (loss = mean over its tokens), everything recorded."""
    V = model.cfg.vocab_size
    record: dict[str, np.ndarray] = {}
    model.params.zero_grad()
    loss = model.forward(x, y, float(x.size), record=record)
    model.backward()
    out = {"input_ids": x.astype(np.int64), "targets": y.astype(np.int64),
           "loss": np.array(loss, dtype=model.dtype)}
    out.update({n: np.ascontiguousarray(v) for n, v in record.items()})
    for name in model.params:
        p, g = model.params[name], model.params.grads[name]
        if name == "wte.weight":
            p, g = p[:V], g[:V]
        out[f"param.{name}"] = np.ascontiguousarray(p)
        out[f"grad.{name}"] = np.ascontiguousarray(g)
    return out


def compare(other: dict, ref: dict, rtol: float) -> list[tuple]:
    """Rows (name, shape, max abs err, max rel err, ok) for every tensor in ``ref``.

    The relative error is scaled by the reference tensor's largest magnitude:
    max|a - b| / max|b|. Integer tensors must match exactly. A tensor missing from ``other``
    fails with shape "missing", one of another shape with shape "A here, B in the reference"
    (two dumps of different batches: the table's first row says so), and no errors.
    """
    rows = []
    for name in canonical_order(ref):
        b = ref[name]
        a = other.get(name)
        if a is None or a.shape != b.shape:
            why = "missing" if a is None else f"{tuple(a.shape)} here, {tuple(b.shape)} in the reference"
            rows.append((name, why, float("nan"), float("nan"), False))
            continue
        if np.issubdtype(b.dtype, np.integer):
            bad = int(np.sum(a != b))
            rows.append((name, b.shape, float(bad), float(bad), bad == 0))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        abs_err = float(np.max(np.abs(a64 - b64))) if b.size else 0.0
        scale = float(np.max(np.abs(b64))) if b.size else 0.0
        rel = abs_err / scale if scale > 0 else abs_err
        rows.append((name, b.shape, abs_err, rel, bool(rel <= rtol)))
    return rows


def format_table(rows: list[tuple], rtol: float) -> str:
    """The per-tensor table, then the first divergence, then ``max_rel_err=<x> PASS|FAIL``
    (the largest error of the tensors compared; a tensor missing or of another shape fails
    without one)."""
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'shape':<18} {'max abs err':>12} {'max rel err':>12}  result"]
    for name, shape, abs_err, rel, ok in rows:
        if isinstance(shape, str):                         # not compared: say why
            lines.append(f"{name:<{width}}  {shape:<44}  FAIL")
            continue
        lines.append(f"{name:<{width}}  {str(tuple(shape)):<18} {abs_err:12.3e} {rel:12.3e}  "
                     f"{'pass' if ok else 'FAIL'}")
    failed = [r for r in rows if not r[4]]
    worst = max((r[3] for r in rows if not isinstance(r[1], str)), default=0.0)
    if failed:
        why = f": {failed[0][1]}" if isinstance(failed[0][1], str) else ""
        lines.append(f"first divergence: {failed[0][0]}{why} ({len(failed)} of {len(rows)} "
                     f"tensors fail)")
    lines.append(f"max_rel_err={worst:.3e} {'FAIL' if failed else 'PASS'} (tolerance {rtol:g})")
    return "\n".join(lines)
