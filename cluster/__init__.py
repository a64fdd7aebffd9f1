"""How jobs reach machines: the pipeline DAG and its state, SLURM resources, submission and the
in-job runner, the local 2-node SLURM cluster. Knows nothing of models: imports only `trainer.config`.
"""
