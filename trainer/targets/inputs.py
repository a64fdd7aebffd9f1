"""What a round's target set is made from, checked before any shard is written: the prepared train split
(the targets job does not prepare data: a missing folder is an error naming it) and the round's teacher.
The online student (``distill.mode=online``, trainer/distill/batches.py) makes its targets from the same
inputs, with the same checks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import RunConfig
from trainer.data.prepared import data_dir, load_data_info, load_split
from trainer.errors import StageError
from trainer.method import sdtt
from trainer.method.sampling import make_denoiser
from trainer.runtime.checkpoint import WEIGHT_FILES, CheckpointError, load_model


def load_train_split(cfg: RunConfig, root: Path) -> tuple[dict[str, Any], np.ndarray]:
    """(data.json's info, the train split's rows) of the run's prepared data, checked against the config."""
    ddir = data_dir(cfg.data, root)
    if not (ddir / "data.json").is_file():
        raise StageError(f"no prepared data at {ddir} (data.json missing): run "
                         f"python -m trainer.jobs.prepare --run-dir {root} first")
    data_info = load_data_info(ddir)
    train = load_split(ddir, "train")
    if train.shape[1] != cfg.data.seq_len:
        raise StageError(f"{ddir}: sequences of length {train.shape[1]}, data.seq_len={cfg.data.seq_len}")
    if data_info["vocab_size"] > cfg.model.vocab_size:
        raise StageError(f"{ddir}: vocabulary {data_info['vocab_size']} > model.vocab_size={cfg.model.vocab_size}")
    return data_info, train


def teacher_denoiser(teacher, cfg: RunConfig, device: torch.device) -> sdtt.Denoiser:
    """The round's teacher (a trainer.distill.rounds.TeacherRef) loaded on ``device``, frozen, as a denoiser
    (the targets job's and the online student's); a weight file that does not fit the model is an error
    naming it."""
    try:
        model = load_model(teacher.export, teacher.weights, cfg.model)[0].to(device).requires_grad_(False)
    except CheckpointError:
        raise
    except RuntimeError as e:  # load_state_dict: names or shapes differ
        raise StageError(f"{teacher.export / WEIGHT_FILES[teacher.weights]}: does not fit the model: {e}") from None
    return make_denoiser(model, cfg.model.vocab_size, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
