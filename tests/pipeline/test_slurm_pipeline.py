"""The whole chain on the real local SLURM cluster: ``tools/submit.py --nodes 2`` through submitit.

Nothing is mocked: two emulated nodes (n1, n2), sbatch/srun/sacct/scancel, afterok dependencies,
requeue, DeepSpeed over gloo with MASTER_ADDR=n1. One module-scoped run of the shortened tiny
pipeline (tests/pipeline/test_pipeline.py OVERRIDES) is driven while it runs:

* ``targets_1`` is preempted in the middle of a shard (its writers are frozen with SIGSTOP the
  moment a temporary shard appears, so "mid-shard" is certain rather than likely; a shard takes
  ~0.3 s here), with submitit's own preemption path (``job._interrupt()``: SIGTERM then USR2);
* ``distill_1`` is preempted the same way a few steps into its round (jobs of this run sleep
  SDTT_DISTILL_STEP_DELAY_S per distillation step, which changes no number, to leave a window).

Both are requeued by submitit and resume; every number of the run must then equal the local run's
(``tools/submit.py --local``, 2 processes on one node; here 2 tasks on 2 nodes: the same world
size and seeds). The local run is the session's shared one (tests/conftest.py ``local_pipeline``),
which runs in the background while the SLURM jobs run when this module comes first.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import submitit

from cluster import pipeline
from cluster.resources import ClusterSpec, stage_resources
from cluster.snapshot import CODE_DIRS, snapshot_code
from cluster.stage_job import StageJob
from cluster.submission import downstream
from tests.helpers import PIPELINE_OVERRIDES as OVERRIDES
from tests.helpers import TINY
from tests.helpers.slurm import (
    FIT,
    SLURM_FLAGS,
    LocalPipeline,
    LocalSlurm,
    diagnose,
    on_slurm,
    stages_of,
    state,
    submit,
    task_logs,
    wait_for_run,
)
from trainer import runlock
from trainer.config import load_config, parse_slurm_time

STEP_DELAY_S = "0.25"
RUN_TIMEOUT_S = 1200
SPEC = ClusterSpec(nodes=2, gpus_per_node=0, cpu_slots_per_node=1)
LAUNCH = ["slurm.partition=debug", "slurm.time_min=60"]  # what --partition and --time of SLURM_FLAGS write


def sacct(ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}


def interrupt(run: Path, stage: str) -> str:
    """submitit's own preemption path (what SLURM does on preemption): SIGTERM, then USR2."""
    entry = state(run)[stage]
    job: submitit.SlurmJob = submitit.SlurmJob(folder=entry["folder"], job_id=str(entry["job_id"]))
    job._interrupt()
    return str(entry["job_id"])


