"""The denoiser network (DiT and its causal, KV-cached twin) and the published-MDLM weight layout.

Knows nothing of parallelism or training: imports only `trainer.config`, `trainer.errors`, `trainer.fileio`
(standard library only: the export's atomic folder swap) and itself.
"""
