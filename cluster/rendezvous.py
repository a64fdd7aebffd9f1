"""Where a process stands in a distributed job, read from its environment.

``from_env(env)`` turns an environment mapping into a :class:`Rendezvous` (ranks, sizes and the
address of rank 0), whoever launched the process:

1. torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), when
   ``RANK`` is set; torchrun also inside a SLURM job wins, since it made the actual processes;
2. a task of an srun step (``SLURM_PROCID`` and ``SLURM_STEP_ID``): rank 0 runs on the first
   host of the step's node list and listens on a port derived from the job id, so every task
   computes the same address on its own (``MASTER_PORT``, when set, replaces the derived port,
   e.g. to dodge a clash; the address is not taken from the environment, rank 0 is where srun
   put it). Step variables win over job ones: for ``srun -N1 -n1``
   inside a 2-node job, ``SLURM_NTASKS_PER_NODE`` still says the job's count (measured, 22.05);
3. otherwise one process: rank 0 of 1 on 127.0.0.1 and a free port. That includes an sbatch
   script itself (``SLURM_PROCID=0`` but no ``SLURM_STEP_ID``): it is one process whatever
   ``--ntasks`` says, as tasks only exist inside srun; reading ``SLURM_NTASKS`` there would make
   it wait forever for peers that were never started.

``apply(rdzv)`` writes the torchrun variables into ``os.environ`` so that
``torch.distributed.init_process_group(init_method="env://")`` (and DeepSpeed) find them; it also
writes torchrun's ``GROUP_RANK`` (the node rank), so that ``from_env`` reads back exactly ``rdzv``.

Everything except the free-port fallback is a pure function of the mapping; malformed values raise
:class:`RendezvousError` naming the variable. Beware that sbatch copies the submitting shell's
environment into the job: a ``RANK`` or ``MASTER_PORT`` left there by a previous ``apply`` would
take precedence, so never submit from a process that called ``apply``.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

__all__ = ["Rendezvous", "RendezvousError", "from_env", "apply", "expand_hostlist", "slurm_port", "free_port"]

# MASTER_PORT for a SLURM job: 20000 + job_id % 12000, i.e. in [20000, 32000). Unprivileged, above
# the usual service ports, and below Linux's ephemeral range (32768-60999) so that no outgoing
# connection on the node can already hold it by chance. Two jobs whose ids differ by a multiple of
# 12000 share a port, which only matters if they share a node too.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000


class RendezvousError(ValueError):
    """A launcher variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        checks = [
            (self.world_size >= 1, f"world_size={self.world_size} must be at least 1"),
            (0 <= self.rank < self.world_size, f"rank={self.rank} is not in [0, world_size={self.world_size})"),
            (1 <= self.local_world_size <= self.world_size,
             f"local_world_size={self.local_world_size} is not in [1, world_size={self.world_size}]"),
            (0 <= self.local_rank < self.local_world_size,
             f"local_rank={self.local_rank} is not in [0, local_world_size={self.local_world_size})"),
            (self.node_rank >= 0, f"node_rank={self.node_rank} must be >= 0"),
            (bool(self.master_addr), "master_addr is empty"),
            (1 <= self.master_port <= 65535, f"master_port={self.master_port} is not in [1, 65535]"),
        ]
        for ok, why in checks:
            if not ok:
                raise RendezvousError(f"inconsistent rendezvous: {why}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------------------------------
# Hostlists
# --------------------------------------------------------------------------------------------------
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,3],b`` -> ``a[1,3]``, ``b``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i} in {what} {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' at position {i} in {what} {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in {what} {text!r}")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, text: str) -> list[str]:
    """``001-003,7`` -> ``001 002 003 7``; a range keeps the zero padding of its lower bound."""
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {text!r}")
        width = len(lo) if lo.startswith("0") else 1
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(pattern: str, text: str) -> list[str]:
    """One comma-free pattern, possibly with several bracket groups: ``r[1-2]n[1-2]`` (product)."""
    if not pattern:
        raise ValueError(f"empty host name in hostlist {text!r}")
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)  # balanced: checked by _split_top_level
    prefix, body, rest = pattern[:open_at], pattern[open_at + 1:close_at], pattern[close_at + 1:]
    tails = _expand_one(rest, text) if rest else [""]
    return [prefix + n + tail for n in _expand_ranges(body, text) for tail in tails]


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM hostlist (``n[1-2]``, ``gpu[001-004,010],cpu7``) into host names, in order.

    Raises ``ValueError`` on malformed input (the message quotes it).
    """
    text = text.strip()
    if not text:
        raise ValueError("empty hostlist")
    hosts: list[str] = []
    for part in _split_top_level(text, "hostlist"):
        hosts.extend(_expand_one(part.strip(), text))
    return hosts


def _expand_counts(text: str) -> list[int]:
    """SLURM's compressed per-node counts: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad count {item!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# --------------------------------------------------------------------------------------------------
# Environment parsing
# --------------------------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise RendezvousError(f"environment variable {name} is not set")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise RendezvousError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise RendezvousError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _first(env: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` that is set and not empty."""
    return next((n for n in names if env.get(n, "").strip()), None)


