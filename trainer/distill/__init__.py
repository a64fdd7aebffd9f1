"""The student side of a round, reusable outside the distill job (tools/benchmarks): batches,
the distillation loss wiring and the round's initialisation. Never imports `jobs`.
"""
