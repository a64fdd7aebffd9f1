"""Process-group setup from the environment, and the few rank helpers the jobs need.

The launch environment is read from the torchrun variables only: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. torchrun sets them (``--local``), and so does the SLURM
job wrapper (cluster/stage_job.py ``task_rendezvous``: submitit reads SLURM's variables, once, there).
Without them the process is a single process; it still gets a (world-size-1) process group, because
DeepSpeed assumes one exists. A process that srun started as one of several tasks without those
variables is refused rather than trained alone.

The resolved RANK/WORLD_SIZE/LOCAL_RANK are written back into ``os.environ``: DeepSpeed reads
LOCAL_RANK from there. gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class EnvRanks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None
    master_port: str | None
    source: str  # "torchrun" | "single"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_env(env: Mapping[str, str]) -> EnvRanks:
    """Pure: where this process sits, from the torchrun variables (no side effects, for tests)."""
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
    else:
        tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
        if "SLURM_STEP_ID" in env and tasks.isdigit() and int(tasks) > 1:
            raise ValueError(f"started by srun as one of {tasks} tasks (SLURM_STEP_NUM_TASKS) without RANK/WORLD_SIZE: "
                             "launch through tools/submit.py or torchrun, which set the torchrun variables")
        return EnvRanks(0, 0, 1, 1, addr, port, "single")
    if not 0 <= rank < world:
        raise ValueError(f"torchrun environment: rank {rank} is outside world size {world}")
    if world > 1 and not (addr and port):
        missing = [k for k, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v]
        raise ValueError(f"torchrun environment with world size {world} but {', '.join(missing)} not set "
                         "(the launcher must export the rendezvous address)")
    return EnvRanks(rank, local, world, max(1, local_world), addr, port, "torchrun")


_TIMEOUT_S: list[float] = []  # the timeout the process group was made with (collective_timeout_s)


def collective_timeout_s() -> float | None:
    """The collective timeout of this process's group (None before ``init_distributed``)."""
    return _TIMEOUT_S[-1] if _TIMEOUT_S else None


def is_collective_timeout(e: BaseException) -> bool:
    """``e`` is a collective that waited longer than the group's timeout: gloo raises RuntimeError
    "Timed out waiting <ms>ms for recv operation to complete" (measured, torch 2.13), NCCL a
    DistBackendError (a RuntimeError) naming the watchdog's timeout."""
    if not isinstance(e, RuntimeError) or not _TIMEOUT_S:
        return False
    text = str(e)
    return "Timed out waiting" in text or ("timeout" in text.lower() and "Watchdog" in text) or \
        (isinstance(e, getattr(dist, "DistBackendError", ())) and "time" in text.lower())


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group (idempotent) and return where this process sits.
    ``timeout_s`` (``engine.collective_timeout_s``) bounds every collective: a rank that hangs makes
    the others fail after it rather than wait for the allocation to end."""
    r = read_env(os.environ)
    os.environ.update(RANK=str(r.rank), WORLD_SIZE=str(r.world_size), LOCAL_RANK=str(r.local_rank))

    if torch.cuda.is_available():
        device = torch.device("cuda", r.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Ranks sharing a CPU must not each start one thread per core (2-core CI: 2x slower).
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // r.local_world_size))

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        _TIMEOUT_S.append(float(timeout_s))
        # Groups made later take torch's module default (30 min), not the default group's timeout:
        # DeepSpeed's data-parallel group is such a group (new_group without a timeout; measured: a
        # stopped rank then held ZeRO-2 training past 130 s with a 10 s timeout). Make ours theirs.
        c10d.default_pg_timeout = timeout
        c10d.default_pg_nccl_timeout = timeout
        if r.world_size == 1 and not (r.master_addr and r.master_port):
            # A private in-memory store: no port to pick, nothing to collide with other jobs.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.update(MASTER_ADDR=str(r.master_addr), MASTER_PORT=str(r.master_port))
            kwargs: dict[str, Any] = {}
            if backend == "nccl" and r.world_size > 1:
                kwargs["device_id"] = device  # eager NCCL init; barriers know their device
            dist.init_process_group(backend, init_method="env://", rank=r.rank, world_size=r.world_size,
                                    timeout=timeout, **kwargs)
    return DistInfo(r.rank, r.local_rank, r.world_size, device, backend)


# --------------------------------------------------------------------------------------------------
# Rank helpers: all safe without a process group (they act as world size 1).
# --------------------------------------------------------------------------------------------------
def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled: only for our own small metadata)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
