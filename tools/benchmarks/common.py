"""Setup shared by the benchmarks: devices and threads, models and data rows, the targets job's
example spec, and real target sets made by (or read like) the jobs."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import RunConfig, load_config
from trainer.layout import RunLayout
from trainer.method import sdtt
from trainer.model.dit import DiT, count_parameters
from trainer.targets import header, shards

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"


def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int, device: torch.device | None = None) -> int:
    """-1 (default): one thread on a CPU run, torch's default when a GPU does the work."""
    if n < 0:
        n = 1 if device is None or device.type == "cpu" else 0
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
        from trainer.runtime.checkpoint import load_model

        model, ecfg = load_model(Path(export), "ema", expect_model=cfg.model, causal=causal)
        return model, f"export {export} (ema)"
    model = DiT(cfg.model, causal=causal)
    return randomize_(model, seed).eval(), "random init (timing does not depend on weight values)"


def x0_rows(cfg: RunConfig, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n clean sequences: the synthetic source's when the config has one, else uniform token ids
    (timing only: speed does not depend on which tokens they are)."""
    if cfg.data.source == "synthetic":
        from trainer.data.synthetic import MarkovSource

        src = MarkovSource(cfg.data.synthetic)
        return torch.from_numpy(src.sample(n, seq_len, np.random.default_rng(seed)))
    return torch.randint(0, cfg.model.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def example_spec(cfg: RunConfig, round_idx: int = 1, codec: str | None = None,
                 k: int | None = None) -> sdtt.ExampleSpec:
    """The targets job's ExampleSpec (trainer.targets.header.example_spec), for round ``round_idx``."""
    return header.example_spec(cfg, round_idx, codec=codec or None, k=k)


def bench_env() -> dict[str, str]:
    """The environment of the subprocesses (targets job, torchrun workers): one OpenMP thread per
    process (2-core CI), DeepSpeed's CPU accelerator only where there is no GPU."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        e.setdefault("DS_ACCELERATOR", "cpu")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def _repo_relative(path: Any) -> str:
    """A path inside the repository as repository-relative (results hold no machine's paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(path)


def common_result(name: str, args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    return {"bench": name, "config": _repo_relative(args.config), "overrides": list(args.overrides),
            "device": str(device),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "model": cfg.model.__dict__.copy(),
            "parameters": _param_count(cfg),
            "torch": torch.__version__}



def make_target_set(work: Path, config: Path, overrides: Sequence[str], num_samples: int,
                    per_shard: int = 64, seed: int = 0, timeout: int = 600) -> Path:
    """A round-1 target set made by ``python -m trainer.jobs.targets`` (one process) from a random
    teacher export and freshly prepared data: the same files the distill job reads."""
    from trainer.config import save_config
    from trainer.data.prepared import prepare_data
    from trainer.runtime.checkpoint import export_weights

    run = work / "run"
    cfg = load_config(config, [*overrides, f"targets.num_samples={num_samples}",
                               f"targets.samples_per_shard={per_shard}",
                               f"data.num_train_sequences={max(256, min(num_samples, 4096))}",
                               "data.num_valid_sequences=64"])
    layout = RunLayout(run)
    save_config(cfg, layout.config)
    prepare_data(cfg.data, layout.data)
    model = randomize_(DiT(cfg.model), seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    export_weights(layout.export(0), state, state, cfg, step=0)
    cmd = [sys.executable, "-m", "trainer.jobs.targets", "--run-dir", str(run), "--round", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return layout.targets(1)


def shard_urls(targets: Path) -> tuple[list[str], dict[str, Any]]:
    manifest = shards.read_manifest(targets)
    return [str(targets / s["name"]) for s in manifest["shards"]], manifest


READER = "trainer.targets.reader (SampleOrder + RankReader, WebDataset) -> trainer.distill.batches.offline_batch"


def rank_reader(targets: Path, manifest: Mapping[str, Any], cfg: RunConfig, world: int, rank: int,
                workers: int) -> tuple[Any, Any]:
    """The distill job's reader for one rank: (RankReader, Geometry). Same order, streams and
    WebDataset pipeline as the distill job (checksums are not re-verified here)."""
    from trainer.targets import reader

    geo = reader.geometry(cfg.distill.global_batch_size, world, rank, cfg.distill.streams, workers)
    order = reader.SampleOrder(reader.units_of(manifest), geo.streams, cfg.seed, int(manifest["round"]),
                           resample=cfg.distill.resample)
    return reader.RankReader(targets, order, geo, workers), geo


def to_batch(samples: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], cfg: RunConfig,
             device: torch.device) -> Any:
    """Decoded samples -> the student's micro-batch (collate + codec decode), as the distill job."""
    from trainer.distill.batches import offline_batch

    return offline_batch(list(samples), manifest["codec"], int(manifest["k"]), cfg, device)


def student_loss(forward: Callable[..., Tensor], batch: Any, cfg: RunConfig) -> Tensor:
    """The distill job's loss (trainer.distill.batches.distill_loss): the student's one prediction on
    x_t against the coded targets, mean divergence over the masked positions."""
    from trainer.distill.batches import distill_loss

    return distill_loss(forward, batch, cfg, cfg.distill.divergence)




def _param_count(cfg: RunConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time (small/large configs)
        return count_parameters(DiT(cfg.model))


def check_fits(manifest: Mapping[str, Any], cfg: RunConfig, where: Path) -> None:
    if manifest["vocab_size"] != cfg.model.vocab_size or manifest["seq_len"] != cfg.data.seq_len:
        raise SystemExit(f"bench: {where} was made for vocab {manifest['vocab_size']}, length "
                         f"{manifest['seq_len']}; the config has {cfg.model.vocab_size}, {cfg.data.seq_len}")


