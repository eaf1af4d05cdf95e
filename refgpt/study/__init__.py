"""Studies built on the trainer: ``python -m refgpt.study.scaling`` measures strong scaling at a
fixed global batch (gradient accumulation across ranks, as in the Fugaku GPT work) and writes
a CSV, a markdown table and plots."""
