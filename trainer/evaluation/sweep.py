"""Sample a model at several step counts and measure what came out.

One row per (model, steps, temperature): exact NLL under the synthetic source with its standard error
and the gap to the source's entropy, the bigram KL that exposes lost diversity, generative perplexity
under a judge when one is configured, and always the sample entropy beside them. Each row also keeps
the per-sample NLLs and entropies (``nll_per_sample``, ``entropy_per_sample``): every row is drawn
with the same seed, so sample i of every model, step count and temperature shares its noise, and the
report pairs them (trainer/evaluation/paired.py).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from trainer.config import PLAIN_SAMPLER as PLAIN
from trainer.config import RunConfig, SamplerConfig, round_steps
from trainer.data.synthetic import MarkovSource
from trainer.evaluation import metrics
from trainer.evaluation.quality import JudgeFn, bigram_kl, gen_ppl, markov_quality, sequence_entropies
from trainer.method import sampling


# ---- the plan: which step counts and temperatures each model's evaluation samples ------------------
# One rule for the counts, config.round_steps; trainer/jobs/evaluate.py samples this plan and the
# budget of tools/submit.py --dry-run prices it (eval_plan).
def step_counts(cfg: RunConfig) -> list[int]:
    """``eval.steps`` and every count a round reaches (``round_steps`` of rounds 0..R: start, start/2, ...)."""
    return sorted(set(cfg.eval.steps) | {round_steps(cfg, r) for r in range(cfg.distill.rounds + 1)})


def eval_counts(cfg: RunConfig, round_idx: int, control: bool) -> list[int]:
    """The counts a model is sampled at with temperature 1: ``step_counts``, except control@r before
    the last round (compared with round r's student only), at round r's count alone."""
    if control and round_idx < cfg.distill.rounds:
        return [round_steps(cfg, round_idx)]
    return step_counts(cfg)


def sweep_plan(cfg: RunConfig, round_idx: int, control: bool) -> dict[int, list[float]]:
    """The step counts to sweep ``eval.temperatures`` at: the teacher (round 0) and the control at
    every round's student count (each student is compared with them there at matched entropy), a
    student and a control before the last round (control@r, compared with round r only) at their own
    count. Sampling dominates the evaluation's cost, so nothing else is swept."""
    temps = [float(x) for x in cfg.eval.temperatures]
    if (control and round_idx == cfg.distill.rounds) or round_idx == 0:
        counts = [round_steps(cfg, r) for r in range(1, cfg.distill.rounds + 1)]
    else:
        counts = [round_steps(cfg, round_idx)]
        if taught_round(cfg, round_idx) is not None:  # also where it teaches: beside its ideal student
            counts.append(round_steps(cfg, round_idx + 1))
    return {n: temps for n in counts}


def eval_plan(cfg: RunConfig, round_idx: int, control: bool) -> set[tuple[int, float]]:
    """Every (step count, temperature) the evaluation of this model samples with the plain sampler:
    ``eval_counts`` at temperature 1 and the ``sweep_plan``."""
    return {(int(n), 1.0) for n in eval_counts(cfg, round_idx, control)} | \
        {(n, float(t)) for n, temps in sweep_plan(cfg, round_idx, control).items() for t in temps}


def taught_round(cfg: RunConfig, model_round: int, control: bool = False) -> int | None:
    """The round whose ideal student model ``model_round`` teaches (model_round + 1), or None: no
    ideal rows asked for, the last round's student, or the control (it teaches no round)."""
    r = model_round + 1
    if control or cfg.eval.ideal_rollouts == 0 or r > cfg.distill.rounds:
        return None
    return r


def draw_samples(model: nn.Module, cfg: RunConfig, steps: int, num_samples: int, seed: int,
                 device: torch.device, progress: bool = False, temperature: float = 1.0,
                 sampler: SamplerConfig | None = None) -> tuple[torch.Tensor, int]:
    """``num_samples`` sequences at ``steps`` steps, in batches; (samples on CPU, denoiser calls).
    ``sampler``: a named training-free sampler (``eval.samplers``) instead of ``sampling.*``'s."""
    denoise = sampling.make_denoiser(model, cfg.model.vocab_size, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    return draw_with(denoise, cfg, steps, num_samples, seed, device, progress, temperature,
                     cache=cfg.sampling.cache and not cfg.model.time_conditioning, sampler=sampler)


def draw_with(denoise: sampling.Denoiser, cfg: RunConfig, steps: int, num_samples: int, seed: int,
              device: torch.device, progress: bool = False, temperature: float = 1.0,
              cache: bool = False, sampler: SamplerConfig | None = None) -> tuple[torch.Tensor, int]:
    """``draw_samples`` for any denoiser (e.g. the ideal student, trainer/evaluation/ideal.py): the
    same batches and sampling noise, so its samples pair with every model's rows of the same seed."""
    mask_id = cfg.model.vocab_size
    # One generator for the whole draw: the samples depend on the seed, not on the batch size.
    gen = torch.Generator().manual_seed(seed)
    out, nfe = [], 0
    for start in range(0, num_samples, cfg.eval.batch_size):
        n = min(cfg.eval.batch_size, num_samples - start)
        stats: dict = {}
        x = sampling.sample_diffusion(denoise, n, cfg.data.seq_len, steps, mask_id,
                                      noise_eps=cfg.diffusion.noise_eps, sampling_eps=cfg.diffusion.sampling_eps,
                                      generator=gen, device=device, cache=cache,
                                      progress=progress, stats=stats, temperature=temperature,
                                      **sampling.sampler_options(sampler or cfg.sampling))
        out.append(x.cpu())
        nfe += stats["nfe"]
    return torch.cat(out), nfe


def quality_row(samples: torch.Tensor, source: MarkovSource | None, judge: JudgeFn | None) -> dict:
    """Every quality number for one set of samples; absent measures are None, never omitted."""
    row: dict = {**dict.fromkeys(metrics.names(metrics.SWEEP)), "nll_per_sample": None}
    ent = sequence_entropies(samples)
    if source is not None:
        row.update(markov_quality(source, samples))
        row["nll_per_sample"] = [round(float(v), 6) for v in source.nll_per_token(samples.numpy()
                                                                                  if isinstance(samples, torch.Tensor)
                                                                                  else samples)]
    row["entropy"] = float(ent.mean())
    row["entropy_se"] = float(ent.std(ddof=1) / np.sqrt(ent.size)) if ent.size > 1 else None
    row["entropy_per_sample"] = [round(float(v), 6) for v in ent]
    if judge is not None:
        row["gen_ppl"] = gen_ppl(judge, samples)
    x = samples.numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    for m in metrics.measured(metrics.SYNTHETIC if source is not None else metrics.TEXT):
        row[m.name] = m.measure(x, source)  # a registered measure of the samples (trainer/evaluation/metrics.py)
    row["samples"] = int(samples.shape[0])
    return row


def evaluate_model(model: nn.Module, cfg: RunConfig, steps_list: list[int], source: MarkovSource | None,
                   judge: JudgeFn | None, device: torch.device, progress: bool = False,
                   keep_samples: bool = False, sweep: dict[int, list[float]] | None = None,
                   samplers: list[SamplerConfig] | None = None) -> list[dict]:
    """One quality row per (step count, temperature, sampler), each with its timing and number of
    denoiser calls.

    Every step count is sampled at temperature 1; ``sweep`` adds, per step count, the other
    temperatures to sample it at (a step count absent from ``steps_list`` is added). ``samplers``
    (named training-free samplers) are drawn at every step count of ``sweep``, at its temperatures or
    their own (``SamplerConfig.temperatures``), in rows
    whose ``sampler`` is their name (``PLAIN`` for ``sampling.*``). Every row uses the same seed
    (cfg.eval.seed), so rows differ by the sampler alone and their samples pair up.
    """
    model.eval()
    plan = {(s, 1.0, PLAIN) for s in steps_list}
    for s, temps in (sweep or {}).items():
        plan |= {(s, float(tau), PLAIN) for tau in temps}
        plan |= {(s, float(tau), sp.name) for sp in samplers or () for tau in (sp.temperatures or temps)}
    named = {sp.name: sp for sp in samplers or ()}
    rows = []
    for steps, tau, name in sorted(plan, key=lambda p: (p[0], p[1], p[2] != PLAIN, p[2])):
        t0 = time.perf_counter()
        samples, nfe = draw_samples(model, cfg, steps, cfg.eval.num_samples, cfg.eval.seed, device, progress,
                                    temperature=tau, sampler=named.get(name))
        row = {"steps": steps, "temperature": tau, "sampler": name, **quality_row(samples, source, judge), "nfe": nfe,
               "seconds": round(time.perf_counter() - t0, 3)}
        if keep_samples:
            row["_samples"] = samples
        rows.append(row)
    return rows


def reference_row(source: MarkovSource, num_samples: int, seq_len: int, seed: int, eval_samples: int) -> dict:
    """True source samples as a model row ("source"): the NLL a perfect sampler reaches (mean over
    ``num_samples``), the data's own sample entropy (the target of matched-diversity comparisons) and
    the bigram-KL floor: the bigram KL of the first ``eval_samples`` of them, i.e. at the sample count
    every model row is measured with (the KL's finite-sample floor shrinks as samples are added)."""
    x = source.sample(num_samples, seq_len, np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])))
    x = torch.from_numpy(np.asarray(x, dtype=np.int64))
    row = {"model": "source", "round": None, "steps": None, "temperature": None, **quality_row(x, source, None)}
    row.pop("nll_per_sample")
    row.pop("entropy_per_sample")
    if row.get("bigram_kl") is not None:
        row["bigram_kl"] = bigram_kl(source, x[:eval_samples])
    return row


def format_table(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """A fixed-width text table of result rows (missing values shown as '-'); ``columns`` default to
    the TABLE view of trainer/evaluation/metrics.py, floats to each metric's ``digits``."""
    cols = [c for c in (metrics.columns(metrics.TABLE) if columns is None else columns) if any(c in r for r in rows)]

    def cell(v, c: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{metrics.digits(c)}f}" if np.isfinite(v) else str(v)
        return str(v)

    table = [cols] + [[cell(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