def job_processes(run: Path, module: str) -> list[int]:
    """PIDs of the stage processes of THIS run (its folder is in their command line)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in cmd and str(run).encode() in cmd:
                pids.append(int(p.name))
    return pids


@dataclass
class Preemption:
    """Preempt ``stage`` once, when ``ready(run)`` says so; ``freeze`` stops its processes first."""

    stage: str
    ready: Callable[[Path], bool]
    module: str = ""  # freeze these processes (SIGSTOP) around the interrupt
    done: dict[str, Any] = field(default_factory=dict)

    def poll(self, run: Path, entry: dict[str, Any]) -> None:
        if self.done or entry.get("status") != "running" or not self.ready(run):
            return
        frozen = job_processes(run, self.module) if self.module else []
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            if frozen and not self.ready(run):  # raced: that shard was published meanwhile; try the next
                return
            self.done.update(job_id=interrupt(run, self.stage), at=time.strftime("%H:%M:%S"), frozen=len(frozen))
        finally:
            for pid in frozen:  # the signals wait for them; they act on SIGCONT, mid-shard
                os.kill(pid, signal.SIGCONT)


def temporary_shard_exists(round_idx: int) -> Callable[[Path], bool]:
    def ready(run: Path) -> bool:
        folder = run / f"round_{round_idx}" / "targets"
        return folder.is_dir() and any(p.name.endswith(".tmp") and ".tar" in p.name for p in folder.iterdir())
    return ready


def distill_steps_done(round_idx: int, at_least: int) -> Callable[[Path], bool]:
    pattern = re.compile(rf"distill r{round_idx}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")

    def ready(run: Path) -> bool:
        log = state(run)[f"distill_{round_idx}"].get("log")
        if not log or not Path(log).exists():
            return False
        steps = [int(m.group(1)) for m in pattern.finditer(Path(log).read_text(errors="replace"))]
        return bool(steps) and max(steps) >= at_least
    return ready


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class SlurmRun:
    run: Path
    local: LocalPipeline
    first_submit: str  # tools/submit.py's output
    refused: subprocess.CompletedProcess  # a second submission while the chain was queued
    preempted: dict[str, dict[str, Any]]
    seconds: float


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster: LocalSlurm, local_pipeline: LocalPipeline, tmp_path_factory: pytest.TempPathFactory,
              ) -> SlurmRun:
    run = tmp_path_factory.mktemp("slurm") / "run"
    t0 = time.monotonic()
    proc = submit("--config", str(TINY), *SLURM_FLAGS, "--run-dir", str(run), *OVERRIDES, *FIT,
                  extra_env={"SDTT_DISTILL_STEP_DELAY_S": STEP_DELAY_S})
    refused = submit("--run-dir", str(run), *SLURM_FLAGS, check=False)
    plan = (Preemption("targets_1", temporary_shard_exists(1), module="trainer.jobs.targets"),
            Preemption("distill_1", distill_steps_done(1, at_least=4)))
    wait_for_run(run, RUN_TIMEOUT_S, plan)
    seconds = time.monotonic() - t0
    # A stage is marked done inside its job, a moment before the job ends.
    ids = [str(e["job_id"]) for e in state(run).values()]
    deadline = time.monotonic() + 60
    while set(sacct(ids).values()) != {"COMPLETED"}:
        assert time.monotonic() < deadline, sacct(ids)
        time.sleep(0.5)
    sys.stderr.write(f"\n[slurm pipeline] finished in {seconds:.0f} s; preempted: "
                     f"{ {p.stage: p.done for p in plan} }\n")
    return SlurmRun(run, local_pipeline, proc.stdout, refused, {p.stage: p.done for p in plan}, seconds)


@on_slurm
def test_every_stage_ran_as_its_own_slurm_job(slurm_run: SlurmRun) -> None:
    st = state(slurm_run.run)
    names = [s.name for s in stages_of(slurm_run.run)]
    assert sorted(st) == sorted(names)
    assert not (slurm_run.run / "run.lock.json").exists(), "the chain's last job releases the run folder lock"
    ids = [str(st[n]["job_id"]) for n in names]
    assert len(set(ids)) == len(ids)
    assert set(sacct(ids).values()) == {"COMPLETED"}, sacct(ids)
    for n in names:  # the submission table names every job
        assert re.search(rf"^{n}\s+{st[n]['job_id']}\s", slurm_run.first_submit, re.M), slurm_run.first_submit
    assert "code snapshot: " + str(slurm_run.run / "code") in slurm_run.first_submit


@on_slurm
def test_a_second_submission_is_refused_while_the_chain_is_queued(slurm_run: SlurmRun) -> None:
    assert slurm_run.refused.returncode == 2, slurm_run.refused.stdout + slurm_run.refused.stderr
    # The run folder's lock (trainer/runlock.py) is the chain's: one line naming its jobs.
    first = str(state(slurm_run.run)["prepare"]["job_id"])
    lines = slurm_run.refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by the SLURM chain of jobs " + first in lines[0], lines


@on_slurm
def test_distributed_stages_span_both_nodes_with_rank_0_on_n1(slurm_run: SlurmRun) -> None:
    for stage in ("teacher", "targets_1", "distill_1", "targets_2", "distill_2"):
        logs = task_logs(slurm_run.run, stage)
        assert sorted(logs) == [0, 1], stage
        for rank, node in ((0, "n1"), (1, "n2")):
            assert re.search(rf"rank {rank}/2 \(local 0/1, node rank {rank}\) on {node}; master n1:\d+", logs[rank]), \
                (stage, logs[rank][-2000:])
    assert sorted(task_logs(slurm_run.run, "eval_0")) == [0]


@on_slurm
def test_report_equals_the_local_run(slurm_run: SlurmRun) -> None:
    """Same seeds, same world size (2 processes on one node vs 2 tasks on 2 nodes), two preemptions:
    every weight file, target set and number must be identical."""
    local = slurm_run.local.wait()
    run = slurm_run.run
    exports = ["teacher/export", "round_1/student/export", "round_2/student/export"]
    for export in exports:
        # The weight files (raw and EMA); the config beside them differs in its slurm section.
        files, want = ({k: v["sha256"] for k, v in json.loads((r / export / "export.json").read_text())["files"].items()
                        if k.endswith(".safetensors")} for r in (run, local))
        assert len(files) == 2 and files == want, f"{export}: weights differ from the local run"
    for r in (1, 2):
        path = f"round_{r}/targets/manifest.json"
        assert json.loads((run / path).read_text()) == json.loads((local / path).read_text()), path

    def numbers(report: dict) -> dict:
        for row in report["rows"]:
            row.pop("seconds", None)  # wall time, the only thing allowed to differ
        return report

    got = numbers(json.loads((run / "report.json").read_text()))
    want = numbers(json.loads((local / "report.json").read_text()))
    assert got == want


@on_slurm
def test_preempted_targets_job_resumed_mid_shard(slurm_run: SlurmRun) -> None:
    """Preempted with a shard half written: the restart dropped the half shard, rewrote it, and the
    set is the clean run's, shard for shard (manifest compared in test_report_equals_the_local_run)."""
    done = slurm_run.preempted["targets_1"]
    assert done and done["frozen"] == 2, done  # both ranks' writers were frozen mid-set
    entry = state(slurm_run.run)["targets_1"]
    assert entry["restarts"] >= 1 and str(entry["job_id"]) == done["job_id"]
    logs = task_logs(slurm_run.run, "targets_1")
    assert "preemption signal" in logs[0] and "requeueing" in logs[0], logs[0][-3000:]
    assert re.search(r"removed leftover \.targets-\d{4}-\d{6}\.tar\.tmp", logs[0]), logs[0][-3000:]
    manifest = json.loads((slurm_run.run / "round_1/targets/manifest.json").read_text())
    firsts = sorted(s["first"] for s in manifest["shards"])
    assert firsts == list(range(0, 256, 64)) and sum(s["samples"] for s in manifest["shards"]) == 256


