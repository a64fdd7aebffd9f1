"""The control: the students' starting weights trained on with the MDLM loss for the students' whole
budget (steps, batch, learning rate, EMA of all the rounds together), on the teacher's data stream from
where the teacher stopped and with per-step noise from its own seed domain. A student that beats its
teacher but not the control has gained from the extra training, not from SDTT. Trained by
``trainer.jobs.pretrain --control``.

Matched per round: the control's lr decay restarts at every round boundary as the students' engines do
(``config.distill_setup``, ``lr.segment_total``), and it is exported after each round's update count
(``round_ends``), so round r's student (r x steps_per_round updates) is compared with the control after
exactly as many updates, the same rates (hence the same lr integral), batch and EMA decay. What it does
not match: the students' optimizer reset when ``distill.reset_optimizer`` is set, and the two teacher
forwards per example that targets cost (equal updates, not equal FLOPs).
"""
from __future__ import annotations

import numpy as np

from trainer.config import RunConfig, TrainSetup, distill_setup, pretrain_setup
from trainer.layout import CONTROL, ModelRef


def stage(cfg: RunConfig, control: bool) -> tuple[ModelRef, TrainSetup, int]:
    """What this invocation trains: the teacher (model 0), or the control (the teacher trained on with
    its own MDLM loss for the students' whole budget: distillation's setup, steps and batch)."""
    if not control:
        return 0, pretrain_setup(cfg), cfg.train.steps
    return CONTROL, distill_setup(cfg), cfg.distill.rounds * cfg.distill.steps_per_round


def round_ends(cfg: RunConfig) -> list[int]:
    """The control's update counts at which it is exported: r x steps_per_round for every round r."""
    return [r * cfg.distill.steps_per_round for r in range(1, cfg.distill.rounds + 1)]


CONTROL_SEED_DOMAIN = 0xC0  # the control's per-step noise (t, mask): a stream the teacher never drew


def control_noise_seed(train_seed: int) -> int:
    """The control's step-noise seed: a hash of (train.seed, CONTROL_SEED_DOMAIN), unrelated to train.seed."""
    state = np.random.SeedSequence([train_seed, CONTROL_SEED_DOMAIN]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def control_stream(cfg: RunConfig, control: bool) -> tuple[int, int]:
    """(data offset, noise seed) of this invocation's training stream.

    data offset: the first step of ``batches`` (at the stage's global batch) it reads, the offset of
    pretraining's batch source (``PretrainBatches``, trainer/data/stream.py). The control
    continues the teacher's data stream where the teacher stopped (train.steps x its batch examples,
    rounded up to the control's batch: never re-reading the teacher's last ones) instead of replaying
    the teacher's first batches. The rows themselves are not new: the stream cycles epochs over the
    same training rows (``prepared.batches``), and a teacher that ran several epochs has seen every
    row several times; what is new is each (x0, t, mask) draw, as for the students.
    noise seed: the seed of the per-step noise (t and mask); the control's comes from its own domain,
    so no (x0, t, mask) example repeats one of the teacher's. The teacher: (0, train.seed).
    """
    if not control:
        return 0, cfg.train.seed
    seen = cfg.train.steps * pretrain_setup(cfg).global_batch_size
    return -(-seen // distill_setup(cfg).global_batch_size), control_noise_seed(cfg.train.seed)
