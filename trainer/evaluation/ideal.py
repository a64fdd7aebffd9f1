"""The ideal SDTT student's evaluation rows: the ceiling a round's student is measured against.

The evaluation of model r - 1 (the teacher for r = 1, student r - 1 after) also samples the ideal
student of round r (trainer/method/ideal.py) when ``eval.ideal_rollouts`` > 0: N_r-step sampling
from the optimum of ``distill.divergence`` over model r - 1's m-step targets, with the targets' own
step size, m and end time (``targets.header.example_spec``), at every temperature of the sweep.
The samples use the evaluation's seed, so they pair with every other row sample by sample.

Monte Carlo error: the optimum is estimated from R = ``eval.ideal_rollouts`` rollouts per step;
``eval.ideal_repeats`` (K) independent rollout streams give K sample sets that share the sampling
noise. The row's per-sample NLL and entropy are their mean over the K sets (still paired with every
row); ``nll_mc_se`` is the SD of the K set means / sqrt(K): the Monte Carlo part of the row's
uncertainty, which the sampling SE (``nll_se``) does not contain. It does not cover the bias of a
finite R (the geometric mean of R draws is sharper or flatter than the limit's); compare rows at two
R to see it. Other measures (bigram KL, ...) are those of the first set, at the evaluation's sample count.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from trainer.config import RunConfig, round_steps
from trainer.data.synthetic import MarkovSource
from trainer.evaluation.quality import JudgeFn
from trainer.evaluation.sweep import draw_with, quality_row
from trainer.method import sampling
from trainer.method.ideal import ideal_denoiser
from trainer.targets.header import example_spec

ROLLOUT_DOMAIN = 0x1DEA  # separates the rollout streams from the evaluation's sampling noise


def rollout_seed(eval_seed: int, round_idx: int, repeat: int) -> int:
    return int(np.random.SeedSequence([ROLLOUT_DOMAIN, eval_seed, round_idx, repeat]).generate_state(1)[0])


def merge_repeats(rows: list[dict]) -> dict:
    """One row from K rows of the same sampling noise: per-sample NLL and entropy averaged over the
    K sets (so the row still pairs with others), their Monte Carlo SE, the first set's other measures."""
    out = dict(rows[0])
    k = len(rows)
    for key, mean_key, se_key in (("nll_per_sample", "nll", "nll_se"), ("entropy_per_sample", "entropy", "entropy_se")):
        if rows[0].get(key) is None:
            continue
        per = np.mean([np.asarray(r[key], dtype=np.float64) for r in rows], axis=0)
        out[key] = [round(float(v), 6) for v in per]
        shift = float(per.mean()) - float(out[mean_key])
        out[mean_key] = float(per.mean())
        out[se_key] = float(per.std(ddof=1) / np.sqrt(per.size))
        set_means = np.array([np.mean(r[key]) for r in rows])
        out[f"{mean_key}_repeats"] = [round(float(v), 6) for v in set_means]
        out[f"{mean_key}_mc_se"] = float(set_means.std(ddof=1) / np.sqrt(k))
        if mean_key == "nll" and out.get("nll_gap") is not None:
            out["nll_gap"] = float(out["nll_gap"]) + shift
    return out


def ideal_rows(model: nn.Module, cfg: RunConfig, round_idx: int, source: MarkovSource | None,
               judge: JudgeFn | None, device: torch.device, progress: bool = False) -> dict:
    """The ideal student of round ``round_idx`` with ``model`` (round_idx - 1's model) as its teacher:
    one row per temperature of the sweep (and 1.0) at the round's step count, and how it was made."""
    steps = round_steps(cfg, round_idx)
    spec = example_spec(cfg, round_idx)
    ev = cfg.eval
    teacher = sampling.make_denoiser(model, spec.mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    rows = []
    for tau in sorted({1.0, *(float(x) for x in ev.temperatures)}):
        t0, sets, calls, nfe0 = time.perf_counter(), [], 0, None
        for k in range(ev.ideal_repeats):
            gen = torch.Generator().manual_seed(rollout_seed(ev.seed, round_idx, k))
            student = ideal_denoiser(teacher, dt=spec.dt, teacher_steps=spec.teacher_steps, rollouts=ev.ideal_rollouts,
                                     divergence=cfg.distill.divergence, mask_id=spec.mask_id,
                                     noise_eps=spec.noise_eps, t_min=spec.t_min, generator=gen)
            samples, nfe = draw_with(student, cfg, steps, ev.num_samples, ev.seed, device, progress, tau, cache=False)
            sets.append(quality_row(samples, source, judge))
            calls += nfe * ev.ideal_rollouts * spec.teacher_steps
            nfe0 = nfe if nfe0 is None else nfe0
        rows.append({"steps": steps, "temperature": tau, **merge_repeats(sets), "nfe": nfe0,
                     "teacher_calls": calls, "seconds": round(time.perf_counter() - t0, 3)})
    return {"round": round_idx, "steps": steps, "divergence": cfg.distill.divergence,
            "teacher_steps": spec.teacher_steps, "dt": spec.dt, "rollouts": ev.ideal_rollouts,
            "repeats": ev.ideal_repeats, "rows": rows}
