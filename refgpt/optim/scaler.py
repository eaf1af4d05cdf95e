"""Loss scaling for 16-bit training, with Megatron-LM's semantics (megatron/core/optimizer/
grad_scaler.py), which DeepSpeed's fp16 optimizer shares.

float16 represents magnitudes from 6e-8 (subnormal) to 65504, and the gradients of the
activations of a language model lie largely below the first: they would flush to zero. So
the loss is multiplied by a scale S before backward (every gradient is S times larger, in
range), and the fp32 gradients are multiplied by 1/S before the optimizer uses them. With S a
power of two both multiplications are exact: the unscaled gradient is the one an unscaled
backward would give, but for what 16 bits flushed or rounded along the way.

A scale too large overflows: an inf or nan somewhere in the gradients. The step is then
skipped on every rank (the global gradient norm, summed over all ranks, is not finite
anywhere if it is not finite somewhere) and the dynamic scaler adjusts:

    overflow      growth_tracker = 0; hysteresis_tracker -= 1;
                  if hysteresis_tracker <= 0: S = max(S * 1/2, min_scale)
    no overflow   growth_tracker += 1;
                  if growth_tracker == window: growth_tracker = 0,
                                               hysteresis_tracker = hysteresis, S = 2 S

(The hysteresis tracker is only refilled by a growth: once it has run out, every overflow
halves S until ``window`` clean steps in a row have passed, as in Megatron.)

bfloat16 has float32's exponent range, so a --bf16 run needs no scale (S = 1, nothing
skipped but true infs and nans) unless --loss-scale asks for a constant one.
"""

from __future__ import annotations


class ConstantScaler:
    """A scale that never changes (--loss-scale S; S = 1 where there is no scaling)."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        pass


class DynamicScaler:
    """The dynamic loss scale (module docstring): halved after ``hysteresis`` overflows,
    doubled after ``window`` steps without one."""

    def __init__(self, initial: float = 2.0 ** 32, min_scale: float = 1.0, window: int = 1000,
                 hysteresis: int = 2):
        if not 0 < min_scale <= initial or window < 1 or hysteresis < 1:
            raise ValueError("need 0 < min_scale <= initial, window >= 1, hysteresis >= 1")
        self.scale, self.min_scale = float(initial), float(min_scale)
        self.window, self.hysteresis = window, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, overflow: bool) -> None:
        """After a step: whether its gradients overflowed (the step was skipped)."""
        if overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.window:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


def make_scaler(tcfg) -> ConstantScaler | DynamicScaler:
    """The run's scaler: --loss-scale's constant, else dynamic for float16, else none (1)."""
    if tcfg.loss_scale:
        return ConstantScaler(tcfg.loss_scale)
    if tcfg.dtype == "float16":
        return DynamicScaler(tcfg.initial_loss_scale, tcfg.min_loss_scale,
                             tcfg.loss_scale_window, tcfg.hysteresis)
    return ConstantScaler(1.0)
