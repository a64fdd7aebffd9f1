"""bench train: student steps under DeepSpeed ZeRO-1/2/3 against torch DDP, 2 torchrun processes on
the same weights and target shards; the workers run ``tools/bench.py _train_worker``."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.pipeline import free_port
from tools.benchmarks.common import (
    READER,
    REPO,
    bench_env,
    check_fits,
    common_result,
    make_target_set,
    rank_reader,
    shard_urls,
    student_loss,
    to_batch,
)
from tools.benchmarks.timing import Ratio, goal_line, med, table
from trainer.config import load_config
from trainer.model.dit import DiT, count_parameters

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
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "tools" / "bench.py"), "_train_worker", "--config", str(args.config),
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
    print(f"train: student SDTT steps on {args.nproc} processes "
          f"(torchrun, {res['device']}, {res['precision']}), global batch "
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


def cmd_train_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    """One rank: build DDP and each ZeRO stage on identical copies of the student, then time them
    in interleaved blocks of steps fed by the distill job's reader (one stream for all modes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.config import EngineConfig, distill_setup
    from trainer.runtime import dist
    from trainer.runtime.engine import build_engine, resolve_precision

    info = dist.init_distributed()
    cfg = load_config(args.config, args.overrides)
    targets = Path(args.targets)
    _, manifest = shard_urls(targets)
    check_fits(manifest, cfg, targets)
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
            # No EMA and no warm-up: the comparison is the parallelism strategy (DDP has neither).
            setup = distill_setup(cfg)
            setup = dataclasses.replace(setup, optim=dataclasses.replace(setup.optim, warmup_steps=0),
                                        global_batch_size=gbs, ema=0.0)
            engine = build_engine(model, setup, eng_cfg, 10**9, info.world_size)

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
                b = next_batch()  # read + decode + collate, as the job's source.batches(step)
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


