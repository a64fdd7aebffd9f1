"""bench targets: the targets job's shard loop against bare teacher forwards on the same batches."""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.common import (
    common_result,
    example_spec,
    load_or_random,
    resolve_device,
    set_threads,
    x0_rows,
)
from tools.benchmarks.timing import Ratio, cpu_ratio, goal_line, interleaved, med, table
from trainer.config import load_config
from trainer.method import diffusion, sdtt
from trainer.method.sampling import make_denoiser
from trainer.targets import shards
from trainer.targets.header import TeacherId, describe, sharding
from trainer.targets.writer import write_shard


def cmd_targets(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    L, V = cfg.data.seq_len, cfg.model.vocab_size
    model, origin = load_or_random(cfg, args.export, args.seed)
    model = model.to(device)
    denoise = make_denoiser(model, V, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    spec = example_spec(cfg, args.round)
    g = cfg.targets
    n = args.samples
    # The job's plan: samples per shard from the worst-case sample size, teacher batches fixed by index.
    plan = shards.plan_for(cfg, n)
    per_shard = plan.samples_per_shard
    header = describe(cfg, args.round, TeacherId("bench", "raw", "0" * 64), {"digest": "bench", "tokenizer": "bench"})
    header |= sharding(cfg, per_shard, plan.prefix) | {"num_samples": n}
    digest = shards.header_digest(header)
    x0 = x0_rows(cfg, n, L, args.seed)
    batches = [b for j in range(plan.num_shards) for b in plan.batches(j, g.batch_size)]

    # x_t of every batch, drawn exactly as make_examples draws them (t, then the mask, from each
    # sample's own generator), so the bare forwards see the same inputs as the full path.
    xts = []
    for b in batches:
        gens = [sdtt.sample_generator(spec.seed, spec.round_idx, i) for i in b]
        t = torch.cat([diffusion.sample_times(1, gg, spec.train_eps, antithetic=False) for gg in gens])
        xts.append(torch.cat([diffusion.mask_tokens(x0[i:i + 1], t[k:k + 1], V, spec.noise_eps, gens[k])
                              for k, i in enumerate(b)]).to(device))
    use_amp = device.type == "cuda"
    work = Path(tempfile.mkdtemp(prefix="bench-targets-", dir=args.work))

    def full() -> Path:
        """The targets job's own shard loop (trainer/targets/writer.py ``write_shard``): rollout + codec
        (sdtt.make_examples), ShardWriter (tar, fsync, sha256, atomic rename), then the manifest."""
        out = Path(tempfile.mkdtemp(prefix="set-", dir=work))
        shards.start_set(out, header)
        for j in range(plan.num_shards):
            write_shard(out, plan, j, 0, digest, denoise, spec, lambda b: x0[b.start:b.stop].to(device), g.batch_size)
        shards.write_manifest(out, header, plan)
        return out

    @torch.inference_mode()
    def bare() -> None:
        """m bare teacher forwards per batch (the model alone: no SUBS, sampling, codec or I/O)."""
        for xt in xts:
            for _ in range(spec.teacher_steps):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    model(xt)

    def bare_denoiser() -> None:
        """m denoiser calls per batch: the forwards plus SUBS (normalised log-probs over V + 1), which
        every target needs; separates what the pipeline adds from what the predictions cost."""
        for xt in xts:
            for _ in range(spec.teacher_steps):
                denoise(xt, torch.ones(xt.shape[0]))

    def cleanup(name: str, res: Any) -> None:
        if isinstance(res, Path):
            shutil.rmtree(res, ignore_errors=True)

    try:
        bare()
        cleanup("full", full())  # warm-up
        times, res = interleaved({"full": full, "bare": bare, "denoiser": bare_denoiser}, args.repeats, device,
                                 after=cleanup)
        profile_lines: list[str] = []
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            cleanup("full", full())
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile)
            profile_lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    r = Ratio.of(times["bare"], times["full"])  # throughput(full) / throughput(bare)
    r_den = Ratio.of(times["denoiser"], times["full"])
    c_bare, c_den = cpu_ratio("bare", "full"), cpu_ratio("denoiser", "full")
    rates = {k: n / med(v) for k, v in times.items()}
    print(f"targets: {n} samples x {L} tokens, round {args.round} (dt={spec.dt:.4g}, m={spec.teacher_steps}), "
          f"codec {spec.codec} K={spec.k}, teacher batch {g.batch_size}, {plan.num_shards} shard(s) of "
          f"{per_shard}; {origin}; device {device}, {torch.get_num_threads()} thread(s), {args.repeats} "
          "interleaved repetitions")
    print(table(["variant", "median s", "samples/s", "full / this (throughput)", "same, CPU time"],
                [["full targets path (rollout + codec + shards + manifest)", med(times["full"]), rates["full"], "1",
                  "1"],
                 ["bare teacher forwards (model only)", med(times["bare"]), rates["bare"], str(r), str(c_bare)],
                 ["bare denoiser calls (model + SUBS)", med(times["denoiser"]), rates["denoiser"], str(r_den),
                  str(c_den)]]))
    print(goal_line("throughput full / bare forwards", r.value, 0.90)
          + f"  [per-repetition range {r.lo:.3f}-{r.hi:.3f}]")
    if profile_lines:
        print("cProfile of one full run (by own time):")
        print("\n".join(profile_lines[:args.profile + 8]))
    out = common_result("targets", args, cfg, device)
    out.update(samples=n, seq_len=L, codec=spec.codec, k=spec.k, teacher_steps=spec.teacher_steps,
               teacher_batch=g.batch_size, weights=origin,
               times_s={k: med(v) for k, v in times.items()}, samples_per_s=rates,
               ratios={"targets_over_bare": r.value, "targets_over_denoiser": r_den.value},
               cpu_ratios={"targets_over_bare": c_bare.value, "targets_over_denoiser": c_den.value},
               ratio_range={"targets_over_bare": [r.lo, r.hi], "targets_over_denoiser": [r_den.lo, r_den.hi]},
               goal={"targets_over_bare": 0.90})
    return out


