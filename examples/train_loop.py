"""The whole training loop by hand: what ``python -m refgpt.train`` does, in 30 lines.

    python examples/train_loop.py

A tiny GPT learns to continue a repeating pattern. Every step: zero the flat gradient buffer,
run forward and backward for each micro-batch (each loss divided by the tokens of the whole
batch, so the gradients add up to the batch mean), clip by the global norm, AdamW.
"""

import numpy as np

from refgpt.config import ModelConfig
from refgpt.nn import GPT
from refgpt.optim import AdamW, clip_grad_, grad_norm, learning_rate

cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=10)
model = GPT(cfg, np.float64, seed=0)
p = model.params                                   # p.data / p.grad: flat buffers
opt = AdamW(p.data, p.grad, p.decay_ranges(), betas=(0.9, 0.95), weight_decay=0.1)

pattern = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9] * 4)
micro_batches = [np.stack([pattern[s:s + 17] for s in starts]) for starts in ([0, 1], [2, 3])]
tokens = sum(mb[:, :-1].size for mb in micro_batches)

for it in range(150):
    p.zero_grad()
    loss = 0.0
    for mb in micro_batches:                       # gradient accumulation
        loss += model.forward(mb[:, :-1], mb[:, 1:], norm=tokens)
        model.backward()
    clip_grad_(p.grad, 1.0, grad_norm(p.grad))
    opt.step(learning_rate(it, lr=1e-2, min_lr=1e-3, warmup=10, decay_iters=150, style="cosine"))
    if it % 30 == 0 or it == 149:
        print(f"iteration {it:3d}  loss {loss:.4f}")

prompt = np.array([[4, 5, 6]])
for _ in range(6):                                 # greedy continuation
    nxt = model.logits(prompt)[0, -1].argmax()
    prompt = np.concatenate([prompt, [[nxt]]], axis=1)
print("continuation of 4 5 6:", prompt[0, 3:])
