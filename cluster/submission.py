"""Submitting the pipeline to SLURM, through submitit.

``submit_chain`` turns the pending stages of a run into one SLURM job each, chained with ``afterok``
dependencies:

* the code is snapshotted first into ``<run>/code/<content hash>`` (reused when identical) and every
  job runs from there (cwd and PYTHONPATH), so editing the repository after submitting changes no
  queued job;
* each stage gets the resources ``cluster.resources.stage_resources`` computes (what ``--dry-run``
  prints), ``--requeue``, and the preemption signal ``USR2@slurm.signal_lead_s``;
* before anything is queued, ``sbatch --test-only`` checks every distinct resource request, so one
  SLURM can never satisfy (nodes, CPUs, memory, partition) fails with SLURM's own reason;
* all jobs are submitted HELD, recorded in ``pipeline_state.json`` (status ``submitted`` with the job
  id), and only then released: no job can start (and write the state file) before the whole chain is
  recorded, and a failed submission cancels the half-submitted chain before anything ran;
* a run whose stages are all done submits nothing; a run with jobs still in the queue is refused
  (two jobs of one stage would write the same files), except jobs that can never start
  (``DependencyNeverSatisfied``), which are cancelled.

What runs inside each job is cluster/stage_job.py; SLURM's commands are cluster/slurm.py; the code
snapshot is cluster/snapshot.py. Of trainer/, cluster/ imports only what tests/unit/test_layering.py
allows (config, layout, errors, fileio, runlock: no torch).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import submitit

from cluster import pipeline
from cluster.pipeline import Stage
from cluster.resources import ClusterSpec, StageResources, job_environment, stage_resources
from cluster.slurm import queued, scancel
from cluster.snapshot import snapshot_code
from cluster.stage_job import StageJob, mark_cancelled
from trainer.config import RunConfig

# Launcher variables a job must NOT inherit from the submitting shell: sbatch copies its environment
# into the job, and a RANK left there would make the trainer take it for a torchrun launch.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def downstream(stages: Sequence[Stage], name: str) -> tuple[str, ...]:
    """Every stage that depends on ``name``, directly or not, in chain order."""
    out: list[str] = []
    hit = {name}
    for st in stages:  # topological order
        if any(d in hit for d in st.depends):
            out.append(st.name)
            hit.add(st.name)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------------
KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"


def executor_parameters(res: StageResources, cfg: RunConfig, code_dir: Path, dependency_ids: Sequence[str],
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage: the resources ``--dry-run`` shows, with job
    ids in place of stage names in the dependency. ``env``: variables exported in the job
    (``cluster.resources.job_environment``)."""
    return {
        "job_name": res.job_name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "mem": res.mem,
        "time": res.time_min, "signal_delay_s": cfg.slurm.signal_lead_s,
        "setup": setup_lines(cfg, code_dir, env or {}),
        # srun options of the job step, after submitit's own: --kill-on-bad-exit ends every task once one
        # fails (a rank that hit engine.collective_timeout_s exits 3 while a hung rank would hold the
        # allocation until its time limit; measured in docs/reliability.md), then the site's
        # (containers: pyxis --container-image, ...).
        "srun_args": [KILL_ON_BAD_EXIT, *cfg.slurm.srun_args],
        # Held until the whole chain is recorded (submit_chain releases it).
        "additional_parameters": {"requeue": res.requeue, "hold": True,
                                  **({"gpus_per_node": res.gpus_per_node} if res.gpus_per_node > 0 else {}),
                                  **({"dependency": "afterok:" + ":".join(dependency_ids),
                                      "kill_on_invalid_dep": "yes"} if dependency_ids else {}),
                                  **{k.replace("-", "_"): (True if v == "" else v) for k, v in res.extra.items()}},
    }


def setup_lines(cfg: RunConfig, code_dir: Path, env: Mapping[str, str]) -> list[str]:
    """The job script's lines before ``srun``: the site's ``slurm.setup`` (module load, conda, ...),
    the job environment, then what makes the job run the snapshot, never the live repository, and
    derive its rendezvous from SLURM alone (see LAUNCHER_VARS)."""
    q = shlex.quote(str(code_dir))
    return [*cfg.slurm.setup, *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
            f"unset {' '.join(LAUNCHER_VARS)}", f"export PYTHONPATH={q}", f"cd {q}"]


