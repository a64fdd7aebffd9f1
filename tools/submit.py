#!/usr/bin/env python
"""Run the whole SDTT chain: teacher -> for each round: targets -> distill -> eval -> report.

    tools/submit.py --config configs/small.yaml --nodes 8 [--gpus-per-node 8] [--partition P]
                    [--time 4:00:00] [--account A] [--qos Q] [--constraint C] [--exclude NODES]
                    [--reservation R] [--sbatch KEY=VALUE ...] [--run-dir DIR] [key=value ...]
    tools/submit.py --config configs/tiny.yaml --local --run-dir runs/demo   # this machine, no SLURM
    tools/submit.py --config configs/small.yaml --nodes 8 --dry-run          # resources + budget, submit nothing
    tools/submit.py --status DIR

Paths: every path in the config or its overrides (data.tokenizer, data.paths, data.cache_dir,
teacher.import_path, eval.judge, eval.ar_path), --config and --run-dir are read against the directory
you run this from, and the run's config.yaml stores them absolute: jobs run elsewhere (SLURM: in the
run's code snapshot). A path the run reads that does not exist is an error here, naming the key,
never inside a queued job. eval.judge may also be a Hugging Face hub name (e.g. gpt2-large): a value
that exists, or starts with / ./ ../ ~, is a path; others are names, resolved here to their snapshot in
the local HF cache (no network) or refused with the `hf download` command that fetches them.

Launch flags are shorthands for slurm.* config keys (--partition: slurm.partition, --time:
slurm.time_min, --sbatch KEY=VALUE: slurm.additional.KEY, ...); given, they win over the config for
this submission (docs/cluster.md). --nodes and --tasks-per-node shape the allocation.

--time and slurm.stages.<kind>.time follow sbatch's grammar: 30 = 30:00 = 30 minutes, 4:00:00,
1-12 (36 hours), 2-00:00:00.

The run folder is self-contained: the resolved config, a snapshot of the code (so later edits do not
change a queued job), logs, and ``pipeline_state.json``. Submitting the same folder again skips the
stages that are done and resumes the rest; a config that differs from the folder's is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import pipeline  # noqa: E402
from cluster.budget import JudgeSize, TargetSize, budget, render  # noqa: E402
from cluster.resources import ClusterSpec, job_environment, stage_resources, validate_fit  # noqa: E402
from trainer import runlock  # noqa: E402
from trainer.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    config_diff,
    load_config,
    parse_slurm_time,
    resolve_paths,
    round_steps,
    save_config,
    to_yaml,
)
from trainer.errors import BadInput  # noqa: E402
from trainer.fileio import disk_full, is_disk_full  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", type=Path, help="YAML config (only differences from the typed defaults)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: slurm.gpus_per_node")
    p.add_argument("--tasks-per-node", type=int, default=1, help="tasks per node on CPU-only nodes")
    p.add_argument("--partition", default=None, help="sbatch --partition (default: slurm.partition)")
    p.add_argument("--time", default=None, help="time limit per job, sbatch grammar: 30 or 30:00 = 30 minutes, "
                   "HH:MM:SS, D-HH[:MM[:SS]] (default: slurm.time_min; slurm.stages.<kind>.time wins)")
    p.add_argument("--account", default=None, help="sbatch --account (default: slurm.account)")
    p.add_argument("--qos", default=None, help="sbatch --qos (default: slurm.qos)")
    p.add_argument("--constraint", default=None, help="sbatch --constraint (default: slurm.constraint)")
    p.add_argument("--exclude", default=None, help="sbatch --exclude NODES (default: slurm.exclude)")
    p.add_argument("--reservation", default=None, help="sbatch --reservation (default: slurm.reservation)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option for every job, e.g. --sbatch exclusive= --sbatch mem=0 "
                        "(repeatable; on top of slurm.additional)")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name> in this directory")
    p.add_argument("--local", action="store_true", help="run every stage on this machine, without SLURM")
    p.add_argument("--nproc", type=int, default=None,
                   help="--local: processes per distributed stage (default: one per GPU, 2 without GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the chain and its resources; submit nothing")
    p.add_argument("--status", type=Path, default=None, metavar="DIR", help="show the stages of a run folder")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.status is None and args.config is None and args.run_dir is None:
        p.error("--config is required (or --run-dir of an existing run, or --status DIR)")
    for flag in ("nodes", "nproc", "tasks_per_node"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path, list[str]]:
    """The run's config (paths absolute, against this directory), its folder, and the paths it reads
    that do not exist. A run folder that already has a config keeps it: resubmitting must not silently
    change a run half-way, so a differing --config/overrides is an error naming the keys."""
    cfg = load_config(args.config, args.overrides)
    cfg, problems = resolve_paths(cfg, Path.cwd())
    run_dir = (args.run_dir or Path("runs") / cfg.name).resolve()
    check_run_dir(run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        stored = load_config(saved)
        if args.config is None and not args.overrides:
            return stored, run_dir, resolve_paths(stored, run_dir)[1]
        if to_yaml(stored) != to_yaml(cfg):
            diff = config_diff(stored, cfg)
            raise ConfigError(f"{saved}: the run folder was made with another config (differs at "
                              f"{', '.join(diff[:8])}); use a new --run-dir or the folder's own config")
    return cfg, run_dir, problems


def check_run_dir(run_dir: Path, flag: str = "--run-dir") -> None:
    """A run folder must be a folder (or not exist yet): anything else is refused in one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"bad flag '{flag}': {run_dir} exists and is not a folder (a run folder is a directory; "
                          "pick another path)")


