"""Unit tests for cluster.rendezvous: hostlist expansion and launcher environment parsing (pure)."""
from __future__ import annotations

import pytest

from cluster.rendezvous import (
    Rendezvous,
    RendezvousError,
    apply,
    expand_hostlist,
    free_port,
    from_env,
    slurm_port,
)


def _no_port() -> int:
    raise AssertionError("free_port must not be called here")


# --------------------------------------------------------------------------------------------------
# Hostlists
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("n[2]", ["n2"]),
        ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
        ("a1,b[3-5]", ["a1", "b3", "b4", "b5"]),
        ("n[08-10]", ["n08", "n09", "n10"]),  # padding from the lower bound
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[0-1]", ["n0", "n1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # several groups: product, in order
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),  # suffix after the brackets
        ("x[3,1]", ["x3", "x1"]),  # order kept as written
        (" n[1-2] , m ", ["n1", "n2", "m"]),
        ("host.example.org", ["host.example.org"]),
    ],
)
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty hostlist"),
        ("n[1-2", "unclosed '['"),
        ("n1-2]", "unmatched ']'"),
        ("n[[1]]", "nested '['"),
        ("n[2-1]", "descending range"),
        ("n[a-b]", "bad range"),
        ("n[]", "bad range"),
        ("n[1-]", "bad range"),
        ("a,,b", "empty host name"),
    ],
)
def test_expand_hostlist_rejects_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        expand_hostlist(text)


# --------------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------------
TORCHRUN = {
    "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
    "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
}


def test_torchrun() -> None:
    assert from_env(TORCHRUN, free_port=_no_port) == Rendezvous(
        rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1, master_addr="node0", master_port=29500)


