"""The round's student built from its planned init (trainer/distill/rounds.py ``agree_init``): the model,
its DeepSpeed engine and the loaded checkpoint's state. Apart from rounds.py so that what only plans a
round (the targets job, tools) does not import the engine.
"""
from __future__ import annotations

import torch

from trainer.config import RunConfig, distill_setup
from trainer.distill.rounds import Init, TeacherRef
from trainer.errors import StageError
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import load_weight_file
from trainer.runtime.engine import build_engine


def build_student(cfg: RunConfig, init: Init, teacher: TeacherRef, total_steps: int, world_size: int):
    """The round's student (model, engine, the loaded checkpoint's client state) from its ``init``:
    an export's weight file (the teacher's, or teacher.init_from's), this round's checkpoint (resumed),
    round r - 1's (continued), or the seeded random init (scratch)."""
    torch.manual_seed(cfg.train.seed)  # identical (and then overwritten unless scratch) initial weights on every rank
    model = DiT(cfg.model)
    if init.kind == "export":
        model.load_state_dict(load_weight_file(init.path, expect_model=cfg.model))
    engine = build_engine(model, distill_setup(cfg), cfg.engine, total_steps, world_size)
    client = {}
    if init.kind in ("resume", "continue"):
        client = engine.load(init.path, expect_model=cfg.model) or {}
    if init.kind == "continue":
        client = {}  # the previous round's data position means nothing here
        if engine.step != init.round_start:
            raise StageError(f"{init.path}: loaded step {engine.step}, planned {init.round_start}")
    return model, engine, client
