"""The student side of a round, reusable outside the distill job (tools/benchmarks): batches,
the distillation loss wiring and the round's initialisation (rounds.py: its plan and records;
student.py: the student built from it), and the control's plan (control.py). Never imports `jobs`.
"""
