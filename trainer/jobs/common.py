"""What every job entry point shares: the command line, the run's config, and where things live."""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

from trainer.config import RunConfig, load_config, save_config

log = logging.getLogger("sdtt")


def parse_args(description: str, with_round: bool = False, argv: list[str] | None = None,
               flags: dict[str, str] | None = None) -> argparse.Namespace:
    """The common command line; ``flags`` adds boolean options (name -> help)."""
    p = argparse.ArgumentParser(description=description)
    for flag, help_text in (flags or {}).items():
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config; defaults to <run-dir>/config.yaml when that exists")
    if with_round:
        p.add_argument("--round", type=int, required=True, help="SDTT round (1-based; 0 = the teacher)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")  # set by torchrun or the SLURM job wrapper (cluster/slurm.py)
    # Rank 0 tells the story; the others speak up only for warnings and errors.
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    # ZeRO's collectives under torch 2.13 emit FutureWarnings on every call.
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_config(args: argparse.Namespace, write: bool = False) -> RunConfig:
    """The run's config: the run folder's config.yaml (the resolved config of the whole pipeline)
    unless --config names another, plus command-line overrides. ``write`` saves it into the run
    folder when the folder has none yet (the first stage of a run)."""
    saved = args.run_dir / "config.yaml"
    path = args.config if args.config is not None else (saved if saved.exists() else None)
    cfg = load_config(path, args.overrides)
    if write and not saved.exists():
        save_config(cfg, saved)
    return cfg


def teacher_export(run_dir: Path, round_idx: int) -> Path:
    """The weights round ``round_idx`` distils from: the teacher for round 1, else the previous
    round's student. Round 0 means the teacher itself."""
    if round_idx <= 1:
        return run_dir / "teacher" / "export"
    return student_export(run_dir, round_idx - 1)


def teacher_weights(cfg: RunConfig, round_idx: int) -> str:
    """Which exported weights teach round ``round_idx``: the pretrained/imported teacher's EMA (or
    raw, ``targets.use_ema``) in round 1; after that the previous student's raw weights, or its EMA
    with ``distill.ema_as_teacher`` (SDTT: "the teacher becomes the student, optionally its EMA")."""
    if round_idx <= 1:
        return "ema" if cfg.targets.use_ema else "raw"
    return "ema" if cfg.distill.ema_as_teacher else "raw"


def student_export(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f"round_{round_idx}" / "student" / "export"


def model_export(run_dir: Path, round_idx: int) -> Path:
    """The model evaluated for round ``round_idx``: the teacher for 0, the round's student after."""
    return run_dir / "teacher" / "export" if round_idx == 0 else student_export(run_dir, round_idx)


def eval_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / ("teacher" if round_idx == 0 else f"round_{round_idx}") / "eval"


def load_model(export_dir: Path, which: str = "ema", expect_model=None, causal: bool = False):
    """An exported model, verified (sha256, names, shapes), in eval mode on CPU: (model, its config)."""
    from trainer.model.dit import DiT
    from trainer.runtime.checkpoint import load_exported

    state, cfg = load_exported(export_dir, which, expect_model)
    model = DiT(cfg.model, causal=causal)
    model.load_state_dict(state)
    return model.eval(), cfg


def device() -> torch.device:  # noqa: F821
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def entry(main, *job_errors: type[Exception]) -> None:
    """Run a job's main: bad input (config, data, checkpoint, shards) ends with one clear line
    naming the key or file and exit code 2, not a traceback; preemption passes its code through."""
    import sys

    from trainer.config import ConfigError
    from trainer.data.prepared import DataError
    from trainer.data.tokenizers import TokenizerError
    from trainer.evaluation.quality import JudgeError
    from trainer.model.mdlm_import import MDLMImportError
    from trainer.runtime.checkpoint import CheckpointError
    from trainer.targets.codecs import CodecError
    from trainer.targets.shards import ShardError

    bad_input = (ConfigError, DataError, CheckpointError, CodecError, ShardError, MDLMImportError, JudgeError,
                 TokenizerError, FileNotFoundError, *job_errors)
    try:
        sys.exit(main())
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
