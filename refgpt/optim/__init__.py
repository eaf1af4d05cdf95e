"""AdamW (on fp32 master weights in 16-bit runs), LAMB, 1-bit Adam, learning-rate schedule,
gradient clipping and loss scaling, on flat buffers."""

from .adamw import AdamW
from .clip import clip_coefficient, clip_grad_, grad_norm
from .lamb import Lamb, MasterLamb
from .mixed import MasterAdamW
from .onebit import OnebitAdam
from .scaler import ConstantScaler, DynamicScaler, make_scaler
from .schedule import learning_rate

__all__ = ["AdamW", "ConstantScaler", "DynamicScaler", "Lamb", "MasterAdamW", "MasterLamb",
           "OnebitAdam", "clip_coefficient", "clip_grad_", "grad_norm", "learning_rate",
           "make_scaler"]