@on_slurm
def test_preempted_distill_job_resumed_from_its_checkpoint(slurm_run: SlurmRun) -> None:
    """Stopped at a step boundary on both ranks, checkpointed, requeued, resumed: its weights are
    the uninterrupted local run's (compared in test_report_equals_the_local_run)."""
    done = slurm_run.preempted["distill_1"]
    assert done, "distill_1 was never preempted"
    entry = state(slurm_run.run)["distill_1"]
    assert entry["restarts"] >= 1 and str(entry["job_id"]) == done["job_id"]
    logs = task_logs(slurm_run.run, "distill_1")
    stop = re.search(r"stopping at step (\d+) \(signal \d+\): checkpoint saved", logs[0])
    assert stop and 4 <= int(stop.group(1)) < 20, logs[0][-3000:]
    assert "resuming this round's checkpoint" in logs[0], logs[0][-3000:]
    assert "child stopped (exit 75)" in logs[0], logs[0][-3000:]  # rank 0 saw its child exit PREEMPTED
    # Rank 1 saved its checkpoint too; its child then exits 75 or, if the requeue's SIGTERM reaches it
    # first, is terminated after saving (exit -15): either way it is a stop, not a failure.
    assert re.search(r"stopping at step \d+ \(signal \d+\): checkpoint saved", logs[1]), logs[1][-3000:]
    assert re.search(r"child stopped \(exit (75|-15)\)", logs[1]), logs[1][-3000:]


@on_slurm
def test_status_shows_slurm_states(slurm_run: SlurmRun) -> None:
    out = submit("--status", str(slurm_run.run)).stdout
    names = [s.name for s in stages_of(slurm_run.run)]
    assert f"progress: {len(names)} of {len(names)} stages done" in out
    for n in names:
        assert re.search(rf"^\s+{n}\s+done\s+job \d+ COMPLETED", out, re.M), out
    assert re.search(r"distill_1\s+done\s+job \d+ COMPLETED\s+\(restarted 1x\)", out), out


@on_slurm
def test_jobs_get_the_resources_dry_run_shows(slurm_run: SlurmRun) -> None:
    """What --dry-run prints is what was submitted (dependencies as job ids instead of names)."""
    cfg = load_config(slurm_run.run / "config.yaml", LAUNCH)
    st = state(slurm_run.run)
    for stage in stages_of(slurm_run.run):
        entry = st[stage.name]
        script = (Path(entry["folder"]) / f"{entry['job_id']}_submission.sh").read_text()
        submitted = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
        for line in stage_resources(stage, cfg, SPEC, slurm_run.run.name).sbatch_lines():
            key, _, value = line[2:].partition("=")
            if key == "time":  # submitit writes minutes
                value = str(parse_slurm_time(value))
            elif key == "dependency":
                value = "afterok:" + ":".join(str(st[d]["job_id"]) for d in stage.depends)
            assert submitted.get(key) == value, (stage.name, key, value, submitted)
    assert "#SBATCH --job-name=run-teacher" in (Path(st["teacher"]["folder"]) /
                                                 f"{st['teacher']['job_id']}_submission.sh").read_text()