def submit_chain(stages: list[Stage], cfg: RunConfig, spec: ClusterSpec, run_dir: Path, repo: Path,
                 log: Callable[[str], None] = print,
                 on_recorded: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Submit every pending stage of the run as a SLURM job; returns {stage: job id} (empty when
    everything is done). See the module doc for the guarantees. ``on_recorded`` gets {stage: job id}
    once the whole chain is recorded, before any job can start (tools/submit.py hands the run
    folder's lock to the chain there); if it raises, the held chain is cancelled."""
    run_dir = Path(run_dir).resolve()
    todo = pipeline.pending(run_dir, stages)
    if not todo:
        log(f"nothing to submit: every stage of {run_dir} is done")
        return {}
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: submit from a machine of the SLURM cluster (or use --local)")
    preflight(todo, cfg, spec)
    _clear_queue(run_dir, todo, log)
    code_dir = snapshot_code(Path(repo), run_dir)
    env = job_environment(cfg, os.environ)
    attempt = time.strftime("%Y%m%d-%H%M%S")
    stop_timeout = max(30.0, cfg.slurm.signal_lead_s - 30.0)  # leave time to requeue before the kill
    submitted: dict[str, str] = {}
    rows = []
    try:
        for st in todo:
            res = stage_resources(st, cfg, spec, run_dir.name)
            deps = [submitted[d] for d in st.depends if d in submitted]
            folder = run_dir / "logs" / "slurm" / st.name / attempt
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
            ex.update_parameters(**executor_parameters(res, cfg, code_dir, deps, env))
            job = ex.submit(StageJob(st, str(run_dir), str(code_dir), downstream(stages, st.name), stop_timeout))
            submitted[st.name] = job.job_id
            pipeline.mark(run_dir, st, "submitted", job_id=job.job_id, folder=str(folder), code=str(code_dir))
            rows.append((st.name, job.job_id, f"{res.nodes} x {res.tasks_per_node}",
                         ", ".join(f"{d} ({submitted[d]})" for d in st.depends if d in submitted) or "-"))
        if on_recorded is not None:
            on_recorded(dict(submitted))
    except Exception as e:
        scancel(submitted.values())  # all still held: none of them ran
        now = pipeline.read_state(run_dir)["stages"]
        for name in submitted:
            mark_cancelled(run_dir, name, now.get(name, {}), "submission of the chain failed")
        where = next((s.name for s in todo if s.name not in submitted), "?")
        raise RuntimeError(f"submitting stage '{where}' failed: {e}"
                           + (f"; cancelled the {len(submitted)} job(s) already submitted" if submitted else "")) from e
    release = subprocess.run(["scontrol", "release", ",".join(submitted.values())], capture_output=True, text=True,
                             timeout=60)
    if release.returncode != 0:
        raise RuntimeError(f"scontrol release {','.join(submitted.values())} failed: {release.stderr.strip()}; "
                           "the jobs stay held (release them by hand, or scancel them)")
    skipped = [s.name for s in stages if s not in todo]
    done = f"\nalready done: {', '.join(skipped)}" if skipped else ""
    log(f"run folder: {run_dir}\ncode snapshot: {code_dir}{done}")
    width = max(len(r[0]) for r in rows)
    log(f"{'stage':<{width}}  {'job id':>8}  nodes x tasks  after")
    for name, jid, shape, after in rows:
        log(f"{name:<{width}}  {jid:>8}  {shape:<13}  {after}")
    log(f"follow it with: tools/submit.py --status {run_dir}")
    return submitted


def preflight(todo: Sequence[Stage], cfg: RunConfig, spec: ClusterSpec) -> None:
    """Ask SLURM (``sbatch --test-only``: nothing is submitted) whether it can ever run each distinct
    resource request of the chain, so that an impossible one (too many nodes, CPUs or memory, an
    unknown partition or account) fails before any job is queued, with SLURM's own reason."""
    shapes: dict[tuple[str, ...], str] = {}
    for st in todo:
        lines = tuple(line for line in stage_resources(st, cfg, spec).sbatch_lines()
                      if not line.startswith(("--dependency=", "--job-name=", "--kill-on-invalid-dep")))
        shapes.setdefault(lines, st.name)
    for lines, name in shapes.items():
        proc = subprocess.run(["sbatch", "--test-only", *lines, "--wrap", "true"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            why = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(f"SLURM refuses the resources of stage '{name}' ({' '.join(lines)}): "
                               f"{why[-1] if why else 'sbatch --test-only failed'}; nothing was submitted")


def _clear_queue(run_dir: Path, todo: list[Stage], log: Callable[[str], None]) -> None:
    """Refuse to submit a stage whose previous job may still run; cancel those that never can."""
    state = pipeline.read_state(run_dir)["stages"]
    recorded = {str(state[s.name]["job_id"]): s.name for s in todo if "job_id" in state.get(s.name, {})}
    live = queued(list(recorded))
    orphans = {j: v for j, v in live.items() if v[0] == "PENDING" and v[1] == "DependencyNeverSatisfied"}
    if orphans:
        scancel(orphans)
        log("cancelled jobs that could never start (DependencyNeverSatisfied): "
            + ", ".join(f"{recorded[j]} ({j})" for j in orphans))
    busy = {j: v for j, v in live.items() if j not in orphans}
    if busy:
        listed = ", ".join(f"{recorded[j]} (job {j}, {state_})" for j, (state_, _) in busy.items())
        raise RuntimeError(f"{run_dir} still has jobs in the queue: {listed}; wait for them "
                           f"(tools/submit.py --status {run_dir}) or scancel them, then submit again")