def _port(env: Mapping[str, str], name: str) -> int:
    port = _int(env, name, minimum=1)
    if port > 65535:
        raise RendezvousError(f"environment variable {name}={env[name]!r} is not a TCP port (1-65535)")
    return port


def slurm_port(job_id: int) -> int:
    """The MASTER_PORT every task of SLURM job ``job_id`` derives on its own."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _from_torchrun(env: Mapping[str, str]) -> Rendezvous:
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise RendezvousError(f"RANK is set (torchrun-style launch) but {name} is not")
    rank = _int(env, "RANK")
    world = _int(env, "WORLD_SIZE", minimum=1)
    local_rank = _int(env, "LOCAL_RANK")
    # torchrun always sets LOCAL_WORLD_SIZE and GROUP_RANK; another launcher that sets only the
    # five core variables is taken to be one node.
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world, minimum=1)
    node_rank = _int(env, "GROUP_RANK", default=rank // local_world)
    return Rendezvous(rank, local_rank, world, local_world, node_rank,
                      env["MASTER_ADDR"].strip(), _port(env, "MASTER_PORT"))


def _from_slurm(env: Mapping[str, str]) -> Rendezvous:
    rank = _int(env, "SLURM_PROCID")
    ntasks_name = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or "SLURM_NTASKS"
    world = _int(env, ntasks_name, minimum=1)
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    node_rank = _int(env, "SLURM_NODEID", default=0)

    nodelist_name = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist_name is None:
        raise RendezvousError("SLURM_PROCID is set but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is not")
    try:
        hosts = expand_hostlist(env[nodelist_name])
    except ValueError as e:
        raise RendezvousError(f"environment variable {nodelist_name}: {e}") from None

    local_world = _slurm_local_world(env, node_rank, world, len(hosts))

    if env.get("MASTER_PORT", "").strip():
        port = _port(env, "MASTER_PORT")
    else:
        job_name = _first(env, "SLURM_JOB_ID", "SLURM_JOBID") or "SLURM_JOB_ID"
        port = slurm_port(_int(env, job_name))
    return Rendezvous(rank, local_rank, world, local_world, node_rank, hosts[0], port)


def _slurm_local_world(env: Mapping[str, str], node_rank: int, world: int, n_nodes: int) -> int:
    """Tasks on this node: this node's entry in the step's compressed tasks-per-node list
    (``2(x3),1``), else --ntasks-per-node, else the job's list, else an even split."""
    name = _first(env, "SLURM_STEP_TASKS_PER_NODE")
    if name is None and env.get("SLURM_NTASKS_PER_NODE", "").strip():
        return _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    name = name or _first(env, "SLURM_TASKS_PER_NODE")
    if name is not None:
        try:
            counts = _expand_counts(env[name])
        except ValueError as e:
            raise RendezvousError(f"environment variable {name}={env[name]!r}: {e}") from None
        if node_rank >= len(counts):
            raise RendezvousError(f"environment variable {name}={env[name]!r} has no entry for "
                                  f"SLURM_NODEID={node_rank}")
        return counts[node_rank]
    if world % n_nodes:
        raise RendezvousError(f"cannot tell the tasks per node: SLURM_NTASKS={world} over {n_nodes} "
                              "nodes and neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set")
    return world // n_nodes


# Step ids SLURM gives the pseudo-steps that are not srun steps (batch script, extern, interactive).
_NON_SRUN_STEPS = {"batch", "extern", "interactive", "4294967293", "4294967294", "4294967295"}


def _in_srun_step(env: Mapping[str, str]) -> bool:
    name = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
    return name is not None and env[name].strip() not in _NON_SRUN_STEPS


def from_env(env: Mapping[str, str], free_port: Callable[[], int] = free_port) -> Rendezvous:
    """The rendezvous described by ``env`` (torchrun > SLURM > single process; see module doc).

    ``free_port`` is only called for a single process without ``MASTER_PORT``.
    """
    if _first(env, "RANK"):
        return _from_torchrun(env)
    if _first(env, "SLURM_PROCID") and _in_srun_step(env):
        return _from_slurm(env)
    addr = env.get("MASTER_ADDR", "").strip() or "127.0.0.1"
    port = _port(env, "MASTER_PORT") if env.get("MASTER_PORT", "").strip() else free_port()
    return Rendezvous(0, 0, 1, 1, 0, addr, port)


def apply(rdzv: Rendezvous, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the torch.distributed ``env://`` variables for ``rdzv`` (into ``os.environ`` by default)."""
    target = os.environ if environ is None else environ
    target.update({
        "RANK": str(rdzv.rank),
        "LOCAL_RANK": str(rdzv.local_rank),
        "WORLD_SIZE": str(rdzv.world_size),
        "LOCAL_WORLD_SIZE": str(rdzv.local_world_size),
        "MASTER_ADDR": rdzv.master_addr,
        "MASTER_PORT": str(rdzv.master_port),
        "GROUP_RANK": str(rdzv.node_rank),
    })
