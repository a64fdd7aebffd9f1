"""The method as pure math: MDLM diffusion, samplers, SDTT targets and divergences.

Tensors in, tensors out. Imports only `trainer.config` and `trainer.errors` of trainer (the target
codecs live here, in `codecs`); no files, no process group, no deepspeed.
"""
