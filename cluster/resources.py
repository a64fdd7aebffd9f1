"""What each stage asks SLURM for: pure functions from the allocation's shape (ClusterSpec) and the
config's ``slurm`` section to sbatch parameters, shared by ``--dry-run`` (which prints them) and the
real submission (which passes them to submitit), so what a user reviews is exactly what gets submitted.

Per kind of stage (``slurm.stages.<kind>``, kinds in ``trainer.config.STAGE_KINDS``):

* distributed stages (teacher pretraining, targets, distill, control) take every node of
  ``--nodes``, one task per GPU (per CPU slot without GPUs), unless their kind says otherwise;
* eval takes one task with one GPU; importing a teacher, prepare and report take no GPU;
* each kind may set its own time limit (sbatch grammar), nodes, GPUs, CPUs, memory, partition.

Jobs are named ``<run>-<stage>`` (the run folder's name), so ``squeue``/``scancel --name`` tell two
runs apart.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from cluster.pipeline import Stage
from trainer.config import ConfigError, RunConfig, StageSlurmConfig, format_slurm_time, parse_slurm_time


@dataclass(frozen=True)
class ClusterSpec:
    """The allocation's shape: the physical part of a launch. Every other launch option (partition,
    account, time limit, extra sbatch options, ...) is a ``slurm.*`` config key, which
    ``tools/submit.py``'s flags override (one place for launch options)."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU-only nodes: one task per CPU slot (submit: --gpus-per-node / slurm.gpus_per_node)
    cpu_slots_per_node: int = 1  # tasks per node when there are no GPUs (--tasks-per-node)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_slots_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass(frozen=True)
class StageResources:
    stage: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb_per_task: int  # 0 = --mem=0 (all of each node's memory)
    time_min: int
    signal: str  # sbatch --signal, e.g. USR2@120
    requeue: bool
    dependency: str  # afterok:<stage>[:<stage>...] (stage names; job ids once submitted)
    job_name: str = ""
    extra: dict = field(default_factory=dict)  # partition / account / qos / constraint / ... when set

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpu_hours(self) -> float:
        """GPU-hours this job reserves if it runs to its time limit (one attempt)."""
        return self.nodes * self.gpus_per_node * self.time_min / 60

    @property
    def mem(self) -> str:
        return f"{self.mem_gb_per_task * self.tasks_per_node}G" if self.mem_gb_per_task else "0"

    def sbatch_lines(self) -> list[str]:
        lines = [f"--job-name={self.job_name or self.stage}", f"--nodes={self.nodes}",
                 f"--ntasks-per-node={self.tasks_per_node}", f"--cpus-per-task={self.cpus_per_task}",
                 f"--mem={self.mem}", f"--time={format_slurm_time(self.time_min)}", f"--signal={self.signal}"]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.requeue:
            lines.append("--requeue")
        if self.dependency:
            lines += [f"--dependency={self.dependency}", "--kill-on-invalid-dep=yes"]
        lines += [f"--{k}={v}" if v != "" else f"--{k}" for k, v in self.extra.items()]
        return lines


def stage_kind(name: str) -> str:
    """prepare, teacher, ar, targets, distill, eval, control or report: the ``slurm.stages`` key of a stage."""
    return name.split("_", 1)[0]


def _stage_key(cfg: RunConfig, name: str) -> str:
    """The ``slurm.stages`` key that sizes a stage: its own name (e.g. ``eval_0``) when the config has
    one, else its kind (``eval``): the teacher's evaluation sweeps every round's step count, a
    student's only its own, so one limit for both over-reserves the many small ones."""
    return name if name in cfg.slurm.stages else stage_kind(name)


def _stage_cfg(cfg: RunConfig, name: str) -> StageSlurmConfig:
    return cfg.slurm.stages.get(_stage_key(cfg, name)) or StageSlurmConfig()


def _time_min(cfg: RunConfig, name: str) -> int:
    own = _stage_cfg(cfg, name).time
    if own:
        return parse_slurm_time(own, f"bad config key 'slurm.stages.{_stage_key(cfg, name)}.time'")
    return cfg.slurm.time_min


