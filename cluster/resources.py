"""What each stage asks SLURM for: pure functions from the cluster flags and config to sbatch
parameters, shared by ``--dry-run`` (which prints them) and the real submission (which passes them
to submitit), so what a user reviews is exactly what gets submitted."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.pipeline import Stage
from trainer.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU-only nodes: one task per CPU slot
    cpu_slots_per_node: int = 1  # tasks per node when there are no GPUs (--tasks-per-node)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 240

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
    mem_gb_per_task: int
    time_min: int
    signal: str  # sbatch --signal, e.g. USR2@120
    requeue: bool
    dependency: str  # afterok:<stage>[:<stage>...] (stage names; job ids once submitted)
    extra: dict = field(default_factory=dict)  # partition / account / qos when set

    def sbatch_lines(self) -> list[str]:
        lines = [f"--job-name=sdtt-{self.stage}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}",
                 f"--cpus-per-task={self.cpus_per_task}", f"--mem={self.mem_gb_per_task * self.tasks_per_node}G",
                 f"--time={self.time_min // 60:d}:{self.time_min % 60:02d}:00", f"--signal={self.signal}"]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.requeue:
            lines.append("--requeue")
        if self.dependency:
            lines.append(f"--dependency={self.dependency}")
        lines += [f"--{k}={v}" for k, v in self.extra.items()]
        return lines


def validate_fit(cfg: RunConfig, spec: ClusterSpec) -> None:
    """Fail before submitting anything when the config cannot run on this allocation."""
    if spec.nodes < 1:
        raise ConfigError("bad flag '--nodes': must be at least 1")
    if spec.gpus_per_node < 0:
        raise ConfigError("bad flag '--gpus-per-node': must be >= 0")
    if spec.time_min * 60 <= cfg.slurm.signal_lead_s:
        raise ConfigError(f"bad flag '--time': {spec.time_min} min leaves no time before the USR2 signal "
                          f"lead slurm.signal_lead_s={cfg.slurm.signal_lead_s}")
    world = spec.world_size
    for key, batch in (("engine.global_batch_size", cfg.engine.global_batch_size),
                       ("distill.global_batch_size", cfg.distill.global_batch_size)):
        if batch % world:
            raise ConfigError(f"bad config key '{key}': {batch} is not divisible by the {world} tasks of "
                              f"--nodes {spec.nodes} x {spec.tasks_per_node} per node")
        per_rank = batch // world
        if cfg.engine.micro_batch_size and per_rank % cfg.engine.micro_batch_size:
            raise ConfigError(f"bad config key 'engine.micro_batch_size': {cfg.engine.micro_batch_size} does not "
                              f"divide the per-task batch {per_rank} of '{key}' on {world} tasks")


def stage_resources(stage: Stage, cfg: RunConfig, spec: ClusterSpec) -> StageResources:
    """Distributed stages take every node, one task per GPU (per CPU slot without GPUs); the small
    stages (prepare, eval, report) take one task on one node, with one GPU when there are GPUs."""
    extra = {k: v for k, v in (("partition", spec.partition), ("account", spec.account), ("qos", spec.qos)) if v}
    dep = f"afterok:{':'.join(stage.depends)}" if stage.depends else ""
    if stage.distributed:
        nodes, tasks, gpus = spec.nodes, spec.tasks_per_node, spec.gpus_per_node
    else:
        nodes, tasks, gpus = 1, 1, min(spec.gpus_per_node, 1)
    return StageResources(stage=stage.name, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                          cpus_per_task=cfg.slurm.cpus_per_task, mem_gb_per_task=cfg.slurm.mem_gb_per_task,
                          time_min=spec.time_min, signal=f"USR2@{cfg.slurm.signal_lead_s}", requeue=True,
                          dependency=dep, extra=extra)
