"""The training engine: one rank's part of a run, in five modules a reader can take one at a
time.

    trainer       set-up (configuration checked once, data, the rank's model built by
                  refgpt.parallel.build, AdamW, a checkpoint restored) and the loop
    step          one optimizer step: micro-batches (or the pipeline schedule), the gradient
                  sync, the norm, clipping and AdamW; and one evaluation pass
    batches       which samples each rank trains on, step by step
    checkpoints   full tensors assembled from every rank's parts, and the parts taken back
    report        the step record, log lines, the banner and the memory registry

docs/architecture.md follows a micro-batch through them.
"""

from .trainer import Trainer

__all__ = ["Trainer"]
