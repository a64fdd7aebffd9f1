"""Where tokens come from: the exact-likelihood synthetic source, text corpora, tokenizers, and the
prepared token data every stage reads. Imports `trainer.config`; never `runtime` or `jobs`.
"""
