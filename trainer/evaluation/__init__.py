"""How models are judged: sample-quality measures (exact NLL, entropy, bigram KL, gen-PPL) and the
sweep of a model over step counts. Never imports `runtime.engine` or `jobs`.
"""
