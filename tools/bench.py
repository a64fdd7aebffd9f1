"""Benchmarks: speed and storage targets, measured as RATIOS side by side in one run.

    python tools/bench.py sampling [--config configs/tiny.yaml] [--device cpu] [--seq-len L] [--batch 8]
    python tools/bench.py targets  [--config ...] [--samples N] [--profile]
    python tools/bench.py train    [--config ...] [--targets DIR] [--modes ddp,zero1,zero2,zero3]
    python tools/bench.py loader   [--config ...] [--targets DIR]
    python tools/bench.py storage  [--config ...] [--teacher EXPORT_DIR]

Every subcommand prints a readable table and, LAST, one JSON line with the numbers (``ratios`` holds
the headline ratios) so scripts can parse it: ``... | tail -n 1 | python -m json.tool``.

Why ratios and not times: the machines this runs on are shared and noisy (CI: 2 CPU cores with other
jobs). Each ratio compares two things measured in the same process, in interleaved repetitions
(every repetition runs every variant once, in a rotated order, so slow phases of the machine hit all
variants alike), and is the ratio of the per-variant medians. The per-repetition ratio range is
printed beside it as a noise gauge, and on CPU runs the same ratio of process CPU times as a
cross-check that other tenants barely disturb. Absolute times are printed for orientation only;
never compare them across runs. CPU runs use one torch thread by default (``--threads``): on a
busy 2-core machine, OpenMP threads waiting for a descheduled peer made every op up to 10x slower.

Weights: without an export directory every model is randomly initialised. Speed does not depend on
the weight values (dense kernels), except through the prediction cache, whose hit rate depends on
the noise schedule, not on the model. Quality (``storage``) needs a trained teacher: it pretrains a
tiny one first unless ``--teacher`` names an export.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from trainer import codecs, diffusion, sdtt, shards  # noqa: E402
from trainer.config import RunConfig, load_config, round_steps  # noqa: E402
from trainer.model import DiT, count_parameters  # noqa: E402
from trainer.sampling import make_denoiser, sample_ar, sample_diffusion  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*shardshuffle.*")


# ==================================================================================================
# Timing and reporting
# ==================================================================================================
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU_TIMES: dict[str, list[float]] = {}  # process CPU time of the last interleaved() call, per variant


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device,
                after: Callable[[str, Any], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall time of every variant, ``repeats`` times, interleaved: repetition r runs all variants in
    an order rotated by r, so no variant always runs first or after the same neighbour. ``after``
    (untimed) cleans up after a call. Returns (times per variant, last result per variant).

    The process CPU time of each call goes to ``CPU_TIMES``: on a shared CPU, a single-threaded
    benchmark's CPU time barely depends on the other tenants (wall time does), so its ratio is a
    noise-robust cross-check of the wall-time ratio (it omits waits: fsync, I/O, other processes)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    CPU_TIMES.clear()
    CPU_TIMES.update({n: [] for n in names})
    results: dict[str, Any] = {}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            CPU_TIMES[name].append(time.process_time() - c0)
            results[name] = out
            if after is not None:
                after(name, out)
    return times, results


def cpu_ratio(num: str, den: str) -> "Ratio":
    """Ratio.of on the CPU times of the last interleaved() call."""
    return Ratio.of(CPU_TIMES[num], CPU_TIMES[den])


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class Ratio:
    """num/den of two interleaved variants: the ratio of medians, and the range of the per-repetition
    ratios (a noise gauge: a wide range means the machine was busy)."""

    value: float
    lo: float
    hi: float

    @classmethod
    def of(cls, num: Sequence[float], den: Sequence[float]) -> "Ratio":
        paired = [a / b for a, b in zip(num, den) if b > 0]
        return cls(med(num) / med(den), min(paired, default=math.nan), max(paired, default=math.nan))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}-{self.hi:.3f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def emit(result: dict[str, Any]) -> None:
    """The machine-readable result: always the last line of stdout."""
    print(json.dumps(result, sort_keys=True, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Ratio):
        return o.value
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def goal_line(name: str, value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    cmp = ">=" if higher_is_better else "<="
    return f"{name}: {value:.3f} (goal {cmp} {goal}) {'MET' if ok else 'MISSED'}"


# ==================================================================================================
# Shared setup
# ==================================================================================================
def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int, device: torch.device = torch.device("cpu")) -> int:
    """-1 (default): one thread on a CPU run, torch's default when a GPU does the work."""
    if n < 0:
        n = 1 if device.type == "cpu" else 0
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, std 2 / sqrt(d_model). DiT zero-initialises its gates and head (an
    untrained DiT is the identity with a uniform output); random values make every position's
    prediction a real, context-dependent distribution (mean entropy ~1.7 nats of the 4.2 possible on
    the tiny config), so codecs, caches and samplers see non-degenerate inputs. Timing is the same
    either way."""
    g = torch.Generator().manual_seed(seed)
    std = 2.0 / math.sqrt(model.cfg.d_model)  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def load_or_random(cfg: RunConfig, export: str | None, seed: int, causal: bool = False) -> tuple[DiT, str]:
    """(model in eval mode on CPU, a word on where its weights came from)."""
    if export:
        from trainer.jobs.common import load_model

        model, ecfg = load_model(Path(export), "ema", expect_model=cfg.model, causal=causal)
        return model, f"export {export} (ema)"
    model = DiT(cfg.model, causal=causal)
    return randomize_(model, seed).eval(), "random init (timing does not depend on weight values)"


def x0_rows(cfg: RunConfig, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n clean sequences: the synthetic source's when the config has one, else uniform token ids
    (timing only: speed does not depend on which tokens they are)."""
    if cfg.data.source == "synthetic":
        from trainer.data import MarkovSource

        src = MarkovSource(cfg.data.synthetic)
        return torch.from_numpy(src.sample(n, seq_len, np.random.default_rng(seed)))
    return torch.randint(0, cfg.model.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def example_spec(cfg: RunConfig, round_idx: int = 1, codec: str | None = None, k: int | None = None) -> sdtt.ExampleSpec:
    """The targets job's ExampleSpec (trainer/jobs/targets.py, ``run``), for round ``round_idx``."""
    g = cfg.targets
    student_steps = round_steps(cfg, round_idx)
    return sdtt.ExampleSpec(
        seed=cfg.seed, round_idx=round_idx,
        dt=sdtt.teacher_dt(student_steps, g.teacher_steps, cfg.diffusion.sampling_eps),
        teacher_steps=g.teacher_steps, mask_id=cfg.model.vocab_size, noise_eps=cfg.diffusion.noise_eps,
        train_eps=cfg.diffusion.train_eps, t_min=cfg.diffusion.sampling_eps,
        codec=codec or g.codec, k=k if k is not None else g.k)


def bench_env() -> dict[str, str]:
    """The environment of the subprocesses (targets job, torchrun workers): one OpenMP thread per
    process (2-core CI), DeepSpeed's CPU accelerator only where there is no GPU."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        e.setdefault("DS_ACCELERATOR", "cpu")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def common_result(name: str, args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    return {"bench": name, "config": str(args.config), "overrides": list(args.overrides), "device": str(device),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "model": cfg.model.__dict__.copy(),
            "parameters": _param_count(cfg),
            "torch": torch.__version__}


# ==================================================================================================
# Target sets (loader, train): made with the real targets job, or given
# ==================================================================================================
def make_target_set(work: Path, config: Path, overrides: Sequence[str], num_samples: int,
                    per_shard: int = 64, seed: int = 0, timeout: int = 600) -> Path:
    """A round-1 target set made by ``python -m trainer.jobs.targets`` (one process) from a random
    teacher export and freshly prepared data: the same files the distill job reads."""
    from trainer.checkpoint import export_weights
    from trainer.config import save_config
    from trainer.data import prepare_data

    run = work / "run"
    cfg = load_config(config, [*overrides, f"targets.num_samples={num_samples}",
                               f"targets.samples_per_shard={per_shard}",
                               f"data.num_train_sequences={max(256, min(num_samples, 4096))}",
                               "data.num_valid_sequences=64"])
    save_config(cfg, run / "config.yaml")
    prepare_data(cfg.data, run / "data")
    model = randomize_(DiT(cfg.model), seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    export_weights(run / "teacher" / "export", state, state, cfg, step=0)
    cmd = [sys.executable, "-m", "trainer.jobs.targets", "--run-dir", str(run), "--round", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return run / "round_1" / "targets"


def shard_urls(targets: Path) -> tuple[list[str], dict[str, Any]]:
    manifest = shards.read_manifest(targets)
    return [str(targets / s["name"]) for s in manifest["shards"]], manifest


READER = "trainer.shard_reader (SampleOrder + RankReader, WebDataset) -> trainer.jobs.distill.offline_batch"


def rank_reader(targets: Path, manifest: Mapping[str, Any], cfg: RunConfig, world: int, rank: int,
                workers: int) -> tuple[Any, Any]:
    """The distill job's reader for one rank: (RankReader, Geometry). Same order, streams and
    WebDataset pipeline as trainer/jobs/distill.py (checksums are not re-verified here)."""
    from trainer import shard_reader as SR

    geo = SR.geometry(cfg.distill.global_batch_size, world, rank, cfg.distill.streams, workers)
    order = SR.SampleOrder(SR.units_of(manifest), geo.streams, cfg.seed, int(manifest["round"]),
                           resample=cfg.distill.resample)
    return SR.RankReader(targets, order, geo, workers), geo


def to_batch(samples: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], cfg: RunConfig,
             device: torch.device) -> Any:
    """Decoded samples -> the student's micro-batch (collate + codec decode), as the distill job."""
    from trainer.jobs.distill import offline_batch

    return offline_batch(list(samples), manifest["codec"], int(manifest["k"]), cfg, device)


def student_loss(forward: Callable[..., Tensor], batch: Any, cfg: RunConfig) -> Tensor:
    """The distill job's loss (trainer.jobs.distill.distill_loss): the student's one prediction on
    x_t against the coded targets, mean divergence over the masked positions."""
    from trainer.jobs.distill import distill_loss

    return distill_loss(forward, batch, cfg, cfg.distill.divergence)


# ==================================================================================================
# sampling
# ==================================================================================================
def cmd_sampling(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    L = args.seq_len or cfg.data.seq_len
    if L > cfg.model.max_seq_len:
        raise SystemExit(f"bench sampling: --seq-len {L} > model.max_seq_len={cfg.model.max_seq_len}")
    V, B = cfg.model.vocab_size, args.batch
    model, origin = load_or_random(cfg, args.export, args.seed)
    ar = DiT(cfg.model, causal=True).eval()
    ar.load_state_dict(model.state_dict())  # same shapes and names: the same-size AR model, same weights
    model, ar = model.to(device), ar.to(device)
    denoise = make_denoiser(model, V, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    # The generator lives on the sampling device by default (2 L float64 uniforms per sample and step
    # for the ancestral draw; AR's Gumbel-max draws [B, V + 1] per token); --cpu-generator draws on the
    # host, as trainer/evaluate.py does.
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


def _param_count(cfg: RunConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time (small/large configs)
        return count_parameters(DiT(cfg.model))


def _short(name: str) -> str:
    if name == "ar+kv":
        return "ar"
    return "teacher_cached" if name.endswith("+cache") else "teacher_nocache"


# ==================================================================================================
# targets
# ==================================================================================================
def cmd_targets(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.jobs.targets import build_header, write_shard

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
    per_shard = shards.samples_per_shard(g.samples_per_shard, g.shard_max_bytes,
                                         shards.max_sample_bytes(g.codec, g.k, V, L))
    plan = shards.ShardPlan(n, per_shard)
    header = build_header(cfg, args.round, teacher="bench", which="raw", teacher_sha="0" * 64,
                          data_info={"digest": "bench", "tokenizer": "bench"}, spec=spec,
                          student_steps=round_steps(cfg, args.round), per_shard=per_shard, prefix=plan.prefix)
    header["num_samples"] = n
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
        """The targets job's own shard loop (trainer/jobs/targets.py ``write_shard``): rollout + codec
        (sdtt.make_examples), ShardWriter (tar, fsync, sha256, atomic rename) one batch behind on its
        thread, then the manifest."""
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


# ==================================================================================================
# loader
# ==================================================================================================
def cmd_loader(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cpu")
    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=args.work))
    try:
        targets = Path(args.targets) if args.targets else make_target_set(work, args.config, args.overrides,
                                                                          args.samples)
        urls, manifest = shard_urls(targets)
        _check_fits(manifest, cfg, targets)
        total, world = manifest["totals"]["samples"], args.world
        # Rank 0 of a `world`-rank job, reading in this process (loader_workers=0) so that the reader's
        # own cost is what is timed; the job can move it into DataLoader workers (distill.loader_workers).
        readers = {name: rank_reader(targets, manifest, cfg, world, 0, workers=0) for name in ("raw", "batch")}
        geo = readers["raw"][1]
        per_rank = geo.per_rank
        pass_steps = args.read_steps or max(1, total // cfg.distill.global_batch_size)
        pos = {"raw": 0, "batch": 0, "workers": 0}
        if args.workers:
            # The job's own arrangement: the reader in `--workers` DataLoader processes (forkserver),
            # samples handed to this process by the DataLoader (distill.loader_workers).
            readers["workers"] = rank_reader(targets, manifest, cfg, world, 0, workers=args.workers)

        def read_decode() -> int:  # tar -> samples -> npy/json decode (shard_reader)
            reader, n = readers["raw"][0], 0
            for _ in range(pass_steps):
                n += len(reader.batch(pos["raw"]))
                pos["raw"] += 1
            return n

        def read_decode_collate() -> int:  # ... -> collate + codec decode: what a training step gets
            reader, n = readers["batch"][0], 0
            for _ in range(pass_steps):
                n += len(to_batch(reader.batch(pos["batch"]), manifest, cfg, device).indices)
                pos["batch"] += 1
            return n

        def read_workers() -> int:  # the same, read by the DataLoader workers
            reader, n = readers["workers"][0], 0
            for _ in range(pass_steps):
                n += len(to_batch(reader.batch(pos["workers"]), manifest, cfg, device).indices)
                pos["workers"] += 1
            return n

        # The student: the distill job's model and loss on one rank's micro-batch, fp32 AdamW.
        torch.manual_seed(args.seed)
        student = DiT(cfg.model).train()
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill.lr)
        pre_reader = rank_reader(targets, manifest, cfg, world, 0, workers=0)[0]
        pre = [to_batch(pre_reader.batch(i), manifest, cfg, device) for i in range(4)]

        def student_steps() -> int:
            for i in range(args.steps):
                loss = student_loss(student, pre[i % len(pre)], cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
                opt.step()
            return args.steps * per_rank

        student_steps()  # warm-up
        read_decode_collate()
        variants = {"read+decode": read_decode, "read+decode+collate": read_decode_collate, "student": student_steps}
        workers_name = f"read+decode+collate, {args.workers} DataLoader worker(s)"
        if args.workers:
            read_workers()  # warm-up: starts the worker processes
            variants[workers_name] = read_workers
        times, counts = interleaved(variants, args.repeats, device)
        for r, _ in readers.values():
            r.close()
        pre_reader.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rates = {name: counts[name] / med(t) for name, t in times.items()}
    per_sample = {name: [x / counts[name] for x in t] for name, t in times.items()}
    # loader rate / student rate = student time per sample / loader time per sample
    r_col = Ratio.of(per_sample["student"], per_sample["read+decode+collate"])
    r_dec = Ratio.of(per_sample["student"], per_sample["read+decode"])
    cpu_per_sample = {name: [x / counts[name] for x in t] for name, t in CPU_TIMES.items()}
    c_col = Ratio.of(cpu_per_sample["student"], cpu_per_sample["read+decode+collate"])
    c_dec = Ratio.of(cpu_per_sample["student"], cpu_per_sample["read+decode"])
    consume = rates["student"]
    print(f"loader: {total} samples in {len(urls)} shard(s), codec {manifest['codec']} K={manifest['k']}, "
          f"{manifest['totals']['bytes'] / max(total, 1):,.0f} bytes/sample on disk; reader: {READER} "
          f"(rank 0 of {world}, in-process); student micro-batch {per_rank} (global "
          f"{cfg.distill.global_batch_size} / {world} ranks); {torch.get_num_threads()} thread(s), "
          f"{args.repeats} interleaved repetitions")
    # The workers' CPU time is in other processes: no CPU-time ratio for that row.
    cpu_x = {"read+decode": str(c_dec), "read+decode+collate": str(c_col), "student": "1", workers_name: "-"}
    print(table(["variant", "median s", "samples", "samples/s", "x student consumption", "same, CPU time"],
                [[n, med(times[n]), counts[n], rates[n], rates[n] / consume, cpu_x[n]] for n in times]))
    print(goal_line("loader (read+decode+collate) / student consumption", r_col.value, 20.0)
          + f"  [per-repetition range {r_col.lo:.2f}-{r_col.hi:.2f}]")
    ratios = {"loader_over_student": r_col.value, "read_decode_over_student": r_dec.value}
    ranges = {"loader_over_student": [r_col.lo, r_col.hi]}
    if args.workers:
        r_w = Ratio.of(per_sample["student"], per_sample[workers_name])
        ratios["workers_loader_over_student"], ranges["workers_loader_over_student"] = r_w.value, [r_w.lo, r_w.hi]
        print(goal_line(f"the job's reader ({args.workers} DataLoader worker(s)) / student consumption", r_w.value,
                        20.0) + f"  [per-repetition range {r_w.lo:.2f}-{r_w.hi:.2f}; {os.cpu_count()} cores]")
    out = common_result("loader", args, cfg, device)
    out.update(targets=str(targets) if args.targets else "made by trainer.jobs.targets (random teacher)",
               reader=READER, shards=len(urls), samples=total, codec=manifest["codec"], k=manifest["k"],
               micro_batch=per_rank, samples_per_s=rates, workers=args.workers, ratios=ratios,
               cpu_ratios={"loader_over_student": c_col.value, "read_decode_over_student": c_dec.value},
               ratio_range=ranges, goal={"loader_over_student": 20.0})
    return out


def _check_fits(manifest: Mapping[str, Any], cfg: RunConfig, where: Path) -> None:
    if manifest["vocab_size"] != cfg.model.vocab_size or manifest["seq_len"] != cfg.data.seq_len:
        raise SystemExit(f"bench: {where} was made for vocab {manifest['vocab_size']}, length "
                         f"{manifest['seq_len']}; the config has {cfg.model.vocab_size}, {cfg.data.seq_len}")


# ==================================================================================================
# train (torchrun workers)
# ==================================================================================================
TRAIN_MODES = ("ddp", "zero1", "zero2", "zero3")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in TRAIN_MODES]
    if bad or "ddp" not in modes:
        raise SystemExit(f"bench train: --modes must include ddp and only {', '.join(TRAIN_MODES)} (got {args.modes})")
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.work))
    try:
        targets = Path(args.targets) if args.targets else make_target_set(work, args.config, args.overrides,
                                                                          args.samples)
        out_file = work / "train.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), "_train_worker", "--config", str(args.config),
               "--targets", str(targets), "--modes", ",".join(modes), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--out", str(out_file),
               "--seed", str(args.seed), "--loader-workers", str(args.loader_workers), *args.overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=args.timeout)
        if not out_file.exists():
            raise RuntimeError(f"train workers exited {proc.returncode} without a result:\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        res = json.loads(out_file.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step = {m: res["step_s"][m] for m in modes}
    ratios, spread, rows = {}, {}, []
    for m in modes:
        r = Ratio.of(step["ddp"], step[m])  # throughput(m) / throughput(ddp)
        if m != "ddp":
            ratios[f"{m}_over_ddp"], spread[f"{m}_over_ddp"] = r.value, [r.lo, r.hi]
        rows.append([m, 1e3 * med(step[m]), res["global_batch"] / med(step[m]), str(r) if m != "ddp" else "1",
                     med(res["wait_frac"][m])])
    print(f"train: student SDTT steps on {args.nproc} processes (torchrun, {res['device']}, {res['precision']}), global batch "
          f"{res['global_batch']} ({res['micro_batch']} per rank, no accumulation), {res['parameters']:,} "
          f"parameters, codec {res['codec']} K={res['k']}, loss {res['divergence']}; reader: {res['reader']}; "
          f"{args.repeats} interleaved repetitions of {args.steps} steps per mode (one process pair, all "
          f"modes built side by side)")
    print(table(["mode", "ms/step", "samples/s", "throughput / ddp", "data-wait fraction", "last loss"],
                [row + [res["last_loss"].get(row[0], math.nan)] for row in rows]))
    if "zero2" in ratios:
        print(goal_line("ZeRO-2 / DDP throughput", ratios["zero2_over_ddp"], 0.90))
    out = common_result("train", args, cfg, torch.device(res["device"].split(":")[0]))
    out.update(nproc=args.nproc, steps=args.steps, modes=modes, global_batch=res["global_batch"],
               micro_batch=res["micro_batch"], ms_per_step={m: 1e3 * med(step[m]) for m in modes},
               data_wait_frac={m: med(res["wait_frac"][m]) for m in modes}, last_loss=res["last_loss"], ratios=ratios,
               ratio_range=spread, reader=res["reader"], goal={"zero2_over_ddp": 0.90}, precision=res["precision"],
               threads=res["threads"])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_train_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    """One rank: build DDP and each ZeRO stage on identical copies of the student, then time them
    in interleaved blocks of steps fed by the distill job's reader (one stream for all modes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import dist
    from trainer.config import EngineConfig
    from trainer.engine import build_engine, resolve_precision

    info = dist.init_distributed()
    cfg = load_config(args.config, args.overrides)
    targets = Path(args.targets)
    _, manifest = shard_urls(targets)
    _check_fits(manifest, cfg, targets)
    workers = cfg.distill.loader_workers if args.loader_workers < 0 else args.loader_workers
    reader, geo = rank_reader(targets, manifest, cfg, info.world_size, info.rank, workers)
    gbs, micro = cfg.distill.global_batch_size, geo.per_rank
    dev = info.device
    modes = args.modes.split(",")
    data_step = {"k": 0}
    # engine.precision (auto: bf16 on GPUs, fp32 on CPU). DeepSpeed's bf16 keeps fp32 master weights;
    # the DDP baseline's equivalent is fp32 weights under bf16 autocast.
    precision = resolve_precision(cfg.engine.precision)
    amp = precision == "bf16"

    def next_batch() -> Any:
        b = to_batch(reader.batch(data_step["k"]), manifest, cfg, dev)
        data_step["k"] += 1
        return b

    torch.manual_seed(args.seed)
    base = DiT(cfg.model)
    steppers: dict[str, Callable[[Any], float]] = {}
    for mode in modes:
        model = copy.deepcopy(base)
        if mode == "ddp":
            ddp = DDP(model.to(dev))
            opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.distill.lr, betas=tuple(cfg.optim.betas),
                                    eps=cfg.optim.eps, weight_decay=cfg.distill.weight_decay)

            def ddp_step(b: Any, ddp=ddp, opt=opt) -> float:
                # What Engine.train_step does around the same math: clip, step, the global mean loss.
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss = student_loss(ddp, b, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.optim.grad_clip)
                opt.step()
                return dist.all_reduce_mean(loss.item())

            steppers[mode] = ddp_step
        else:
            eng_cfg = EngineConfig(zero_stage=int(mode[-1]), precision=precision, global_batch_size=gbs,
                                   micro_batch_size=micro)
            optim = dataclasses.replace(cfg.optim, weight_decay=cfg.distill.weight_decay)
            # No EMA: the comparison is the parallelism strategy (DDP has none either).
            engine = build_engine(model, optim, eng_cfg, 10**9, info.world_size, lr=cfg.distill.lr,
                                  warmup_steps=0, global_batch_size=gbs, ema_decay=None, key="distill")

            def zero_step(b: Any, engine=engine) -> float:
                return engine.train_step(lambda e, mb: student_loss(e, mb, cfg), [b])["loss"]

            steppers[mode] = zero_step

    for mode in modes:  # warm-up: first steps allocate buffers and optimizer state
        for _ in range(args.warmup):
            steppers[mode](next_batch())
    step_s: dict[str, list[float]] = {m: [] for m in modes}
    wait: dict[str, list[float]] = {m: [] for m in modes}
    losses: dict[str, float] = {}
    for r in range(args.repeats):
        k_rot = r % len(modes)
        for mode in modes[k_rot:] + modes[:k_rot]:
            dist.barrier()
            waited, t0 = 0.0, time.perf_counter()
            for _ in range(args.steps):
                tw = time.perf_counter()
                b = next_batch()  # read + decode + collate, as the job's micro_batches()
                waited += time.perf_counter() - tw
                losses[mode] = steppers[mode](b)
            dist.barrier()
            dt = time.perf_counter() - t0
            step_s[mode].append(dt / args.steps)
            wait[mode].append(waited / dt)
    reader.close()
    result = {"step_s": step_s, "wait_frac": wait, "last_loss": losses, "global_batch": gbs, "micro_batch": micro,
              "parameters": count_parameters(base), "codec": manifest["codec"], "k": manifest["k"],
              "divergence": cfg.distill.divergence, "reader": f"{READER}, {workers} DataLoader worker(s) per rank",
              "precision": precision, "device": str(dev),
              "threads": torch.get_num_threads()}
    if info.is_main:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)
    dist.barrier()
    dist.cleanup()
    return None


# ==================================================================================================
# storage
# ==================================================================================================
def cmd_storage(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.data import MarkovSource
    from trainer.metrics_quality import markov_quality

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    if cfg.data.source != "synthetic":
        raise SystemExit("bench storage: the quality part needs the synthetic source (exact NLL): use the tiny config")
    V, L = cfg.model.vocab_size, cfg.data.seq_len
    src = MarkovSource(cfg.data.synthetic)

    # --- the teacher -------------------------------------------------------------------------
    if args.teacher:
        from trainer.jobs.common import load_model

        teacher, _ = load_model(Path(args.teacher), "ema", expect_model=cfg.model)
        teacher_origin = f"export {args.teacher}"
        probe = perturbed(teacher, 0.05, args.seed)
        probe_origin = "the teacher with 5% relative Gaussian noise on every weight"
    else:
        teacher, probe = pretrain_tiny(cfg, src, args.teacher_steps, args.seed, device)
        teacher_origin = f"pretrained here: {args.teacher_steps} MDLM steps x batch {cfg.engine.global_batch_size}"
        probe_origin = f"the teacher's snapshot at step {args.teacher_steps // 2}"
    teacher = teacher.to(device).eval()
    tden = make_denoiser(teacher, V, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    student_steps = round_steps(cfg, 1)

    # --- sizes -------------------------------------------------------------------------------
    probe_x0 = x0_rows(cfg, 64, L, args.seed + 1)
    base_spec = example_spec(cfg, 1, codec="dense", k=V)
    dense_ex = sdtt.make_examples(tden, probe_x0.to(device), list(range(64)), base_spec)
    lp = torch.cat([torch.from_numpy(e.fields["logp"]) for e in dense_ex])  # [M, V] teacher targets
    p = lp.double().exp()
    tail = {kk: float((1 - torch.topk(p, kk, dim=-1).values.sum(-1)).clamp(min=0).mean()) for kk in args.k if kk < V}
    distinct = {kk: float(codecs.expected_distinct(p, kk).mean()) for kk in args.k}
    size_rows, sizes = [], {}
    for vocab in (V, codecs.GPT2_VOCAB):
        size_rows.append([f"dense (V={vocab})", "-", codecs.bytes_per_position("dense", 1, vocab), "-", "-"])
        sizes[f"dense@V{vocab}"] = codecs.bytes_per_position("dense", 1, vocab)
        for kk in args.k:
            if kk < vocab:
                b = codecs.bytes_per_position("topk", kk, vocab)
                sizes[f"topk{kk}@V{vocab}"] = b
                size_rows.append([f"topk (V={vocab})", kk, b, tail.get(kk, math.nan) if vocab == V else "n/a", "-"])
        for kk in args.k:
            worst = codecs.bytes_per_position("sampled", kk, vocab)
            meas = codecs.bytes_per_position("sampled", kk, vocab, distinct[kk]) if vocab == V else math.nan
            sizes[f"sampled{kk}@V{vocab}"] = worst
            size_rows.append([f"sampled (V={vocab})", kk, worst, "-", meas])
    print(f"storage: bytes per stored masked position (codec payload only; npy/tar headers excluded; ids "
          f"{codecs.id_dtype(V).name}); teacher: {teacher_origin}")
    print(table(["codec", "K", "bytes/position (worst)", "mean tail mass (this teacher)",
                 "bytes/position (measured distinct ids)"], size_rows))

    # --- quality: one short distillation round per codec, same data, same draws ---------------
    candidates = [("dense", V, "rkl")] + [("topk", kk, "rkl") for kk in args.k if kk < V]
    if not args.no_sampled:
        candidates += [("dense", V, "fkl")] + [("sampled", kk, "fkl") for kk in args.k]
    heldout = x0_rows(cfg, cfg.distill.global_batch_size, L, args.seed + 2)
    names = [f"{c}{'' if c == 'dense' else kk}/{kind}" for c, kk, kind in candidates]
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    kept_cos = {n: divergence_kept(probe.to(device), tden, heldout, cfg, c, kk, kind, device)
                for n, (c, kk, kind) in zip(names, candidates)}
    student_t0 = time.perf_counter()
    for i in range(args.seeds):
        # Seed i: its own data rows and sample indices (so t, masks and teacher draws), the same for
        # every codec; evaluation always with the same sampling seed (common random numbers).
        for n, (codec, kk, kind) in zip(names, candidates):
            student = distill_short(teacher, tden, cfg, src, codec, kk, kind, args.distill_steps,
                                    args.seed + 1000 * i, device, index_offset=i * 10**7)
            x = draw(student, cfg, student_steps, args.eval_samples, args.seed + 3, device)
            q = markov_quality(src, x)
            per_seed[n].append({"nll": q["nll"], "entropy": q["entropy"], "bigram_kl": q.get("bigram_kl", math.nan),
                                "per_seq": src.nll_per_token(x.numpy())})
            print(f"  [storage] seed {i} {n}: NLL {q['nll']:.4f} +- {q['nll_se']:.4f}, entropy {q['entropy']:.4f} "
                  f"({time.perf_counter() - student_t0:.0f} s)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - student_t0
    tq = {n: markov_quality(src, draw(teacher, cfg, n, args.eval_samples, args.seed + 3, device))
          for n in (student_steps, 2 * student_steps)}
    results: dict[str, dict[str, Any]] = {}
    rows, ratios = [], {}
    for n, (codec, kk, kind) in zip(names, candidates):
        ref = f"dense/{kind}"
        runs, refs = per_seed[n], per_seed[ref]
        costs = [(a["nll"] - b["nll"]) / b["nll"] for a, b in zip(runs, refs)]
        cost = float(np.mean(costs))
        if n == ref:
            cost_se = 0.0
        elif len(costs) > 1:  # spread over seeds: training noise and evaluation noise together
            cost_se = float(np.std(costs, ddof=1) / math.sqrt(len(costs)))
        else:  # one run: the evaluation's paired standard error only (misses training noise)
            d = runs[0]["per_seq"] - refs[0]["per_seq"]
            cost_se = float(d.std(ddof=1) / math.sqrt(len(d)) / refs[0]["nll"])
        bound = cost + _t975(len(costs)) * cost_se
        mean = lambda key, rs=runs: float(np.mean([r[key] for r in rs]))  # noqa: E731
        ent_change = (mean("entropy") - mean("entropy", refs)) / mean("entropy", refs)
        results[n] = {"codec": codec, "k": kk, "divergence": kind, "nll": mean("nll"), "nll_per_seed":
                      [r["nll"] for r in runs], "entropy": mean("entropy"), "entropy_change": ent_change,
                      "bigram_kl": mean("bigram_kl"), "divergence_kept": kept_cos[n][0],
                      "grad_cosine": kept_cos[n][1], "quality_cost": cost, "quality_cost_se": cost_se,
                      "quality_cost_bound95": bound, "quality_cost_per_seed": costs,
                      "bytes_per_position": sizes.get(f"{codec}{kk}@V{codecs.GPT2_VOCAB}",
                                                      codecs.bytes_per_position(codec, kk, codecs.GPT2_VOCAB))}
        if n != ref:
            ratios[f"{n.replace('/', '_')}_quality_cost"] = cost
        rows.append([n, results[n]["bytes_per_position"], kept_cos[n][0], kept_cos[n][1], mean("nll"),
                     f"{100 * cost:+.2f}% +- {100 * cost_se:.2f}" if n != ref else "-",
                     " ".join(f"{100 * c:+.1f}" for c in costs) if n != ref else "-",
                     f"{100 * ent_change:+.2f}%" if n != ref else "-", mean("bigram_kl")])
    print(f"\nprobe student for 'divergence kept' and 'grad cosine': {probe_origin}")
    print(f"quality: {args.seeds} seed(s) x one SDTT round per codec (teacher {2 * student_steps} -> student "
          f"{student_steps} steps, {args.distill_steps} steps x batch {cfg.distill.global_batch_size}, lr "
          f"{cfg.distill.lr}; per seed the same data and teacher draws for every codec), then exact NLL "
          f"(nats/token) of {args.eval_samples} samples at {student_steps} steps, same sampling seed. Cost = "
          f"relative NLL difference to the dense student of the same divergence (mean +- se over seeds; < 0: "
          f"lower NLL). divergence kept = coded loss / dense loss, grad cosine = cos(grad coded, grad dense), "
          f"both for the probe student on a held-out batch. bytes/pos at V=50257. ({elapsed:.0f} s)")
    print(table(["targets/divergence", "bytes/pos", "divergence kept", "grad cosine", "student NLL",
                 "NLL cost vs dense", "per seed, %", "entropy vs dense", "bigram KL"], rows))
    print(f"teacher before the round: NLL {tq[student_steps]['nll']:.4f} at {student_steps} steps, "
          f"{tq[2 * student_steps]['nll']:.4f} at {2 * student_steps} steps (source floor "
          f"{src.sequence_entropy_per_token(L):.4f}); entropy {tq[student_steps]['entropy']:.4f}, bigram KL "
          f"{tq[student_steps].get('bigram_kl', math.nan):.4f} at {student_steps} steps")
    # Met = at most 40 bytes/position at GPT-2's vocabulary (where storage matters), the upper 95% bound
    # of the NLL cost within 1% (a cost "within noise" of a noisy estimate does not count) AND at most
    # 1% of the sample entropy lost: a sparse code can lower the NLL by making the student sharper
    # (mode-seeking), which is lost diversity, not quality.
    goal = "<= 40 bytes/position at V=50257, NLL cost <= 1% at 95%, entropy loss <= 1%"
    best = sorted((r["bytes_per_position"], n) for n, r in results.items()
                  if r["codec"] != "dense" and r["bytes_per_position"] <= 40 and r["quality_cost_bound95"] <= 0.01
                  and r["entropy_change"] >= -0.01)
    for b, n in best:
        r = results[n]
        print(f"goal ({goal}): MET by {n} ({b:.0f} bytes/position worst case; NLL cost "
              f"{100 * r['quality_cost']:+.2f}% +- {100 * r['quality_cost_se']:.2f}, 95% bound "
              f"{100 * r['quality_cost_bound95']:+.2f}%; entropy {100 * r['entropy_change']:+.2f}%)")
    if not best:
        print(f"goal ({goal}): MISSED on this run")
    out = common_result("storage", args, cfg, device)
    out.update(teacher=teacher_origin, probe_student=probe_origin, bytes_per_position=sizes, tail_mass=tail,
               distinct_ids=distinct,
               quality=results, teacher_nll={str(k): v["nll"] for k, v in tq.items()}, ratios=ratios,
               distill_steps=args.distill_steps, eval_samples=args.eval_samples, seeds=args.seeds,
               goal={"bytes_per_position": 40, "quality_cost": 0.01, "entropy_loss": 0.01},
               goal_met=[n for _, n in best])
    return out


def pretrain_tiny(cfg: RunConfig, src: Any, steps: int, seed: int, device: torch.device) -> tuple[DiT, DiT]:
    """A teacher for the quality measurement: plain single-process MDLM training (the pretrain job's
    loss: trainer.diffusion), AdamW with the config's lr and warm-up. Returns (the teacher, its
    snapshot at half the steps: a model that really differs from it, to probe the losses with)."""
    torch.manual_seed(seed)
    model = DiT(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.optim.warmup_steps)))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    V, eps, B = cfg.model.vocab_size, cfg.diffusion.noise_eps, cfg.engine.global_batch_size
    half = None
    for i in range(steps):
        if i == steps // 2:
            half = copy.deepcopy(model).eval()
        x0 = torch.from_numpy(src.sample(B, cfg.data.seq_len, rng)).to(device)
        t = diffusion.sample_times(B, gen, cfg.diffusion.train_eps, cfg.diffusion.antithetic)
        xt = diffusion.mask_tokens(x0, t, V, eps, gen)
        loss = diffusion.elbo_nll_at(diffusion.masked_log_probs(model(xt, rows=xt == V), V), x0, xt, t, V, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return model.eval(), (half if half is not None else copy.deepcopy(model).eval())


def coded_batch(tden: Callable, x0: Tensor, indices: Sequence[int], spec: sdtt.ExampleSpec, cfg: RunConfig,
                device: torch.device) -> Any:
    """Teacher targets for a batch through a codec and back (what a shard round trip gives the
    student, minus the tar): sdtt.make_examples -> the distill job's collate + codec decode."""
    exs = sdtt.make_examples(tden, x0.to(device), list(indices), spec)
    samples = [{"key": shards.sample_key(e.index), "xt": e.xt, "meta": e.meta(), **e.fields} for e in exs]
    from trainer.jobs.distill import offline_batch

    return offline_batch(samples, spec.codec, spec.k, cfg, device)


def divergence_kept(probe: DiT, tden: Callable, x0: Tensor, cfg: RunConfig, codec: str, k: int, kind: str,
                    device: torch.device) -> tuple[float, float]:
    """On one held-out batch, for a probe student that really differs from the teacher (at the
    round's start the student IS the teacher and the dense loss is ~0, so any ratio would be noise):
    (coded loss / dense loss, cosine between the gradients of the coded and the dense loss). The
    value ratio is NaN for the sampled code: its forward KL is off by a student-independent offset
    (trainer.sdtt.sparse_divergence), only its gradient is comparable."""
    V = cfg.model.vocab_size
    idx = range(10**6, 10**6 + x0.shape[0])  # indices no training batch uses
    student = copy.deepcopy(probe).train()
    kcfg = _with_divergence(cfg, kind)
    grads, values = [], []
    for c, kk in ((codec, k), ("dense", V)):
        b = coded_batch(tden, x0, idx, example_spec(cfg, 1, codec=c, k=kk), cfg, device)
        student.zero_grad(set_to_none=True)
        loss = student_loss(student, b, kcfg)
        loss.backward()
        values.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    kept = values[0] / values[1] if values[1] and codec != "sampled" else math.nan
    return kept, cos


def perturbed(model: DiT, rel: float, seed: int) -> DiT:
    """A copy with N(0, (rel * std(w))^2) noise added to every weight tensor w."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() > 1:
                p.add_(rel * float(p.std()) * torch.randn(p.shape, generator=g).to(p.device))
    return out


def _with_divergence(cfg: RunConfig, kind: str) -> RunConfig:
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, divergence=kind))


def _t975(n: int) -> float:
    """Two-sided 95% Student t quantile for the mean of n runs (n - 1 degrees of freedom); 2 for one
    run, whose standard error is then the evaluation's paired one."""
    table_ = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    return table_.get(n, 2.0 if n < 2 else 1.96 + 2.4 / n)


def distill_short(teacher: DiT, tden: Callable, cfg: RunConfig, src: Any, codec: str, k: int, kind: str,
                  steps: int, seed: int, device: torch.device, index_offset: int = 0) -> DiT:
    """One SDTT round with coded targets: the student starts as the teacher; every codec sees the
    same x0 rows and sample indices, hence the same t, masks and teacher draws."""
    B = cfg.distill.global_batch_size
    spec = example_spec(cfg, 1, codec=codec, k=k)
    kcfg = _with_divergence(cfg, kind)
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill.lr, betas=tuple(cfg.optim.betas))
    warm = max(1, cfg.distill.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng(seed + 17)
    for step in range(steps):
        x0 = torch.from_numpy(src.sample(B, cfg.data.seq_len, rng))
        batch = coded_batch(tden, x0, range(index_offset + step * B, index_offset + (step + 1) * B), spec, cfg, device)
        loss = student_loss(student, batch, kcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return student.eval()


def draw(model: DiT, cfg: RunConfig, steps: int, n: int, seed: int, device: torch.device) -> Tensor:
    from trainer.evaluate import draw_samples

    x, _ = draw_samples(model, cfg, steps, n, seed, device)
    return x


# ==================================================================================================
# Command line
# ==================================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, help_: str, repeats: int, threads: int = -1) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        s.add_argument("--repeats", type=int, default=repeats, help="interleaved repetitions (medians)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=threads, help="torch threads; default -1: 1 on a CPU run (on a shared CPU, OpenMP threads waiting for a "
                       "busy core made every op up to 10x slower), torch's default on a GPU run; 0: torch's default")
        s.add_argument("--work", default=None, help="folder for temporary files (default: the system's)")
        s.add_argument("overrides", nargs="*", help="key=value config overrides")
        return s

    s = add("sampling", "student 8-64 steps vs the 1024-step teacher vs AR with a KV cache", 5)
    s.add_argument("--device", default=None)
    s.add_argument("--export", default=None, help="an export dir (model.safetensors...) instead of random weights")
    s.add_argument("--seq-len", type=int, default=0, help="default: data.seq_len")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--student-steps", type=int, nargs="+", default=[8, 16, 32, 64])
    s.add_argument("--teacher-steps", type=int, default=1024)
    s.add_argument("--no-uncached-teacher", action="store_true",
                   help="skip the teacher without the cache (the slowest variant)")
    s.add_argument("--breakdown", action="store_true",
                   help="also time one denoiser call against one ancestral draw at the same shapes")
    s.add_argument("--cpu-generator", action="store_true",
                   help="draw the sampling noise on the CPU even when sampling on a GPU (as trainer.evaluate does)")

    s = add("targets", "target generation (targets job path) vs bare teacher forwards", 5)
    s.add_argument("--device", default=None)
    s.add_argument("--export", default=None)
    s.add_argument("--samples", type=int, default=256)
    s.add_argument("--round", type=int, default=1)
    s.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N cProfile entries")

    s = add("train", "student steps: DeepSpeed ZeRO-1/2/3 vs torch DDP, 2 processes", 5)
    s.add_argument("--targets", default=None, help="a target set (default: make a small one)")
    s.add_argument("--samples", type=int, default=512, help="size of the target set made when --targets is absent")
    s.add_argument("--modes", default=",".join(TRAIN_MODES))
    s.add_argument("--steps", type=int, default=10, help="steps per mode per repetition")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--nproc", type=int, default=2)
    s.add_argument("--timeout", type=int, default=1800)
    s.add_argument("--loader-workers", type=int, default=-1,
                   help="DataLoader workers per rank for the reader (default: distill.loader_workers)")

    s = add("loader", "WebDataset read + decode of target shards vs student consumption", 5)
    s.add_argument("--targets", default=None)
    s.add_argument("--samples", type=int, default=1024)
    s.add_argument("--steps", type=int, default=5, help="student steps per repetition")
    s.add_argument("--read-steps", type=int, default=0,
                   help="reader steps per repetition (default: one epoch of the set)")
    s.add_argument("--world", type=int, default=2, help="ranks the global batch is split over")
    s.add_argument("--workers", type=int, default=0,
                   help="also time the job's reader in this many DataLoader worker processes (distill.loader_workers)")

    s = add("storage", "bytes per position per codec/K, and the quality cost vs dense targets", 1)
    s.add_argument("--device", default=None)
    s.add_argument("--teacher", default=None, help="a trained teacher export (default: pretrain a tiny one)")
    s.add_argument("--teacher-steps", type=int, default=1500)
    s.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    s.add_argument("--no-sampled", action="store_true",
                   help="skip the sampled codec (forward KL only, compared with dense forward KL)")
    s.add_argument("--distill-steps", type=int, default=300)
    s.add_argument("--eval-samples", type=int, default=1024)
    s.add_argument("--seeds", type=int, default=3, help="distillation runs per codec (training noise)")

    w = sub.add_parser("_train_worker")  # internal: one torchrun rank of `train`
    for a in ("--config", "--targets", "--modes", "--out"):
        w.add_argument(a, required=True)
    for a in ("--steps", "--repeats", "--warmup", "--seed", "--loader-workers"):
        w.add_argument(a, type=int, required=True)
    w.add_argument("overrides", nargs="*")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any] | None]] = {
    "sampling": cmd_sampling, "targets": cmd_targets, "train": cmd_train, "loader": cmd_loader,
    "storage": cmd_storage, "_train_worker": cmd_train_worker,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "_train_worker":
        cmd_train_worker(args)
        return 0
    result = COMMANDS[args.cmd](args)
    if result is not None:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
