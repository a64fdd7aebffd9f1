"""Everything that runs inside a job. Subpackages are named after what they hold; `jobs/` wires them.

Import rules (enforced by tests/unit/test_layering.py): nothing imports `trainer.jobs`; only
`trainer.runtime.engine` imports deepspeed; `method` and `model` do no I/O and need no process group;
nothing in `trainer` imports `cluster` or `tools`.
"""
