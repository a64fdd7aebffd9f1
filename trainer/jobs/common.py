"""What every job entry point shares: the command line, logging, the run's config, the device and
the error exit."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from trainer import runlock
from trainer.config import RunConfig, load_config, save_config
from trainer.errors import BadInput
from trainer.fileio import disk_full, is_disk_full
from trainer.layout import EXIT_BAD_INPUT, EXIT_HUNG, RunLayout

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
    rank = os.environ.get("RANK", "0")  # set by torchrun or the SLURM job wrapper (cluster/stage_job.py)
    # Rank 0 tells the story; the others speak up only for warnings and errors.
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    # ZeRO's collectives under torch 2.13 emit FutureWarnings on every call.
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_config(args: argparse.Namespace, write: bool = False) -> RunConfig:
    """The run's config: the run folder's config.yaml (the resolved config of the whole pipeline)
    unless --config names another, plus command-line overrides. ``write`` saves it into the run
    folder when the folder has none yet (the first stage of a run)."""
    saved = RunLayout(args.run_dir).config
    path = args.config if args.config is not None else (saved if saved.exists() else None)
    cfg = load_config(path, args.overrides)
    if write and not saved.exists():
        save_config(cfg, saved)
    return cfg


def device() -> torch.device:  # noqa: F821
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _run_dir(argv: list[str]) -> Path | None:
    """The job's --run-dir, read before its own parser runs (that one reports a missing flag)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--run-dir", type=Path, default=None)
    return p.parse_known_args(argv)[0].run_dir


def entry(main) -> None:
    """Run a job's main under the run folder's lock (trainer/runlock.py: inside the chain that holds
    it, or taking it when started by hand). Each of these ends with one line on stderr,
    ``error (rank r): ...``, not a traceback:

    * bad input (config, data, checkpoint, shards: any ``trainer.errors.BadInput``, or a missing
      file), a folder in use, or a full disk (``trainer.fileio.DiskFull``, naming the file; an
      ENOSPC that no write site named names the run folder): exit code 2;
    * a collective that waited longer than ``engine.collective_timeout_s`` (another rank hangs or
      died): ``EXIT_HUNG``.

    Any other code (``EXIT_PREEMPTED``) passes through."""
    run_dir = None
    try:
        run_dir = _run_dir(sys.argv[1:])
        what = f"job trainer.jobs.{Path(sys.argv[0]).stem}"
        with (runlock.for_job(run_dir, what, log=lambda m: print(m, file=sys.stderr)) if run_dir
              else contextlib.nullcontext()):
            code = main()
        sys.exit(code)
    except (BadInput, FileNotFoundError) as e:
        _one_line(e, EXIT_BAD_INPUT)
    except Exception as e:
        if is_disk_full(e, run_dir):
            _one_line(disk_full(getattr(e, "filename", None) or run_dir or Path.cwd(), e), EXIT_BAD_INPUT)
        from trainer.runtime import dist

        if dist.is_collective_timeout(e):
            _one_line(f"a collective operation waited longer than engine.collective_timeout_s="
                      f"{dist.collective_timeout_s():g} s: another rank hangs or died (stopped, lost node, "
                      f"deadlock); stopping this job so it can be rerun (it resumes from its last checkpoint) "
                      f"[{str(e).splitlines()[0][:200]}]", EXIT_HUNG)
        raise


def _one_line(message: object, code: int) -> None:
    rank = os.environ.get("RANK", "0")  # set by torchrun or the SLURM job wrapper (cluster/stage_job.py)
    try:
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr is a log file on the full disk: the exit code still says it
        pass
    sys.exit(code)
