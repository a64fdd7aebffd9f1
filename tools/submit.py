#!/usr/bin/env python
"""Run the whole SDTT chain: teacher -> for each round: targets -> distill -> eval -> report.

    tools/submit.py --config configs/small.yaml --nodes 8 [--gpus-per-node 8] [--partition P]
                    [--time 04:00:00] [--account A] [--qos Q] [--run-dir DIR] [key=value ...]
    tools/submit.py --config configs/tiny.yaml --local --run-dir runs/demo   # this machine, no SLURM
    tools/submit.py --config configs/small.yaml --nodes 8 --dry-run          # print, submit nothing
    tools/submit.py --status DIR

The run folder is self-contained: the resolved config, a snapshot of the code (so later edits do not
change a queued job), logs, and ``pipeline_state.json``. Submitting the same folder again skips the
stages that are done and resumes the rest; a config that differs from the folder's is refused.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import pipeline  # noqa: E402
from cluster.resources import ClusterSpec, stage_resources, validate_fit  # noqa: E402
from trainer.config import ConfigError, RunConfig, load_config, save_config, to_yaml  # noqa: E402


def parse_time(text: str) -> int:
    """SLURM time formats (MM, HH:MM:SS, D-HH:MM[:SS]) to minutes; an error names the flag."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"bad flag '--time': '{text}' is not MM, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if b is None and days is None:
        minutes = a  # plain minutes
    elif c is None:
        minutes = (a * 60 + b) if days is None else (a * 60 + (b or 0))  # HH:MM or D-HH[:MM]
    else:
        minutes = a * 60 + b + (1 if c else 0)  # HH:MM:SS, seconds rounded up
    minutes += (days or 0) * 24 * 60
    if minutes <= 0:
        raise ConfigError(f"bad flag '--time': '{text}' is not a positive duration")
    return minutes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", type=Path, help="YAML config (only differences from the typed defaults)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: slurm.gpus_per_node")
    p.add_argument("--tasks-per-node", type=int, default=1, help="tasks per node on CPU-only nodes")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit per job (default: slurm.time_min)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>")
    p.add_argument("--local", action="store_true", help="run every stage on this machine, without SLURM")
    p.add_argument("--nproc", type=int, default=2, help="--local: processes per distributed stage")
    p.add_argument("--dry-run", action="store_true", help="print the chain and its resources; submit nothing")
    p.add_argument("--status", type=Path, default=None, metavar="DIR", help="show the stages of a run folder")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.status is None and args.config is None and args.run_dir is None:
        p.error("--config is required (or --run-dir of an existing run, or --status DIR)")
    for flag in ("nodes", "nproc", "tasks_per_node"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run's config. A run folder that already has one keeps it: resubmitting must not silently
    change a run half-way, so a differing --config/overrides is an error naming the keys."""
    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or REPO / "runs" / cfg.name
    saved = run_dir / "config.yaml"
    if saved.exists():
        stored = load_config(saved)
        if args.config is None and not args.overrides:
            return stored, run_dir
        if to_yaml(stored) != to_yaml(cfg):
            diff = _diff(stored, cfg)
            raise ConfigError(f"{saved}: the run folder was made with another config (differs at "
                              f"{', '.join(diff[:8])}); use a new --run-dir or the folder's own config")
    return cfg, run_dir


def _diff(a: RunConfig, b: RunConfig) -> list[str]:
    from trainer.config import to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    fa, fb = dict(flat(to_dict(a))), dict(flat(to_dict(b)))
    return sorted(k for k in fa if fa[k] != fb.get(k))


def cluster_spec(args: argparse.Namespace, cfg: RunConfig) -> ClusterSpec:
    gpus = cfg.slurm.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    return ClusterSpec(nodes=args.nodes, gpus_per_node=gpus, cpu_slots_per_node=args.tasks_per_node,
                       partition=args.partition if args.partition is not None else cfg.slurm.partition,
                       account=args.account if args.account is not None else cfg.slurm.account,
                       qos=args.qos if args.qos is not None else cfg.slurm.qos,
                       time_min=parse_time(args.time) if args.time else cfg.slurm.time_min)


def parameter_count(cfg: RunConfig) -> int:
    import torch

    from trainer.model.dit import DiT, count_parameters

    with torch.device("meta"):
        return count_parameters(DiT(cfg.model))


def dry_run(cfg: RunConfig, spec: ClusterSpec, run_dir: Path) -> None:
    stages = pipeline.build_chain(cfg)
    n = parameter_count(cfg)
    print(f"run folder: {run_dir}")
    print(f"model: {n:,} parameters ({n / 1e6:.0f}M): {cfg.model.n_layers} layers, d={cfg.model.d_model}, "
          f"{cfg.model.n_heads} heads, vocab {cfg.model.vocab_size}+MASK, context {cfg.model.max_seq_len}")
    print(f"allocation: {spec.nodes} nodes x {spec.tasks_per_node} tasks = world size {spec.world_size}; "
          f"rounds: {cfg.distill.rounds} ({cfg.distill.start_steps} -> "
          f"{cfg.distill.start_steps // 2 ** cfg.distill.rounds} steps), mode {cfg.distill.mode}")
    todo = {s.name for s in pipeline.pending(run_dir, stages)}
    for st in stages:
        res = stage_resources(st, cfg, spec)
        state = "" if st.name in todo else "  (done: skipped)"
        print(f"\n[{st.name}] python -m {st.module} --run-dir {run_dir} {' '.join(st.args)}{state}")
        for line in res.sbatch_lines():
            print(f"  #SBATCH {line}")


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
            return status(args.status)
        cfg, run_dir = resolve_config(args)
        if args.local:
            if cfg.engine.global_batch_size % args.nproc or cfg.distill.global_batch_size % args.nproc:
                raise ConfigError(f"bad flag '--nproc': {args.nproc} does not divide engine.global_batch_size="
                                  f"{cfg.engine.global_batch_size} and distill.global_batch_size="
                                  f"{cfg.distill.global_batch_size}")
        else:
            spec = cluster_spec(args, cfg)
            validate_fit(cfg, spec)
        if args.dry_run:
            dry_run(cfg, spec if not args.local else ClusterSpec(nodes=1, gpus_per_node=0,
                                                                  cpu_slots_per_node=args.nproc), run_dir)
            return 0
        save_config(cfg, run_dir / "config.yaml") if not (run_dir / "config.yaml").exists() else None
        stages = pipeline.build_chain(cfg)
        if args.local:
            t0 = time.time()
            pipeline.run_local(stages, run_dir, nproc=args.nproc)
            print(f"\npipeline finished in {time.time() - t0:.0f}s; report: {run_dir / 'report.md'}\n")
            print((run_dir / "report.md").read_text())
            return 0
        from cluster.slurm import submit_chain

        submit_chain(stages, cfg, spec, run_dir, REPO)
        return 0
    except (ConfigError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