# The flags that are slurm.* config keys of the same name: the flag, when given and not empty, wins
# over the config (--gpus-per-node, --time and --sbatch are the other three, below).
SLURM_FLAGS = ("partition", "account", "qos", "constraint", "exclude", "reservation")


def launch_overrides(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    """The launch flags as the ``slurm.*`` values they override: {key: value}. One place for launch
    options: the flags are shorthands for these keys (--time in sbatch's grammar becomes
    slurm.time_min, --sbatch KEY=VALUE an entry of slurm.additional that wins over the config's).

    Typed values, not ``key=value`` strings: OmegaConf would retype an sbatch value (``mem=0``) or
    refuse an empty one (``exclusive=``)."""
    extra = {}
    for item in args.sbatch:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key:
            raise ConfigError(f"bad flag '--sbatch': '{item}' is not KEY=VALUE (KEY= for a bare flag, e.g. exclusive=)")
        extra[key] = value
    out: dict[str, Any] = {key: getattr(args, key) for key in SLURM_FLAGS if getattr(args, key)}
    if args.gpus_per_node is not None:
        out["gpus_per_node"] = args.gpus_per_node
    if args.time:
        out["time_min"] = parse_slurm_time(args.time, "bad flag '--time'")
    if extra:
        out["additional"] = {**cfg.slurm.additional, **extra}
    return out


def launch_config(args: argparse.Namespace, cfg: RunConfig) -> RunConfig:
    """``cfg`` with the launch flags written into its ``slurm`` section. What the run folder keeps is
    ``cfg`` itself: a resubmission may change where and how long the jobs run, not what they compute."""
    over = launch_overrides(args, cfg)
    return dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, **over)) if over else cfg


def cluster_spec(args: argparse.Namespace, cfg: RunConfig) -> ClusterSpec:
    """The allocation's shape; ``cfg`` is the launch config (``slurm.gpus_per_node`` with --gpus-per-node)."""
    return ClusterSpec(nodes=args.nodes, gpus_per_node=cfg.slurm.gpus_per_node, cpu_slots_per_node=args.tasks_per_node)


def parameter_count(cfg: RunConfig) -> int:
    import torch

    from trainer.model.dit import DiT, count_parameters

    with torch.device("meta"):
        return count_parameters(DiT(cfg.model))


def target_size(cfg: RunConfig) -> TargetSize:
    """Bytes of one target sample: the codec's payload for half the positions masked (the mean of
    t ~ U(0, 1)), the int32 noised sequence, and one tar header + npy header + half a tar block of
    padding per member; the bound is the shard planner's worst case (every position masked)."""
    from trainer.method import codecs
    from trainer.targets import shards

    L, V = cfg.data.seq_len, cfg.model.vocab_size
    per_pos = codecs.bytes_per_position(cfg.targets.codec, cfg.targets.k, V)
    members = 2 + len(codecs.get(cfg.targets.codec).fields)  # xt, the codec's fields, meta
    expected = 4 * L + 0.5 * L * per_pos + 128 + members * (512 + 128 + 256)
    return TargetSize(expected, shards.max_sample_bytes(cfg.targets.codec, cfg.targets.k, V, L))


