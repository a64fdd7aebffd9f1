#!/usr/bin/env python
"""Chaos run of the whole chain: kill -9 at random moments in every stage, resubmit, compare.

    tools/chaos.py --work DIR [--kills 20] [--seed 0] [--config configs/tiny.yaml] [--reference DIR]
                   [--summary FILE] [--nproc 2] [--stages a,b] [--no-chaos-overrides] [key=value ...]

1. The reference: ``tools/submit.py --local`` of the config (with CHAOS_OVERRIDES, then the command
   line's key=value overrides) into ``DIR/reference``, uninterrupted (or ``--reference`` names a
   finished run of the same config, which is reused).
2. The chaos run into ``DIR/chaos-<seed>``: the same submission, killed ``--kills`` times. The plan
   (:func:`plan_kills`, seeded) gives every stage of the chain at least one kill and spreads the rest
   over the stages in proportion to their reference duration; each kill falls at a random fraction of
   its stage's reference duration, counted from the moment the stage's job process is up (a kill whose
   stage ends first is a leftover, applied in a later stage after that stage's own kills). A kill is
   SIGKILL to the whole process tree: the submission, torchrun and every worker (torchrun starts its
   workers in their own sessions, so a process group would miss them): the tree is frozen with SIGSTOP
   first, so nothing forks while it is walked. After each kill the same submission is started again,
   until one exits 0.
3. Every product is compared with the reference: each export's safetensors (teacher, AR, students,
   control), each targets manifest (its shards' digests), each evaluation's metrics.json,
   report.json (minus timings) and the prepared data. Bit-identical, or the differences are printed
   (tensor names and largest difference; JSON key paths and both values).

It prints a summary (kills per stage, resubmissions, wall times, identical yes/no) and writes it to
``--summary`` (default DIR/chaos-<seed>.json). Exit 0 when every product is identical, every stage
was hit and at least ``--kills`` kills landed; 1 otherwise. docs/reliability.md has the measured runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import pipeline  # noqa: E402
from trainer.config import load_config  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"

# The tiny chain made short enough for ~20 kills on 2 shared CPU cores (one uninterrupted run: a few
# minutes), with every stage kept: prepare, teacher, AR (teacher.train_ar), eval_0, one round of
# targets -> distill -> eval, the control and its evaluation, the report. Checkpoints every 20 steps
# so that a killed training stage resumes from somewhere; the evaluation and targets jobs are small.
CHAOS_OVERRIDES = [
    "train.steps=120", "train.eval_every=60", "train.ckpt_every=20", "optim.warmup_steps=20",
    "data.num_train_sequences=2048", "data.num_valid_sequences=64", "distill.rounds=1",
    "distill.start_steps=16", "distill.steps_per_round=20", "distill.warmup_steps=5",
    "targets.num_samples=256", "targets.samples_per_shard=64", "eval.steps=[8,16]", "eval.num_samples=64",
    "eval.temperatures=[1.0]", "train.eval_batches=2", "sampling.steps=16", "teacher.train_ar=true",
    "eval.batch_size=64", "distill.control=true"]

# Keys of a JSON product that measure the machine, not the result: left out of the comparison.
TIMING_KEYS = ("seconds", "time", "elapsed", "wall", "duration", "started", "finished", "timestamp", "host")
POLL_S = 0.1
TAKEOVER = ": taking over from"  # trainer/runlock.py's message when a submission takes over a stale lock


# --------------------------------------------------------------------------------------------------
# The plan (pure)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kill:
    stage: str  # the stage this kill is planned for
    fraction: float  # of the stage's reference duration, counted from its job process's start


def plan_kills(durations: dict[str, float], n: int, rng: random.Random) -> list[Kill]:
    """``n`` kills in chain order (``durations`` is ordered like the chain): one per stage, the rest
    drawn in proportion to the stages' reference durations. The first kill of a stage falls in the
    first half of its reference duration (so it lands in the stage even when the stage runs faster
    than in the reference); later ones anywhere in the first 90% (a resumed stage is shorter: a late
    one may outlive it and becomes a leftover for the next stage, see :func:`next_kill`)."""
    stages = list(durations)
    if n < len(stages):
        raise ValueError(f"--kills {n}: every one of the {len(stages)} stages needs one")
    counts = dict.fromkeys(stages, 1)
    weights = [max(durations[s], 1e-3) for s in stages]
    for s in rng.choices(stages, weights=weights, k=n - len(stages)):
        counts[s] += 1
    plan = []
    for s in stages:
        plan.append(Kill(s, rng.uniform(0.05, 0.5)))
        plan += [Kill(s, rng.uniform(0.05, 0.9)) for _ in range(counts[s] - 1)]
    return plan


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command may contain spaces and parens
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (by parent pid, whatever their session or group)."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(root: int) -> int:
    """SIGKILL ``root`` and every descendant: freeze them all first (SIGSTOP, repeated until the walk
    finds no new process), so nothing forks or is re-parented away while the tree is walked."""
    stopped: set[int] = set()
    while True:
        new = [p for p in process_tree(root) if p not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(pid)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(stopped)


def job_running(root: int) -> bool:
    """A stage's job process (``-m trainer.jobs.<x>``, torchrun's included) is up under ``root``."""
    return any("trainer.jobs." in _cmdline(p) for p in process_tree(root)[1:])


def current_stage(run_dir: Path, names: list[str]) -> str | None:
    """The first stage of the chain not recorded done: the one a local submission is running."""
    try:
        stages = pipeline.read_state(run_dir)["stages"]
    except (RuntimeError, OSError):
        return None
    return next((n for n in names if stages.get(n, {}).get("status") != "done"), None)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def job_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def submit_command(config: Path, run_dir: Path, overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "submit.py"), "--config", str(config), "--local",
            "--run-dir", str(run_dir), "--nproc", str(nproc), *overrides]


def run_reference(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "ab") as out:
        rc = subprocess.call(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"the reference run failed (exit {rc}); see {log}")
    return time.monotonic() - t0


def next_kill(todo: list[Kill], stage: str, names: list[str]) -> int | None:
    """Which planned kill applies while ``stage`` runs: its own next one; else a leftover, planned for
    a stage that ended before its moment came; else none. A leftover never waits in front of a later
    stage's own kills, so a stage that outlives its kill moves nothing but that kill."""
    own = next((i for i, k in enumerate(todo) if k.stage == stage), None)
    if own is not None:
        return own
    return next((i for i, k in enumerate(todo) if names.index(k.stage) < names.index(stage)), None)