def validate_fit(cfg: RunConfig, spec: ClusterSpec, stages: list[Stage] | None = None) -> None:
    """Fail before submitting anything when the config cannot run on this allocation."""
    if spec.nodes < 1:
        raise ConfigError("bad flag '--nodes': must be at least 1")
    if spec.gpus_per_node < 0:
        raise ConfigError("bad flag '--gpus-per-node': must be >= 0")
    # The config's own slurm.time_min was checked at load; only --time (tools/submit.py) can get here.
    if cfg.slurm.time_min * 60 <= cfg.slurm.signal_lead_s:
        raise ConfigError(f"bad flag '--time': {cfg.slurm.time_min} min leaves no time before the USR2 signal "
                          f"lead slurm.signal_lead_s={cfg.slurm.signal_lead_s}")
    if stages is None:
        from cluster.pipeline import build_chain

        stages = build_chain(cfg)
    batches = {"teacher": "engine.global_batch_size", "ar": "engine.global_batch_size",
               "control": "distill.global_batch_size",
               "distill": "distill.global_batch_size"}
    for st in stages:
        key = batches.get(stage_kind(st.name))
        if not st.distributed or key is None:
            continue
        res = stage_resources(st, cfg, spec)
        batch = cfg.engine.global_batch_size if key.startswith("engine") else cfg.distill.global_batch_size
        world = res.world_size
        where = f"--nodes {res.nodes} x {res.tasks_per_node} per node (stage {st.name})"
        if batch % world:
            raise ConfigError(f"bad config key '{key}': {batch} is not divisible by the {world} tasks of {where}")
        per_rank = batch // world
        if cfg.engine.micro_batch_size and per_rank % cfg.engine.micro_batch_size:
            raise ConfigError(f"bad config key 'engine.micro_batch_size': {cfg.engine.micro_batch_size} does not "
                              f"divide the per-task batch {per_rank} of '{key}' on {world} tasks")


def stage_resources(stage: Stage, cfg: RunConfig, spec: ClusterSpec, run_name: str = "sdtt") -> StageResources:
    """The sbatch request of one stage (see the module doc for the defaults of each kind)."""
    kind = stage_kind(stage.name)
    own = _stage_cfg(cfg, stage.name)
    if stage.distributed:
        default_gpus, default_nodes = spec.gpus_per_node, spec.nodes
    elif kind in ("prepare", "report", "teacher"):  # teacher here = import_teacher or oracle_teacher: files
        default_gpus, default_nodes = 0, 1
    else:  # eval: one task, one GPU
        default_gpus, default_nodes = min(spec.gpus_per_node, 1), 1
    gpus = default_gpus if own.gpus_per_node < 0 else own.gpus_per_node
    if spec.gpus_per_node == 0:
        gpus = 0  # a CPU-only cluster: no stage can have GPUs
    nodes = own.nodes or default_nodes
    if stage.distributed:
        tasks = gpus if gpus > 0 else spec.cpu_slots_per_node
    else:
        tasks = 1
    sl = cfg.slurm
    extra: dict[str, str] = {}
    for key, value in (("partition", own.partition or sl.partition), ("account", sl.account), ("qos", sl.qos),
                       ("constraint", "" if own.constraint == "none" else (own.constraint or sl.constraint)),
                       ("exclude", sl.exclude), ("reservation", sl.reservation)):
        if value:
            extra[key] = value
    extra.update(sl.additional)
    dep = f"afterok:{':'.join(stage.depends)}" if stage.depends else ""
    return StageResources(stage=stage.name, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                          cpus_per_task=own.cpus_per_task or sl.cpus_per_task,
                          mem_gb_per_task=own.mem_gb_per_task or sl.mem_gb_per_task,
                          time_min=_time_min(cfg, stage.name), signal=f"USR2@{sl.signal_lead_s}",
                          requeue=True, dependency=dep, job_name=f"{run_name}-{stage.name}", extra=extra)


def job_environment(cfg: RunConfig, shell: Mapping[str, str]) -> dict[str, str]:
    """The variables every job gets: ``slurm.env`` plus the ``slurm.env_from_shell`` names (globs)
    found in the submitting shell ``shell``, read now so the job does not depend on sbatch's
    ``--export`` policy. Fixed values win over copied ones."""
    out: dict[str, str] = {}
    for pattern in cfg.slurm.env_from_shell:
        for name in sorted(shell):
            if fnmatch.fnmatchcase(name, pattern):
                out[name] = shell[name]
    out.update(cfg.slurm.env)
    return out
