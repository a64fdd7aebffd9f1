"""bench loader: the distill job's WebDataset reader (in-process and in DataLoader workers) against
what one rank's student consumes."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tools.benchmarks.common import (
    READER,
    check_fits,
    common_result,
    make_target_set,
    rank_reader,
    set_threads,
    shard_urls,
    student_loss,
    to_batch,
)
from tools.benchmarks.timing import CPU_TIMES, Ratio, goal_line, interleaved, med, table
from trainer.config import load_config
from trainer.model.dit import DiT


def cmd_loader(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cpu")
    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=args.work))
    try:
        targets = Path(args.targets) if args.targets else make_target_set(work, args.config, args.overrides,
                                                                          args.samples)
        urls, manifest = shard_urls(targets)
        check_fits(manifest, cfg, targets)
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


