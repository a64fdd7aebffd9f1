"""How models are judged: sample-quality measures (exact NLL, entropy, bigram KL, gen-PPL), declared
once in metrics.py, the judges that score samples (judges.py), the sweep of a model over step counts,
the samples shown during training (samples.py) and the pipeline's report (report.py: rows, paired
comparisons, frontiers, plots, markdown). Never imports `runtime.engine` or `jobs`.
"""
