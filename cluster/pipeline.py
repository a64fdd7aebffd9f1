"""The round DAG, its state file, and running it on this machine.

A pipeline is a list of stages, each one job entry point (``python -m trainer.jobs.<x> --run-dir
DIR [--round R]``) with the file whose presence means "done" (its *product*). The state file
``<run>/pipeline_state.json`` records each finished stage with the sha256 of its product, so a
resubmitted run folder skips what is done (and notices a product changed behind its back) and
resumes what is not. This module knows job names and files, never models: it imports only the
config (for the number of rounds and the teacher source), the run-folder layout (the products) and
the file helpers (sha256).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import RunConfig
from trainer.fileio import atomic_write_text, sha256_file
from trainer.layout import AR, CONTROL, RunLayout

STATE_FILE = RunLayout(Path()).state.name


@dataclass(frozen=True)
class Stage:
    name: str  # unique: prepare, teacher, targets_1, distill_1, eval_1, ..., report
    module: str  # python -m entry point
    args: tuple[str, ...] = ()
    distributed: bool = False  # one task per GPU (per CPU slot without GPUs) across the nodes
    product: str = ""  # run-relative file that exists exactly when the stage has finished
    depends: tuple[str, ...] = field(default_factory=tuple)
    # Run-relative target folders whose shards nothing reads once this stage is done: removed right
    # after its done record is written (targets.keep: false). Their manifest stays (the producer's
    # product), with RELEASED.json beside it, so a later rerun of this stage redoes the producer.
    releases: tuple[str, ...] = ()

    def command(self, run_dir: Path, python: str = sys.executable) -> list[str]:
        return [python, "-m", self.module, "--run-dir", str(run_dir), *self.args]


def build_chain(cfg: RunConfig) -> list[Stage]:
    """prepare -> teacher (-> ar) (-> eval_0) -> for each round: targets -> distill -> eval; then the
    control and its evaluations, and the report: built in this order (the order stages are submitted).

    Round r's targets need round r-1's student (the teacher for r = 1); eval_r runs beside the next
    round's targets since both only read student r. eval_0 evaluates the teacher.
    """
    at = RunLayout(Path())  # run-relative products
    # The prepared data lives in data.cache_dir when set (absolute once tools/submit.py resolved it;
    # joining an absolute path to the run folder gives the path itself), else in <run>/data.
    data_json = str(Path(cfg.data.cache_dir) / "data.json") if cfg.data.cache_dir else str(at.data_info)
    stages = [Stage("prepare", "trainer.jobs.prepare", product=data_json)]
    if cfg.teacher.source == "import":
        stages.append(Stage("teacher", "trainer.jobs.import_teacher", product=str(at.export_manifest(0)),
                            depends=("prepare",)))
    elif cfg.teacher.source == "oracle":  # the exact denoiser of the synthetic source: nothing to train
        stages.append(Stage("teacher", "trainer.jobs.oracle_teacher", product=str(at.export_manifest(0)),
                            depends=("prepare",)))
    else:
        stages.append(Stage("teacher", "trainer.jobs.pretrain", distributed=True,
                            product=str(at.export_manifest(0)), depends=("prepare",)))
    if cfg.teacher.train_ar:  # the optional AR stage: the judge of eval.judge=ar and the AR baseline
        stages.append(Stage("ar", "trainer.jobs.pretrain", ("--ar",), distributed=True,
                            product=str(at.export_manifest(AR)), depends=("prepare",)))
    # The evaluations read <run>/ar/export when the run's own AR model is their judge.
    judge_dep = ("ar",) if cfg.teacher.train_ar and cfg.eval.judge == "ar" and not cfg.eval.ar_path else ()

    def evaluation(name: str, args: tuple[str, ...], product: Path, model_stage: str) -> Stage:
        return Stage(name, "trainer.jobs.evaluate", args, product=str(product), depends=(model_stage, *judge_dep))

    stages.append(evaluation("eval_0", ("--round", "0"), at.eval_metrics(0), "teacher"))
    prev = "teacher"
    evals = ["eval_0"]
    for r in range(1, cfg.distill.rounds + 1):
        rr = ("--round", str(r))
        if cfg.distill.mode == "offline":
            stages.append(Stage(f"targets_{r}", "trainer.jobs.targets", rr, distributed=True,
                                product=str(at.targets_manifest(r)), depends=(prev,)))
            distill_dep: tuple[str, ...] = (f"targets_{r}",)
        else:
            distill_dep = (prev,)
        releases = (str(at.targets(r)),) if cfg.distill.mode == "offline" and not cfg.targets.keep else ()
        stages.append(Stage(f"distill_{r}", "trainer.jobs.distill", rr, distributed=True,
                            product=str(at.export_manifest(r)), depends=distill_dep, releases=releases))
        stages.append(evaluation(f"eval_{r}", rr, at.eval_metrics(r), f"distill_{r}"))
        evals.append(f"eval_{r}")
        prev = f"distill_{r}"
    if cfg.distill.control:
        last = ("--round", str(cfg.distill.rounds))
        stages.append(Stage("control", "trainer.jobs.pretrain", ("--control",), distributed=True,
                            product=str(at.export_manifest(CONTROL)), depends=("teacher",)))
        stages.append(evaluation("eval_control", (*last, "--control"), at.eval_metrics(CONTROL), "control"))
        evals.append("eval_control")
        # control@r: the control after round r's update count, the match of round r's student.
        for r in range(1, cfg.distill.rounds):
            stages.append(evaluation(f"eval_control_{r}", ("--round", str(r), "--control"),
                                     at.control_eval_metrics(r, cfg.distill.rounds), "control"))
            evals.append(f"eval_control_{r}")
    stages.append(Stage("report", "trainer.jobs.report", product=str(at.report), depends=tuple(evals)))
    return stages


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked_state(run_dir: Path) -> Iterator[dict]:
    """Read-modify-write of the state file under an exclusive lock (stages may finish together),
    replaced atomically so a crash never leaves half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / (STATE_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(run_dir)
        yield state
        atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path}: corrupt pipeline state ({e}); move it away to rebuild it") from None
    state.setdefault("stages", {})
    return state


