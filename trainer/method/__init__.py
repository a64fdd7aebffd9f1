"""The method as pure math: MDLM diffusion, samplers, SDTT targets and divergences.

Tensors in, tensors out. Imports only `trainer.config` and `trainer.targets.codecs` (the target
types); no files, no process group, no deepspeed.
"""
