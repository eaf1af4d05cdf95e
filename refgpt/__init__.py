"""refgpt: a framework-free GPT in NumPy with hand-written backward passes.

Layers live in :mod:`refgpt.nn`, the parallel layouts in :mod:`refgpt.parallel`, the training
engine in :mod:`refgpt.engine`; ``python -m refgpt.train`` / ``.prepare`` / ``.generate`` /
``.validate`` are the entry points. docs/architecture.md draws how the parts fit.
"""

__version__ = "0.1.0"
