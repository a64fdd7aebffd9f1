"""Benchmarks: speed and storage targets, measured as RATIOS side by side in one run.

    python tools/bench.py sampling [--config configs/tiny.yaml] [--device cpu] [--seq-len L] [--batch 8]
                                   [--export EXPORT] [--ar-export RUN/ar/export]
    python tools/bench.py targets  [--config ...] [--samples N] [--profile]
    python tools/bench.py train    [--config ...] [--targets DIR] [--modes ddp,zero1,zero2,zero3]
    python tools/bench.py loader   [--config ...] [--targets DIR]
    python tools/bench.py storage  [--config ...] [--teacher EXPORT_DIR]
    python tools/bench.py tokenize [--tokenizer bpe|byte|DIR] [--workers 1 2 4] [--mb 4] [GLOB ...]

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
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.benchmarks.common import DEFAULT_CONFIG  # noqa: E402
from tools.benchmarks.loader import cmd_loader  # noqa: E402
from tools.benchmarks.sampling import cmd_sampling  # noqa: E402
from tools.benchmarks.storage import cmd_storage  # noqa: E402
from tools.benchmarks.targets import cmd_targets  # noqa: E402
from tools.benchmarks.timing import emit  # noqa: E402
from tools.benchmarks.tokenize import cmd_tokenize  # noqa: E402
from tools.benchmarks.train import TRAIN_MODES, cmd_train, cmd_train_worker  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*shardshuffle.*")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, help_: str, repeats: int, threads: int = -1) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        s.add_argument("--repeats", type=int, default=repeats, help="interleaved repetitions (medians)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=threads, help="torch threads; default -1: 1 on a CPU run "
                       "(on a shared CPU, OpenMP threads waiting for a "
                       "busy core made every op up to 10x slower), torch's default on a GPU run; 0: torch's default")
        s.add_argument("--work", default=None, help="folder for temporary files (default: the system's)")
        s.add_argument("overrides", nargs="*", help="key=value config overrides")
        return s

    s = add("sampling", "student 8-64 steps vs the 1024-step teacher vs AR with a KV cache", 5)
    s.add_argument("--device", default=None)
    s.add_argument("--export", default=None, help="an export dir (model.safetensors...) instead of random weights")
    s.add_argument("--ar-export", default=None,
                   help="the AR stage's export (<run>/ar/export) as the AR baseline (default: --export's weights)")
    s.add_argument("--seq-len", type=int, default=0, help="default: data.seq_len")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--student-steps", type=int, nargs="+", default=[8, 16, 32, 64])
    s.add_argument("--teacher-steps", type=int, default=1024)
    s.add_argument("--no-uncached-teacher", action="store_true",
                   help="skip the teacher without the cache (the slowest variant)")
    s.add_argument("--breakdown", action="store_true",
                   help="also time one denoiser call against one ancestral draw at the same shapes")
    s.add_argument("--cpu-generator", action="store_true",
                   help="draw the sampling noise on the CPU even when sampling on a GPU "
                        "(as trainer.evaluation.sweep does)")

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
    s.add_argument("--codecs", nargs="+", default=["dense", "topk", "topk_is", "sampled"],
                   help="codecs to distil with (dense reverse KL is always the reference)")
    s.add_argument("--temperatures", type=float, nargs="*", default=[],
                   help="also sweep each student over these temperatures (and 1) and compare the codes' NLL at "
                        "the data's entropy (matched diversity)")

    s = add("tokenize", "text preparation: tokenise+pack MB/s per core and its scaling with workers", 3)
    s.add_argument("--tokenizer", default="bpe", help="bpe (a 4k byte-level BPE trained on the corpus), byte, "
                   "or a local tokenizer directory (e.g. GPT-2's)")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    s.add_argument("--mb", type=float, default=4.0, help="MB of text to read from the corpus")
    s.add_argument("--seq-len", type=int, default=1024)
    s.add_argument("--wrap", action="store_true")
    s.add_argument("--text-field", default="text")
    s.add_argument("--paths", nargs="*", default=None, help="corpus globs (default: the Python stdlib's .py files)")

    w = sub.add_parser("_train_worker")  # internal: one torchrun rank of `train`
    for a in ("--config", "--targets", "--modes", "--out"):
        w.add_argument(a, required=True)
    for a in ("--steps", "--repeats", "--warmup", "--seed", "--loader-workers"):
        w.add_argument(a, type=int, required=True)
    w.add_argument("overrides", nargs="*")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any] | None]] = {
    "sampling": cmd_sampling, "targets": cmd_targets, "train": cmd_train, "loader": cmd_loader,
    "storage": cmd_storage, "tokenize": cmd_tokenize, "_train_worker": cmd_train_worker,
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