def mark(run_dir: Path, stage: Stage, status: str, **extra) -> None:
    """Record a stage's status; 'done' also records its product's digest."""
    entry = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    if status == "done":
        entry["product"] = stage.product
        entry["sha256"] = sha256_file(Path(run_dir) / stage.product)
        # Done again after its outputs were released: they are back (see release_outputs).
        (Path(run_dir) / stage.product).parent.joinpath(RELEASED).unlink(missing_ok=True)
    with _locked_state(Path(run_dir)) as state:
        state["stages"][stage.name] = entry


def is_done(run_dir: Path, stage: Stage) -> bool:
    """Done means: recorded as done AND the product is still the file that was recorded."""
    entry = read_state(run_dir)["stages"].get(stage.name)
    product = Path(run_dir) / stage.product
    if not entry or entry.get("status") != "done" or not product.exists():
        return False
    return sha256_file(product) == entry.get("sha256")


def pending(run_dir: Path, stages: list[Stage]) -> list[Stage]:
    """The stages still to run: not done, or downstream of something not done, or a done stage
    whose outputs were released (targets.keep: false) while a stage reading them must run again."""
    forced: set[str] = set()
    while True:
        todo: list[Stage] = []
        redo: set[str] = set()
        for st in stages:  # stages are in topological order
            if st.name in forced or any(d in redo for d in st.depends) or not is_done(run_dir, st):
                todo.append(st)
                redo.add(st.name)
        by_name = {s.name: s for s in stages}
        need = {d for st in todo for d in st.depends
                if d not in redo and d in by_name and is_released(run_dir, by_name[d])}
        if not need:
            return todo
        forced |= need


# The stages that come before the first round: what a run on the same data with the same teacher
# shares, whatever its distillation (the budget curve of docs/sdtt-results.md reuses them).
TEACHER_STAGES = ("prepare", "teacher", "ar", "eval_0")


def adopt(src: Path, dst: Path, stages: list[Stage]) -> list[str]:
    """Start run ``dst`` from run ``src``'s finished teacher stages (TEACHER_STAGES): copy the top
    folder of each one's product (data/, teacher/, ar/) and its done record, so that ``dst`` runs only
    its own rounds. The caller checks that both configs agree on everything those stages read.
    Refuses a ``dst`` that has a state already; returns the stages adopted."""
    src, dst = Path(src), Path(dst)
    if (dst / STATE_FILE).exists():
        raise RuntimeError(f"{dst / STATE_FILE}: the run has started already; adopt only into a new run folder")
    chosen = [st for st in stages if st.name in TEACHER_STAGES]
    missing = [st.name for st in chosen if not is_done(src, st)]
    if missing:
        raise RuntimeError(f"{src}: stage(s) {', '.join(missing)} not done there; nothing to adopt")
    for top in sorted({Path(st.product).parts[0] for st in chosen if not Path(st.product).is_absolute()}):
        if not (dst / top).exists():
            shutil.copytree(src / top, dst / top)
    records = read_state(src)["stages"]
    with _locked_state(dst) as state:
        for st in chosen:
            state["stages"][st.name] = {**records[st.name], "adopted_from": str(src)}
    bad = [st.name for st in chosen if not is_done(dst, st)]
    if bad:
        raise RuntimeError(f"{dst}: adopted stage(s) {', '.join(bad)} do not match their records")
    return [st.name for st in chosen]


RELEASED = "RELEASED.json"
SHARD_PROGRESS = "progress"  # trainer/targets/shards.py PROGRESS: per-shard records of a target set


def is_released(run_dir: Path, stage: Stage) -> bool:
    return bool(stage.product) and (Path(run_dir) / stage.product).parent.joinpath(RELEASED).exists()