def test_torchrun_minimal_variables_mean_one_node() -> None:
    env = {k: TORCHRUN[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = from_env(env)
    assert (r.local_world_size, r.node_rank) == (8, 0)


def test_torchrun_wins_over_slurm() -> None:
    env = {**SLURM_STEP_RANK3, **TORCHRUN}
    assert from_env(env).rank == 5 and from_env(env).master_addr == "node0"


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_torchrun_incomplete_names_the_variable(missing: str) -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(RendezvousError, match=f"RANK is set .* but {missing} is not"):
        from_env(env)


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("RANK", "five", "RANK='five' is not an integer"),
        ("WORLD_SIZE", "0", "WORLD_SIZE='0' must be >= 1"),
        ("LOCAL_RANK", "-1", "LOCAL_RANK='-1' must be >= 0"),
        ("MASTER_PORT", "70000", "MASTER_PORT='70000' is not a TCP port"),
        ("MASTER_PORT", "0", "MASTER_PORT='0' must be >= 1"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(RendezvousError, match=fragment):
        from_env({**TORCHRUN, name: value})


def test_inconsistent_ranks_are_rejected() -> None:
    with pytest.raises(RendezvousError, match=r"rank=8 is not in \[0, world_size=8\)"):
        from_env({**TORCHRUN, "RANK": "8"})
    with pytest.raises(RendezvousError, match="local_rank=4 is not in"):
        from_env({**TORCHRUN, "LOCAL_RANK": "4"})


# --------------------------------------------------------------------------------------------------
# SLURM (values as measured on the local cluster, Slurm 22.05: sbatch -N2 --ntasks-per-node=2)
# --------------------------------------------------------------------------------------------------
SLURM_JOB = {
    "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
}
# What the batch script itself sees: no step id.
SLURM_BATCH = {**SLURM_JOB, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
# Task 3 of `srun` (all 4 tasks) inside that job.
SLURM_STEP_RANK3 = {
    **SLURM_JOB, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
# `srun -N1 -n1 -r1` inside the same job: the step runs on n2 only, yet SLURM_NTASKS_PER_NODE
# still carries the job's 2.
SLURM_SUBSTEP = {
    **SLURM_JOB, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_ID": "1",
    "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_STEP_NODELIST": "n2", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
}


def test_slurm_task() -> None:
    assert from_env(SLURM_STEP_RANK3, free_port=_no_port) == Rendezvous(
        rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, master_addr="n1",
        master_port=slurm_port(5))


def test_slurm_step_variables_win_over_job_ones() -> None:
    r = from_env(SLURM_SUBSTEP, free_port=_no_port)
    assert (r.rank, r.world_size, r.local_world_size, r.master_addr) == (0, 1, 1, "n2")


def test_slurm_batch_script_is_a_single_process() -> None:
    r = from_env(SLURM_BATCH, free_port=lambda: 41234)
    assert (r.rank, r.world_size, r.master_addr, r.master_port) == (0, 1, "127.0.0.1", 41234)
    assert from_env({**SLURM_BATCH, "SLURM_STEP_ID": "4294967294"}, free_port=lambda: 1).world_size == 1


def test_slurm_port_is_deterministic_and_unprivileged() -> None:
    ports = {slurm_port(j) for j in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768  # below Linux's ephemeral range
    assert slurm_port(5) == slurm_port(5) == 20005


def test_slurm_master_port_override() -> None:
    assert from_env({**SLURM_STEP_RANK3, "MASTER_PORT": "12345"}).master_port == 12345


def test_slurm_first_host_of_nodelist_is_master() -> None:
    env = {**SLURM_STEP_RANK3, "SLURM_STEP_NODELIST": "gpu[003-004,010],cpu7", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_STEP_NUM_TASKS": "8"}
    assert from_env(env).master_addr == "gpu003"


def test_slurm_job_nodelist_when_no_step_nodelist() -> None:
    env = {k: v for k, v in SLURM_STEP_RANK3.items() if k != "SLURM_STEP_NODELIST"}
    env["SLURM_JOB_NODELIST"] = "a1,b[3-5]"
    assert from_env(env).master_addr == "a1"


def test_slurm_uneven_tasks_per_node() -> None:
    # 7 tasks: 2 on each of nodes 0-2, 1 on node 3; this is node 3's only task.
    env = {"SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS": "7", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "c[1-4]",
           "SLURM_TASKS_PER_NODE": "2(x3),1"}
    r = from_env(env)
    assert (r.local_world_size, r.node_rank, r.master_addr) == (1, 3, "c1")
    assert from_env({**env, "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}).local_world_size == 2


def test_slurm_even_split_without_per_node_variables() -> None:
    env = {"SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
           "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert from_env(env).local_world_size == 1
    with pytest.raises(RendezvousError, match="cannot tell the tasks per node"):
        from_env({**env, "SLURM_NTASKS": "3"})


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST: unclosed"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(y2)"}, "SLURM_STEP_TASKS_PER_NODE='2\\(y2\\)'"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2"}, "has no entry for SLURM_NODEID=1"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_STEP_NUM_TASKS": ""}, None),  # empty: falls back to SLURM_NTASKS
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc' is not an integer"),
    ],
)
def test_slurm_malformed_values_name_the_variable(change: dict[str, str], fragment: str | None) -> None:
    env = {**SLURM_STEP_RANK3, **change}
    if fragment is None:
        assert from_env(env).world_size == 4
    else:
        with pytest.raises(RendezvousError, match=fragment):
            from_env(env)


def test_slurm_missing_variables_are_named() -> None:
    env = {k: v for k, v in SLURM_STEP_RANK3.items() if not k.endswith("NODELIST")}
    with pytest.raises(RendezvousError, match="SLURM_JOB_NODELIST"):
        from_env(env)
    env = {k: v for k, v in SLURM_STEP_RANK3.items() if k not in ("SLURM_JOB_ID", "SLURM_JOBID")}
    with pytest.raises(RendezvousError, match="SLURM_JOB_ID is not set"):
        from_env(env)


# --------------------------------------------------------------------------------------------------
# Single process, apply
# --------------------------------------------------------------------------------------------------
def test_single_process_defaults() -> None:
    assert from_env({}, free_port=lambda: 45678) == Rendezvous(0, 0, 1, 1, 0, "127.0.0.1", 45678)
    assert from_env({"MASTER_PORT": "2222", "MASTER_ADDR": "h"}, free_port=_no_port).master_port == 2222


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("env", [TORCHRUN, SLURM_STEP_RANK3, SLURM_SUBSTEP])
def test_apply_writes_what_from_env_reads_back(env: dict[str, str]) -> None:
    rdzv = from_env(env)
    target: dict[str, str] = {}
    apply(rdzv, target)
    assert {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(target)
    assert from_env(target, free_port=_no_port) == rdzv


def test_apply_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    apply(Rendezvous(0, 0, 1, 1, 0, "127.0.0.1", 29400))
    assert (os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "29400")
