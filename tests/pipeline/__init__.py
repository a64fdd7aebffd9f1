"""The whole chain: locally, on the real local SLURM cluster, and the benchmarks (slow)."""
