"""``tools/bench.py tokenize``: text preparation throughput, MB of text per second, per core, and its
scaling with the number of tokeniser processes (trainer/data/packing.py, what the prepare job runs).

The corpus is read into memory first (the prepare job reads while workers tokenise; reading is not
what is measured). Each worker count runs the whole tokenise+pack stream, interleaved with the others;
the pool's start-up (spawned processes importing the tokenizer) is timed apart on an empty stream and
reported beside the steady rate (it is paid once per prepare, not per MB).
"""
from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.timing import Ratio, interleaved, med, table
from trainer.data.corpus import expand_paths, iter_text_documents
from trainer.data.packing import pack_stream
from trainer.data.tokenizers import load_tokenizer


def _corpus(patterns: list[str], mb: float, text_field: str) -> list[str]:
    docs, size = [], 0
    for d in iter_text_documents(expand_paths(patterns), text_field):
        docs.append(d)
        size += len(d.encode("utf-8"))
        if size >= mb * 1e6:
            break
    return docs


def cmd_tokenize(args: argparse.Namespace) -> dict[str, Any]:
    # One core per tokeniser, in-process (w1) as in the workers: the Rust tokenizers otherwise spread a
    # batch over their own thread pool and "per core" would mean nothing. Set before tokenizers loads.
    os.environ["RAYON_NUM_THREADS"] = "1"
    patterns = args.paths or [str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py")]
    docs = _corpus(patterns, args.mb, args.text_field)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    spec = args.tokenizer
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-", dir=args.work))
    if spec == "bpe":  # a GPT-2-kind byte-level BPE trained on the corpus itself
        from tools.train_tokenizer import train_on_documents

        spec = str(train_on_documents(docs, work / "bpe", args.vocab_size))
    tok = load_tokenizer(spec)

    def run(workers: int, data: list[str]):
        stats: dict = {}
        for _ in pack_stream(iter(data), spec, tok, args.seq_len, wrap=args.wrap, workers=workers, stats=stats):
            pass
        return stats

    variants = {f"w{w}": (lambda w=w: run(w, docs)) for w in args.workers}
    startup = {f"w{w}": (lambda w=w: run(w, docs[:1])) for w in args.workers}
    times, results = interleaved(variants, args.repeats, torch.device("cpu"))
    t_start, _ = interleaved(startup, max(1, args.repeats // 2), torch.device("cpu"))
    base = f"w{args.workers[0]}"
    rows, out = [], {}
    for w in args.workers:
        name = f"w{w}"
        wall, start = med(times[name]), med(t_start[name])
        steady = nbytes / 1e6 / max(wall - start, 1e-9)
        speedup = Ratio.of(times[base], times[name])
        rows.append([name, f"{nbytes / 1e6 / wall:.3f}", f"{steady:.3f}", f"{steady / w:.3f}", f"{start:.2f}",
                     str(speedup)])
        out[name] = {"workers": w, "mb_per_s": nbytes / 1e6 / wall, "steady_mb_per_s": steady,
                     "steady_mb_per_s_per_core": steady / w, "startup_s": start, "speedup_over_first": speedup.value,
                     "tokens": results[name]["tokens"], "rows": results[name]["rows"]}
    print(table(["workers", "MB/s", "steady MB/s", "per core", "start-up s", f"time {base} / time"], rows,
                title=f"tokenise+pack: {nbytes / 1e6:.2f} MB in {len(docs)} documents, tokenizer {tok.name} "
                      f"(vocab {tok.vocab_size}), seq_len {args.seq_len}{', wrapped' if args.wrap else ''}, "
                      f"{args.repeats} interleaved repetitions"))
    return {"bench": "tokenize", "mb": nbytes / 1e6, "documents": len(docs), "tokenizer": tok.name,
            "variants": out, "ratios": {f"speedup_{k}": v["speedup_over_first"] for k, v in out.items()}}