@dataclass
class Landed:
    planned: str  # the stage the kill was planned for
    stage: str  # the stage it hit
    after_s: float  # seconds after that stage's job process was seen up
    processes: int  # processes killed
    submission: int  # which submission (1-based) it ended


def chaos_run(cmd: list[str], run_dir: Path, plan: list[Kill], durations: dict[str, float], log: Path,
              say=print, max_submissions: int = 200) -> tuple[list[Landed], int, float]:
    """Submit, kill per ``plan``, resubmit until a submission exits 0. ``durations``: every stage of
    the chain, in order, with its reference duration. Returns the kills that landed, the number of
    submissions and the wall time."""
    names = list(durations)
    landed: list[Landed] = []
    todo = list(plan)
    t0 = time.monotonic()
    submissions = 0
    with open(log, "ab") as out:
        while True:
            submissions += 1
            if submissions > max_submissions:
                raise SystemExit(f"gave up after {max_submissions} submissions; see {log}")
            out.write(f"\n===== chaos: submission {submissions}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            seen: tuple[str, float] | None = None  # (stage, when its job process was first seen)
            killed = False
            while proc.poll() is None:
                time.sleep(POLL_S)
                if not todo:
                    continue
                stage = current_stage(run_dir, names)
                if stage is None or not job_running(proc.pid):
                    continue
                if seen is None or seen[0] != stage:
                    seen = (stage, time.monotonic())
                i = next_kill(todo, stage, names)
                if i is None:
                    continue
                kill, after = todo[i], time.monotonic() - seen[1]
                if after < kill.fraction * durations[stage]:
                    continue
                stage_now = current_stage(run_dir, names) or stage
                n = kill_tree(proc.pid)
                proc.wait()
                todo.pop(i)
                landed.append(Landed(kill.stage, stage_now, round(after, 2), n, submissions))
                say(f"  kill {len(landed):>2}: {stage_now:<13} {after:6.1f}s into the stage "
                    f"({n} processes, submission {submissions})")
                killed = True
                break
            if killed:
                continue
            if proc.returncode != 0:
                raise SystemExit(f"submission {submissions} exited {proc.returncode} without a kill: "
                                 f"a stage did not resume; see {log}")
            return landed, submissions, time.monotonic() - t0


# --------------------------------------------------------------------------------------------------
# A lost node on the local SLURM cluster (cluster/local/)
# --------------------------------------------------------------------------------------------------
# What tests/pipeline/test_slurm_pipeline.py submits: 2 nodes x 1 task (the --local run's world size).
SLURM_FLAGS = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--partition", "debug",
               "--time", "60"]
