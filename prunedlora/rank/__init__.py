"""PrunedLoRA, the rank-pruning method: LoRA trained at rank r0 whose rank components are pruned during
training to variable per-module ranks.

Its core works on tensors and PEFT layers only (no Trainer, files or vLLM): ``config`` (the method's
options), ``criteria`` (how a component is scored: registered objects), ``schedule`` (how many
components remain after each event), ``allocation`` (which go), ``pruner`` (applies a decision to the
layers). ``method`` plugs it into the training runner through the seam in ``prunedlora.method``.
"""