def release_outputs(run_dir: Path, stage: Stage, log=print) -> list[str]:
    """After ``stage`` is recorded done, remove the target shards it was the last reader of
    (``stage.releases``), keeping each folder's manifest and plan; returns the folders cleared.
    Does nothing unless the done record and its product digest are in place."""
    if not stage.releases or not is_done(run_dir, stage):
        return []
    cleared = []
    for rel in stage.releases:
        folder = Path(run_dir) / rel
        if not folder.is_dir():
            continue
        freed = 0
        for p in sorted(folder.glob("*.tar")) + sorted(folder.glob(".*.tar.tmp")):
            freed += p.stat().st_size
            p.unlink()
        progress = folder / SHARD_PROGRESS
        if progress.is_dir():
            for p in progress.iterdir():
                p.unlink()
            progress.rmdir()
        note = {"after": stage.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bytes_freed": freed,
                "why": "targets.keep: false; nothing reads these shards after this stage"}
        (folder / RELEASED).write_text(json.dumps(note, indent=2))
        cleared.append(rel)
        log(f"[{stage.name}] removed the target shards of {rel} ({freed / 1e6:.1f} MB; targets.keep: false)")
    return cleared


# --------------------------------------------------------------------------------------------------
# Running on this machine (the demo, CI, and --local)
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_command(stage: Stage, run_dir: Path, nproc: int, overrides: list[str]) -> list[str]:
    """torchrun with one process per rank for distributed stages, plain python otherwise."""
    if stage.distributed and nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    "-m", stage.module]
        return [*launcher, "--run-dir", str(run_dir), *stage.args, *overrides]
    return [*stage.command(run_dir), *overrides]


# A job's own one-line error (trainer.jobs.common.entry: "error (rank r): ..."), preferred over the
# launcher's lines after it (torchrun's ChildFailedError, srun's "error: ... task 0: Exited").
JOB_ERROR = re.compile(r"^error( \(rank \d+\))?: ")


def last_error_line(log: str | Path, start: int = 0, max_bytes: int = 65536) -> str:
    """The failed job's error message in its log, read from byte ``start`` (this attempt's output)
    over the last ``max_bytes``: the last ``error (rank r): ...`` line the job printed, else the last
    unindented line mentioning an error or exception that is not the launcher's. "" when none."""
    try:
        with open(log, "rb") as f:
            size = os.path.getsize(log)
            f.seek(max(start, size - max_bytes, 0))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    own = [line.strip() for line in lines if JOB_ERROR.match(line)]
    if own:
        return own[-1][:300]
    for line in reversed(lines):
        text = line.strip()
        if text and not line[0].isspace() and not text.startswith(("srun:", "slurmstepd", "submitit")) \
                and re.search(r"error|exception", text, re.I):
            return text[:300]
    return ""


def run_local(stages: list[Stage], run_dir: Path, nproc: int = 2, overrides: list[str] | None = None,
              log=print) -> None:
    """Run the pending stages in order; stop at the first failure, naming the stage and its log."""
    run_dir = Path(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = pending(run_dir, stages)
    done = [s.name for s in stages if s not in todo]
    if done:
        log(f"already done: {', '.join(done)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    for st in todo:
        cmd = local_command(st, run_dir, nproc, list(overrides or []))
        log(f"[{st.name}] {' '.join(cmd)}" + ("" if _tee() else f"\n    log: {logs / (st.name + '.log')}"))
        t0 = time.time()
        mark(run_dir, st, "running")
        log_file = logs / f"{st.name}.log"
        start = log_file.stat().st_size if log_file.exists() else 0  # the log is appended to: this attempt's
        rc, error = _run_logged(cmd, env, log_file)
        if rc != 0:
            # The job's own line, read from its output stream (a full disk may keep it out of the log);
            # else the log's last error line of this attempt (a crash before entry could print one).
            why = error or last_error_line(log_file, start)
            mark(run_dir, st, "failed", returncode=rc, **({"reason": why} if why else {}))
            raise RuntimeError(f"stage '{st.name}' failed with exit code {rc}" + (f": {why}" if why else "")
                               + f"; log: {log_file}")
        if not (run_dir / st.product).exists():
            mark(run_dir, st, "failed", returncode=rc)
            raise RuntimeError(f"stage '{st.name}' exited 0 but did not write {run_dir / st.product}")
        mark(run_dir, st, "done", seconds=round(time.time() - t0, 1))
        log(f"[{st.name}] done in {time.time() - t0:.0f}s")
        release_outputs(run_dir, st, log)


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, str]:
    """Run ``cmd`` with its output appended to ``log_path`` (and shown, with SDTT_LOG_TO_CONSOLE=1);
    returns its exit code and the job's one-line error (``error (rank r): ...``, the first rank's to
    say it; trainer.jobs.common.entry), read from the stream itself: on a full disk the log file may
    not take it."""
    error = ""
    log = open(log_path, "ab", buffering=0)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            if _tee():
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            if not log.closed:
                try:
                    log.write(line)
                except OSError:  # a full disk: the stage goes on; its error line is kept below
                    log.close()
            at = line.find(b"error (rank ")  # after a progress bar's output, on the same line
            if not error and at >= 0:
                error = line[at:].decode(errors="replace").strip()
        rc = proc.wait()
    finally:
        log.close()
    return rc, error


def _tee() -> bool:
    """SDTT_LOG_TO_CONSOLE=1 shows stage output on the console instead of logs/<stage>.log."""
    return os.environ.get("SDTT_LOG_TO_CONSOLE") == "1"