def judge_size(cfg: RunConfig, n_params: int) -> JudgeSize | None:
    """The evaluation judge's size for the budget: the run's AR model (eval.judge=ar, the diffusion
    model's shape), or a Hugging Face folder's config.json (GPT-2's n_embd/n_layer or the generic
    hidden_size/num_hidden_layers) with its parameters counted from the safetensors headers (shapes
    only, no weights read; 12 L d^2 + V d without them). None without a judge or a config.json."""
    import json

    judge = cfg.eval.judge
    if not judge:
        return None
    if judge == "ar":
        m = cfg.model
        return JudgeSize("ar", n_params, m.vocab_size, m.d_model, m.n_layers)
    conf = Path(judge) / "config.json"
    try:
        c = json.loads(conf.read_text())
        d = int(c.get("n_embd", c.get("hidden_size")))
        layers = int(c.get("n_layer", c.get("num_hidden_layers")))
        vocab = int(c["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    params = 0
    for f in sorted(Path(judge).glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, t in header.items():
            if key != "__metadata__":
                params += math.prod(t["shape"])
    path = Path(judge)
    # a hub name resolved at submit time is HF_HUB_CACHE/models--org--name/snapshots/<commit>
    name = (path.parent.parent.name.removeprefix("models--").replace("--", "/") if path.parent.name == "snapshots"
            else path.name)
    return JudgeSize(name, params or 12 * layers * d * d + vocab * d, vocab, d, layers)


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001  (no usable torch build: treat as CPU)
        return 0


def dry_run(cfg: RunConfig, spec: ClusterSpec, run_dir: Path, local_nproc: int = 0) -> None:
    stages = pipeline.build_chain(cfg)
    n = parameter_count(cfg)
    print(f"run folder: {run_dir}")
    print(f"model: {n:,} parameters ({n / 1e6:.0f}M): {cfg.model.n_layers} layers, d={cfg.model.d_model}, "
          f"{cfg.model.n_heads} heads, vocab {cfg.model.vocab_size}+MASK, context {cfg.model.max_seq_len}")
    todo = {s.name for s in pipeline.pending(run_dir, stages)}
    if local_nproc:
        print(f"local run: {local_nproc} processes per distributed stage; rounds: {cfg.distill.rounds}, mode "
              f"{cfg.distill.mode}")
        for st in stages:
            state = "" if st.name in todo else "  (done: skipped)"
            print(f"[{st.name}] {' '.join(pipeline.local_command(st, run_dir, local_nproc, []))}{state}")
        return
    print(f"allocation: {spec.nodes} nodes x {spec.tasks_per_node} tasks = world size {spec.world_size}; "
          f"rounds: {cfg.distill.rounds} ({cfg.distill.start_steps} -> "
          f"{round_steps(cfg, cfg.distill.rounds)} steps), mode {cfg.distill.mode}")
    for key, value in job_environment(cfg, os.environ).items():
        print(f"job environment: {key}={value}")
    for line in cfg.slurm.setup:
        print(f"job setup: {line}")
    from cluster.submission import KILL_ON_BAD_EXIT

    print(f"job step: srun ... {' '.join([KILL_ON_BAD_EXIT, *cfg.slurm.srun_args])}")
    for st in stages:
        res = stage_resources(st, cfg, spec, run_dir.name)
        state = "" if st.name in todo else "  (done: skipped)"
        n_gpus = res.nodes * res.gpus_per_node
        gpus = f"{n_gpus} GPU{'s' if n_gpus > 1 else ''}" if n_gpus else "no GPU"
        print(f"\n[{st.name}] {res.nodes} x {res.tasks_per_node} tasks, {gpus}, "
              f"time {res.time_min // 60}h{res.time_min % 60:02d}m{state}")
        print(f"  python -m {st.module} --run-dir {run_dir} {' '.join(st.args)}".rstrip())
        print(f"  #SBATCH {' '.join(res.sbatch_lines())}")
    from trainer.evaluation.sweep import eval_plan

    judge = judge_size(cfg, n)
    for line in render(budget(stages, cfg, spec, n, target_size(cfg), run_dir.name, judge, eval_plan=eval_plan), cfg,
                       judge):
        print(line)


def status(run_dir: Path) -> int:
    """Each stage with its state in the run folder and, for SLURM runs, the job's state in SLURM."""
    cfg = load_config(run_dir / "config.yaml")
    state = pipeline.read_state(run_dir)["stages"]
    slurm_states = _slurm_states(state)
    stages = pipeline.build_chain(cfg)
    done = sum(pipeline.is_done(run_dir, st) for st in stages)
    print(f"run folder: {run_dir}")
    print(f"progress: {done} of {len(stages)} stages done")
    for st in stages:
        entry = state.get(st.name, {})
        s = entry.get("status", "pending")
        if "job_id" in entry:
            s += f"  job {entry['job_id']} {slurm_states.get(str(entry['job_id']), '')}".rstrip()
        if entry.get("restarts"):
            s += f"  (restarted {entry['restarts']}x)"
        if entry.get("seconds"):
            s += f"  ({entry['seconds']:.0f}s)"
        if entry.get("status") in ("failed", "stopped", "cancelled") and entry.get("reason"):
            s += f"\n  {'':<12} {entry['reason']}" + (f"; log: {entry['log']}" if entry.get("log") else "")
        print(f"  {st.name:<12} {s}")
    return 0


def _slurm_states(state: dict) -> dict[str, str]:
    ids = [str(e["job_id"]) for e in state.values() if "job_id" in e]
    if not ids:
        return {}
    try:
        from cluster.slurm import job_states

        return job_states(ids)
    except Exception as e:  # noqa: BLE001  (status must work without SLURM reachable)
        return {i: f"(sacct unavailable: {e})" for i in ids}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.status is not None:
            check_run_dir(args.status.resolve(), "--status")
            return status(args.status)
        cfg, run_dir, problems = resolve_config(args)
        if args.local:
            if args.nproc is None:
                args.nproc = local_gpus() or 2
            if cfg.engine.global_batch_size % args.nproc or cfg.distill.global_batch_size % args.nproc:
                raise ConfigError(f"bad flag '--nproc': {args.nproc} does not divide engine.global_batch_size="
                                  f"{cfg.engine.global_batch_size} and distill.global_batch_size="
                                  f"{cfg.distill.global_batch_size}")
        else:
            launch = launch_config(args, cfg)
            spec = cluster_spec(args, launch)
            validate_fit(launch, spec)
        if args.dry_run:
            if args.local:
                dry_run(cfg, None, run_dir, local_nproc=args.nproc)
            else:
                dry_run(launch, spec, run_dir)
            if problems:
                print("\nthe submission would fail now:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 2
            return 0
        if problems:
            raise ConfigError("; ".join(problems) + " (paths are read against the directory you submit from)")
        # One writer per run folder (trainer/runlock.py): a second submission is refused here, naming
        # the holder; a holder that is gone (killed, crashed) is taken over with a message.
        with runlock.held(run_dir, "tools/submit.py" + (" --local" if args.local else ""),
                          log=lambda m: print(m, file=sys.stderr)) as lock:
            save_config(cfg, run_dir / "config.yaml") if not (run_dir / "config.yaml").exists() else None
            stages = pipeline.build_chain(cfg)
            if args.local:
                os.environ[runlock.TOKEN_ENV] = lock.mine["token"]  # the stages' jobs are this chain's
                t0 = time.time()
                pipeline.run_local(stages, run_dir, nproc=args.nproc)
                print(f"\npipeline finished in {time.time() - t0:.0f}s; report: {run_dir / 'report.md'}\n")
                print((run_dir / "report.md").read_text())
                return 0
            from cluster.submission import submit_chain

            # The chain's jobs hold the lock from before they can start until the last one ends.
            submit_chain(stages, launch, spec, run_dir, REPO,
                         on_recorded=lambda ids: lock.hand_to_jobs(list(ids.values()), "tools/submit.py"))
            return 0
    except (ConfigError, RuntimeError, FileNotFoundError, BadInput) as e:  # BadInput: a folder in use, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"error: {disk_full(e.filename or Path.cwd(), e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