@on_slurm
def test_resubmitting_a_finished_run_submits_nothing(slurm_run: SlurmRun) -> None:
    before = (slurm_run.run / "pipeline_state.json").read_text()
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    proc = submit("--run-dir", str(slurm_run.run), *SLURM_FLAGS)
    assert "nothing to submit: every stage" in proc.stdout, proc.stdout
    assert (slurm_run.run / "pipeline_state.json").read_text() == before
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                          check=True).stdout == queued


# --------------------------------------------------------------------------------------------------
# A run submitted from another directory, every path in its config relative to that directory
# --------------------------------------------------------------------------------------------------
WORDS = [f"w{i:02d}" for i in range(38)]  # + <eos> + <unk> = a vocabulary of 40, the MDLM fixture's


def make_site(site: Path) -> list[str]:
    """A user's working directory: a config, a text corpus, a tokenizer, an MDLM teacher and an HF
    judge, each in a folder of its own; returns the overrides that point at them, all relative."""
    import random

    import tokenizers
    import transformers

    from tests.helpers import (
        COND,
        HEADS,
        LAYERS,
        LENGTH,
        V1,
        D,
        hf_config,
        mdlm_state_dict,
        write_checkpoint,
    )

    (site / "configs").mkdir(parents=True)
    (site / "configs" / "tiny.yaml").write_text(TINY.read_text())
    rng = random.Random(0)
    (site / "corpus").mkdir()
    for part in range(2):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(150)]
        (site / "corpus" / f"part{part}.txt").write_text("\n\n".join(docs) + "\n")
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (site / "tokenizer").mkdir()
    tok.save(str(site / "tokenizer" / "tokenizer.json"))
    (site / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    write_checkpoint(site / "models" / "mdlm", mdlm_state_dict(), config=hf_config())
    judge = transformers.GPT2Config(vocab_size=V1 - 1, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                                    bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(judge).save_pretrained(site / "models" / "judge")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the text evaluation retokenises with the judge's
        (site / "models" / "judge" / name).write_bytes((site / "tokenizer" / name).read_bytes())
    return [f"model.vocab_size={V1 - 1}", f"model.d_model={D}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}",
            f"model.cond_dim={COND}", f"model.max_seq_len={LENGTH}", f"data.seq_len={LENGTH}",
            "data.source=text", "data.paths=[corpus/*.txt]", "data.tokenizer=tokenizer", "data.cache_dir=cache",
            "data.num_train_sequences=0", "data.num_valid_sequences=16",
            "teacher.source=import", "teacher.import_path=models/mdlm", "eval.judge=models/judge",
            "distill.rounds=1", "distill.start_steps=8", "distill.steps_per_round=4", "distill.warmup_steps=1",
            "distill.global_batch_size=4", "targets.num_samples=32", "targets.samples_per_shard=16", "targets.k=4",
            "targets.batch_size=8", "eval.steps=[2,8]", "eval.num_samples=8", "eval.batch_size=8",
            "train.eval_batches=1", "engine.global_batch_size=4"]


@on_slurm
def test_a_run_submitted_from_another_directory_with_relative_paths(slurm_cluster: LocalSlurm,
                                                                   tmp_path: Path) -> None:
    """The user's directory is not the repository: --config, --run-dir, the corpus, tokenizer, data
    cache, MDLM teacher and HF judge are all given relative to it. The jobs run in the run's code
    snapshot, yet find every file, because tools/submit.py stored the paths absolute."""
    site = tmp_path / "site"
    overrides = make_site(site)
    proc = submit("--config", "configs/tiny.yaml", *SLURM_FLAGS, "--run-dir", "runs/rel", *overrides, *FIT, cwd=site)
    run = site / "runs" / "rel"
    assert f"run folder: {run}" in proc.stdout, proc.stdout
    stored = (run / "config.yaml").read_text()
    for key, rel in (("tokenizer", "tokenizer"), ("cache_dir", "cache"), ("import_path", "models/mdlm"),
                     ("judge", "models/judge")):
        assert f"{key}: {site / rel}" in stored, (key, stored)
    assert f"- {site / 'corpus'}/*.txt" in stored, stored
    wait_for_run(run, 600)
    st = state(run)
    assert all(st[s.name]["status"] == "done" for s in stages_of(run)), diagnose(run)
    assert (site / "cache" / "data.json").exists()  # the data went where the user asked ...
    assert not list((run / "code").glob("*/cache"))  # ... not into the code snapshot (the jobs' cwd)
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert {r["round"] for r in rows} == {0, 1}
    assert all(r.get("gen_ppl") for r in rows), rows  # the judge at models/judge was found and ran
    names = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(str(e["job_id"]) for e in st.values()),
                            "-o", "JobName"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(set(names)) == sorted(f"rel-{s.name}" for s in stages_of(run))


# --------------------------------------------------------------------------------------------------
# A failing stage
# --------------------------------------------------------------------------------------------------
@on_slurm
def test_a_failing_stage_cancels_its_dependants(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """The teacher import points at a folder without weights: it exists (a missing path would be
    refused at submit), so the config is valid and the failure comes at run time.
    Every later stage is cancelled at once (not left PENDING DependencyNeverSatisfied) and the
    failure is explained in the state file, --status and the job's log."""
    run = tmp_path / "run"
    (tmp_path / "no-such-mdlm").mkdir()
    bad = ["teacher.source=import", f"teacher.import_path={tmp_path / 'no-such-mdlm'}"]
    submit("--config", str(TINY), *SLURM_FLAGS, "--run-dir", str(run), *OVERRIDES, *FIT, *bad)
    names = [s.name for s in stages_of(run)]
    later = names[2:]  # everything after prepare and teacher
    deadline = time.monotonic() + 240
    while not all(state(run).get(n, {}).get("status") == "cancelled" for n in later):
        assert time.monotonic() < deadline, diagnose(run)
        time.sleep(0.5)
    st = state(run)
    assert st["prepare"]["status"] == "done"
    assert st["teacher"]["status"] == "failed" and st["teacher"]["returncode"] != 0
    for n in later:
        assert st[n]["reason"].startswith("upstream stage teacher failed: exit code"), st[n]
    assert "no-such-mdlm: no model.safetensors found" in st["teacher"]["reason"]  # the child's own error
    ids = [str(st[n]["job_id"]) for n in later]
    deadline = time.monotonic() + 60
    while set(sacct(ids).values()) != {"CANCELLED"}:  # nothing left waiting in the queue
        assert time.monotonic() < deadline, sacct(ids)
        time.sleep(0.5)
    teacher_id = str(st["teacher"]["job_id"])
    deadline = time.monotonic() + 60
    while sacct([teacher_id]).get(teacher_id) != "FAILED":
        assert time.monotonic() < deadline, sacct([teacher_id])
        time.sleep(0.5)
    # The failing job leaves the lock with its chain (SLURM may still requeue a failed job: a lost
    # node's, docs/reliability.md); with none of the chain's jobs pending or running it is stale, so
    # the next submission takes it over.
    holder = runlock.RunLock(run).holder()
    assert holder is not None and holder["kind"] == "slurm" and runlock.gone(holder), holder
    log = task_logs(run, "teacher")[0]
    assert "no-such-mdlm" in log
    assert re.search(r"stage 'teacher' failed: exit code \d+ \(error \(rank 0\): .*no-such-mdlm.*\) "
                     r"\(job \d+, rank 0, log .*\); "
                     r"cancelled its dependants: "
                     r"eval_0 \(job \d+\), targets_1 \(job \d+\),", log), log[-3000:]
    out = submit("--status", str(run)).stdout
    assert re.search(r"teacher\s+failed\s+job \d+ FAILED", out) and re.search(r"report\s+cancelled\s+job \d+ CANCELLED",
                                                                              out), out
    assert "upstream stage teacher failed" in out


@on_slurm
def test_resources_slurm_cannot_give_are_refused_before_submitting(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    run = tmp_path / "run"
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    args = [a if a != "2" else "3" for a in SLURM_FLAGS]  # 3 nodes; the cluster has 2
    proc = submit("--config", str(TINY), *args, "--run-dir", str(run), *OVERRIDES, *FIT, "engine.global_batch_size=30",
                  "distill.global_batch_size=30", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(r"SLURM refuses the resources of stage 'teacher' \(--nodes=3 .*\): .*"
                     r"Requested node configuration is not available; nothing was submitted", proc.stderr), proc.stderr
    assert not (run / "pipeline_state.json").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout == queued


@on_slurm
def test_scancel_of_a_running_stage_cancels_it_and_its_dependants(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """A user's plain ``scancel`` (SIGTERM, no preemption signal) ends the stage for good: it is not
    requeued, and the stages after it are cancelled rather than left waiting forever."""
    run = tmp_path / "run"
    submit("--config", str(TINY), *SLURM_FLAGS, "--run-dir", str(run), *OVERRIDES, *FIT)

    def teacher_started() -> bool:  # its job runs and has started the pretraining processes
        return (state(run).get("teacher", {}).get("status") == "running"
                and "rank 0/2" in task_logs(run, "teacher").get(0, ""))

    deadline = time.monotonic() + 120
    while not teacher_started():
        assert time.monotonic() < deadline, diagnose(run)
        time.sleep(0.2)
    teacher_id = str(state(run)["teacher"]["job_id"])
    subprocess.run(["scancel", teacher_id], check=True)
    later = [s.name for s in stages_of(run)][2:]
    deadline = time.monotonic() + 60
    while not all(state(run).get(n, {}).get("status") == "cancelled" for n in ["teacher", *later]):
        assert time.monotonic() < deadline, diagnose(run)
        time.sleep(0.5)
    reason = state(run)["teacher"]["reason"]
    assert reason.startswith("the job was cancelled while running") and "resubmit the run to resume" in reason
    ids = [teacher_id, *(str(state(run)[n]["job_id"]) for n in later)]
    deadline = time.monotonic() + 60
    while set(sacct(ids).values()) != {"CANCELLED"}:  # the teacher was not requeued, nothing waits
        assert time.monotonic() < deadline, sacct(ids)
        time.sleep(0.5)
    time.sleep(3)  # a requeue would show up as PENDING again within the scheduler's 2 s interval
    assert set(sacct(ids).values()) == {"CANCELLED"}, sacct(ids)


# --------------------------------------------------------------------------------------------------
# Pieces of the SLURM submission and job wrapper that need no cluster
# --------------------------------------------------------------------------------------------------
def test_code_snapshot_is_reused_until_the_code_changes(tmp_path: Path) -> None:
    repo, run = tmp_path / "repo", tmp_path / "run"
    for top in CODE_DIRS:
        (repo / top / "sub").mkdir(parents=True)
        (repo / top / "sub" / "a.py").write_text(f"# {top}\n")
        (repo / top / "__pycache__").mkdir()
        (repo / top / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"stale")
    first = snapshot_code(repo, run)
    assert first.parent == run / "code" and (first / "trainer" / "sub" / "a.py").read_text() == "# trainer\n"
    assert not list(first.rglob("__pycache__"))
    (repo / "configs" / "__pycache__" / "b.pyc").write_bytes(b"other")  # not code: same snapshot
    assert snapshot_code(repo, run) == first
    (repo / "cluster" / "sub" / "a.py").write_text("# edited after submitting\n")
    second = snapshot_code(repo, run)
    assert second != first and (first / "cluster" / "sub" / "a.py").read_text() == "# cluster\n"
    assert sorted(p.name for p in (run / "code").iterdir()) == sorted([first.name, second.name])


def test_downstream_is_every_stage_after_a_stage() -> None:
    stages = pipeline.build_chain(load_config(TINY, OVERRIDES))
    names = [s.name for s in stages]
    assert downstream(stages, "teacher") == tuple(names[2:])
    assert downstream(stages, "eval_0") == ("report",)
    assert downstream(stages, "distill_1") == ("eval_1", "targets_2", "distill_2", "eval_2", "report")
    assert downstream(stages, "report") == ()


def test_stage_job_pickles_without_its_runtime_state() -> None:
    import threading

    import cloudpickle

    stages = pipeline.build_chain(load_config(TINY))
    job = StageJob(stages[1], "/run", "/run/code/x", downstream(stages, "teacher"), 42.0)
    job._exited, job._proc = threading.Event(), object()  # what __call__ adds; unpicklable (a lock)
    back = cloudpickle.loads(cloudpickle.dumps(job))
    assert back.__dict__ == {"stage": stages[1], "run_dir": "/run", "code_dir": "/run/code/x",
                             "dependants": downstream(stages, "teacher"), "stop_timeout_s": 42.0}