SLURM_FIT = ["slurm.cpus_per_task=1", "slurm.mem_gb_per_task=1"]  # what an emulated node offers


def node_processes(state_dir: Path, node: str) -> list[int]:
    """Every process of an emulated node: its slurmd runs in a private mount namespace (recorded by
    cluster/local/up.sh) that its job steps inherit; nothing else shares it."""
    ns = (state_dir / "pids" / f"slurmd-{node}.mntns").read_text().strip()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def _job_of(pid: int) -> str | None:
    """The SLURM job a process belongs to (its SLURM_JOB_ID, or slurmstepd's ``[JOB.STEP]``)."""
    cmd = _cmdline(pid)
    if cmd.startswith("slurmstepd: ["):
        return cmd.split("[", 1)[1].split(".", 1)[0].split("]", 1)[0]
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURM_JOB_ID=")), None)


def kill_node(state_dir: Path, node: str) -> int:
    """SIGKILL the node's slurmd and every job process on it (frozen first, until none is left)."""
    killed: set[int] = set()
    for _ in range(50):
        pids = [p for p in node_processes(state_dir, node) if p != os.getpid()]
        if not pids:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        killed |= set(pids)
        time.sleep(0.2)
    return len(killed)


def _out(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else f"({' '.join(cmd[:2])} failed: {proc.stderr.strip()})"


def node_state(node: str) -> str:
    return _out(["sinfo", "-h", "-n", node, "-o", "%T"]).split("\n")[0]


def job_history(job_ids: str) -> str:
    """Every record sacct keeps of the jobs (a requeued job has one per start)."""
    return _out(["sacct", "-D", "-X", "-n", "-P", "-j", job_ids, "-o", "JobID,JobName,State,NodeList,ExitCode"])


def live_jobs(run_dir: Path) -> list[str]:
    ids = [str(e["job_id"]) for e in pipeline.read_state(run_dir)["stages"].values() if "job_id" in e]
    if not ids:
        return []
    text = _out(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"])
    return [] if text.startswith("(") else text.split()


def slurm_chaos(args, cfg_overrides: list[str], names: list[str], durations: dict[str, float],
                run: Path, log: Path, say=print) -> dict:
    """Submit the chain to the local cluster, kill one node (slurmd and its job processes) while
    ``args.node_stage`` runs on it, watch what SLURM does, restart the node (cluster/local/up.sh,
    as an administrator would after a reboot), and see the chain through: resubmitting if SLURM
    leaves it stopped. Returns the events, with seconds since the kill."""
    state_dir = Path(os.environ.get("SDTT_SLURM_STATE", "/tmp/sdtt-slurm"))
    rng = random.Random(args.seed)
    cmd = [sys.executable, str(REPO / "tools" / "submit.py"), "--config", str(args.config), "--run-dir", str(run),
           *SLURM_FLAGS, *cfg_overrides, *SLURM_FIT]
    events: list[dict] = []
    t0 = time.monotonic()

    def event(what: str, t_ref: float | None = None, **extra) -> None:
        e = {"t_s": round(time.monotonic() - (t_ref or t0), 1), "what": what, **extra}
        events.append(e)
        say(f"  [{e['t_s']:>6.1f}s] {what}" + "".join(f"; {k}: {v}" for k, v in extra.items()))

    def submit() -> None:
        with open(log, "ab") as out:
            rc = subprocess.call(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"the SLURM submission exited {rc}; see {log}")

    node, candidates = args.node, [c for c in args.node_stage.split(",") if c]
    submit()
    event("chain submitted")
    submissions = 1
    # Wait for a candidate stage's job process on the node, with no other user's job there (the
    # cluster is shared: killing a node kills every job on it), then a random moment into it.
    stage, seen, delay = None, None, 0.0
    while True:
        if time.monotonic() - t0 > args.timeout:
            raise SystemExit(f"none of {', '.join(candidates)} ran alone on {node} within {args.timeout}s")
        st = pipeline.read_state(run)["stages"]
        mine = {str(e["job_id"]) for e in st.values() if "job_id" in e}
        procs = node_processes(state_dir, node)
        foreign = {j for p in procs if (j := _job_of(p)) and j not in mine}
        running = [c for c in candidates if st.get(c, {}).get("status") == "running"
                   and any("trainer.jobs." in _cmdline(p) and _job_of(p) == str(st[c].get("job_id")) for p in procs)]
        if stage is not None and (stage not in running or foreign):
            stage, seen = None, None  # it ended, or someone else's job arrived: wait for the next chance
        if stage is None and running and not foreign:
            stage, seen = running[0], time.monotonic()
            delay = rng.uniform(0.2, 0.6) * durations[stage]
        if stage is not None and time.monotonic() - seen >= delay:
            break
        if all(st.get(c, {}).get("status") == "done" for c in candidates):
            raise SystemExit(f"{', '.join(candidates)} finished before they ran alone on {node}")
        time.sleep(POLL_S)
    job_id = str(pipeline.read_state(run)["stages"][stage]["job_id"])
    n = kill_node(state_dir, node)
    t_kill = time.monotonic()
    event(f"killed node {node}: slurmd and its job processes", t_ref=t0, processes=n, stage=stage, job=job_id,
          seconds_into_stage=round(time.monotonic() - seen, 1))
    restarted = False
    last = (None, None)
    try:
        while True:
            now = time.monotonic()
            if now - t0 > args.timeout:
                raise SystemExit(f"the chain did not finish within {args.timeout}s; see {run}")
            ids = sorted({str(e["job_id"]) for e in pipeline.read_state(run)["stages"].values() if "job_id" in e
                          and e.get("status") != "done"} | {job_id}, key=int)
            ns, hist = node_state(node), job_history(",".join(ids))
            if (ns, hist) != last:
                event("SLURM", t_ref=t_kill, node=ns, job=hist.replace("\n", " | "))
                last = (ns, hist)
            if not restarted and ("down" in ns or now - t_kill > args.node_down_s):
                up = subprocess.run(["bash", str(REPO / "cluster" / "local" / "up.sh"), str(state_dir)],
                                    capture_output=True, text=True, timeout=600)
                restarted = True
                event(f"node {node} restarted (cluster/local/up.sh exit {up.returncode})", t_ref=t_kill,
                      started=up.stdout.strip().splitlines()[-1] if up.stdout.strip() else "")
            st = pipeline.read_state(run)["stages"]
            # Finished means every stage done: the report does not wait for a stage nothing reads
            # (the AR model without eval.judge=ar), so a chain can end with the report and a stage lost.
            todo = [n for n in names if st.get(n, {}).get("status") != "done"]
            if not todo:
                event("chain finished", t_ref=t_kill)
                break
            if restarted and not live_jobs(run):
                event("chain stopped: resubmitting", t_ref=t_kill,
                      stages=", ".join(f"{n} {st.get(n, {}).get('status', 'pending')}" for n in todo))
                submit()
                submissions += 1
            time.sleep(2)
    finally:
        if not restarted:  # leave the shared cluster usable, whatever happened
            subprocess.run(["bash", str(REPO / "cluster" / "local" / "up.sh"), str(state_dir)],
                           capture_output=True, text=True, timeout=600)
    return {"node": node, "stage": stage, "job_id": job_id, "events": events, "submissions": submissions,
            "wall_s": round(time.monotonic() - t0, 1)}


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------
def products(run_dir: Path) -> list[str]:
    """Run-relative paths of everything compared: exports' weights, targets manifests, evaluation
    metrics, the report, the prepared data."""
    pats = ["**/export/*.safetensors", "round_*/targets/manifest.json", "**/eval/metrics.json", "report.json",
            "data/*"]
    found = {str(p.relative_to(run_dir)) for pat in pats for p in run_dir.glob(pat) if p.is_file()}
    return sorted(f for f in found if not f.startswith("code/"))


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strip_timings(obj):
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if not any(t in k.lower() for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def json_diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{p}: only in {'chaos' if k in b else 'reference'}")
            else:
                out += json_diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: reference {json.dumps(a)[:120]} != chaos {json.dumps(b)[:120]}"]


def tensor_diff(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    out = [f"{k}: only in {'chaos' if k in tb else 'reference'}" for k in sorted(set(ta) ^ set(tb))]
    for k in sorted(set(ta) & set(tb)):
        if ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype:
            out.append(f"{k}: {tuple(ta[k].shape)} {ta[k].dtype} != {tuple(tb[k].shape)} {tb[k].dtype}")
        elif not ta[k].equal(tb[k]):
            d = (ta[k].double() - tb[k].double()).abs()
            out.append(f"{k}: {int((d > 0).sum())} of {d.numel()} values differ, largest by {float(d.max()):.3g}")
    return out or ["same tensors, different file bytes (metadata)"]


def compare(ref: Path, run: Path) -> dict[str, list[str]]:
    """Differences per product (empty: bit-identical, timings aside)."""
    diffs: dict[str, list[str]] = {}
    names_ref, names_run = products(ref), products(run)
    for name in sorted(set(names_ref) | set(names_run)):
        a, b = ref / name, run / name
        if name not in names_run or name not in names_ref:
            diffs[name] = [f"only in {'reference' if name in names_ref else 'chaos run'}"]
        elif name.endswith(".json"):
            ja, jb = (strip_timings(json.loads(p.read_text())) for p in (a, b))
            if ja != jb:
                diffs[name] = json_diff(ja, jb)
        elif _sha(a) != _sha(b):
            diffs[name] = tensor_diff(a, b) if name.endswith(".safetensors") else ["bytes differ"]
    return diffs


# --------------------------------------------------------------------------------------------------
def stage_durations(run_dir: Path, names: list[str]) -> dict[str, float]:
    stages = pipeline.read_state(run_dir)["stages"]
    missing = [n for n in names if stages.get(n, {}).get("status") != "done"]
    if missing:
        raise SystemExit(f"{run_dir}: the reference run has stages not done: {', '.join(missing)}")
    return {n: float(stages[n].get("seconds") or 1.0) for n in names}


def shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it (summaries travel into docs/results)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def git_commit() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", type=Path, required=True, help="folder for the reference and chaos runs")
    p.add_argument("--config", type=Path, default=TINY)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stages", default="", help="comma-separated stages to kill in (default: every stage)")
    p.add_argument("--reference", type=Path, default=None, help="a finished uninterrupted run to compare with")
    p.add_argument("--no-chaos-overrides", action="store_true",
                   help="use only the command line's overrides, not CHAOS_OVERRIDES")
    p.add_argument("--summary", type=Path, default=None)
    p.add_argument("--slurm", action="store_true",
                   help="instead: submit to the local SLURM cluster (source its env.sh) and kill one node mid-job")
    p.add_argument("--node", default="n2", help="--slurm: the node to kill")
    p.add_argument("--node-stage", default="teacher,ar,distill_1,control",
                   help="--slurm: the stages to kill it in (the first one seen running alone on the node)")
    p.add_argument("--node-down-s", type=float, default=420.0,
                   help="--slurm: restart the node when SLURM marks it down, or after this many seconds")
    p.add_argument("--timeout", type=float, default=3600.0, help="--slurm: give up after this many seconds")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (after CHAOS_OVERRIDES)")
    args = p.parse_args(argv)
    overrides = ([] if args.no_chaos_overrides else CHAOS_OVERRIDES) + args.overrides
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # before the runs: the code they ran
    cfg = load_config(args.config, overrides)
    names = [s.name for s in pipeline.build_chain(cfg)]

    ref = (args.reference or work / "reference").resolve()
    ref_wall = None
    if not (ref / "report.json").exists():
        print(f"reference run (uninterrupted): {ref}")
        ref_wall = run_reference(submit_command(args.config, ref, overrides, args.nproc), work / "reference.log")
        print(f"  done in {ref_wall:.0f}s")
    durations = stage_durations(ref, names)

    if args.slurm:
        return slurm_main(args, overrides, names, durations, ref, work, commit)
    targets = [s for s in args.stages.split(",") if s] or names
    unknown = [s for s in targets if s not in names]
    if unknown:
        raise SystemExit(f"--stages: {', '.join(unknown)} not in the chain ({', '.join(names)})")
    plan = plan_kills({s: durations[s] for s in names if s in targets}, args.kills, random.Random(args.seed))
    run = work / f"chaos-{args.seed}"
    if run.exists():
        raise SystemExit(f"{run} exists: a chaos run starts from an empty folder (remove it or pick another --seed)")
    print(f"chaos run: {run}, {len(plan)} kills planned (seed {args.seed})")
    landed, submissions, wall = chaos_run(submit_command(args.config, run, overrides, args.nproc), run, plan,
                                          durations, work / f"chaos-{args.seed}.log")
    diffs = compare(ref, run)
    takeovers = (work / f"chaos-{args.seed}.log").read_text(errors="replace").count(TAKEOVER)
    per_stage = {n: sum(k.stage == n for k in landed) for n in names}
    unhit = [n for n in targets if per_stage[n] == 0]
    summary = {
        "commit": commit, "config": shown(args.config), "overrides": overrides, "seed": args.seed,
        "nproc": args.nproc, "kills_planned": len(plan), "kills": len(landed), "kills_per_stage": per_stage,
        "stages_not_hit": unhit, "submissions": submissions, "resubmissions": submissions - 1,
        "stale_lock_takeovers": takeovers, "wall_s": round(wall, 1),
        "reference_wall_s": None if ref_wall is None else round(ref_wall, 1),
        "reference_stage_s": durations, "products_compared": products(ref), "identical": not diffs,
        "differences": diffs, "landed": [asdict(k) for k in landed]}
    out = args.summary or work / f"chaos-{args.seed}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nkills per stage: {' '.join(f'{n}={c}' for n, c in per_stage.items())}")
    print(f"kills: {len(landed)} of {len(plan)} planned; submissions: {submissions} ({submissions - 1} after kills); "
          f"wall time {wall:.0f}s" + (f" (uninterrupted: {ref_wall:.0f}s)" if ref_wall else ""))
    print(f"stale run-folder locks taken over: {takeovers}")
    print(f"products compared: {len(summary['products_compared'])}; identical: {'yes' if not diffs else 'NO'}")
    for name, lines in diffs.items():
        for line in lines[:20]:
            print(f"  DIFFERS {name}: {line}")
    if unhit:
        print(f"stages never hit: {', '.join(unhit)}")
    print(f"summary: {out}")
    ok = not diffs and not unhit and len(landed) >= args.kills
    return 0 if ok else 1


def slurm_main(args, overrides: list[str], names: list[str], durations: dict[str, float], ref: Path,
               work: Path, commit: str) -> int:
    run = work / f"slurm-{args.seed}"
    if run.exists():
        raise SystemExit(f"{run} exists: a chaos run starts from an empty folder")
    print(f"SLURM chaos run: {run}; node {args.node} killed during {args.node_stage}")
    result = slurm_chaos(args, overrides, names, durations, run, work / f"slurm-{args.seed}.log")
    diffs = compare(ref, run)
    summary = {"commit": commit, "config": shown(args.config), "overrides": overrides, "slurm_flags": SLURM_FLAGS,
               "slurm_fit": SLURM_FIT, "seed": args.seed, **result, "resubmissions": result["submissions"] - 1,
               "products_compared": products(ref), "identical": not diffs, "differences": diffs}
    out = args.summary or work / f"slurm-{args.seed}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nnode {args.node} killed in {args.node_stage}; submissions: {result['submissions']}; "
          f"wall time {result['wall_s']:.0f}s")
    print(f"products compared: {len(summary['products_compared'])}; identical: {'yes' if not diffs else 'NO'}")
    for name, lines in diffs.items():
        for line in lines[:20]:
            print(f"  DIFFERS {name}: {line}")
    print(f"summary: {out}")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
