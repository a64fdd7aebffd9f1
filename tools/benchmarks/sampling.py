"""bench sampling: the student at 8-64 steps against the 1024-step teacher (with and without the
prediction cache) and a same-size AR model with a KV cache, interleaved."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from tools.benchmarks.common import common_result, load_or_random, resolve_device, set_threads
from tools.benchmarks.timing import Ratio, cpu_ratio, interleaved, med, table
from trainer.config import load_config
from trainer.method import diffusion
from trainer.method.sampling import make_denoiser, sample_ar, sample_diffusion
from trainer.model.dit import DiT


def cmd_sampling(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    L = args.seq_len or cfg.data.seq_len
    if L > cfg.model.max_seq_len:
        raise SystemExit(f"bench sampling: --seq-len {L} > model.max_seq_len={cfg.model.max_seq_len}")
    V, B = cfg.model.vocab_size, args.batch
    model, origin = load_or_random(cfg, args.export, args.seed)
    if getattr(args, "ar_export", None):  # the AR stage's model (trainer.jobs.pretrain --ar): <run>/ar/export
        ar, ar_origin = load_or_random(cfg, args.ar_export, args.seed, causal=True)
        origin += f"; AR: {ar_origin}"
    else:
        ar = DiT(cfg.model, causal=True).eval()
        ar.load_state_dict(model.state_dict())  # same shapes and names: the same-size AR model, same weights
    model, ar = model.to(device), ar.to(device)
    denoise = make_denoiser(model, V, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    # The generator lives on the sampling device by default (2 L float64 uniforms per sample and step
    # for the ancestral draw; AR's Gumbel-max draws [B, V + 1] per token); --cpu-generator draws on the
    # host, as trainer/evaluation/sweep.py does.
    gen_device = torch.device("cpu") if args.cpu_generator else device
    gen = torch.Generator(device=gen_device)
    can_cache = not cfg.model.time_conditioning  # caching is only valid for time-agnostic denoisers

    def diffusion_run(steps: int, cache: bool) -> Callable[[], int]:
        def run() -> int:
            gen.manual_seed(args.seed)  # same draws every repetition: the same NFE every time
            stats: dict[str, int] = {}
            sample_diffusion(denoise, B, L, steps, V, noise_eps=cfg.diffusion.noise_eps,
                             sampling_eps=cfg.diffusion.sampling_eps, generator=gen, device=device,
                             cache=cache, stats=stats)
            return stats["nfe"]
        return run

    def ar_run() -> int:
        gen.manual_seed(args.seed)
        sample_ar(ar, B, L, V, generator=gen, device=device, use_cache=True)
        return L

    variants: dict[str, Callable[[], int]] = {}
    for n in args.student_steps:
        variants[f"student@{n}"] = diffusion_run(n, cache=can_cache)
    if can_cache:
        variants[f"teacher@{args.teacher_steps}+cache"] = diffusion_run(args.teacher_steps, cache=True)
    if not args.no_uncached_teacher or not can_cache:
        variants[f"teacher@{args.teacher_steps}"] = diffusion_run(args.teacher_steps, cache=False)
    variants["ar+kv"] = ar_run
    # Warm-up (allocator, kernel selection, rotary tables) on the cheap variants only.
    variants[f"student@{min(args.student_steps)}"]()
    ar_run()
    times, nfe = interleaved(variants, args.repeats, device)

    t_cached = f"teacher@{args.teacher_steps}+cache"
    t_plain = f"teacher@{args.teacher_steps}"
    ref = t_cached if t_cached in times else t_plain  # the headline teacher: cached where valid
    ratios: dict[str, float] = {}
    cpu_ratios: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    rows = []
    for name in variants:
        row: list[Any] = [name, nfe[name], med(times[name])]
        for other in (t_cached, t_plain, "ar+kv"):
            if other in times and name != other:
                r = Ratio.of(times[name], times[other])
                row.append(str(r))
                if name.startswith("student"):
                    key = f"{name.replace('@', '')}_over_{_short(other)}"
                    ratios[key] = r.value
                    spread[key] = [r.lo, r.hi]
                    cpu_ratios[key] = cpu_ratio(name, other).value
            else:
                row.append("-")
        rows.append(row)
    headers = ["variant", "NFE", "median s", f"time / {t_cached}", f"time / {t_plain}", "time / ar+kv"]
    print(f"sampling: batch {B} x {L} tokens, {origin}, device {device}, {torch.get_num_threads()} threads, "
          f"generator on {gen_device}, {args.repeats} interleaved repetitions (medians; [range] of the "
          f"per-repetition ratios)")
    print(table(headers, rows))
    print(f"NFE = denoiser calls. The cache reuses the last prediction when a step changed no token "
          f"(valid: time-agnostic denoiser); the headline student/teacher ratio uses the teacher WITH the "
          f"cache ({'on' if ref == t_cached else 'not applicable: time-conditioned'}), the stronger baseline "
          f"and this sampler's default; students use the cache too. Ratios < 1: the student is faster.")
    for n in args.student_steps:
        key = f"student{n}_over_{_short(ref)}"
        ar_key = f"student{n}_over_ar"
        cpu = (f" (CPU-time ratios: {cpu_ratios[key]:.3f}, {cpu_ratios[ar_key]:.3f})"
               if device.type == "cpu" else "")
        print(f"  student@{n}: {1 / ratios[key]:.1f}x faster than the {_short(ref)} teacher, "
              f"{1 / ratios[ar_key]:.2f}x the speed of AR+KV{cpu}")
    breakdown: dict[str, float] = {}
    if args.breakdown:
        # One sampler step split in two, at the same shapes: the denoiser call (forward + SUBS) and the
        # ancestral draw (two float64 uniforms per position, inverse CDF for the positions that unmask).
        x_half = torch.full((B, L), V, device=device)
        x_half[:, ::2] = 0
        t, s_ = torch.full((B,), 0.5, dtype=torch.float64), torch.full((B,), 0.49, dtype=torch.float64)
        lp = denoise(x_half, t.float())
        steps_times, _ = interleaved(
            {"denoiser call": lambda: denoise(x_half, t.float()),
             "ancestral step": lambda: diffusion.ancestral_step(lp, x_half, t, s_, V, cfg.diffusion.noise_eps, gen)},
            max(5, 3 * args.repeats), device)
        r_step = Ratio.of(steps_times["ancestral step"], steps_times["denoiser call"])
        breakdown = {"ancestral_step_over_denoiser": r_step.value}
        if device.type == "cpu":
            breakdown["cpu_ancestral_step_over_denoiser"] = cpu_ratio("ancestral step", "denoiser call").value
        print(f"one sampler step: ancestral draw / denoiser call = {r_step} (generator on {gen_device}; "
              f"{B}x{L} positions, half masked, V + 1 = {V + 1})")
    out = common_result("sampling", args, cfg, device)
    out.update(breakdown=breakdown, batch=B, seq_len=L, weights=origin, generator_device=str(gen_device),
               teacher_steps=args.teacher_steps, headline_teacher=_short(ref),
               times_s={k: med(v) for k, v in times.items()}, nfe=nfe, ratios=ratios, ratio_range=spread,
               cpu_ratios=cpu_ratios if device.type == "cpu" else {},
               note="ratio = student wall time / baseline wall time (lower is faster)")
    return out


def _short(name: str) -> str:
    if name == "ar+kv":
        return "ar"
    return "teacher_cached" if name.endswith("+cache") else "teacher_nocache"


