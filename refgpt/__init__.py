"""refgpt: a framework-free GPT in NumPy with hand-written backward passes.

Layers live in :mod:`refgpt.nn`, the optimizer in :mod:`refgpt.optim`, data handling in
:mod:`refgpt.data`; ``python -m refgpt.train`` / ``.prepare`` / ``.generate`` are the entry points.
"""

__version__ = "0.1.0"
