"""Hand-written layers (forward and backward side by side) and the GPT model built from them."""

from .gpt import GPT, param_specs
from .params import Params, ParamSpec

__all__ = ["GPT", "Params", "ParamSpec", "param_specs"]
