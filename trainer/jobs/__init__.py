"""Entry points, one per stage (`python -m trainer.jobs.<stage>`): wiring only. Nothing imports them."""
