"""AdamW, learning-rate schedule and gradient clipping on flat buffers."""

from .adamw import AdamW
from .clip import clip_grad_, grad_norm
from .schedule import learning_rate

__all__ = ["AdamW", "clip_grad_", "grad_norm", "learning_rate"]
